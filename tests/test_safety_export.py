"""Findings 3 and 6 of the fail-safe issue: ``tinyprop export`` ran code from MODEL.pt (loaded
with weights_only=False), showed raw unpickler tracebacks, overwrote the user's own files in
--out and wrote the model path verbatim into a C comment."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import models
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.cli import main as export_main
from tinyprop.export.flash import flash_estimate
from tinyprop.export.sram import sram_estimate


class RunsCode:
    """A pickled object whose unpickling would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    # on stderr, as the other commands' errors (it was printed to stdout)
    lines = [line for line in captured.err.splitlines() if line.startswith("tinyprop export:")]
    assert len(lines) == 1 and "tinyprop export:" not in captured.out, captured
    return lines[0]


@pytest.mark.parametrize("with_model", [False, True], ids=["module", "state_dict"])
def test_export_never_runs_code_from_the_model_file(tmp_path, capsys, with_model):
    marker = tmp_path / "marker"
    torch.save({"weight": RunsCode(marker)}, tmp_path / "evil.pt")
    argv = [str(tmp_path / "evil.pt"), "--out", str(tmp_path / "out")]
    assert export_main(argv + (["--model", "har"] if with_model else [])) == 2
    assert not marker.exists()
    assert "posix.system" in _one_line_error(capsys)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", "truncated"])
