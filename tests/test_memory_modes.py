"""Memory modes outside the parity runs: the exporter's RAM report equals the C arena, an
exported example with frozen layers and in-place SGD builds and trains under AddressSanitizer
with exactly the advertised arena, the CLI takes the mode, bad modes get clear errors."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest
import torch

import tinyprop
from tinyprop import models
from tinyprop.export import MemoryMode, export_c, fold_batch_norm, footprint
from tinyprop.export.cli import main as export_main
from tinyprop.export.runtime import OptimizerSpec, RuntimeModel
from tinyprop.memory import MODES, TrainingMode, freeze

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
EXAMPLES = {"har": (6, 100), "speech_commands": (1, 49, 10), "mnist": (1, 28, 28)}


@pytest.mark.parametrize("dataset", list(EXAMPLES))
def test_footprint_of_every_named_mode_equals_the_c_arena(dataset):
    shape = EXAMPLES[dataset]
    net = models.build(dataset, input_shape=shape)
    for mode in MODES[dataset]:
        for policy in ("full", "tinypropv2"):
            config = tinyprop.TinyPropConfig(policy)
            optimizer = OptimizerSpec(mode.optimizer, 0.001, mode.momentum)
            report = footprint(net, shape, config, optimizer, mode.memory)
            c_model = RuntimeModel(net, shape, config, optimizer, memory=mode.memory)
            assert report.arena_bytes == c_model.arena_bytes == c_model.totals()[1], mode
            assert report.arena_bytes == (
                report.parameter_bytes
                + report.gradient_bytes
                + report.optimizer_bytes
                + report.transient_bytes
            )
            assert report.weight_flash_bytes == 4 * sum(p.numel() for p in net.parameters())
            assert report.trained_parameters + report.frozen_parameters == sum(
                p.numel() for p in net.parameters()
            )


def test_lean_modes_use_less_ram_than_full_training():
    """The modes the README's table reports: under 64 KB for HAR's classifier-only mode, the
    keyword model's last-two-layer mode far below full training."""
    har, keyword = models.build("har", input_shape=(6, 100)), models.build("speech_commands")
    config = tinyprop.TinyPropConfig("tinypropv2")
    adam = OptimizerSpec("adam", 0.001)
    assert footprint(har, (6, 100), config, adam, MemoryMode(3)).arena_bytes < 20_000
    full = footprint(keyword, (1, 49, 10), config, adam).arena_bytes
    lean = footprint(keyword, (1, 49, 10), config, adam, MemoryMode(8)).arena_bytes
    assert lean < full / 3


