"""Speech Commands (12-class keyword spotting): the real v0.02 folder, or synthetic speech.

Classes, in label order: yes, no, up, down, left, right, on, off, stop, go, silence, unknown.

Real format (``data_dir``, or ``$TINYPROP_DATA`` holding ``speech_commands_v0.02/``): the
extracted ``speech_commands_v0.02.tar.gz``: ``<word>/<speaker>_nohash_<n>.wav`` (1 s, 16 kHz,
16-bit PCM), ``validation_list.txt``, ``testing_list.txt`` and ``_background_noise_/*.wav``.
Standard split: test = the files in ``testing_list.txt``; train = all other files except those
in ``validation_list.txt``. As in TensorFlow's reference ``input_data.py``, the 25 other words
form "unknown", sampled (seeded) to ``unknown_percentage`` of the keyword count, and "silence"
clips (``silence_percentage`` of the keyword count) are 1 s crops of the background noise files
at a random volume in [0, 1]. No other augmentation.

Offline stand-in: :mod:`tinyprop.data.synthetic_speech` (espeak-ng / flite), 200 clips per class
for train and 50 for test by default, source ``"synthetic speech (espeak-ng + flite) as
speech_commands stand-in"`` (``(espeak-ng)`` alone when flite is not installed).

Front end (both sources): 49 frames x 10 MFCCs (DS-CNN / MLPerf Tiny KWS), ``input_shape`` ==
``(1, 49, 10)``; or ``features="log_mel"`` for 49 frames x 40 log mel energies, ``(1, 49, 40)``.

Example:
    >>> train = load("speech_commands", "train", per_class=20)  # doctest: +SKIP
    >>> train.source, train.num_classes, train.input_shape  # doctest: +SKIP
    ('synthetic speech (espeak-ng + flite) as speech_commands stand-in', 12, (1, 49, 10))
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tinyprop.data.audio import (
    KWS_MFCC,
    fix_length,
    log_mel_spectrogram,
    mfcc,
    read_clip,
    read_wav,
)
from tinyprop.data.base import ArrayDataset
from tinyprop.data.npz_cache import cached_arrays
from tinyprop.data.real_data import find_real_root
from tinyprop.data.synthetic_speech import (
    CLIP_SAMPLES,
    GENERATOR_VERSION,
    KEYWORDS,
    LABELS,
    SILENCE,
    UNKNOWN,
    engine_versions,
    engines_available,
    generate_waveforms,
)

SOURCE_REAL = "speech_commands"
SOURCE_SYNTHETIC = "synthetic speech ({engines}) as speech_commands stand-in"  # engines used
DEFAULT_PER_CLASS = {"train": 200, "test": 50}
FEATURES = ("mfcc", "log_mel")
BACKGROUND = "_background_noise_"
EXPECTED = (
    "the extracted Speech Commands v0.02 archive: <word>/*.wav folders, validation_list.txt, "
    "testing_list.txt and _background_noise_/"
)


def features_of(clips: np.ndarray, features: str, chunk: int = 512) -> np.ndarray:
    """The front end: ``(N, 16000)`` clips -> ``(N, 1, 49, 10)`` MFCCs or ``(N, 1, 49, 40)``."""
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; choose one of {FEATURES}")
    parts = []
    for start in range(0, len(clips), chunk):
        batch = clips[start : start + chunk]  # (b, 16000)
        if features == "mfcc":
            parts.append(mfcc(batch, **KWS_MFCC))  # (b, 49, 10)
        else:
            settings = {key: value for key, value in KWS_MFCC.items() if key != "n_mfcc"}
            parts.append(log_mel_spectrogram(batch, decibels=False, **settings))  # (b, 49, 40)
    return np.concatenate(parts)[:, None].astype(np.float32)  # (N, 1, frames, coefficients)


def _is_root(folder: Path) -> bool:
    return (folder / "testing_list.txt").is_file() or any(
        (folder / word).is_dir() for word in KEYWORDS
    )


def _read_list(root: Path, name: str) -> set[str]:
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the Speech Commands split needs it; re-extract "
            f"speech_commands_v0.02.tar.gz into {root}"
        )
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def real_index(
    root: Path, split: str, seed: int, silence_percentage: float, unknown_percentage: float
) -> tuple[list[str | None], np.ndarray]:
    """The relative WAV paths (None = a silence clip) and labels of one split of the real data."""
    validation, testing = (
        _read_list(root, "validation_list.txt"),
        _read_list(root, "testing_list.txt"),
    )
    known: list[tuple[str, int]] = []
    unknown: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != BACKGROUND):
        for wav in sorted(folder.glob("*.wav")):
            relative = f"{folder.name}/{wav.name}"
            in_split = (
                relative in testing
                if split == "test"
                else (relative not in testing and relative not in validation)
            )
            if not in_split:
                continue
            if folder.name in KEYWORDS:
                known.append((relative, KEYWORDS.index(folder.name)))
            else:
                unknown.append(relative)
    if not known:
        raise FileNotFoundError(
            f"no keyword WAV files of the {split} split found in {root}: expected {EXPECTED}"
        )
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    n_unknown = min(len(unknown), math.ceil(len(known) * unknown_percentage / 100.0))
    chosen = [unknown[i] for i in sorted(rng.permutation(len(unknown))[:n_unknown])]
    n_silence = math.ceil(len(known) * silence_percentage / 100.0)
    paths = [path for path, _ in known] + chosen + [None] * n_silence
    labels = [label for _, label in known] + [UNKNOWN] * len(chosen) + [SILENCE] * n_silence
    return paths, np.asarray(labels, np.int64)


def _background_clips(root: Path) -> list[np.ndarray]:
    folder = root / BACKGROUND
    files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"{folder} has no WAV files: the silence class is cut from them; re-extract "
            f"speech_commands_v0.02.tar.gz into {root}, or pass silence_percentage=0"
        )
    clips = [read_wav(path)[0] for path in files]
    return [clip for clip in clips if len(clip) >= CLIP_SAMPLES] or [
        fix_length(clips[0], CLIP_SAMPLES)
    ]


def read_real_clips(root: Path, paths: list[str | None], seed: int, split: str) -> np.ndarray:
    """Read (or, for silence, cut from background noise) the 1 s clips, ``(N, 16000)``."""
    clips = np.zeros((len(paths), CLIP_SAMPLES), np.float32)
    background = _background_clips(root) if any(path is None for path in paths) else []
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 3])
    for index, path in enumerate(paths):
        if path is None:
            noise = background[rng.integers(len(background))]
            start = int(rng.integers(0, len(noise) - CLIP_SAMPLES + 1))
            clips[index] = noise[start : start + CLIP_SAMPLES] * rng.uniform(0.0, 1.0)
        else:
            samples = read_clip(root / path, 16000)
            clips[index] = fix_length(samples, CLIP_SAMPLES)  # zero-pad short clips at the end
    return clips


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded order of the samples, cut to ``limit`` (so any prefix mixes the classes)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    order = np.random.default_rng([seed, 5]).permutation(n)
    return order if limit is None else order[:limit]


def load(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    features: str = "mfcc",
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    silence_percentage: float = 10.0,
    unknown_percentage: float = 10.0,
    workers: int = 2,
) -> ArrayDataset:
    """Load one split of Speech Commands (real folder) or its synthetic-speech stand-in.

    Args:
        name: ``"speech_commands"``.
        split: ``"train"`` or ``"test"``.
        data_dir: the real dataset's folder (or a parent of ``speech_commands_v0.02``);
            default ``$TINYPROP_DATA``; without it, synthetic speech is generated and cached.
        features: ``"mfcc"`` (1, 49, 10) or ``"log_mel"`` (1, 49, 40).
        per_class: synthetic only: clips per class (default 200 train, 50 test).
        limit: keep at most this many samples (a seeded random subset), for quick runs.
        seed: seed of the synthetic audio, of the unknown/silence sampling and of the subset.
        silence_percentage, unknown_percentage: real data only, as in TensorFlow's reference.
        workers: synthetic only: parallel speech synthesis processes.

    Returns:
        An :class:`ArrayDataset` with 12 classes and ``input_shape`` (1, 49, 10) for MFCCs.

    Example:
        >>> test = load("speech_commands", "test", per_class=5)  # doctest: +SKIP
        >>> len(test), test.input_shape  # doctest: +SKIP
        (60, (1, 49, 10))
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; choose one of {FEATURES}")
    root = find_real_root(
        name, data_dir, _is_root, ["speech_commands_v0.02", "speech_commands"], EXPECTED
    )
    if root is not None:
        if per_class is not None:
            raise ValueError("per_class is an option of the synthetic stand-in; use limit=")
        arrays = _load_real(root, split, features, limit, seed, silence_percentage,
                            unknown_percentage)  # fmt: skip
        source = SOURCE_REAL
    else:
        arrays = _load_synthetic(split, features, per_class, limit, seed, workers)
        source = SOURCE_SYNTHETIC.format(engines=" + ".join(engines_available()))
    return ArrayDataset(
        torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), source, len(LABELS)
    )


