"""Procedural colour-image classification sets: the offline stand-ins for Flowers102 and Food101.

Each class has a prototype drawn once from the style's seed: a palette (background, two or three
object colours), a shape (petal count and form for flowers; an irregular blob on a plate for
food) and a texture (veins and a gradient for flowers; dots, stripes, checks or a gradient for
food). Every sample renders its class prototype with its own position, scale, rotation, colour
jitter, brightness, background clutter and pixel noise, so the task is learnable (the shape,
palette and texture identify the class) but not trivial (classes share hues and shapes, and the
variation blurs a pixel-wise class mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK = 256  # samples rendered at once


@dataclass(frozen=True)
class SyntheticStyle:
    """How a synthetic image set is made.

    Args:
        kind: ``"flowers"`` or ``"food"`` (which renderer draws the object).
        num_classes: number of classes.
        prototype_seed: seed of the class prototypes (fixed per style: it defines the task).
        per_class: default number of samples per class, per split.
        mean: per-channel mean of ``x / 255`` (measured on the default train split at 64x64).
        std: per-channel standard deviation of ``x / 255`` (likewise).
    """

    kind: str
    num_classes: int
    prototype_seed: int
    per_class: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


FLOWERS = SyntheticStyle(
    "flowers",
    102,
    prototype_seed=102,
    per_class={"train": 40, "test": 10},
    mean=(0.2619, 0.3539, 0.2314),
    std=(0.1890, 0.1840, 0.1893),
)
FOOD = SyntheticStyle(
    "food",
    101,
    prototype_seed=101,
    per_class={"train": 30, "test": 10},
    mean=(0.6317, 0.6128, 0.5997),
    std=(0.2421, 0.2627, 0.2747),
)


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns shape ``hue.shape + (3,)``."""
    channel = np.arange(3)  # r, g, b offsets on the hue circle
    k = (np.asarray(hue)[..., None] * 6.0 + np.array([5.0, 3.0, 1.0])[channel]) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] * (1.0 - saturation[..., None] * ramp)


