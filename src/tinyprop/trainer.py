"""train_step: forward, per-sample skip decision, sparse backward, one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tinyprop.functional import local_error, running_max, skip_decision
from tinyprop.ledger import Ledger, step_ledger
from tinyprop.model import OUTPUT_ERROR_MAX, state_of


@dataclass
class StepStats:
    """What one :func:`train_step` did.

    Attributes:
        loss: mean of the per-sample losses over the batch (all samples).
        trained: samples backpropagated.
        skipped: samples skipped by the TinyPropv2 decision (forward only).
        macs: the step's :class:`Ledger`.
        keep: layer name -> (trained,) k kept per trained sample, in forward layer order.
        trained_mask: (B,) True where the sample was trained.
        stepped: whether the optimizer stepped (False when every sample was skipped).
    """

    loss: float
    trained: int
    skipped: int
    macs: Ledger
    keep: dict[str, Tensor] = field(default_factory=dict)
    trained_mask: Tensor | None = None
    stepped: bool = False


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn,
    optimizer: torch.optim.Optimizer,
) -> StepStats:
    """One training step with the policy given to :func:`tinyprop.apply`.

    The gradient is that of the mean loss over the batch (as with ``reduction="mean"``), with
    skipped samples contributing zero; the optimizer steps once, or not at all when every sample
    is skipped (its state stays untouched). Skipped samples do no backward work.

    Args:
        model: a model prepared by :func:`tinyprop.apply`.
        x: (B, ...) a batch of inputs.
        y: (B, ...) targets, passed to ``loss_fn`` unchanged.
        loss_fn: ``loss_fn(output, y) -> (B,)`` per-sample losses, e.g.
            ``nn.CrossEntropyLoss(reduction="none")``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.

    Returns:
        :class:`StepStats`.

    Raises:
        ValueError: on mismatched batch sizes or a loss that is not one value per sample.
        FloatingPointError: when a loss is NaN or infinite (no update is applied).

    Example:
        >>> stats = train_step(model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer)
        >>> stats.loss, stats.trained, stats.macs.backward_ratio()
    """
    state = state_of(model)
    config = state.config
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batched tensor (B, ...), got {_describe(x)}")
    batch_size = x.shape[0]
    if isinstance(y, Tensor) and (y.dim() == 0 or y.shape[0] != batch_size):
        raise ValueError(f"x has batch size {batch_size} but y has shape {tuple(y.shape)}")

    state.calls, state.rows, state.collecting = [], None, True
    try:
        output = model(x)
    finally:
        state.collecting = False
    if not isinstance(output, Tensor) or output.shape[:1] != (batch_size,):
        raise ValueError(
            f"the model must return one output tensor (B, ...) with B={batch_size}; "
            f"got {_describe(output)}"
        )
    losses = loss_fn(output, y)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch_size,):
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({batch_size},), got "
            f"{_describe(losses)}; use reduction='none', "
            "e.g. nn.CrossEntropyLoss(reduction='none')"
        )
    if not torch.isfinite(losses).all():
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"loss is NaN or infinite for samples {bad[:10]} of the batch; no update was applied. "
            "Check the inputs for NaN/inf or lower the learning rate."
        )

    # δ_L per sample: the gradient of each sample's own loss w.r.t. the model output
    output_grad = torch.autograd.grad(losses.sum(), output, retain_graph=True)[0]  # (B, ...)
    trained_mask = torch.ones(batch_size, dtype=torch.bool, device=output.device)
    if config.skips:
        output_error_max = getattr(model, OUTPUT_ERROR_MAX)
        error = local_error(output_grad.detach())  # (B,) Y_L
        error_max = running_max(error, output_error_max.to(error.dtype))  # (B,) Ymax_L
        output_error_max.fill_(float(error_max[-1]))
        trained_mask = skip_decision(
            error, error_max, config.d_min, config.d_max, config.beta, config.skip_threshold
        )
    trained = int(trained_mask.sum())
    stats = StepStats(
        loss=float(losses.detach().mean()),
        trained=trained,
        skipped=batch_size - trained,
        macs=Ledger(),
        trained_mask=trained_mask,
    )
    optimizer.zero_grad(set_to_none=True)  # no stale gradients, even when nothing trains
    if trained:
        state.rows = trained_mask.nonzero().flatten()
        mask = trained_mask.view(-1, *([1] * (output_grad.dim() - 1)))
        try:
            output.backward(output_grad * mask)
        finally:
            state.rows = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        torch._foreach_div_([grad for grad in grads if grad is not None], batch_size)
        optimizer.step()
        stats.stepped = True
    output_size = output[0].numel()
    stats.macs = step_ledger(state.calls, config, batch_size, trained, output_size)
    stats.keep = _keep_per_layer(state.calls, trained)
    state.calls = []
    return stats


def _keep_per_layer(calls, trained: int) -> dict[str, Tensor]:
    keep = {}
    for call in calls:
        if call.keep is not None:
            counts = call.keep
        else:  # dense (full policy): every entry kept
            counts = torch.full((trained,), call.output_size, dtype=torch.long)
        name = call.layer.layer_name
        keep[name] = counts if name not in keep else torch.cat([keep[name], counts])
    return keep


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
