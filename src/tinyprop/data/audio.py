"""Audio front end in NumPy: WAV reading, resampling, log-mel spectrograms and MFCCs.

No torchaudio or librosa: everything the keyword-spotting (Speech Commands) and anomalous sound
detection (DCASE2020 Task 2) loaders need is here, in plain NumPy.

Two standard settings are provided as presets:

- :data:`KWS_MFCC`: 1 s at 16 kHz, 30 ms Hann windows every 20 ms, 40 HTK mel bands in
  20-4000 Hz, natural log, 10 DCT-II coefficients -> 49 frames x 10 MFCCs, as in DS-CNN and the
  MLPerf Tiny keyword-spotting benchmark.
- :data:`DCASE_LOG_MEL`: 1024-point Hann windows every 512 samples (centred, reflect padding),
  64 Slaney mel bands, power 2, ``10 * log10(mel + eps)`` dB, as in the DCASE2020 Task 2 baseline.

Example:
    >>> import numpy as np
    >>> tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32)
    >>> mfcc(tone[None], **KWS_MFCC).shape
    (1, 49, 10)
"""

from __future__ import annotations

import io
import stat
import wave
from pathlib import Path

import numpy as np

# Keyword spotting: DS-CNN / MLPerf Tiny KWS front end (49 frames x 10 MFCCs from 1 s at 16 kHz).
KWS_MFCC: dict = dict(
    sample_rate=16000,
    window_length=480,  # 30 ms
    hop_length=320,  # 20 ms
    n_fft=512,
    n_mels=40,
    f_min=20.0,
    f_max=4000.0,
    n_mfcc=10,
)

# DCASE2020 Task 2 baseline log-mel (librosa defaults: centred frames, Slaney mel scale and norm).
DCASE_LOG_MEL: dict = dict(
    sample_rate=16000,
    window_length=1024,
    hop_length=512,
    n_fft=1024,
    n_mels=64,
    f_min=0.0,
    f_max=8000.0,
    center=True,
    mel_scale="slaney",
)


# The most bytes one WAV file may hold: a Speech Commands background clip (95 s at 16 kHz) has
# 3 MB, a DCASE clip 320 KB. A header claiming gigabytes was read as far as it claimed.
MAX_WAV_BYTES = 256 * 2**20
# A data chunk size from here up is a placeholder: a program writing to a pipe (espeak-ng
# --stdout writes 0x7ffff000) cannot go back to write the real one. Such data runs to the end
# of the file; a smaller size is the real one, and a file holding less was cut short.
STREAMED_DATA_SIZE = 0x7FFF0000


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (8/16/24/32-bit integer) as float32 samples in [-1, 1].

    Multi-channel files are averaged to mono. A file larger than ``MAX_WAV_BYTES``, cut short
    of the data its header declares, or with a sample rate of 0 is refused (ValueError naming
    the file).

    Args:
        source: a path, or the bytes of a whole WAV file.

    Returns:
        ``(samples, sample_rate)`` with samples of shape ``(T,)``, float32.

    Example:
        >>> samples, rate = read_wav("yes/0a7c2a8d_nohash_0.wav")  # doctest: +SKIP
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    content = source if isinstance(source, bytes) else _read_wav_bytes(Path(source))
    try:
        with wave.open(io.BytesIO(content)) as handle:
            channels, width, rate = (
                handle.getnchannels(),
                handle.getsampwidth(),
                handle.getframerate(),
            )
            frames = handle.getnframes()  # as the header declares
            raw = handle.readframes(frames)
    except (wave.Error, EOFError, OSError) as error:
        raise ValueError(
            f"cannot read WAV file {name}: {error}; it is corrupt or not 16 kHz PCM WAV: "
            f"re-extract the dataset archive or delete the file"
        ) from error
    if rate <= 0:
        raise ValueError(f"WAV file {name} has a sample rate of {rate} Hz; it is corrupt")
    declared = frames * width * channels  # bytes of the data chunk
    if len(raw) < declared < STREAMED_DATA_SIZE:
        raise ValueError(
            f"WAV file {name} is cut short: its header declares {frames} frames "
            f"({declared} bytes of data), the file holds {len(raw) // (width * channels)}; "
            "re-extract the dataset archive or delete the file"
        )
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        samples = value.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"WAV file {name} has an unsupported sample width of {width} bytes")
    samples = samples.reshape(-1, channels).mean(axis=1)  # (T,)
    return samples.astype(np.float32), rate


def read_clip(path: Path, sample_rate: int) -> np.ndarray:
    """The samples ``(T,)`` of a dataset's WAV clip, refused (ValueError naming the file) when
    its rate is not ``sample_rate`` or it holds no samples (it was padded into silence, or
    failed later in the features without naming the file)."""
    samples, rate = read_wav(path)
    if rate != sample_rate:
        raise ValueError(f"{path} has sample rate {rate} Hz; expected {sample_rate} Hz")
    if samples.size == 0:
        raise ValueError(
            f"WAV file {path} holds no samples (a header without audio); re-extract the "
            "dataset archive or delete the file"
        )
    return samples


