"""CIFAR-10 and CIFAR-100: the official python pickles under ``data_dir``, else stand-ins.

Offline stand-ins (the real CIFAR is not on any package registry):
    - cifar10: real Fashion-MNIST (Debian package ``dataset-fashion-mnist``), zero-padded to
      32x32 and repeated to 3 channels; source ``"fashion-mnist as cifar10 stand-in"``.
    - cifar100: 100 classes ``"00"``..``"99"``, each image two real MNIST digits side by side
      (tens digit left, units digit right), 3x32x32; source
      ``"mnist digit pairs as cifar100 stand-in"``.
"""

from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset, cached_arrays, resolve_data_dir
from tinyprop.data.cache import sha256
from tinyprop.data.idx import read_idx_split
from tinyprop.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    normalise,
    pad_to,
    repeat_channels,
    resize_batch,
)

FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_DEB_FOLDER = "usr/share/datasets/fashion-mnist"  # where the .deb puts the IDX files
FASHION_SYSTEM_FOLDER = Path("/") / FASHION_DEB_FOLDER  # ... once installed

SOURCE_CIFAR10_STAND_IN = "fashion-mnist as cifar10 stand-in"
SOURCE_CIFAR100_STAND_IN = "mnist digit pairs as cifar100 stand-in"
DIGIT_PAIRS_PER_CLASS = {"train": 500, "test": 100}

_OFFICIAL = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "files": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "label_key": "labels",
        "num_classes": 10,
        "stats": (CIFAR10_MEAN, CIFAR10_STD),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "files": {"train": ["train"], "test": ["test"]},
        "label_key": "fine_labels",
        "num_classes": 100,
        "stats": (CIFAR100_MEAN, CIFAR100_STD),
    },
}


def _empty_array(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for an array whose data the pickle's next step sets (as
    numpy pickles every array: an empty (0,) array first): a larger shape would be allocated
    here, and an object dtype filled, from a few bytes of a crafted file."""
    if subtype is not np.ndarray or not isinstance(shape, tuple) or math.prod(shape) > 1:
        raise pickle.UnpicklingError(
            f"refusing an array of shape {shape!r} made before its data (a crafted file)"
        )
    return np.ndarray.__new__(subtype, shape, dtype)


def _plain_dtype(*args):
    """``numpy.dtype`` without Python objects (a CIFAR batch holds bytes and integers)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing the object dtype {dtype} in a CIFAR batch")
    return dtype


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays of bytes and numbers (the CIFAR batches
    hold nothing else), so a tampered file cannot run code nor make an array larger than
    itself."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _empty_array,
        ("numpy._core.multiarray", "_reconstruct"): _empty_array,
        ("numpy.core.multiarray", "scalar"): None,
        ("numpy._core.multiarray", "scalar"): None,
        ("numpy", "ndarray"): None,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): None,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return self._ALLOWED[module, name] or super().find_class(module, name)


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    The official files hold ``data`` as a uint8 array (N, 3072) and the labels as a list of
    N ints; anything else is refused before it is converted (a list of arrays, or nested
    lists, pickled by reference, grew a few KB of file into gigabytes; a float array was cast
    to uint8 modulo 256)."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data, labels = batch["data"], batch[label_key]
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{path} is not a valid CIFAR python batch ({type(error).__name__}: {error}); "
            "re-download and unpack the official cifar-*-python.tar.gz"
        ) from error
    except MemoryError as error:  # a length field claiming more bytes than memory holds
        raise ValueError(
            f"{path} is not a valid CIFAR python batch (it claims more memory than there is); "
            "re-download and unpack the official cifar-*-python.tar.gz"
        ) from error
    problem = _batch_problem(data, labels)
    if problem is not None:
        raise ValueError(
            f"{path}: {problem}; the official files hold data (N, 3072) uint8 and N integer "
            f"labels: re-download them"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)  # (N, 3, 32, 32)


