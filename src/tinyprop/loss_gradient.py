"""The step's output error δ_L from the skip decision's own loss gradient, bit for bit.

The TinyPropv2 decision computes g = ∂ Σ losses / ∂ output (B, C) for Y_L. The step's backward
then needs δ_L = ∂ Σ w_n · loss_n / ∂ output with w_n = 1 / B for a trained sample and 0 for a
skipped one: a second backward through the loss. For per-sample cross-entropy (log-softmax and
NLL of each row, no class weights) and a power-of-two 1 / B, δ_L = w_n · g_n bit for bit, so
the step backpropagates that from the output instead (one multiplication, no second
log-softmax and NLL backward, no masked mean):

- the log-softmax backward computes ``grad - exp(output) * sum(grad)`` per row; the NLL
  backward's grad is -w_n at the target (0 elsewhere), so sum(grad) = -w_n exactly. Where
  the decision's g has p_j (no target) or p_y - 1 (the target), the step's has p_j · w_n and
  -w_n + p_y · w_n: a power of two scales a float without rounding, and rounding commutes
  with it, so these equal w_n · p_j and w_n · (p_y - 1) rounded once, as w_n · g has them;
- a skipped row (w_n = 0) is zero in both but for the sign of the target entry's zero when p_y
  rounds to 1 (-0 against +0); the output comes straight from a sparse layer on the CPU here,
  whose backward leaves out the rows of zero Σ |δ|, so no sign of those zeros reaches a
  gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


class OutputBoundary(torch.autograd.Function):
    """Identity on the model output; its backward opens the step for the layers (as the step
    loss's boundary does, with an upstream gradient of 1)."""

    @staticmethod
    def forward(ctx, output: Tensor, step) -> Tensor:
        ctx.step = step
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.step.begin_backward(1.0)
        return grad, None


def is_row_cross_entropy(losses: Tensor, output: Tensor) -> bool:
    """Whether ``losses`` (B,) are ``cross_entropy(output, y, reduction="none")`` of a (B, C)
    float32 ``output``, without class weights or label smoothing: the NLL of the log-softmax
    of each row, found in the losses' autograd graph."""
    nll = losses.grad_fn
    if (
        nll is None
        or not output.requires_grad
        or output.dim() != 2
        or output.dtype != torch.float32
        or losses.dtype != torch.float32
        or nll.name() != "NllLossBackward0"
        or nll._saved_reduction != 0  # "none"
        or nll._saved_weight is not None
    ):
        return False
    log_softmax = nll.next_functions[0][0]
    if (
        log_softmax is None
        or log_softmax.name() != "LogSoftmaxBackward0"
        or log_softmax._saved_dim != 1
    ):
        return False
    source = log_softmax.next_functions[0][0]  # the output's node: of a leaf, its accumulation
    if output.grad_fn is None:
        return getattr(source, "variable", None) is output
    return source is output.grad_fn


def row_cross_entropy_gradient(losses: Tensor) -> Tensor:
    """g = ∂ Σ losses / ∂ output (B, C) of losses that :func:`is_row_cross_entropy` found, by
    the two kernels autograd runs for it (the NLL backward on a gradient of ones, then the
    log-softmax backward) on the tensors their nodes saved: the same g bit for bit, without
    starting a backward pass (the skip decision's Y_L, every step). Under no_grad: with
    gradients on, these kernels on the saved tensors recorded a graph of their own, and g
    required grad (kept alive with the step; ``float()`` of it in the check of a coupled loss
    warned "Converting a tensor with requires_grad=True to a scalar" in the user's loop)."""
    nll = losses.grad_fn
    log_softmax = nll.next_functions[0][0]
    log_probabilities = nll._saved_self  # (B, C)
    ones = torch.ones(losses.shape, dtype=losses.dtype, device=losses.device)  # (B,) ∂ Σ / ∂ loss_n
    ignore_index = nll._saved_ignore_index  # read back as an unsigned 64-bit integer
    if ignore_index >= 2**63:
        ignore_index -= 2**64
    with torch.no_grad():
        target = torch.ops.aten.nll_loss_backward(  # (B, C) ∂ Σ losses / ∂ log-probabilities
            ones, log_probabilities, nll._saved_target, None, 0, ignore_index,
            nll._saved_total_weight,
        )  # fmt: skip
        return torch._log_softmax_backward_data(  # (its binding: no Python dispatch of its own)
            target, log_softmax._saved_result, 1, log_probabilities.dtype
        )


def is_power_of_two(count: int) -> bool:
    """Whether 1 / ``count`` scales a float without rounding."""
    return count > 0 and count & (count - 1) == 0


def output_error(gradient: Tensor, trained_mask: Tensor, averaged_samples: int) -> Tensor:
    """δ_L (B, C) of the step: the decision's ∂ Σ losses / ∂ output (B, C) times each row's
    weight w_n, the trained mask over ``averaged_samples`` (as the step loss weighs it)."""
    weights = trained_mask.to(gradient.dtype) / averaged_samples  # (B,)
    return gradient * weights.unsqueeze(1)
