"""tinyprop: TinyPropv2 dynamic sparse backpropagation for PyTorch.

Example:
    >>> import tinyprop
    >>> model = tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2"))
    >>> stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
"""

from tinyprop.config import POLICIES, PRESETS, TinyPropConfig, preset
from tinyprop.ledger import Ledger
from tinyprop.model import apply, is_tinyprop, remove
from tinyprop.trainer import StepStats, train_step

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "PRESETS",
    "Ledger",
    "StepStats",
    "TinyPropConfig",
    "apply",
    "is_tinyprop",
    "preset",
    "remove",
    "train_step",
]
