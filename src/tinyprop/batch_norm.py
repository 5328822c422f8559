"""BatchNorm whose backward takes its batch means over the trained samples only.

In training mode a BatchNorm normalises every sample with the batch's mean μ and standard
deviation σ, so its input gradient couples the samples (per channel, over the N rows of the
batch and their positions, x̂ = (x - μ) / σ, dy the output gradient):

    dx = γ / σ · (dy - mean(dy) - x̂ · mean(dy · x̂))

When TinyPropv2 (or Selective-Backprop) skips samples, dy is zero on their rows, and the
sparse layers leave those rows out (``drop_skipped_rows``). The trained rows' dx then holds
the means over all N rows while the skipped rows' share of the gradient (their non-zero dx,
from the means) is dropped: the layers below receive a biased gradient. ResNet-8 finetuned
at budget 0.2 lost 10 pp on the cifar100 stand-in (14.15% against 25.60% for full, seed 0).

With ``batch_norm_trained_rows`` the means run over the K trained rows only,

    dx_k = γ / σ · (dy_k - mean_K(dy) - x̂_k · mean_K(dy · x̂)),   dx = 0 on skipped rows,

which is the full gradient with the skipped rows' share estimated by the trained rows' (their
part ∝ mean(dy) + x̂ mean(dy x̂) scaled by (N - K) / K, added to the trained rows). The same
run reached 24.10%. The forward, γ's and β's gradients and the running statistics are
PyTorch's own; with every sample trained (or outside a tinyprop step) dx is the usual one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_ORIGINALS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _TrainedRowsNorm(torch.autograd.Function):
    """y = the module's own batch-statistics forward; backward over the trained rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, module) -> Tensor:
        ctx.module = module
        ctx.save_for_backward(x, weight)
        return module.plain_forward(x)  # updates the running statistics as PyTorch does

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        module = ctx.module
        compute = torch.promote_types(x.dtype, torch.float32)
        x, dy = x.to(compute), grad_output.to(compute)  # (B, C, *)
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # (C,) -> broadcast over (B, C, *)
        mean = x.mean(dims)  # (C,) μ
        inverse_std = torch.rsqrt(x.var(dims, unbiased=False) + module.eps)  # (C,) 1 / σ
        normalised = (x - mean.view(shape)) * inverse_std.view(shape)  # x̂
        grad_bias = dy.sum(dims)  # (C,) Σ dy
        grad_weight = (dy * normalised).sum(dims)  # (C,) Σ dy x̂
        trained = trained_rows(module, x.shape[0])  # (B,) bool, or None: every row
        rows = x.shape[0] if trained is None else int(trained.sum())
        count = max(rows, 1) * (x[0].numel() // x.shape[1])  # K rows times their positions
        scale = inverse_std if weight is None else weight.to(compute) * inverse_std
        grad_input = scale.view(shape) * (
            dy - (grad_bias / count).view(shape) - normalised * (grad_weight / count).view(shape)
        )
        if trained is not None:
            grad_input = grad_input * trained.view(-1, *[1] * (x.dim() - 1)).to(compute)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (
            grad_input.to(grad_output.dtype) if needs_input else None,
            grad_weight.to(weight.dtype) if needs_weight else None,
            grad_bias.to(weight.dtype) if needs_bias else None,
            None,
        )


def trained_rows(module: nn.Module, rows: int) -> Tensor | None:
    """(B,) the trained samples of the running tinyprop step, when some (not all) of a batch of
    ``rows`` samples were skipped; None otherwise (no step, every sample trained, a row count
    that is not the batch's, or losses that couple the samples)."""
    step = module.tinyprop_state.step
    if step is None or step.loss_couples_samples:  # a contrastive loss: every row's dy counts
        return None
    trained = step.stats.trained_mask  # (B,)
    if trained.numel() != rows or bool(trained.all()) or not bool(trained.any()):
        return None
    return trained.to(module.weight.device if module.weight is not None else trained.device)


class _TrainedRowsBatchNorm:
    """Mixin of the swapped BatchNorm classes (see the module docstring)."""

    def plain_forward(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def __reduce_ex__(self, protocol):
        """Pickle (``torch.save``, ``copy.deepcopy``) as the plain BatchNorm, without the
        model's state: the state of a whole model swaps its BatchNorms again
        (``TinyPropState.__setstate__``), and a part of the model saved or copied alone
        (``torch.save(model.features)``) is plain PyTorch, as ``apply`` finds it. It took the
        whole model along, and ``apply`` refused the part's layers as another model's."""
        reduced = super().__reduce_ex__(protocol)
        if protocol < 2:
            return reduced
        attributes = dict(reduced[2])
        attributes.pop("tinyprop_state", None)
        return (_plain_batch_norm, (_ORIGINAL_OF[type(self)],), attributes, *reduced[3:])

    def forward(self, x: Tensor) -> Tensor:
        state = self.tinyprop_state
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not (
            batch_statistics
            and torch.is_grad_enabled()
            and state.config.batch_norm_trained_rows
            and state.policy.skips
        ):
            return super().forward(x)
        return _TrainedRowsNorm.apply(x, self.weight, self.bias, self)


_CLASSES = {
    original: type(
        f"TinyProp{original.__name__}",
        (_TrainedRowsBatchNorm, original),
        {"__module__": __name__},
    )
    for original in _ORIGINALS
}
_ORIGINAL_OF = {swapped: original for original, swapped in _CLASSES.items()}
for _swapped in _CLASSES.values():
    globals()[_swapped.__name__] = _swapped  # picklable by name


def _plain_batch_norm(original: type) -> nn.Module:
    """An empty plain BatchNorm, for pickle to fill in."""
    return original.__new__(original)


def swap_batch_norms(model: nn.Module, state) -> list[nn.Module]:
    """Give every plain ``nn.BatchNorm1d/2d/3d`` of ``model`` (exactly those classes: a
    subclass may have its own forward) the trained-rows backward; returns the modules."""
    swapped = [module for module in model.modules() if type(module) in _CLASSES]
    for module in swapped:
        swap_batch_norm(module, state)
    return swapped


def swap_batch_norm(module: nn.Module, state) -> None:
    """Give one plain BatchNorm (or one swapped already) the trained-rows backward."""
    module.__class__ = _CLASSES[_ORIGINAL_OF.get(type(module), type(module))]
    object.__setattr__(module, "tinyprop_state", state)  # (also while pickle builds it)


def restore_batch_norms(modules: list[nn.Module]) -> None:
    """Undo :func:`swap_batch_norms`."""
    for module in modules:
        module.__class__ = _ORIGINAL_OF[type(module)]
        del module.tinyprop_state
