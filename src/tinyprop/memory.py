"""Memory-lean training modes: the Python mirror of the C runtime's ``tp_memory_config``.

A mode says which layers train and how updates are applied, so that the accuracy of training
on a microcontroller can be measured here before anything is flashed:

- ``first_trained_layer`` (last-layers fine-tuning): the dense/conv layers before this one
  (counted from 0 in forward order) are frozen. Here their parameters get
  ``requires_grad=False`` (:func:`freeze`), which tinyprop already handles (no gradient, no
  backward through them); in C their weights stay ``const`` in flash.
- ``sgd_in_place``: plain SGD where every trained sample is its own step, applied as soon as a
  layer's backward is done (C: no gradient buffer for dense layers, one layer-sized buffer for
  a conv while its backward runs). Here: :func:`train_step_in_place`, one ``train_step`` per
  sample. With one sample per batch it is the ordinary SGD step.
- ``momentum_in_place``: SGD with momentum and one step per batch, without a gradient buffer:
  in C the momentum buffer is scaled by ``momentum * B`` at a batch's first trained sample,
  each trained sample's gradient is added into it, and the update divides it by B. The same
  step as ``torch.optim.SGD(momentum=...)`` up to the order of float additions, so the mirror
  is the plain optimizer.
- ``selection_in_place``: a sparse policy chooses its kept entries without the selection
  scratch (two entries per output): in C a radix select over the bits of |δ| finds the k-th
  largest, the entries not kept are set to zero in δ itself and the backward skips zeros. The
  same kept entries (the floats differ by rounding only where k exceeds the non-zero errors):
  the mirror is the library as it is.
- ``adam_in_place``: Adam where every trained sample is its own step (t counts trained
  samples), applied as soon as a layer's backward is done: in C a trained layer gathers the
  sample's gradient in a buffer of its own size that lives only during its backward (no
  gradient buffer for the model). Here: :func:`train_step_in_place` with Adam.
- ``moment_bits``: 32 (float moments) or 8: Adam keeps m and v in 8 bits per entry plus a
  float per block of 64 (:class:`tinyprop.moments.Adam8bit`, the same floats as C).
- ``recompute_layers``: trained layers (not bias-only) whose input is not kept for their
  backward: in C it is computed again from the sample (the forward of the layers before it, the
  same floats) when their backward runs. The library keeps it: the same floats.

``tinyprop.export.arena.plan_arena`` computes the arena of a mode exactly as the runtime does,
and :data:`MODES` names the modes measured for the example models.

Example:
    >>> mode = MODES["speech_commands"][1]          # the last layers only, Adam
    >>> freeze(model, mode.memory)
    >>> optimizer = mode.optimizer_for(model, lr=3e-3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import tinyprop
from tinyprop.ledger import Ledger
from tinyprop.moments import Adam8bit

TRAINABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class MemoryMode:
    """The runtime's ``tp_memory_config``.

    Attributes:
        first_trained_layer: index (forward order, from 0) of the first dense/conv layer that
            trains; the ones before are frozen. 0 trains every layer.
        sgd_in_place: every trained sample is its own plain-SGD step, applied in place.
        bias_only_layers: trained layers (the first trained one included) whose bias alone
            trains; their weights stay in flash.
        momentum_in_place: SGD with momentum (no Nesterov) accumulates the batch's gradient
            in its momentum buffer: no gradient buffer.
        selection_in_place: sparse policies select top-k in δ itself (no selection scratch).
        adam_in_place: every trained sample is its own Adam step, each layer's applied after
            its backward (no gradient buffer).
        moment_bits: 32, or 8 for Adam's moments in 8 bits (:mod:`tinyprop.moments`).
        recompute_layers: trained layers whose input is computed again from the sample for
            their backward instead of kept.
    """

    first_trained_layer: int = 0
    sgd_in_place: bool = False
    bias_only_layers: tuple[int, ...] = ()
    momentum_in_place: bool = False
    selection_in_place: bool = False
    adam_in_place: bool = False
    moment_bits: int = 32
    recompute_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.first_trained_layer, bool) or not isinstance(
            self.first_trained_layer, int
        ):
            raise TypeError(f"first_trained_layer must be an int, got {self.first_trained_layer!r}")
        if self.first_trained_layer < 0:
            raise ValueError(f"first_trained_layer must be >= 0, got {self.first_trained_layer}")
        layers = _layer_indices("bias_only_layers", self.bias_only_layers)
        recompute = _layer_indices("recompute_layers", self.recompute_layers)
        if recompute and recompute[0] <= self.first_trained_layer:
            raise ValueError(
                "recompute_layers must lie after first_trained_layer (a frozen layer's input is "
                f"not kept anyway), got {recompute} with first_trained_layer "
                f"{self.first_trained_layer}"
            )
        if set(recompute) & set(layers):
            raise ValueError(
                "recompute_layers must not be bias-only (a bias-only layer keeps no input), got "
                f"{sorted(set(recompute) & set(layers))}"
            )
        if recompute and recompute[-1] >= 32:
            raise ValueError(f"recompute_layers: the runtime handles layers 0..31, got {recompute}")
        if self.moment_bits not in (8, 32) or isinstance(self.moment_bits, bool):
            raise ValueError(f"moment_bits must be 32 or 8, got {self.moment_bits!r}")
        if self.adam_in_place and (self.sgd_in_place or self.momentum_in_place):
            raise ValueError(
                "adam_in_place excludes sgd_in_place and momentum_in_place (one optimizer)"
            )
        if layers and layers[0] < self.first_trained_layer:
            raise ValueError(
                "bias_only_layers must lie at or after first_trained_layer (the layers before "
                f"are frozen), got {layers} with first_trained_layer {self.first_trained_layer}"
            )
        if layers and self.sgd_in_place:
            raise ValueError("bias_only_layers do not work with sgd_in_place (not built)")
        if self.selection_in_place and self.sgd_in_place:
            raise ValueError("selection_in_place does not work with sgd_in_place (not built)")
        if self.momentum_in_place and self.sgd_in_place:
            raise ValueError(
                "momentum_in_place and sgd_in_place exclude each other: sgd_in_place steps "
                "every sample with plain SGD, momentum_in_place steps once per batch"
            )
        object.__setattr__(self, "bias_only_layers", layers)
        object.__setattr__(self, "recompute_layers", recompute)

    @property
    def bias_only_bits(self) -> int:
        """``bias_only_layers`` as the runtime's bit mask (bit i: trainable layer i)."""
        return sum(1 << index for index in self.bias_only_layers)

    @property
    def recompute_bits(self) -> int:
        """``recompute_layers`` as the runtime's bit mask (bit i: trainable layer i)."""
        return sum(1 << index for index in self.recompute_layers)

    @property
    def in_place(self) -> bool:
        """Every trained sample is its own step (``sgd_in_place`` or ``adam_in_place``)."""
        return self.sgd_in_place or self.adam_in_place

    def check(self, optimizer: str, momentum: float, nesterov: bool = False) -> None:
        """Raise ValueError when the optimizer does not fit the mode."""
        if self.sgd_in_place and (optimizer != "sgd" or momentum != 0 or nesterov):
            raise ValueError(
                "sgd_in_place needs plain SGD (no momentum, no Nesterov, no Adam): an in-place "
                f"update keeps no state between samples; got {optimizer} with momentum "
                f"{momentum}"
            )
        if self.momentum_in_place and (optimizer != "sgd" or momentum == 0 or nesterov):
            raise ValueError(
                "momentum_in_place needs SGD with momentum > 0 and without Nesterov (the "
                f"gradient is gathered in the momentum buffer); got {optimizer} with momentum "
                f"{momentum}, nesterov {nesterov}"
            )
        if (self.adam_in_place or self.moment_bits != 32) and optimizer != "adam":
            raise ValueError(
                "adam_in_place and moment_bits 8 need Adam; got "
                f"{optimizer} (adam_in_place {self.adam_in_place}, moment_bits "
                f"{self.moment_bits})"
            )


