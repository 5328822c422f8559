"""A prototype of a graph-free tinypropv2 step in the library, for a plain ``nn.Sequential``:
what the library's own step would cost without an autograd graph, with all its bookkeeping.

:class:`GraphFreeStep` runs ``tinyprop.train_step``'s work on a model given to
:func:`tinyprop.apply` (a plain ``nn.Sequential`` of sparse Linear / Conv1d layers, ReLU,
MaxPool1d, AvgPool1d and Flatten, trained with per-sample cross-entropy) without building a
graph: the forward under ``torch.no_grad`` keeping each module's input, while the library's
forward pass records every layer call as its hooks do (``_open_forward_pass``, each layer's
``_record``, ``_close_forward_pass``: the same calls and forward MACs); δ_L from PyTorch's
cross-entropy backward kernels and the library's skip decision (``policy.trained_mask`` on Y_L
in a :class:`~tinyprop.step.StepContext`); then from the output down each sparse layer's
backward by the very function its autograd Function calls,
``SparseBackprop.layer_backward`` (k, the kept entries, kernels, records, running maxima and
finiteness proofs), ReLU's and the pools' backward by the aten kernels autograd runs; then the
step's records and ledger (``StepContext.finish``), the gradient check, the running state's
commit and the optimizer step. ``python benchmarks/finetune_floor.py --check`` compares it with
``tinyprop.train_step`` step by step (trained samples, k, kernels, ledger) and the weights,
running state and optimizer state after the run, bit for bit.

A prototype: it assumes what the runs give it (float32 CPU tensors, no hooks, a batch size
that is a power of two or whose decision gradient the library would not reuse anyway, finite
values, ``nn.MaxPool1d`` with kernel = stride and no padding); the library would check those
and keep its autograd path for anything else.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from tinyprop import model as model_hooks
from tinyprop.autograd import SparseBackprop
from tinyprop.functional import local_error
from tinyprop.layers import SparseBackpropLayer
from tinyprop.loss_gradient import output_error
from tinyprop.model import state_of
from tinyprop.step import StepContext, StepStats
from tinyprop.trainer import check_gradients

aten = torch.ops.aten


def cross_entropy_gradient(output: torch.Tensor, y: torch.Tensor):
    """The per-sample cross-entropy losses (B,) and ∂ loss_n / ∂ output_n (B, C), by the
    kernels autograd runs for ``F.cross_entropy(output, y, reduction="none")``."""
    log_probabilities = torch.log_softmax(output, 1)  # (B, C)
    losses = nn.functional.nll_loss(log_probabilities, y, reduction="none")  # (B,)
    ones = torch.ones(()).expand(len(y))  # (B,) ∂ Σ losses / ∂ loss_n
    target = aten.nll_loss_backward(ones, log_probabilities, y, None, 0, -100, ones[0])
    gradient = aten._log_softmax_backward_data(  # (B, C) ∂ loss_n / ∂ output_n
        target, log_probabilities, 1, log_probabilities.dtype
    )
    return losses, gradient


def module_backward(module: nn.Module, delta: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """δ at the input ``below`` of a ReLU, 1-D pool or Flatten from δ at its output, by the
    aten kernels autograd runs (ReLU's mask from its input: x > 0 where ReLU(x) > 0)."""
    if isinstance(module, nn.ReLU):
        return aten.threshold_backward(delta, below, 0)
    if isinstance(module, nn.MaxPool1d):  # as a 2-D pool of height 1, indices found again
        _, index = aten.max_pool1d_with_indices(below, [module.kernel_size], [module.stride])
        return aten.max_pool2d_with_indices_backward(
            delta.unsqueeze(2), below.unsqueeze(2), [1, module.kernel_size],
            [1, module.stride], [0, 0], [1, 1], False, index.unsqueeze(2),
        ).squeeze(2)  # fmt: skip
    if isinstance(module, nn.AvgPool1d):
        return aten.avg_pool2d_backward(
            delta.unsqueeze(2), below.unsqueeze(2), [1, *module.kernel_size],
            [1, *module.stride], [0, *module.padding], module.ceil_mode,
            module.count_include_pad, None,
        ).squeeze(2)  # fmt: skip
    return delta.reshape(below.shape)  # Flatten


class GraphFreeStep:
    """``tinyprop.train_step(model, x, y, cross-entropy, optimizer)`` without a graph."""

    def __init__(self, model: nn.Sequential, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.modules = list(model)
        self.parameters = list(model.parameters())
        self.first_trainable = next(  # layers after it get an input gradient
            position
            for position, module in enumerate(self.modules)
            if any(parameter.requires_grad for parameter in module.parameters())
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        state = state_of(self.model)
        for parameter in self.parameters:
            parameter.grad = None
        state.take_passes()
        inputs, calls, output = self.forward(x)  # each module's input; position -> call
        with torch.no_grad():
            losses, gradient = cross_entropy_gradient(output, y)  # (B,), (B, C)
            step = self.decide(losses, gradient, output)
            stats = step.stats
            if not stats.trained:
                step.finish()
                step.commit()
                return stats
            state.step = step  # what StepContext.begin_backward opens
            delta = output_error(gradient, stats.trained_mask, step.averaged_samples)  # δ_L
            for position in reversed(range(len(self.modules))):
                delta = self.backward(position, inputs, calls, delta)
                if delta is None:
                    break
            step.finish()  # records, ledger, finiteness checks
        check_gradients(self.optimizer, step.proven_finite)
        step.commit()
        self.optimizer.step()
        stats.stepped = True
        return stats

    def forward(self, x: torch.Tensor):
        """The forward without a graph, recorded as the library's hooks record it."""
        model = self.model
        model_hooks._open_forward_pass(model, (x,), {})
        inputs, calls, output = [], {}, x
        with torch.no_grad():
            for position, module in enumerate(self.modules):
                inputs.append(output)
                if isinstance(module, SparseBackpropLayer):
                    output.requires_grad_(position > self.first_trainable)  # as in autograd
                    with torch.enable_grad():
                        calls[position] = module._record(output, module.weight)
                    output = module.dense_forward(output.detach(), module.weight, module.bias)
                else:
                    output = module(output)
        model_hooks._close_forward_pass(model, (x,), {}, output)
        return inputs, calls, output

    def decide(self, losses, gradient, output) -> StepContext:
        """The step's context with the skip decision made, as ``_decide_step`` makes it."""
        state, batch = state_of(self.model), len(losses)
        stats = StepStats(
            loss=float(losses.mean()), trained=batch, skipped=0,
            trained_mask=torch.ones(batch, dtype=torch.bool),
        )  # fmt: skip
        step = StepContext(self.model, stats, state.take_passes(), output.numel() // batch)
        step.defers_commit = True
        step.passes_overflow = step.quiet_overflow = False
        scores = local_error(gradient.double())  # (B,) Y_L
        step.skip_scores = scores
        stats.trained_mask = state.policy.trained_mask(scores, step)
        stats.trained = sum(stats.trained_mask.tolist())
        stats.skipped = batch - stats.trained
        step.error_unit = 1.0 / step.averaged_samples
        return step

    def backward(self, position: int, inputs: list, calls: dict, delta):
        """δ at the input of module ``position`` from δ at its output (None: not needed)."""
        module, below = self.modules[position], inputs[position]
        if position in calls:  # the sparse layer's own backward
            context = types.SimpleNamespace(
                layer=module, call=calls[position], relu_fused=False,
                weight_id=id(module.weight), bias_id=id(module.bias),
                bias_dtype=module.bias.dtype, saved_tensors=(below, module.weight),
                needs_input_grad=(position > self.first_trainable, True, True),
            )  # fmt: skip
            delta, module.weight.grad, module.bias.grad, _, _ = SparseBackprop.layer_backward(
                context, delta, None
            )
            return delta
        return module_backward(module, delta, below)
