"""Conv2d -> ReLU -> MaxPool2d: the pooling's and the ReLU's backward fused into the sparse one.

A small CNN's block ``nn.Sequential(..., conv, nn.ReLU(), nn.MaxPool2d(2), ...)`` hands its
convolution an output gradient δ that is zero everywhere but at each pool window's maximum
where the ReLU was active (at most a quarter of the entries behind a 2x2 pool). PyTorch gets
there in two passes over the convolution's whole output (max pooling's backward fills a zero
tensor and scatters the pooled gradient into it; ReLU's backward masks it again). Here the
pool module of such a block, when its input is exactly the ReLU of a sparse convolution's
output, runs one autograd node in their place: its forward is the pool's own
(``max_pool2d_with_indices`` on the ReLU's output: the native kernel's for 2x2 windows, else
PyTorch's kernel on a channels-last copy; the same maxima and indices, several times faster
than PyTorch's kernel on the contiguous output), its backward writes δ
in one pass from the pooled gradient g, the pooled values z and the window maxima:

    δ[argmax of window q] = 0 + g[q] where not z[q] <= 0, and 0 everywhere else,

the values PyTorch's max-pool backward (``0 + g``) and ReLU backward (``r <= 0 ? 0 : grad``,
with r = z at the window's maximum) write, bit for bit, and hands it to the convolution's
sparse backward (:class:`tinyprop.autograd.SparseBackprop`): the same kept entries, gradients
and ledger as without the fusion. Where k does not read the local error Y_l (every policy but
TinyProp and TinyPropv2), the same pass also sums each sample's Σ |δ| (which then only finds
the zero rows and bounds the gradients) and the bias gradient Σ δ, in float64 from the pooled
entries (in a fixed order, the same at every thread count; PyTorch's float32 sums of δ round
differently), instead of two more passes over δ; TinyProp's k reads Y_l, which stays PyTorch's
own float32 sum. Under plain top-k with the native kernels, δ is not even written
(:func:`selected_backward`): each sample's row is built in the cache and its k entries are
selected there, the same entries as from the written δ.

Only non-overlapping windows (stride = kernel size, no padding, dilation 1, floor mode), float32
on the CPU with the native kernels, modules without hooks, outside activation checkpointing,
and outputs of at least ``MIN_ENTRIES`` entries (below it the fused node costs more than it
saves); anything else runs the three modules as PyTorch does. The block must sit in an
``nn.Sequential`` (so the convolution's and the ReLU's outputs go nowhere else); should they
reach another node after all, the convolution's own backward stops with an error instead of
summing a gradient that missed the selection.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyprop import native
from tinyprop.autograd import (
    NATIVE_SPARSE,
    NO_ROW,
    SparseBackprop,
    _count_backward,
    csr_offsets,
    in_dtype,
    is_dense_small_layer,
    kernel_choice,
)
from tinyprop.policies import Policy

# Below this many entries of the convolution's output the fused node's fixed cost (Python, one
# more call) outweighs the two passes it saves: the mnist CNN of the fine-tuning benchmark at
# batch 16 (100,352 entries, one thread, process time, min of 30 chunks of 20 steps):
# tinypropv2 4.07 ms a step fused against 3.69 unfused, topk 0.05 3.50 against 3.34
MIN_ENTRIES = 1 << 18

# SparseBackprop's node (ctx) of a convolution whose pooled output a fused node backpropagates
# holds it in pool_fusion: that node runs its backward instead
FUSED = "fused"


class FusedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` after a sparse ``Conv2d`` and an ``nn.ReLU`` in an ``nn.Sequential``:
    the same forward, with the three backward passes fused when it can (see module docstring).
    ``tinyprop_fused_convs``: the convolutions it follows (by id)."""

    tinyprop_fused_convs: frozenset

    def _get_name(self) -> str:  # printed as the module it stands for
        return "MaxPool2d"

    def forward(self, input: Tensor) -> Tensor:
        node = fusable_node(self, input)
        if node is None:
            return super().forward(input)
        x, weight = node.saved_tensors  # the convolution's (no saved-tensor hook runs)
        bias = node.layer.bias if node.bias_dtype is not None else None  # as it was called
        return PooledSparseBackprop.apply(x, weight, bias, input.detach(), self, node)


