"""SGD's update of sparse Linear weights fused with their backward: ``train_step(...,
fused_update=True)``.

At batch 128 and 5% kept per sample, nearly every row of a Linear weight is kept by some sample
(0.95^128 = 0.14% are not), so the weight gradient W' (out, in) is a whole dense matrix: the
backward writes it, the gradient check and the optimizer read it again. With SGD none of this
is needed: the native kernel sums each gradient row from the kept entries of δ and applies
SGD's step to the weight row (and its momentum buffer) right there, once the whole step has
been checked:

- plain SGD: ``W ← W - lr · W'`` (a row nobody kept stays as it is);
- with momentum: ``buf ← momentum · buf + (1 - dampening) · W'`` (``buf ← W'`` on the first
  step), ``W ← W - lr · buf``, or with Nesterov ``W ← W - lr · (W' + momentum · buf)``; every
  row moves, a row nobody kept with a zero gradient.

The weights and momentum buffers come out as ``torch.optim.SGD`` leaves them (the same sums in
the same order, rounded as its CPU step rounds them); the buffer is the optimizer's own
``state[weight]["momentum_buffer"]``; the weights' ``.grad`` stays None.

Only where that is exactly SGD's update: ``torch.optim.SGD`` without weight decay or
``maximize``, not ``differentiable`` or ``fused``, a float learning rate and no optimizer
hooks; a float32, contiguous CPU weight of a sparse ``nn.Linear``, without gradient hooks, whose
momentum buffer (if the optimizer holds one) is float32 and contiguous, updated by its native
kernel (2-D input); a weight gradient the bound of ``StepContext.prove_finite`` proves finite;
a weight of one call in the step's forward. Every other parameter (biases, other layers, a
weight two calls use: a layer called twice, tied weights) steps through the optimizer; so does
a weight that also gets a gradient from elsewhere (``F.linear`` of it, an embedding tied to
it), its fused part added to that gradient (:func:`fold_into_gradients`).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn
from torch.autograd.graph import increment_version

from tinyprop import native
from tinyprop.layers import TinyPropLinear
from tinyprop.model import state_of


def fusable_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, nn.Parameter]:
    """id -> weight of the sparse Linear layers whose SGD update can be fused (see the module
    docstring); empty (with one warning) when the optimizer is not such an SGD."""
    state = state_of(model)
    if not fusable_sgd(optimizer) or native.library() is None:
        if "fused update" not in state.warned:
            state.warned.add("fused update")
            warnings.warn(
                "fused_update=True fuses the update of torch.optim.SGD (momentum, dampening and "
                "nesterov included) without weight decay, maximize, fused=True, "
                "differentiable=True or hooks (float lr), with the native kernels; this "
                f"{type(optimizer).__name__} steps as usual",
                stacklevel=3,
            )
        return {}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # calls of each weight in the step's forward: a weight of two calls (a layer called twice,
    # tied weights) steps through the optimizer, whose momentum would otherwise take the
    # buffer the first call's fused update had just written (momentum counted twice)
    calls = Counter(
        id(getattr(state.layers[call.layer_index][1], "weight", None))
        for forward_pass in state.pending
        for call in forward_pass.calls
    )
    weights = {}
    for _, layer in state.layers:
        weight = getattr(layer, "weight", None)
        if (
            isinstance(layer, TinyPropLinear)
            and not layer.transposed_weight
            and isinstance(weight, nn.Parameter)
            and id(weight) in in_optimizer
            and calls[id(weight)] <= 1
            and weight.requires_grad
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.is_contiguous()
            and not weight._backward_hooks
            and weight._post_accumulate_grad_hooks is None
            and _buffer_fits(optimizer, weight)
        ):
            weights[id(weight)] = weight
    return weights


def fusable_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch.optim.SGD whose step the native kernel computes exactly:
    plain or with momentum (dampening, Nesterov), no weight decay, maximize or hooks."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    return all(
        not group["weight_decay"]
        and not group["maximize"]
        and not group.get("differentiable", False)
        and not group.get("fused", False)
        and isinstance(group["lr"], (int, float))
        and isinstance(group["momentum"], (int, float))
        and isinstance(group["dampening"], (int, float))
        for group in optimizer.param_groups
    )


def _buffer_fits(optimizer: torch.optim.Optimizer, weight: nn.Parameter) -> bool:
    """Whether the weight's momentum buffer, if the optimizer holds one, is one the native
    kernel can update in place (float32, contiguous, the weight's shape, on the CPU)."""
    buffer = optimizer.state.get(weight, {}).get("momentum_buffer")
    return buffer is None or (
        buffer.dtype == torch.float32
        and buffer.device.type == "cpu"
        and buffer.is_contiguous()
        and buffer.shape == weight.shape
    )


def fold_into_gradients(step) -> None:
    """Before the optimizer's step: a deferred update whose weight got a gradient from
    elsewhere too (the weight used outside its sparse layer: ``F.linear`` of it, an embedding
    tied to it) is added to that gradient instead, ``.grad += W'``, so that the optimizer steps
    the weight once, on its whole gradient (fused, SGD's momentum took the buffer twice)."""
    deferred = []
    for weight, x, row_start, column, value in step.deferred_updates:
        gradient = weight.grad
        if gradient is None:
            deferred.append((weight, x, row_start, column, value))
            continue
        if not (
            gradient.layout == torch.strided
            and gradient.dtype == torch.float32
            and gradient.is_contiguous()
        ):
            gradient = weight.grad = gradient.to_dense().float().contiguous()
        native.linear_update(x, gradient, row_start, column, value, 1.0)  # .grad += W'
    step.deferred_updates = deferred


def apply_updates(step, optimizer: torch.optim.Optimizer) -> None:
    """The deferred updates of a step whose gradients were all checked: SGD's step of each
    weight from the kept entries, with the settings of the weight's parameter group. The
    weight (and buffer) count a new version, as the optimizer's step would (the native kernel
    writes them without one): :mod:`tinyprop.fused_walk` reads their max |W| again."""
    if not step.deferred_updates:
        return
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for weight, x, row_start, column, value in step.deferred_updates:
            group = groups[id(weight)]
            scale = -float(group["lr"])
            increment_version(weight)
            if not group["momentum"]:
                native.linear_update(x, weight.data, row_start, column, value, scale)
                continue
            state = optimizer.state[weight]
            buffer = state.get("momentum_buffer")
            first = buffer is None  # SGD's first step: the buffer becomes the gradient
            if first:
                buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
            native.linear_update(
                x, weight.data, row_start, column, value, scale, buffer,
                float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"]),
                first,
            )  # fmt: skip
            increment_version(buffer)
            state["momentum_buffer"] = buffer
    step.deferred_updates = []
