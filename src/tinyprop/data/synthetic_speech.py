"""Synthetic speech for the 12-class Speech Commands task, spoken by espeak-ng (and flite).

The offline stand-in for Speech Commands: the ten keywords (and 25 other words for "unknown")
are spoken by the Debian text-to-speech programs ``espeak-ng`` (8 English accents x 46 voice
variants, random pitch and speed) and, when installed, ``flite`` (5 voices, random pitch and
duration). Each 1 s, 16 kHz clip gets a random time shift, gain, spectral tilt and background
noise (white, pink, brown, mains hum or babble-like) at 5-30 dB SNR; "silence" clips are noise
only. Train and test use disjoint voices (about 20% of the espeak-ng accent/variant pairs and the
flite voice ``awb`` are test-only), as the real dataset splits by speaker.

Default size: 200 clips per class for train and 50 per class for test (2,400 / 600 clips),
balanced over the 12 classes; about a minute to generate on 2 cores, then cached.

Example:
    >>> clips, labels = generate_waveforms("train", per_class=2, seed=0)  # doctest: +SKIP
    >>> clips.shape, labels.tolist()[:3]  # doctest: +SKIP
    ((24, 16000), [0, 0, 1])
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyprop.data.audio import fix_length, read_wav, resample

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # 1 s
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LABELS = (*KEYWORDS, "silence", "unknown")
SILENCE, UNKNOWN = LABELS.index("silence"), LABELS.index("unknown")
# The other 25 words of Speech Commands v0.02, spoken for the "unknown" class.
UNKNOWN_WORDS = (
    "backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward", "four",
    "happy", "house", "learn", "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree",
    "two", "visual", "wow", "zero",
)  # fmt: skip
ESPEAK_ACCENTS = (
    "en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)  # fmt: skip
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
    "klatt2", "klatt3", "klatt4", "Alex", "Alicia", "Andrea", "Andy", "Annie", "adam", "anika",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma",
    "grandpa", "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert",
    "shelby", "steph", "victor",
)  # fmt: skip
FLITE_VOICES = {"train": ("kal", "kal16", "rms", "slt"), "test": ("awb",)}
FLITE_SHARE = 0.2  # fraction of spoken clips made by flite when it is installed
NOISE_KINDS = ("white", "pink", "brown", "hum", "babble")
GENERATOR_VERSION = 1  # bump when the generated audio changes, to invalidate caches
INSTALL_HINT = (
    "install it with `scripts/install-system-deps.sh` (or `sudo apt-get install -y espeak-ng "
    "flite`)"
)


@dataclass(frozen=True)
class Utterance:
    """How one clip is spoken: engine, voice, pitch and speed."""

    word: str
    engine: str  # "espeak-ng" or "flite"
    voice: str  # "en-us+m3" or a flite voice name
    pitch: float  # espeak-ng: 0..99; flite: mean F0 in Hz
    speed: float  # espeak-ng: words per minute; flite: duration stretch


def _is_test_voice(voice: str) -> bool:
    """Deterministic voice split: about 1 in 5 espeak-ng voices is test-only."""
    return int(hashlib.sha256(voice.encode()).hexdigest(), 16) % 5 == 0


def espeak_voices(split: str) -> list[str]:
    """The espeak-ng ``accent+variant`` voices of a split (train and test are disjoint)."""
    voices = [f"{accent}+{variant}" for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS]
    return [voice for voice in voices if _is_test_voice(voice) == (split == "test")]


def engines_available() -> tuple[str, ...]:
    """The speech engines found on PATH; raises a clear error when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "the synthetic speech stand-in for speech_commands needs the Debian package "
            f"espeak-ng, which is not installed: {INSTALL_HINT}; or give data_dir= a real "
            "Speech Commands v0.02 folder"
        )
    return ("espeak-ng", "flite") if shutil.which("flite") else ("espeak-ng",)


def engine_versions(engines: tuple[str, ...]) -> str:
    """Version text of the engines, part of the cache key."""
    texts = []
    for engine in engines:
        flag = "--version"
        result = subprocess.run([engine, flag], capture_output=True, text=True, timeout=30)
        texts.append((result.stdout + result.stderr).strip().splitlines()[-1:])
    return repr(texts)


def speak(utterance: Utterance) -> np.ndarray:
    """Synthesise one word as float32 samples at 16 kHz, leading/trailing silence trimmed."""
    if utterance.engine == "espeak-ng":
        command = ["espeak-ng", "-v", utterance.voice, "-p", str(int(utterance.pitch)), "-s"]
        command += [str(int(utterance.speed)), "--stdout", utterance.word]
        result = subprocess.run(command, capture_output=True, timeout=60)
        if result.returncode != 0 or not result.stdout:
            raise RuntimeError(f"espeak-ng failed for {command}: {result.stderr.decode()[-300:]}")
        samples, rate = read_wav(result.stdout)
    else:
        with tempfile.TemporaryDirectory(prefix="tinyprop-flite-") as folder:
            path = Path(folder) / "word.wav"
            command = ["flite", "-voice", utterance.voice]
            command += ["--setf", f"int_f0_target_mean={utterance.pitch:.1f}"]
            command += ["--setf", f"duration_stretch={utterance.speed:.3f}"]
            command += ["-t", utterance.word, "-o", str(path)]
            result = subprocess.run(command, capture_output=True, timeout=60)
            if result.returncode != 0 or not path.is_file():
                raise RuntimeError(f"flite failed for {command}: {result.stderr.decode()[-300:]}")
            samples, rate = read_wav(path)
    samples = resample(samples, rate, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(samples) > 0.02 * (np.abs(samples).max() + 1e-9))
    if len(loud) == 0:
        return samples[:0]
    return samples[loud[0] : loud[-1] + 1]


