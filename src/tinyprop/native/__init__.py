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
import threading

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
        getattr(lib, name).argtypes = [_pointer, _int64, _int64] + [_pointer] * 6 + [_int64]
        getattr(lib, name).restype = ctypes.c_int
    lib.tp_topk_sums_f32.argtypes = [_pointer, _int64, _int64, _int64] + [_pointer] * 6
    lib.tp_topk_sums_f32.argtypes += [_int64]
    lib.tp_topk_sums_f32.restype = ctypes.c_int
    lib.tp_topk_sums_columns_f32.argtypes = [_pointer, _int64, _int64, _int64] + [_pointer] * 8
    lib.tp_topk_sums_columns_f32.argtypes += [_int64]
    lib.tp_topk_sums_columns_f32.restype = ctypes.c_int
    for name in ("tp_linear_backward_f32", "tp_linear_backward_relu_f32"):
        getattr(lib, name).argtypes = [_pointer, _pointer, _int64, _int64, _int64]
        getattr(lib, name).argtypes += [_pointer] * 9 + [_int64]
        getattr(lib, name).restype = ctypes.c_int
    lib.tp_linear_update_f32.argtypes = [_pointer, _pointer, _int64, _int64, _int64]
    lib.tp_linear_update_f32.argtypes += [_pointer] * 3 + [ctypes.c_float] + [_pointer] * 3
    lib.tp_linear_update_f32.argtypes += [_int64]
    lib.tp_linear_update_f32.restype = ctypes.c_int
    lib.tp_linear_update_momentum_f32.argtypes = [_pointer, _pointer, _int64, _int64, _int64]
    lib.tp_linear_update_momentum_f32.argtypes += [_pointer] * 3 + [ctypes.c_float, _pointer]
    lib.tp_linear_update_momentum_f32.argtypes += [ctypes.c_float] * 2 + [_int64] * 2
    lib.tp_linear_update_momentum_f32.argtypes += [_pointer] * 3 + [_int64]
    lib.tp_linear_update_momentum_f32.restype = ctypes.c_int
    lib.tp_linear_input_update_f32.argtypes = [_pointer, _pointer, _int64, _int64, _int64]
    lib.tp_linear_input_update_f32.argtypes += [_pointer] * 4 + [_int64, ctypes.c_float, _pointer]
    lib.tp_linear_input_update_f32.argtypes += [ctypes.c_float] * 2 + [_int64] * 2
    lib.tp_linear_input_update_f32.argtypes += [_pointer] * 3 + [_int64]
    lib.tp_linear_input_update_f32.restype = ctypes.c_int
    for name in ("tp_conv_backward_f32", "tp_plane_conv_backward_f32"):
        getattr(lib, name).argtypes = [_pointer] * 8 + [_int64]
        getattr(lib, name).restype = ctypes.c_int
    lib.tp_conv_backward_planes_f32.argtypes = [_pointer] * 10 + [_int64]
    lib.tp_conv_backward_planes_f32.restype = ctypes.c_int
    lib.tp_conv_backward_planes_relu_f32.argtypes = [_pointer] * 10 + [_int64] * 2
    lib.tp_conv_backward_planes_relu_f32.restype = ctypes.c_int
    lib.tp_plane_conv_backward_relu_f32.argtypes = [_pointer] * 8 + [_int64] * 2
    lib.tp_plane_conv_backward_relu_f32.restype = ctypes.c_int
    lib.tp_relu_unpool_f32.argtypes = [_pointer] * 3 + [_int64] * 3 + [_pointer, _int64]
    lib.tp_relu_unpool_f32.restype = ctypes.c_int
    lib.tp_relu_unpool_sums_f32.argtypes = [_pointer] * 3 + [_int64] * 4 + [_pointer] * 4
    lib.tp_relu_unpool_sums_f32.argtypes += [_int64]
    lib.tp_relu_unpool_sums_f32.restype = ctypes.c_int
    lib.tp_pooled_topk_f32.argtypes = [_pointer] * 3 + [_int64] * 5 + [_pointer] * 7
    lib.tp_pooled_topk_f32.argtypes += [_int64]
    lib.tp_pooled_topk_f32.restype = ctypes.c_int
    for name in ("tp_channels_last_f32", "tp_channels_first_f32"):
        getattr(lib, name).argtypes = [_pointer] * 3 + [_int64]
        getattr(lib, name).restype = None
    lib.tp_max_pool_f32.argtypes = [_pointer] + [_int64] * 5 + [_pointer] * 2 + [_int64]
    lib.tp_max_pool_f32.restype = None
    lib.tp_max_pool_2x2_vectorized.argtypes = []
    lib.tp_max_pool_2x2_vectorized.restype = ctypes.c_int
    return lib


# Work (entries scanned, multiply-accumulates) below which another thread costs more than it
# saves: starting one takes tens of microseconds.
SELECTION_GRAIN = 1 << 15  # entries of δ per part
BACKWARD_GRAIN = 1 << 17  # multiply-accumulates per part
LAYOUT_GRAIN = 1 << 16  # floats copied per part


