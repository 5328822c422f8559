"""tinyprop: TinyPropv2 dynamic sparse backpropagation for PyTorch.

Per layer and per sample only the k largest output gradients are backpropagated, k following
the current error, and a sample whose error is small skips its training step (the formulas:
``docs/algorithm.md``). :func:`apply` makes a model's ``nn.Linear``, ``nn.Conv1d`` and
``nn.Conv2d`` layers sparse under a :class:`TinyPropConfig` (or a :func:`preset`: full,
meprop, randomk, tinyprop, tinypropv2); :func:`train_step` runs one step, or, in a loop of
your own, :func:`backward` (or :func:`loss`) replaces ``loss.backward()``; each step's
:class:`StepStats` carries its :class:`Ledger` of MACs; :func:`remove` gives the plain
model back.

Example:
    >>> import tinyprop
    >>> model = tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2"))
    >>> loss_fn = nn.CrossEntropyLoss(reduction="none")  # one loss per sample
    >>> stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)

    or, in your own loop (``backward`` adds to ``.grad``, as ``loss.backward()`` does):

    >>> optimizer.zero_grad()
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
