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

import copy
import functools
import math
import warnings

import torch
from torch import Tensor

from tinyprop import native
from tinyprop.functional import (
    SCALAR_ROWS,
    few_cpu_rows,
    list_tensor,
    local_error,
    running_max,
    scalar_running_max,
    select_mask,
    select_topk,
)
from tinyprop.patches import LinearPatches

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Above these fractions of kept entries (in one layer and step), the kept entries are multiplied
# with PyTorch's dense kernels (GEMM / convolution backward on the masked δ) instead of the
# sparse ones, which are slower there. The native kernels use torch's thread count as the dense
# ones do, so the limits hold at every thread count. Crossovers at batch 128:
# - native Linear kernel (2048x2048): 0.6 on one thread on a quiet machine; re-measured on
#   the shared 2-core machine under load, 0.2 on one thread and 0.3 on two (median of three);
# - native convolution kernel: 0.1 (16->32 channels, 3x3) to 0.2 (64->64), one thread; with a
#   fan-in below 32 its per-tap overhead loses to oneDNN's dense backward at any density, so
#   those layers keep the dense kernels (and under ``dense_small_layers``, fan-in below 64,
#   skip the selection too), except a layer on one input channel (a first layer on a
#   grey image): it runs the depthwise kernel below. Its weight gradient alone (the small CNN's
#   1 -> 16, 3x3, 28x28, batch 128, one thread): 0.45 ms at 5% against about 0.5 dense, and the
#   selection writes the kept entries instead of a masked copy of δ; 0.06 for those. A 1x1
#   conv of fan-in 32
#   (the MobileNet-style CNN's 32 -> 64, 5% of 12,544 kept, benchmarks/layer_kernels.py, one
#   thread, loaded machine): native 1.61 ms against 2.20 dense. A depthwise conv runs its own
#   native kernel on the input as it is: 0.57-1.16 ms against 2.2-3.4 dense at 5%;
# - PyTorch's sparse CSR products (no native kernels, float64, Linear on (B, *, in)): about
#   0.15 for a 2048x2048 Linear, below 0.05 for 3x3 convolutions.
# The result is the same up to float rounding, and the ledger counts k · fan_in either way.
NATIVE_DENSE_KERNEL_DENSITY = 0.3  # Linear layers, native kernel
NATIVE_CONV_DENSE_KERNEL_DENSITY = 0.1  # Conv1d / Conv2d layers, native kernel
NATIVE_DEPTHWISE_DENSE_KERNEL_DENSITY = 0.5  # depthwise ones (PyTorch's dense kernel is slow)
NATIVE_ONE_CHANNEL_DENSE_KERNEL_DENSITY = 0.06  # on one input channel, groups=1 (a first layer)
NATIVE_CONV_MIN_FAN_IN = 32  # C_in / G · kh · kw; smaller convolutions keep the dense kernels
# (but for depthwise ones: their native kernel reads the input as it is, no channels-last copy)
DENSE_SMALL_FAN_IN = 64  # below it, dense_small_layers backpropagates a convolution densely
DENSE_KERNEL_DENSITY = 0.15  # Linear layers, PyTorch sparse kernels
CONV_DENSE_KERNEL_DENSITY = 0.02  # Conv1d / Conv2d layers, PyTorch sparse kernels

# the kernels a layer call's backward may run (StepStats.kernels names one per layer)
NATIVE_SPARSE = "native sparse"
FUSED_UPDATE = "native sparse, fused SGD update (no weight gradient)"
PYTORCH_SPARSE = "PyTorch sparse (CSR)"
MASKED_DENSE = "dense on the masked δ"
EVERY_ENTRY = "dense (every entry kept)"
KEPT_CHANNELS = "dense on the kept channels"
KEPT_GROUPS = "dense on the groups of the kept channels"
NO_ROW = "none (every row's δ is zero)"
NO_GRADIENT = "none (no gradient needed)"
KERNELS = (NATIVE_SPARSE, FUSED_UPDATE, PYTORCH_SPARSE, MASKED_DENSE, EVERY_ENTRY, KEPT_CHANNELS,
           KEPT_GROUPS, NO_ROW, NO_GRADIENT)  # fmt: skip