def threads_for(work: int, grain: int) -> int:
    """How many parts a kernel splits ``work`` into: torch's thread count at most, each part
    at least ``grain``. The results do not depend on it (see kernels.c)."""
    return max(1, min(torch.get_num_threads(), work // grain))


_scratch = threading.local()  # per thread: (dtype) -> a buffer the kernels may overwrite


def _scratch_buffer(dtype: torch.dtype, size: int, use: str = "") -> Tensor:
    """A CPU tensor of at least ``size`` elements of ``dtype`` for a kernel's scratch (its
    contents are garbage): one per thread, dtype and ``use`` (buffers a call needs at the same
    time have different uses), grown when a call needs more, so that a layer's backward does
    not allocate its scratch every step. The kernels only write scratch they read back within
    the same call; each thread has its own."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((dtype, use))
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(max(size, 1), dtype=dtype, device="cpu")
        buffers[(dtype, use)] = buffer
    return buffer


@functools.lru_cache(maxsize=256)
def _sizes(values: tuple[int, ...]) -> Tensor:
    """``values`` as an int64 CPU tensor for a kernel to read (never written: the kernels take
    their sizes as const), made once per distinct tuple: a layer's sizes are the same every
    step, and a tensor made from a list costs a few tensor operations each call."""
    return torch.tensor([int(value) for value in values], dtype=torch.int64)


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _last_int64(tensor: Tensor) -> int:
    """The last element of a non-empty contiguous int64 CPU tensor, read from its memory
    (``int(tensor[-1])`` dispatches three tensor operations, each costing more than the read)."""
    at = tensor.data_ptr() + (tensor.numel() - 1) * tensor.element_size()
    return ctypes.c_int64.from_address(at).value


def _float32_empty(*shape: int) -> Tensor:
    """A float32 CPU tensor for a kernel to write into. Never ``torch.empty(shape)``: that takes
    torch's default dtype and device, and under ``torch.set_default_dtype(torch.float64)`` the
    kernel's float32 values filled half of a float64 tensor (silently wrong gradients), under
    a float16 / bfloat16 default (PyTorch Lightning's ``precision="bf16-true"`` sets it while
    ``training_step`` runs) it wrote past the end of a tensor half the size (heap corruption)."""
    return torch.empty(shape, dtype=torch.float32, device="cpu")


def _kernel_inputs(x, weight, row_start, column, value) -> tuple[Tensor, ...]:
    """The backward kernels' inputs as contiguous tensors they can read (value as float32),
    after checking that the kept entries (CSR) fit the batch: the kernels trust the sizes."""
    x, weight = _readable(x, x.dtype), _readable(weight, weight.dtype)
    value = _readable(value, torch.float32)
    row_start, column = _readable(row_start, torch.int64), _readable(column, torch.int64)
    if (
        row_start.shape != (x.shape[0] + 1,)
        or column.dim() != 1
        or value.shape != column.shape
        or _last_int64(row_start) != column.numel()
    ):
        raise ValueError(
            f"kept entries must be row_start ({x.shape[0] + 1},) ending at M with column and "
            f"value (M,), got {tuple(row_start.shape)}, {tuple(column.shape)}, "
            f"{tuple(value.shape)}"
        )
    return x, weight, row_start, column, value


def _readable(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` as a contiguous ``dtype`` tensor a kernel can read: itself when it is one
    (no tensor operation), else a converted copy."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.detach().to(dtype).contiguous()


def can_select(delta: Tensor) -> bool:
    """Whether ``topk`` can run natively on this (B, N) tensor."""
    return (
        delta.device.type == "cpu"
        and delta.dtype in (torch.float32, torch.float64)
        and library() is not None
    )


def topk(
    delta: Tensor,
    keep: Tensor,
    masked: bool = False,
    with_rows: bool = True,
    total: int | None = None,
) -> tuple[Tensor | None, Tensor, Tensor] | Tensor:
    """The ``keep[r]`` entries of largest |δ| of each row, ascending, ties to the lower index.

    ``delta`` (B, N), ``keep`` (B,) in [1, N]. Returns ``(rows, columns, values)``, three
    (Σ keep,) tensors row by row (the kept entries and δ there; ``rows`` is None without
    ``with_rows``), or with ``masked`` the (B, N) tensor of δ at the kept entries and zeros
    elsewhere. ``total``: Σ keep when the caller knows it (saves reading it; it must be Σ
    keep, the kernel writes that many entries).

    Raises:
        ValueError: a keep count outside [1, N], or shapes that do not match.
        FloatingPointError: a row of δ holds NaN or ±Inf (it has no k largest entries).
    """
    delta, keep = _readable(delta, delta.dtype), _readable(keep, torch.int64)
    if delta.dim() != 2 or keep.shape != delta.shape[:1]:
        raise ValueError(
            f"topk needs delta (B, N) and keep (B,), got {tuple(delta.shape)} and "
            f"{tuple(keep.shape)}"
        )
    samples, size = delta.shape
    threads = threads_for(delta.numel(), SELECTION_GRAIN)  # parts of the rows
    scratch = _scratch_buffer(delta.dtype, threads * 2 * size)  # (T, 2 N)
    index_scratch = _scratch_buffer(torch.int64, threads * size)  # (T, N)
    columns = values = output = None
    if masked:
        output = torch.empty_like(delta)  # (B, N)
    else:
        # M (the kernel rejects bad keeps before writing); a given total must be Σ keep
        kept = max(int(keep.sum()) if total is None else total, 0)
        columns = torch.empty(kept, dtype=torch.int64)  # (M,)
        values = torch.empty(kept, dtype=delta.dtype)  # (M,)
    function = library().tp_topk_f64 if delta.dtype == torch.float64 else library().tp_topk_f32
    status = function(
        delta.data_ptr(), samples, size, keep.data_ptr(),
        _address(columns), _address(values), _address(output), scratch.data_ptr(),
        index_scratch.data_ptr(), threads,
    )  # fmt: skip
    _check_selection(status, delta, keep)
    if masked:
        return output
    rows = torch.repeat_interleave(torch.arange(samples), keep) if with_rows else None  # (M,)
    return rows, columns, values


# PyTorch's CPU sum over the rows of a (R, N) float32 tensor (delta.sum(0)) adds each column's
# rows 16 at a time, in levels, for the columns it takes in blocks of 4 vectors of 8 floats (its
# threads split the columns at multiples of 32 floats); the columns after the last whole block
# it adds in 4 interleaved sums. The native kernel sums as the blocks do: it gives Σ δ by column
# only when N is a multiple of 32 and R below 2^20 (tests/test_selection_with_sums.py checks
# its sums against delta.sum bit for bit).
COLUMN_BLOCK = 32
CASCADE_ROWS_LIMIT = 1 << 20


def sums_columns_as_torch(rows: int, size: int) -> bool:
    """Whether :func:`topk_with_sums` can give ``delta.sum(0)`` of a (rows, size) float32
    tensor bit for bit (see ``COLUMN_BLOCK``)."""
    return size % COLUMN_BLOCK == 0 and 0 < rows < CASCADE_ROWS_LIMIT


def topk_with_sums(
    delta: Tensor, keep: int, column_sums: bool = False
) -> tuple[Tensor, ...] | None:
    """Each row's Σ |δ| and, for a ``keep`` that is the same for every row, its kept entries
    (as :func:`topk`), from one read of the row: a row whose Σ |δ| is 0 keeps nothing.

    ``delta`` (R, N) float32 on the CPU, ``keep`` in [1, N]. Returns ``(sums, row_start,
    columns, values)``: (R,) float32 Σ |δ| (summed in float64, so it may differ from
    ``delta.abs().sum(1)`` in the last bits; exactly 0 for a zero row), (R + 1,) CSR offsets
    of the kept entries, and (M,) their indices and δ, row by row in ascending order. None
    when a row's Σ |δ| is NaN, infinite or within 1% of float32's largest value (the caller's
    own sums and checks decide those rows). With ``column_sums``, a fifth item: (N,) Σ δ over
    the rows (a Linear layer's bias gradient), ``delta.sum(0)`` bit for bit from the same
    read, or None when :func:`sums_columns_as_torch` says no or a row is zero (the caller then
    sums the rows it keeps itself).

    Raises:
        ValueError: ``keep`` outside [1, N], or ``delta`` not (R, N) float32 on the CPU.
    """
    if delta.dim() != 2 or delta.dtype != torch.float32 or delta.device.type != "cpu":
        raise ValueError(
            f"topk_with_sums needs a (R, N) float32 CPU tensor, got {tuple(delta.shape)} "
            f"{delta.dtype} on {delta.device}"
        )
    delta = _readable(delta, torch.float32)
    samples, size = delta.shape
    if not 1 <= keep <= size:
        raise ValueError(f"keep must be in [1, {size}], got {keep}")
    threads = threads_for(delta.numel(), SELECTION_GRAIN)  # parts of the rows
    scratch = _scratch_buffer(torch.float32, threads * 2 * size)  # (T, 2 N)
    index_scratch = _scratch_buffer(torch.int64, threads * size)  # (T, N)
    sums = _float32_empty(samples)  # (R,)
    row_start = torch.empty(samples + 1, dtype=torch.int64)  # (R + 1,)
    columns = torch.empty(samples * keep, dtype=torch.int64)  # (R k,) slots
    values = _float32_empty(samples * keep)  # (R k,)
    column_sum = groups = None
    if column_sums and sums_columns_as_torch(samples, size):
        column_sum = _float32_empty(size)  # (N,)
        groups = _scratch_buffer(torch.float32, -(-samples // 16) * size, "groups")  # (G, N)
    status = library().tp_topk_sums_columns_f32(
        delta.data_ptr(), samples, size, keep, sums.data_ptr(), row_start.data_ptr(),
        columns.data_ptr(), values.data_ptr(), scratch.data_ptr(), index_scratch.data_ptr(),
        _address(groups), _address(column_sum), threads,
    )  # fmt: skip
    if status > 0:  # a row the caller's own sum must judge
        return None
    if status != 0:
        raise RuntimeError(
            f"tinyprop's native top-k kernel failed (status {status}); please report"
        )
    kept = _last_int64(row_start)  # M
    extra = (column_sum,) if column_sums else ()
    if kept == columns.numel():  # no zero row: every slot holds an entry
        return sums, row_start, columns, values, *extra
    extra = (None,) if column_sums else ()  # the sums of other rows than the caller keeps
    return sums, row_start, columns[:kept], values[:kept], *extra


def _check_selection(status: int, delta: Tensor, keep: Tensor) -> None:
    """Turn the top-k kernel's status into the error it stands for (0: nothing to say)."""
    if status == 0:
        return
    if status == -1:
        raise ValueError(f"keep counts must be in [1, {delta.shape[1]}], got {keep.tolist()}")
    if status > 0:
        row = status - 1
        bad = int((~torch.isfinite(delta[row])).sum())
        raise FloatingPointError(
            f"row {row} of the output gradient δ ({delta.shape[0]} rows of {delta.shape[1]}) "
            f"holds {bad} NaN or infinite entries, so it has no k largest entries to keep; "
            "the loss or its gradient stopped being finite (check the learning rate, and "
            "log / sqrt / division at 0 in the loss)"
        )
    raise RuntimeError(f"tinyprop's native top-k kernel failed (status {status}); please report")


def _regroup_scratch(outputs: int, kept: int) -> tuple[int, int, int]:
    """Addresses of the Linear kernels' scratch for regrouping M = ``kept`` entries by output:
    column_start (out + 1,) and by_column_sample (M,) int64, by_column_value (M,) float32."""
    indices = _scratch_buffer(torch.int64, outputs + 1 + kept)
    values = _scratch_buffer(torch.float32, kept)
    start = indices.data_ptr()
    return start, start + (outputs + 1) * indices.element_size(), values.data_ptr()


def linear_backward(
    x: Tensor,
    weight: Tensor,
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    needs_input: bool,
    needs_weight: bool,
    relu_mask: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of ``y = x Wᵀ`` from the kept entries of δ only.

    Args:
        x: (B, in) layer input; weight: (out, in).
        row_start: (B + 1,) CSR offsets of each sample's kept entries (empty for skipped ones).
        column: (M,) kept output index j, ascending within each sample (as the selection
            gives them: the input gradient sums them in this order); value: (M,) δ[s, j] there.
        relu_mask: x is a ReLU's output: the input gradient is the one at the ReLU's input,
            0 where x <= 0 (what PyTorch's ``threshold_backward(grad_input, x, 0)`` writes,
            bit for bit), written by the kernel while it is still in the cache.

    Returns:
        ``(grad_input (B, in) or None, grad_weight (out, in) or None)``: k · in multiply-
        accumulates each; rows nobody kept are zero.
    """
    x, weight, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"need x (B, in), weight (out, in), got {x.shape}, {weight.shape}")
    batch, inputs = x.shape
    outputs = weight.shape[0]
    grad_input = _float32_empty(batch, inputs) if needs_input else None  # (B, in)
    grad_weight = _float32_empty(outputs, inputs) if needs_weight else None  # (out, in)
    scratch = _regroup_scratch(outputs, column.numel())
    threads = threads_for((column.numel() + outputs) * inputs, BACKWARD_GRAIN)
    # no strip copies (None): every thread walks the weight's rows, into contiguous blocks of
    # sums (kernels.c); summing copies of the weight's strips measured slower at two threads
    lib = library()
    kernel = lib.tp_linear_backward_relu_f32 if relu_mask else lib.tp_linear_backward_f32
    status = kernel(
        x.data_ptr(), weight.data_ptr(), batch, outputs, inputs,
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(),
        _address(grad_weight), _address(grad_input), *scratch, None, threads,
    )  # fmt: skip
    _check_linear_status(status, outputs, column)
    return grad_input, grad_weight


def linear_update(
    x: Tensor,
    weight: Tensor,
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    scale: float,
    momentum_buffer: Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    first: bool = False,
) -> None:
    """SGD's update of a Linear weight from the kept entries of δ, in place, without the weight
    gradient: ``weight += scale · grad_weight`` (scale = -lr), with ``grad_weight`` as
    :func:`linear_backward` sums it (rows nobody kept stay as they are).

    With a ``momentum_buffer``, ``torch.optim.SGD``'s step with ``momentum``, ``dampening``
    and ``nesterov`` instead, rounding included: the buffer (updated in place) becomes the
    gradient when ``first`` (a new buffer), else ``buffer · momentum + (1 - dampening) ·
    grad_weight``; every row moves (a row nobody kept has a zero gradient).

    Args:
        x: (B, in) layer input; weight: (out, in) float32, contiguous, updated in place.
        row_start, column, value: the kept entries as for :func:`linear_backward`.
        momentum_buffer: None, or (out, in) float32, contiguous: SGD's momentum buffer.
    """
    x, row_start, column, value, scratch, threads = _update_inputs(
        x, weight, row_start, column, value, momentum_buffer
    )
    batch, inputs = x.shape
    outputs = weight.shape[0]
    kept = (row_start.data_ptr(), column.data_ptr(), value.data_ptr())
    if momentum_buffer is None:
        status = library().tp_linear_update_f32(
            x.data_ptr(), weight.data_ptr(), batch, outputs, inputs, *kept, scale, *scratch,
            threads,
        )  # fmt: skip
    else:  # 1 - dampening rounded to float32 as Tensor.add_'s alpha is
        status = library().tp_linear_update_momentum_f32(
            x.data_ptr(), weight.data_ptr(), batch, outputs, inputs, *kept, scale,
            momentum_buffer.data_ptr(), momentum, 1.0 - dampening, int(first), int(nesterov),
            *scratch, threads,
        )  # fmt: skip
    _check_linear_status(status, outputs, column)


def _update_inputs(x, weight, row_start, column, value, momentum_buffer):
    """The kernel inputs of an update of ``weight`` in place (see :func:`linear_update`),
    checked: (x, row_start, column, value, regroup scratch, threads)."""
    tensors = [weight] if momentum_buffer is None else [weight, momentum_buffer]
    if not all(
        tensor.is_contiguous() and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        for tensor in tensors
    ):
        raise ValueError("the fused SGD update needs a contiguous float32 CPU weight (and buffer)")
    if momentum_buffer is not None and momentum_buffer.shape != weight.shape:
        raise ValueError(
            f"momentum buffer {tuple(momentum_buffer.shape)} does not match the weight "
            f"{tuple(weight.shape)}"
        )
    x, _, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"need x (B, in), weight (out, in), got {x.shape}, {weight.shape}")
    batch, inputs = x.shape
    outputs = weight.shape[0]
    scratch = _regroup_scratch(outputs, column.numel())
    threads = threads_for((column.numel() + outputs) * inputs, BACKWARD_GRAIN)
    return x, row_start, column, value, scratch, threads


def linear_input_update(
    x: Tensor,
    weight: Tensor,
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    scale: float,
    momentum_buffer: Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    first: bool = False,
    relu_mask: bool = False,
) -> Tensor:
    """:func:`linear_backward`'s input gradient and :func:`linear_update`'s SGD step of the
    weight in one walk down the weight's rows: each piece of a row is added into the input
    gradient of the samples that kept it, then stepped, so the weight is read once and written
    once instead of read by the backward and read and written again by the update.

    The input gradient is the one of the weight before the step (``relu_mask`` as for
    :func:`linear_backward`), the weight (and ``momentum_buffer``) come out as
    :func:`linear_update` leaves them, bit for bit, at every thread count. Arguments as for
    :func:`linear_update`.

    Returns:
        grad_input (B, in).
    """
    x, row_start, column, value, scratch, threads = _update_inputs(
        x, weight, row_start, column, value, momentum_buffer
    )
    batch, inputs = x.shape
    outputs = weight.shape[0]
    grad_input = _float32_empty(batch, inputs)  # (B, in)
    status = library().tp_linear_input_update_f32(
        x.data_ptr(), weight.data_ptr(), batch, outputs, inputs,
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(), grad_input.data_ptr(),
        int(relu_mask), scale, _address(momentum_buffer), momentum, 1.0 - dampening,
        int(first), int(nesterov), *scratch, threads,
    )  # fmt: skip
    _check_linear_status(status, outputs, column)
    return grad_input


def _check_linear_status(status: int, outputs: int, column: Tensor) -> None:
    """Turn a Linear kernel's status into the error it stands for (0: nothing to say)."""
    if status != 0:
        raise ValueError(
            f"kept output indices must be in [0, {outputs}) and ascending within each "
            f"sample's entries (the order the input gradient sums them in), got "
            f"{column[:20].tolist()}{' ...' if column.numel() > 20 else ''}"
        )


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
    pads: tuple[int, int, int, int] | None = None,
    relu_mask: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of a convolution from the kept entries of δ only.

    Args:
        x: (B, Hp, Wp, C_in) zero-padded input, channels-last (a view is fine).
        weight: (C_out, kh, kw, C_in / G), channels-last.
        shape: (B, Hp, Wp, C_in, C_out, kh, kw, H_out, W_out, stride_h, stride_w,
            dilation_h, dilation_w, G).
        row_start: (B + 1,) CSR offsets of each sample's kept entries; column: (M,) kept
            index c · P + p into the sample's δ (C_out, P = H_out · W_out); value: (M,) δ there.

        pads: (top, bottom, left, right), the padding of ``x``: grad_input comes channels
            first without it, (B, C_in, Hp - top - bottom, Wp - left - right), as
            :func:`channels_first` would give it, without the padded copy.
        relu_mask: ``x`` is the output of a ReLU (needs ``pads``): grad_input is the gradient
            at the ReLU's input, ``threshold_backward(grad_input, x, 0)`` bit for bit, masked
            in the kernel (ReLU's backward fused).

    Returns:
        ``(grad_input (B, Hp, Wp, C_in) or None, grad_weight (C_out, kh, kw, C_in / G) or
        None)``: (C_in / G) · kh · kw multiply-accumulates per kept entry each.
    """
    x, weight, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    batch, in_h, in_w, channels_in, channels_out, kh, kw, out_h, out_w = shape[:9]
    stride_h, stride_w, dilation_h, dilation_w, groups = shape[9:]
    if (
        x.shape != (batch, in_h, in_w, channels_in)
        or groups < 1
        or channels_in % groups
        or channels_out % groups
        or weight.shape != (channels_out, kh, kw, channels_in // groups)
        or min(stride_h, stride_w, dilation_h, dilation_w, out_h, out_w) < 1
        or (out_h - 1) * stride_h + (kh - 1) * dilation_h >= in_h
        or (out_w - 1) * stride_w + (kw - 1) * dilation_w >= in_w
    ):
        raise ValueError(f"conv_backward: shape {shape} does not fit x {x.shape}, {weight.shape}")
    inputs = (x, weight, row_start, column, value)
    macs_per_entry = kh * kw * (channels_in // groups)
    if pads is None:
        if relu_mask:
            raise ValueError("conv_backward: relu_mask needs pads (the channels-first gradient)")
        return _conv_kernel(
            "tp_conv_backward_f32", inputs, shape, macs_per_entry, needs_input, needs_weight
        )
    top, bottom, left, right = pads
    if min(pads) < 0 or top + bottom >= in_h or left + right >= in_w:
        raise ValueError(f"conv_backward: pads {pads} do not fit x {tuple(x.shape)}")
    threads = threads_for(column.numel() * macs_per_entry, BACKWARD_GRAIN)
    grad_input = grad_weight = scratch = None
    if needs_input:  # (B, C_in, H, W), and one padded channels-last sample per thread
        grad_input = _float32_empty(batch, channels_in, in_h - top - bottom, in_w - left - right)
        scratch = _scratch_buffer(torch.float32, threads * in_h * in_w * channels_in, "planes")
    if needs_weight:
        grad_weight = _float32_empty(*weight.shape)
    dims, padding = _sizes(tuple(shape)), _sizes(tuple(pads))
    status = library().tp_conv_backward_planes_relu_f32(
        x.data_ptr(), weight.data_ptr(), dims.data_ptr(), padding.data_ptr(),
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(),
        _address(grad_weight), _address(grad_input), _address(scratch), threads, int(relu_mask),
    )  # fmt: skip
    _check_conv_status(status, "tp_conv_backward_planes_relu_f32", column, shape)
    return grad_input, grad_weight


def plane_conv_backward(
    x: Tensor,
    weight: Tensor,
    shape: tuple[int, ...],
    row_start: Tensor,
    column: Tensor,
    value: Tensor,
    needs_input: bool,
    needs_weight: bool,
    relu_mask: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of a convolution with one input channel per group (depthwise)
    from the kept entries of δ only, on the unpadded input as it is (channels first).

    Args:
        x: (B, C_in, H, W) the layer's input (not padded); weight: (C_out, kh, kw).
        shape: (B, C_in, H, W, C_out, kh, kw, H_out, W_out, stride_h, stride_w, pad_top,
            pad_left, dilation_h, dilation_w, G) with C_in = G.
        row_start, column, value: the kept entries as for :func:`conv_backward`.
        relu_mask: ``x`` is the output of a ReLU: grad_input is the gradient at the ReLU's
            input, ``threshold_backward(grad_input, x, 0)`` bit for bit (as :func:`conv_backward`).

    Returns:
        ``(grad_input (B, C_in, H, W) or None, grad_weight (C_out, kh, kw) or None)``: kh · kw
        multiply-accumulates per kept entry each (fewer where the window overlaps the padding).
    """
    x, weight, row_start, column, value = _kernel_inputs(x, weight, row_start, column, value)
    batch, channels_in, height, width, channels_out, kh, kw, out_h, out_w = shape[:9]
    stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups = shape[9:]
    if (
        x.shape != (batch, channels_in, height, width)
        or groups < 1
        or channels_in != groups
        or channels_out % groups
        or weight.shape != (channels_out, kh, kw)
        or min(stride_h, stride_w, dilation_h, dilation_w, out_h, out_w) < 1
        or min(pad_top, pad_left) < 0
    ):
        raise ValueError(
            f"plane_conv_backward: shape {shape} does not fit {x.shape}, {weight.shape}"
        )
    inputs = (x, weight, row_start, column, value)
    # kh · kw multiply-accumulates per entry are little beside the input gradient it writes
    # (zeroed, then added into): that counts too, so a large one is split among the threads
    written = x.numel() if needs_input else 0
    return _conv_kernel(
        "tp_plane_conv_backward_relu_f32", inputs, shape, kh * kw, needs_input, needs_weight,
        written, relu_mask,
    )  # fmt: skip


def _conv_kernel(
    name, inputs, shape, macs_per_entry, needs_input, needs_weight, written=0, relu_mask=None
):  # fmt: skip
    """Run the convolution kernel ``name`` on its checked ``inputs`` (x, weight, row_start,
    column, value); returns ``(grad_input or None, grad_weight or None)`` shaped like x and
    weight. ``written``: floats the kernel writes besides its multiply-accumulates (work that
    decides the thread count with them). ``relu_mask``: None for a kernel without that last
    argument, else its value."""
    x, weight, row_start, column, value = inputs
    grad_input = torch.empty_like(x) if needs_input else None
    grad_weight = torch.empty_like(weight) if needs_weight else None
    dims = _sizes(tuple(shape))
    mask = () if relu_mask is None else (int(relu_mask),)
    status = getattr(library(), name)(
        x.data_ptr(), weight.data_ptr(), dims.data_ptr(),
        row_start.data_ptr(), column.data_ptr(), value.data_ptr(),
        _address(grad_weight), _address(grad_input),
        threads_for(column.numel() * macs_per_entry + written, BACKWARD_GRAIN), *mask,
    )  # fmt: skip
    _check_conv_status(status, name, column, shape)
    return grad_input, grad_weight


def _check_conv_status(status: int, name: str, column: Tensor, shape) -> None:
    """Turn a convolution kernel's status into the error it stands for (0: nothing to say)."""
    if status == -3:
        raise MemoryError(f"{name}: no memory for the places of {column.numel()} entries")
    if status != 0:
        raise ValueError(f"kept indices must be in [0, {shape[4] * shape[7] * shape[8]})")


def channels_last(x: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """``x`` (B, C, H, W) float32 -> (B, top + H + bottom, left + W + right, C), zeros in the
    padding ``pads`` = (top, bottom, left, right): :func:`conv_backward`'s input, in one pass
    (``F.pad`` then a channels-last copy costs 2-4 times more)."""
    x = x.detach().contiguous()
    batch, channels, height, width = x.shape
    top, bottom, left, right = pads
    out = _float32_empty(batch, top + height + bottom, left + width + right, channels)
    shape = _sizes((batch, channels, height, width, *pads))
    threads = threads_for(out.numel(), LAYOUT_GRAIN)
    library().tp_channels_last_f32(x.data_ptr(), shape.data_ptr(), out.data_ptr(), threads)
    return out


def channels_first(grad: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """The reverse of :func:`channels_last` for a gradient: (B, Hp, Wp, C) float32 -> (B, C,
    Hp - top - bottom, Wp - left - right), the padding cropped."""
    grad = grad.contiguous()
    batch, padded_h, padded_w, channels = grad.shape
    top, bottom, left, right = pads
    height, width = padded_h - top - bottom, padded_w - left - right
    out = _float32_empty(batch, channels, height, width)
    shape = _sizes((batch, channels, height, width, *pads))
    threads = threads_for(out.numel(), LAYOUT_GRAIN)
    library().tp_channels_first_f32(grad.data_ptr(), shape.data_ptr(), out.data_ptr(), threads)
    return out


def max_pool(x: Tensor, kernel: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d_with_indices(x, kernel)`` (stride = kernel size, no padding, floor mode)
    of ``x`` (B, C, H, W) float32, in one pass over the planes as they lie: the same maxima
    and window indices bit for bit (each window's first maximum, its last NaN; PyTorch's
    kernel walks each window one entry at a time, this one a window row across a whole
    output row). Returns ``(pooled (B, C, H / kh, W / kw) float32, indices int64 alike)``."""
    x = x.detach().contiguous()
    kernel_h, kernel_w = kernel
    if (
        x.dim() != 4
        or x.dtype != torch.float32
        or not 1 <= kernel_h <= x.shape[2]
        or not 1 <= kernel_w <= x.shape[3]
    ):
        raise ValueError(
            f"max_pool: x {tuple(x.shape)} {x.dtype}, window {kernel}: pass x (B, C, H, W) "
            "float32 and a window of at least 1x1 that fits in its H x W plane"
        )
    batch, channels, height, width = x.shape
    out_shape = (batch, channels, height // kernel_h, width // kernel_w)
    pooled = _float32_empty(*out_shape)
    indices = torch.empty(out_shape, dtype=torch.int64, device="cpu")
    threads = threads_for(x.numel(), LAYOUT_GRAIN)
    library().tp_max_pool_f32(
        x.data_ptr(), batch * channels, height, width, kernel_h, kernel_w, pooled.data_ptr(),
        indices.data_ptr(), threads,
    )  # fmt: skip
    return pooled, indices


def relu_unpool(
    grad: Tensor, pooled: Tensor, indices: Tensor, shape: torch.Size, sums: bool = False
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The gradient at y of MaxPool2d(ReLU(y)) with non-overlapping windows, in one pass: what
    max pooling's backward then ReLU's write (see :mod:`tinyprop.pool_fusion`).

    Args:
        grad: (B, C, H', W') the pooled output's gradient g; pooled: (B, C, H', W') float32,
            the pooled values z; indices: (B, C, H', W') each window's maximum, an index into
            its (H, W) plane (``max_pool2d_with_indices``).
        shape: (B, C, H, W) of y.
        sums: also return each sample's Σ |δ| and each channel's Σ δ over the batch, summed
            in float64 from the pooled entries in a fixed order (the same at every thread
            count, not PyTorch's float32 order) and rounded to float32 once.

    Returns:
        δ (B, C, H, W) float32: 0 + g at the maxima of the windows whose z is not <= 0, zeros
        elsewhere; with ``sums``, ``(δ, Σ |δ| (B,), Σ δ (C,))``.
    """
    grad = grad.detach().to(torch.float32).contiguous()
    pooled, indices = pooled.detach().contiguous(), indices.to(torch.int64).contiguous()
    if (
        len(shape) != 4
        or grad.shape != pooled.shape
        or indices.shape != pooled.shape
        or pooled.dtype != torch.float32
        or pooled.shape[:2] != tuple(shape[:2])
    ):
        raise ValueError(
            f"relu_unpool: grad {tuple(grad.shape)}, pooled {tuple(pooled.shape)} and indices "
            f"{tuple(indices.shape)} must match, (B, C) of {tuple(shape)}"
        )
    delta = _float32_empty(*shape)
    batch, channels = shape[0], shape[1]
    sizes = (pooled.shape[2] * pooled.shape[3], shape[2] * shape[3])
    threads = threads_for(delta.numel(), LAYOUT_GRAIN)
    pointers = (grad.data_ptr(), pooled.data_ptr(), indices.data_ptr())
    if sums:
        plane_sums = _scratch_buffer(torch.float64, 2 * batch * channels)
        row_abs, channel_sum = _float32_empty(batch), _float32_empty(channels)
        status = library().tp_relu_unpool_sums_f32(
            *pointers, batch, channels, *sizes, delta.data_ptr(), plane_sums.data_ptr(),
            row_abs.data_ptr(), channel_sum.data_ptr(), threads,
        )  # fmt: skip
    else:
        status = library().tp_relu_unpool_f32(
            *pointers, batch * channels, *sizes, delta.data_ptr(), threads
        )
    if status != 0:
        raise ValueError(
            f"relu_unpool: a window maximum's index lies outside the {shape[2]}x{shape[3]} plane"
        )
    return (delta, row_abs, channel_sum) if sums else delta


def pooled_topk(
    grad: Tensor, pooled: Tensor, indices: Tensor, shape: torch.Size, keep: int
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """:func:`relu_unpool`'s δ with ``sums``, then :func:`topk` of it with ``keep`` entries in
    every row, without writing δ: each sample's row (C · H · W,) is built from the pooled
    entries in a scratch row that stays in the cache, and selected from there. The same kept
    entries, values and sums as those two calls, bit for bit.

    Args:
        grad, pooled, indices, shape: as for :func:`relu_unpool` (float32, int64 indices).
        keep: k of every row, in [1, C · H · W] (a row whose δ is all zero keeps its first
            zeros, as :func:`topk` would: the caller drops such rows).

    Returns:
        ``(columns (B · k,), values (B · k,), Σ |δ| (B,), Σ δ (C,))``, the kept entries row by
        row in ascending column order; None when a row of δ holds NaN or ±Inf (no k largest
        entries exist: the caller takes the path that reports it).
    """
    grad, pooled = _readable(grad, torch.float32), _readable(pooled, pooled.dtype)
    indices = _readable(indices, torch.int64)
    batch, channels = shape[0], shape[1]
    size = channels * shape[2] * shape[3] if len(shape) == 4 else 0  # N
    if (
        size == 0
        or grad.shape != pooled.shape
        or indices.shape != pooled.shape
        or pooled.dtype != torch.float32
        or pooled.shape[:2] != tuple(shape[:2])
        or not 1 <= keep <= size
    ):
        raise ValueError(
            f"pooled_topk: grad {tuple(grad.shape)}, pooled {tuple(pooled.shape)} and indices "
            f"{tuple(indices.shape)} must match, (B, C) of {tuple(shape)}, keep {keep} in "
            f"[1, {size}]"
        )
    threads = threads_for(batch * size, SELECTION_GRAIN)  # parts of the rows
    scratch = _scratch_buffer(torch.float32, threads * 3 * size)  # (T, 3 N)
    index_scratch = _scratch_buffer(torch.int64, threads * size)  # (T, N)
    plane_sums = _scratch_buffer(torch.float64, 2 * batch * channels)
    columns = torch.empty(batch * keep, dtype=torch.int64)  # (B k,)
    values, row_abs = _float32_empty(batch * keep), _float32_empty(batch)
    channel_sum = _float32_empty(channels)
    status = library().tp_pooled_topk_f32(
        grad.data_ptr(), pooled.data_ptr(), indices.data_ptr(), batch, channels,
        pooled.shape[2] * pooled.shape[3], shape[2] * shape[3], keep, columns.data_ptr(),
        values.data_ptr(), plane_sums.data_ptr(), row_abs.data_ptr(), channel_sum.data_ptr(),
        scratch.data_ptr(), index_scratch.data_ptr(), threads,
    )  # fmt: skip
    if status > 0:
        return None
    if status == -1:
        raise ValueError(
            f"pooled_topk: a window maximum's index lies outside the {shape[2]}x{shape[3]} plane"
        )
    if status != 0:
        raise RuntimeError(f"tinyprop's pooled top-k kernel failed (status {status})")
    return columns, values, row_abs, channel_sum