def _layer_indices(name: str, values) -> tuple[int, ...]:
    """A mode's tuple of dense/conv layer indices, checked: ints, increasing."""
    layers = tuple(values)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise TypeError(f"{name} must hold ints, got {values!r}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name} must be increasing, got {layers}")
    return layers


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dense and conv layers of ``model`` in forward (registration) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TRAINABLE_TYPES)]


def freeze(model: nn.Module, mode: MemoryMode) -> list[str]:
    """Freeze the dense/conv layers before ``mode.first_trained_layer`` (``requires_grad``
    False on their parameters); returns their names.

    Raises:
        ValueError: when the model has no dense/conv layer at that index.
    """
    layers = trainable_layers(model)
    if not 0 <= mode.first_trained_layer < len(layers):
        raise ValueError(
            f"first_trained_layer must lie in [0, {len(layers)}) for this model (it has "
            f"{len(layers)} dense/conv layers), got {mode.first_trained_layer}"
        )
    if mode.bias_only_layers and mode.bias_only_layers[-1] >= len(layers):
        raise ValueError(
            f"bias_only_layers must lie in [0, {len(layers)}) for this model, got "
            f"{mode.bias_only_layers}"
        )
    frozen = layers[: mode.first_trained_layer]
    for _, module in frozen:
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)
    for index in mode.bias_only_layers:
        layers[index][1].weight.requires_grad_(False)
    return [name for name, _ in frozen]


