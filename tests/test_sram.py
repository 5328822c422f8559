"""The SRAM figures of tinyprop.export.sram are what the exported example takes on a Cortex-M4:
its data + bss besides the arena and the sample buffer, and its deepest stack read from the
machine code, for a few layer counts (they grow with -DTP_MAX_LAYERS); and a model exported for
exactly its estimate runs under QEMU with its stack at the top of that SRAM, training to the
host build's weights, its measured stack and heap within the estimate. A change to the runtime,
the example or the toolchain that moves a figure fails here."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop.export import OptimizerSpec, UnsupportedLayerError, export_c, fold_batch_norm, sram
from tinyprop.export.flash import flash_estimate
from tinyprop.export.runtime import runtime_dir
from tinyprop.memory import MemoryMode

ROOT = Path(__file__).resolve().parents[1]
M4 = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
QEMU = ["qemu-system-arm", "-machine", "mps2-an386", "-nographic", "-semihosting", "-kernel"]
needs_arm = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc"
)
needs_qemu = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason="needs arm-none-eabi-gcc and qemu-system-arm",
)


def stack_usage():
    """benchmarks/stack_usage.py as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("stack_usage", ROOT / "benchmarks/stack_usage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_usage"] = module
    spec.loader.exec_module(module)
    return module


def mlp(hidden: int) -> nn.Sequential:
    """An MLP of 2 x hidden + 3 runtime layers."""
    torch.manual_seed(0)
    middle = [module for _ in range(hidden) for module in (nn.Linear(6, 6), nn.ReLU())]
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), *middle, nn.Linear(6, 3))


def build_m4(out: Path, layer_count: int, name: str, *extra: str) -> Path:
    """The exported example built for the Cortex-M4 as benchmarks/cortex_m4.py builds it."""
    cortex = runtime_dir() / "examples" / "cortex_m4"
    sources = [str(out / "main.c"), *map(str, sorted((out / "runtime/src").glob("*.c")))]
    elf = out / f"{name}.elf"
    subprocess.run(
        ["arm-none-eabi-gcc", "-std=c99", "-O2", f"-DTP_MAX_LAYERS={layer_count}",
         "-I", str(out / "runtime/include"), "-I", str(out), *M4, "--specs=rdimon.specs",
         *sources, str(cortex / "startup.c"), "-T", str(cortex / "an386.ld"), *extra, "-lm",
         "-o", str(elf)],
        check=True,
    )  # fmt: skip
    return elf


@needs_arm
@pytest.mark.parametrize("hidden", [1, 20])  # 5 and 43 runtime layers: printf or init deepest
def test_the_estimate_is_the_cortex_m4_build(tmp_path, hidden):
    config = tinyprop.TinyPropConfig("tinypropv2")
    result = export_c(mlp(hidden), config, tmp_path, (5,), OptimizerSpec("adam", 1e-3), 4)
    layers = len(result.layers)
    elf = build_m4(tmp_path, layers, "train")
    size = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    assert 0 <= result.flash.total_bytes - (text + data) <= 2048  # tinyprop.export.flash
    program_data = data + bss - result.arena_bytes - result.sample_bytes
    estimate = result.sram
    assert estimate.arena_bytes == result.arena_bytes and estimate.sample_bytes == 20
    assert 0 <= estimate.program_data_bytes - program_data <= 8  # alignment of .bss
    bound = stack_usage().program_bound(elf)
    assert estimate.stack_bytes == sram.stack_bytes(layers)
    # 8 bytes over: main's frame is 8 bytes larger with built-in samples, which counts
    assert estimate.stack_bytes - bound["bytes"] == 8, bound["chain"]
    deepest = "printf" if hidden == 1 else "tp_init_mode_checked"
    assert bound["chain"][:3] == ["main", *(["end_batch", "printf"] if hidden == 1 else
                                            [deepest, "plan_model.part.0"])]  # fmt: skip
    # only newlib's stdio calls through pointers (its own frames are counted)
    assert {"_vfprintf_r", "__sflush_r"} <= set(bound["left_out"])
    assert not [name for name in bound["left_out"] if name.startswith("tp_")]


