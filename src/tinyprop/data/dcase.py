"""DCASE2020 Task 2 (anomalous sound detection): the real dev_data tree, or synthetic machines.

Real format (``data_dir``, or ``$TINYPROP_DATA`` holding ``dev_data/``): the extracted
development data, ``dev_data/<machine_type>/train/normal_id_XX_NNNNNNNN.wav`` (normal only) and
``dev_data/<machine_type>/test/{normal,anomaly}_id_XX_NNNNNNNN.wav`` (16 kHz, 10 s). Machine
types: ToyCar, ToyConveyor, fan, pump, slider, valve; choose one with ``machine_type``.
Source ``"dcase2020 <machine_type>"``.

Offline stand-in: :mod:`tinyprop.data.synthetic_machine` (types fan, pump, slider, valve), 2 s
clips, 800 normal train clips and 200 normal + 200 anomalous test clips by default; source
``"synthetic machine sounds as dcase2020 stand-in"``.

One sample = one clip (a fixed-size vector, so that the test metric is per clip): the DCASE
baseline's log-mel (64 Slaney mel bands, 1024-point frames every 512 samples, dB), cut into
``segments`` (default 10) equal time segments and averaged within each, flattened segment-major:
``input_shape == (segments * 64,) == (640,)``. ``y`` is 0 for normal and 1 for anomalous clips
(train holds only normal clips), ``num_classes == 2``, and ``machine_ids`` (a LongTensor) gives
each clip's machine ID. The task is unsupervised: train an autoencoder on the normal train clips
and score each test clip by its reconstruction error; the metric is the ROC AUC of that score
against ``y`` (DCASE also reports pAUC at FPR <= 0.1, and averages per machine ID).

Example:
    >>> test = load("dcase2020", "test", test_normal=10, test_anomalous=10)  # doctest: +SKIP
    >>> test.input_shape, test.y.tolist()[-1], test.source  # doctest: +SKIP
    ((640,), 1, 'synthetic machine sounds as dcase2020 stand-in')
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from tinyprop.data import synthetic_machine
from tinyprop.data.audio import DCASE_LOG_MEL, log_mel_spectrogram, read_clip
from tinyprop.data.base import ArrayDataset
from tinyprop.data.npz_cache import cached_arrays
from tinyprop.data.real_data import find_real_root

SOURCE_SYNTHETIC = "synthetic machine sounds as dcase2020 stand-in"
REAL_MACHINE_TYPES = ("ToyCar", "ToyConveyor", "fan", "pump", "slider", "valve")
FILE_NAME = re.compile(r"^(normal|anomaly)_id_(\d{1,9})_\d+\.wav$")  # IDs are 2 digits
GENERATOR_VERSION = 1
EXPECTED = (
    "the extracted DCASE2020 Task 2 development data: dev_data/<machine_type>/train/"
    "normal_id_XX_*.wav and dev_data/<machine_type>/test/{normal,anomaly}_id_XX_*.wav"
)


def clip_features(clips: np.ndarray, segments: int = 10, chunk: int = 64) -> np.ndarray:
    """Per-clip vectors: DCASE log-mel averaged over ``segments`` equal time segments.

    Args:
        clips: ``(N, T)`` float signals at 16 kHz, all of one length.
        segments: number of time segments (at most the number of frames).
        chunk: clips per batch (bounds memory).

    Returns:
        ``(N, segments * 64)`` float32, segment-major.

    Example:
        >>> clip_features(np.zeros((2, 16000), np.float32)).shape
        (2, 640)
    """
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    out = []
    for start in range(0, len(clips), chunk):
        log_mel = log_mel_spectrogram(clips[start : start + chunk], **DCASE_LOG_MEL)  # (b, T, 64)
        if log_mel.shape[1] < segments:
            raise ValueError(
                f"clips give {log_mel.shape[1]} frames, fewer than segments={segments}; use "
                "longer clips or fewer segments"
            )
        parts = np.array_split(np.arange(log_mel.shape[1]), segments)
        pooled = np.stack([log_mel[:, part].mean(axis=1) for part in parts], axis=1)  # (b, S, 64)
        out.append(pooled.reshape(len(pooled), -1))
    return np.concatenate(out).astype(np.float32)  # (N, S * 64)


def _is_root(folder: Path) -> bool:
    return any((folder / kind / "train").is_dir() or (folder / kind / "test").is_dir()
               for kind in REAL_MACHINE_TYPES)  # fmt: skip


def real_files(root: Path, machine_type: str, split: str) -> list[Path]:
    """The WAV files of one machine type and split, sorted; clear errors when missing."""
    folder = root / machine_type / split
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise FileNotFoundError(
            f"{folder} does not exist: machine types present in {root} are {present}; choose "
            f"one with machine_type=, or extract dev_data_{machine_type}.zip into {root.parent}"
        )
    files = sorted(folder.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no WAV files; expected {EXPECTED}")
    return files


def read_real(root: Path, machine_type: str, split: str, segments: int) -> dict[str, np.ndarray]:
    """Read one machine type's split: per-clip features, 0/1 anomaly labels and machine IDs."""
    files = real_files(root, machine_type, split)
    labels, ids, features = [], [], []
    for path in files:
        match = FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(
                f"{path.name} is not a DCASE2020 Task 2 file name (normal|anomaly)_id_XX_N.wav; "
                f"remove it from {path.parent}"
            )
        samples = read_clip(path, 16000)
        labels.append(int(match.group(1) == "anomaly"))
        ids.append(int(match.group(2)))
        try:
            features.append(clip_features(samples[None], segments))  # (1, segments * 64)
        except ValueError as error:  # too short for the segments
            raise ValueError(f"{path}: {error}") from error
    return {
        "x": np.concatenate(features),
        "y": np.asarray(labels, np.int64),
        "ids": np.asarray(ids, np.int64),
    }


