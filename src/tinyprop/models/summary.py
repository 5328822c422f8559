"""Size of a model on a microcontroller: parameters, MACs and activation memory (float32)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

BYTES_PER_FLOAT = 4

# leaf modules whose backward needs no stored input (shape-only or linear pooling)
_NO_STORED_INPUT = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)


@dataclass(frozen=True)
class ModelSummary:
    """What a model costs for one sample (batch size 1), in float32.

    Attributes:
        parameters: number of trainable parameters.
        parameter_bytes: their storage (flash for inference; RAM when training).
        macs: forward multiply-accumulates of the Linear and Conv layers (elementwise work of
            activations, pooling, BatchNorm and residual additions is not counted; this is what
            the compute ledger counts as forward work).
        inference_bytes: peak activation memory of inference: the largest sum of one leaf
            layer's input and output buffers (buffers of earlier layers are freed; a residual
            block's skip tensor is not added, so for ResNet this is a lower bound).
        training_bytes: activation memory of a training step: every distinct tensor stored for
            backward (the input of each layer whose backward needs it: Linear, Conv, BatchNorm,
            MaxPool; the output of ReLU, which is the next layer's input; nothing for Flatten or
            AvgPool) plus the largest gradient pair (the gradient
            of one layer's output and input, live together during backward).
        training_total_bytes: ``training_bytes`` plus weights and weight gradients (SGD; Adam
            would add two more copies of the weights).
    """

    parameters: int
    parameter_bytes: int
    macs: int
    inference_bytes: int
    training_bytes: int
    training_total_bytes: int

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain dict."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.parameters:,} parameters ({self.parameter_bytes / 1024:.1f} KiB), "
            f"{self.macs:,} MACs/sample, inference activations {self.inference_bytes / 1024:.1f} "
            f"KiB, training activations {self.training_bytes / 1024:.1f} KiB, training total "
            f"{self.training_total_bytes / 1024:.1f} KiB"
        )


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Forward MACs of one Linear/Conv layer for the given (batch 1) output; 0 for others."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output.numel() * fan_in
    return 0


def summary(model: nn.Module, input_shape: tuple[int, ...]) -> ModelSummary:
    """Count parameters, forward MACs and activation memory of ``model`` for one sample.

    The model is run once on a zero batch of size 1 (in eval mode, restored afterwards).

    Args:
        model: a plain PyTorch model.
        input_shape: shape of one sample, without the batch dimension.

    Returns:
        A :class:`ModelSummary` (see there for the exact definitions).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> s = summary(net, (4,)); s.parameters, s.macs
        (23, 18)
    """
    macs = 0
    inference_floats = 0
    largest_gradient_pair = 0
    stored: dict[tuple[int, int, int], torch.Tensor] = {}  # (pointer, offset, numel) -> tensor

    def store(tensor: torch.Tensor) -> None:
        # the dict keeps every tensor alive, so a freed buffer's address is never reused
        stored[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())] = (
            tensor
        )

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs, inference_floats, largest_gradient_pair
        tensor_in = inputs[0]
        pair = tensor_in.numel() + output.numel()
        inference_floats = max(inference_floats, pair)
        largest_gradient_pair = max(largest_gradient_pair, pair)
        macs += layer_macs(module, output)
        if isinstance(module, nn.ReLU):
            store(output)  # ReLU's backward needs only its output (shared with the next layer)
        elif not isinstance(module, _NO_STORED_INPUT):
            store(tensor_in)

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    training_floats = sum(t.numel() for t in stored.values()) + largest_gradient_pair
    return ModelSummary(
        parameters=parameters,
        parameter_bytes=parameters * BYTES_PER_FLOAT,
        macs=macs,
        inference_bytes=inference_floats * BYTES_PER_FLOAT,
        training_bytes=training_floats * BYTES_PER_FLOAT,
        training_total_bytes=(training_floats + 2 * parameters) * BYTES_PER_FLOAT,
    )