@needs_qemu
@pytest.mark.parametrize("hidden", [1, 20])
def test_a_model_exported_for_its_estimate_runs_in_that_sram(tmp_path, hidden):
    """Exported with ram_bytes = its estimate, built with its stack at the top of that much
    SRAM (stack_paint.c): it trains to the weights of the run with QEMU's own stack, and the
    painted stack and the heap stay within the estimate's parts."""
    net = mlp(hidden)
    generator = np.random.default_rng(0)
    x = generator.standard_normal((12, 5)).astype(np.float32)
    y = np.arange(12) % 3
    config = tinyprop.TinyPropConfig("tinypropv2")
    optimizer = OptimizerSpec("adam", 1e-2)
    first = export_c(net, config, tmp_path / "probe", (5,), optimizer, 4, (x, y), 2)
    budget = first.sram.total_bytes
    result = export_c(net, config, tmp_path / "m", (5,), optimizer, 4, (x, y), 2, ram_bytes=budget)
    with pytest.raises(ValueError, match="bytes of SRAM"):
        export_c(net, config, tmp_path / "n", (5,), optimizer, 4, (x, y), 2, ram_bytes=budget - 1)
    layers = len(result.layers)
    flags = ["-DTP_EMBEDDED_SAMPLES", "-DTP_PRINT_PARAMETERS"]
    paint = str(runtime_dir() / "examples/cortex_m4/stack_paint.c")
    outputs = {}
    for sram_bytes in (None, budget & ~7):
        extra = [*flags, paint, "-Wl,--wrap=main"]
        if sram_bytes is not None:
            extra.append(f"-DTP_SRAM_BYTES={sram_bytes}")
        elf = build_m4(result.out_dir, layers, f"train{sram_bytes}", *extra)
        run = subprocess.run([*QEMU, str(elf)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "\ndone\n" in run.stdout, run.stdout[-500:]
        outputs[sram_bytes] = run.stdout
    memory = [
        line.split() for line in outputs[budget & ~7].splitlines() if line.startswith("memory")
    ]
    assert memory[0][-1] == "fits", memory
    stack, heap = int(memory[0][2]), int(memory[0][4])
    assert stack <= result.sram.stack_bytes and heap <= result.sram.heap_bytes
    weights = [
        [line for line in out.splitlines() if line.startswith("p ")] for out in outputs.values()
    ]
    assert weights[0] == weights[1] and len(weights[0]) == result.parameters


EXAMPLE_SAMPLES = {"har-cnn1d": 16, "keyword-ds-cnn": 8, "mnist-mlp": 16}  # cortex_m4.py's


def test_the_estimate_covers_every_cortex_m4_record():
    """Every example build of benchmarks/results/runtime_cortex_m4.json (three models, every
    device mode, full and tinypropv2) needs at most the estimate of its model and arena: data +
    bss + the heap measured + the larger of the measured and the bound stack. (The builds hold
    their samples in flash, so the estimate's sample buffer and stdin buffer are slack.) Their
    flash, samples included, is within 2 KiB under the flash estimate."""
    from tinyprop import models
    from tinyprop.export import describe

    records = json.loads((ROOT / "benchmarks/results/runtime_cortex_m4.json").read_text())
    datasets = {"har-cnn1d": "har", "keyword-ds-cnn": "speech_commands", "mnist-mlp": "mnist"}
    for record in records:
        dataset = datasets[record["model"]]
        shape = models.reference(dataset).input_shape
        layers = describe(models.build(dataset, input_shape=shape), shape)
        memory = record["measured_memory"]
        stack = max(memory["stack_bytes"], record["stack_bound"]["program_bytes"])
        needed = record["ram_bytes"] + memory["heap_bytes"] + stack
        estimate = sram.sram_estimate(
            len(layers), record["training_arena_bytes"], 4 * math.prod(shape)
        )
        assert needed <= estimate.total_bytes, (record["model"], record["mode"], record["policy"])
        assert stack <= estimate.stack_bytes
        assert record["ram_bytes"] - record["training_arena_bytes"] <= estimate.program_data_bytes
        count = EXAMPLE_SAMPLES[record["model"]]  # built in: count inputs and labels
        flash = flash_estimate(
            record["parameters"], len(layers), 4 * count * (math.prod(shape) + 1)
        )
        assert 0 <= flash.total_bytes - record["flash_bytes"] <= 2048, record["mode"]


def smooth_cnn() -> nn.Sequential:
    """A MobileNetV3 / EfficientNet-style CNN with every activation that keeps its input."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Hardswish(), nn.MaxPool2d(2),  # (4, 4, 4)
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.SiLU(), nn.Conv2d(4, 6, 1), nn.GELU(),
        nn.Flatten(), nn.Linear(96, 12), nn.Mish(), nn.Linear(12, 8),
        nn.GELU(approximate="tanh"), nn.Linear(8, 6), nn.Hardsigmoid(), nn.Linear(6, 3),
    )  # fmt: skip


@needs_qemu
def test_smooth_activations_train_on_the_cortex_m4_as_on_the_host_within_the_estimate(tmp_path):
    """SiLU, GELU (both forms), Hardswish, Hardsigmoid and Mish with newlib's expf, erff,
    log1pf and tanhf: exported for its SRAM estimate, run under QEMU with the stack at the top
    of that SRAM, the weights after training match the host build's (glibc) within 1e-5
    relative, and the painted stack and the heap stay within the estimate's parts."""
    generator = np.random.default_rng(0)
    x = (2.0 * generator.standard_normal((12, 1, 8, 8))).astype(np.float32)
    y = np.arange(12) % 3
    config = tinyprop.TinyPropConfig("tinypropv2", skip_threshold=0.3)
    optimizer = OptimizerSpec("adam", 1e-2)
    probe = export_c(smooth_cnn(), config, tmp_path / "probe", (1, 8, 8), optimizer, 4, (x, y), 2)
    budget = probe.sram.total_bytes
    result = export_c(smooth_cnn(), config, tmp_path / "m", (1, 8, 8), optimizer, 4, (x, y), 2,
                      ram_bytes=budget)  # fmt: skip
    layers = len(result.layers)
    flags = ["-DTP_EMBEDDED_SAMPLES", "-DTP_PRINT_PARAMETERS"]
    paint = str(runtime_dir() / "examples/cortex_m4/stack_paint.c")
    elf = build_m4(result.out_dir, layers, "train", *flags, paint, "-Wl,--wrap=main",
                   f"-DTP_SRAM_BYTES={budget & ~7}")  # fmt: skip
    device = subprocess.run([*QEMU, str(elf)], capture_output=True, text=True, timeout=300)
    assert device.returncode == 0 and "\ndone\n" in device.stdout, device.stdout[-500:]
    memory = [line.split() for line in device.stdout.splitlines() if line.startswith("memory")]
    assert memory[0][-1] == "fits", memory
    assert int(memory[0][2]) <= result.sram.stack_bytes
    assert int(memory[0][4]) <= result.sram.heap_bytes
    host = result.out_dir / "train_host"
    sources = [str(result.out_dir / "main.c"),
               *map(str, sorted((result.out_dir / "runtime/src").glob("*.c")))]  # fmt: skip
    subprocess.run(["gcc", "-std=c99", "-O2", *flags, f"-DTP_MAX_LAYERS={layers}", "-I",
                    str(result.out_dir / "runtime/include"), "-I", str(result.out_dir),
                    *sources, "-lm", "-o", str(host)], check=True)  # fmt: skip
    on_host = subprocess.run([str(host)], capture_output=True, text=True, timeout=300)
    assert on_host.returncode == 0, on_host.stdout[-500:]

    def weights(output: str) -> np.ndarray:
        bits = [int(line.split()[2], 16) for line in output.splitlines() if line.startswith("p ")]
        return np.array(bits, dtype=np.uint32).view(np.float32)

    expected, got = weights(on_host.stdout), weights(device.stdout)
    assert len(got) == len(expected) == result.parameters
    assert not np.array_equal(expected, result_initial_weights(smooth_cnn()))  # it trained
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    trained = [line for line in device.stdout.splitlines() if "trained" in line]
    assert trained and trained == [
        line for line in on_host.stdout.splitlines() if "trained" in line
    ]


def result_initial_weights(net: nn.Module) -> np.ndarray:
    """The model's weights in the runtime's order (layer by layer, weight then bias)."""
    return np.concatenate([p.detach().numpy().reshape(-1) for p in net.parameters()])


def conv1d_har() -> nn.Sequential:
    """A user's HAR model (9 sensor channels x 128 steps, BatchNorm1d after each conv)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(9, 16, 5), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 24, 5, padding=2), nn.BatchNorm1d(24), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(24 * 31, 6),
    )  # fmt: skip


def separable_cnn() -> nn.Sequential:
    """A depthwise-separable CNN on 32 x 32 images, BatchNorm2d after each conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )  # fmt: skip


def odd_mlp() -> nn.Sequential:
    """An MLP of odd widths (37 -> 53 -> 29 -> 7)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 29), nn.Tanh(), nn.Linear(29, 7)
    )


USER_MODELS = {  # name -> (model, one sample's shape, classes)
    "conv1d-har": (conv1d_har, (9, 128), 6),
    "separable-cnn": (separable_cnn, (1, 32, 32), 10),
    "odd-mlp": (odd_mlp, (37,), 7),
}


@needs_qemu
@pytest.mark.parametrize(
    ("name", "kib"),
    [("odd-mlp", 64), ("conv1d-har", 64), ("separable-cnn", 128), ("separable-cnn", 256)],
)  # fmt: skip
def test_user_models_run_in_the_sram_of_a_real_part_or_are_refused_with_a_mode_that_does(
    tmp_path, name, kib
):
    """Models the exporter was not written for, their BatchNorms trained and then folded (left
    in, a refusal naming the layer and the fold), for parts of 64, 128 and 256 KiB of SRAM.
    Where the estimate is over the part, the export refuses before writing, with the figures and
    the memory modes that fit; exported in the first of them (else as it is), the program built
    with its stack at the top of that SRAM runs under QEMU without overflow, its painted stack
    and its heap within the estimate, and trains to the host build's weights."""
    build, shape, classes = USER_MODELS[name]
    model = build()
    with torch.no_grad():  # running statistics that are not the defaults, then eval mode
        for _ in range(3):
            model(torch.randn(16, *shape))
    model.eval()
    generator = np.random.default_rng(0)
    x = generator.standard_normal((8, *shape)).astype(np.float32)
    y = np.arange(8) % classes
    config = tinyprop.TinyPropConfig("tinypropv2")
    optimizer = OptimizerSpec("adam", 1e-3)
    ram = kib * 1024
    if name != "odd-mlp":
        with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm.d\).*fold_batch_norm"):
            export_c(model, config, tmp_path / "unfolded", shape, optimizer, 4, (x, y))
        model = fold_batch_norm(model)
    as_it_is = export_c(model, config, tmp_path / "probe", shape, optimizer, 4, (x, y))
    mode = None
    if as_it_is.sram.total_bytes > ram:
        with pytest.raises(ValueError) as refusal:
            export_c(model, config, tmp_path / "over", shape, optimizer, 4, (x, y), ram_bytes=ram)
        assert not (tmp_path / "over").exists()
        message = str(refusal.value)
        assert f"needs {as_it_is.sram.total_bytes:,} bytes of SRAM" in message
        assert f"the device has {ram:,}; nothing was written" in message
        fitting = sram.fitting_modes(
            as_it_is.layers, config, optimizer, MemoryMode(), ram, as_it_is.sample_bytes
        )
        assert fitting, message
        mode, estimate = fitting[0]
        assert f"{sram.mode_flags(mode)} ({estimate.total_bytes:,} bytes)" in message
    result = export_c(model, config, tmp_path / "m", shape, optimizer, 4, (x, y), 2,
                      memory=mode, ram_bytes=ram)  # fmt: skip
    assert result.sram.total_bytes <= ram
    layers = len(result.layers)
    flags = ["-DTP_EMBEDDED_SAMPLES", "-DTP_PRINT_PARAMETERS"]
    paint = str(runtime_dir() / "examples/cortex_m4/stack_paint.c")
    elf = build_m4(result.out_dir, layers, "train", *flags, paint, "-Wl,--wrap=main",
                   f"-DTP_SRAM_BYTES={ram}")  # fmt: skip
    device = subprocess.run([*QEMU, str(elf)], capture_output=True, text=True, timeout=300)
    assert device.returncode == 0 and "\ndone\n" in device.stdout, device.stdout[-500:]
    memory = [line.split() for line in device.stdout.splitlines() if line.startswith("memory")]
    assert memory[0][-3:] == ["sram", str(ram), "fits"], memory
    size = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    assert 0 <= result.flash.total_bytes - (text + data) <= 2048
    stack, heap = int(memory[0][2]), int(memory[0][4])
    assert stack <= result.sram.stack_bytes
    assert data + bss + heap + stack <= result.sram.total_bytes
    expected = host_weights(result.out_dir, layers, flags)
    got = weights_printed(device.stdout)
    assert len(got) == len(expected) == result.memory.trained_parameters
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def weights_printed(output: str) -> np.ndarray:
    """The trained weights the example prints (``p INDEX HEX``, float32 bit patterns)."""
    bits = [int(line.split()[2], 16) for line in output.splitlines() if line.startswith("p ")]
    return np.array(bits, dtype=np.uint32).view(np.float32)


def host_weights(out_dir: Path, layers: int, flags: list[str]) -> np.ndarray:
    """The weights the exported example trains to when built and run on the host."""
    sources = [str(out_dir / "main.c"), *map(str, sorted((out_dir / "runtime/src").glob("*.c")))]
    host = out_dir / "train_host"
    subprocess.run(["gcc", "-std=c99", "-O2", *flags, f"-DTP_MAX_LAYERS={layers}", "-I",
                    str(out_dir / "runtime/include"), "-I", str(out_dir), *sources, "-lm",
                    "-o", str(host)], check=True)  # fmt: skip
    run = subprocess.run([str(host)], capture_output=True, text=True, timeout=300, check=True)
    return weights_printed(run.stdout)