def _read_wav_bytes(path: Path) -> bytes:
    """The bytes of a WAV file, at most ``MAX_WAV_BYTES`` (ValueError beyond, or for a path
    that is not a regular file: a symlink to /dev/zero would never end)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError(f"{path} is not a regular file; a WAV file is expected")
        with open(path, "rb") as handle:
            content = handle.read(MAX_WAV_BYTES + 1)  # no further
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"cannot read WAV file {path}: {error}") from error
    if len(content) > MAX_WAV_BYTES:
        raise ValueError(
            f"WAV file {path} holds more than {MAX_WAV_BYTES} bytes, far more than any clip of "
            "the datasets (minutes of audio); delete it or cut it into clips"
        )
    return content


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """Write mono float samples in [-1, 1] as a 16-bit PCM WAV file (used by tests and tools)."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32767.0), -32768, 32767)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sample_rate))
        handle.writeframes(pcm.astype("<i2").tobytes())


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by the FFT method (exact for periodic signals).

    Args:
        samples: ``(T,)`` signal.
        from_rate: its sample rate in Hz.
        to_rate: the wanted sample rate in Hz.

    Returns:
        ``(round(T * to_rate / from_rate),)`` float32 signal.

    Example:
        >>> resample(np.zeros(22050, np.float32), 22050, 16000).shape
        (16000,)
    """
    if from_rate == to_rate or len(samples) == 0:
        return np.asarray(samples, np.float32)
    length = len(samples)
    new_length = int(round(length * to_rate / from_rate))
    spectrum = np.fft.rfft(samples)  # (T // 2 + 1,)
    keep = min(len(spectrum), new_length // 2 + 1)
    new_spectrum = np.zeros(new_length // 2 + 1, np.complex128)
    new_spectrum[:keep] = spectrum[:keep]
    out = np.fft.irfft(new_spectrum, n=new_length) * (new_length / length)
    return out.astype(np.float32)


def fix_length(samples: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """Place a signal in a window of ``length`` samples starting at ``offset`` (may be negative).

    Parts outside the window are cut; the rest of the window is zero.
    """
    out = np.zeros(length, np.float32)
    start, stop = max(offset, 0), min(offset + len(samples), length)
    if stop > start:
        out[start:stop] = samples[start - offset : stop - offset]
    return out


def hz_to_mel(frequency: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Convert Hz to mels: ``"htk"`` (2595 log10(1 + f/700)) or ``"slaney"`` (linear < 1 kHz)."""
    frequency = np.asarray(frequency, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + frequency / 700.0)
    if scale == "slaney":
        linear = frequency / (200.0 / 3)
        log_part = 15.0 + np.log(np.maximum(frequency, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(frequency >= 1000.0, log_part, linear)
    raise ValueError(f"unknown mel scale {scale!r}; choose 'htk' or 'slaney'")


def mel_to_hz(mel: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        return np.where(
            mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3)
        )
    raise ValueError(f"unknown mel scale {scale!r}; choose 'htk' or 'slaney'")


def mel_filterbank(
    n_mels: int,
    n_fft: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    mel_scale: str = "htk",
) -> np.ndarray:
    """Triangular mel filters on the FFT bins, shape ``(n_mels, n_fft // 2 + 1)``.

    The ``"slaney"`` scale also area-normalises each filter (2 / bandwidth), as librosa does.

    Args:
        n_mels: number of mel bands.
        n_fft: FFT size.
        sample_rate: sample rate in Hz.
        f_min: lowest band edge in Hz.
        f_max: highest band edge in Hz (default: Nyquist).
        mel_scale: ``"htk"`` or ``"slaney"``.

    Returns:
        float32 weights ``(n_mels, n_fft // 2 + 1)``.

    Example:
        >>> mel_filterbank(40, 512, 16000, 20.0, 4000.0).shape
        (40, 257)
    """
    f_max = sample_rate / 2.0 if f_max is None else f_max
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(
            f"mel band edges must satisfy 0 <= f_min < f_max <= sample_rate / 2; got f_min="
            f"{f_min}, f_max={f_max}, sample_rate={sample_rate}"
        )
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # (F,)
    edges_mel = np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
    edges_hz = mel_to_hz(edges_mel, mel_scale)  # (n_mels + 2,)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None] - lower) / (centre - lower)
    falling = (upper - bin_hz[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, F)
    if mel_scale == "slaney":
        weights *= 2.0 / (upper - lower)
    return weights.astype(np.float32)


def power_spectrogram(
    samples: np.ndarray,
    n_fft: int,
    hop_length: int,
    window_length: int | None = None,
    center: bool = False,
) -> np.ndarray:
    """Power spectrum of Hann-windowed frames.

    Args:
        samples: ``(B, T)`` or ``(T,)`` signals.
        n_fft: FFT size (>= window_length; the window is zero-padded).
        hop_length: samples between frame starts.
        window_length: Hann window length (default ``n_fft``).
        center: pad ``n_fft // 2`` on both sides by reflection (librosa's default).

    Returns:
        ``(B, frames, n_fft // 2 + 1)`` (or without ``B``) float32 power spectra.
    """
    window_length = n_fft if window_length is None else window_length
    batched = np.asarray(samples, np.float32)
    single = batched.ndim == 1
    if single:
        batched = batched[None]
    if center:
        batched = np.pad(batched, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
        frame_length = n_fft
    else:
        frame_length = window_length
    if batched.shape[1] < frame_length:
        raise ValueError(
            f"signal of {batched.shape[1]} samples is shorter than one frame ({frame_length}); "
            f"pad it first (fix_length)"
        )
    n_frames = 1 + (batched.shape[1] - frame_length) // hop_length
    index = np.arange(frame_length)[None] + hop_length * np.arange(n_frames)[:, None]
    frames = batched[:, index]  # (B, frames, frame_length)
    window = np.hanning(window_length + 1)[:-1].astype(np.float32)  # periodic Hann
    if frame_length > window_length:  # centre the window in the frame, as librosa does
        pad = (frame_length - window_length) // 2
        window = np.pad(window, (pad, frame_length - window_length - pad))
    spectrum = np.fft.rfft(frames * window, n=n_fft, axis=-1)  # (B, frames, F)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return power[0] if single else power


def log_mel_spectrogram(
    samples: np.ndarray,
    sample_rate: int = 16000,
    n_fft: int = 1024,
    hop_length: int = 512,
    window_length: int | None = None,
    n_mels: int = 64,
    f_min: float = 0.0,
    f_max: float | None = None,
    center: bool = False,
    mel_scale: str = "htk",
    decibels: bool = True,
) -> np.ndarray:
    """Log mel energies of each frame.

    Args:
        samples: ``(B, T)`` or ``(T,)`` float signals.
        sample_rate, n_fft, hop_length, window_length, center: framing (see
            :func:`power_spectrogram`).
        n_mels, f_min, f_max, mel_scale: mel filters (see :func:`mel_filterbank`).
        decibels: ``10 log10(mel + eps)`` (DCASE baseline) if True, else ``ln(mel + 1e-12)``.

    Returns:
        ``(B, frames, n_mels)`` (or without ``B``) float32.

    Example:
        >>> log_mel_spectrogram(np.zeros((2, 16000)), **DCASE_LOG_MEL).shape
        (2, 32, 64)
    """
    power = power_spectrogram(samples, n_fft, hop_length, window_length, center)  # (B, fr, F)
    filters = mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max, mel_scale)  # (M, F)
    mel = power @ filters.T  # (B, frames, n_mels)
    if decibels:
        return (10.0 * np.log10(mel + np.finfo(np.float32).eps)).astype(np.float32)
    return np.log(mel + 1e-12).astype(np.float32)


def dct_matrix(n_input: int, n_output: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``(n_output, n_input)``."""
    n = np.arange(n_input)[None]
    k = np.arange(n_output)[:, None]
    matrix = np.cos(np.pi / n_input * (n + 0.5) * k) * np.sqrt(2.0 / n_input)
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


def mfcc(
    samples: np.ndarray,
    sample_rate: int = 16000,
    window_length: int = 480,
    hop_length: int = 320,
    n_fft: int = 512,
    n_mels: int = 40,
    f_min: float = 20.0,
    f_max: float = 4000.0,
    n_mfcc: int = 10,
) -> np.ndarray:
    """Mel-frequency cepstral coefficients: DCT-II of natural-log HTK mel energies.

    Defaults are :data:`KWS_MFCC` (1 s at 16 kHz -> 49 frames x 10 coefficients).

    Args:
        samples: ``(B, T)`` or ``(T,)`` float signals in [-1, 1].
        sample_rate, window_length, hop_length, n_fft: framing (no centring).
        n_mels, f_min, f_max: mel filters.
        n_mfcc: number of cepstral coefficients kept (c0 first).

    Returns:
        ``(B, frames, n_mfcc)`` (or without ``B``) float32.

    Example:
        >>> mfcc(np.zeros(16000, np.float32)).shape
        (49, 10)
    """
    log_mel = log_mel_spectrogram(
        samples,
        sample_rate,
        n_fft,
        hop_length,
        window_length,
        n_mels,
        f_min,
        f_max,
        center=False,
        mel_scale="htk",
        decibels=False,
    )  # (B, frames, n_mels)
    return (log_mel @ dct_matrix(n_mels, n_mfcc).T).astype(np.float32)  # (B, frames, n_mfcc)
