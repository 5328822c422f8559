"""The native convolution backward of two versions of ``kernels.c``, call for call in one process.

As ``benchmarks/linear_kernel_ab.py`` does for the Linear kernel: builds ``kernels.c`` at a git
revision and as it is in the working tree, loads both, and runs their
``tp_conv_backward_planes_f32`` on the kept entries of every convolution with more than one
input channel per group (the pointwise ones of the MobileNet-style CNN; with ``--kind
depthwise``, ``tp_plane_conv_backward_f32`` on those with one input channel per group) of a
training step of one of ``benchmarks/speed.py``'s models under ``topk`` 0.05, alternately
(which goes first alternates too), the caches flushed before each round as a step's forward
would leave them. ``--relu-mask`` runs the ReLU-fused variants instead (the input gradient
masked by x, a ReLU's output), as the MobileNet-style blocks call them.
It prints, per version, the least and the median time of a round (every such layer once) and
the median of the paired ratios new / old, and whether both give the same gradients bit for bit.
One thread is timed in process time, more threads in wall time.

Run:
    python benchmarks/conv_kernel_ab.py --old main --threads 2
    python benchmarks/conv_kernel_ab.py --old HEAD~1 --threads 1 --kind depthwise
    python benchmarks/conv_kernel_ab.py --old main --threads 1 --kind depthwise --relu-mask
"""

from __future__ import annotations

import argparse
import ctypes
import functools

import torch
from kernel_ab import compare_rounds, summary
from layer_kernels import captured_calls
from speed import MODELS

from tinyprop import native


def kernel_inputs(call: tuple, threads: int, gradients: str) -> dict:
    """The arguments ``ConvPatches.native_gradients`` passes the kernel (channels-last ones for
    a convolution with more than one input channel per group), for the ``gradients`` the layer
    needs among "input", "weight" or "both"."""
    geometry, x, weight, rows, flat, keep, needs_input, needs_weight = call
    needs_input = needs_input and gradients != "weight"
    needs_weight = needs_weight and gradients != "input"
    _, column, value = native.topk(flat, keep, with_rows=False)  # (M,) each, ascending per row
    row_start = torch.zeros(x.shape[0] + 1, dtype=torch.long)  # (B + 1,) CSR
    row_start[rows + 1] = keep
    row_start = row_start.cumsum(0)
    if geometry.one_channel_per_group:  # the input as it is, (B, C_in, H, W)
        return {
            "x": x.contiguous(),
            "weight": weight.reshape(geometry.channels_out, -1).contiguous(),  # (C_out, kh kw)
            "shape": torch.tensor((x.shape[0], *geometry.plane_shape), dtype=torch.long),
            "kept": (row_start, column, value),
            "grad_weight": torch.empty(weight.numel()) if needs_weight else None,
            "grad_input": torch.empty(x.numel()) if needs_input else None,
        }
    padded = native.channels_last(x, geometry.pads)  # (B, Hp, Wp, C_in)
    kernel = weight.reshape(geometry.channels_out, geometry.channels_per_group, *weight.shape[2:])
    shape = (x.shape[0], *geometry.native_shape)
    return {
        "x": padded,
        "weight": kernel.permute(0, 2, 3, 1).contiguous(),  # (C_out, kh, kw, C_in / G)
        "shape": torch.tensor(shape, dtype=torch.long),
        "pads": torch.tensor(geometry.pads, dtype=torch.long),
        "kept": (row_start, column, value),
        "grad_weight": torch.empty(weight.numel()) if needs_weight else None,
        "grad_input": torch.empty(x.numel()) if needs_input else None,  # (B, C_in, H, W)
        "scratch": torch.empty(threads * padded[0].numel()),
    }


def run(library: ctypes.CDLL, inputs: dict, threads: int, relu_mask: bool = False) -> None:
    """One call of the kernel on ``inputs``; ``relu_mask``: its ReLU-fused variant, the input
    gradient masked by x (as the MobileNet-style blocks call it, x being a ReLU's output)."""
    pointer = ctypes.c_void_p
    outputs = [inputs["grad_weight"], inputs["grad_input"]]
    mask = (ctypes.c_int64(1),) if relu_mask else ()
    if "pads" not in inputs:  # one input channel per group
        function = library.tp_plane_conv_backward_f32
        if relu_mask:
            function = library.tp_plane_conv_backward_relu_f32
        status = function(
            pointer(inputs["x"].data_ptr()), pointer(inputs["weight"].data_ptr()),
            pointer(inputs["shape"].data_ptr()), *(pointer(t.data_ptr()) for t in inputs["kept"]),
            *(pointer(None if t is None else t.data_ptr()) for t in outputs),
            ctypes.c_int64(threads), *mask,
        )  # fmt: skip
        assert status == 0, status
        return
    function = library.tp_conv_backward_planes_f32
    if relu_mask:
        function = library.tp_conv_backward_planes_relu_f32
    status = function(
        pointer(inputs["x"].data_ptr()), pointer(inputs["weight"].data_ptr()),
        pointer(inputs["shape"].data_ptr()), pointer(inputs["pads"].data_ptr()),
        *(pointer(t.data_ptr()) for t in inputs["kept"]),
        *(pointer(None if t is None else t.data_ptr()) for t in outputs),
        pointer(inputs["scratch"].data_ptr()), ctypes.c_int64(threads), *mask,
    )  # fmt: skip
    assert status == 0, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="main", help="git revision of the old kernels.c")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=list(MODELS), default="MobileNet-style CNN")
    parser.add_argument("--rounds", type=int, default=100, help="rounds of each version")
    parser.add_argument("--gradients", choices=["input", "weight", "both"], default="both")
    parser.add_argument(
        "--kind", choices=["pointwise", "depthwise"], default="pointwise",
        help="the convolutions timed: more than one input channel per group, or one",
    )  # fmt: skip
    parser.add_argument(
        "--relu-mask", action="store_true",
        help="the ReLU-fused kernels (input gradient masked by x), as the MobileNet-style "
        "blocks run them",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls, _ = captured_calls(args.model)
    layers = [
        kernel_inputs(call, args.threads, args.gradients)
        for call in calls
        if call[0].__class__.__name__ == "ConvPatches"
        and call[0].one_channel_per_group == (args.kind == "depthwise")
    ]
    gradients = [inputs[key] for inputs in layers for key in ("grad_weight", "grad_input")]
    same, times = compare_rounds(  # same: the same gradients bit for bit
        args.old,
        functools.partial(run, relu_mask=args.relu_mask),
        layers,
        args.threads,
        args.rounds,
        lambda: gradients,
    )
    heading = (
        f"{args.model}: {len(layers)} {args.kind} convolution(s), {args.gradients} "
        f"gradient(s){', ReLU-masked' if args.relu_mask else ''}, "
        f"{args.threads} thread(s), {args.rounds} rounds each (ms per round):"
    )
    summary(heading, times, args.old, same, "rounds")


if __name__ == "__main__":
    main()