def test_exported_example_with_a_mode_trains_under_asan(tmp_path):
    torch.manual_seed(0)
    shape = (6, 40)
    net = models.build("har", input_shape=shape, channels=8)
    config = tinyprop.TinyPropConfig("tinypropv2", skip_threshold=0.9)
    for number, memory in enumerate((
        MemoryMode(2),
        MemoryMode(1, sgd_in_place=True),
        MemoryMode(1, bias_only_layers=(2,)),
        MemoryMode(1, bias_only_layers=(1, 2), momentum_in_place=True, selection_in_place=True),
        MemoryMode(0, bias_only_layers=(1,), adam_in_place=True, moment_bits=8,
                   recompute_layers=(2, 3), selection_in_place=True),
    )):  # fmt: skip
        out = tmp_path / f"har-{number}"
        momentum = 0.9 if memory.momentum_in_place else 0.0
        adam = memory.adam_in_place
        optimizer = OptimizerSpec("adam", 0.01) if adam else OptimizerSpec("sgd", 0.05, momentum)
        result = export_c(net, config, out, shape, optimizer, 4, memory=memory)
        header = (out / "tinyprop_model.h").read_text()
        fields = (
            f"{memory.first_trained_layer}, {int(memory.sgd_in_place)}, "
            f"0x{memory.bias_only_bits:X}u, {int(memory.momentum_in_place)}, "
            f"{int(memory.selection_in_place)}, {int(adam)}, {memory.moment_bits}, "
            f"0x{memory.recompute_bits:X}u}};"
        )
        assert fields in header
        assert f"#define TP_MODEL_ARENA_BYTES {result.arena_bytes}" in header
        generator = np.random.default_rng(1)
        x = generator.standard_normal((12, *shape)).astype(np.float32)
        y = np.arange(12) % 4
        with open(tmp_path / "samples.bin", "wb") as handle:
            for sample, label in zip(x, y, strict=True):
                handle.write(sample.tobytes() + np.int32(label).tobytes())
        program = out / "train"
        build = subprocess.run(
            ["gcc", "-std=c99", "-O1", "-g", *SANITIZE, "-Wall", "-Werror",
             "-I", str(out / "runtime/include"), "-I", str(out), str(out / "main.c"),
             *map(str, (out / "runtime/src").glob("*.c")), "-lm", "-o", str(program)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr
        with open(tmp_path / "samples.bin", "rb") as stdin:
            run = subprocess.run([str(program)], stdin=stdin, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"training arena {result.arena_bytes} bytes" in run.stdout
        assert run.stdout.splitlines()[-1] == "done"


def test_cli_takes_the_mode_and_reports_ram_and_flash(tmp_path, capsys):
    net = models.build("har", input_shape=(6, 100))
    torch.save(net.state_dict(), tmp_path / "har.pt")
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out"), "--optimizer", "adam",
                          "--first-trained-layer", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0, printed
    expected = footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("adam", 0.01),
                         MemoryMode(3))  # fmt: skip
    assert f"training arena {expected.arena_bytes} bytes" in printed
    assert f"flash: weights {expected.weight_flash_bytes} bytes" in printed
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out2"), "--optimizer", "adam",
                          "--sgd-in-place"])  # fmt: skip
    assert status == 2
    assert "sgd_in_place needs plain SGD" in capsys.readouterr().err
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out3"), "--optimizer", "adam",
                          "--bias-only-layers", "1", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0, printed
    expected = footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("adam", 0.01),
                         MemoryMode(0, bias_only_layers=(1, 2)))  # fmt: skip
    assert f"training arena {expected.arena_bytes} bytes" in printed
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out4"), "--optimizer", "sgd", "--momentum", "0.9",
                          "--momentum-in-place", "--selection-in-place"])  # fmt: skip
    lean = footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("sgd", 0.01, 0.9),
                     MemoryMode(0, momentum_in_place=True, selection_in_place=True))  # fmt: skip
    assert status == 0
    assert f"training arena {lean.arena_bytes} bytes" in capsys.readouterr().out
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out5"), "--optimizer", "adam",
                          "--momentum-in-place"])  # fmt: skip
    assert status == 2
    assert "momentum_in_place needs SGD with momentum" in capsys.readouterr().err
    assert "0x6u, 0, 0, 0, 32, 0x0u};" in (tmp_path / "out3" / "tinyprop_model.h").read_text()
    status = export_main([str(tmp_path / "har.pt"), "--model", "har", "--out",
                          str(tmp_path / "out6"), "--optimizer", "adam", "--bias-only-layers", "1",
                          "--adam-in-place", "--moment-bits", "8", "--recompute-layers", "2",
                          "3"])  # fmt: skip
    lean = footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("adam", 0.01),
                     MemoryMode(0, bias_only_layers=(1,), adam_in_place=True, moment_bits=8,
                                recompute_layers=(2, 3)))  # fmt: skip
    assert status == 0
    assert f"training arena {lean.arena_bytes} bytes" in capsys.readouterr().out
    assert "0x2u, 0, 0, 1, 8, 0xCu};" in (tmp_path / "out6" / "tinyprop_model.h").read_text()


