"""Optional dependencies: importing one that is missing raises a one-line error naming the
extra that installs it (``pip install -e '.[bench]'``), which the ``tinyprop`` command prints
without a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str, alternative: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    Args:
        module: the module to import, e.g. ``"matplotlib.pyplot"``.
        extra: the tinyprop extra that installs it, e.g. ``"bench"``.
        alternative: what to do instead, e.g. ``"pass --no-plots"``.

    Example:
        >>> ray = require("ray", "bench", "drop --ray to run the runs here")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is None or error.name.split(".")[0] != top:
            raise
        message = (
            f"{top} is not installed; it comes with the {extra!r} extra: pip install -e "
            f"'.[{extra}]' in a clone, pip install 'tinyprop[{extra}]' otherwise"
        )
        raise MissingExtraError(message + (f" (or {alternative})" if alternative else "")) from None
