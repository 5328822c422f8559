"""Native CPU kernels of the sparse backward: per-row top-k selection and the Linear backward.

``kernels.c`` is compiled with the system C compiler on first use (about a second) and cached
in tinyprop's cache folder, keyed by the source, the flags and the machine, verified by the
SHA-256 recorded when it was built (:mod:`tinyprop.native.build`); it is loaded with
``ctypes``. Without a compiler, or with ``TINYPROP_NATIVE=0``, tinyprop uses its PyTorch/NumPy
kernels instead: same kept entries, same gradients up to float rounding, slower.

Why hand-written: PyTorch has no fused "top-k per row, then products of the kept entries"
kernel for CPUs; its sparse CSR products and ``topk`` cost more than the dense backward they
replace at the densities TinyProp keeps (see ``benchmarks/speed.py``).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from tinyprop.native import build
from tinyprop.native.build import FLAGS, SOURCE, _compiler  # noqa: F401 (public names)

_pointer = ctypes.c_void_p
_int64 = ctypes.c_int64


def enabled() -> bool:
    """False when ``TINYPROP_NATIVE=0`` asks for the PyTorch kernels only."""
    return os.environ.get("TINYPROP_NATIVE", "1") != "0"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if needed; None (after one warning) if they cannot
    be built and loaded (see :mod:`tinyprop.native.build`)."""
    if not enabled():
        return None
    lib = build.load()  # verified before it is loaded; rebuilt when it does not verify
    if lib is None:
        return None
    for name in ("tp_topk_f32", "tp_topk_f64"):
        getattr(lib, name).argtypes = [_pointer, _int64, _int64, _pointer] + [_pointer] * 5
        getattr(lib, name).restype = ctypes.c_int
    lib.tp_linear_backward_f32.argtypes = [_pointer, _pointer, _int64, _int64, _int64]
    lib.tp_linear_backward_f32.argtypes += [_pointer] * 8
    lib.tp_linear_backward_f32.restype = ctypes.c_int
    lib.tp_conv_backward_f32.argtypes = [_pointer] * 8
    lib.tp_conv_backward_f32.restype = ctypes.c_int
    return lib


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _kernel_inputs(x, weight, row_start, column, value) -> tuple[Tensor, ...]:
    """The backward kernels' inputs as contiguous tensors they can read (value as float32)."""
    x, weight = x.detach().contiguous(), weight.detach().contiguous()
    value = value.detach().to(torch.float32).contiguous()
    return x, weight, row_start.contiguous(), column.contiguous(), value


def can_select(delta: Tensor) -> bool:
    """Whether ``topk`` can run natively on this (B, N) tensor."""
    return (
        delta.device.type == "cpu"
        and delta.dtype in (torch.float32, torch.float64)
        and library() is not None
    )


def topk(
    delta: Tensor, keep: Tensor, masked: bool = False
) -> tuple[Tensor, Tensor, Tensor] | Tensor:
    """The ``keep[r]`` entries of largest |δ| of each row, ascending, ties to the lower index.

    ``delta`` (B, N), ``keep`` (B,) in [1, N]. Returns ``(rows, columns, values)``, three
    (Σ keep,) tensors row by row (the kept entries and δ there), or with ``masked`` the (B, N)
    tensor of δ at the kept entries and zeros elsewhere.
    """
    delta = delta.detach().contiguous()
    keep = keep.to(torch.int64).contiguous()
    samples, size = delta.shape
    scratch = torch.empty(2 * size, dtype=delta.dtype)  # (2 N,)
    index_scratch = torch.empty(size, dtype=torch.int64)  # (N,)
    columns = values = output = None
    if masked:
        output = torch.empty_like(delta)  # (B, N)
    else:
        kept = int(keep.sum())  # M; the kernel may write one slot past it
        columns = torch.empty(kept + 1, dtype=torch.int64)[:kept]  # (M,)
        values = torch.empty(kept + 1, dtype=delta.dtype)[:kept]  # (M,)
    function = library().tp_topk_f64 if delta.dtype == torch.float64 else library().tp_topk_f32
    status = function(
        delta.data_ptr(), samples, size, keep.data_ptr(),
        _address(columns), _address(values), _address(output), scratch.data_ptr(),
        index_scratch.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"keep counts must be in [1, {size}], got {keep.tolist()}")
    if masked:
        return output
    rows = torch.repeat_interleave(torch.arange(samples), keep)  # (M,)
    return rows, columns, values


def linear_backward(
    x: Tensor,
    weight: Tensor,
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of ``y = x Wᵀ`` from the kept entries of δ only.

    Args:
        x: (B, in) layer input; weight: (out, in).
        row_start: (B + 1,) CSR offsets of each sample's kept entries (empty for skipped ones).
        column: (M,) kept output index j; value: (M,) δ[s, j] there.

    Returns:
        ``(grad_input (B, in) or None, grad_weight (out, in) or None)``: k · in multiply-
        accumulates each; rows nobody kept are zero.
    """
    x, weight, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    batch, inputs = x.shape
    outputs = weight.shape[0]
    grad_input = torch.empty(batch, inputs) if needs_input else None  # (B, in)
    grad_weight = torch.empty(outputs, inputs) if needs_weight else None  # (out, in)
    column_start = torch.empty(outputs + 1, dtype=torch.int64)  # scratch for the CSC regroup
    by_column_sample = torch.empty(column.numel(), dtype=torch.int64)
    by_column_value = torch.empty(column.numel(), dtype=torch.float32)
    status = library().tp_linear_backward_f32(
        x.data_ptr(), weight.data_ptr(), batch, outputs, inputs,
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(),
        _address(grad_weight), _address(grad_input),
        column_start.data_ptr(), by_column_sample.data_ptr(), by_column_value.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"kept output indices must be in [0, {outputs}), got {column.tolist()}")
    return grad_input, grad_weight


def can_backward(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear_backward`` / ``conv_backward`` can run natively: float32 on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and library() is not None
    )


def conv_backward(
    x: Tensor,
    weight: Tensor,
    shape: tuple[int, ...],
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of a convolution from the kept entries of δ only.

    Args:
        x: (B, Hp, Wp, C_in) zero-padded input, channels-last (a view is fine).
        weight: (C_out, kh, kw, C_in / G), channels-last.
        shape: (B, Hp, Wp, C_in, C_out, kh, kw, H_out, W_out, stride_h, stride_w,
            dilation_h, dilation_w, G).
        row_start: (B + 1,) CSR offsets of each sample's kept entries; column: (M,) kept
            index c · P + p into the sample's δ (C_out, P = H_out · W_out); value: (M,) δ there.

    Returns:
        ``(grad_input (B, Hp, Wp, C_in) or None, grad_weight (C_out, kh, kw, C_in / G) or
        None)``: (C_in / G) · kh · kw multiply-accumulates per kept entry each.
    """
    x, weight, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    grad_input = torch.empty_like(x) if needs_input else None
    grad_weight = torch.empty_like(weight) if needs_weight else None
    dims = torch.tensor(shape, dtype=torch.int64)
    status = library().tp_conv_backward_f32(
        x.data_ptr(), weight.data_ptr(), dims.data_ptr(),
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(),
        _address(grad_weight), _address(grad_input),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"kept indices must be in [0, {shape[4] * shape[7] * shape[8]})")
    return grad_input, grad_weight
