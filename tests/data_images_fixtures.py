"""Writers of tiny datasets in the real, official on-disk formats (for the image loader tests)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format of MNIST."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder: Path, sizes: dict[str, int], compress: bool, seed: int = 0) -> dict:
    """The four official MNIST IDX files (plain or .gz) with random digits; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip
    arrays = {}
    for split, n in sizes.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for stem, array in zip(stems[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


def write_cifar10(root: Path, per_batch: int = 3, seed: int = 0) -> dict:
    """``cifar-10-batches-py/`` with 5 train batches and a test batch, pickled like the
    official files (bytes keys, ``data`` (N, 3072) uint8, ``labels`` list)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, handle, protocol=2)  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    return batches


def write_cifar100(root: Path, sizes: dict[str, int], seed: int = 0) -> dict:
    """``cifar-100-python/{train,test}`` with fine and coarse labels (str keys)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in sizes.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [label // 5 for label in fine]
        out[split] = (data, fine)
        with open(folder / split, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": coarse}, handle)
    return out


def solid_jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """A JPEG of one colour, ``size`` = (width, height)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def write_flowers(root: Path) -> dict:
    """``flowers-102/`` with 6 images: labels 1, 2, 102, 1, 2, 102; trnid 1, 2; valid 3;
    tstid 4, 5, 6. Colours by label; image 4 is wide (blue edges, red middle)."""
    from PIL import Image
    from scipy.io import savemat

    folder = root / "flowers-102"
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 102: (0, 0, 255)}
    labels = [1, 2, 102, 1, 2, 102]
    for index, label in enumerate(labels, start=1):
        solid_jpeg(folder / "jpg" / f"image_{index:05d}.jpg", (30 + 7 * index, 24), colours[label])
    wide = Image.new("RGB", (80, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (20, 0, 60, 20))  # red middle 40x20 between blue edges
    wide.save(folder / "jpg" / "image_00004.jpg", quality=95)
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(folder / "setid.mat", {"trnid": np.array([[1, 2]], dtype=np.uint16),
                                   "valid": np.array([[3]], dtype=np.uint16),
                                   "tstid": np.array([[4, 5, 6]], dtype=np.uint16)})  # fmt: skip
    return {"colours": colours}


FOOD_CLASSES = [f"dish_{i:03d}" for i in range(101)]


def write_food(root: Path) -> dict:
    """``food-101/`` with 101 class names; train: 2 images each of classes 0, 5, 100; test: one
    each. Images are solid colours by class."""
    folder = root / "food-101"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    colours = {0: (200, 30, 30), 5: (30, 200, 30), 100: (30, 30, 200)}
    lists = {"train": [], "test": []}
    image_id = 1000
    for split, count in (("train", 2), ("test", 1)):
        for label, colour in colours.items():
            for _ in range(count):
                entry = f"{FOOD_CLASSES[label]}/{image_id}"
                solid_jpeg(folder / "images" / f"{entry}.jpg", (50, 40), colour)
                lists[split].append((entry, label))
                image_id += 1
        (folder / "meta" / f"{split}.txt").write_text("\n".join(e for e, _ in lists[split]))
    return {"lists": lists, "colours": colours}
