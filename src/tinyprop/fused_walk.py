"""The one walk of a fused SGD step: a Linear layer's input gradient and SGD's step of its weight
in one pass down the weight's rows (:func:`tinyprop.native.linear_input_update`), taken by
``train_step(fused_update=True)`` only when the step is proven, before its backward, to be
accepted.

The fused update (:mod:`tinyprop.fused_update`) steps the weights once the whole step has been
checked: a NaN / inf anywhere refuses the step and leaves every parameter as it was. The one
walk steps a layer's weight during the backward, before the layers below it have run, so it is
taken only when nothing the step's backward computes can be NaN or infinite, from values known
before it starts. For a graph-free step (:mod:`tinyprop.graph_free`) of a chain of sparse
``nn.Linear`` layers (2-D inputs), ``nn.ReLU``, ``nn.Dropout`` (an identity there),
``nn.Identity`` and ``nn.Flatten``, with T_l = Σ_n Σ_j |δ_l[n, j]| the sum of every |δ| at the
output of layer l:

- T_L from δ_L; a ReLU, Dropout, Identity or Flatten does not raise it (a derivative of 0 or 1);
- a Linear layer's weight gradient sums δ · x over the rows: each element at most
  max |x_l| · T_l; its bias gradient Σ δ at most T_l; keeping k entries of a row lowers both;
- its input gradient sums δ · W over the kept entries of a row: each element at most
  max |W_l| · Σ_j |δ_l[n, j]|, so T_(l-1) ≤ N_(l-1) · max |W_l| · T_l (N_(l-1): its inputs).

Each bound is checked below the float32 maximum with a factor 4 to spare (rounding included, as
:meth:`tinyprop.step.StepContext.prove_finite` does). A step whose bounds all hold cannot be
refused (no δ, gradient or loss left to check can be NaN / inf), and each fused layer with an
input gradient walks once: the same input gradients, weights and momentum buffers, bit for
bit, as the deferred update. A bound that fails: the deferred update, as before.

max |W_l| costs a read of the weight: it is computed once and kept with the weight's identity,
data pointer and version, then advanced after each walk (native kernels count no version) by
lr times a bound on the step, |W - lr · g| ≤ max |W| + lr · max |g| (with momentum through the
buffer's bound, kept the same way). Whatever else writes the weight through PyTorch (the
optimizer, the deferred update, ``load_state_dict``, ``nn.init``) counts a version, and the
bound is computed again; a write through ``weight.data``, which PyTorch does not count, is not
seen. A proof that fails on advanced bounds is tried once more on exact ones.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from tinyprop import native
from tinyprop.layers import TinyPropLinear
from tinyprop.relu_fusion import ConvInputReLU

LIMIT = float(torch.finfo(torch.float32).max) / 4  # a factor 4 to spare, as prove_finite
# SGD with momentum walks slower than its deferred update: walk / deferred 1.08 (1 thread) and
# 1.09 (2 threads) for the deep MLP, 1.04 for the wide one at 2 threads (plain SGD 0.94 and
# 1.00): `python benchmarks/fused_walk_ab.py --model deep --momentum 0.9 --threads 2`. So only
# plain SGD walks; the momentum walk (same bits) waits for a faster kernel.
WALKS_WITH_MOMENTUM = False
ROUNDING = 1.0 + 2.0**-20  # a float32 step's roundings (2^-24 each), with room to spare
PASSING = (nn.ReLU, ConvInputReLU, nn.Dropout, nn.Identity, nn.Flatten)  # |δ| not raised

# model -> id(tensor) -> (weak reference, (data_ptr, version), bound on max |tensor|, exact)
_BOUNDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Walks:
    """A fused step's permission to walk (proven by :func:`prove`): the optimizer, its group of
    each parameter, the bound on each fused weight's gradient and the model's kept bounds."""

    def __init__(self, optimizer, groups: dict, gradient_bounds: dict[int, float], bounds: dict):
        self.optimizer = optimizer
        self.groups = groups  # id(parameter) -> its parameter group
        self.gradient_bounds = gradient_bounds  # id(weight) -> bound on max |W'|
        self.bounds = bounds
        self.walked = 0  # weights stepped by a walk in this step

    def pays(self, weight: nn.Parameter) -> bool:
        """Whether walking this weight is faster than its deferred update."""
        return pays(self.groups[id(weight)])

    def walk(self, weight: nn.Parameter, x: Tensor, row_start, column, value, relu_mask: bool):
        """The input gradient (B, in) of a fused layer, and SGD's step of its weight (and
        momentum buffer) with its group's settings, in one walk; the weight's bound advanced."""
        group = self.groups[id(weight)]
        rate = float(group["lr"])
        gradient = self.gradient_bounds[id(weight)]  # max |W'|
        momentum = float(group["momentum"])
        kept = (x, weight.data, row_start, column, value, -rate)
        with torch.no_grad():
            if not momentum:
                grad_input = native.linear_input_update(*kept, relu_mask=relu_mask)
                moved = gradient  # max |W' |
            else:
                dampening, nesterov = float(group["dampening"]), bool(group["nesterov"])
                state = self.optimizer.state[weight]
                buffer = state.get("momentum_buffer")
                first = buffer is None  # SGD's first step: the buffer becomes the gradient
                if first:
                    buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
                    held = gradient
                else:  # buf <- momentum · buf + (1 - dampening) · W'
                    held = momentum * bound(self.bounds, buffer) + abs(1 - dampening) * gradient
                    held *= ROUNDING
                grad_input = native.linear_input_update(
                    *kept, buffer, momentum, dampening, nesterov, first, relu_mask=relu_mask
                )
                state["momentum_buffer"] = buffer
                _keep(self.bounds, buffer, held)
                moved = gradient + momentum * held if nesterov else held
        _keep(self.bounds, weight, (bound(self.bounds, weight) + abs(rate) * moved) * ROUNDING)
        self.walked += 1
        return grad_input


def pays(group: dict) -> bool:
    """Whether walking a weight of this SGD parameter group is faster than its deferred update
    (plain SGD; with momentum only under ``WALKS_WITH_MOMENTUM``)."""
    return WALKS_WITH_MOMENTUM or not group["momentum"]


def prove(model: nn.Module, modules: list, inputs: list, calls: dict, delta: Tensor, step,
          optimizer) -> Walks | None:  # fmt: skip
    """The permission to walk of a graph-free step whose backward starts from ``delta`` (R, ...)
    at the output of ``modules`` (their ``inputs`` and sparse ``calls`` as
    :func:`tinyprop.graph_free.run_step` has them), or None: no fused layer with an input
    gradient, or a bound that fails (see module docstring)."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if not any(  # no weight would walk: no proof (its reads of max |W| would cost for nothing)
        call.input_requires_grad
        and id(modules[position].weight) in step.fused_weights
        and pays(groups[id(modules[position].weight)])
        for position, (call, _) in calls.items()
    ):
        return None
    budget = step.state.policy.budget
    if budget is not None and budget.unchecked_scale:  # the commit may still refuse the step
        return None
    bounds = _BOUNDS.setdefault(model, {})
    gradients = _gradient_bounds(modules, inputs, calls, delta, bounds)
    if gradients is None and _forget_advanced(bounds):  # once more on exact bounds
        gradients = _gradient_bounds(modules, inputs, calls, delta, bounds)
    if gradients is None:
        return None
    return Walks(optimizer, groups, gradients, bounds)