def _batch_problem(data, labels) -> str | None:
    """What is wrong with a batch's ``data`` and ``labels``, or None (checked before either is
    converted)."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"an array of {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        return f"data is {kind}, not a uint8 array"
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        return f"data has shape {data.shape}, not (N, 3072)"
    if isinstance(labels, np.ndarray):
        integer = labels.dtype.kind in "iu" and labels.ndim == 1
    else:
        integer = isinstance(labels, list) and all(type(label) is int for label in labels)
    if not integer:
        return "the labels are not a list of integers"
    if len(labels) != data.shape[0]:
        return f"{data.shape[0]} images but {len(labels)} labels"
    if len(labels) and not -(2**63) <= min(labels) <= max(labels) < 2**63:
        return "a label is outside int64"
    return None


def find_official(name: str, folder: Path) -> Path | None:
    """The official ``cifar-10-batches-py`` / ``cifar-100-python`` folder under ``folder``."""
    wanted = _OFFICIAL[name]["folder"]
    for candidate in (folder / wanted, folder / name / wanted, folder / name.upper() / wanted):
        if candidate.is_dir():
            return candidate
    return None


def load_official(name: str, split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of the official CIFAR pickles in ``folder`` (the unpacked archive)."""
    spec = _OFFICIAL[name]
    missing = [f for f in spec["files"][split] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: unpack the complete official archive there"
        )
    parts = [_read_batch(folder / f, spec["label_key"]) for f in spec["files"][split]]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])  # (N,)
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise ValueError(f"labels in {folder} fall outside 0..{spec['num_classes'] - 1}")
    return images, labels


