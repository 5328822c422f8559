"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(capsys):
    text = README.read_text()
    block = re.search(
        r"<!-- readme-example: start -->\s*```python\n(.*?)```\s*<!-- readme-example: end -->",
        text,
        re.S,
    )
    assert block, "README.md lost its marked usage example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"backward compute vs full \d+\.\d%, total vs full \d+\.\d%", printed)
    assert "trained" in printed and "skipped" in printed
