"""The sparse backward of a Linear / Conv1d / Conv2d layer (meProp with per-sample k).

Forward is the layer's ordinary dense forward. Backward, per trained sample: keep the k entries
of the output gradient δ chosen by the policy and compute the weight and input gradients from
the kept entries only, k · fan_in multiply-accumulates each: with the native kernels
(tinyprop.native) on the CPU in float32, else by gathering the input patches of the kept
positions and multiplying with PyTorch's CSR kernels. The bias gradient is dense (from the full
δ), as in the authors' code. When many entries are kept, dense kernels on the masked δ are
faster (see the *_DENSE_KERNEL_DENSITY limits below).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tinyprop import native
from tinyprop.patches import LinearPatches, take

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Above these fractions of kept entries (in one layer and step), the kept entries are multiplied
# with PyTorch's dense kernels (GEMM / convolution backward on the masked δ) instead of the
# sparse ones, which are slower there. Crossovers measured on one thread at batch 128 (the
# native kernels run on one thread, so their limits are divided by torch's thread count):
# - native Linear kernel: about 0.6 (2048x2048);
# - native convolution kernel: 0.1 (16->32 channels, 3x3) to 0.2 (64->64); with a fan-in
#   below 64 (a first layer on one channel, a depthwise conv) its per-tap overhead loses to
#   oneDNN's dense backward at any density, so those layers keep the dense kernels;
# - PyTorch's sparse CSR products (no native kernels, float64, Linear on (B, *, in)): about
#   0.15 for a 2048x2048 Linear, below 0.05 for 3x3 convolutions.
# The result is the same up to float rounding, and the ledger counts k · fan_in either way.
NATIVE_DENSE_KERNEL_DENSITY = 0.5  # Linear layers, native kernel, per torch thread
NATIVE_CONV_DENSE_KERNEL_DENSITY = 0.1  # Conv1d / Conv2d layers, native kernel, per thread
NATIVE_CONV_MIN_FAN_IN = 64  # C_in / G · kh · kw; smaller convolutions keep the dense kernels
DENSE_KERNEL_DENSITY = 0.15  # Linear layers, PyTorch sparse kernels
CONV_DENSE_KERNEL_DENSITY = 0.02  # Conv1d / Conv2d layers, PyTorch sparse kernels


def sparse_rows(
    row: Tensor, column: Tensor, value: Tensor, shape: tuple[int, int], grouped: bool = False
) -> Tensor:
    """A CSR matrix of the given shape from (row, column, value) triplets (unique pairs).

    ``grouped`` says the triplets already come in non-decreasing row order (columns inside a
    row may be in any order), which saves the sort.
    """
    if not grouped:
        order = torch.argsort(row, stable=True)
        column, value = column[order], value[order]
    counts = torch.bincount(row, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=row.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, column, value, shape, check_invariants=False)


class SparseBackprop(torch.autograd.Function):
    """y = layer(x); backward keeps k output gradients per sample (see module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer, call) -> Tensor:
        ctx.layer, ctx.call = layer, call
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return layer.dense_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        geometry = ctx.call.geometry  # computed once, in the forward

        rows = layer.tinyprop_state.trained_rows(x.shape[0], x.device)  # (B',)
        delta = take(geometry.delta_matrix(grad_output), rows)  # (B', C_out, P)
        flat = delta.reshape(rows.numel(), -1)  # (B', N)
        keep = layer.keep_count(flat)  # (B',)
        ctx.call.keep = keep
        ctx.call.computes_input_grad = bool(needs_input)
        grad_bias = delta.sum((0, 2)) if ctx.has_bias and needs_bias else None  # (C_out,), dense
        if not (needs_input or needs_weight):
            return None, None, grad_bias, None, None
        if layer.keeps_everything:  # a dense output layer: no selection
            ctx.call.selected = False
            grad_input, grad_weight = geometry.dense_gradients(
                x, weight, rows, flat, needs_input, needs_weight
            )
            return grad_input, grad_weight, grad_bias, None, None

        is_linear = isinstance(geometry, LinearPatches)
        use_native = native.can_backward(x, weight) and (
            x.dim() == 2 if is_linear else geometry.fan_in >= NATIVE_CONV_MIN_FAN_IN
        )
        if use_native:  # the native kernels run on one thread; PyTorch's dense ones on all
            limit = NATIVE_DENSE_KERNEL_DENSITY if is_linear else NATIVE_CONV_DENSE_KERNEL_DENSITY
            limit /= torch.get_num_threads()
        else:
            limit = DENSE_KERNEL_DENSITY if is_linear else CONV_DENSE_KERNEL_DENSITY
        if float(keep.sum()) > limit * flat.numel():  # dense kernels on the masked δ
            masked = layer.select(flat, keep, masked=True)  # (B', N)
            grad_input, grad_weight = geometry.dense_gradients(
                x, weight, rows, masked, needs_input, needs_weight
            )
            return grad_input, grad_weight, grad_bias, None, None

        local_row, entry, value = layer.select(flat, keep)  # (M,) each
        if use_native:
            row_start = torch.zeros(x.shape[0] + 1, dtype=torch.long)  # (B + 1,) CSR
            row_start[rows.cpu() + 1] = keep.cpu()  # skipped samples keep nothing
            grad_input, grad_weight = geometry.native_gradients(
                x, weight, row_start.cumsum(0), entry, value, needs_input, needs_weight
            )
            return grad_input, grad_weight, grad_bias, None, None

        grad_input, grad_weight = pytorch_sparse_gradients(
            geometry, x, weight, rows, local_row, entry, value, needs_input, needs_weight
        )
        return grad_input, grad_weight, grad_bias, None, None


