"""apply / remove / is_tinyprop: walk a model and give its trainable layers sparse backprop."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tinyprop.config import TinyPropConfig
from tinyprop.layers import SPARSE_CLASSES, TinyPropState

OUTPUT_ERROR_MAX = "tinyprop_output_error_max"  # Ymax_L of the skip decision, on the root module
_STATE = "_tinyprop_state"
_ORIGINAL_CLASS = "_tinyprop_original_class"
# trainable modules that keep their normal dense backward without a warning
_DENSE_BY_DESIGN = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def _supported(module: nn.Module) -> bool:
    return type(module) in SPARSE_CLASSES and getattr(module, "padding_mode", "zeros") == "zeros"


def apply(model: nn.Module, config: TinyPropConfig | None = None) -> nn.Module:
    """Give every nn.Linear, nn.Conv1d and nn.Conv2d of ``model`` sparse backprop, in place.

    Layers are ordered by registration (the order of ``model.named_modules()``); the last one is
    the output layer (distance d = 0). Other trainable modules stay dense and are named in a
    warning; normalisation, activation, pooling, dropout and reshaping modules keep their
    normal backward.

    Args:
        model: any ``nn.Module`` with at least one supported layer.
        config: the policy and its settings; ``TinyPropConfig()`` (tinypropv2) when omitted.

    Returns:
        The same ``model`` object.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> net = apply(net, TinyPropConfig(policy="topk", ratio=0.5))
        >>> is_tinyprop(net)
        True
    """
    config = TinyPropConfig() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, TinyPropConfig):
        raise TypeError(f"config must be a TinyPropConfig, got {type(config).__name__}")
    if is_tinyprop(model):
        raise ValueError("model already has tinyprop applied; call tinyprop.remove(model) first")
    targets = [(name, module) for name, module in model.named_modules() if _supported(module)]
    if not targets:
        raise ValueError(
            "model has no layer tinyprop supports (nn.Linear, nn.Conv1d, nn.Conv2d with "
            f"padding_mode='zeros'); found only: {_module_types(model)}"
        )
    unsupported = [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if not _supported(module)
        and not isinstance(module, _DENSE_BY_DESIGN)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if unsupported:
        warnings.warn(
            "tinyprop keeps these trainable modules dense (unsupported): " + ", ".join(unsupported),
            stacklevel=2,
        )
    state = TinyPropState(config=config, layers=targets)
    count = len(targets)
    for index, (name, module) in enumerate(targets):
        original = type(module)
        module.__class__ = SPARSE_CLASSES[original]
        setattr(module, _ORIGINAL_CLASS, original)
        module.tinyprop_state = state
        module.layer_name = name or "<root>"
        module.layer_index = index
        module.depth = count - 1 - index
        device = module.weight.device
        module.register_buffer("error_max", torch.zeros((), device=device))
        module.register_buffer("backward_steps", torch.zeros((), dtype=torch.long, device=device))
    model.register_buffer(OUTPUT_ERROR_MAX, torch.zeros((), device=targets[-1][1].weight.device))
    setattr(model, _STATE, state)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: plain torch modules, the same ``state_dict`` keys and values."""
    state = state_of(model)
    for _, module in state.layers:
        module.__class__ = getattr(module, _ORIGINAL_CLASS)
        for attribute in (_ORIGINAL_CLASS, "tinyprop_state", "layer_name", "layer_index", "depth"):
            delattr(module, attribute)
        del module._buffers["error_max"], module._buffers["backward_steps"]
    del model._buffers[OUTPUT_ERROR_MAX]
    delattr(model, _STATE)
    return model


def is_tinyprop(model: nn.Module) -> bool:
    """True when :func:`apply` has been called on ``model`` (and not undone)."""
    return isinstance(getattr(model, _STATE, None), TinyPropState)


def state_of(model: nn.Module) -> TinyPropState:
    """The shared state of an applied model; a clear error when tinyprop is not applied."""
    if not is_tinyprop(model):
        raise ValueError("model does not have tinyprop applied; call tinyprop.apply(model, config)")
    return getattr(model, _STATE)


def _module_types(model: nn.Module) -> str:
    names = sorted({type(module).__name__ for module in model.modules()})
    return ", ".join(names)
