"""Optimizers for sparse backprop: a lazy Adam with per-entry step counts, and the bench's choice.

Under sparse backprop most entries of a weight gradient are exactly zero in a given step (the
rows of δ that top-k dropped, the samples TinyPropv2 skipped). Plain Adam still decays both
moments of those entries and moves their weights by the decayed first moment, and an entry
that gets a gradient rarely is then moved by about 1/√(1 - β2) ≈ 3 times the learning rate
when it does. :class:`LazyAdam` updates the moments and the weights only where the gradient
is non-zero, and corrects the bias of each entry's moments with that entry's own step count
t_i: with dense gradients it is exactly Adam.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adam", "sgd", "lazy_adam")
SGD_MOMENTUM = 0.9


def check_adam_settings(lr: float, betas) -> None:
    """Refuse a learning rate that is not positive or a β outside [0, 1), as torch's Adam does."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")


class LazyAdam(torch.optim.Optimizer):
    """Adam whose moments and weights move only where the gradient is non-zero.

    Per entry i with gradient g_i ≠ 0: t_i += 1, m_i = β1 m_i + (1 - β1) g_i,
    v_i = β2 v_i + (1 - β2) g_i², w_i -= lr · m̂_i / (√v̂_i + ε) with m̂_i = m_i / (1 - β1^t_i),
    v̂_i = v_i / (1 - β2^t_i). Entries with g_i = 0 keep w_i, m_i, v_i and t_i.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: (β1, β2).
        eps: ε.

    Example:
        >>> optimizer = LazyAdam(nn.Linear(4, 2).parameters(), lr=1e-3)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        check_adam_settings(lr, betas)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                grad = parameter.grad
                if grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["steps"] = torch.zeros_like(parameter)  # t_i
                    state["exp_avg"] = torch.zeros_like(parameter)  # m_i
                    state["exp_avg_sq"] = torch.zeros_like(parameter)  # v_i
                moving = grad != 0
                steps = state["steps"].add_(moving.to(parameter.dtype))
                exp_avg = state["exp_avg"]
                exp_avg_sq = state["exp_avg_sq"]
                exp_avg.copy_(torch.where(moving, exp_avg.lerp(grad, 1 - beta1), exp_avg))
                exp_avg_sq.copy_(
                    torch.where(moving, exp_avg_sq.lerp(grad * grad, 1 - beta2), exp_avg_sq)
                )
                counted = steps.clamp_min(1)
                corrected_mean = exp_avg / (1 - beta1**counted)
                corrected_square = exp_avg_sq / (1 - beta2**counted)
                update = corrected_mean / (corrected_square.sqrt() + group["eps"])
                parameter.sub_(torch.where(moving, update, torch.zeros_like(update)) * group["lr"])
        return loss


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The bench's optimizers: ``adam``, ``sgd`` (momentum 0.9) or ``lazy_adam``."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM)
    if name == "lazy_adam":
        return LazyAdam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