def test_bad_modes_are_named():
    net = models.build("har", input_shape=(6, 100))
    with pytest.raises(ValueError, match=r"first_trained_layer must lie in \[0, 4\)"):
        footprint(net, (6, 100), tinyprop.TinyPropConfig(), mode=MemoryMode(4))
    with pytest.raises(ValueError, match=r"first_trained_layer must lie in \[0, 4\)"):
        freeze(net, MemoryMode(7))
    with pytest.raises(ValueError, match="first_trained_layer must be >= 0"):
        MemoryMode(-1)
    with pytest.raises(ValueError, match="sgd_in_place needs plain SGD"):
        TrainingMode("x", MemoryMode(0, True), optimizer="adam")
    with pytest.raises(ValueError, match="bias_only_layers must lie at or after first_trained"):
        MemoryMode(2, bias_only_layers=(1,))
    with pytest.raises(ValueError, match="bias_only_layers do not work with sgd_in_place"):
        MemoryMode(0, True, bias_only_layers=(1,))
    with pytest.raises(ValueError, match=r"bias_only_layers must lie in \[0, 4\)"):
        footprint(net, (6, 100), tinyprop.TinyPropConfig(), mode=MemoryMode(0, False, (4,)))
    with pytest.raises(ValueError, match="selection_in_place does not work with sgd_in_place"):
        MemoryMode(0, True, selection_in_place=True)
    with pytest.raises(ValueError, match="momentum_in_place and sgd_in_place exclude"):
        MemoryMode(0, True, momentum_in_place=True)
    with pytest.raises(ValueError, match="adam_in_place and moment_bits 8 need Adam"):
        TrainingMode("x", MemoryMode(0, moment_bits=8), optimizer="sgd")
    with pytest.raises(ValueError, match="adam_in_place excludes"):
        MemoryMode(0, adam_in_place=True, momentum_in_place=True)
    with pytest.raises(TypeError, match="recompute_layers must hold ints"):
        MemoryMode(0, recompute_layers=(1.5,))
    with pytest.raises(ValueError, match=r"recompute_layers must lie in \[0, 4\)"):
        footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("adam", 0.01),
                  MemoryMode(0, recompute_layers=(4,)))  # fmt: skip
    with pytest.raises(ValueError, match="momentum_in_place needs SGD with momentum"):
        footprint(net, (6, 100), tinyprop.TinyPropConfig(), OptimizerSpec("sgd", 0.1, 0.9,
                  nesterov=True), MemoryMode(momentum_in_place=True))  # fmt: skip
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(600, 8),
                               torch.nn.Linear(8, 4, bias=False))  # fmt: skip
    with pytest.raises(ValueError, match="layer 1 has no bias to train"):
        footprint(bare, (6, 100), tinyprop.TinyPropConfig(), mode=MemoryMode(0, False, (1,)))


def test_bias_only_layers_freeze_the_weights_only():
    net = models.build("speech_commands")
    freeze(net, MemoryMode(0, bias_only_layers=(1, 2)))
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ["2.weight", "4.weight"]


def test_freeze_stops_gradients_of_the_first_layers():
    net = models.build("har", input_shape=(6, 100))
    assert freeze(net, MemoryMode(2)) == ["0", "3"]
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["6.weight", "6.bias", "10.weight", "10.bias"]


