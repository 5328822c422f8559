"""A labelled synthetic set shaped like UCI HAR: 9 inertial signals x 128 steps, 6 activities.

For timing and for runs that need UCI HAR's shape and size (7,352 train / 2,947 test windows) when
the real data is absent. Not real data: report it as ``"synthetic har-shaped"``.

Each window is 2.56 s at 50 Hz of a body-worn phone: ``body_acc`` (x, y, z, in g),
``body_gyro`` (x, y, z, rad/s) and ``total_acc`` = body + gravity, in UCI HAR's channel order.
Walking, upstairs and downstairs are periodic gaits (step rate, harmonic content and amplitude
differ, as do per-subject rates); sitting, standing and laying are near-static and differ mainly
in the direction of gravity (sitting and standing only slightly, as in the real data). Train and
test use disjoint simulated subjects (21 / 9, as UCI HAR's 30 volunteers).

Example:
    >>> x, y = generate("test", size=12, seed=0)
    >>> x.shape, y.shape
    ((12, 9, 128), (12,))
"""

from __future__ import annotations

import numpy as np

ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
SIZES = {"train": 7352, "test": 2947}
SAMPLE_RATE = 50.0
STEPS = 128
SUBJECTS = {"train": range(0, 21), "test": range(21, 30)}
# gait: (step-rate factor, vertical amplitude in g, harmonic decay, gyro amplitude in rad/s)
GAITS = {0: (1.0, 0.30, 0.55, 0.8), 1: (0.85, 0.25, 0.40, 0.6), 2: (1.12, 0.45, 0.75, 1.0)}
# gravity direction (x, y, z) of the static postures, before per-window jitter
POSTURES = {3: (0.85, 0.15, 0.50), 4: (0.98, -0.05, 0.20), 5: (0.10, 0.25, 0.96)}


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices from small Euler angles, ``(N, 3)`` -> ``(N, 3, 3)``."""
    a, b, c = angles[:, 0], angles[:, 1], angles[:, 2]
    one, zero = np.ones_like(a), np.zeros_like(a)
    rx = np.stack([one, zero, zero, zero, np.cos(a), -np.sin(a), zero, np.sin(a), np.cos(a)], 1)
    ry = np.stack([np.cos(b), zero, np.sin(b), zero, one, zero, -np.sin(b), zero, np.cos(b)], 1)
    rz = np.stack([np.cos(c), -np.sin(c), zero, np.sin(c), np.cos(c), zero, zero, zero, one], 1)
    return rx.reshape(-1, 3, 3) @ ry.reshape(-1, 3, 3) @ rz.reshape(-1, 3, 3)


def generate(split: str, size: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate one split.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint simulated subjects).
        size: number of windows (default UCI HAR's: 7,352 train, 2,947 test).
        seed: random seed; the same seed gives the same windows.

    Returns:
        ``(x, y)``: ``(size, 9, 128)`` float32 and ``(size,)`` int64 labels in ``[0, 6)``.

    Example:
        >>> generate("train", size=6)[0].dtype
        dtype('float32')
    """
    if split not in SIZES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    size = SIZES[split] if size is None else size
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 17])
    subjects = np.asarray(SUBJECTS[split])
    subject_rng = np.random.default_rng([seed, 19])  # subject traits are shared by both splits
    step_rate = subject_rng.normal(1.85, 0.12, 30)  # steps per second
    strength = subject_rng.uniform(0.8, 1.25, 30)
    mount = subject_rng.normal(0.0, 0.12, (30, 3))  # how the phone sits on the waist

    y = rng.integers(0, len(ACTIVITIES), size)  # (N,)
    subject = subjects[rng.integers(0, len(subjects), size)]  # (N,)
    time = np.arange(STEPS) / SAMPLE_RATE  # (T,)
    body = rng.normal(0.0, 0.01, (size, 3, STEPS))  # (N, 3, T) sensor noise
    gyro = rng.normal(0.0, 0.02, (size, 3, STEPS))  # (N, 3, T)
    gravity = np.zeros((size, 3))
    for label, (rate_factor, amplitude, decay, gyro_amplitude) in GAITS.items():
        rows = np.flatnonzero(y == label)
        if len(rows) == 0:
            continue
        rate = step_rate[subject[rows]] * rate_factor * rng.normal(1.0, 0.03, len(rows))
        scale = amplitude * strength[subject[rows]]
        phase = rng.uniform(0, 2 * np.pi, (len(rows), 1))
        angle = 2 * np.pi * rate[:, None] * time[None] + phase  # (n, T)
        vertical = sum(decay**h * np.cos(h * angle + 0.3 * h) for h in range(1, 5))
        body[rows, 0] += scale[:, None] * vertical
        body[rows, 1] += 0.35 * scale[:, None] * np.sin(angle / 2)  # sway at the stride rate
        body[rows, 2] += 0.45 * scale[:, None] * np.cos(angle + 0.8)
        gyro[rows, 0] += 0.3 * gyro_amplitude * np.sin(angle / 2 + 0.4)
        gyro[rows, 1] += gyro_amplitude * np.sin(angle / 2)[:, :] * strength[subject[rows], None]
        gyro[rows, 2] += 0.5 * gyro_amplitude * np.cos(angle)
        gravity[rows] = (1.0, 0.0, 0.0)
    for label, direction in POSTURES.items():
        rows = np.flatnonzero(y == label)
        gravity[rows] = direction
        drift = rng.normal(0.0, 0.015, (len(rows), 3, 1)) * np.sin(
            2 * np.pi * rng.uniform(0.05, 0.3, (len(rows), 1, 1)) * time
        )
        body[rows] += drift
    gravity /= np.linalg.norm(gravity, axis=1, keepdims=True)
    angles = mount[subject] + rng.normal(0.0, 0.08, (size, 3))
    gravity = np.einsum("nij,nj->ni", _rotation(angles), gravity)  # (N, 3)
    total = body + gravity[:, :, None]  # (N, 3, T)
    x = np.concatenate([body, gyro, total], axis=1).astype(np.float32)  # (N, 9, T)
    return x, y.astype(np.int64)
