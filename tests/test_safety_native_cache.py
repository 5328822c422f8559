"""Finding 4 of the fail-safe issue: the native-kernel cache trusted any file with the expected
name. A planted library had its constructor run, an empty or garbage one made every run fail.
Now the cache folder is 0700 and owner-checked, the library's SHA-256 is recorded at build time
and checked before it is loaded, and anything that does not verify is rebuilt."""

import ctypes
import os
import shutil
import subprocess
import warnings

import pytest

from tinyprop import native
from tinyprop.data import cache
from tinyprop.native import build

pytestmark = pytest.mark.skipif(shutil.which(build._compiler()) is None, reason="no C compiler")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own."""
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _loads_kernels(lib) -> bool:
    return isinstance(lib, ctypes.CDLL) and hasattr(lib, "tp_topk_f32")


def _plant(path, tmp_path) -> os.PathLike:
    """Compile a library whose constructor writes a marker file, at ``path``."""
    source, marker = tmp_path / "planted.c", tmp_path / "marker"
    source.write_text(PLANTED)
    command = [build._compiler(), f'-DMARKER="{marker}"', "-shared", "-fPIC", str(source)]
    subprocess.run([*command, "-o", str(path)], check=True)
    return marker


def test_planted_library_is_rebuilt_not_loaded(private_cache):
    path = build.library_path()
    marker = _plant(path, private_cache)
    assert _loads_kernels(build.load())
    assert not marker.exists()  # the planted constructor never ran
    assert cache.digest_matches(path)


def test_planted_library_beside_an_old_record_is_rebuilt(private_cache):
    path = build.library_path()
    assert build.compile_library(path) is None
    marker = _plant(path, private_cache)  # swapped in after the build: the record disagrees
    assert _loads_kernels(build.load())
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x7fELF garbage" * 100], ids=["empty", "garbage"])
def test_empty_or_garbage_library_is_rebuilt(private_cache, content):
    path = build.library_path()
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rebuild is silent
        assert _loads_kernels(build.load())


def test_recorded_but_unloadable_library_is_rebuilt(private_cache):
    path = build.library_path()
    path.write_bytes(b"not a shared object")
    cache.record_digest(path)  # verifies, yet dlopen fails: build again
    assert _loads_kernels(build.load())


def test_unbuildable_library_falls_back_to_pytorch_with_one_warning(private_cache, monkeypatch):
    build.library_path().write_bytes(b"garbage")
    monkeypatch.setenv("CC", str(private_cache / "no-such-compiler"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="PyTorch kernels") as caught:
            assert native.library() is None
            assert native.library() is None  # cached: no second warning
        assert len(caught) == 1
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_cache_folder_is_private(private_cache):
    folder = private_cache / "cache" / "native"
    folder.mkdir(parents=True, mode=0o777)
    os.chmod(folder, 0o777)
    assert build.library_path().parent == folder
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a folder to another user")
def test_cache_folder_of_another_user_is_not_trusted(private_cache):
    folder = private_cache / "cache" / "native"
    folder.mkdir(parents=True)
    os.chown(folder, 65534, 65534)
    assert build.library_path() is None
    with pytest.warns(RuntimeWarning, match="belongs to another user"):
        assert build.load() is None


def test_runtime_library_cache_is_verified_too(private_cache):
    from tinyprop.export import runtime

    path = runtime.build_library()
    assert cache.digest_matches(path) and path.parent.stat().st_mode & 0o777 == 0o700
    marker = _plant(path, private_cache)  # swapped in after the build
    assert runtime.build_library() == path and cache.digest_matches(path)
    runtime.load_library(path)
    assert not marker.exists()