def frozen_mlp():
    """An MLP fine-tuned on its last layers: the first frozen, the second's weight frozen."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip
    net[0].requires_grad_(False)
    net[2].weight.requires_grad_(False)
    return net


def test_layers_frozen_in_pytorch_stay_frozen_in_the_runtime(tmp_path):
    """A model whose first layers are frozen (``requires_grad=False``: last-layers fine-tuning)
    was exported, and run by RuntimeModel, with every layer trained: the C program trained
    the weights the PyTorch run keeps fixed, silently. Without a memory mode the frozen
    parameters now give it (first_trained_layer 1, layer 1 bias-only): C trains what
    tinyprop.train_step trains, to float32 rounding."""
    net = frozen_mlp()
    config = tinyprop.TinyPropConfig("topk", ratio=0.5)
    optimizer = OptimizerSpec("sgd", 0.1)
    c_model = RuntimeModel(net, (6,), config, optimizer)
    assert c_model.memory_mode == MemoryMode(1, bias_only_layers=(1,))
    python_model = tinyprop.apply(copy.deepcopy(net), config)
    python_optimizer = torch.optim.SGD(
        [p for p in python_model.parameters() if p.requires_grad], lr=0.1
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = (
            torch.randn(8, 6, generator=generator),
            torch.randint(0, 3, (8,), generator=generator),
        )
        c_model.train_batch(x.numpy(), y.numpy())
        tinyprop.train_step(python_model, x, y, torch.nn.CrossEntropyLoss(reduction="none"),
                            python_optimizer)  # fmt: skip
    c_weights, initial = c_model.parameters(), net.state_dict()
    for name, value in tinyprop.remove(python_model).state_dict().items():
        np.testing.assert_allclose(c_weights[name], value.numpy().ravel(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)  # fmt: skip
    for name in ("0.weight", "0.bias", "2.weight"):  # kept fixed; the others trained
        assert np.array_equal(c_weights[name], initial[name].numpy().ravel()), name
    assert not np.array_equal(c_weights["2.bias"], initial["2.bias"].numpy())
    result = export_c(net, config, tmp_path / "out", optimizer=optimizer)
    assert result.memory.frozen_parameters == 6 * 16 + 16 + 16 * 16
    assert result.memory == footprint(net, (6,), config, optimizer)


def test_a_mode_that_trains_a_frozen_parameter_is_refused(tmp_path):
    net, config = frozen_mlp(), tinyprop.TinyPropConfig("tinypropv2")
    refusal = r"weight and bias of layer '0'.*froze its weight and bias.*first_trained_layer=1, "
    with pytest.raises(ValueError, match=refusal + r"bias_only_layers=\(1,\)"):
        export_c(net, config, tmp_path / "out", memory=MemoryMode())
    with pytest.raises(ValueError, match=r"layer '2' .*froze its weight.*--bias-only-layers 1"):
        export_c(net, config, tmp_path / "out", memory=MemoryMode(1))
    assert not (tmp_path / "out").exists()
    assert export_c(net, config, tmp_path / "out", memory=MemoryMode(2)).memory.trained_parameters
    middle = frozen_mlp().requires_grad_(True)
    middle[2].requires_grad_(False)  # a frozen layer between trained ones
    with pytest.raises(ValueError, match="layer '2' .*frozen after a trained layer"):
        footprint(middle, (6,), config)
    middle[2].weight.requires_grad_(True)  # its weight trains, its bias does not
    with pytest.raises(ValueError, match="layer '2' .*trains its weight but not its bias"):
        footprint(middle, (6,), config)
    with pytest.raises(ValueError, match="every Linear/Conv layer of the model is frozen"):
        footprint(frozen_mlp().requires_grad_(False), (6,), config)


def test_a_frozen_layer_and_norm_stay_frozen_after_folding():
    """fold_batch_norm gave the folded bias requires_grad=True whatever the layer and the
    BatchNorm had: a frozen Conv + BatchNorm became a layer training its bias alone, and the
    export trained it. Now the folded bias trains only when the layer's bias or the norm's
    affine parameters do."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(24, 3),
    ).eval()  # fmt: skip
    net[0].requires_grad_(False)
    config = tinyprop.TinyPropConfig("tinypropv2")
    # the norm trains: the folded bias trains alone (4), beside the Linear (24 · 3 + 3)
    assert footprint(fold_batch_norm(net), (2, 8), config).trained_parameters == 4 + 24 * 3 + 3
    net[1].requires_grad_(False)  # the norm frozen too: the folded layer trains nothing
    assert footprint(fold_batch_norm(net), (2, 8), config) == footprint(
        fold_batch_norm(net), (2, 8), config, mode=MemoryMode(1)
    )
    assert not any(p.requires_grad for p in fold_batch_norm(net)[0].parameters())
