"""Fold BatchNorm layers into the Linear or conv layer before them, for export.

The C runtime trains one sample at a time, so a BatchNorm's batch statistics have no meaning
there. A BatchNorm right after a Linear / Conv1d / Conv2d computes, with its running statistics
(as in ``model.eval()``), an affine map per channel that the layer's weight and bias can take:
``W' = W · γ / sqrt(σ² + ε)`` per output channel, ``b' = (b − μ) · γ / sqrt(σ² + ε) + β``.
The folded model computes what the original computes in eval mode; it then trains without
BatchNorm, in C and in the Python library alike.

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(64, 3))
    >>> folded = fold_batch_norm(net)          # a copy; net is left as it was
    >>> type(folded[1]).__name__
    'Identity'
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from tinyprop.export.graph import written_in_python
from tinyprop.export.tracing import TracingError, traced_layers

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDS_INTO = {nn.BatchNorm1d: (nn.Linear, nn.Conv1d), nn.BatchNorm2d: (nn.Conv2d,)}


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaf modules of (nested) nn.Sequential containers in order, with their paths."""
    if type(module) is nn.Sequential or (
        isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    ):
        leaves = []
        for name, child in module._modules.items():
            leaves += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return leaves
    return [(prefix, module)]


def _refuse(path: str, norm: nn.Module, why: str) -> ValueError:
    return ValueError(f"cannot fold layer '{path}' ({type(norm).__name__}): {why}")


def _called_layers(model: nn.Module, input_shape) -> list[tuple[str, nn.Module]]:
    """The chain of layers a forward written in Python calls, with their paths (torch.fx)."""
    if input_shape is None:
        from tinyprop.export import infer_input_shape  # (that module imports this one)

        input_shape = infer_input_shape(model)  # an MLP's; a ValueError for a conv model
    try:
        return traced_layers(model, tuple(input_shape))
    except TracingError as error:
        raise ValueError(f"cannot fold the BatchNorms of {type(model).__name__}: {error}") from None


def fold_batch_norm(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A copy of ``model`` with every BatchNorm1d/2d folded into the layer before it.

    Args:
        model: an ``nn.Sequential`` (possibly nested), or a module whose forward calls its
            layers in a chain, in which each BatchNorm comes right after a Linear / Conv1d
            (BatchNorm1d) or a Conv2d (BatchNorm2d) with as many output channels, and keeps
            running statistics.
        input_shape: one sample's shape, to read the chain a forward written in Python calls
            (inferred for an MLP); not needed for an ``nn.Sequential``.

    Returns:
        The folded copy: each BatchNorm replaced by ``nn.Identity``, the layer before it given
        the folded weight and bias (a bias is added where it had none). ``model`` is unchanged.

    Raises:
        ValueError: naming the BatchNorm that cannot be folded and why.
    """
    folded = copy.deepcopy(model)
    # (a forward written in Python: the layers it calls; the Sequential walk saw none of them)
    leaves = _called_layers(folded, input_shape) if written_in_python(folded) else _leaves(folded)
    for index, (path, norm) in enumerate(leaves):
        if not isinstance(norm, _BATCH_NORMS):
            continue
        kinds = _FOLDS_INTO[nn.BatchNorm2d if isinstance(norm, nn.BatchNorm2d) else nn.BatchNorm1d]
        layer_path, layer = leaves[index - 1] if index > 0 else ("", None)
        if not isinstance(layer, kinds):
            raise _refuse(
                path, norm, "it does not come right after a "
                f"{' or '.join(k.__name__ for k in kinds)}, so no layer's weights can take it"
            )  # fmt: skip
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if norm.num_features != channels:
            raise _refuse(path, norm, f"{norm.num_features} features after {channels} channels")
        if norm.running_mean is None or norm.running_var is None:
            raise _refuse(
                path, norm, "it keeps no running statistics (track_running_stats=False), so "
                "it normalises with each batch's, which one sample at a time cannot do"
            )  # fmt: skip
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(
                layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps,
                norm.weight, norm.bias,
            )  # fmt: skip
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise _refuse(
                path, norm, "the folded weight or bias is NaN or infinite (a negative or NaN "
                "running_var, or NaN statistics); check the BatchNorm's buffers"
            )  # fmt: skip
        # the folded bias trains when the layer's bias or the norm's affine parameters do
        # (a frozen layer and norm stay frozen: tinyprop.export.frozen reads requires_grad)
        trains = any(
            p is not None and p.requires_grad for p in (layer.bias, norm.weight, norm.bias)
        )
        layer.weight = nn.Parameter(weight.detach(), requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias.detach(), requires_grad=trains)
        parent_path, _, name = path.rpartition(".")
        parent = folded.get_submodule(parent_path) if parent_path else folded
        setattr(parent, name, nn.Identity())
    return folded