def _fetch_fashion_deb(workdir: Path) -> Path:
    """``apt-get download`` the pinned .deb, verify it, unpack it; return the IDX folder."""
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt_get is None or dpkg_deb is None:
        raise RuntimeError(
            "the CIFAR-10 stand-in needs Fashion-MNIST from the Debian package "
            f"{FASHION_DEB}, and apt-get/dpkg-deb are missing: on Debian/Ubuntu run "
            f"`apt-get install -y {FASHION_DEB}`, or put the real CIFAR-10 "
            "(cifar-10-batches-py) in $TINYPROP_DATA"
        )
    result = subprocess.run(
        [apt_get, "download", f"{FASHION_DEB}={FASHION_DEB_VERSION}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    debs = sorted(workdir.glob(f"{FASHION_DEB}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {FASHION_DEB}={FASHION_DEB_VERSION}` failed: "
            f"{result.stderr.strip()[-500:]}; run `apt-get update` and retry, or "
            f"`apt-get install -y {FASHION_DEB}`"
        )
    digest = sha256(debs[0])
    if digest != FASHION_DEB_SHA256:
        raise RuntimeError(
            f"checksum mismatch for {debs[0].name}: SHA-256 {digest}, expected "
            f"{FASHION_DEB_SHA256}; rerun, or `apt-get install -y {FASHION_DEB}`"
        )
    subprocess.run([dpkg_deb, "-x", str(debs[0]), str(workdir / "root")], check=True, timeout=600)
    return workdir / "root" / FASHION_DEB_FOLDER


def _build_fashion_arrays() -> dict[str, np.ndarray]:
    """All of Fashion-MNIST as uint8 arrays, from the installed package or a fetched .deb."""
    arrays = {}

    def read(folder: Path) -> None:
        for split in ("train", "test"):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = read_idx_split(folder, split)

    if (FASHION_SYSTEM_FOLDER / "train-images-idx3-ubyte.gz").is_file():
        read(FASHION_SYSTEM_FOLDER)
    else:
        with tempfile.TemporaryDirectory(prefix="tinyprop-deb-") as temporary:
            read(_fetch_fashion_deb(Path(temporary)))
    return arrays


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST: images ``(N, 28, 28)`` uint8, labels ``(N,)`` uint8 (60k/10k).

    Example:
        >>> images, labels = fashion_mnist_arrays("test")
        >>> images.shape
        (10000, 28, 28)
    """
    params = {"package": FASHION_DEB, "version": FASHION_DEB_VERSION}
    arrays = cached_arrays("fashion-mnist", params, _build_fashion_arrays)
    return arrays[f"{split}_images"], arrays[f"{split}_labels"]


def digit_pairs(split: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-100 stand-in: class ``10*a + b`` shows MNIST digit ``a`` left of digit ``b``.

    Digits are drawn (seeded, with replacement) from the same MNIST split, so train and test
    never share a handwritten digit. Each 28x28 digit is cut to its central 24x24, the pair
    (24x48) resized to 16x32 and zero-padded to 32x32.

    Args:
        split: ``"train"`` or ``"test"`` (of MNIST).
        per_class: images per class.
        seed: generator seed; the same seed gives identical arrays.

    Returns:
        Images ``(100 * per_class, 32, 32)`` uint8 in shuffled order and labels ``(N,)`` int64.

    Example:
        >>> images, labels = digit_pairs("test", per_class=2, seed=0)
        >>> images.shape
        (200, 32, 32)
    """
    from tinyprop.data.mnist import mnist_arrays

    digits, digit_labels = mnist_arrays(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.permutation(np.repeat(np.arange(100), per_class))  # (N,)
    order = np.argsort(digit_labels, kind="stable")  # digit indices grouped by class 0..9
    counts = np.bincount(digit_labels, minlength=10)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def draw(digit: np.ndarray) -> np.ndarray:  # (N,) digit -> (N,) MNIST index of that digit
        offset = (rng.random(digit.shape[0]) * counts[digit]).astype(np.int64)
        return order[starts[digit] + offset]

    left = digits[draw(labels // 10)][:, 2:26, 2:26]  # (N, 24, 24)
    right = digits[draw(labels % 10)][:, 2:26, 2:26]  # (N, 24, 24)
    pair = np.concatenate([left, right], axis=2)[:, None]  # (N, 1, 24, 48)
    small = resize_batch(pair, 16, 32)[:, 0]  # (N, 16, 32)
    return pad_to(small, 32), labels  # (N, 32, 32), (N,)


def load(
    name: str, split: str = "train", data_dir: str | Path | None = None, **options
) -> ArrayDataset:
    """Load CIFAR-10 or CIFAR-100 as float32 ``(N, 3, 32, 32)``.

    With ``data_dir`` (or ``$TINYPROP_DATA``) holding the unpacked official python archive
    (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``, or
    ``cifar-100-python/`` with ``train`` and ``test``; fine labels), that is read and normalised
    per channel with the standard CIFAR mean/std. Otherwise the stand-in of the module docstring
    is used (normalised with Fashion-MNIST's / MNIST's mean and std), with ``source`` saying so.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the official archive; an explicit folder without it is an error.
        options: ``limit`` (int): keep the first ``limit`` samples. For the cifar100 stand-in
            also ``per_class`` (default 500 train / 100 test) and ``seed`` (default 0).

    Returns:
        An :class:`ArrayDataset` (10 or 100 classes, input ``(3, 32, 32)``).

    Example:
        >>> train = load("cifar10", "train", limit=1000)
        >>> train.source, train.input_shape
        ('fashion-mnist as cifar10 stand-in', (3, 32, 32))
    """
    if name not in _OFFICIAL:
        raise ValueError(f"cifar loader handles 'cifar10' and 'cifar100', not {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    limit = options.pop("limit", None)
    stand_in_options = {k: options.pop(k) for k in ("per_class", "seed") if k in options}
    if options or (name == "cifar10" and stand_in_options):
        unknown = sorted(options) + (sorted(stand_in_options) if name == "cifar10" else [])
        raise TypeError(f"unknown {name} option(s) {unknown}; see tinyprop.data.cifar.load")
    folder, explicit = resolve_data_dir(data_dir)
    official = find_official(name, folder) if folder is not None else None
    spec = _OFFICIAL[name]
    if official is not None:
        images, labels = load_official(name, split, official)
        images, labels = images[:limit], labels[:limit]
        x = normalise(images, *spec["stats"])  # (N, 3, 32, 32)
        return ArrayDataset(x, labels, source=name, num_classes=spec["num_classes"])
    if explicit:
        raise FileNotFoundError(
            f"no {spec['folder']}/ in {folder}: unpack the official {spec['folder']} archive "
            "there, or leave data_dir unset to use the offline stand-in"
        )
    if name == "cifar10":
        images, labels = fashion_mnist_arrays(split)
        images, labels = images[:limit], labels[:limit]
        grey = normalise(pad_to(images, 32)[:, None], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        x = repeat_channels(grey)  # (N, 3, 32, 32) view of (N, 1, 32, 32)
        return ArrayDataset(x, labels.astype(np.int64), SOURCE_CIFAR10_STAND_IN, num_classes=10)
    per_class = int(stand_in_options.get("per_class", DIGIT_PAIRS_PER_CLASS[split]))
    seed = int(stand_in_options.get("seed", 0))
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    params = {"split": split, "per_class": per_class, "seed": seed, "version": 1}
    arrays = cached_arrays(
        "cifar100-digit-pairs",
        params,
        lambda: dict(zip(("images", "labels"), digit_pairs(split, per_class, seed), strict=True)),
    )
    images, labels = arrays["images"][:limit], arrays["labels"][:limit]
    grey = normalise(images[:, None], MNIST_MEAN, MNIST_STD)  # (N, 1, 32, 32)
    return ArrayDataset(repeat_channels(grey), labels, SOURCE_CIFAR100_STAND_IN, num_classes=100)