def load(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    machine_type: str = "fan",
    segments: int = 10,
    train_size: int = 800,
    test_normal: int = 200,
    test_anomalous: int = 200,
    seconds: float = 2.0,
    severity: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load one split of DCASE2020 Task 2 (real dev_data) or the synthetic machine stand-in.

    Args:
        name: ``"dcase2020"``.
        split: ``"train"`` (normal clips only) or ``"test"`` (normal and anomalous).
        data_dir: the ``dev_data`` folder (or its parent); default ``$TINYPROP_DATA``.
        machine_type: real: ToyCar, ToyConveyor, fan, pump, slider or valve; synthetic: fan,
            pump, slider or valve.
        segments: time segments per clip; ``input_shape == (segments * 64,)``.
        train_size, test_normal, test_anomalous: synthetic only: clip counts.
        seconds: synthetic only: clip length.
        severity: synthetic only: fault strength (1 = default, smaller is harder).
        limit: keep at most this many clips (a seeded random subset).
        seed: seed of the synthetic sounds and of the subset.

    Returns:
        An :class:`ArrayDataset` (``num_classes == 2``; y = 1 for anomalous) with extra
        attributes ``machine_ids`` (LongTensor) and ``machine_type``.

    Example:
        >>> load("dcase2020", "train", train_size=8).input_shape  # doctest: +SKIP
        (640,)
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = find_real_root(name, data_dir, _is_root, ["dev_data"], EXPECTED)
    if root is not None:
        if machine_type not in REAL_MACHINE_TYPES:
            raise ValueError(f"unknown machine type {machine_type!r}; choose one of "
                             f"{REAL_MACHINE_TYPES}")  # fmt: skip
        files = real_files(root, machine_type, split)
        parameters = dict(
            root=str(root.resolve()), machine_type=machine_type, split=split, segments=segments,
            files=len(files), stamp=max(path.stat().st_mtime for path in files), format=1,
        )  # fmt: skip
        arrays = cached_arrays(
            "dcase2020", f"real-{machine_type}-{split}", parameters,
            lambda: read_real(root, machine_type, split, segments),
        )  # fmt: skip
        source = f"dcase2020 {machine_type}"
    else:
        if machine_type not in synthetic_machine.MACHINE_TYPES:
            raise ValueError(
                f"the synthetic stand-in has machine types {synthetic_machine.MACHINE_TYPES}, "
                f"not {machine_type!r}; give data_dir= the real dev_data for the others"
            )
        normal, anomalous = (train_size, 0) if split == "train" else (test_normal, test_anomalous)
        parameters = dict(
            machine_type=machine_type, split=split, segments=segments, normal=normal,
            anomalous=anomalous, seconds=seconds, severity=severity, seed=seed,
            generator=GENERATOR_VERSION,
        )  # fmt: skip

        def build() -> dict[str, np.ndarray]:
            clips, labels, ids = synthetic_machine.generate(
                machine_type, normal, anomalous, seconds, seed, severity,
                split_tag=0 if split == "train" else 1,
            )  # fmt: skip
            return {"x": clip_features(clips, segments), "y": labels, "ids": ids}

        arrays = cached_arrays("dcase2020", f"synthetic-{machine_type}-{split}", parameters, build)
        source = SOURCE_SYNTHETIC
    x, y, ids = arrays["x"], arrays["y"], arrays["ids"]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        keep = np.random.default_rng([seed, 5]).permutation(len(y))[:limit]
        x, y, ids = x[keep], y[keep], ids[keep]
    dataset = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), source, 2)
    dataset.machine_ids = torch.from_numpy(ids)
    dataset.machine_type = machine_type
    return dataset
