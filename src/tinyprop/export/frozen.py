"""The layers a PyTorch model froze (``requires_grad=False``) as the C runtime's memory mode.

The runtime trains every dense/conv layer unless its memory mode says otherwise
(:class:`tinyprop.memory.MemoryMode`: the layers before ``first_trained_layer`` frozen, the
``bias_only_layers`` training their bias alone). A model fine-tuned in PyTorch with its first
layers frozen was exported with every layer trained: the C program trained the weights the
PyTorch run kept fixed, silently. Now the frozen parameters give the mode when none is
given, and a mode that would train a frozen parameter is refused, naming the layer.

Example:
    >>> from torch import nn
    >>> from tinyprop.export.graph import describe
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = net[0].requires_grad_(False)
    >>> mode_of_frozen_layers(net, describe(net, (4,)), None).first_trained_layer
    1
"""

from __future__ import annotations

from torch import nn

from tinyprop.export.graph import LayerSpec, compiled_original
from tinyprop.memory import MemoryMode

NONE, BIAS, WEIGHT, ALL = "nothing", "its bias only", "its weight only", "its weight and bias"
FROZEN = {NONE: "its weight and bias", BIAS: "its weight", WEIGHT: "its bias"}  # what it froze


def _trains(model: nn.Module, layer: LayerSpec, updated: frozenset[int] | None) -> str:
    """What the PyTorch model trains of a dense/conv layer: NONE, BIAS, WEIGHT or ALL (a
    parameter outside ``updated``, the ids of the tensors a torch optimizer steps, stays as it
    is: frozen as well)."""
    module = model if layer.path == "<root>" else model.get_submodule(layer.path)

    def trained(tensor) -> bool:
        return tensor.requires_grad and (updated is None or id(tensor) in updated)

    weight = trained(module.weight)
    bias = module.bias is not None and trained(module.bias)
    if weight:
        return WEIGHT if module.bias is not None and not bias else ALL
    return BIAS if bias else NONE


def _suggestion(trains: list[str], memory: MemoryMode) -> str:
    """The mode that freezes what ``memory`` or the model freezes, as Python and flags."""
    first = max(
        [memory.first_trained_layer]
        + [
            i + 1
            for i, what in enumerate(trains)
            if what in (NONE, WEIGHT) and i >= memory.first_trained_layer
        ]
    )
    if first >= len(trains):
        return "a mode that trains a layer (this one would train none)"
    bias_only = tuple(
        i for i, what in enumerate(trains)
        if i >= first and (what == BIAS or i in memory.bias_only_layers)
    )  # fmt: skip
    flags = f"--first-trained-layer {first}" + (
        " --bias-only-layers " + " ".join(str(i) for i in bias_only) if bias_only else ""
    )
    return f"MemoryMode(first_trained_layer={first}, bias_only_layers={bias_only}) ({flags})"


def mode_of_frozen_layers(
    model: nn.Module,
    layers: list[LayerSpec],
    memory: MemoryMode | None,
    updated: frozenset[int] | None = None,
) -> MemoryMode:
    """The memory mode to export ``model`` with.

    Args:
        model: the model ``layers`` were described from.
        layers: its runtime layers (:func:`tinyprop.export.graph.describe`).
        memory: the mode asked for, or None.
        updated: the ids of the parameters the PyTorch optimizer updates
            (``OptimizerSpec.from_torch(...).parameters``); one it leaves out counts as frozen.
            None: every parameter with ``requires_grad``.

    Returns:
        ``memory`` when given, else the mode that trains what the model trains: its leading
        frozen dense/conv layers before ``first_trained_layer``, the later layers whose
        weight alone is frozen in ``bias_only_layers`` (``MemoryMode()`` when nothing is
        frozen).

    Raises:
        ValueError: naming the layer, when ``memory`` would train a parameter the model froze,
            or, without ``memory``, when the runtime cannot train what the model trains: every
            layer frozen, a frozen layer after a trained one, a frozen bias beside a trained
            weight.
    """
    model = compiled_original(model)
    dense_or_conv = [layer for layer in layers if layer.trainable]
    trains = [_trains(model, layer, updated) for layer in dense_or_conv]  # per dense/conv layer
    if memory is not None:
        for index, (layer, what) in enumerate(zip(dense_or_conv, trains, strict=True)):
            if index < memory.first_trained_layer or what == ALL:
                continue  # the mode freezes it, or the model trains all of it
            if what != BIAS or index not in memory.bias_only_layers:
                asked = BIAS if index in memory.bias_only_layers else ALL
                frozen = FROZEN[what]
                raise ValueError(
                    f"the memory mode trains {asked} of layer '{layer.path}' "
                    f"({layer.module_type}, dense/conv layer {index}), but the model froze "
                    f"{frozen} (requires_grad False, or its optimizer leaves it out): the "
                    "exported program would train what the PyTorch model keeps fixed. Export "
                    f"with {_suggestion(trains, memory)}, or set requires_grad=True on it (and "
                    "give it to the optimizer)"
                )
        return memory
    if all(what == NONE for what in trains):
        raise ValueError(
            "every Linear/Conv layer of the model is frozen (requires_grad False on all its "
            "parameters, or the optimizer leaves them out): nothing to train; set "
            "requires_grad=True on the layers to train and give them to the optimizer"
        )
    first = next(index for index, what in enumerate(trains) if what != NONE)
    for index, what in enumerate(trains):
        if what == WEIGHT:
            layer = dense_or_conv[index]
            raise ValueError(
                f"layer '{layer.path}' ({layer.module_type}) trains its weight but not its bias "
                "(bias.requires_grad False, or the optimizer leaves it out); the C runtime "
                "trains a layer's weight and bias, its bias alone, or neither: set "
                "requires_grad alike on both (and give both to the optimizer)"
            )
        if what == NONE and index > first:
            layer = dense_or_conv[index]
            raise ValueError(
                f"layer '{layer.path}' ({layer.module_type}, dense/conv layer {index}) is frozen "
                f"after a trained layer ('{dense_or_conv[first].path}') (requires_grad False, or "
                "the optimizer leaves it out); the C runtime freezes "
                "only the first layers (first_trained_layer) and can train a later layer's "
                "bias alone (bias_only_layers, which needs a bias): unfreeze it, give it a "
                "trainable bias, or freeze the layers before it too"
            )
    return MemoryMode(
        first_trained_layer=first,
        bias_only_layers=tuple(i for i, what in enumerate(trains) if i >= first and what == BIAS),
    )
