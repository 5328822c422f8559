"""The exporter: exact weights in the header, an example that builds and trains like Python
(under AddressSanitizer with an arena of exactly the advertised size), clear errors, the CLI."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import models
from tinyprop.export import UnsupportedLayerError, describe, export_c
from tinyprop.export.c_source import float_literal
from tinyprop.export.cli import main as export_main
from tinyprop.export.runtime import OptimizerSpec

# float-cast-overflow (undefined behaviour) is not part of -fsanitize=undefined
SANITIZE = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]


def test_float_literals_are_exact():
    values = np.array(
        [0.1, -1.5e-30, 3.4e38, 1e-45, -0.0, 0.0, 1.0, np.pi, -7.25e-8], dtype=np.float32
    )
    for value in values:
        literal = float_literal(value)
        assert literal.endswith("f")
        parsed = np.float32(float.fromhex(literal[:-1]))
        assert parsed.tobytes() == value.tobytes(), (value, literal)


def write_samples(path, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as handle:
        for sample, label in zip(x, y, strict=True):
            handle.write(np.ascontiguousarray(sample, dtype=np.float32).tobytes())
            handle.write(np.int32(label).tobytes())


def test_exported_example_trains_like_python_under_asan(tmp_path):
    torch.manual_seed(0)
    shape = (6, 40)
    net = models.build("har", input_shape=shape, channels=8)
    config = tinyprop.TinyPropConfig("tinypropv2", skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=0.05, momentum=0.9)
    batch_size, count = 4, 22  # the last batch has 2 samples
    result = export_c(net, config, tmp_path / "har", shape, optimizer, batch_size)
    generator = np.random.default_rng(1)
    prototypes = generator.standard_normal((4, *shape)).astype(np.float32)
    y = generator.integers(0, 4, count)
    x = (2 * prototypes[y] + 0.7 * generator.standard_normal((count, *shape))).astype(np.float32)
    write_samples(tmp_path / "samples.bin", x, y)
    program = tmp_path / "train"
    build = subprocess.run(
        ["gcc", "-std=c99", "-O1", "-g", *SANITIZE, "-DTP_PRINT_PARAMETERS", "-Wall", "-Werror",
         "-I", str(result.out_dir / "runtime/include"), "-I", str(result.out_dir),
         str(result.out_dir / "main.c"), *map(str, (result.out_dir / "runtime/src").glob("*.c")),
         "-lm", "-o", str(program)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    with open(tmp_path / "samples.bin", "rb") as stdin:
        run = subprocess.run([str(program)], stdin=stdin, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "done"

    python_model = tinyprop.apply(copy.deepcopy(net), config)
    python_optimizer = torch.optim.SGD(python_model.parameters(), lr=0.05, momentum=0.9)
    ledger, skipped = tinyprop.Ledger(), 0
    for start in range(0, count, batch_size):
        stats = tinyprop.train_step(
            python_model,
            torch.from_numpy(x[start : start + batch_size]),
            torch.from_numpy(y[start : start + batch_size]),
            nn.CrossEntropyLoss(reduction="none"),
            python_optimizer,
        )
        ledger += stats.macs
        skipped += stats.skipped
    batch_lines = [line.split() for line in lines if line.startswith("batch ")]
    assert len(batch_lines) == 6
    assert sum(int(line[7]) for line in batch_lines) == skipped
    macs_line = next(line for line in lines if line.startswith("macs "))
    assert macs_line.split()[2::2] == [str(v) for v in (
        ledger.forward, ledger.backward, ledger.backward_dense, ledger.selection)]  # fmt: skip
    bits = [int(line.split()[2], 16) for line in lines if line.startswith("p ")]
    c_weights = np.array(bits, dtype=np.uint32).view(np.float32)
    python_weights = torch.cat([p.detach().reshape(-1) for p in python_model.parameters()])
    assert c_weights.size == result.parameters == python_weights.numel()
    np.testing.assert_allclose(c_weights, python_weights.numpy(), rtol=1e-5, atol=1e-6)
    assert f"training arena {result.arena_bytes} bytes" in lines[0]
    # a file cut inside its last record (or written for another input size) is named, not
    # trained on without that record
    data = (tmp_path / "samples.bin").read_bytes()
    cut = subprocess.run([str(program)], input=data[:-3], capture_output=True)
    assert cut.returncode == 1
    assert b"ends inside record 21 (961 of its 964 bytes: 240 float32" in cut.stdout


def test_unsupported_layers_are_named_with_their_path():
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(Softsign\)"):
        describe(nn.Sequential(nn.Linear(4, 4), nn.Softsign(), nn.Linear(4, 2)), (4,))
    nested = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), nn.Flatten(), nn.Linear(8, 2)
    )
    with pytest.raises(UnsupportedLayerError, match=r"'0\.1' \(BatchNorm2d\)"):
        describe(nested, (1, 4, 4))

    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedLayerError, match=r"'<root>' \(Custom\)"):
        describe(Custom(), (4,))
    with pytest.raises(UnsupportedLayerError, match="Dropout.*p=0.5"):
        describe(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)), (4,))
    with pytest.raises(UnsupportedLayerError, match="ceil_mode"):  # a partial last window
        describe(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                               nn.Linear(4, 2)), (1, 5, 5))  # fmt: skip
    with pytest.raises(UnsupportedLayerError, match="put a Flatten"):
        describe(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(2, 2)), (2, 4))
    with pytest.raises(ValueError, match=r"'0' \(Linear\) expects 4 inputs .* gives 3"):
        describe(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)), (3,))


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class HalvedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) / 2


class ClampedReLU(nn.ReLU):
    def forward(self, x):
        return x.clamp(0, 6)


def test_layers_computing_something_else_than_their_class_are_refused():
    """A residual nn.Sequential subclass, a Linear or ReLU subclass with its own forward, and a
    layer with a forward hook were exported as the plain layers: a C program computing another
    function than the model, silently. A tinyprop-applied model still exports."""
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 3)
    cases = {
        r"'1' \(Residual\): a subclass of Sequential with its own forward": nn.Sequential(
            nn.Linear(4, 4), Residual(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)
        ),
        r"'2' \(HalvedLinear\): a subclass of Linear": nn.Sequential(
            nn.Linear(4, 4), nn.ReLU(), HalvedLinear(4, 2)
        ),
        r"'1' \(ClampedReLU\)": nn.Sequential(nn.Linear(4, 4), ClampedReLU(), nn.Linear(4, 2)),
        r"'1' \(ReLU\): it has forward hooks": hooked,
        r"'0' \(LazyLinear\): its weights are not drawn yet": nn.Sequential(
            nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)
        ),
    }
    for message, model in cases.items():
        with pytest.raises(UnsupportedLayerError, match=message):
            describe(model, (4,))
    applied = tinyprop.apply(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(8, 2)))  # fmt: skip
    assert [layer.kind for layer in describe(applied, (1, 4, 4))] == [1, 2, 5, 0]


def test_describe_shapes_of_reference_models():
    for name, shape in (("har", (6, 100)), ("speech_commands", (1, 49, 10))):
        net = models.build(name, input_shape=shape)
        layers = describe(net, shape)
        with torch.no_grad():
            output = net(torch.zeros(1, *shape))
        assert layers[-1].output_size == output.shape[1]
        trainable = [layer for layer in layers if layer.trainable]
        assert sum(x.weight.size + x.bias.size for x in trainable) == sum(
            p.numel() for p in net.parameters()
        )


def test_export_rejects_randomk_and_bad_samples(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="randomk"):
        export_c(net, tinyprop.TinyPropConfig("randomk"), tmp_path)
    with pytest.raises(ValueError, match=r"sample 1: label 3 lies outside \[0, 3\)"):
        export_c(net, tinyprop.TinyPropConfig(), tmp_path,
                 samples=(np.zeros((2, 4)), np.array([0, 3])))  # fmt: skip
    with pytest.raises(ValueError, match="input shape"):
        export_c(nn.Sequential(nn.Conv2d(1, 2, 3)), tinyprop.TinyPropConfig(), tmp_path)


# settings the runtime would run as another algorithm -> what the refusal names
OTHER_ALGORITHMS = {
    "skip_zero_entries": ({"policy": "topk", "skip_zero_entries": True}, "skip_zero_entries=False"),
    "unified": ({"policy": "topk", "unified": True}, "unified=False"),
    "dense_output_layer": ({"dense_output_layer": True}, "dense_output_layer=False"),
    "dense_small_layers": ({"dense_small_layers": True}, "dense_small_layers=False"),
    "mean_over_trained": ({"mean_over_trained": True}, "mean_over_trained=False"),
    "running_max_per_batch": ({"running_max_per_batch": True}, "running_max_per_batch=False"),
    "budget": ({"policy": "topk", "budget": 0.3}, "without budget"),
    "selective_backprop": ({"policy": "selective_backprop"}, "no selective_backprop"),
    "randomk": ({"policy": "randomk"}, "no randomk policy"),
}


@pytest.mark.parametrize("name", list(OTHER_ALGORITHMS))
def test_settings_the_runtime_cannot_run_are_refused_by_export_and_runtime_model(tmp_path, name):
    """export_c and RuntimeModel (the parity tests' and benchmarks' C model) refuse alike,
    nothing written: skip_zero_entries caps k at the non-zero entries of δ, which the runtime
    does not (the same weights, other k and MACs); it was exported silently."""
    from tinyprop.export.runtime import RuntimeModel

    fields, message = OTHER_ALGORITHMS[name]
    config = tinyprop.TinyPropConfig(**fields)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=message):
        export_c(net, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=message):
        RuntimeModel(net, (4,), config, OptimizerSpec())


def test_cli_exports_a_module_and_a_state_dict(tmp_path, capsys):
    net = models.build("har")
    torch.save(net, tmp_path / "har.pt")
    torch.save(net.state_dict(), tmp_path / "har_state.pt")
    status = export_main([str(tmp_path / "har.pt"), "--config", "meprop", "--input-shape",
                          "6,100", "--out", str(tmp_path / "m")])  # fmt: skip
    assert status == 2 and "dense_output_layer=False" in capsys.readouterr().err
    status = export_main([str(tmp_path / "har.pt"), "--config", '{"policy": "topk"}',
                          "--input-shape", "6,100", "--out", str(tmp_path / "a")])  # fmt: skip
    assert status == 0
    header = (tmp_path / "a" / "tinyprop_model.h").read_text()
    assert "TP_POLICY_TOPK" in header and "#define TP_MODEL_INPUT_SIZE 600" in header
    status = export_main([str(tmp_path / "har_state.pt"), "--model", "har", "--config",
                          '{"policy": "tinypropv2", "skip_threshold": 0.3}', "--optimizer",
                          "adam", "--lr", "0.001", "--out", str(tmp_path / "b")])  # fmt: skip
    assert status == 0
    header = (tmp_path / "b" / "tinyprop_model.h").read_text()
    assert "TP_OPTIMIZER_ADAM" in header and "0.3};  /* skip_threshold */" in header
    assert export_main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c")]) == 2
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.Softsign()), tmp_path / "softsign.pt")
    assert export_main([str(tmp_path / "softsign.pt"), "--out", str(tmp_path / "d")]) == 2
    assert "'1' (Softsign)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "har.pt"), "--config", "nonsense", "--out", str(tmp_path)])