def _class_prototypes(style: SyntheticStyle) -> dict[str, np.ndarray]:
    """Per-class parameters, each an array with the class as first axis."""
    rng = np.random.default_rng([style.prototype_seed, 7])
    c = style.num_classes

    def colours(hue, saturation, value):
        return hsv_to_rgb(hue, saturation, value).astype(np.float32)  # (C, 3)

    proto = {
        # palette: hues are drawn from a small set so that classes share colours
        "background": colours(
            rng.uniform(0.15, 0.45, c) if style.kind == "flowers" else rng.uniform(0.0, 0.15, c),
            rng.uniform(0.3, 0.8, c),
            rng.uniform(0.15, 0.5, c),
        ),
        "colour_a": colours(
            rng.integers(0, 12, c) / 12.0 + rng.normal(0, 0.01, c),
            rng.uniform(0.4, 1.0, c),
            rng.uniform(0.55, 1.0, c),
        ),
        "colour_b": colours(
            rng.integers(0, 12, c) / 12.0, rng.uniform(0.3, 1.0, c), rng.uniform(0.3, 1.0, c)
        ),
        "colour_c": colours(
            rng.uniform(0, 1, c), rng.uniform(0.0, 0.3, c), rng.uniform(0.7, 1.0, c)
        ),
        "radius": rng.uniform(0.45, 0.75, c),
        "texture_frequency": rng.uniform(4.0, 14.0, c),
        "texture_amplitude": rng.uniform(0.2, 0.8, c),
    }
    if style.kind == "flowers":
        proto["petals"] = rng.integers(3, 11, c).astype(np.float32)
        proto["petal_depth"] = rng.uniform(0.15, 0.8, c)  # 0: round disk, 1: separate petals
        proto["petal_sharpness"] = rng.uniform(0.5, 3.0, c)
        proto["centre_radius"] = rng.uniform(0.08, 0.35, c)
    else:
        proto["harmonics"] = rng.uniform(0.0, 0.18, (c, 3)) * rng.integers(0, 2, (c, 3))
        proto["phases"] = rng.uniform(0, 2 * np.pi, (c, 3))
        proto["texture_kind"] = rng.integers(0, 4, c)  # dots, stripes, checks, gradient
        proto["plate_value"] = rng.uniform(0.6, 1.0, c)
        proto["garnish"] = rng.integers(0, 4, c)  # number of small garnish disks
    return proto


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _render_chunk(
    style: SyntheticStyle,
    proto: dict[str, np.ndarray],
    labels: np.ndarray,
    resolution: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render samples of the given labels: float32 ``(B, 3, R, R)`` in [0, 1]."""
    b = labels.shape[0]
    axis = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
    grid_y, grid_x = np.meshgrid(axis, axis, indexing="ij")  # (R, R) each
    col = lambda v: v.astype(np.float32).reshape(b, 1, 1)  # noqa: E731  (B,) -> (B, 1, 1)
    pick = {key: value[labels] for key, value in proto.items()}

    def jitter(colour: np.ndarray) -> np.ndarray:  # (B, 3) -> (B, 3, 1, 1)
        moved = colour + rng.normal(0.0, 0.07, colour.shape)
        return np.clip(moved, 0, 1).astype(np.float32)[:, :, None, None]

    # per-sample pose
    centre_x, centre_y = col(rng.uniform(-0.25, 0.25, b)), col(rng.uniform(-0.25, 0.25, b))
    scale = col(rng.uniform(0.7, 1.2, b))
    rotation = col(rng.uniform(0, 2 * np.pi, b))
    dx, dy = (grid_x - centre_x) / scale, (grid_y - centre_y) / scale  # (B, R, R)
    radius = np.sqrt(dx**2 + dy**2)  # (B, R, R)
    angle = np.arctan2(dy, dx) + rotation  # (B, R, R)
    rx = dx * np.cos(rotation) + dy * np.sin(rotation)  # (B, R, R) rotated frame
    ry = -dx * np.sin(rotation) + dy * np.cos(rotation)
    edge = 2.0 / resolution

    # background: class colour plus low-frequency clutter
    image = np.broadcast_to(jitter(pick["background"]), (b, 3, resolution, resolution)).copy()
    for _ in range(3):
        frequency = rng.uniform(1.0, 4.0, (b, 2)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
        wave = np.sin(
            frequency[:, 0, None, None] * grid_x + frequency[:, 1, None, None] * grid_y + phase
        )  # (B, R, R)
        image += 0.06 * wave[:, None] * rng.normal(0, 1, (b, 3, 1, 1)).astype(np.float32)

    frequency = col(pick["texture_frequency"])
    amplitude = col(pick["texture_amplitude"])
    object_radius = col(pick["radius"])
    colour_a, colour_b, colour_c = (jitter(pick[k]) for k in ("colour_a", "colour_b", "colour_c"))
    if style.kind == "flowers":
        petals = col(pick["petals"])
        depth, sharpness = col(pick["petal_depth"]), col(pick["petal_sharpness"])
        outline = object_radius * (
            1 - depth + depth * np.abs(np.cos(petals * angle / 2)) ** sharpness
        )  # (B, R, R) petal radius by direction
        petal_mask = _sigmoid((outline - radius) / edge)[:, None]  # (B, 1, R, R)
        veins = 0.5 + 0.5 * np.cos(frequency * 2 * angle)  # (B, R, R)
        gradient = np.clip(radius / np.maximum(outline, 1e-3), 0, 1)  # 0 centre .. 1 tip
        mix = (amplitude * (0.6 * gradient + 0.4 * veins))[:, None]  # (B, 1, R, R)
        petal = colour_a * (1 - mix) + colour_b * mix  # (B, 3, R, R)
        image = image * (1 - petal_mask) + petal * petal_mask
        centre_mask = _sigmoid((col(pick["centre_radius"]) - radius) / edge)[:, None]
        seeds = 0.5 + 0.5 * np.sin(3 * frequency * rx) * np.sin(3 * frequency * ry)
        centre = colour_c * 0.6 + 0.4 * colour_b * seeds[:, None]  # (B, 3, R, R)
        image = image * (1 - centre_mask) + centre * centre_mask
    else:
        plate_mask = _sigmoid((0.95 - radius * 0.8) / edge)[:, None]  # (B, 1, R, R)
        plate = (col(pick["plate_value"]) * np.ones_like(radius))[:, None] * np.ones(
            (1, 3, 1, 1), np.float32
        )
        image = image * (1 - plate_mask) + plate * plate_mask
        harmonics, phases = pick["harmonics"], pick["phases"]
        outline = np.ones_like(radius)
        for k in range(3):
            outline = outline + col(harmonics[:, k]) * np.cos((k + 2) * angle + col(phases[:, k]))
        outline = object_radius * outline  # (B, R, R)
        food_mask = _sigmoid((outline - radius) / edge)[:, None]  # (B, 1, R, R)
        kind = col(pick["texture_kind"])
        dots = (np.sin(frequency * rx) * np.sin(frequency * ry) > 0.5).astype(np.float32)
        stripes = 0.5 + 0.5 * np.sin(frequency * rx)
        checks = (np.sin(frequency * rx) * np.sin(frequency * ry) > 0).astype(np.float32)
        gradient = np.clip(radius / np.maximum(outline, 1e-3), 0, 1)
        texture = np.select([kind == 0, kind == 1, kind == 2], [dots, stripes, checks], gradient)
        mix = (amplitude * texture)[:, None]  # (B, 1, R, R)
        food = colour_a * (1 - mix) + colour_b * mix  # (B, 3, R, R)
        image = image * (1 - food_mask) + food * food_mask
        for g in range(3):  # garnish: up to 3 small disks of colour c on the food
            present = col((pick["garnish"] > g).astype(np.float32))
            gx, gy = col(rng.uniform(-0.4, 0.4, b)), col(rng.uniform(-0.4, 0.4, b))
            spot = _sigmoid((0.12 - np.sqrt((rx - gx) ** 2 + (ry - gy) ** 2)) / edge)
            spot = (spot * present)[:, None]  # (B, 1, R, R)
            image = image * (1 - spot) + colour_c * spot

    brightness = rng.uniform(0.75, 1.25, (b, 1, 1, 1)).astype(np.float32)
    image = image * brightness + rng.normal(0, 0.06, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)  # (B, 3, R, R)


def generate(
    style: SyntheticStyle, split: str, per_class: int, resolution: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render one split of a synthetic set.

    Args:
        style: :data:`FLOWERS` or :data:`FOOD`.
        split: ``"train"`` or ``"test"`` (different sample streams of the same classes).
        per_class: samples per class.
        resolution: image side in pixels.
        seed: sample seed; the same arguments give identical arrays.

    Returns:
        Images ``(num_classes * per_class, 3, resolution, resolution)`` uint8 in shuffled order,
        labels ``(N,)`` int64.

    Example:
        >>> images, labels = generate(FLOWERS, "test", per_class=1, resolution=32)
        >>> images.shape, labels.max().item()
        ((102, 3, 32, 32), 101)
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if per_class < 1 or resolution < 8:
        raise ValueError(f"need per_class >= 1 and resolution >= 8, got {per_class}, {resolution}")
    proto = _class_prototypes(style)
    rng = np.random.default_rng([style.prototype_seed, seed, 0 if split == "train" else 1])
    labels = rng.permutation(np.repeat(np.arange(style.num_classes), per_class))  # (N,)
    images = np.empty((labels.shape[0], 3, resolution, resolution), dtype=np.uint8)
    for start in range(0, labels.shape[0], _CHUNK):
        chunk = _render_chunk(style, proto, labels[start : start + _CHUNK], resolution, rng)
        images[start : start + _CHUNK] = np.round(chunk * 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def synthetic_dataset(
    style: SyntheticStyle,
    split: str,
    source: str,
    resolution: int = 64,
    per_class: int | None = None,
    seed: int = 0,
    limit: int | None = None,
):
    """A synthetic split as a normalised :class:`~tinyprop.data.base.ArrayDataset`, cached.

    Args:
        style: :data:`FLOWERS` or :data:`FOOD`.
        split: ``"train"`` or ``"test"``.
        source: the ``source`` label, e.g. ``"synthetic flowers102 stand-in"``.
        resolution: image side in pixels.
        per_class: samples per class (default: ``style.per_class[split]``).
        seed: sample seed.
        limit: keep the first ``limit`` samples (classes are shuffled, so a prefix is mixed).

    Returns:
        float32 ``(N, 3, resolution, resolution)`` normalised with the style's mean/std.

    Example:
        >>> test = synthetic_dataset(FOOD, "test", "synthetic food101 stand-in", 32, per_class=1)
        >>> len(test), test.num_classes
        (101, 101)
    """
    from tinyprop.data.base import ArrayDataset, cached_arrays
    from tinyprop.data.images import normalise

    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    per_class = style.per_class[split] if per_class is None else int(per_class)
    params = {
        "style": style.kind,
        "split": split,
        "per_class": per_class,
        "resolution": int(resolution),
        "seed": int(seed),
        "version": 1,
    }

    def build() -> dict[str, np.ndarray]:
        images, labels = generate(style, split, per_class, int(resolution), int(seed))
        return {"images": images, "labels": labels}

    arrays = cached_arrays(f"{style.kind}-synthetic", params, build)
    images, labels = arrays["images"][:limit], arrays["labels"][:limit]
    x = normalise(images, style.mean, style.std)  # (N, 3, R, R)
    return ArrayDataset(x, labels, source=source, num_classes=style.num_classes)