class PooledSparseBackprop(torch.autograd.Function):
    """z = MaxPool2d(r) with r = ReLU(conv(x)) computed by the modules before; backward: δ of
    the convolution's output from the pooled gradient, then its sparse backward, as the
    convolution's own node would run it."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu_output: Tensor, pool: nn.MaxPool2d, node) -> Tensor:
        pooled, indices = pool_forward(relu_output, pool)  # (B, C, H', W') each
        ctx.layer, ctx.call, ctx.weight_id = node.layer, node.call, node.weight_id
        ctx.bias_id = node.bias_id
        ctx.bias_dtype, ctx.input_shape = node.bias_dtype, relu_output.shape
        ctx.save_for_backward(x, weight, pooled, indices)
        node.pool_fusion = FUSED  # the convolution's own backward must never run now
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):
        x, weight, pooled, indices = ctx.saved_tensors
        selected = selected_backward(ctx, x, weight, grad_pooled, pooled, indices)
        if selected is not None:
            return (*selected, None, None, None)
        local_errors = bias_sum = None
        if ctx.layer.tinyprop_state.policy.adaptive:  # k reads Y_l: PyTorch's own sum of |δ|
            delta = native.relu_unpool(grad_pooled, pooled, indices, ctx.input_shape)
        else:  # Σ |δ| (B,) and Σ δ (C_out,) from the pooled entries, in the same pass
            delta, local_errors, bias_sum = native.relu_unpool(
                grad_pooled, pooled, indices, ctx.input_shape, sums=True
            )
        convolution = SimpleNamespace(  # what SparseBackprop's node holds
            layer=ctx.layer, call=ctx.call, weight_id=ctx.weight_id, bias_id=ctx.bias_id,
            bias_dtype=ctx.bias_dtype, needs_input_grad=ctx.needs_input_grad,
            saved_tensors=(x, weight), local_errors=local_errors, bias_sum=bias_sum,
        )  # fmt: skip
        grad_input, grad_weight, grad_bias = SparseBackprop.layer_backward(
            convolution, delta, None
        )[:3]
        return grad_input, grad_weight, grad_bias, None, None, None


def pool_forward(relu_output: Tensor, pool: nn.MaxPool2d) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d_with_indices`` of the ReLU's output (B, C, H, W) float32, the same maxima
    and indices bit for bit, returned contiguous: 2x2 windows by :func:`tinyprop.native.max_pool`
    where the kernels run them vectorized (the small CNN's first pooling, 128 x 16 x 28 x 28,
    one thread: 0.3 ms against 1.3 by :func:`channels_last_pool`, 6.3 by PyTorch's own),
    other windows by :func:`channels_last_pool`."""
    window = _pair(pool.kernel_size)
    if window == (2, 2) and native.library().tp_max_pool_2x2_vectorized():
        return native.max_pool(relu_output, window)
    return channels_last_pool(relu_output, pool)


