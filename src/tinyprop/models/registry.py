"""Which reference model each dataset uses: ``build(dataset_name)`` and ``names()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tinyprop.models.autoencoder import autoencoder
from tinyprop.models.dscnn import ds_cnn
from tinyprop.models.har import cnn1d
from tinyprop.models.mnist import cnn, mlp
from tinyprop.models.mobilenet import mobilenet_v1, mobilenet_v1_short
from tinyprop.models.resnet import resnet8


@dataclass(frozen=True)
class Reference:
    """One dataset's reference model: its name, builder and default shapes."""

    model_name: str  # independent of the input shape and classes (records store those)
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int | None  # None: an autoencoder (no classes)


# dataset -> variant -> reference model; the first variant is the default
_REFERENCES: dict[str, dict[str, Reference]] = {
    "mnist": {
        "mlp": Reference("mlp-128-64", mlp, (1, 28, 28), 10),
        "cnn": Reference("cnn-8-16", cnn, (1, 28, 28), 10),
    },
    "cifar10": {"resnet8": Reference("resnet8", resnet8, (3, 32, 32), 10)},
    "cifar100": {"resnet8": Reference("resnet8", resnet8, (3, 32, 32), 100)},
    "flowers102": {
        "mobilenet": Reference("mobilenetv1-0.25", mobilenet_v1, (3, 64, 64), 102),
        "mobilenet-short": Reference("mobilenetv1-0.5-7", mobilenet_v1_short, (3, 32, 32), 102),
    },
    "food101": {
        "mobilenet": Reference("mobilenetv1-0.25", mobilenet_v1, (3, 64, 64), 101),
        "mobilenet-short": Reference("mobilenetv1-0.5-7", mobilenet_v1_short, (3, 32, 32), 101),
    },
    "speech_commands": {"dscnn": Reference("ds-cnn-s", ds_cnn, (1, 49, 10), 12)},
    "har": {"cnn1d": Reference("cnn1d-16-32-32", cnn1d, (6, 100), 4)},
    "dcase2020": {"autoencoder": Reference("autoencoder-64-8", autoencoder, (640,), None)},
    # real datasets besides the paper's eight, on MNIST-sized models of their own
    "fashion_mnist": {
        "mlp": Reference("mlp-128-64", mlp, (1, 28, 28), 10),
        "cnn": Reference("cnn-8-16", cnn, (1, 28, 28), 10),
    },
    "digits": {"mlp": Reference("mlp-128-64", mlp, (1, 8, 8), 10)},
}


def names() -> list[str]:
    """Dataset names that have a reference model (the paper's eight, then the extra real ones)."""
    return list(_REFERENCES)


def variants(dataset_name: str) -> list[str]:
    """The model variants of one dataset; the first is the default."""
    return list(_lookup(dataset_name))


def reference(dataset_name: str, variant: str | None = None) -> Reference:
    """The :class:`Reference` entry of a dataset (and variant)."""
    options = _lookup(dataset_name)
    if variant is None:
        return next(iter(options.values()))
    if variant not in options:
        raise ValueError(
            f"dataset {dataset_name!r} has no model variant {variant!r}; choose one of "
            f"{list(options)}"
        )
    return options[variant]


def is_autoencoder(dataset_name: str) -> bool:
    """True when the dataset's reference model is an autoencoder (metric AUC, no classes)."""
    return reference(dataset_name).num_classes is None


def build(
    dataset_name: str,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    variant: str | None = None,
    **options,
) -> nn.Module:
    """Build a dataset's reference model, freshly initialised (seed with ``torch.manual_seed``).

    Args:
        dataset_name: one of :func:`names`.
        num_classes: number of outputs; defaults to the dataset's (ignored by the autoencoder).
        input_shape: shape of one sample; defaults to the dataset's offline source shape. Pass
            ``Dataset.input_shape`` from ``tinyprop.data.load``.
        variant: a model variant (see :func:`variants`), e.g. ``"cnn"`` for MNIST.
        options: builder-specific options (e.g. ``width`` for ResNet-8 and MobileNet).

    Returns:
        A plain ``nn.Module`` mapping ``(B, *input_shape)`` to logits ``(B, num_classes)``
        (the autoencoder: to the flat reconstruction ``(B, prod(input_shape))``).

    Example:
        >>> model = build("mnist", variant="cnn")
        >>> model(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    entry = reference(dataset_name, variant)
    shape = tuple(int(size) for size in (input_shape or entry.input_shape))
    if any(size <= 0 for size in shape):
        raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
    if entry.num_classes is None:
        return entry.builder(input_shape=shape, **options)
    classes = entry.num_classes if num_classes is None else int(num_classes)
    if classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return entry.builder(num_classes=classes, input_shape=shape, **options)


def _lookup(dataset_name: str) -> dict[str, Reference]:
    if dataset_name not in _REFERENCES:
        raise ValueError(
            f"no reference model for dataset {dataset_name!r}; choose one of {names()}"
        )
    return _REFERENCES[dataset_name]
