"""The package: every Python package is in the wheel, the wheel carries the C runtime, the
license and the metadata, and an installed wheel works outside the repository (``--version``,
the README example, ``tinyprop export`` of the HAR model and its C build)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import tinyprop

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])  # fmt: skip
    found = {
        ".".join(path.parent.relative_to(ROOT / "src").parts)
        for path in (ROOT / "src" / "tinyprop").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "BuildBackendWarning" not in build.stderr, build.stderr
    (path,) = out.glob("tinyprop-*.whl")
    return path


def test_the_wheel_carries_the_runtime_license_and_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    runtime = ROOT / "runtime"
    for path in [*runtime.glob("include/*.h"), *runtime.glob("src/*.[ch]"),
                 runtime / "examples/train_example.c"]:  # fmt: skip
        assert f"tinyprop/_runtime/{path.relative_to(runtime)}" in names, path
    assert "tinyprop/native/kernels.c" in names
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    fields = Parser().parsestr(zipfile.ZipFile(wheel).read(metadata).decode())
    assert fields["Version"] == tinyprop.__version__
    assert fields["License-Expression"] == "MIT"
    assert len(fields.get_all("Classifier")) >= 5


def test_an_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # some other repository
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # torch, numpy and tqdm come from the test environment (a plain path entry: the editable
    # tinyprop of that environment is not activated); tinyprop itself only from the wheel
    purelib = Path(sysconfig.get_paths()["purelib"])
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "deps.pth").write_text(f"{purelib}\n")
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*command: str, stdin: bytes | None = None) -> str:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=300,
                                input=stdin)  # fmt: skip
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        return result.stdout.decode()

    python, command = str(venv / "bin/python"), str(venv / "bin/tinyprop")
    assert run(command, "--version") == f"tinyprop {tinyprop.__version__}\n"
    where = run(python, "-c", "import tinyprop; print(tinyprop.__file__)")
    assert where.startswith(str(site)), where
    example = re.search(r"<!-- readme-example: start -->\s*```python\n(.*?)```",
                        (ROOT / "README.md").read_text(), re.S).group(1)  # fmt: skip
    assert "backward compute vs full" in run(python, "-c", example)
    run(python, "-c", "import torch, tinyprop.models as m; torch.manual_seed(0); "
        "torch.save(m.build('har').state_dict(), 'har.pt')")  # fmt: skip
    printed = run(command, "export", "har.pt", "--model", "har", "--out", "har_c")
    assert "parameters 8372" in printed, printed
    run("make", "-s", "-C", "har_c")
    trained = run(str(work / "har_c/train"), stdin=b"")
    assert trained.startswith("model: 8372 parameters") and trained.rstrip().endswith("done")
    assert store_commit(python, work, env) == "None"


def store_commit(python: str, work: Path, env: dict) -> str:
    """What an installed wheel writes as the commit of its records."""
    return subprocess.run(
        [python, "-c", "from tinyprop.bench import store; print(store.commit_hash())"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip
