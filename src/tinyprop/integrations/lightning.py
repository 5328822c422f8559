"""PyTorch Lightning: a :class:`TinyPropCallback` for a LightningModule whose
``training_step`` returns ``tinyprop.loss(self.model, per_sample_losses)``.

Lightning then runs the step's backward (with its precision plugin, gradient accumulation and
gradient clipping) and the sparse layers follow the policy. The callback

- takes no optimizer step when no sample of the step (or of the accumulated steps, on any
  rank) was trained, as :func:`tinyprop.train_step` does: the gradients are set to None
  before ``optimizer.step()``, which then leaves the weights and the optimizer state alone;
- logs ``tinyprop/trained``, ``tinyprop/skipped`` and ``tinyprop/backward_ratio`` of every
  step with ``LightningModule.log``.

Example:
    >>> class Classifier(pytorch_lightning.LightningModule):
    ...     def __init__(self, model):
    ...         super().__init__()
    ...         self.model = model  # tinyprop.apply(...) already called on it
    ...
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         losses = nn.functional.cross_entropy(self.model(x), y, reduction="none")
    ...         return tinyprop.loss(self.model, losses)
    ...
    ...     def configure_optimizers(self):
    ...         return torch.optim.Adam(self.parameters(), lr=1e-3)
    >>> trainer = pytorch_lightning.Trainer(callbacks=[TinyPropCallback()], max_steps=100)
"""

from __future__ import annotations

import torch
from torch import nn

import tinyprop
from tinyprop.extras import require
from tinyprop.integrations._skip import drop_gradients

pl = require("pytorch_lightning", "lightning")


class TinyPropCallback(pl.Callback):
    """Skip the optimizer step when no sample was trained, and log the step's statistics.

    Args:
        model: the module given to :func:`tinyprop.apply`; by default the one module of the
            LightningModule (or the LightningModule itself) that has tinyprop applied when
            training starts (in ``__init__`` or in ``configure_model``).
        log: log the statistics of every step with ``LightningModule.log``.
    """

    def __init__(self, model: nn.Module | None = None, log: bool = True):
        self.model = model
        self.log = log
        self._trained = 0  # samples trained by the backwards before the next optimizer step
        self._stepped = False  # an optimizer stepped since the last backward
        self._counted = None  # the StepStats last counted

    def on_fit_start(self, trainer, pl_module) -> None:
        # not at setup: a LightningModule may build and apply its model in configure_model,
        # which Lightning calls after setup (the callback then found no applied module and
        # asked for one the user could not yet pass)
        if self.model is None:
            found = [module for module in pl_module.modules() if tinyprop.is_tinyprop(module)]
            if len(found) != 1:
                raise ValueError(
                    f"TinyPropCallback found {len(found)} modules with tinyprop applied in "
                    f"{type(pl_module).__name__}; pass the one to follow: "
                    "TinyPropCallback(model=...)"
                )
            self.model = found[0]

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._stepped:  # the first backward after an optimizer step (or several)
            self._trained, self._stepped = 0, False
        stats = tinyprop.step_stats(self.model)
        if stats is None or stats is self._counted:  # a backward not from tinyprop.loss
            self._trained += 1  # trained every sample: never skip its step
        else:
            self._trained += stats.trained
        self._counted = stats

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        trained = torch.tensor(float(self._trained), device=pl_module.device)
        trained = trainer.strategy.reduce(trained, reduce_op="sum")  # every rank decides alike
        # counted again from the next backward: every optimizer stepping on this backward's
        # gradients (manual optimization with several optimizers) sees its samples (the
        # second optimizer saw 0 and its gradients were dropped: it never trained)
        self._stepped = True
        if float(trained) == 0:
            drop_gradients(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = tinyprop.step_stats(self.model)
        if not self.log or stats is None:
            return
        values = {
            "tinyprop/trained": float(stats.trained),
            "tinyprop/skipped": float(stats.skipped),
            "tinyprop/backward_ratio": float(stats.macs.backward_ratio()),
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=len(stats.trained_mask))
