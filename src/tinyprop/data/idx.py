"""The IDX file format of MNIST and Fashion-MNIST: parse bytes, find files, read them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# IDX type byte -> numpy big-endian dtype (only unsigned bytes appear in MNIST, the rest for
# completeness of the format).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The most bytes an IDX file may hold (decompressed): MNIST's largest file has 47,040,016. A
# small .gz can inflate to any size (a "gzip bomb"), and reading it whole ran out of memory.
MAX_IDX_BYTES = 256 * 2**20

# The four files of the official distribution, by (split, part).
IDX_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file (already decompressed) into a numpy array.

    Args:
        data: the file's bytes: magic ``00 00 type ndim``, ``ndim`` big-endian uint32 sizes,
            then the values.
        name: used in error messages.

    Returns:
        An array of the stored shape, in native byte order (uint8 for MNIST).

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[3] < 1:
        raise ValueError(f"{name} is not an IDX file (bad magic number): re-download it")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{name} has unknown IDX type code 0x{type_code:02x}: re-download it")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name} is truncated inside its IDX header: re-download it")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{name} is corrupt: its header says shape {shape} ({expected} bytes of data) but it "
            f"holds {len(data) - header} bytes: re-download it"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file from disk, plain or gzip-compressed (by the ``.gz`` suffix)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read(MAX_IDX_BYTES + 1)  # no further: a bomb stops here
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (OSError) or EOFError
        raise ValueError(f"cannot read {path}: {error}; re-download the file") from error
    if len(data) > MAX_IDX_BYTES:
        raise ValueError(
            f"{path} holds more than {MAX_IDX_BYTES} bytes{' decompressed' * (opener is not open)}"
            ", far more than any MNIST-style IDX file: it is not one (a compressed file that "
            "inflates without end?); re-download the file"
        )
    return parse_idx(data, str(path))


def find_idx(folder: Path, split: str, part: str) -> Path | None:
    """The IDX file for ``split``/``part`` in ``folder`` (plain, ``.gz``, or torchvision's
    ``train-images.idx3-ubyte`` spelling), or None if absent."""
    stem = IDX_STEMS[(split, part)]
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` uint8 of one split from an IDX folder
    (files of another IDX type are refused).

    Args:
        folder: holds the official files, e.g. ``train-images-idx3-ubyte(.gz)``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``.

    Example:
        >>> images, labels = read_idx_split(Path("data/mnist"), "test")  # doctest: +SKIP
    """
    paths = {part: find_idx(folder, split, part) for part in ("images", "labels")}
    missing = [IDX_STEMS[(split, p)] for p, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (plain or .gz)")
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    for part, array in (("images", images), ("labels", labels)):
        if array.dtype != np.uint8:  # float labels were truncated, NaN pixels taken, silently
            raise ValueError(
                f"{paths[part]} holds {array.dtype} values; MNIST-style {part} are unsigned "
                "bytes (IDX type 0x08): re-download the file"
            )
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"IDX files in {folder} disagree: images {images.shape}, labels {labels.shape}; "
            "expected (N, H, W) and (N,): re-download them"
        )
    return images, labels
