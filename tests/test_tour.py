"""The README's five-minute tour runs as written, from a fresh folder, with the installed
``tinyprop`` on the path (the tour's first line, activating the virtual environment, is what
this test environment already is)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tour_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\[start:tour\] -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its marked tour"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    assert lines[0] == ". .venv/bin/activate"
    return [line for line in lines[1:] if line]


def test_the_tour_runs_as_written(tmp_path):
    commands = tour_commands()
    assert any(c.startswith("tinyprop bench --suite tiny") for c in commands)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(list((tmp_path / "results" / "tiny-finetune").glob("finetune__*.json"))) == 14
    assert (tmp_path / "results" / "tiny-finetune" / "report.md").is_file()
    assert (tmp_path / "har.pt").is_file() and (tmp_path / "har_c" / "train").is_file()
    assert "model: 8372 parameters" in run.stdout and run.stdout.rstrip().endswith("done")
