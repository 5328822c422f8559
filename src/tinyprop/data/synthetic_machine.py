"""Synthetic machine sounds, normal and anomalous: the offline stand-in for DCASE2020 Task 2.

Four machine types, each with four machine IDs (00, 02, 04, 06, as the real fan/pump/slider/
valve development data) whose base sound is fixed by the type and ID:

- ``fan``: blade-pass tone (blades x rotation rate) and its harmonics, shaft harmonics, a little
  modulation at the rotation rate, and low-passed airflow noise;
- ``pump``: a rich motor hum (90-150 Hz and up to 16 harmonics), pulsating at a few Hz, with
  band-passed fluid noise;
- ``slider``: back-and-forth travel (period 0.8-1.6 s) of a motor whine and friction noise, with
  soft end stops;
- ``valve``: a fixed rhythm of resonant clicks over low noise.

Every normal clip varies slightly (speed +-1.5%, harmonic levels +-20%, noise level, phases) and
has factory background noise at 6-20 dB below the machine. An anomalous clip has one of four
faults, at a random strength scaled by ``severity``: ``harmonics`` (one harmonic boosted, or a
new bearing whine at 1-6 kHz), ``clicks`` (rattle: random impulses), ``modulation`` (a strong
new amplitude and frequency wobble) or ``speed`` (rotation speed or rhythm off by 6-15%).
Training clips are all normal, as in DCASE.

Example:
    >>> clips, anomalous, ids = generate("fan", normal=2, anomalous=2, seconds=0.5)
    >>> clips.shape, anomalous.tolist(), ids.tolist()
    ((4, 8000), [0, 0, 1, 1], [0, 2, 0, 2])
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
MACHINE_TYPES = ("fan", "pump", "slider", "valve")
MACHINE_IDS = (0, 2, 4, 6)
FAULTS = ("harmonics", "clicks", "modulation", "speed")


def _coloured_noise(length: int, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Unit-RMS noise band-limited to [low, high] Hz with soft edges."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequency = np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE)
    gain = 1.0 / (1.0 + (low / np.maximum(frequency, 1.0)) ** 2) / (1.0 + (frequency / high) ** 2)
    noise = np.fft.irfft(spectrum * gain, n=length)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _identity(machine_type: str, machine_id: int) -> dict:
    """The fixed base parameters of one machine (independent of the seed)."""
    rng = np.random.default_rng([MACHINE_TYPES.index(machine_type), machine_id, 23])
    return dict(
        rate=rng.uniform(15.0, 25.0),  # fan rotation (Hz)
        blades=int(rng.choice([5, 7, 9])),
        hum=rng.uniform(90.0, 150.0),  # pump / slider motor fundamental (Hz)
        harmonics=rng.uniform(0.3, 1.0, 16) / np.arange(1, 17) ** rng.uniform(0.5, 1.2),
        pulse=rng.uniform(2.0, 6.0),  # pump pulsation (Hz)
        period=rng.uniform(0.8, 1.6),  # slider travel period (s)
        rhythm=np.sort(rng.uniform(0.0, 1.0, int(rng.integers(2, 5)))),  # valve click times
        cycle=rng.uniform(0.5, 1.0),  # valve cycle (s)
        resonance=rng.uniform(1500.0, 4000.0),  # valve click resonance (Hz)
        noise_band=(rng.uniform(100.0, 500.0), rng.uniform(1500.0, 5000.0)),
    )


def _tones(
    time: np.ndarray, fundamental: np.ndarray | float, levels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sum of harmonics ``h * fundamental`` (fundamental may vary over time) with random phases."""
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(fundamental, time.shape)) / SAMPLE_RATE
    out = np.zeros_like(time)
    for h, level in enumerate(levels, start=1):
        if h * np.max(fundamental) < SAMPLE_RATE / 2 - 200:
            out += level * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return out


def _clicks(length: int, times: np.ndarray, resonance: float, decay: float) -> np.ndarray:
    """Decaying resonant clicks at the given sample positions."""
    out = np.zeros(length)
    n = int(0.03 * SAMPLE_RATE)
    shape = np.exp(-np.arange(n) / (decay * SAMPLE_RATE)) * np.sin(
        2 * np.pi * resonance * np.arange(n) / SAMPLE_RATE
    )
    for start in times.astype(int):
        stop = min(length, start + n)
        if 0 <= start < length:
            out[start:stop] += shape[: stop - start]
    return out


