"""What both recipes do before an optimizer step: no step when no sample was trained."""

from __future__ import annotations

from torch import nn


def drop_gradients(module: nn.Module) -> None:
    """Set every gradient of ``module`` to None, so that ``optimizer.step()`` leaves the
    parameters and the optimizer's state untouched (torch optimizers skip parameters without
    a gradient), as :func:`tinyprop.train_step` does when every sample of a step is skipped."""
    for parameter in module.parameters():
        parameter.grad = None
