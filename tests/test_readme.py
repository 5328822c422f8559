"""The README's usage example runs as written and prints what the README says it prints (the
counts and percentages within a small tolerance: float rounding moves the last digits between
machines and between the native and the PyTorch kernels)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def marked(name: str, language: str) -> str:
    block = re.search(
        rf"<!-- {name}: start -->\s*```{language}\n(.*?)```\s*<!-- {name}: end -->",
        README.read_text(),
        re.S,
    )
    assert block, f"README.md lost its marked {name}"
    return block.group(1)


def test_readme_usage_example_prints_its_expected_output(capsys):
    exec(compile(marked("readme-example", "python"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    expected = marked("readme-output", "").strip().splitlines()
    assert len(printed) == len(expected), printed
    for got, want in zip(printed, expected, strict=True):
        assert NUMBER.sub("#", got) == NUMBER.sub("#", want), (got, want)
        got_numbers = [float(n) for n in NUMBER.findall(got)]
        want_numbers = [float(n) for n in NUMBER.findall(want)]
        for value, reference in zip(got_numbers, want_numbers, strict=True):
            # percentages within 3 points, sample counts within 5% of the 1536 seen
            assert abs(value - reference) <= (3.0 if reference <= 100 else 80), (got, want)