def background_noise(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of one kind: white, pink (1/f), brown (1/f^2), mains hum, babble-like."""
    white = rng.standard_normal(length)
    if kind == "white":
        noise = white
    elif kind in ("pink", "brown", "babble"):
        spectrum = np.fft.rfft(white)
        frequency = np.maximum(np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE), 20.0)
        if kind == "pink":
            spectrum /= np.sqrt(frequency)
        elif kind == "brown":
            spectrum /= frequency
        else:  # speech-band noise with a slow syllable-rate envelope
            spectrum *= np.exp(-0.5 * (np.log(frequency / 500.0) / 0.8) ** 2)
        noise = np.fft.irfft(spectrum, n=length)
        if kind == "babble":
            time = np.arange(length) / SAMPLE_RATE
            rate = rng.uniform(3.0, 6.0)
            noise *= 1.0 + 0.8 * np.sin(2 * np.pi * rate * time + rng.uniform(0, 2 * np.pi))
    elif kind == "hum":
        time = np.arange(length) / SAMPLE_RATE
        mains = rng.choice([50.0, 60.0])
        noise = sum(
            np.sin(2 * np.pi * mains * h * time + rng.uniform(0, 2 * np.pi)) / h
            for h in range(1, 8)
        )
        noise = noise + 0.3 * white
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def _tilt(samples: np.ndarray, slope: float) -> np.ndarray:
    """Spectral tilt (a crude microphone/room colouring): gain (f / 1 kHz) ** slope."""
    spectrum = np.fft.rfft(samples)
    frequency = np.maximum(np.fft.rfftfreq(len(samples), 1.0 / SAMPLE_RATE), 50.0)
    return np.fft.irfft(spectrum * (frequency / 1000.0) ** slope, n=len(samples))


def make_clip(spoken: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Turn a spoken word (or None for silence) into a noisy, shifted 1 s clip."""
    kind = NOISE_KINDS[rng.integers(len(NOISE_KINDS))]
    noise = background_noise(kind, CLIP_SAMPLES, rng)
    if spoken is None:  # silence: background noise only, from nearly digital silence to loud
        return (noise * 10.0 ** rng.uniform(-4.0, -1.0)).astype(np.float32)
    word = spoken[:CLIP_SAMPLES]
    slack = CLIP_SAMPLES - len(word)
    offset = int(rng.integers(0, slack + 1))  # random time shift inside the second
    clip = fix_length(word, CLIP_SAMPLES, offset)
    clip = _tilt(clip, rng.uniform(-0.4, 0.4))
    clip *= 10.0 ** rng.uniform(-1.3, -0.1) / (np.abs(clip).max() + 1e-9)  # peak -26..-2 dBFS
    if rng.random() < 0.85:
        start, stop = max(offset, 0), max(offset, 0) + len(word)
        speech_rms = np.sqrt(np.mean(clip[start:stop] ** 2) + 1e-12)
        clip += noise * speech_rms * 10.0 ** (-rng.uniform(5.0, 30.0) / 20.0)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def plan_utterances(
    split: str, per_class: int, seed: int, engines: tuple[str, ...]
) -> tuple[list[Utterance | None], np.ndarray]:
    """Choose the word, engine, voice, pitch and speed of every clip (None for silence).

    Returns:
        ``(utterances, labels)``: one entry per clip, classes in order, ``per_class`` each.
    """
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 7])
    voices = espeak_voices(split)
    utterances: list[Utterance | None] = []
    labels = np.repeat(np.arange(len(LABELS)), per_class)
    for label in labels:
        if label == SILENCE:
            utterances.append(None)
            continue
        if label == UNKNOWN:
            word = UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))]
        else:
            word = LABELS[label]
        if "flite" in engines and rng.random() < FLITE_SHARE:
            flite_voices = FLITE_VOICES[split]
            voice = flite_voices[rng.integers(len(flite_voices))]
            utterances.append(
                Utterance(word, "flite", voice, rng.uniform(80.0, 220.0), rng.uniform(0.8, 1.4))
            )
        else:
            voice = voices[rng.integers(len(voices))]
            utterances.append(
                Utterance(word, "espeak-ng", voice, rng.uniform(15, 85), rng.uniform(120, 240))
            )
    return utterances, labels


def generate_waveforms(
    split: str, per_class: int, seed: int = 0, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the clips of one split.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint voices).
        per_class: clips per class (12 classes).
        seed: random seed; the same seed gives the same clips.
        workers: parallel synthesis processes.

    Returns:
        ``(clips, labels)``: ``(12 * per_class, 16000)`` float32 and ``(12 * per_class,)`` int64.

    Example:
        >>> clips, labels = generate_waveforms("test", per_class=1)  # doctest: +SKIP
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    engines = engines_available()
    utterances, labels = plan_utterances(split, per_class, seed, engines)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        spoken = list(pool.map(lambda u: None if u is None else speak(u), utterances))
    clips = np.empty((len(labels), CLIP_SAMPLES), np.float32)  # (N, 16000)
    for index, words in enumerate(spoken):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, 11, index])
        clips[index] = make_clip(words, rng)
    return clips, labels.astype(np.int64)
