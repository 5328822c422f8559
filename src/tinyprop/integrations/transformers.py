"""transformers: :class:`TinyPropTrainer`, a ``Trainer`` whose ``compute_loss`` returns
``tinyprop.loss(model, per_sample_losses, output=logits)``.

The ``Trainer`` runs everything else as usual (gradient accumulation, clipping, the learning
rate schedule, logging); the sparse layers follow the policy given to :func:`tinyprop.apply`,
and an optimizer step whose samples were all skipped (``tinypropv2``) leaves the weights and
the optimizer state untouched, as :func:`tinyprop.train_step` does. Evaluation uses the plain
mean of the per-sample losses.

Example:
    >>> from transformers.pytorch_utils import Conv1D
    >>> tinyprop.register_linear(Conv1D, transposed=True)  # GPT-2's linear layers
    >>> model = tinyprop.apply(GPT2LMHeadModel(config), tinyprop.TinyPropConfig())
    >>> trainer = TinyPropTrainer(
    ...     model=model, args=args, train_dataset=data, per_sample_loss=causal_lm_losses
    ... )
    >>> trainer.train()
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

import tinyprop
from tinyprop.extras import require
from tinyprop.integrations._skip import drop_gradients
from tinyprop.model import unwrap

transformers = require("transformers", "transformers")

IGNORE_INDEX = -100  # the label value transformers' losses ignore


def sequence_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample loss of a sequence classifier: cross-entropy (with ``label_smoothing`` ε as
    the Trainer's ``label_smoothing_factor`` smooths it), or the squared error for a regression
    head (one output, float labels). (B, C), (B,) -> (B,)"""
    if logits.shape[-1] == 1 and labels.is_floating_point():
        if label_smoothing:
            raise ValueError(
                f"label smoothing ({label_smoothing}) applies to class labels; this is a "
                "regression head (one output, float labels): set label_smoothing_factor=0"
            )
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)


def causal_lm_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sequence loss of a causal language model: the mean next-token cross-entropy over the
    tokens whose label is not -100 (labels shifted by one, as the models do).
    (B, T, V), (B, T) -> (B,)"""
    return token_losses(logits[:, :-1], labels[:, 1:], label_smoothing)


def token_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sequence mean cross-entropy of token labels (token classification, masked LM, the
    decoder of an encoder-decoder model such as T5 or BART), tokens labelled -100 left out;
    ``label_smoothing`` ε as in :func:`sequence_losses`. (B, T, V), (B, T) -> (B,)"""
    per_token = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none",
        label_smoothing=label_smoothing,
    )  # (B, T)  # fmt: skip
    counted = (labels != IGNORE_INDEX).sum(1).clamp(min=1)  # (B,)
    return per_token.sum(1) / counted


class TinyPropTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that backpropagates ``tinyprop.loss``.

    Args:
        per_sample_loss: ``(logits, labels) -> (B,)`` losses, e.g. :func:`sequence_losses`
            (the default), :func:`causal_lm_losses` or :func:`token_losses`; these three
            smooth the labels by ``args.label_smoothing_factor``.
        *args, **kwargs: as for ``transformers.Trainer``; the model must have tinyprop
            applied and its batches must hold ``labels``.

    Raises:
        ValueError: for ``compute_loss_func`` (a batch loss: give ``per_sample_loss``), or a
            ``label_smoothing_factor`` with a ``per_sample_loss`` of one's own (smooth the
            labels in it). Both were ignored, silently: the Trainer's loss is replaced.
    """

    def __init__(self, *args, per_sample_loss=sequence_losses, **kwargs):
        super().__init__(*args, **kwargs)
        if not tinyprop.is_tinyprop(self.model):
            raise ValueError("TinyPropTrainer needs a model prepared by tinyprop.apply(model)")
        if self.compute_loss_func is not None:
            raise ValueError(
                "TinyPropTrainer computes one loss per sample with per_sample_loss, so "
                "compute_loss_func (a batch loss) would be ignored: pass "
                "per_sample_loss=(logits, labels) -> (B,) losses instead"
            )
        smoothing = self.args.label_smoothing_factor
        if smoothing:
            if per_sample_loss not in (sequence_losses, causal_lm_losses, token_losses):
                raise ValueError(
                    f"label_smoothing_factor={smoothing} smooths the Trainer's own loss, which "
                    "TinyPropTrainer replaces by per_sample_loss: smooth the labels inside your "
                    "per_sample_loss (F.cross_entropy(..., label_smoothing=...)) and set "
                    "label_smoothing_factor=0"
                )
            per_sample_loss = functools.partial(per_sample_loss, label_smoothing=smoothing)
        self.per_sample_loss = per_sample_loss
        self.model_accepts_loss_kwargs = False  # the Trainer divides by the accumulation steps
        self.trained_since_step = 0  # samples trained since the last optimizer step
        self.add_callback(_SkipUntrainedSteps(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError("TinyPropTrainer needs batches with 'labels'")
        labels = inputs.pop("labels")  # the model would compute its own (batch-mean) loss
        prepare = getattr(unwrap(model), "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None and "decoder_input_ids" not in inputs:
            # an encoder-decoder model (T5, BART) makes its decoder inputs from the labels
            inputs["decoder_input_ids"] = prepare(labels=labels)
        outputs = model(**inputs)
        logits = outputs["logits"]
        losses = self.per_sample_loss(logits, labels)  # (B,)
        if model.training and torch.is_grad_enabled():
            loss = tinyprop.loss(model, losses, output=logits)
        else:  # evaluation: no step
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        stats = tinyprop.step_stats(model)
        self.trained_since_step += 0 if stats is None else stats.trained
        return loss


class _SkipUntrainedSteps(transformers.TrainerCallback):
    """Drops the gradients before an optimizer step when no rank trained any sample."""

    def __init__(self, trainer: TinyPropTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        trained = torch.tensor(float(trainer.trained_since_step), device=args.device)
        trained = trainer.accelerator.reduce(trained, reduction="sum")
        trainer.trained_since_step = 0
        if float(trained) == 0:
            drop_gradients(trainer.model)
