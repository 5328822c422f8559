"""Compile ``kernels.c`` and load it, trusting only a library this user built.

The library is cached in ``cache_dir()/native``, a folder only this user can write (0700, owner
checked), keyed by the source, the compiler, the flags and the CPU. The SHA-256 of each built
library is recorded beside it at build time and checked before it is loaded: a planted, empty,
truncated or edited file is rebuilt, never loaded. When the rebuilt library still cannot be
loaded (or there is no compiler), tinyprop warns once and uses its PyTorch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

from tinyprop.data.cache import cache_dir, digest_matches, private_folder, record_digest

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c99", "-shared", "-fPIC"]
# Threads of PyTorch's own OpenMP team when the compiler has OpenMP (the library then shares
# torch's libgomp: no thread waits spinning for a core another team holds); POSIX threads else.
OPENMP = ["-fopenmp"]
FALLBACK = "using the slower PyTorch kernels"


def _machine_key() -> str:
    """What the compiled code depends on besides the source: compiler, flags, CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                cpu += line
    except OSError:
        pass
    return f"{_compiler()} {' '.join(FLAGS)} {platform.system()} {cpu}"


def _compiler() -> str:
    return os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]


def library_path() -> Path | None:
    """Where the compiled kernels of this source and machine are cached; None when the cache
    folder belongs to another user (then nothing in it is trusted)."""
    folder = private_folder(cache_dir() / "native")
    if folder is None:
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + _machine_key().encode()).hexdigest()[:16]
    return folder / f"kernels-{digest}.so"


def compile_library(path: Path) -> str | None:
    """Compile ``kernels.c`` into ``path`` (with OpenMP if the compiler has it) and record its
    SHA-256; returns why not, or None."""
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    for extra in (OPENMP, []):
        command = [_compiler(), *FLAGS, *extra, str(SOURCE), "-o", temporary]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
            break
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
    else:
        os.unlink(temporary)
        return f"{' '.join(command)}: {detail.strip()[:300]}"
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)  # atomic: concurrent builders never load a partial file
    record_digest(path)
    return None


def load() -> ctypes.CDLL | None:
    """The compiled kernels (cached, verified, rebuilt when needed) or None, with one warning
    saying why, when they cannot be built and loaded."""
    path = library_path()
    if path is None:
        folder = cache_dir() / "native"
        _warn(f"the kernel cache folder {folder} belongs to another user; not loading from it")
        return None
    if digest_matches(path):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            pass  # verified yet not loadable (another machine's build): build it again
    problem = compile_library(path)
    if problem is not None:
        _warn(
            f"could not compile its native kernels ({problem}). Install a C compiler (e.g. gcc) "
            "or set TINYPROP_NATIVE=0 to silence this"
        )
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        _warn(f"could not load its freshly built native kernels {path} ({error})")
        return None


def _warn(problem: str) -> None:
    warnings.warn(f"tinyprop: {problem}; {FALLBACK}.", RuntimeWarning, stacklevel=3)