def train_step_in_place(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, optimizer
) -> tinyprop.StepStats:
    """``sgd_in_place`` and ``adam_in_place`` semantics: every sample of the batch is its own
    step (in order) of plain SGD or Adam (float or 8-bit moments, without AMSGrad).

    Returns one :class:`tinyprop.StepStats` for the batch: the mean loss, the summed counts and
    ledger, k per layer of the trained samples, the trained mask.
    """
    if isinstance(optimizer, torch.optim.SGD):
        group = optimizer.param_groups[0]
        if group["momentum"] or group["nesterov"]:
            raise ValueError("sgd_in_place needs SGD without momentum or Nesterov")
    elif isinstance(optimizer, torch.optim.Adam):
        if optimizer.param_groups[0]["amsgrad"]:
            raise ValueError("adam_in_place needs Adam without AMSGrad")
    elif not isinstance(optimizer, Adam8bit):
        raise ValueError(
            "train_step_in_place runs plain torch.optim.SGD, torch.optim.Adam or "
            f"tinyprop.moments.Adam8bit, got {type(optimizer).__name__}"
        )
    losses, trained, skipped, macs = [], 0, 0, Ledger()
    keep: dict[str, list[torch.Tensor]] = {}
    mask = []
    for index in range(len(x)):
        stats = tinyprop.train_step(
            model, x[index : index + 1], y[index : index + 1], loss_fn, optimizer
        )
        losses.append(stats.loss)
        trained += stats.trained
        skipped += stats.skipped
        macs += stats.macs
        mask.append(bool(stats.trained_mask[0]) if stats.trained_mask is not None else True)
        for name, values in stats.keep.items():
            keep.setdefault(name, []).append(values)
    return tinyprop.StepStats(
        loss=float(sum(losses) / len(losses)),
        trained=trained,
        skipped=skipped,
        macs=macs,
        keep={name: torch.cat(values) for name, values in keep.items()},
        trained_mask=torch.tensor(mask),
        stepped=trained > 0,
    )


