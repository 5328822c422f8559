"""The real datasets besides the paper's eight: Fashion-MNIST as itself and the 8x8 digits, each
on a fixture in its official format and on the copy a package ships."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from data_images_fixtures import write_mnist

from tinyprop import data, models
from tinyprop.data import digits
from tinyprop.data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD

# Fashion-MNIST has 6,000 / 1,000 images of each class; UCI optdigits' test set (the 1,797
# digits scikit-learn ships) has these per class
OPTDIGITS_TEST_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv("TINYPROP_DATA", raising=False)


@pytest.mark.parametrize("subfolder", ["fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_reads_official_idx_files(tmp_path, subfolder):
    arrays = write_mnist(tmp_path / subfolder, {"train": 5, "test": 3}, compress=True)
    for split, (images, labels) in arrays.items():
        dataset = data.load("fashion_mnist", split, data_dir=tmp_path)
        assert (dataset.source, dataset.num_classes, dataset.input_shape) == (
            "fashion-mnist", 10, (1, 28, 28),
        )  # fmt: skip
        assert dataset.y.tolist() == labels.tolist()
        expected = (images[:, None] / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        torch.testing.assert_close(dataset.x, torch.from_numpy(expected).float())


def test_fashion_mnist_keeps_apart_from_mnist_in_a_shared_folder(tmp_path, monkeypatch):
    write_mnist(tmp_path, {"train": 2, "test": 2}, compress=False)  # MNIST's files at the top
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Fashion-MNIST IDX files"):
        data.load("fashion_mnist", "train", data_dir=tmp_path / "empty")
    monkeypatch.setenv("TINYPROP_DATA", str(tmp_path))  # shared folder: not taken for Fashion
    assert len(data.load("fashion_mnist", "test", limit=7)) == 7  # the packaged copy
    with pytest.raises(TypeError, match="unknown fashion_mnist option"):
        data.load("fashion_mnist", "train", resolution=32)


def test_fashion_mnist_from_the_debian_package_is_the_full_real_set():
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000) and train.source == "fashion-mnist"
    assert train.y.bincount().tolist() == [6000] * 10 and test.y.bincount().tolist() == [1000] * 10
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01


def optdigits_text(x: np.ndarray, y: np.ndarray) -> str:
    lines = (",".join(str(v) for v in [*row, label]) for row, label in zip(x, y, strict=True))
    return "".join(line + "\n" for line in lines)


def test_digits_read_official_optdigits_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "optdigits"
    folder.mkdir()
    written = {}
    for split, name, count in (("train", "optdigits.tra", 6), ("test", "optdigits.tes", 4)):
        x, y = rng.integers(0, 17, (count, 64)), rng.integers(0, 10, count)
        (folder / name).write_text(optdigits_text(x, y))
        written[split] = (x, y)
    for split, (x, y) in written.items():
        dataset = data.load("digits", split, data_dir=tmp_path)
        assert (dataset.source, dataset.input_shape) == ("optdigits", (1, 8, 8))
        assert dataset.y.tolist() == y.tolist()
        expected = torch.from_numpy(x / 16).float().reshape(-1, 1, 8, 8)
        torch.testing.assert_close(dataset.x, expected)


@pytest.mark.parametrize(
    "line, words",
    [("1,2,3\n", "expected 64 counts"), (",".join(["17"] * 64) + ",1\n", "expected 64 counts"),
     (",".join(["0"] * 64) + ",12\n", "not a digit"), ("a,b\n", "line 1"), ("\n", "no digits")],
)  # fmt: skip
def test_digits_corrupt_files_are_named(tmp_path, line, words):
    (tmp_path / "optdigits.tra").write_text(line)
    (tmp_path / "optdigits.tes").write_text(line)
    with pytest.raises(ValueError, match=words):
        data.load("digits", "train", data_dir=tmp_path)


def test_digits_missing_files_and_options_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no optdigits.tra and optdigits.tes"):
        data.load("digits", "train", data_dir=tmp_path)
    with pytest.raises(TypeError, match="unknown digits option"):
        data.load("digits", "train", limit=3)


def test_digits_from_the_scikit_learn_wheel_are_the_optdigits_test_set():
    """Fetches the scikit-learn 1.5.2 wheel (about 13 MB) with pip on first use; cached after."""
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert (len(train), len(test)) == (1198, 599) and train.source == digits.SOURCE_OFFLINE
    counts = (train.y.bincount() + test.y.bincount()).tolist()
    assert counts == OPTDIGITS_TEST_COUNTS  # every digit once, split 2:1 per class
    assert (test.y.bincount() * 2 - train.y.bincount()).abs().max() <= 2
    rows = {tuple(row.tolist()) for row in train.x.reshape(len(train), -1)}
    assert not rows & {tuple(row.tolist()) for row in test.x.reshape(len(test), -1)}
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    other = data.load("digits", "train", split_seed=1)
    assert not torch.equal(other.x, train.x)


def test_the_extra_datasets_have_mcu_sized_models():
    for name, shape in (("fashion_mnist", (1, 28, 28)), ("digits", (1, 8, 8))):
        assert models.reference(name).input_shape == shape
        assert models.build(name)(torch.zeros(2, *shape)).shape == (2, 10)


def test_digits_wheel_with_a_wrong_member_is_deleted(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path))
    folder = tmp_path / "digits"
    folder.mkdir()
    fake = folder / "scikit_learn-1.5.2-cp311-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(digits.MEMBER, gzip.compress(b"0,1\n"))
    with pytest.raises(RuntimeError, match="SHA-256.*deleted"):
        digits._read_wheel()
    assert not fake.exists()