def channels_last_pool(relu_output: Tensor, pool: nn.MaxPool2d) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d_with_indices`` of the ReLU's output (B, C, H, W) float32, PyTorch's own
    kernel run on a channels-last copy: the same maxima and window indices bit for bit (each
    window's first maximum, a NaN where the window holds one), returned contiguous as the plain
    module returns them. PyTorch's kernel for contiguous (B, C, H, W) input walks each window
    one entry at a time; on channels-last input it compares C channels at once. The copies of
    the floats are the native layout kernels' (PyTorch's own transposing copy took two to three
    times longer): the small CNN's first pooling (128 x 16 x 28 x 28, one thread) 5.9 ms
    against 1.7, copies included."""
    unpadded = (0, 0, 0, 0)
    wide = native.channels_last(relu_output, unpadded).permute(0, 3, 1, 2)  # (B, C, H, W)
    pooled, indices = F.max_pool2d_with_indices(wide, pool.kernel_size, pool.stride)
    pooled = native.channels_first(pooled.permute(0, 2, 3, 1), unpadded)  # (B, C, H', W')
    return pooled, indices.contiguous()


def selected_backward(ctx, x, weight, grad_pooled, pooled, indices):
    """The convolution's sparse backward for plain top-k (the same k in every row, the native
    kernels) without δ ever written: :func:`tinyprop.native.pooled_topk` builds each sample's
    row of δ in the cache from the pooled gradient, selects its k entries there and sums
    Σ |δ| and Σ δ on the way. The same kept entries, gradients and records as
    :class:`tinyprop.autograd.SparseBackprop`'s backward on the written δ (Σ |δ| and the bias
    gradient as that path sums them under this fusion: float64 from the pooled entries).
    Returns ``(grad_input, grad_weight, grad_bias)``, or None where that backward must run
    (another policy or kernel, a NaN / ±Inf δ, a create_graph backward, no step)."""
    layer, call = ctx.layer, ctx.call
    state = layer.tinyprop_state
    step, policy, geometry = state.step, state.policy, call.geometry
    config = policy.config
    if (
        type(policy) is not Policy  # k from Y_l, random scores, or no selection
        or step is None
        or state.deciding
        or torch.is_grad_enabled()
        or config.unified
        or policy.caps_keep_at_nonzero()
        or policy.keeps_everything(call)
        or is_dense_small_layer(config, geometry)
        or (config.drop_skipped_rows and step.couples_samples)
    ):
        return None
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    size = geometry.channels_out * geometry.positions  # N
    use_native, limit = kernel_choice(geometry, x, weight)
    keep_count = policy.scalar_keep_counts([0.0], [0.0], call.depth, size)[0]  # k of every row
    if not use_native or not (needs_input or needs_weight) or keep_count > limit * size:
        return None
    selected = native.pooled_topk(grad_pooled, pooled, indices, ctx.input_shape, keep_count)
    if selected is None:  # a NaN / ±Inf δ
        return None
    columns, values, magnitude, bias_sum = selected  # (B k,), (B k,), (B,), (C_out,)
    unit = step.error_unit
    if unit == 0:  # Y_l = ±inf / NaN: the written path decides
        return None
    errors = [value / unit for value in magnitude.tolist()]  # (B,) Y_l = Σ |δ| / unit, float64
    error = sum(errors)  # Σ Y_l, all the bound of the gradients needs
    if not math.isfinite(error):  # a NaN / inf Y_l (or a sum past float64's range)
        return None
    batch = x.shape[0]
    rows = [row for row, value in enumerate(errors) if value > 0]  # rows with a non-zero δ
    trained = len(rows)
    if trained and keep_count * trained > limit * (trained * size):  # as _gradients decides
        return None
    if trained < batch:  # a zero row keeps nothing
        index = torch.tensor(rows, dtype=torch.long)  # (R',)
        columns = columns.view(batch, keep_count)[index].flatten()  # (R' k,)
        values = values.view(batch, keep_count)[index].flatten()
        offsets = csr_offsets(batch, rows, [keep_count] * trained)
        row_start = torch.tensor(offsets, dtype=torch.long)  # (B + 1,) CSR
    else:
        row_start = torch.arange(0, (batch + 1) * keep_count, keep_count)  # (B + 1,) CSR
    keep = torch.full((trained,), keep_count, dtype=torch.long)  # (R',)
    _count_backward(layer, step, False)
    grad_bias = None
    if ctx.bias_dtype is not None and needs_bias:
        grad_bias = in_dtype(bias_sum, ctx.bias_dtype)  # (C_out,), dense
    if trained == 0:  # every row's δ is zero
        grad_input = torch.zeros_like(x) if needs_input else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        kernel = NO_ROW
    else:
        grad_input, grad_weight = geometry.native_gradients(
            x, weight, row_start, columns, values, needs_input, needs_weight
        )
        kernel = NATIVE_SPARSE
    full = trained == 0 or keep_count >= size  # every row kept its most
    step.add(call, keep, True, bool(needs_input), False, kernel, None, full, keep_count * trained)
    if grad_weight is not None:
        step.prove_finite(ctx.weight_id, grad_weight, x, error, unit)
    if grad_bias is not None:  # Σ δ: at most Σ Y_l · unit in size
        step.prove_finite(ctx.bias_id, grad_bias, None, error, unit)
    return grad_input, grad_weight, grad_bias


def fusable_node(pool: FusedMaxPool2d, input: Tensor):
    """The SparseBackprop node of the convolution whose ReLU'd output ``input`` is, when the
    fused backward may run for this call; else None."""
    if not (
        torch.is_grad_enabled()
        and isinstance(input, Tensor)
        and input.dim() == 4
        and input.dtype == torch.float32
        and input.device.type == "cpu"
        and input.numel() >= MIN_ENTRIES
        and input.grad_fn is not None
        and input.grad_fn.name() == "ReluBackward0"
    ):
        return None
    node = input.grad_fn.next_functions[0][0]
    if type(node) is not SparseBackprop._backward_cls:
        return None
    if id(node.layer) not in pool.tinyprop_fused_convs:
        return None
    if getattr(node, "pool_fusion", None) is not None or not non_overlapping(pool):
        return None
    if _parametrized_bias(node.layer):
        return None
    return node if fusion_allowed(pool, node.layer) else None


def _parametrized_bias(layer: nn.Module) -> bool:
    """A bias computed at each access (``torch.nn.utils.parametrize``): the fused pool would
    compute it again instead of taking the convolution's (a dropout of the bias draws another
    mask: a wrong bias gradient, silently)."""
    parametrizations = layer._modules.get("parametrizations")
    return parametrizations is not None and "bias" in parametrizations._modules


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def global_module_hooks() -> bool:
    """Whether module hooks registered for every module (``register_module_forward_hook``
    and the like) are in place."""
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def fusion_allowed(pool: nn.Module, conv: nn.Module) -> bool:
    """No hooks that would see (or change) what the fusion leaves out, not under activation
    checkpointing or a saved-tensor hook, not while compiling or tracing, native kernels."""
    if has_hooks(pool) or has_hooks(conv) or global_module_hooks():
        return False
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    if torch._C._current_graph_task_id() != -1:  # checkpointing runs the forward again
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return native.library() is not None


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def non_overlapping(module: nn.Module) -> bool:
    """A max pooling with non-overlapping windows: stride = kernel size, no padding, dilation
    1, floor mode, no indices returned."""
    stride = module.stride if module.stride is not None else module.kernel_size
    return (
        _pair(stride) == _pair(module.kernel_size)
        and _pair(module.padding) == (0, 0)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
    )


def plain_sequential_children(model: nn.Module):
    """The children of every ``nn.Sequential`` in ``model`` whose forward is
    ``nn.Sequential``'s own, in the order it calls them (a subclass with a forward of its own
    may call them in another)."""
    for module in model.modules():
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            yield list(module._modules.values())


def swap_classes(links: dict, fused_class: type, original_class: type) -> list[nn.Module]:
    """Swap the class of each module of ``links`` (id -> (module, ids of the sparse
    convolutions it is fused with)) to ``fused_class``; returns the swapped modules (for
    :func:`restore_classes`)."""
    modules = []
    for module, convs in links.values():
        module.__class__ = fused_class
        module.tinyprop_fused_convs = frozenset(convs)
        module._tinyprop_original_class = original_class  # what it computes (the exporter reads it)
        modules.append(module)
    return modules


def restore_classes(modules: list[nn.Module], original_class: type) -> None:
    """Undo :func:`swap_classes`."""
    for module in modules:
        module.__class__ = original_class
        del module.tinyprop_fused_convs, module._tinyprop_original_class


def fuse_pools(model: nn.Module, convolutions: list[nn.Module]) -> list[nn.Module]:
    """Swap the class of every pool that follows a sparse ``Conv2d`` (one of ``convolutions``)
    and an ``nn.ReLU`` in an ``nn.Sequential`` of ``model``; returns the swapped pools (for
    :func:`restore_pools`)."""
    sparse = {id(conv) for conv in convolutions if isinstance(conv, nn.Conv2d)}
    links: dict[int, tuple[nn.Module, set[int]]] = {}
    for children in plain_sequential_children(model):
        for conv, relu, pool in zip(children, children[1:], children[2:], strict=False):
            if (
                id(conv) in sparse
                and type(relu) is nn.ReLU
                and type(pool) is nn.MaxPool2d
                and non_overlapping(pool)
            ):
                links.setdefault(id(pool), (pool, set()))[1].add(id(conv))
    return swap_classes(links, FusedMaxPool2d, nn.MaxPool2d)


def restore_pools(pools: list[nn.Module]) -> None:
    """Undo :func:`fuse_pools`."""
    restore_classes(pools, nn.MaxPool2d)
