"""SGD's update of sparse Linear weights fused with their backward: ``train_step(...,
fused_update=True)``.

At batch 128 and 5% kept per sample, nearly every row of a Linear weight is kept by some sample
(0.95^128 = 0.14% are not), so the weight gradient W' (out, in) is a whole dense matrix: the
backward writes it, the gradient check and the optimizer read it again. With plain SGD
(``W ← W - lr · W'``) none of this is needed: the native kernel adds ``-lr ·`` each gradient row
to the weight row as it sums it, from the kept entries of δ, once the whole step has been
checked. The weights come out as ``torch.optim.SGD`` leaves them (the same sums in the same
order); their ``.grad`` stays None.

Only where that is exactly SGD's update: ``torch.optim.SGD`` without momentum, weight decay,
Nesterov or ``maximize``, a float learning rate and no optimizer hooks; a float32, contiguous
CPU weight of a sparse ``nn.Linear``, without gradient hooks, updated by its native kernel
(2-D input); a weight gradient the bound of ``StepContext.prove_finite`` proves finite. Every
other parameter (biases, other layers, the rest of a second call) steps through the optimizer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tinyprop import native
from tinyprop.layers import TinyPropLinear
from tinyprop.model import state_of


def fusable_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, nn.Parameter]:
    """id -> weight of the sparse Linear layers whose SGD update can be fused (see the module
    docstring); empty (with one warning) when the optimizer is not plain SGD."""
    state = state_of(model)
    if not plain_sgd(optimizer) or native.library() is None:
        if "fused update" not in state.warned:
            state.warned.add("fused update")
            warnings.warn(
                "fused_update=True fuses the update of torch.optim.SGD without momentum, weight "
                "decay, nesterov, maximize or hooks (float lr), with the native kernels; this "
                f"{type(optimizer).__name__} steps as usual",
                stacklevel=3,
            )
        return {}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    weights = {}
    for _, layer in state.layers:
        weight = getattr(layer, "weight", None)
        if (
            isinstance(layer, TinyPropLinear)
            and not layer.transposed_weight
            and isinstance(weight, nn.Parameter)
            and id(weight) in in_optimizer
            and weight.requires_grad
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.is_contiguous()
            and not weight._backward_hooks
            and weight._post_accumulate_grad_hooks is None
        ):
            weights[id(weight)] = weight
    return weights


def plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch.optim.SGD updating ``p ← p - lr · grad`` and nothing else."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    return all(
        not group["momentum"]
        and not group["weight_decay"]
        and not group["nesterov"]
        and not group["maximize"]
        and not group.get("differentiable", False)
        and isinstance(group["lr"], (int, float))
        for group in optimizer.param_groups
    )


def apply_updates(step, optimizer: torch.optim.Optimizer) -> None:
    """The deferred updates of a step whose gradients were all checked: ``weight += -lr ·
    grad_weight`` from the kept entries, lr from the weight's parameter group."""
    if not step.deferred_updates:
        return
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for weight, x, row_start, column, value in step.deferred_updates:
            native.linear_update(x, weight.data, row_start, column, value, -float(lr[id(weight)]))
    step.deferred_updates = []
