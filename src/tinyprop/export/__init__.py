"""Export a PyTorch model to the C runtime: a header with shapes and initial weights, an example
``main.c`` that trains on samples fed to it, and a copy of the runtime sources.

Example:
    >>> from tinyprop.export import export_c
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> result = export_c(net, TinyPropConfig("tinypropv2"), "out/", input_shape=(1, 4, 4))
    >>> result.arena_bytes          # RAM training needs, besides the program's own
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from tinyprop.config import TinyPropConfig
from tinyprop.export import ownership
from tinyprop.export.c_source import makefile, model_header, samples_header
from tinyprop.export.flash import FlashEstimate, flash_estimate
from tinyprop.export.folding import fold_batch_norm
from tinyprop.export.footprint import MemoryReport, footprint, footprint_of_layers
from tinyprop.export.frozen import mode_of_frozen_layers
from tinyprop.export.graph import (
    INT32_MAX,
    LayerSpec,
    UnsupportedLayerError,
    describe,
    inference_bytes,
)
from tinyprop.export.runtime import OptimizerSpec, check_config, runtime_dir
from tinyprop.export.sram import (
    SramEstimate,
    fitting_modes,
    largest_parts,
    mode_flags,
    sram_estimate,
)
from tinyprop.memory import MemoryMode

MAX_BATCH_SIZE = 1 << 24  # tp_batch_begin's and tp_train_batch's limit

__all__ = [
    "ExportResult",
    "FlashEstimate",
    "LayerSpec",
    "MemoryMode",
    "MemoryReport",
    "OptimizerSpec",
    "SramEstimate",
    "UnsupportedLayerError",
    "describe",
    "export_c",
    "fold_batch_norm",
    "footprint",
]


@dataclass
class ExportResult:
    """What :func:`export_c` wrote and the memory the model needs."""

    out_dir: Path
    files: list[Path]
    layers: list[LayerSpec]
    parameters: int
    arena_bytes: int  # training RAM (tp_arena_bytes_mode)
    inference_bytes: int  # inference RAM with the weights in flash
    memory: MemoryReport | None = None  # the arena's parts and the weights' flash
    sample_bytes: int = 0  # the example's buffer of one sample (it streams the samples)
    sram: SramEstimate | None = None  # the example's SRAM on a Cortex-M4 (export.sram)
    flash: FlashEstimate | None = None  # the example's flash on a Cortex-M4 (export.flash)

    @property
    def batch_bytes(self) -> int:
        """The example's input buffer: one sample since it streams them (the old name)."""
        return self.sample_bytes


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape when the first layer tells it (a Linear, or Flatten + Linear)."""
    if not any(True for _ in model.parameters()):
        raise ValueError("the model has no layers with weights; nothing to export or train")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            break
    raise ValueError(
        "cannot infer the input shape of a convolutional model; pass input_shape, e.g. "
        "(1, 28, 28) (--input-shape 1,28,28 on the command line)"
    )


def planned_files(samples: bool) -> list[str]:
    """The files :func:`export_c` writes, relative to its output folder."""
    names = ["tinyprop_model.h", "main.c", "Makefile"] + (["tinyprop_samples.h"] if samples else [])
    source = runtime_dir()
    for sub in ("include", "src"):
        names += [f"runtime/{sub}/{path.name}" for path in sorted((source / sub).iterdir())
                  if path.suffix in (".c", ".h")]  # fmt: skip
    return names


def export_c(
    model: nn.Module,
    config: TinyPropConfig,
    out_dir: str | Path,
    input_shape: tuple[int, ...] | None = None,
    optimizer: OptimizerSpec | None = None,
    batch_size: int = 8,
    samples: tuple[np.ndarray, np.ndarray] | None = None,
    epochs: int = 1,
    model_name: str = "a PyTorch model",
    force: bool = False,
    memory: MemoryMode | None = None,
    ram_bytes: int | None = None,
    flash_bytes: int | None = None,
) -> ExportResult:
    """Write C sources that train ``model`` with ``config`` in the C runtime.

    Files: ``tinyprop_model.h`` (shapes, exact float32 initial weights, policy, optimizer,
    arena size), ``main.c`` (a copy of ``runtime/examples/train_example.c``: trains on samples
    from stdin, or built-in ones), ``Makefile``,
    ``runtime/`` (the runtime's sources) and, when ``samples`` is given, ``tinyprop_samples.h``.

    Args:
        model: an ``nn.Sequential`` of Linear, Conv1d, Conv2d (incl. depthwise), ReLU,
            ReLU6, LeakyReLU, Sigmoid, Tanh, Max/AvgPool 1d/2d, adaptive pools whose windows
            come out even, Flatten (tinyprop-applied or plain); fold BatchNorm first
            (:func:`fold_batch_norm`).
        config: the policy (``full``, ``topk``, ``tinyprop``, ``tinypropv2``).
        out_dir: folder to write (created).
        input_shape: one sample's shape; inferred for MLPs.
        optimizer: SGD or Adam settings; SGD with lr 0.01 when omitted.
        batch_size: samples per update in the example.
        samples: optional ``(x, y)`` to build into the example (``-DTP_EMBEDDED_SAMPLES``).
        epochs: passes over the built-in samples.
        model_name: text for the header comment (escaped).
        force: overwrite files in ``out_dir`` that an earlier export did not write.
        memory: the memory mode (frozen first layers, in-place SGD); when omitted, the mode
            that trains what the model trains (``requires_grad``: leading frozen layers before
            ``first_trained_layer``, a frozen weight beside a trained bias in
            ``bias_only_layers``; every layer when nothing is frozen). A mode that trains a
            parameter the model froze is a ValueError naming the layer.
        ram_bytes: the device's SRAM: a ValueError, before anything is written, when the
            example program needs more on a Cortex-M4 (:mod:`tinyprop.export.sram`: the
            training arena, one sample's buffer, the program's data, heap and stack; the
            batch size does not change it), naming the memory modes that would fit.
        flash_bytes: the device's flash: a ValueError, before anything is written, when the
            example program needs more on a Cortex-M4 (:mod:`tinyprop.export.flash`: code,
            the initial weights, the built-in ``samples``), naming the largest layer.

    Returns:
        :class:`ExportResult`.

    Raises:
        UnsupportedLayerError: naming the type and path of a layer the runtime cannot run.
        FileExistsError: ``out_dir`` holds files export would overwrite and did not write.
    """
    check_config(config)  # the settings the runtime runs as the library does
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    optimizer = optimizer or OptimizerSpec()
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    layers = describe(model, shape)
    # the layers the model froze, or its optimizer leaves out
    memory = mode_of_frozen_layers(model, layers, memory, optimizer.parameters)
    report = footprint_of_layers(layers, config, optimizer, memory)  # checks the mode
    if batch_size > MAX_BATCH_SIZE:
        raise ValueError(
            f"batch_size {batch_size} is beyond the C runtime's largest batch "
            f"({MAX_BATCH_SIZE:,}, tp_batch_begin), within its int32 sizes; lower --batch-size"
        )
    sample_bytes = math.prod(shape) * 4  # the example's buffer of one sample
    for what, size in (("training arena", report.arena_bytes), ("sample buffer", sample_bytes)):
        if size > INT32_MAX:
            raise ValueError(
                f"the {what} would need {size} bytes, beyond the C runtime's int32 sizes; "
                "lower --input-shape"
            )
    if samples is not None:
        x, y = checked_samples(samples, layers, epochs)
    ram_bytes, flash_bytes = (
        byte_count(name, value)
        for name, value in (("ram_bytes", ram_bytes), ("flash_bytes", flash_bytes))
    )
    sram = sram_estimate(len(layers), report.arena_bytes, sample_bytes)
    if ram_bytes is not None and sram.total_bytes > ram_bytes:
        raise ValueError(too_little_ram(layers, config, optimizer, memory, ram_bytes, sram))
    parameters = sum(
        layer.weight.size + (0 if layer.bias is None else layer.bias.size)
        for layer in layers
        if layer.trainable
    )
    flash = flash_estimate(parameters, len(layers), 0 if samples is None else 4 * (x.size + y.size))
    if flash_bytes is not None and flash.total_bytes > flash_bytes:
        raise ValueError(too_little_flash(layers, flash_bytes, flash))
    out = Path(out_dir)
    ownership.refuse_package_folders(out, Path(__file__).resolve().parents[1], runtime_dir())
    out.mkdir(parents=True, exist_ok=True)
    ownership.refuse_foreign_files(out, planned_files(samples is not None), force)
    files = []

    def write(name: str, text: str) -> None:
        path = out / name
        path.write_text(text)
        files.append(path)

    write(
        "tinyprop_model.h",
        model_header(layers, config, optimizer, batch_size, model_name, memory),
    )
    source = runtime_dir()
    write("main.c", (source / "examples" / "train_example.c").read_text())
    write("Makefile", makefile(len(layers)))
    if samples is not None:
        write("tinyprop_samples.h", samples_header(x, y, epochs))
    for sub in ("include", "src"):
        target = out / "runtime" / sub
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((source / sub).iterdir()):
            if path.suffix in (".c", ".h"):
                shutil.copy(path, target / path.name)
                files.append(target / path.name)
    ownership.record_written(out, files)
    return ExportResult(
        out_dir=out,
        files=files,
        layers=layers,
        parameters=parameters,
        arena_bytes=report.arena_bytes,
        inference_bytes=inference_bytes(layers),
        memory=report,
        sample_bytes=sample_bytes,
        sram=sram,
        flash=flash,
    )


def checked_samples(
    samples: tuple[np.ndarray, np.ndarray], layers: list[LayerSpec], epochs: int
) -> tuple[np.ndarray, np.ndarray]:
    """The built-in samples as float32 inputs (N, F) and int labels (N,), or a ValueError
    naming what is wrong: shapes, a value that is NaN or infinite in float32, a label that is
    not a whole number or lies outside the classes, epochs below 1."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    x, y = (np.asarray(v) for v in samples)
    features = int(np.prod(layers[0].input_shape))
    if y.ndim != 1 or len(y) < 1 or x.shape[0] != len(y) or x[0].size != features:
        raise ValueError(
            f"samples must be (x (N, {features} values each), y (N,)) with N >= 1, got "
            f"{x.shape} and {y.shape}"
        )
    if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
        raise ValueError(f"sample inputs must be real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        inputs = x.astype(np.float32).reshape(len(y), -1)  # (N, F)
    bad = np.argwhere(~np.isfinite(inputs))
    if len(bad):
        sample, value = (int(i) for i in bad[0])
        given = float(x.reshape(len(y), -1)[sample, value])
        raise ValueError(
            f"sample {sample}: value {value} is {given}, NaN or infinite in float32 "
            f"({len(bad)} such values); the runtime refuses such a sample"
        )
    if not np.issubdtype(y.dtype, np.number) or np.iscomplexobj(y):
        raise ValueError(f"sample labels must be whole numbers, got dtype {y.dtype}")
    whole = np.isfinite(y) & (np.floor(y) == y) if np.issubdtype(y.dtype, np.floating) else None
    if whole is not None and not whole.all():
        index = int(np.argmin(whole))
        raise ValueError(f"sample {index}: label {y[index].item()} is not a whole number")
    classes = layers[-1].output_size
    outside = np.flatnonzero((y < 0) | (y >= classes))
    if len(outside):
        index = int(outside[0])
        raise ValueError(f"sample {index}: label {y[index].item()} lies outside [0, {classes})")
    return inputs, y.astype(np.int64)


def byte_count(name: str, value) -> int | None:
    """``value`` as a positive int (a NumPy integer too), None as None, else a ValueError."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be a positive int (bytes), got {value!r}")
    return int(value)


def too_little_flash(layers: list[LayerSpec], flash_bytes: int, flash: FlashEstimate) -> str:
    """The refusal when the example needs more flash than ``flash_bytes``: the parts, the layer
    with the most weights, and what lowers the figure."""
    sizes = [(x.weight.size + (0 if x.bias is None else x.bias.size), i)
             for i, x in enumerate(layers) if x.trainable]  # fmt: skip
    count, index = max(sizes)
    layer = layers[index]
    samples = (
        f"; leaving the samples out of the program (read them at run time) saves "
        f"{flash.sample_bytes:,}"
        if flash.sample_bytes
        else ""
    )
    return (
        f"the example program needs {flash.total_bytes:,} bytes of flash on a Cortex-M4 "
        f"({flash.describe()}) but the device has {flash_bytes:,}; nothing was written. The "
        f"layer with the most weights: '{layer.path}' ({layer.module_type}), {4 * count:,} "
        f"bytes; a smaller model lowers it{samples}, or choose a part with more flash"
    )


def too_little_ram(
    layers: list[LayerSpec],
    config: TinyPropConfig,
    optimizer: OptimizerSpec,
    memory: MemoryMode,
    ram_bytes: int,
    sram: SramEstimate,
) -> str:
    """The refusal when the example needs more SRAM than ``ram_bytes``: the parts, and the
    memory modes that would fit, or what else lowers the figure."""
    fitting = fitting_modes(layers, config, optimizer, memory, ram_bytes, sram.sample_bytes)
    if fitting:
        advice = "these memory modes fit (the most layers trained first): " + "; ".join(
            f"{mode_flags(mode)} ({estimate.total_bytes:,} bytes)" for mode, estimate in fitting
        )
    else:
        advice = (
            "no memory mode of this optimizer fits, not even training the last layer alone "
            "(--first-trained-layer); give a smaller model or input, or a part with more RAM"
        )
    return (
        f"the example program needs {sram.total_bytes:,} bytes of SRAM on a Cortex-M4 "
        f"({sram.describe()}) but the device has {ram_bytes:,}; nothing was written. "
        f"{largest_parts(layers, config, optimizer, memory)}. "
        f"{advice[0].upper()}{advice[1:]}. Training some layers' bias only "
        "(--bias-only-layers) and recomputing inputs (--recompute-layers) lower it too"
    )
