"""The runtime installs the way embedded users install libraries: a CMake project (host and
Cortex-M4 builds), an Arduino library (library.properties, src/ layout) and a PlatformIO
library (library.json), each manifest checked against its format's documented fields.

Arduino: the Arduino Library Specification (1.5 format) requires name, version, author,
maintainer, sentence, paragraph, category (one of nine values), url and architectures, and
compiles src/, whose root is on the include path. The project has no public page yet (no
[project.urls] in pyproject.toml), so library.properties leaves url out rather than name a
made-up address: the test checks every other required field and that url, when it comes back,
is the project's own repository address from pyproject.toml. PlatformIO: the library.json manifest
requires name (at most 50 characters: a-z, digits, dashes, not at either end), version (at
most 20, semantic versioning) and description (at most 255).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import tinyprop

ROOT = Path(__file__).resolve().parents[1] / "runtime"  # the checkout's runtime/ folder
PROJECT_VERSION = tinyprop.__version__
ARDUINO_REQUIRED = (
    "name",
    "version",
    "author",
    "maintainer",
    "sentence",
    "paragraph",
    "category",
    "architectures",
)  # fmt: skip  (and url: see the module docstring)
ARDUINO_CATEGORIES = {
    "Display", "Communication", "Signal Input/Output", "Sensors", "Device Control", "Timing",
    "Data Storage", "Data Processing", "Other",
}  # fmt: skip


def properties(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
    return fields


def test_arduino_library_properties():
    fields = properties(ROOT / "library.properties")
    missing = [name for name in ARDUINO_REQUIRED if not fields.get(name)]
    assert not missing, f"library.properties lacks {missing}"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.\-]*", fields["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", fields["version"])
    assert fields["version"] == PROJECT_VERSION
    assert fields["category"] in ARDUINO_CATEGORIES
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    repository = project.get("urls", {}).get("Repository")
    assert fields.get("url") == repository, "url must be the project's repository address"
    # the src/ layout: the sources and, at its root, the header the sketch includes
    for header in fields["includes"].split(","):
        assert (ROOT / "src" / header.strip()).is_file()
    assert sorted(p.name for p in (ROOT / "src").glob("*.c"))


def test_platformio_library_json():
    manifest = json.loads((ROOT / "library.json").read_text())
    name, version = manifest["name"], manifest["version"]
    assert len(name) <= 50 and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name)
    assert len(version) <= 20 and version == PROJECT_VERSION
    assert 0 < len(manifest["description"]) <= 255
    build = manifest["build"]
    assert (ROOT / build["srcDir"]).is_dir()
    assert (ROOT / build["includeDir"] / manifest["headers"]).is_file()


def cmake_build(build: Path, *options: str) -> Path:
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *options],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    return build / "libtinyprop.a"


def test_cmake_builds_for_the_host_and_links(tmp_path):
    if shutil.which("cmake") is None:
        pytest.fail("cmake not found: scripts/install-system-deps.sh installs it")
    library = cmake_build(tmp_path / "host")
    program = tmp_path / "main.c"
    program.write_text(
        '#include "tinyprop.h"\n'
        "static float w[4 * 3], b[3];\n"
        "static const tp_layer_spec layers[] = {TP_FLATTEN_SPEC(), TP_DENSE_SPEC(3, w, b)};\n"
        "int main(void) {\n"
        "    tp_model_spec spec = {1, 2, 2, 2, layers};\n"
        "    tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);\n"
        "    tp_optimizer_config sgd = tp_sgd(0.1, 0.0, 0.0);\n"
        "    size_t bytes = 0;\n"
        "    return tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK && bytes > 0 ? 0 : 1;\n"
        "}\n"
    )
    binary = tmp_path / "main"
    subprocess.run(["gcc", "-std=c99", "-I", str(ROOT / "include"), str(program), str(library),
                    "-lm", "-o", str(binary)], check=True)  # fmt: skip
    assert subprocess.run([str(binary)]).returncode == 0


def test_cmake_builds_for_cortex_m4(tmp_path):
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.fail("arm-none-eabi-gcc not found: scripts/install-system-deps.sh installs it")
    library = cmake_build(
        tmp_path / "m4", f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'cmake' / 'arm-none-eabi.cmake'}"
    )
    header = subprocess.run(["arm-none-eabi-objdump", "-f", str(library)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "armv7e-m" in header
    symbols = subprocess.run(["arm-none-eabi-nm", str(library)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert " T tp_init_mode" in symbols and " T tp_train_batch" in symbols
