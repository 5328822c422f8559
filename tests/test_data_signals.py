"""Signal datasets: audio front end, Speech Commands, HAR and DCASE2020 loaders and generators.

Real-format loaders are checked on tiny fixtures written here in each dataset's official layout;
the offline sources are generated (tiny) or fetched from the package registry (BasicMotions).
"""

from __future__ import annotations

import math
import struct
import zipfile

import numpy as np
import pytest
import torch

from tinyprop import data
from tinyprop.data import (
    audio,
    basicmotions,
    dcase,
    har,
    speech_commands,
    synthetic_har,
    synthetic_machine,
    synthetic_speech,
)

SR = 16000


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Send the data cache to a temporary folder (the real cache stays untouched)."""
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYPROP_DATA", raising=False)
    return tmp_path / "cache"


def tone(frequency: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


# ----------------------------------------------------------------------------- audio front end


def test_wav_round_trip_and_corrupt_file(tmp_path):
    signal = tone(440.0, 0.25)
    audio.write_wav(tmp_path / "a.wav", signal)
    read, rate = audio.read_wav(tmp_path / "a.wav")
    assert rate == SR and read.shape == signal.shape
    assert np.max(np.abs(read - signal)) < 1.0 / 32767 + 1e-6
    (tmp_path / "bad.wav").write_bytes(b"RIFF....garbage, not a wave file")
    with pytest.raises(ValueError, match="bad.wav"):
        audio.read_wav(tmp_path / "bad.wav")


@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
@pytest.mark.parametrize("frequency", [300.0, 1000.0, 3000.0])
def test_pure_tone_lands_in_its_mel_band(frequency, mel_scale):
    n_mels, f_max = 40, 8000.0
    log_mel = audio.log_mel_spectrogram(
        tone(frequency), SR, n_fft=1024, hop_length=512, n_mels=n_mels, f_max=f_max,
        mel_scale=mel_scale,
    )  # fmt: skip
    loudest = int(np.argmax(log_mel.mean(axis=0)))
    edges = audio.mel_to_hz(
        np.linspace(0.0, audio.hz_to_mel(f_max, mel_scale), n_mels + 2), mel_scale
    )
    centres = edges[1:-1]
    assert loudest == int(np.argmin(np.abs(centres - frequency)))


def test_mfcc_shape_dct_and_silence():
    assert audio.mfcc(np.zeros((3, SR), np.float32)).shape == (3, 49, 10)
    basis = audio.dct_matrix(40, 40)
    np.testing.assert_allclose(basis @ basis.T, np.eye(40), atol=1e-5)
    # c0 tracks loudness: a louder tone has a larger c0 in every frame
    quiet, loud = audio.mfcc(tone(1000.0, amplitude=0.01)), audio.mfcc(tone(1000.0, amplitude=0.5))
    assert np.all(loud[:, 0] > quiet[:, 0])


def test_resample_keeps_the_frequency():
    rate = 22050
    signal = np.sin(2 * np.pi * 440.0 * np.arange(rate) / rate).astype(np.float32)
    out = audio.resample(signal, rate, SR)
    assert out.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * SR / len(out) - 440.0) <= 1.0


def test_fix_length_places_and_cuts():
    out = audio.fix_length(np.arange(1, 6, dtype=np.float32), 6, offset=3)
    assert out.tolist() == [0, 0, 0, 1, 2, 3]
    assert audio.fix_length(np.ones(4, np.float32), 3, offset=-2).tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------- speech commands

WORD_TONES = {"yes": 300.0, "no": 600.0, "stop": 900.0, "cat": 1500.0, "dog": 2500.0}


def write_speech_commands(root, per_word=6):
    """A tiny Speech Commands v0.02 folder: word folders, list files, background noise."""
    root.mkdir(parents=True)
    validation, testing = [], []
    for word, frequency in WORD_TONES.items():
        (root / word).mkdir()
        for index in range(per_word):
            name = f"{word}/{index:08x}_nohash_0.wav"
            audio.write_wav(root / name, tone(frequency, seconds=0.7 + 0.05 * index))
            if index == 0:
                validation.append(name)
            elif index in (1, 2):
                testing.append(name)
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "_background_noise_").mkdir()
    noise = np.random.default_rng(0).normal(0.0, 0.1, 3 * SR).astype(np.float32)
    audio.write_wav(root / "_background_noise_" / "white_noise.wav", noise)
    return root


def test_speech_commands_real_format(tmp_path, private_cache):
    root = write_speech_commands(tmp_path / "speech_commands_v0.02")
    train = data.load("speech_commands", "train", data_dir=str(tmp_path))  # parent folder works
    test = data.load("speech_commands", "test", data_dir=str(root))
    assert train.source == "speech_commands" and train.num_classes == 12
    assert train.input_shape == (1, 49, 10)
    # train: 3 keywords x 3 files (6 minus 1 validation minus 2 test); test: 3 x 2
    for dataset, known in ((train, 9), (test, 6)):
        counts = torch.bincount(dataset.y, minlength=12).tolist()
        assert [counts[i] for i in (0, 1, 8)] == [known // 3] * 3  # yes, no, stop
        assert counts[10] == math.ceil(known * 0.1)  # silence
        assert counts[11] == math.ceil(known * 0.1)  # unknown (cat/dog), sampled
        assert sum(counts) == len(dataset)
    paths, _ = speech_commands.real_index(root, "train", 0, 10.0, 10.0)
    listed = set((root / "validation_list.txt").read_text().split())
    listed |= set((root / "testing_list.txt").read_text().split())
    assert not listed & {path for path in paths if path}
    # each keyword's tone sits in different mel bands: the MFCC frames differ by class
    yes, no = train.x[train.y == 0].mean(0), train.x[train.y == 1].mean(0)
    assert torch.linalg.norm(yes - no) > 1.0
    log_mel = data.load("speech_commands", "test", data_dir=str(root), features="log_mel")
    assert log_mel.input_shape == (1, 49, 40)


def test_speech_commands_missing_list_and_missing_folder(tmp_path, private_cache):
    root = write_speech_commands(tmp_path / "sc", per_word=3)
    (root / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testing_list.txt"):
        data.load("speech_commands", "train", data_dir=str(root))
    with pytest.raises(FileNotFoundError, match="speech_commands"):
        data.load("speech_commands", "train", data_dir=str(tmp_path / "nowhere"))


def test_synthetic_speech_tiny_set_is_deterministic(private_cache):
    first, labels = synthetic_speech.generate_waveforms("test", per_class=2, seed=3)
    again, _ = synthetic_speech.generate_waveforms("test", per_class=2, seed=3)
    other, _ = synthetic_speech.generate_waveforms("test", per_class=2, seed=4)
    assert first.shape == (24, SR) and labels.tolist() == np.repeat(np.arange(12), 2).tolist()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.all(np.abs(first).max(axis=1) > 0) and np.all(np.abs(first) <= 1.0)
    dataset = data.load("speech_commands", "train", per_class=2)
    engines = " + ".join(synthetic_speech.engines_available())
    assert dataset.source == f"synthetic speech ({engines}) as speech_commands stand-in"
    assert len(dataset) == 24 and dataset.input_shape == (1, 49, 10)
    assert torch.bincount(dataset.y).tolist() == [2] * 12
    assert len(data.load("speech_commands", "train", per_class=2, limit=5)) == 5


def test_synthetic_speech_voices_split_and_missing_engine(monkeypatch):
    train, test = synthetic_speech.espeak_voices("train"), synthetic_speech.espeak_voices("test")
    assert train and test and not set(train) & set(test)
    monkeypatch.setattr(synthetic_speech.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"espeak-ng.*scripts/install-system-deps.sh"):
        synthetic_speech.engines_available()


# ----------------------------------------------------------------------------- HAR


def write_uci_har(root, sizes=(("train", 5), ("test", 3))):
    """A tiny 'UCI HAR Dataset' tree; value = signal * 100 + window + step / 1000."""
    for split, n in sizes:
        signals = root / split / "Inertial Signals"
        signals.mkdir(parents=True)
        for s, name in enumerate(har.SIGNALS):
            rows = [" ".join(f"{s * 100 + w + t / 1000:.6e}" for t in range(128)) for w in range(n)]
            (signals / f"{name}_{split}.txt").write_text("\n".join(rows) + "\n")
        labels = [(w % 6) + 1 for w in range(n)]
        (root / split / f"y_{split}.txt").write_text("\n".join(map(str, labels)) + "\n")
    return root


def test_uci_har_real_format(tmp_path, private_cache):
    write_uci_har(tmp_path / "UCI HAR Dataset")
    train = data.load("har", "train", data_dir=str(tmp_path))
    test = data.load("har", "test", data_dir=str(tmp_path / "UCI HAR Dataset"))
    assert (train.source, train.num_classes, train.input_shape) == ("uci har", 6, (9, 128))
    assert len(train) == 5 and len(test) == 3
    assert train.y.tolist() == [0, 1, 2, 3, 4] and test.y.tolist() == [0, 1, 2]
    # sample 3, signal 7 (total_acc_y), step 10 holds 7 * 100 + 3 + 10 / 1000
    assert train.x[3, 7, 10].item() == pytest.approx(703.010, abs=1e-3)


def test_uci_har_corrupt_and_missing_files(tmp_path, private_cache):
    root = write_uci_har(tmp_path / "UCI HAR Dataset")
    path = root / "train" / "Inertial Signals" / "body_gyro_x_train.txt"
    path.write_text("1.0 2.0 3.0\n" * 5)
    with pytest.raises(ValueError, match=r"body_gyro_x_train.txt.*re-extract"):
        data.load("har", "train", data_dir=str(root))
    (root / "test" / "y_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="y_test.txt"):
        data.load("har", "test", data_dir=str(root))


def test_basicmotions_from_the_aeon_wheel(monkeypatch):
    monkeypatch.delenv("TINYPROP_DATA", raising=False)
    train, test = data.load("har", "train"), data.load("har", "test")
    for dataset in (train, test):
        assert dataset.source == "basicmotions as har substitute"
        assert (len(dataset), dataset.num_classes, dataset.input_shape) == (40, 4, (6, 100))
        assert torch.bincount(dataset.y).tolist() == [10] * 4
        assert torch.isfinite(dataset.x).all() and dataset.x.std() > 0.1
    wheel = data.cache_dir() / "basicmotions" / basicmotions.WHEEL_NAME
    assert data.cache.sha256(wheel) == basicmotions.WHEEL_SHA256
    # seeded stratified re-splits: balanced, disjoint, covering all 80, reproducible
    pool = {row.numpy().tobytes() for row in torch.cat([train.x, test.x])}
    a_train, a_test = data.load("har", "train", resplit=1), data.load("har", "test", resplit=1)
    rows_train = {row.numpy().tobytes() for row in a_train.x}
    rows_test = {row.numpy().tobytes() for row in a_test.x}
    assert not rows_train & rows_test and rows_train | rows_test == pool
    assert torch.bincount(a_train.y).tolist() == [10] * 4
    assert torch.equal(data.load("har", "train", resplit=1).x, a_train.x)
    assert not torch.equal(data.load("har", "train", resplit=2).x, a_train.x)


def test_basicmotions_corrupt_wheel_and_ts(tmp_path):
    fake = tmp_path / basicmotions.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("nothing.txt", "not aeon")
    with pytest.raises(RuntimeError, match=r"SHA-256.*pip download aeon==1.6.0"):
        basicmotions.fetch_wheel(tmp_path)
    assert not fake.exists()  # the bad download is deleted so a rerun fetches it again
    with pytest.raises(ValueError, match="line 3"):
        basicmotions.parse_ts("@classLabel true a b\n@data\n1,x:2,3:a\n", "bad.ts")


def test_synthetic_har_shaped():
    x, y = synthetic_har.generate("train", size=60, seed=1)
    assert x.shape == (60, 9, 128) and set(y.tolist()) <= set(range(6))
    np.testing.assert_array_equal(x, synthetic_har.generate("train", size=60, seed=1)[0])
    dataset = data.load("har", "test", substitute="synthetic", size=30)
    assert (dataset.source, dataset.num_classes, dataset.input_shape) == (
        "synthetic har-shaped", 6, (9, 128),
    )  # fmt: skip
    # total_acc = body_acc + gravity: about 1 g in magnitude on average
    gravity = x[:, 6:9].mean(axis=2) - x[:, 0:3].mean(axis=2)
    np.testing.assert_allclose(np.linalg.norm(gravity, axis=1), 1.0, atol=0.05)


# ----------------------------------------------------------------------------- DCASE2020


def write_dcase(root):
    """A tiny dev_data/fan tree: 3 normal train clips; test: 2 normal + 2 anomalous, 2 IDs."""
    rng = np.random.default_rng(0)
    files = {
        "train": ["normal_id_00_00000000", "normal_id_00_00000001", "normal_id_02_00000000"],
        "test": ["normal_id_00_00000000", "anomaly_id_00_00000000", "normal_id_02_00000000",
                 "anomaly_id_02_00000001"],
    }  # fmt: skip
    for split, names in files.items():
        (root / "fan" / split).mkdir(parents=True)
        for name in names:
            fault = "clicks" if name.startswith("anomaly") else None
            clip = synthetic_machine.machine_clip("fan", 0, 1.0, rng, fault)
            audio.write_wav(root / "fan" / split / f"{name}.wav", clip)
    return root


def test_dcase_real_format(tmp_path, private_cache):
    write_dcase(tmp_path / "dev_data")
    train = data.load("dcase2020", "train", data_dir=str(tmp_path))
    test = data.load("dcase2020", "test", data_dir=str(tmp_path / "dev_data"))
    assert (train.source, train.num_classes, train.input_shape) == ("dcase2020 fan", 2, (640,))
    assert train.y.tolist() == [0, 0, 0] and train.machine_ids.tolist() == [0, 0, 2]
    assert test.y.tolist() == [1, 1, 0, 0]  # sorted names: anomaly_* before normal_*
    assert test.machine_ids.tolist() == [0, 2, 0, 2]
    with pytest.raises(FileNotFoundError, match=r"present in .* are \['fan'\]"):
        data.load("dcase2020", "train", data_dir=str(tmp_path), machine_type="pump")
    (tmp_path / "dev_data" / "fan" / "test" / "oops.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="oops.wav"):
        data.load("dcase2020", "test", data_dir=str(tmp_path))


def test_clip_features_put_a_tone_in_its_band():
    features = dcase.clip_features(tone(2000.0, seconds=1.0)[None], segments=4)
    assert features.shape == (1, 256)
    per_segment = features.reshape(4, 64)
    edges = audio.mel_to_hz(np.linspace(0.0, audio.hz_to_mel(8000.0, "slaney"), 66), "slaney")
    expected = int(np.argmin(np.abs(edges[1:-1] - 2000.0)))
    assert set(per_segment.argmax(axis=1).tolist()) == {expected}


def test_synthetic_machines_are_deterministic_and_anomalies_detectable(private_cache):
    clips, labels, ids = synthetic_machine.generate("pump", normal=3, anomalous=2, seconds=0.5)
    again = synthetic_machine.generate("pump", normal=3, anomalous=2, seconds=0.5)[0]
    np.testing.assert_array_equal(clips, again)
    assert clips.shape == (5, 8000) and labels.tolist() == [0, 0, 0, 1, 1]
    assert ids.tolist() == [0, 2, 4, 0, 2]
    assert not np.array_equal(clips, synthetic_machine.generate("pump", 3, 2, 0.5, seed=1)[0])
    options = dict(machine_type="fan", seconds=0.5, train_size=40, test_normal=20)
    train = data.load("dcase2020", "train", **options)
    test = data.load("dcase2020", "test", test_anomalous=20, **options)
    assert train.source == "synthetic machine sounds as dcase2020 stand-in"
    assert train.y.sum() == 0 and test.y.tolist() == [0] * 20 + [1] * 20
    assert train.input_shape == (640,)
    # a plain detector (standardised distance to the normal mean) separates the anomalies
    mean, std = train.x.mean(0), train.x.std(0) + 1e-3
    score = (((test.x - mean) / std) ** 2).mean(1)
    normal, anomalous = score[test.y == 0], score[test.y == 1]
    auc = (anomalous[:, None] > normal[None]).float().mean().item()
    assert auc > 0.75


def test_tinyprop_data_without_the_dataset_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPROP_DATA", str(tmp_path))  # shared folder holding no HAR copy
    with pytest.warns(UserWarning, match="offline source"):
        dataset = data.load("har", "test", substitute="synthetic", size=12)
    assert dataset.source == "synthetic har-shaped"


def wav_bytes(samples: int, rate: int = SR, data_size: int | None = None) -> bytes:
    """A 16-bit mono PCM WAV file of ``samples`` zero samples whose header declares
    ``data_size`` bytes of data (the real size when None)."""
    data = bytes(2 * samples)
    declared = len(data) if data_size is None else data_size
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", declared) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


@pytest.mark.parametrize(
    "content, message",
    [
        (wav_bytes(100, data_size=400), "cut short: its header declares 200 frames"),
        (wav_bytes(100, rate=0), "sample rate of 0 Hz"),
    ],
)
def test_a_wav_file_cut_short_or_without_a_rate_is_refused_naming_it(tmp_path, content, message):
    """A file holding less data than its header declares (an archive cut short) was read as a
    shorter clip, and a sample rate of 0 was returned as it was, silently."""
    path = tmp_path / "yes" / "clip.wav"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        audio.read_wav(path)
    assert str(path) in str(error.value)


def test_a_wav_header_written_to_a_pipe_is_read_to_the_end(tmp_path):
    """espeak-ng --stdout cannot go back to write the data size: its placeholder (0x7ffff000)
    means 'to the end of the file'."""
    samples, rate = audio.read_wav(wav_bytes(100, data_size=0x7FFFF000))
    assert samples.shape == (100,) and rate == SR
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        audio.read_wav(tmp_path / "zero.wav")


@pytest.mark.parametrize("value", ["nan", "-inf", "1e39"])
def test_uci_har_value_that_is_not_finite_is_refused_naming_the_file(
    tmp_path, private_cache, value
):
    """np.loadtxt reads 'nan', 'inf' and 1e39 (inf in float32): such a window was loaded,
    silently."""
    root = write_uci_har(tmp_path / "UCI HAR Dataset")
    path = root / "test" / "Inertial Signals" / "body_acc_y_test.txt"
    rows = path.read_text().splitlines()
    rows[1] = " ".join([value] + rows[1].split()[1:])
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(
        ValueError, match=r"body_acc_y_test.txt holds a NaN or infinite value \(line 2\)"
    ):
        data.load("har", "test", data_dir=str(root))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e39"])
def test_basicmotions_ts_value_that_is_not_finite_is_refused_naming_the_line(value):
    """A .ts value "nan", "inf" or beyond float32 (1e39 became inf) was loaded as it was."""
    text = f"@classLabel true a b\n@data\n1,2:3,4:b\n1,{value}:3,4:a\n"
    with pytest.raises(ValueError, match="bad.ts line 4: a value is NaN, infinite"):
        basicmotions.parse_ts(text, "bad.ts")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "holds no samples"),  # was numpy's "can't extend empty axis 1", no file named
        ("short", r"normal_id_00_00000099.wav: clips give 2 frames"),  # no file named
        ("long id", "is not a DCASE2020 Task 2 file name"),  # was OverflowError
    ],
)
def test_dcase_clip_that_is_empty_short_or_misnamed_is_refused_naming_it(
    tmp_path, private_cache, kind, message
):
    write_dcase(tmp_path / "dev_data")
    folder = tmp_path / "dev_data" / "fan" / "train"
    if kind == "long id":
        audio.write_wav(folder / f"normal_id_{'9' * 30}_00000001.wav", np.zeros(16000))
    else:
        audio.write_wav(
            folder / "normal_id_00_00000099.wav", np.zeros(0 if kind == "empty" else 1000)
        )
    with pytest.raises(ValueError, match=message):
        data.load("dcase2020", "train", data_dir=str(tmp_path))


def test_speech_commands_clip_without_samples_is_refused_naming_it(tmp_path, private_cache):
    """A WAV header without audio was padded into a second of silence under its word's label."""
    root = write_speech_commands(tmp_path / "speech_commands_v0.02")
    clip = root / "yes" / "00000003_nohash_0.wav"  # a training clip
    audio.write_wav(clip, np.zeros(0))
    with pytest.raises(ValueError, match=f"{clip.name} holds no samples"):
        data.load("speech_commands", "train", data_dir=str(root))