def sparse_rows(
    row: Tensor,
    column: Tensor,
    value: Tensor,
    shape: tuple[int, int],
    grouped: bool = False,
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
    """y = layer(x); backward keeps k output gradients per row (see module docstring)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer, call, relu_input=None
    ) -> Tensor:  # fmt: skip
        """``relu_input``: the input y of the ReLU whose output x is (tinyprop.relu_fusion):
        the backward then returns the gradient at y (ReLU's backward fused), None at x."""
        ctx.layer, ctx.call = layer, call
        ctx.relu_fused = relu_input is not None
        ctx.weight_id = id(weight)  # the parameter, for StepContext.prove_finite
        ctx.bias_id = id(bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return layer.dense_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not ctx.relu_fused:
            return SparseBackprop.layer_backward(ctx, grad_output, None)
        relu = {"masked": False}  # the ReLU's output x, and whether a native kernel masked
        grad_input, *rest = SparseBackprop.layer_backward(ctx, grad_output, relu)
        if grad_input is not None and not relu["masked"]:  # what the ReLU's backward computes
            grad_input = torch.ops.aten.threshold_backward(grad_input, relu["x"], 0)
        return None, *rest, grad_input

    @staticmethod
    def layer_backward(ctx, grad_output: Tensor, relu: dict | None, geometry=None):
        """The layer's backward: (grad_input at x, grad_weight, grad_bias, None, None).
        ``relu``: None, or (fused ReLU, see :mod:`tinyprop.relu_fusion`) a dict that receives
        the saved x under "x" and, under "masked", whether the native kernel
        returned the input gradient at the ReLU's input already. ``geometry``: the patch
        geometry of the saved x when it is not the call's (the graph-free step's trained
        rows of a convolution, :mod:`tinyprop.graph_free`), None: the call's."""
        if torch.is_grad_enabled():  # create_graph=True: the sparse backward has no backward
            raise RuntimeError(
                f"layer '{ctx.layer.layer_name}': tinyprop's sparse backward cannot be "
                "differentiated, and this backward runs with create_graph=True (a gradient "
                "penalty, a double backward, a Hessian-vector product), whose second backward "
                "would miss this layer's part. Compute such a loss with the dense backward: "
                "TinyPropConfig(policy='full'), or tinyprop.remove(model) first"
            )
        if getattr(ctx, "pool_fusion", None) == "fused":  # see tinyprop.pool_fusion
            raise RuntimeError(
                f"layer '{ctx.layer.layer_name}': its output (or its ReLU's) reached another "
                "node besides the max pooling after it, whose backward tinyprop fused into this "
                "layer's; call the Conv2d, ReLU and MaxPool2d one after the other in an "
                "nn.Sequential with nothing else reading their outputs, or apply tinyprop to a "
                "model that calls them outside an nn.Sequential"
            )
        x, weight = ctx.saved_tensors  # unpacked once (activation checkpointing allows no more)
        if relu is not None:
            relu["x"] = x
        input_dtype, weight_dtype = x.dtype, weight.dtype
        layer, call = ctx.layer, ctx.call
        state = layer.tinyprop_state
        step, policy = state.step, state.policy
        if step is None and policy.skips and not state.deciding:
            warn_outside_step(state)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if relu is not None:  # the gradient at the ReLU's input y, through x
            needs_input = ctx.needs_input_grad[5]
        if geometry is None:
            geometry = call.geometry  # computed once, in the forward
        compute = compute_dtype(input_dtype, weight_dtype)  # float16 / bfloat16 -> float32
        x, weight = in_dtype(x, compute), in_dtype(weight, compute)

        delta = in_dtype(geometry.delta_matrix(grad_output), compute)  # (R, C_out, P)
        flat = delta.reshape(delta.shape[0], -1)  # (R, N)
        free = reads_are_free(flat.device)  # the host may read values (the CPU)
        if state.deciding:  # the skip decision's gradient by an output= before this layer:
            rows = torch.arange(flat.shape[0], device=flat.device)  # dense, nothing recorded
            grad_input, _ = geometry.dense_gradients(x, weight, rows, flat, needs_input, False)
            grad_input = None if grad_input is None else grad_input.to(input_dtype)
            return grad_input, None, None, None, None
        size = flat.shape[1]
        unit = step.error_unit if step is not None else 1.0  # δ per unit of one sample's loss
        drop = (
            policy.config.drop_skipped_rows
            and step is not None
            and step.couples_samples
            and rows_are_samples(step, x.shape, geometry)
        )
        keeps_everything = policy.keeps_everything(call) or is_dense_small_layer(
            policy.config, geometry
        )
        magnitude = getattr(ctx, "local_errors", None)  # from tinyprop.pool_fusion, or
        selected = None  # the kept entries, selected with Σ |δ|, or
        every_row_sum = None  # (C_out,) Σ δ over every row of δ, from the same read
        all_rows = flat.shape[0]
        # (a unit > 0 keeps Y_l = Σ |δ| / unit > 0 on the rows with entries to select)
        if magnitude is None and step is not None and unit > 0 and not (drop or keeps_everything):
            fixed = fixed_native_keep(
                policy, call, geometry, x, weight, flat, *ctx.needs_input_grad[:2]
            )
            if fixed is not None:
                sums_bias = ctx.bias_dtype is not None and needs_bias and delta.shape[2] == 1
                # None: a row left to local_error
                summed = native.topk_with_sums(flat, fixed, column_sums=sums_bias)
                if summed is not None:
                    magnitude, *selected = summed[:4]  # (R,) Σ |δ|; CSR of every row
                    every_row_sum = summed[4] if sums_bias else None
        if magnitude is None:
            magnitude = local_error(flat)  # (R,) Σ |δ| in the compute dtype
        rows = None  # None: every row, zero rows keep nothing (no host read of δ)
        poison = None  # NaN when a row's δ is not finite and a GradScaler must see it
        few = None  # a few CPU rows: their rows, k and Ymax_l in Python floats
        counts = None  # k of each row in Python ints, when a few rows' bookkeeping has them
        if step is not None and free and few_cpu_rows(magnitude):
            few = few_rows(policy, step, layer, call.depth, size, magnitude, unit, drop)
        if selected is not None and not selection_fits(few, fixed, selected[1].numel()):
            magnitude, selected = local_error(flat), None  # the code below decides as before
            few = few_rows(policy, step, layer, call.depth, size, magnitude, unit, drop)
        if few is not None:
            kept_rows, kept_errors, counts, maxima = few
            rows = list_tensor(kept_rows, torch.long)  # (R',) rows with a non-zero δ
            if len(kept_rows) < flat.shape[0]:
                flat = flat.index_select(0, rows)  # (R', N)
                delta = flat.view(len(kept_rows), *delta.shape[1:])  # (R', C_out, P)
            error = float(sum(kept_errors))  # Σ Y_l, all the rest needs of the rows' Y_l
            error_max = maxima  # (R',) Python floats: only the last one is written
            keep = list_tensor(counts, torch.long)  # (R',)
        else:
            error = magnitude.double() / unit  # (R,) Y_l, also finds NaN/inf and zero rows
            if free or step is None:
                if not bool(torch.isfinite(error).all()):
                    if step is not None and step.passes_overflow_on(layer.layer_name):
                        dtypes = (input_dtype, weight_dtype)
                        return overflowed_gradients(ctx, geometry, x, weight, delta, dtypes)
                    check_finite(error, layer.layer_name, step)
            else:  # checked once per step, when the backward has finished
                step.check_finite_later(error, layer.layer_name)
                if step.passes_overflow:
                    poison = error.sum() * 0  # () NaN when any row's Y_l is NaN or inf
            if free:
                rows = (error > 0).nonzero().flatten()  # (R',) rows with a non-zero δ
                if drop:
                    rows = skipped_rows_dropped(step, rows)  # (R'',) the trained samples' rows
                if rows.numel() < flat.shape[0]:
                    delta, flat, error = delta[rows], flat[rows], error[rows]
            elif drop:
                trained = step.stats.trained_mask.to(flat.device)  # (R,) skipped: keep nothing
                delta = delta * trained.view(-1, 1, 1).to(delta.dtype)
                flat, error = delta.reshape(delta.shape[0], -1), error * trained
            error_max = error  # k does not follow Y_l / Ymax_l: no running maximum needed
            if policy.adaptive:
                previous = step.error_max(layer) if step is not None else layer.error_max.double()
                error_max = running_max(error, previous)  # (R',) Ymax_l after each row
                if policy.config.running_max_per_batch:  # every row against the batch's Ymax_l
                    error_max = error_max[-1:].expand_as(error)  # (R',)
            keep = policy.keep_count(error, error_max, call.depth, size)  # (R',)
        limit = None  # the most each row can keep: N_l, or its non-zero entries
        if keeps_everything:
            keep = torch.full_like(keep, size)
            counts = None if counts is None else [size] * len(counts)
        elif policy.caps_keep_at_nonzero():  # a zero entry adds nothing, costs fan_in MACs
            limit = (flat != 0).sum(1)  # (R',) nnz
            keep = torch.minimum(keep, limit)  # (R',) k <= nnz
            counts = None
        if rows is None:
            keep = keep.masked_fill(error == 0, 0)  # (R,) zero rows keep nothing
        backward_step = _count_backward(layer, step, policy.random)
        if policy.adaptive and len(error_max):  # zero rows leave the running maximum as it is
            _set_error_max(layer, step, error_max[-1])

        grad_bias = None
        if ctx.bias_dtype is not None and needs_bias:
            bias_sum = None if drop else getattr(ctx, "bias_sum", None)  # pool_fusion's
            if bias_sum is None and delta.shape[0] == all_rows:  # the selection's, if any
                bias_sum = every_row_sum  # delta.sum((0, 2)) bit for bit
            if bias_sum is None:
                bias_sum = delta.sum((0, 2))  # (C_out,), dense
            grad_bias = in_dtype(bias_sum, ctx.bias_dtype)
        select = functools.partial(_select, policy, layer.layer_index, backward_step)
        needs = (needs_input, needs_weight)
        kept = None  # Σ k in a Python int, when the Python ints of k are the rows' keep
        if rows is None:  # a device that pays for host reads
            grad_input, grad_weight, keep = masked_gradients(
                policy.config.unified, select, geometry, x, weight, delta, keep,
                keeps_everything, *needs,
            )  # fmt: skip
            kernel = EVERY_ENTRY if keeps_everything else MASKED_DENSE
        elif policy.config.unified and not keeps_everything and rows.numel():
            channels = unified_channels(delta, keep)  # (K,) shared by every row
            keep = torch.full_like(keep, channels.numel() * delta.shape[2])
            grad_input, grad_weight = (None, None)
            kernel = KEPT_GROUPS if geometry.groups > 1 else KEPT_CHANNELS
            if needs_input or needs_weight:
                grad_input, grad_weight = unified_gradients(
                    geometry, x, weight, rows, delta, channels, *needs
                )
        else:
            kept = None if counts is None else sum(counts)
            defer = walk = None  # train_step(fused_update=True): SGD's update of this weight
            if step is not None and needs_weight and ctx.weight_id in step.fused_weights:
                defer = functools.partial(step.defer_update, ctx.weight_id, error, unit)
                if step.walks is not None and needs_input:  # now, in the input gradient's walk
                    walk = functools.partial(step.walk_update, ctx.weight_id)
            grad_input, grad_weight, kernel = _gradients(
                select, geometry, x, weight, rows, flat, keep, keeps_everything, *needs, defer,
                None if counts is None else (kept_rows, counts), selected, relu, walk,
            )  # fmt: skip
        if step is not None:
            full = None if counts is None else not counts or min(counts) >= size
            step.add(
                call, keep, not keeps_everything, bool(needs_input), rows is None, kernel, limit,
                full, kept,
            )  # fmt: skip
        if poison is not None:  # the scaler finds the overflow in the gradients
            grad_input = None if grad_input is None else grad_input + poison
            grad_weight = None if grad_weight is None else grad_weight + poison
        if grad_input is not None:
            grad_input = in_dtype(grad_input, input_dtype)
        proves = step is not None and poison is None and free
        if grad_weight is not None:
            grad_weight = in_dtype(grad_weight, weight_dtype)
            if proves:
                step.prove_finite(ctx.weight_id, grad_weight, x, error, unit)
        if grad_bias is not None and proves:  # Σ δ: at most Σ Y_l · unit in size
            step.prove_finite(ctx.bias_id, grad_bias, None, error, unit)
        return grad_input, grad_weight, grad_bias, None, None


def overflowed_gradients(ctx, geometry, x, weight, delta, dtypes):
    """PyTorch's dense gradients of a δ (R, C_out, P) that holds NaN or inf, for a step whose
    loss a GradScaler scaled: the overflow reaches the gradients, where the scaler finds it and
    skips the optimizer step (the step records nothing: see ``StepContext.passes_overflow``)."""
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    rows = torch.arange(delta.shape[0], device=delta.device)  # (R,)
    flat = delta.reshape(delta.shape[0], -1)  # (R, N)
    grad_input, grad_weight = geometry.dense_gradients(
        x, weight, rows, flat, needs_input, needs_weight
    )
    grad_bias = None
    if ctx.bias_dtype is not None and needs_bias:
        grad_bias = delta.sum((0, 2)).to(ctx.bias_dtype)  # (C_out,)
    input_dtype, weight_dtype = dtypes  # the gradients are returned in these
    grad_input = None if grad_input is None else grad_input.to(input_dtype)
    grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
    return grad_input, grad_weight, grad_bias, None, None


# device types where reading a value on the host costs nothing (no queue to wait for)
HOST_DEVICES = ("cpu",)


def reads_are_free(device: torch.device) -> bool:
    """True on the CPU: the backward may read values (rows with a non-zero δ, k) on the host.
    Elsewhere (CUDA) it takes the path without host reads: :func:`masked_gradients`."""
    return device.type in HOST_DEVICES


def rows_are_samples(step, shape: torch.Size, geometry) -> bool:
    """Whether the rows of a layer call with input ``shape`` are certainly the batch's B
    samples, so that ``drop_skipped_rows`` may leave out the skipped ones: a convolution's
    (B, C, ...) input (PyTorch's convolutions are batch-first), or a linear layer's input
    (B, ..., F) of B rows with no other dimension of B entries before F. A (T, B, F)
    sequence-first input with T = B cannot be told from (B, T, F), and dropping its rows
    left out time steps of the trained samples too: a wrong gradient, silently. Such calls,
    and calls with another row count ((T, B, F) with T != B, a (B·T, F) reshape), keep every
    row. (Dropping happens only while a BatchNorm couples the samples, ``couples_samples``:
    a (B, F) tensor that does not hold samples, as peft's DoRA runs lora_A and lora_B on an
    identity of in_features rows, is left alone in every model without one.)"""
    batch = step.stats.trained_mask.numel()
    if shape[0] != batch:
        return False
    return not isinstance(geometry, LinearPatches) or batch not in shape[1:-1]


def few_rows(
    policy, step, layer, depth: int, size: int, magnitude: Tensor, unit: float, drop: bool
):  # fmt: skip
    """The rows of a layer call with a non-zero δ, their Y_l, k and Ymax_l after each row, for
    a few CPU rows (:func:`tinyprop.functional.few_cpu_rows`) in Python floats: one host read
    of Σ |δ| (R,) instead of about fifteen small tensor operations (Y_l in float64, finite
    check, non-zero rows, running maximum, k), the same values bit for bit (Y_l = Σ |δ| / unit
    in float64, as ``magnitude.double() / unit``). ``drop``: leave out the skipped samples'
    rows (:func:`skipped_rows_dropped`). Returns four lists of R' values, or None when a value
    is not finite (the tensor code raises or passes it on) or k is left to the tensor code."""
    if unit == 0:  # Y_l = ±inf / NaN: the tensor code decides
        return None
    values = [value / unit for value in magnitude.tolist()]  # (R,) Y_l
    if not math.isfinite(sum(values)):  # a NaN / inf Y_l (or a sum past float64's range)
        return None
    if min(values, default=1.0) > 0:  # every row (the common case, without the loops)
        rows, errors = list(range(len(values))), values
    else:
        rows = [row for row, value in enumerate(values) if value > 0]
        errors = [values[row] for row in rows]
    if drop:
        trained = step.stats.trained_mask.tolist()  # (B,)
        rows = [row for row in rows if trained[row]]
        errors = [values[row] for row in rows]
    maxima = errors  # k does not follow Y_l / Ymax_l: no running maximum needed
    if policy.adaptive:
        previous = step.error_max_float(layer)
        maxima = scalar_running_max(errors, previous, policy.config.running_max_per_batch)
        if maxima is None:
            return None
    counts = policy.scalar_keep_counts(errors, maxima, depth, size)
    if counts is None:
        return None
    return rows, errors, counts, maxima


def skipped_rows_dropped(step, rows: Tensor) -> Tensor:
    """``rows`` (R',) without the rows of skipped samples, for a layer call whose rows are the
    batch's samples (:func:`rows_are_samples`)."""
    trained = step.stats.trained_mask  # (B,)
    if bool(trained.all()):
        return rows
    return rows[trained.to(rows.device)[rows]]  # (R'',)


def is_dense_small_layer(config, geometry) -> bool:
    """Whether ``dense_small_layers`` backpropagates this layer call densely (k = N, no
    selection): a convolution with a fan-in below ``DENSE_SMALL_FAN_IN``, whose selection
    alone costs more than its dense backward."""
    small = not isinstance(geometry, LinearPatches) and geometry.fan_in < DENSE_SMALL_FAN_IN
    return config.dense_small_layers and small


def unified_channels(delta: Tensor, keep: Tensor) -> Tensor:
    """meProp's unified top-k: the output channels every row of a layer call keeps.

    ``delta`` (R', C_out, P), ``keep`` (R',) k per row. Returns the ⌈mean k / P⌉ channels of
    largest Σ |δ| over the rows and positions (at least one), ascending, ties to the lower
    index: (K,) long.
    """
    rows, channels_out, positions = delta.shape
    mean_keep = -(-int(keep.sum()) // rows)  # ⌈mean k⌉
    count = min(max(-(-mean_keep // positions), 1), channels_out)
    score = delta.abs().sum((0, 2)).unsqueeze(0)  # (1, C_out)
    return select_topk(score, torch.full((1,), count, device=delta.device))[1]


def unified_gradients(geometry, x, weight, rows, delta, channels, needs_input, needs_weight):
    """Input and weight gradients from the kept channels of δ (R', C_out, P), shared by every
    row: the dense kernels on the kept channels only, a K / C_out smaller product (for grouped
    convolutions, on the groups holding a kept channel: see :func:`unified_group_gradients`)."""
    if geometry.groups > 1:
        return unified_group_gradients(
            geometry, x, weight, rows, delta, channels, needs_input, needs_weight
        )
    kept = copy.copy(geometry)  # the same layer with only the kept output channels
    kept.channels_out = channels.numel()
    kept_delta = delta[:, channels].reshape(delta.shape[0], -1)  # (R', K · P)
    grad_input, kept_grad = kept.dense_gradients(
        x, weight[channels], rows, kept_delta, needs_input, needs_weight
    )
    grad_weight = None
    if kept_grad is not None:  # zero rows for the channels nobody kept
        grad_weight = weight.new_zeros(weight.shape)
        grad_weight[channels] = kept_grad.reshape(-1, *weight.shape[1:])
    return grad_input, grad_weight


def unified_group_gradients(
    geometry, x, weight, rows, delta, channels, needs_input, needs_weight
):  # fmt: skip
    """:func:`unified_gradients` of a grouped convolution (a depthwise one: a group per
    channel). Its groups cannot be cut apart, but a group without a kept channel has a zero
    gradient and passes none to its inputs: the dense kernels run on the G' groups that hold
    a kept channel (the other channels of those groups masked), a G' / G smaller
    convolution, and the gradients of the other groups are zeros."""
    groups, channels_out = geometry.groups, geometry.channels_out
    per_group, channels_per_group = channels_out // groups, geometry.channels_per_group
    touched = torch.unique(channels // per_group)  # (G',) ascending
    out_channels = (touched.unsqueeze(1) * per_group + torch.arange(per_group)).flatten()
    in_channels = touched.unsqueeze(1) * channels_per_group + torch.arange(channels_per_group)
    in_channels = in_channels.flatten()  # (G' · C_in / G,)
    kept = torch.isin(out_channels, channels).view(1, -1, 1)  # (1, G' · C_out / G, 1)
    masked = torch.where(kept, delta[:, out_channels], 0)  # (R', G' · C_out / G, P)
    smaller = copy.copy(geometry)  # the same layer on the touched groups only
    smaller.groups, smaller.channels_out = touched.numel(), out_channels.numel()
    smaller.channels_in = in_channels.numel()
    grad_part, weight_part = smaller.dense_gradients(
        x[:, in_channels], weight[out_channels], rows, masked.reshape(delta.shape[0], -1),
        needs_input, needs_weight,
    )  # fmt: skip
    grad_input = grad_weight = None
    if grad_part is not None:
        grad_input = x.new_zeros(x.shape)  # (B, C_in, *spatial)
        grad_input[:, in_channels] = grad_part
    if weight_part is not None:
        grad_weight = weight.new_zeros(weight.shape)  # (C_out, C_in / G, *kernel)
        grad_weight[out_channels] = weight_part
    return grad_input, grad_weight


def masked_gradients(
    unified, select, geometry, x, weight, delta, keep, keeps_everything, needs_input,
    needs_weight,
):  # fmt: skip
    """Input and weight gradients without reading anything on the host (for CUDA): every row
    of δ (R, C_out, P), the kept entries as a mask, the dense kernels on the masked δ.

    ``keep`` (R,) is 0 on the rows whose δ is zero. Returns ``(grad_input, grad_weight, keep)``
    with ``keep`` as the ledger counts it (K · P for every trained row under ``unified``).
    """
    flat = delta.reshape(delta.shape[0], -1)  # (R, N)
    if keeps_everything:
        masked = flat
    elif unified:  # the ⌈mean k / P⌉ channels of largest Σ |δ|, as unified_channels
        channels_out, positions = delta.shape[1:]
        trained = (keep > 0).sum().clamp_min(1)
        mean_keep = -(-keep.sum() // trained)  # ⌈mean k⌉ over the trained rows
        count = (-(-mean_keep // positions)).clamp(1, channels_out)  # () K
        score = delta.abs().sum((0, 2)).unsqueeze(0)  # (1, C_out)
        channels = select_mask(score, count.reshape(1))  # (1, C_out)
        masked = torch.where(channels.unsqueeze(2), delta, 0).reshape(flat.shape)
        keep = torch.where(keep > 0, count * positions, 0)
    else:
        masked = select(flat, keep, mask_only=True)  # (R, N)
    if not (needs_input or needs_weight):
        return None, None, keep
    rows = torch.arange(flat.shape[0], device=flat.device)  # (R,)
    grad_input, grad_weight = geometry.dense_gradients(
        x, weight, rows, masked, needs_input, needs_weight
    )
    return grad_input, grad_weight, keep


def _gradients(
    select, geometry, x, weight, rows, flat, keep, keeps_everything, needs_input, needs_weight,
    defer=None, counts=None, selected=None, relu=None, walk=None,
):  # fmt: skip
    """Input and weight gradients of the rows ``rows`` (R',) from their kept entries, and the
    kernel that computed them (one of :data:`KERNELS`). ``defer(x, row_start, column, value)``:
    takes the native Linear kernel's kept entries for a fused SGD update instead of the weight
    gradient (which is then None) when it returns True. ``counts``: ``rows`` and ``keep`` as
    two lists of Python ints when a few rows' bookkeeping has them (fewer tensor operations,
    the same gradients), else None. ``selected``: the kept entries of the whole batch as
    (row_start (B + 1,), column (M,), value (M,)) when :func:`fixed_native_keep`'s selection
    found them already (the native kernel then runs on them), else None. ``relu``: None, or
    (``x`` is a fused ReLU's output) a dict whose "masked" is set True when the native
    kernel returns the input gradient at the ReLU's input. ``walk(x, row_start, column, value,
    relu_mask)``: the input gradient of the one walk that also steps the weight (then no
    weight gradient), or None (:meth:`tinyprop.step.StepContext.walk_update`)."""
    if not (needs_input or needs_weight):
        return None, None, NO_GRADIENT
    if rows.numel() == 0:  # every row's δ is zero (e.g. every sample skipped)
        grad_input = torch.zeros_like(x) if needs_input else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        return grad_input, grad_weight, NO_ROW
    if keeps_everything:  # a dense output layer: no selection
        return (
            *geometry.dense_gradients(x, weight, rows, flat, needs_input, needs_weight),
            EVERY_ENTRY,
        )

    is_linear = isinstance(geometry, LinearPatches)
    if selected is not None:  # fixed_native_keep made sure the native kernel runs on them
        use_native = True
        row_start, entry, value = selected  # (R + 1,), (M,), (M,)
    else:
        use_native, limit = kernel_choice(geometry, x, weight)
        kept = int(keep.sum()) if counts is None else sum(counts[1])  # M
        if kept > limit * flat.numel():  # dense kernels on the masked δ
            masked = select(flat, keep, masked=True)  # (R', N)
            return (
                *geometry.dense_gradients(x, weight, rows, masked, needs_input, needs_weight),
                MASKED_DENSE,
            )
        local_row, entry, value = select(flat, keep, with_rows=not use_native, total=kept)
    if use_native:
        if selected is None:  # (R + 1,) CSR offsets of the kept entries
            row_start = kept_row_start(x.shape[0], rows, keep, counts)
        if is_linear and walk is not None:
            grad_input = walk(x, row_start, entry, value, relu is not None)
            if grad_input is not None:
                if relu is not None:  # the kernel masks by x
                    relu["masked"] = True
                return grad_input, None, FUSED_UPDATE
        if is_linear and defer is not None and defer(x, row_start, entry, value):
            grad_input = None
            if needs_input:
                if relu is not None:  # the kernel masks by x
                    relu["masked"] = True
                grad_input, _ = geometry.native_gradients(
                    x, weight, row_start, entry, value, True, False, relu is not None
                )
            return grad_input, None, FUSED_UPDATE
        if relu is not None:  # the kernel masks by x
            relu["masked"] = True
            return (
                *geometry.native_gradients(
                    x, weight, row_start, entry, value, needs_input, needs_weight, True
                ),
                NATIVE_SPARSE,
            )
        return (
            *geometry.native_gradients(
                x, weight, row_start, entry, value, needs_input, needs_weight
            ),
            NATIVE_SPARSE,
        )
    return (
        *pytorch_sparse_gradients(
            geometry, x, weight, rows, local_row, entry, value, needs_input, needs_weight
        ),
        PYTORCH_SPARSE,
    )


def kept_row_start(batch: int, rows: Tensor, keep: Tensor, counts) -> Tensor:
    """(B + 1,) CSR offsets of the kept entries of a batch whose rows ``rows`` (R',) keep
    ``keep`` (R',) entries each and the other rows none; ``counts``: ``rows`` and ``keep`` as
    Python ints, or None."""
    if counts is not None:  # from the Python ints
        return torch.tensor(csr_offsets(batch, *counts), dtype=torch.long)
    row_start = torch.zeros(batch + 1, dtype=torch.long)  # (B + 1,)
    if rows.numel() == batch:  # every row
        torch.cumsum(keep, 0, out=row_start[1:])
        return row_start
    row_start[rows + 1] = keep  # zero rows keep nothing
    return row_start.cumsum(0)


def kernel_choice(geometry, x: Tensor, weight: Tensor) -> tuple[bool, float]:
    """Whether a layer call's kept entries go to the native kernels, and the share of kept
    entries above which the dense kernels on the masked δ run instead (the *_DENSITY limits)."""
    is_linear = isinstance(geometry, LinearPatches)
    use_native = native.can_backward(x, weight) and (
        x.dim() == 2
        if is_linear
        else geometry.fan_in >= NATIVE_CONV_MIN_FAN_IN or geometry.one_channel_per_group
    )
    if use_native and not is_linear and geometry.one_channel_per_group:
        limit = NATIVE_DEPTHWISE_DENSE_KERNEL_DENSITY
        if geometry.groups == 1:  # one input channel: PyTorch's dense kernel is fast there
            limit = NATIVE_ONE_CHANNEL_DENSE_KERNEL_DENSITY
    elif use_native:
        limit = NATIVE_DENSE_KERNEL_DENSITY if is_linear else NATIVE_CONV_DENSE_KERNEL_DENSITY
    else:
        limit = DENSE_KERNEL_DENSITY if is_linear else CONV_DENSE_KERNEL_DENSITY
    return use_native, limit


def fixed_native_keep(
    policy, call, geometry, x, weight, flat, needs_input, needs_weight
) -> int | None:  # fmt: skip
    """k of every row when the native selection may take each row's Σ |δ| from the same read
    of δ (:func:`tinyprop.native.topk_with_sums`), else None. Only where Y_l decides nothing
    but which rows are zero (and the bounds of ``prove_finite`` and the fused update): a
    fixed-ratio top-k (k does not follow Y_l), no random scores, no cap at the non-zero
    entries, not unified; a Linear layer or convolution whose kept entries go to the native
    kernel (k within its density limit), on
    a few float32 CPU rows (:func:`tinyprop.functional.few_cpu_rows`, which the caller's
    bookkeeping then runs). The caller leaves out dense layers and dropped rows."""
    rows, size = flat.shape
    if (
        policy.adaptive
        or policy.random
        or policy.config.unified
        or policy.caps_keep_at_nonzero()
        or not (needs_input or needs_weight)
        or not 0 < rows <= SCALAR_ROWS
        or flat.dtype != torch.float32
        or not native.can_select(flat)
    ):
        return None
    use_native, limit = kernel_choice(geometry, x, weight)
    counts = policy.scalar_keep_counts([0.0], [0.0], call.depth, size)
    if not use_native or counts is None or not 1 <= counts[0] <= limit * size:
        return None
    return counts[0]


def selection_fits(few, fixed: int, kept: int) -> bool:
    """Whether :func:`few_rows`' bookkeeping ``few`` trains exactly the rows the native
    selection kept ``kept`` entries of, ``fixed`` each (the rows with Σ |δ| > 0), each with
    k = ``fixed``. Under a unit > 0 the rows it trains (Y_l = Σ |δ| / unit > 0) are among
    those, so it trains them all when there are as many; fewer when a Y_l rounds to 0."""
    if few is None:
        return False
    rows, _, counts, _ = few
    return len(rows) * fixed == kept and counts.count(fixed) == len(counts)


def csr_offsets(batch: int, rows: list[int], counts: list[int]) -> list[int]:
    """CSR offsets (B + 1,) of the kept entries of a batch whose rows ``rows`` (ascending) keep
    ``counts`` entries each and the other rows none."""
    kept = [0] * batch
    for row, count in zip(rows, counts, strict=True):
        kept[row] = count
    offsets = [0]
    for count in kept:
        offsets.append(offsets[-1] + count)
    return offsets


def _select(policy, layer_index: int, backward_step: int, flat: Tensor, keep: Tensor,
            masked: bool = False, with_rows: bool = True, mask_only: bool = False,
            total: int | None = None):  # fmt: skip
    """The kept entries of δ (R', N): top-|δ| for every policy but random-k.

    Returns ``(rows, columns, values)``, three (M,) tensors in row-major order (``rows`` None
    without ``with_rows``, from the native kernel), or with ``masked`` the (R', N) tensor of δ
    at the kept entries and zeros elsewhere; ``mask_only`` gives that tensor from
    :func:`select_mask`, without reading anything on the host. ``total``: M = Σ keep when the
    caller knows it.
    """
    if mask_only:
        scores = policy.scores(flat, layer_index, backward_step)  # (R, N)
        return torch.where(select_mask(scores, keep), flat, 0)
    if not policy.random and native.can_select(flat):  # one compiled pass
        return native.topk(flat, keep, masked=masked, with_rows=with_rows, total=total)
    scores = policy.scores(flat, layer_index, backward_step)  # (R', N)
    rows, columns = select_topk(scores, keep)  # (M,), (M,)
    values = flat[rows, columns]  # (M,)
    if masked:
        return torch.zeros_like(flat).index_put_((rows, columns), values)
    return rows, columns, values


def warn_outside_step(state) -> None:
    """Warn once that the backward of a skipping policy (tinypropv2) did not start from
    tinyprop.loss: nothing is skipped."""
    if "outside a step" in state.warned:
        return
    state.warned.add("outside a step")
    warnings.warn(
        f"{state.policy.name}: this backward did not start from tinyprop.loss or "
        "tinyprop.backward, so "
        "no sample is skipped (the layers still keep k of each row's output gradient, with "
        "their local errors in units of the loss as given). Backpropagate "
        "tinyprop.loss(model, per_sample_losses) instead of the plain mean loss.",
        stacklevel=2,
    )


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the sparse backward computes in: the widest input, at least float32."""
    if all(dtype == torch.float32 for dtype in dtypes):  # the common case, without dispatch
        return torch.float32
    widest = functools.reduce(torch.promote_types, dtypes)
    return torch.promote_types(widest, torch.float32)


def in_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` (the tensor itself when it has that dtype), without a dispatch
    when nothing changes."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def check_finite(error: Tensor, layer_name: str, step) -> None:
    """A clear error, before anything is updated, when a row's δ holds NaN or inf."""
    finite = torch.isfinite(error)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    if step is not None:
        step.failed = True
    raise FloatingPointError(
        f"the output gradient of layer '{layer_name}' is NaN or infinite in rows {bad[:10]} "
        "(rows of that layer's input); no update was applied. A loss can be finite while its "
        "gradient is not (e.g. sqrt or log at 0): check the loss and the inputs. Under a "
        "GradScaler (fp16), backpropagate scaler.scale(tinyprop.loss(model, losses)) or call "
        "tinyprop.backward(..., grad_scaler=scaler): an overflow then skips the step"
    )


def _count_backward(layer, step, read: bool) -> int | None:
    """Count the layer's backward pass, in the step or the buffer; its number (seeds
    random-k) when ``read``, else None (nothing read on the host)."""
    if step is not None:
        return step.next_backward_step(layer, read)
    layer.backward_steps += 1
    return int(layer.backward_steps) if read else None


def _set_error_max(layer, step, value: Tensor) -> None:
    if step is not None:
        step.set_error_max(layer, value)
    else:
        layer.error_max.copy_(value)  # float64 -> the buffer's dtype, no host read


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
            patch,
            channel,
            value,
            (patch_count, channels_out),
            grouped=one_patch_per_sample,
        )
        grad_patches = kept_t @ weight.reshape(channels_out, fan_in)  # (U, fan_in)
        grad_input = geometry.scatter(
            grad_patches, unique_sample, unique_position, unique_group, x.shape
        )
    return grad_input, grad_weight