def _gradient_bounds(modules, inputs, calls, delta, bounds) -> dict[int, float] | None:
    """id(weight) -> the bound on its gradient, for every sparse layer the backward reaches,
    when every bound of the chain holds (see module docstring), else None."""
    total = float(delta.abs().sum(dtype=torch.float64))  # T_L
    if not total < LIMIT:
        return None
    gradients = {}
    for position in range(len(modules) - 1, -1, -1):  # from the output down
        module = modules[position]
        if type(module) in PASSING:
            continue
        if type(module) is not TinyPropLinear or position not in calls:
            return None
        call, trains = calls[position]
        if not trains:  # the backward stops above it
            break
        x = inputs[position]
        if x.dim() != 2:
            return None
        gradient = largest(x) * total  # weight gradient; T_l bounds the bias gradient
        if not gradient < LIMIT:
            return None
        gradients[id(module.weight)] = gradient
        if not call.input_requires_grad:  # nothing below runs
            break
        total = x.shape[1] * bound(bounds, module.weight) * total  # T_(l-1)
        if not total < LIMIT:
            return None
    return gradients


def largest(tensor: Tensor) -> float:
    """max |tensor| (inf when it holds a NaN)."""
    low, high = (float(value) for value in torch.aminmax(tensor.detach()))
    if math.isnan(low) or math.isnan(high):
        return math.inf
    return max(-low, high)


def bound(bounds: dict, tensor: Tensor) -> float:
    """A bound on max |tensor|: the kept one while the tensor is the same tensor, at the same
    data pointer and version, else max |tensor| read (and kept)."""
    entry = bounds.get(id(tensor))
    key = (tensor.data_ptr(), tensor._version)
    if entry is not None and entry[0]() is tensor and entry[1] == key:
        return entry[2]
    value = largest(tensor)
    bounds[id(tensor)] = (weakref.ref(tensor), key, value, True)
    return value


def _keep(bounds: dict, tensor: Tensor, value: float) -> None:
    """Keep an advanced bound on max |tensor| (written by a native kernel: no new version)."""
    bounds[id(tensor)] = (weakref.ref(tensor), (tensor.data_ptr(), tensor._version), value, False)


def _forget_advanced(bounds: dict) -> bool:
    """Drop the advanced bounds (read again when next needed); whether there were any."""
    advanced = [key for key, entry in bounds.items() if not entry[3]]
    for key in advanced:
        del bounds[key]
    return bool(advanced)
