"""The documentation: the generated results page and README table are current, the MkDocs site
builds with no warning (strict), the README stays short, and no link in the README or the docs
points outside the repository."""

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