@dataclass(frozen=True)
class TrainingMode:
    """A named way to train a model on a device: memory mode, optimizer and what it is for.

    Attributes:
        name: short label (records, tables).
        memory: the :class:`MemoryMode`.
        optimizer: ``adam`` or ``sgd``.
        momentum: SGD momentum.
        lr_scale: the learning rate is the plan's (Adam) learning rate times this; with
            ``sgd_in_place`` also divided by the batch size (every sample is a step, so an
            epoch moves the weights about as far as with one step per batch).
        description: one line for tables.
        on_device: built for the Cortex-M4 (``make -C runtime cortex-m4``) and in the README's
            table; False for a mode measured for accuracy only (which layers, learning rates
            or optimizers matter), whose arena ``tinyprop.export.footprint`` reports.
    """

    name: str
    memory: MemoryMode = field(default_factory=MemoryMode)
    optimizer: str = "adam"
    momentum: float = 0.0
    lr_scale: float = 1.0
    description: str = ""
    on_device: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        self.memory.check(self.optimizer, self.momentum)

    def learning_rate(self, adam_lr: float, batch_size: int) -> float:
        """The learning rate of this mode for a plan with Adam at ``adam_lr``."""
        lr = adam_lr * self.lr_scale
        return lr / batch_size if self.memory.sgd_in_place else lr

    def optimizer_for(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The torch optimizer of this mode over the model's trainable parameters."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adam" and self.memory.moment_bits == 8:
            return Adam8bit(parameters, lr=lr)
        if self.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=lr)
        return torch.optim.SGD(parameters, lr=lr, momentum=self.momentum)

    def step(self, model: nn.Module, x, y, loss_fn, optimizer) -> tinyprop.StepStats:
        """One batch under this mode's update semantics."""
        if self.memory.in_place:
            return train_step_in_place(model, x, y, loss_fn, optimizer)
        return tinyprop.train_step(model, x, y, loss_fn, optimizer)


FULL = TrainingMode("all-adam", description="every layer, Adam (the reference)")


def study(name: str, memory: MemoryMode, description: str, **settings) -> TrainingMode:
    """An accuracy-only mode (``on_device`` False): which layers or settings matter."""
    return TrainingMode(name, memory, description=description, on_device=False, **settings)