def machine_clip(
    machine_type: str,
    machine_id: int,
    seconds: float,
    rng: np.random.Generator,
    fault: str | None = None,
    severity: float = 1.0,
) -> np.ndarray:
    """One clip of a machine, normal (``fault=None``) or with one of :data:`FAULTS`.

    Args:
        machine_type: one of :data:`MACHINE_TYPES`.
        machine_id: one of :data:`MACHINE_IDS`.
        seconds: clip length.
        rng: random generator (the clip's variation).
        fault: None for a normal clip, else one of :data:`FAULTS`.
        severity: scales the strength of the fault (1 = default; smaller is harder to detect).

    Returns:
        ``(round(seconds * 16000),)`` float32 samples, peak about 0.5.

    Example:
        >>> machine_clip("pump", 0, 0.25, np.random.default_rng(0)).shape
        (4000,)
    """
    if machine_type not in MACHINE_TYPES:
        raise ValueError(f"unknown machine type {machine_type!r}; choose one of {MACHINE_TYPES}")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS} or None")
    base = _identity(machine_type, machine_id)
    length = int(round(seconds * SAMPLE_RATE))
    time = np.arange(length) / SAMPLE_RATE
    levels = base["harmonics"] * rng.uniform(0.8, 1.2, 16)
    speed = rng.normal(1.0, 0.005) * np.clip(rng.normal(1.0, 0.01), 0.985, 1.015)
    strength = severity * rng.uniform(0.6, 1.4)
    if fault == "speed":
        speed *= 1.0 + rng.choice([-1.0, 1.0]) * min(0.5, 0.06 + 0.09 * rng.random() * severity)
    low, high = base["noise_band"]
    if machine_type == "fan":
        rotation = base["rate"] * speed
        sound = _tones(time, rotation * base["blades"], levels[:6], rng)
        sound += 0.3 * _tones(time, rotation, levels[:4], rng)
        sound *= 1.0 + 0.1 * np.sin(2 * np.pi * rotation * time)
        sound += rng.uniform(0.6, 0.9) * _coloured_noise(length, rng, low, high)
        fundamental = rotation * base["blades"]
    elif machine_type == "pump":
        fundamental = base["hum"] * speed
        sound = _tones(time, fundamental, levels, rng)
        sound *= 1.0 + 0.3 * np.sin(2 * np.pi * base["pulse"] * speed * time)
        sound += rng.uniform(0.4, 0.7) * _coloured_noise(length, rng, 500.0, 3000.0)
    elif machine_type == "slider":
        fundamental = base["hum"] * 4 * speed
        travel = np.abs(np.sin(np.pi * time / (base["period"] / speed) + rng.uniform(0, np.pi)))
        sound = travel * _tones(time, fundamental, levels[:5], rng)
        sound += travel * rng.uniform(0.5, 0.8) * _coloured_noise(length, rng, 1000.0, 5000.0)
        ends = np.flatnonzero(np.diff(np.sign(np.diff(travel))) > 0)  # travel minima
        sound += 0.5 * _clicks(length, ends.astype(float), 800.0, 0.004)
    else:  # valve
        fundamental = base["resonance"]
        cycle = base["cycle"] / speed
        offset = rng.uniform(0, cycle)
        starts = [
            (k * cycle + offset + beat * cycle * 0.8) * SAMPLE_RATE
            for k in range(-1, int(seconds / cycle) + 2)
            for beat in base["rhythm"]
        ]
        sound = 1.5 * _clicks(length, np.asarray(starts), fundamental * speed, 0.003)
        sound += 0.05 * _coloured_noise(length, rng, low, high)
    if fault == "harmonics":
        if rng.random() < 0.5:  # one harmonic of the machine grows
            h = int(rng.integers(2, 6))
            sound += strength * 0.5 * np.sin(2 * np.pi * h * fundamental * time)
        else:  # a bearing whine appears
            whine = rng.uniform(1000.0, 6000.0)
            sound += strength * 0.3 * np.sin(2 * np.pi * whine * time + rng.uniform(0, 6.3))
    elif fault == "clicks":
        count = int(rng.integers(3, 20))
        times = rng.uniform(0, length, count)
        sound += strength * 2.0 * _clicks(length, times, rng.uniform(500.0, 6000.0), 0.002)
    elif fault == "modulation":
        rate = rng.uniform(1.0, 10.0)
        sound *= 1.0 + min(0.95, 0.6 * strength) * np.sin(2 * np.pi * rate * time)
    sound /= np.sqrt(np.mean(sound**2)) + 1e-12
    factory = _coloured_noise(length, rng, 20.0, 2000.0) * 10.0 ** (-rng.uniform(6.0, 20.0) / 20)
    clip = sound + factory
    return (0.5 * clip / (np.abs(clip).max() + 1e-12)).astype(np.float32)


def generate(
    machine_type: str = "fan",
    normal: int = 800,
    anomalous: int = 0,
    seconds: float = 2.0,
    seed: int = 0,
    severity: float = 1.0,
    split_tag: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate normal then anomalous clips, cycling through the machine IDs.

    Args:
        machine_type: one of :data:`MACHINE_TYPES`.
        normal: number of normal clips.
        anomalous: number of anomalous clips (faults chosen at random).
        seconds: clip length.
        seed: random seed; the same arguments give the same clips.
        severity: fault strength scale.
        split_tag: separates the random streams of the train and test splits.

    Returns:
        ``(clips (N, T) float32, anomalous (N,) int64 0/1, machine_ids (N,) int64)``.

    Example:
        >>> generate("valve", normal=1, seconds=0.5)[0].shape
        (1, 8000)
    """
    if normal < 0 or anomalous < 0 or normal + anomalous == 0:
        raise ValueError(f"need normal, anomalous >= 0 and at least one clip; got {normal}, "
                         f"{anomalous}")  # fmt: skip
    if seconds < 0.1:
        raise ValueError(f"seconds must be >= 0.1, got {seconds}")
    n = normal + anomalous
    labels = np.r_[np.zeros(normal, np.int64), np.ones(anomalous, np.int64)]
    ids = np.r_[np.arange(normal) % 4, np.arange(anomalous) % 4]
    machine_ids = np.asarray(MACHINE_IDS, np.int64)[ids]
    clips = np.empty((n, int(round(seconds * SAMPLE_RATE))), np.float32)  # (N, T)
    for index in range(n):
        rng = np.random.default_rng([seed, split_tag, MACHINE_TYPES.index(machine_type), index])
        fault = FAULTS[rng.integers(len(FAULTS))] if labels[index] else None
        clips[index] = machine_clip(machine_type, int(machine_ids[index]), seconds, rng, fault,
                                    severity)  # fmt: skip
    return clips, labels, machine_ids