def test_unreadable_model_file_gets_one_line(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save(models.build("har"), path)
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    assert export_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a readable torch file" in _one_line_error(capsys)


def test_a_model_file_damaged_in_a_weight_is_refused(tmp_path, capsys):
    """One bit flipped in a tensor's record: PyTorch's reader loads the file (the weight
    changed); the record's CRC-32 tells, and nothing is written."""
    import struct
    import zipfile

    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), path)
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name, extra = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name + extra + 2] ^= 0x40  # a weight's exponent bit
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=False) is not None  # PyTorch reads it as it is
    assert export_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "is damaged: a record fails its check (Bad CRC-32 for file" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_tinyprop_layers_are_refused_with_what_to_do(tmp_path, capsys):
    net = tinyprop.apply(models.build("har"), tinyprop.TinyPropConfig())
    torch.save(net, tmp_path / "applied.pt")
    assert export_main([str(tmp_path / "applied.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "state_dict" in _one_line_error(capsys)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_export_refuses_to_overwrite_user_files(tmp_path, capsys):
    torch.save(_mlp(), tmp_path / "mlp.pt")
    out = tmp_path / "project"
    out.mkdir()
    (out / "Makefile").write_text("# my own Makefile\n")
    (out / "main.c").write_text("int main(void) { return 0; }\n")
    argv = [str(tmp_path / "mlp.pt"), "--input-shape", "1,4,4", "--out", str(out)]
    assert export_main(argv) == 2
    assert "--force" in _one_line_error(capsys)
    assert (out / "Makefile").read_text() == "# my own Makefile\n"
    assert (out / "main.c").read_text() == "int main(void) { return 0; }\n"
    assert not (out / "tinyprop_model.h").exists()  # nothing written at all
    assert export_main(argv + ["--force"]) == 0
    assert "my own" not in (out / "Makefile").read_text()
    assert export_main(argv) == 0  # its own files, unchanged: exported again freely
    (out / "main.c").write_text((out / "main.c").read_text() + "/* my change */\n")
    assert export_main(argv) == 2
    assert "main.c" in _one_line_error(capsys)


def _code_outside_comments(header: str, tmp_path) -> str:
    """The header with its comments removed by the C preprocessor."""
    path = tmp_path / "header.h"
    path.write_text(header)
    command = ["gcc", "-fpreprocessed", "-dD", "-E", "-P", str(path)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_paths_and_layer_names_cannot_inject_c(tmp_path, capsys):
    folder = tmp_path / "evil*" / "\nint injected_by_path = 1;\n/*"
    folder.mkdir(parents=True)
    net = nn.Sequential()
    net.add_module("a*/ int injected_by_name = 2; /*", nn.Flatten())
    net.add_module("fc\n#define X 1", nn.Linear(16, 3))
    torch.save(net, folder / "model.pt")
    out = tmp_path / "out"
    assert export_main([str(folder / "model.pt"), "--input-shape", "16", "--out", str(out)]) == 0
    header = (out / "tinyprop_model.h").read_text()
    code = _code_outside_comments(header, tmp_path)
    assert "injected" not in code and "#define X" not in code
    assert "injected_by_path" in header  # still shown, escaped, inside the comment
    assert export_c(net, tinyprop.TinyPropConfig(), tmp_path / "api", input_shape=(16,))


def test_folder_as_model_file_and_file_as_out_get_one_line(tmp_path, capsys):
    torch.save(_mlp(), tmp_path / "mlp.pt")
    (tmp_path / "a-file").write_text("")
    assert export_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a folder" in _one_line_error(capsys)
    assert export_main([str(tmp_path / "mlp.pt"), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file; give a folder" in _one_line_error(capsys)


def _claims_a_huge_layer(kind: str) -> nn.Module:
    """A file of a few kilobytes whose first Linear claims 300,000 x 300,000 weights."""
    size = 300_000
    if kind == "meta":
        meta = {"device": "meta"}
        return nn.Sequential(nn.Linear(size, size, **meta), nn.Linear(size, 3, **meta))
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    net[0].weight = nn.Parameter(torch.zeros(1).expand(size, size))  # stride 0: 4 bytes
    net[0].bias = nn.Parameter(torch.zeros(1).expand(size))
    net[1].weight = nn.Parameter(torch.zeros(1).expand(3, size))
    net[0].in_features = net[0].out_features = net[1].in_features = size
    return net


@pytest.mark.parametrize("kind", ["meta", "expanded"])
def test_huge_claimed_shapes_are_refused_before_allocating(tmp_path, capsys, kind):
    """Export used to copy such a weight to float32: a 360 GB allocation and a traceback."""
    path = tmp_path / "huge.pt"
    torch.save(_claims_a_huge_layer(kind), path)
    assert path.stat().st_size < 10_000
    argv = [str(path), "--out", str(tmp_path / "out"), "--input-shape", "300000"]
    assert export_main(argv) == 2
    expected = "meta tensor" if kind == "meta" else "expanded tensor"
    assert expected in _one_line_error(capsys)


def test_symlink_to_a_device_is_not_a_regular_file(tmp_path, capsys):
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    assert export_main([str(tmp_path / "zero.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "is not a regular file" in _one_line_error(capsys)


def test_sizes_beyond_the_runtime_int32_are_refused(tmp_path, capsys):
    """--batch-size 9999999999 was exported (#define TP_MODEL_BATCH_SIZE 9999999999) and only
    the C link failed."""
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path / "m.pt")
    argv = [str(tmp_path / "m.pt"), "--out", str(tmp_path / "out"), "--input-shape", "4"]
    assert export_main(argv + ["--batch-size", "9999999999"]) == 2
    assert "beyond the C runtime's largest batch (16,777,216" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def _repeated_and_tied():
    """A Sequential holding one Linear twice, and one whose two Linears share a weight."""
    torch.manual_seed(0)
    twice = nn.Linear(8, 8)
    repeated = nn.Sequential(twice, nn.ReLU(), twice, nn.ReLU(), nn.Linear(8, 3))
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    tied[2].weight = tied[0].weight
    return {"repeated": repeated, "tied": tied}


@pytest.mark.parametrize("kind", ["repeated", "tied"])
def test_shared_weights_are_refused(tmp_path, capsys, kind):
    """A module used twice was exported once (the C model was a layer short of the PyTorch
    one); tied weights became two copies that the device trained apart. Both silently."""
    torch.save(_repeated_and_tied()[kind], tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "layers '0' and '2' share" in line and "clone" in line, line
    assert not (tmp_path / "out").exists()


def _settings_that_lie(kind: str) -> nn.Sequential:
    """A model file whose layer settings say other than its weights (or than PyTorch allows)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))  # fmt: skip
    if kind == "out_features":  # the C program read 6 x 6 floats of a 3 x 6 weight array
        net[6].out_features = 6
    elif kind == "weight":
        net[4].weight = nn.Parameter(torch.zeros(2, 16))
    elif kind == "bias":
        net[0].bias = nn.Parameter(torch.zeros(9))
    elif kind == "kernel_size":  # read 4 x 2 x 5 x 5 floats of a 4 x 2 x 3 x 3 weight
        net[0].kernel_size = (5, 5)
        net[4].in_features = 4
        net[4].weight = nn.Parameter(torch.zeros(6, 4))
    elif kind == "groups":
        net[0].groups = 2
    elif kind == "stride":  # a ZeroDivisionError
        net[2].stride = 0
    elif kind == "padding":
        net[0].padding = (-1, -1)
    return net


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("out_features", "layer '6' (Linear): its weight is (3, 6) but out_features=6"),
        ("weight", "layer '4' (Linear): its weight is (2, 16) but out_features=6"),
        ("bias", "layer '0' (Conv2d): its bias is (9,) but"),
        ("kernel_size", "layer '0' (Conv2d): its weight is (4, 2, 3, 3) but"),
        ("groups", "layer '0' (Conv2d): its weight is (4, 2, 3, 3) but"),
        ("stride", "layer '2' (MaxPool2d): stride=0"),
        ("padding", "layer '0' (Conv2d): padding=(-1, -1)"),
    ],
)
def test_layer_settings_that_do_not_fit_the_weights_are_refused(tmp_path, capsys, kind, expected):
    """A whole model file carries each layer's settings beside its weights; the exporter sized
    the C layers by the settings and wrote the weights as they were: a Linear saying
    out_features=6 beside a 3 x 6 weight became a program reading past the weight array
    (AddressSanitizer: global-buffer-overflow in tp_init). Now one line names the layer."""
    torch.save(_settings_that_lie(kind), tmp_path / "model.pt")
    argv = [str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--input-shape", "2,6,6"]
    assert export_main(argv) == 2
    line = _one_line_error(capsys)
    assert expected in line and "save the model again from PyTorch" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nan", "empty"])
def test_nan_weights_and_empty_models_get_one_line(tmp_path, capsys, kind):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    if kind == "nan":
        with torch.no_grad():
            model[2].bias[1] = float("nan")
    else:
        model = nn.Sequential()
    torch.save(model, tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    expected = "layer '2' has a NaN or infinite bias" if kind == "nan" else "has no layers"
    assert expected in _one_line_error(capsys)


def test_state_dict_that_does_not_fit_the_reference_model_names_the_keys(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Linear(4, 3)).state_dict(), tmp_path / "weights.pt")
    argv = [str(tmp_path / "weights.pt"), "--model", "har", "--out", str(tmp_path / "out")]
    assert export_main(argv) == 2
    line = _one_line_error(capsys)
    assert "does not fit the har reference model: keys 6 missing (3.weight, 3.bias" in line
    assert "2 of another shape (0.weight is (3, 4) in the file, (16, 6, 5) in the model" in line
    assert "another model" in line


def _har_state():
    torch.manual_seed(0)
    return models.build("har", input_shape=(6, 100)).state_dict()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # a training checkpoint: its weights under one entry (the message said: 8 keys missing)
        (
            lambda sd: {"epoch": 3, "state_dict": sd, "optimizer": {}},
            "is a training checkpoint (entries 'epoch', 'state_dict', 'optimizer'), not a "
            "state_dict: its weights are under 'state_dict'; pass --state-dict-key state_dict",
        ),
        # another model's weights: the shapes that differ are named (the message was cut at 300
        # characters, before the shapes)
        (
            lambda sd: {**sd, "0.weight": sd["0.weight"][:2]},
            "1 of another shape (0.weight is (2, 6, 5) in the file, (16, 6, 5) in the model)",
        ),
        # the state_dict of a wrapper: every key one level down
        (
            lambda sd: {f"model.{key}": value for key, value in sd.items()},
            "every key starts with 'model.': save the inner module's state_dict",
        ),
        # integer weights (all but a few truncated to 0 by load_state_dict) and complex ones
        # (the imaginary part dropped) were exported silently; float64 beyond float32 was
        # called NaN
        (
            lambda sd: {key: value.to(torch.int32) for key, value in sd.items()},
            "8 not of a float dtype (0.weight torch.int32, 0.bias torch.int32, ",
        ),
        (
            lambda sd: {**sd, "3.bias": sd["3.bias"].to(torch.complex64)},
            "1 not of a float dtype (3.bias torch.complex64); the runtime trains float32",
        ),
        (
            lambda sd: {**sd, "0.bias": sd["0.bias"].double() * 1e300},
            "1 beyond float32's range (3.4e38) (0.bias holds ",
        ),
    ],
    ids=["checkpoint", "shape", "prefix", "integer", "complex", "float64"],
)
def test_a_foreign_state_dict_is_refused_saying_what_it_is(tmp_path, capsys, content, expected):
    torch.save(content(_har_state()), tmp_path / "weights.pt")
    argv = [str(tmp_path / "weights.pt"), "--model", "har", "--out", str(tmp_path / "out")]
    assert export_main(argv) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_exports_with_its_state_dict_key(tmp_path, capsys):
    state = _har_state()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "checkpoint.pt")
    argv = [str(tmp_path / "checkpoint.pt"), "--model", "har", "--out", str(tmp_path / "out")]
    assert export_main([*argv, "--state-dict-key", "state_dict"]) == 0
    torch.save(state, tmp_path / "plain.pt")
    plain = [str(tmp_path / "plain.pt"), "--model", "har", "--out", str(tmp_path / "plain")]
    assert export_main(plain) == 0
    capsys.readouterr()

    def weights(folder):  # the header's weight arrays (its comment names the file)
        text = (tmp_path / folder / "tinyprop_model.h").read_text()
        return [line for line in text.splitlines() if not line.lstrip().startswith(("/*", "*"))]

    assert weights("out") == weights("plain")
    assert export_main([*argv, "--state-dict-key", "weights", "--force"]) == 2
    assert "has no entry 'weights' (it has 'epoch', 'state_dict')" in _one_line_error(capsys)


def test_ram_smaller_than_the_program_needs_is_refused_before_writing(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path / "m.pt")
    # the example program on a Cortex-M4: arena 644 + one sample 16 (it streams samples, so
    # the batch size of 8 does not count) + its data, heap and stack (tinyprop.export.sram,
    # checked against the Cortex-M4 build by tests/test_sram.py); it counted the first two only
    estimate = sram_estimate(3, 644, 16)
    needed = estimate.total_bytes
    assert needed == 644 + 16 + (3416 + 188 * 3) + estimate.heap_bytes + 3348
    argv = [str(tmp_path / "m.pt"), "--batch-size", "8"]
    assert export_main(argv + ["--out", str(tmp_path / "small"), "--ram", str(needed - 1)]) == 2
    line = _one_line_error(capsys)
    assert f"needs {needed:,} bytes of SRAM" in line and f"has {needed - 1:,}" in line
    assert "one sample 16" in line and "stack 3,348" in line
    assert f"heap {estimate.heap_bytes:,}" in line
    # within one page of newlib's heap, no mode saves enough here
    assert "No memory mode of this optimizer fits" in line and "--batch-size" not in line
    assert not (tmp_path / "small").exists()
    assert export_main(argv + ["--out", str(tmp_path / "fits"), "--ram", str(needed)]) == 0
    assert f"{needed:,} bytes (arena 644" in capsys.readouterr().out
    big_batch = [str(tmp_path / "m.pt"), "--batch-size", "4096", "--ram", str(needed)]
    assert export_main(big_batch + ["--out", str(tmp_path / "big-batch")]) == 0
    # as a datasheet gives it (it was 'must be a positive integer, got 1K'): 1024 bytes
    assert export_main(argv + ["--out", str(tmp_path / "kib"), "--sram", "16K"]) == 0
    assert "of the device's 16,384" in capsys.readouterr().out
    for ram in ("1.5K", "0K", "1X"):
        with pytest.raises(SystemExit):
            export_main(argv + ["--out", str(tmp_path / "bad"), "--ram", ram])


def test_flash_smaller_than_the_program_needs_is_refused_before_writing(tmp_path, capsys):
    """--flash / flash_bytes: the example's code, the initial weights and the built-in samples
    against the part's flash (tinyprop.export.flash, checked against the Cortex-M4 builds by
    tests/test_sram.py); before, a model too big for the part's flash was exported without a
    word and failed at link time on the board."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    torch.save(net, tmp_path / "m.pt")
    needed = flash_estimate(64 * 256 + 256 + 256 * 10 + 10, 3, 0).total_bytes
    argv = [str(tmp_path / "m.pt")]
    assert export_main(argv + ["--out", str(tmp_path / "small"), "--flash", str(needed - 1)]) == 2
    line = _one_line_error(capsys)
    assert f"needs {needed:,} bytes of flash" in line and f"has {needed - 1:,}" in line
    assert "weights 76,840" in line and "'0' (Linear), 66,560 bytes" in line
    assert not (tmp_path / "small").exists()
    assert export_main(argv + ["--out", str(tmp_path / "fits"), "--flash", str(needed)]) == 0
    assert f"flash on a Cortex-M4: {needed:,} bytes" in capsys.readouterr().out
    x = np.zeros((32, 64), dtype=np.float32)
    samples = (x, np.arange(32) % 10)
    with pytest.raises(ValueError, match=r"built-in samples 8,320\b.*saves 8,320"):
        export_c(net, tinyprop.TinyPropConfig(), tmp_path / "s", samples=samples,
                 flash_bytes=needed)  # fmt: skip
    assert not (tmp_path / "s").exists()
    for flash in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="flash_bytes must be a positive int"):
            export_c(net, tinyprop.TinyPropConfig(), tmp_path / "b", flash_bytes=flash)


def test_ram_too_small_names_memory_modes_that_fit_and_they_do(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), tmp_path / "m.pt")
    argv = [str(tmp_path / "m.pt"), "--optimizer", "adam", "--lr", "0.001", "--sram", "64K"]
    assert export_main(argv + ["--out", str(tmp_path / "all")]) == 2
    line = _one_line_error(capsys)
    assert "of the device's" not in line and "but the device has 65,536" in line
    fitting = line.split("These memory modes fit (the most layers trained first): ")[1]
    modes = [part.split(" (")[0].split() for part in fitting.split(". Training")[0].split("; ")]
    assert modes == [["--first-trained-layer", "1"]], modes  # the classifier alone fits
    for number, flags in enumerate(modes):  # each one exports within the 64 KB
        assert export_main(argv + flags + ["--out", str(tmp_path / f"mode{number}")]) == 0
        assert "of the device's 65,536" in capsys.readouterr().out


def test_the_printed_build_command_works_for_a_folder_with_spaces(tmp_path, capsys):
    """`build: make -C my out && my out/train` was printed unquoted: pasted into a shell it
    ran `make -C my` and `my out/train`."""
    torch.save(_mlp(), tmp_path / "mlp.pt")
    out = tmp_path / "my out ü"
    assert export_main([str(tmp_path / "mlp.pt"), "--input-shape", "1,4,4", "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("build: "))
    words = shlex.split(line.removeprefix("build: "))
    assert words == ["make", "-C", str(out), "&&", f"{out}/train", "<", "samples.bin"]


def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


_X, _Y = np.zeros((2, 5), np.float32), np.array([0, 1])


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        # each was exported, and the program stopped at tp_init (status -2) or trained on
        # truncated labels; NaN samples raised 'not enough values to unpack' after writing
        ({"optimizer": lambda: OptimizerSpec("sgd", float("nan"))}, "optimizer lr must be finite"),
        ({"optimizer": lambda: OptimizerSpec("sgd", -0.1)}, "optimizer lr must be finite and in"),
        ({"optimizer": lambda: OptimizerSpec("sgd", 0.1, float("inf"))}, "optimizer momentum"),
        ({"optimizer": lambda: OptimizerSpec("adam", 1e-3, betas=(0.9, 1.0))}, "betas"),
        ({"optimizer": lambda: OptimizerSpec("adam", 1e-3, 0.9)}, "no meaning for Adam"),
        ({"input_shape": (5.0,)}, "input_shape must be one sample's shape"),
        ({"samples": (np.full((2, 5), np.nan, np.float32), _Y)}, "sample 0: value 0 is nan"),
        (
            {"samples": (np.full((2, 5), 1e39), _Y)},
            r"value 0 is 1e\+39, NaN or infinite in float32",
        ),
        ({"samples": (_X, np.array([0.0, 1.5]))}, "sample 1: label 1.5 is not a whole number"),
        ({"samples": (_X, np.array([0, -1]))}, r"sample 1: label -1 lies outside \[0, 3\)"),
        ({"samples": (_X[:0], _Y[:0])}, "with N >= 1"),
        ({"samples": (_X, _Y), "epochs": 0}, "epochs must be a positive int, got 0"),
        ({"ram_bytes": -1}, "ram_bytes must be a positive int"),
    ],
    ids=[
        "lr-nan",
        "lr-negative",
        "momentum-inf",
        "beta-1",
        "adam-momentum",
        "float-shape",
        "nan-sample",
        "float32-overflow",
        "fractional-label",
        "negative-label",
        "no-samples",
        "no-epochs",
        "negative-ram",
    ],  # fmt: skip
)
def test_hostile_export_arguments_are_refused_before_writing(tmp_path, arguments, expected):
    arguments = dict(arguments)
    optimizer = arguments.pop("optimizer", lambda: OptimizerSpec("sgd", 0.1))
    shape = arguments.pop("input_shape", (5,))
    with pytest.raises(ValueError, match=expected):
        export_c(_small_mlp(), tinyprop.TinyPropConfig(), tmp_path / "out", shape, optimizer(),
                 **arguments)  # fmt: skip
    assert not (tmp_path / "out").exists()


def _aliased(kind: str) -> nn.Sequential:
    """A model whose parameters share memory: views of one tensor (a file keeps them so)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    flat = torch.randn(64)
    if kind == "overlapping views":  # layer 2's weight is part of layer 0's
        net[0].weight = nn.Parameter(flat[0:16].view(4, 4))
        net[2].weight = nn.Parameter(flat[4:16].view(3, 4))
    elif kind == "bias inside the weight":
        net[0].weight = nn.Parameter(flat[0:16].view(4, 4))
        net[0].bias = nn.Parameter(flat[12:16])
    elif kind == "overlapping rows":  # 7 places for 16 values
        net[0].weight = nn.Parameter(flat.as_strided((4, 4), (1, 1)))
    elif kind == "expanded":
        net[0].weight = nn.Parameter(flat[:4].expand(4, 4))
    elif kind == "disjoint views":  # one flat buffer, every parameter its own part: fine
        for index, layer in ((0, net[0]), (2, net[2])):
            size = layer.weight.numel()
            start = 0 if index == 0 else 20
            layer.weight = nn.Parameter(flat[start : start + size].view_as(layer.weight))
            layer.bias = nn.Parameter(flat[start + size : start + size + layer.out_features])
    return net


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("overlapping views", "layer '2's weight and layer '0's weight share memory"),
        ("bias inside the weight", "layer '0's bias and layer '0's weight share memory"),
        ("overlapping rows", "layer '0' has a weight of shape (4, 4) whose values overlap"),
        ("expanded", "layer '0' has a weight of shape (4, 4) whose values overlap"),
    ],
)
def test_parameters_sharing_memory_are_refused(tmp_path, capsys, kind, expected):
    """Parameters that are views of one tensor (saved so in the file) train together in
    PyTorch, or cannot train at all (overlapping elements); the exporter wrote each value once
    per parameter, and the device trained them apart, silently."""
    torch.save(_aliased(kind), tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert expected in line and "clone()" in line, line
    assert not (tmp_path / "out").exists()


def test_disjoint_views_of_one_buffer_export_exactly(tmp_path):
    """Parameters placed side by side in one flat buffer (as some training frameworks keep
    them) share no value: exported, each with its own values."""
    net = _aliased("disjoint views")
    layers = export_c(net, tinyprop.TinyPropConfig("full"), tmp_path / "out").layers
    assert np.array_equal(layers[2].weight, net[2].weight.detach().numpy().reshape(-1))
    assert np.array_equal(layers[0].bias, net[0].bias.detach().numpy())


def test_a_forward_replaced_on_the_module_is_refused():
    """``layer.forward = ...`` on one module (a patch, a wrapper library): PyTorch runs it, the
    exporter wrote the plain layer, silently."""
    import types

    from tinyprop.export import UnsupportedLayerError, describe

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net[0].forward = types.MethodType(lambda self, x: 2 * nn.Linear.forward(self, x), net[0])
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' \(Linear\): its forward is rep"):
        export_c(net, tinyprop.TinyPropConfig("full"), "never-written")
    del net[0].forward
    assert describe(net, (4,))[0].module_type == "Linear"


@pytest.mark.parametrize("entry", ["none", "dropout nan", "dropout negative"])
def test_sequential_entries_pytorch_cannot_run_get_one_line(tmp_path, capsys, entry):
    """A file whose nn.Sequential holds None (an AttributeError traceback), or a Dropout whose
    p is NaN or negative (left out as if p were 0; PyTorch refuses to train it)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 3))
    if entry == "none":
        net._modules["1"] = None
    else:
        net[1].p = float("nan") if entry == "dropout nan" else -0.5
    torch.save(net, tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert ("holds NoneType there" if entry == "none" else "the runtime has no dropout") in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit", ["holds itself", "hooks", "no parameters"])
def test_a_module_no_working_model_has_gets_one_line(tmp_path, capsys, edit):
    """A file can build modules PyTorch never would: a Sequential that holds itself (a
    RecursionError traceback), a hook table that is a number, a layer without its parameter
    table (AttributeError tracebacks)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    if edit == "holds itself":
        net._modules["3"] = net
    elif edit == "hooks":
        net[1]._forward_hooks = 5
    else:
        del net[0].__dict__["_parameters"]
    torch.save(net, tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    expected = "holds itself" if edit == "holds itself" else "holds a module export cannot read"
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_out_inside_the_package_or_the_runtime_is_refused(tmp_path):
    """--out inside the installed package (or the C runtime it copies) wrote a Makefile,
    main.c and a header among the library's own files; with --force over them."""
    from tinyprop.export.runtime import runtime_dir

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    package = Path(tinyprop.__file__).resolve().parent
    inside = package / "export" / f"exported-by-a-test-{os.getpid()}"
    try:
        for out in (inside, runtime_dir(), runtime_dir().parent):
            with pytest.raises(ValueError, match="own files") as error:
                export_c(net, tinyprop.TinyPropConfig("full"), out, force=True)
            assert str(out) in str(error.value)
        assert not inside.exists()
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    assert export_c(net, tinyprop.TinyPropConfig("full"), tmp_path / "runtime").files


def test_too_little_ram_names_the_largest_layer_and_buffer(tmp_path, capsys):
    """The refusal named the arena's total alone; now its parts, with the layer that holds
    the most parameters and the largest buffer of one step."""
    features = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    net = nn.Sequential(*features, nn.Linear(16 * 14 * 14, 64), nn.ReLU(), nn.Linear(64, 10))
    torch.save(net, tmp_path / "model.pt")
    argv = [str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--input-shape", "1,28,28"]
    assert export_main(argv + ["--sram", "64K", "--optimizer", "adam"]) == 2
    line = _one_line_error(capsys)
    weights = 4 * (16 * 14 * 14 * 64 + 64)
    assert f"(the largest: layer '4' (Linear), {weights:,})" in line, line
    output = 4 * 16 * 28 * 28
    assert f"(the largest: layer '0' (Conv2d)'s top-k selection scratch, {2 * output:,})" in line
    assert not (tmp_path / "out").exists()
