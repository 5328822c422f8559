"""Image preprocessing shared by the image loaders: decode, resize, pad, normalise."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Per-channel statistics used for normalisation (RGB order).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalise(images: np.ndarray | Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` per channel.

    Args:
        images: uint8 array or tensor, ``(N, C, H, W)``; C equals ``len(mean)``.
        mean: per-channel mean of ``x / 255``.
        std: per-channel standard deviation of ``x / 255``.

    Returns:
        A float32 tensor of the same shape.

    Example:
        >>> normalise(np.full((1, 1, 2, 2), 255, np.uint8), (0.5,), (0.5,)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    x = torch.as_tensor(np.asarray(images))  # (N, C, H, W) uint8
    if x.ndim != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"normalise expects (N, C, H, W) images with C = {len(mean)} channels, "
            f"got shape {tuple(x.shape)}"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean_t) / std_t  # (N, C, H, W)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad ``(N, H, W)`` or ``(N, C, H, W)`` images evenly to ``size x size``."""
    height, width = images.shape[-2:]
    if height > size or width > size:
        raise ValueError(f"cannot pad {height}x{width} images to the smaller {size}x{size}")
    top, left = (size - height) // 2, (size - width) // 2
    spec = [(0, 0)] * (images.ndim - 2)
    spec += [(top, size - height - top), (left, size - width - left)]
    return np.pad(images, spec)


def resize_batch(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 images ``(N, C, H, W)`` to ``(N, C, height, width)`` (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)  # (N, C, H, W)
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()  # (N, C, height, width)


def repeat_channels(x: Tensor, channels: int = 3) -> Tensor:
    """``(N, 1, H, W)`` -> ``(N, channels, H, W)`` as a broadcast view (no copy)."""
    return x.expand(x.shape[0], channels, *x.shape[2:])


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Decode an image file to RGB uint8 ``(3, resolution, resolution)``.

    The shorter side is resized to ``resolution`` (bicubic), then the centre square is cut out:
    the usual evaluation transform of Flowers102 and Food-101.

    Args:
        path: a JPEG/PNG file.
        resolution: side of the output square.

    Returns:
        uint8 array ``(3, resolution, resolution)``.

    Example:
        >>> load_image("jpg/image_00001.jpg", 64).shape  # doctest: +SKIP
        (3, 64, 64)
    """
    from tinyprop.extras import require

    require("PIL", "bench", "convert the images yourself")  # decoding JPEG/PNG needs Pillow
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # an image past PIL's pixel limit (a small file that decodes to gigabytes) is an
            # error, not a warning: the decode would hold it all in memory
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _decoded(Image, path, resolution)
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(
            f"cannot decode image {path}: {error}; replace the file with a good copy"
        ) from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ValueError(
            f"image {path} is too large to decode ({error}); a dataset image of this size is "
            "not one the loaders expect: replace the file with a good copy"
        ) from error
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W)


def _decoded(Image, path: Path, resolution: int):
    """The image at ``path`` as RGB, resized (bicubic) so its shorter side is ``resolution``,
    centre-cropped to ``resolution`` x ``resolution``."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = resolution / min(width, height)
        new_width = max(resolution, round(width * scale))
        new_size = (new_width, max(resolution, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = (new_size[0] - resolution) // 2
        top = (new_size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return image


def load_images(paths: Sequence[Path], resolution: int, description: str = "") -> np.ndarray:
    """Decode many image files (with a progress bar) to uint8 ``(N, 3, resolution, resolution)``."""
    from tqdm import tqdm

    out = np.empty((len(paths), 3, resolution, resolution), dtype=np.uint8)
    progress = tqdm(paths, desc=description or "decoding", unit="img", disable=len(paths) < 2000)
    for index, path in enumerate(progress):
        out[index] = load_image(path, resolution)
    return out


def load_image_files(
    stem: str, paths: Sequence[Path], resolution: int, description: str = ""
) -> np.ndarray:
    """Decode image files once and cache the uint8 result (keyed by the paths, their sizes and
    modification times, and the resolution), so a second load is fast.

    Args:
        stem: cache file prefix, e.g. ``"flowers102-real"``.
        paths: the image files, in dataset order.
        resolution: output side (shorter side resized, centre crop).
        description: progress bar label.

    Returns:
        uint8 ``(N, 3, resolution, resolution)``.

    Example:
        >>> images = load_image_files("demo", [Path("a.jpg")], 64)  # doctest: +SKIP
    """
    from tinyprop.data.base import cached_arrays

    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed by the dataset are missing, e.g. {missing[0]}: "
            "unpack the complete official archive"
        )
    stats = [
        (str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths
    ]
    params = {"files": stats, "resolution": resolution, "version": 1}
    arrays = cached_arrays(
        stem, params, lambda: {"images": load_images(paths, resolution, description)}
    )
    return arrays["images"]
