"""``tinyprop export MODEL.pt --config POLICY --out DIR``: C sources for the runtime.

MODEL.pt is either a whole pickled ``nn.Sequential`` of plain ``torch.nn`` layers
(``torch.save(model)``) or a ``state_dict`` together with ``--model DATASET`` (the dataset's
reference model from :mod:`tinyprop.models`). Either is loaded with PyTorch's restricted
unpickler (:mod:`tinyprop.export.loading`): nothing in the file is ever run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from torch import nn

from tinyprop import cli_types
from tinyprop.config import PRESETS, TinyPropConfig
from tinyprop.export import export_c
from tinyprop.export.folding import fold_batch_norm
from tinyprop.export.graph import UnsupportedLayerError
from tinyprop.export.loading import load_model_file, state_dict_mismatch
from tinyprop.export.runtime import OptimizerSpec
from tinyprop.memory import MemoryMode


def _shape(text: str) -> tuple[int, ...]:
    try:
        parts = text.strip().rstrip(",").replace("x", ",").split(",")
        shape = tuple(int(part) for part in parts)
    except ValueError:  # also an empty part: "1,,28" is not (1, 28)
        raise argparse.ArgumentTypeError(
            f"--input-shape must look like 1,28,28, got {text!r}"
        ) from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _config(text: str) -> TinyPropConfig:
    """A preset or policy name, a JSON file of TinyPropConfig fields, or inline JSON."""
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            f"--config must be a preset ({', '.join(PRESETS)}), a JSON file or inline JSON; "
            f"got {text!r}"
        ) from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError("--config JSON must be an object of TinyPropConfig fields")
    try:
        return TinyPropConfig(**fields)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"--config: {error}") from error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyprop export", description="Write C sources that train MODEL.pt on a device."
    )
    p.add_argument("model_file", metavar="MODEL.pt", help="torch.save'd nn.Module or state_dict")
    p.add_argument(
        "--config",
        type=_config,
        default=PRESETS["tinypropv2"],
        help="preset name, JSON file or inline JSON (default: tinypropv2)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite files in --out that an earlier export did not write (e.g. your Makefile)",
    )
    p.add_argument("--model", help="dataset whose reference model MODEL.pt's state_dict is for")
    p.add_argument(
        "--state-dict-key",
        metavar="KEY",
        help="with --model: MODEL.pt is a training checkpoint whose entry KEY holds the "
        "state_dict (e.g. state_dict)",
    )
    p.add_argument("--input-shape", type=_shape, help="one sample's shape, e.g. 1,28,28")
    p.add_argument(
        "--optimizer", choices=("sgd", "adam"), default="sgd", help="the device's optimizer"
    )
    p.add_argument(
        "--lr", type=cli_types.positive_float, default=0.01, help="learning rate (default 0.01)"
    )
    p.add_argument(
        "--momentum",
        type=cli_types.non_negative_float,
        default=0.0,
        help="SGD momentum (0: plain SGD)",
    )
    p.add_argument(
        "--weight-decay",
        type=cli_types.non_negative_float,
        default=0.0,
        help="L2 weight decay, as torch.optim's",
    )
    p.add_argument(
        "--batch-size",
        type=cli_types.positive_int,
        default=8,
        help="samples per weight update on the device (default 8; it holds one at a time)",
    )
    p.add_argument(
        "--first-trained-layer",
        type=cli_types.non_negative_int,
        default=0,
        help="dense/conv layers before this index (from 0) are frozen, weights in flash",
    )
    p.add_argument(
        "--sgd-in-place",
        action="store_true",
        help="every sample its own plain-SGD step, applied in place (no gradient buffer)",
    )
    p.add_argument(
        "--bias-only-layers",
        type=cli_types.non_negative_int,
        nargs="+",
        default=[],
        metavar="INDEX",
        help="dense/conv layers (from 0) that train their bias only, weights in flash",
    )
    p.add_argument(
        "--ram",
        "--sram",
        dest="ram",
        type=cli_types.byte_count,
        metavar="BYTES",
        help="the device's SRAM in bytes, or as its datasheet gives it (256K, 256KiB, 1M: "
        "powers of 1024): refuse (nothing written) when the example program needs more on a "
        "Cortex-M4 (arena, one sample, program data, heap, stack), naming the memory modes "
        "that fit",
    )
    p.add_argument(
        "--flash",
        type=cli_types.byte_count,
        metavar="BYTES",
        help="the device's flash in bytes, or as its datasheet gives it (512K, 1M): refuse "
        "(nothing written) when the example program needs more on a Cortex-M4 (code, "
        "weights), naming the layer with the most weights",
    )
    p.add_argument(
        "--momentum-in-place",
        action="store_true",
        help="SGD momentum gathers the batch's gradient in its buffer (no gradient buffer)",
    )
    p.add_argument(
        "--selection-in-place",
        action="store_true",
        help="sparse policies choose top-k in the error itself (no selection scratch)",
    )
    p.add_argument(
        "--adam-in-place",
        action="store_true",
        help="every sample its own Adam step, each layer's applied after its backward "
        "(no gradient buffer)",
    )
    p.add_argument(
        "--moment-bits",
        type=int,
        choices=(32, 8),
        default=32,
        help="Adam's moments in 32-bit floats or 8-bit codes with a scale per 64 entries",
    )
    p.add_argument(
        "--recompute-layers",
        type=cli_types.non_negative_int,
        nargs="+",
        default=[],
        metavar="INDEX",
        help="dense/conv layers (from 0) whose input is computed again for their backward "
        "instead of kept",
    )
    p.add_argument(
        "--fold-batch-norm",
        action="store_true",
        help="fold each BatchNorm into the Linear/conv before it (running statistics, as in "
        "eval mode); the device then trains the folded layers",
    )
    return p


def _load(args) -> tuple[nn.Module, tuple[int, ...] | None]:
    loaded = load_model_file(args.model_file)  # never runs code from the file
    if args.state_dict_key is not None and not args.model:
        raise ValueError("--state-dict-key needs --model DATASET (the model the weights are for)")
    if args.model:
        from tinyprop import models

        reference = models.reference(args.model)
        shape = args.input_shape or reference.input_shape
        model = models.build(args.model, input_shape=shape)
        if args.state_dict_key is not None:
            if not isinstance(loaded, dict) or args.state_dict_key not in loaded:
                entries = ", ".join(map(repr, list(loaded)[:8])) if isinstance(loaded, dict) else ""
                raise ValueError(
                    f"{args.model_file} has no entry {args.state_dict_key!r}"
                    + (f" (it has {entries})" if entries else "")
                )
            loaded = loaded[args.state_dict_key]
        problem = state_dict_mismatch(model, loaded, args.model_file, args.model)
        if problem is not None:
            raise ValueError(problem)
        model.load_state_dict(loaded)
        return model, shape
    if not isinstance(loaded, nn.Module):
        raise ValueError(
            f"{args.model_file} holds a {type(loaded).__name__}, not an nn.Module; for a "
            "state_dict pass --model DATASET (e.g. --model har)"
        )
    return loaded, args.input_shape


def main(argv: list[str] | None = None) -> int:
    """Run the export command; returns the exit status."""
    args = parser().parse_args(argv)
    args.model_file = Path(args.model_file)
    if args.out.exists() and not args.out.is_dir():
        print(f"tinyprop export: --out {args.out} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        model, shape = _load(args)
        if args.fold_batch_norm:
            model = fold_batch_norm(model, shape)
        optimizer = OptimizerSpec(
            args.optimizer, args.lr, args.momentum, weight_decay=args.weight_decay
        )
        result = export_c(
            model,
            args.config,
            args.out,
            shape,
            optimizer,
            args.batch_size,
            model_name=str(args.model_file),
            force=args.force,
            memory=MemoryMode(
                args.first_trained_layer,
                args.sgd_in_place,
                tuple(args.bias_only_layers),
                args.momentum_in_place,
                args.selection_in_place,
                args.adam_in_place,
                args.moment_bits,
                tuple(args.recompute_layers),
            ),
            ram_bytes=args.ram,
            flash_bytes=args.flash,
        )
    except (UnsupportedLayerError, ValueError, OSError, TypeError) as error:
        print(f"tinyprop export: {error}", file=sys.stderr)
        return 2
    except (AttributeError, LookupError, RecursionError) as error:  # a module built by a file
        print(
            f"tinyprop export: {args.model_file} holds a module export cannot read "
            f"({type(error).__name__}: {str(error)[:160]}), not one torch.save wrote from a "
            "working model; save the model again from PyTorch",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {len(result.files)} files to {result.out_dir}")
    print(
        f"parameters {result.parameters}, training arena {result.arena_bytes} bytes, "
        f"inference {result.inference_bytes} bytes"
    )
    report = result.memory
    print(
        f"arena: trained parameters {report.parameter_bytes}, gradients {report.gradient_bytes}, "
        f"optimizer {report.optimizer_bytes}, one step's buffers {report.transient_bytes}; "
        f"flash: weights {report.weight_flash_bytes} bytes "
        f"({report.frozen_parameters} of {report.frozen_parameters + report.trained_parameters} "
        "parameters frozen) plus the program's code"
    )
    sram = result.sram
    print(
        f"SRAM on a Cortex-M4 (the example as built by arm-none-eabi-gcc -O2 with newlib): "
        f"{sram.total_bytes:,} bytes ({sram.describe()})"
        + (f", of the device's {args.ram:,}" if args.ram is not None else "")
    )
    flash = result.flash
    print(
        f"flash on a Cortex-M4: {flash.total_bytes:,} bytes ({flash.describe()})"
        + (f", of the device's {args.flash:,}" if args.flash is not None else "")
    )
    folder = shlex.quote(str(result.out_dir))  # a path with spaces, pasted into a shell
    program = shlex.quote(f"{result.out_dir}/train")
    print(f"build: make -C {folder} && {program} < samples.bin")
    return 0