def _load_real(
    root: Path,
    split: str,
    features: str,
    limit: int | None,
    seed: int,
    silence_percentage: float,
    unknown_percentage: float,
) -> dict[str, np.ndarray]:
    paths, labels = real_index(root, split, seed, silence_percentage, unknown_percentage)
    keep = _subset(len(paths), limit, seed)
    paths, labels = [paths[i] for i in keep], labels[keep]
    parameters = dict(
        root=str(root.resolve()), split=split, features=features, seed=seed, limit=limit,
        silence=silence_percentage, unknown=unknown_percentage, n=len(paths),
        lists=[(root / f).stat().st_mtime for f in ("validation_list.txt", "testing_list.txt")],
    )  # fmt: skip

    def build() -> dict[str, np.ndarray]:
        clips = read_real_clips(root, paths, seed, split)  # (N, 16000)
        return {"x": features_of(clips, features), "y": labels}

    return cached_arrays("speech_commands", f"real-{split}", parameters, build)


def _load_synthetic(
    split: str,
    features: str,
    per_class: int | None,
    limit: int | None,
    seed: int,
    workers: int,
) -> dict[str, np.ndarray]:
    per_class = DEFAULT_PER_CLASS[split] if per_class is None else per_class
    if limit is not None:
        per_class = min(per_class, math.ceil(limit / len(LABELS)))
    engines = engines_available()
    parameters = dict(
        split=split, features=features, per_class=per_class, seed=seed, engines=engines,
        versions=engine_versions(engines), generator=GENERATOR_VERSION,
    )  # fmt: skip

    def build() -> dict[str, np.ndarray]:
        clips, labels = generate_waveforms(split, per_class, seed, workers)  # (N, 16000)
        return {"x": features_of(clips, features), "y": labels}

    arrays = cached_arrays("speech_commands", f"synthetic-{split}", parameters, build)
    keep = _subset(len(arrays["y"]), limit, seed)
    return {"x": arrays["x"][keep], "y": arrays["y"][keep]}
