"""Free text (file paths, layer names) made safe to write into generated C source."""

from __future__ import annotations


def c_comment(text: object) -> str:
    """``text`` as one line of printable ASCII that cannot end or nest a C block comment:
    other characters become Python-style escapes (``\\n``, ``\\x00``, ``\\xe9``) and ``*/``,
    ``/*`` are broken apart.

    Example:
        >>> c_comment("model */ int evil;\\n/* x")
        'model *\\\\/ int evil;\\\\n/\\\\* x'
    """
    escaped = "".join(
        character if " " <= character <= "~" else ascii(character)[1:-1] for character in str(text)
    )
    return escaped.replace("*/", "*\\/").replace("/*", "/\\*")