def pytorch_sparse_gradients(
    geometry, x, weight, rows, local_row, entry, value, needs_input, needs_weight
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients from the kept entries with PyTorch's kernels: gather the
    input patches the kept entries read, multiply with CSR matrices of the kept δ, scatter the
    patch gradients back. ``local_row``, ``entry``, ``value``: (M,) kept (row of ``rows``,
    index c · P + p, δ) triplets."""
    positions, groups = geometry.positions, geometry.groups
    channels_out, fan_in = geometry.channels_out, geometry.fan_in
    channel = entry // positions
    position = entry % positions
    group = channel // (channels_out // groups)
    sample = rows[local_row]
    # the distinct input patches the kept entries read: (U,) keys (sample, position, group)
    one_patch_per_sample = positions == 1 and groups == 1  # e.g. a Linear layer on (B, in)
    if one_patch_per_sample:
        patch, unique_sample = local_row, rows
        unique_position = unique_group = torch.zeros_like(rows)
    else:
        key = (sample * positions + position) * groups + group
        unique_key, patch = torch.unique(key, return_inverse=True)
        unique_group = unique_key % groups
        unique_position = (unique_key // groups) % positions
        unique_sample = unique_key // (groups * positions)
    patch_count = unique_sample.numel()

    grad_input = grad_weight = None
    if needs_weight:
        patches = geometry.gather(x, unique_sample, unique_position, unique_group)  # (U, F)
        kept = sparse_rows(channel, patch, value, (channels_out, patch_count))  # (C_out, U)
        grad_weight = (kept @ patches).reshape(weight.shape)  # (C_out, fan_in)
    if needs_input:
        kept_t = sparse_rows(  # (U, C_out); select() groups the entries by sample
            patch, channel, value, (patch_count, channels_out), grouped=one_patch_per_sample
        )
        grad_patches = kept_t @ weight.reshape(channels_out, fan_in)  # (U, fan_in)
        grad_input = geometry.scatter(
            grad_patches, unique_sample, unique_position, unique_group, x.shape
        )
    return grad_input, grad_weight
