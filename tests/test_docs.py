"""The documentation: the generated results page and README table are current, the MkDocs site
builds with no warning (strict), the README stays short, no link in the README or the docs
points outside the repository, and the runtime guide's block that writes samples.bin runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_results_page_and_readme_table_are_generated_from_the_records():
    run = subprocess.run([sys.executable, str(ROOT / "scripts/results_page.py"), "--check"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_docs_build_strict_without_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).with_name("mkdocs")
    run = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    api = (tmp_path / "site" / "api.html").read_text()
    assert "train_step" in api and "TinyPropConfig" in api  # generated from the docstrings
    for page in ("algorithm", "benchmark", "datasets", "results", "ray", "runtime", "changelog"):
        assert (tmp_path / "site" / f"{page}.html").is_file(), page
    for page in (tmp_path / "site").glob("*.html"):  # no page loads or links anything outside
        assert not re.search(r'(?:href|src)="(?:https?:)?//', page.read_text()), page.name


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_no_link_leaves_the_repository():
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in files:
        for target in LINK.findall(path.read_text()):
            assert "://" not in target and not target.startswith("/"), (path.name, target)
            file_part = target.split("#")[0]
            if not file_part:
                continue
            resolved = (path.parent / file_part).resolve()
            if path.parent.name == "docs" and file_part.startswith("results/"):
                resolved = (ROOT / "benchmarks" / file_part).resolve()  # plots, see mkdocs hook
            assert resolved.is_relative_to(ROOT), (path.name, target)
            assert resolved.exists(), (path.name, target)


def test_the_runtime_guides_samples_bin_block_writes_the_records_it_describes(tmp_path):
    # the guide's commands read samples.bin, which it did not say how to write
    text = (ROOT / "docs" / "runtime.md").read_text()
    block = re.search(r"here HAR's training split:\n\n```python\n(.*?)```", text, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    import numpy as np

    import tinyprop.data

    x, y = tinyprop.data.load("har", "train").tensors
    records = np.fromfile(tmp_path / "samples.bin", dtype=np.int32).reshape(len(x), -1)
    assert records.shape[1] == x[0].numel() + 1  # TP_MODEL_INPUT_SIZE float32, one int32 label
    assert np.array_equal(records[:, :-1].view(np.float32), x.reshape(len(x), -1).numpy())
    assert np.array_equal(records[:, -1], y.numpy())
