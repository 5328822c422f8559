"""ReLU -> sparse Conv2d or Linear: the ReLU's backward fused into the layer's input gradient.

A MobileNet block ``nn.Sequential(..., nn.BatchNorm2d(C), nn.ReLU(), conv, ...)`` backpropagates
the convolution's input gradient g through the ReLU with one more pass over the whole
activation (PyTorch's ``threshold_backward(g, r, 0)``: r <= 0 ? 0 : g, with r the ReLU's
output, which is the convolution's input x). Here the ReLU of such a block hands the
convolution the ReLU's input y with its output x (an attribute of x, taken by the
convolution's forward), and the convolution's sparse backward
(:class:`tinyprop.autograd.SparseBackprop`) returns the gradient at y instead of at x:

    dL/dy = (x <= 0 ? 0 : g),

written by the native convolution kernels while each sample's g is still in the cache
(``relu_mask``), and by PyTorch's ``threshold_backward`` on the other paths (dense, unified,
PyTorch's sparse kernels): the values the ReLU's own backward writes, bit for bit. An MLP's
``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`` fuses the same way: the native Linear
kernel masks each block of the input gradient's sums before writing it out. The ReLU's node
then receives no gradient from the layer and computes nothing; a gradient that reaches x
from elsewhere still goes through it, and the two add up at y as before.

Only an ``nn.ReLU`` (not in place) directly before a sparse ``nn.Conv2d`` (a batch of
planes) or ``nn.Linear`` (a batch of vectors) in an ``nn.Sequential``, on float32 CPU
tensors, and under the conditions of :func:`tinyprop.pool_fusion.fusion_allowed` (no hooks,
no activation checkpointing or saved-tensor hooks, not compiling or tracing, native kernels);
anything else runs the ReLU as PyTorch does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyprop.pool_fusion import (
    fusion_allowed,
    plain_sequential_children,
    restore_classes,
    swap_classes,
)

# whether torch.compile is tracing: 34 ns a call, against 430 ns for is_compiling (which
# asks torch.jit first), on every sparse layer's call
_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)

# the attribute of a fused ReLU's output x that holds (y, the ReLU module, x's version)
RELU_INPUT = "_tinyprop_relu_input"


class ConvInputReLU(nn.ReLU):
    """``nn.ReLU`` before a sparse ``Conv2d`` or ``Linear`` in an ``nn.Sequential``: the same
    forward, its output marked for the layer (see module docstring). ``tinyprop_fused_convs``:
    the layers it precedes (by id)."""

    tinyprop_fused_convs: frozenset

    def _get_name(self) -> str:  # printed as the module it stands for
        return "ReLU"

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        if (
            not self.inplace
            and torch.is_grad_enabled()
            and isinstance(input, Tensor)
            and input.requires_grad
            and input.dtype == torch.float32
            and input.device.type == "cpu"
            and input.dim() in (2, 4)  # (B, in) of a Linear, (B, C, H, W) of a Conv2d
            and not _dynamo_compiling()  # no fusion there; torch.export(strict=True) failed
            and output.grad_fn is not None
        ):
            setattr(output, RELU_INPUT, (input, self, output._version))
        return output


def take_mark(x) -> tuple | None:
    """The mark a fused ReLU left on its output ``x`` (None: none), removed from x (it would
    keep the ReLU's input alive). None while torch.compile traces (no fusion there): reading
    a tensor's ``__dict__`` made its trace fail under ``torch.no_grad`` ("'dict' object has no
    attribute 'node'"), so a compiled applied model could not be evaluated."""
    if not isinstance(x, Tensor) or _dynamo_compiling():
        return None
    return x.__dict__.pop(RELU_INPUT, None)


def relu_input(x: Tensor, conv: nn.Module, mark: tuple) -> Tensor | None:
    """The input y of the fused ReLU whose output ``x`` is (``mark``: :func:`take_mark`'s),
    when ``conv`` (the sparse convolution now called on x) may take the ReLU's backward into
    its own; else None."""
    y, relu, version = mark
    if (
        id(conv) not in relu.tinyprop_fused_convs
        or x._version != version  # changed in place since the ReLU wrote it
        or x.grad_fn is None
        or x.grad_fn.name() != "ReluBackward0"
        or not fusion_allowed(relu, conv)
    ):
        return None
    return y


def fuse_relus(model: nn.Module, convolutions: list[nn.Module]) -> list[nn.Module]:
    """Swap the class of every ``nn.ReLU`` that comes right before a sparse ``Conv2d`` or
    ``Linear`` (one of ``convolutions``, the sparse layers) in an ``nn.Sequential`` of
    ``model``; returns the swapped ReLUs (for :func:`restore_relus`)."""
    sparse = {id(conv) for conv in convolutions if isinstance(conv, nn.Conv2d | nn.Linear)}
    links: dict[int, tuple[nn.Module, set[int]]] = {}
    for children in plain_sequential_children(model):
        for relu, conv in zip(children, children[1:], strict=False):
            if type(relu) is nn.ReLU and not relu.inplace and id(conv) in sparse:
                links.setdefault(id(relu), (relu, set()))[1].add(id(conv))
    return swap_classes(links, ConvInputReLU, nn.ReLU)


def restore_relus(relus: list[nn.Module]) -> None:
    """Undo :func:`fuse_relus`."""
    restore_classes(relus, nn.ReLU)
