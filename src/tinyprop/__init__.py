"""tinyprop: TinyPropv2 dynamic sparse backpropagation for PyTorch.

Example:
    >>> import tinyprop
    >>> model = tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2"))
    >>> stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)

    or, in your own loop:

    >>> stats = tinyprop.backward(model, loss_fn(model(x), y))  # per-sample losses
    >>> optimizer.step()
"""

from tinyprop.config import POLICIES, PRESETS, TinyPropConfig, preset
from tinyprop.layers import register_linear
from tinyprop.ledger import Ledger
from tinyprop.model import apply, is_tinyprop, remove, reset_error_maxima
from tinyprop.step import StepStats, backward, loss, step_stats
from tinyprop.trainer import train_step

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "PRESETS",
    "Ledger",
    "StepStats",
    "TinyPropConfig",
    "apply",
    "backward",
    "is_tinyprop",
    "loss",
    "preset",
    "register_linear",
    "remove",
    "reset_error_maxima",
    "step_stats",
    "train_step",
]