# the modes measured per example model (dataset name -> modes; the first is the reference).
# selection_in_place changes no float the library computes, only the runtime's selection
# scratch under sparse policies (records measured before it was set still hold).
# first-bias-last2: TinyTL-style bias updates between a trained first conv and trained last
# layers (the first conv matters on the keyword task; its input is the 2 KB sample).
# Layer indices count dense/conv layers: HAR CNN conv0 conv1 conv2 linear3; DS-CNN conv0,
# (depthwise, pointwise) x 4 = 1..8, linear 9; MNIST MLP linear 0, 1, 2.
FIRST_BIAS_PW34 = (1, 2, 3, 4, 5, 7)  # DS-CNN: every layer between conv0 and pw3 bias-only
DEPTHWISE = (1, 3, 5, 7)  # DS-CNN: the depthwise convs
# DS-CNN in 256 KB: the pointwise convs and the classifier train (the first and depthwise convs
# their biases), Adam per sample with 8-bit moments, the pointwise convs' inputs recomputed
LEAN_POINTWISE = MemoryMode(
    0,
    bias_only_layers=(0, *DEPTHWISE),
    selection_in_place=True,
    adam_in_place=True,
    moment_bits=8,
    recompute_layers=(2, 4, 6, 8),
)
MODES: dict[str, list[TrainingMode]] = {
    "har": [
        FULL,
        TrainingMode("last2-adam", MemoryMode(2), description="last conv + classifier, Adam"),
        TrainingMode(
            "last1-adam", MemoryMode(3), description="the classifier only (convs frozen), Adam"
        ),
        TrainingMode(
            "last2-sgd-in-place",
            MemoryMode(2, sgd_in_place=True),
            optimizer="sgd",
            lr_scale=10.0,
            description="last conv + classifier, per-sample SGD in place",
        ),
    ],
    "speech_commands": [
        FULL,
        TrainingMode(
            "last3-sgd",
            MemoryMode(7),
            optimizer="sgd",
            lr_scale=10.0,
            description="last depthwise + pointwise conv + classifier, SGD",
        ),
        TrainingMode(
            "last2-adam", MemoryMode(8), description="last pointwise conv + classifier, Adam"
        ),
        TrainingMode("last1-adam", MemoryMode(9), description="the classifier only, Adam"),
        TrainingMode(
            "first-bias-last2-adam",
            MemoryMode(0, bias_only_layers=(1, 2, 3, 4, 5, 6, 7), selection_in_place=True),
            description="first conv, last pointwise conv and classifier; biases of the layers "
            "between (weights in flash), Adam",
        ),
        TrainingMode(
            "first-bias-last2-adam-lr3",
            MemoryMode(0, bias_only_layers=(1, 2, 3, 4, 5, 6, 7), selection_in_place=True),
            lr_scale=3.0,
            description="the same, Adam at 3x the plan's learning rate",
        ),
        *(
            TrainingMode(
                f"first-bias-pw34-sgdm-lr{scale:g}",
                MemoryMode(
                    0,
                    bias_only_layers=FIRST_BIAS_PW34,
                    momentum_in_place=True,
                    selection_in_place=True,
                ),
                optimizer="sgd",
                momentum=0.9,
                lr_scale=float(scale),
                description="first conv, last two pointwise convs and classifier; biases of "
                f"the layers between; SGD momentum 0.9 gathered in its buffer, {scale:g}x lr",
                on_device=scale == 3,  # the learning rate chosen on the validation split
            )
            for scale in (0.3, 1, 3, 10, 30)
        ),
        # which layers and optimizers matter (accuracy only: these do not fit 256 KB)
        study(
            "first-bias-pw34-adam",
            MemoryMode(0, bias_only_layers=FIRST_BIAS_PW34),
            "first conv, last two pointwise convs and classifier; biases of the layers between, "
            "Adam",
        ),
        study(
            "first-bias-pw34-adam-lr3",
            MemoryMode(0, bias_only_layers=FIRST_BIAS_PW34),
            "the same, Adam at 3x the plan's learning rate",
            lr_scale=3.0,
        ),
        study(
            "bias-pw34-adam",
            MemoryMode(0, bias_only_layers=(0, *FIRST_BIAS_PW34)),
            "last two pointwise convs and classifier; the biases of every layer before, Adam",
        ),
        study(
            "pw34-adam",
            MemoryMode(5, bias_only_layers=(5, 7)),
            "last two pointwise convs and classifier, the biases of the depthwise convs before "
            "them, Adam",
        ),
        *(
            study(
                f"pointwise-sgdm-lr{scale:g}",
                MemoryMode(0, bias_only_layers=DEPTHWISE, momentum_in_place=True),
                "every layer but the depthwise convs, which train their biases; SGD momentum "
                f"0.9 gathered in its buffer, {scale:g}x lr",
                optimizer="sgd",
                momentum=0.9,
                lr_scale=float(scale),
            )
            for scale in (1, 3, 10)
        ),
        study(
            "pointwise-adam",
            MemoryMode(0, bias_only_layers=DEPTHWISE),
            "every layer but the depthwise convs, which train their biases, Adam",
        ),
        TrainingMode(
            "bias-pw-adam8-in-place",
            LEAN_POINTWISE,
            lr_scale=0.3,
            description="the pointwise convs and the classifier, the biases of the first and the "
            "depthwise convs; Adam per sample in place (0.3x lr), 8-bit moments, the pointwise "
            "convs' inputs recomputed",
        ),
        *(
            study(
                f"bias-pw-adam8-in-place-lr{scale:g}",
                LEAN_POINTWISE,
                f"the same at {scale:g}x the plan's learning rate (choosing it on validation)",
                lr_scale=float(scale),
            )
            for scale in (0.1, 1)
        ),
        study(
            "bias-pointwise-adam",
            MemoryMode(0, bias_only_layers=(0, *DEPTHWISE)),
            "the pointwise convs and the classifier; the biases of the first and the depthwise "
            "convs, Adam",
        ),
    ],
    "mnist": [
        FULL,
        TrainingMode("last1-adam", MemoryMode(2), description="the classifier only, Adam"),
        TrainingMode(
            "all-sgd-in-place",
            MemoryMode(0, sgd_in_place=True),
            optimizer="sgd",
            lr_scale=10.0,
            description="every layer, per-sample SGD in place (no gradient buffer)",
        ),
    ],
}


def modes_for(dataset: str) -> list[TrainingMode]:
    """The modes measured for a dataset's example model."""
    if dataset not in MODES:
        raise ValueError(f"no training modes for {dataset!r}; choose one of {list(MODES)}")
    return MODES[dataset]
