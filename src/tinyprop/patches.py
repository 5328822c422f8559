"""Geometry of a trainable layer seen as "weights times patches".

Every supported layer computes, for each sample, output channel c and output position p,
``z[c, p] = W[c] · patch[p, g(c)]`` where ``W`` is the weight viewed as (C_out, fan_in) and
``g(c)`` the channel's group. A Linear layer has one position per leading index and one group;
a convolution's patches are the receptive fields of its (zero-)padded input. The sparse
backward gathers the patches of the kept positions only and scatters their gradients back, so
its work scales with k, never with the dense output size.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from tinyprop import native


def take(tensor: Tensor, rows: Tensor) -> Tensor:
    """tensor[rows] for sorted unique ``rows``, without a copy when every row is taken (one
    ``index_select``: advanced indexing dispatches several operations for the same copy)."""
    return tensor if rows.numel() == tensor.shape[0] else tensor.index_select(0, rows)


def put(values: Tensor, rows: Tensor, shape: torch.Size) -> Tensor:
    """A zero tensor of ``shape`` with ``values`` at the sorted unique ``rows`` (the copy of
    ``out[rows] = values`` by one ``index_copy_``)."""
    if rows.numel() == shape[0]:
        return values.contiguous()
    return values.new_zeros(shape).index_copy_(0, rows, values)


# Rows x MACs per row (C_out · P · fan_in) up to which a few rows' convolution weight gradient
# runs PyTorch's plain kernel instead of oneDNN's (ConvPatches.few_rows_kernel). One thread,
# per call, least of 7 x 300 (load 4): the HAR CNN's 16 -> 32 and 32 -> 32 Conv1d (kernel 5,
# 128k MACs a row) on 2-3 rows 18-22 us against oneDNN's 54-56 (its input gradient alone
# 52-56, both 103-113); the MNIST CNN's 8 -> 16 3x3 (226k), both gradients, on 2 rows 44 us
# against 91, on 8 rows 143 against 146. Past about 2M MACs oneDNN wins (64 -> 64 3x3 on
# 16x16, 9.4M a row: 1.5 ms against 0.96 on 2 rows).
FEW_ROWS_MACS = 2**21


class LinearPatches:
    """Patches of a linear layer: input (R, *, in) -> each middle index is one position."""

    def __init__(self, input_shape: torch.Size, weight_shape: torch.Size):
        self.positions = 1
        for size in input_shape[1:-1]:
            self.positions *= size
        self.groups = 1
        self.channels_out, self.fan_in = weight_shape  # (out, in)

    def delta_matrix(self, grad_output: Tensor) -> Tensor:
        """(B, *, out) -> (B, out, positions), channel-major like a convolution."""
        batch = grad_output.shape[0]
        return grad_output.reshape(batch, self.positions, self.channels_out).transpose(1, 2)

    def gather(self, x: Tensor, sample: Tensor, position: Tensor, group: Tensor) -> Tensor:
        """Patches of the given (sample, position) pairs: (U, in)."""
        rows = x.reshape(-1, self.fan_in)  # (B * positions, in)
        return rows[sample * self.positions + position]

    def scatter(self, grad_patches: Tensor, sample, position, group, input_shape) -> Tensor:
        """Add patch gradients (U, in) back into an input-shaped gradient."""
        grad = grad_patches.new_zeros(input_shape[0] * self.positions, self.fan_in)
        grad.index_add_(0, sample * self.positions + position, grad_patches)
        return grad.reshape(input_shape)

    def native_gradients(
        self, x, weight, row_start, column, value, needs_input, needs_weight, relu_mask=False
    ):  # fmt: skip
        """Input and weight gradients from the kept entries (CSR by sample over the whole
        batch) with the native kernel; x (B, in) only. ``relu_mask``: ``x`` is a ReLU's
        output, the input gradient is taken through it (:mod:`tinyprop.relu_fusion`)."""
        return native.linear_backward(
            x, weight, row_start, column, value, needs_input, needs_weight, relu_mask
        )

    def dense_gradients(self, x, weight, rows, masked, needs_input, needs_weight):
        """Input and weight gradients from the masked δ (B', N) with dense matrix products."""
        if self.positions > 1:  # (B', out · P) -> (B' · P, out)
            masked = masked.reshape(-1, self.channels_out, self.positions).transpose(1, 2)
            masked = masked.reshape(-1, self.channels_out)  # (B' * P, out)
        grad_input = grad_weight = None
        if needs_weight:  # torch.mm: the kernel matmul runs on 2-D operands, one call fewer
            grad_weight = torch.mm(masked.t(), take(x, rows).reshape(-1, self.fan_in))  # (out, in)
        if needs_input:
            grad_rows = torch.mm(masked, weight).reshape(-1, *x.shape[1:])  # (B', *, in)
            grad_input = put(grad_rows, rows, x.shape)
        return grad_input, grad_weight


class ConvPatches:
    """Patches of ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation, groups)."""

    def __init__(
        self,
        layer: nn.Conv1d | nn.Conv2d,
        input_shape: torch.Size,
        weight_shape: torch.Size | None = None,
    ):
        two_d = isinstance(layer, nn.Conv2d)
        self.two_d = two_d
        # (C_out, C_in / G, *kernel) from the weight the forward convolves with, as PyTorch's
        # forward reads it: kernel_size and out_channels are set once when the layer is built
        # and miss a weight replaced since (a 2x2 weight in a layer built 3x3)
        weight_shape = layer.weight.shape if weight_shape is None else weight_shape
        self.pad = zero_padding(layer, weight_shape[2:])  # (left, right[, top, bottom])
        spatial = tuple(input_shape[2:]) if two_d else (1, input_shape[2])
        pads = (
            (self.pad[2], self.pad[3], self.pad[0], self.pad[1])
            if two_d
            else (0, 0, self.pad[0], self.pad[1])
        )
        padded = (spatial[0] + pads[0] + pads[1], spatial[1] + pads[2] + pads[3])
        kernel = tuple(weight_shape[2:]) if two_d else (1, weight_shape[2])
        stride = tuple(layer.stride) if two_d else (1, layer.stride[0])
        dilation = tuple(layer.dilation) if two_d else (1, layer.dilation[0])
        out = tuple(
            (padded[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
        )
        self.groups = layer.groups
        self.channels_in = input_shape[1]
        self.channels_out = weight_shape[0]
        self.channels_per_group = self.channels_in // self.groups
        self.fan_in = self.channels_per_group * kernel[0] * kernel[1]
        self.positions = out[0] * out[1]
        self.padded_shape = (input_shape[0], self.channels_in, *padded)
        self.sample_size = self.channels_in * padded[0] * padded[1]
        self.index = _patch_index(
            self.channels_in, self.groups, padded, kernel, stride, dilation, out
        )
        self._stride = list(layer.stride)
        self._dilation = list(layer.dilation)
        self._output_spatial = out if two_d else (out[1],)
        # as a 2-D convolution (Conv1d: height 1), for the native kernel
        self.native_shape = (*padded, self.channels_in, self.channels_out, *kernel, *out)
        self.native_shape += (*stride, *dilation, self.groups)
        # one input channel per group (depthwise, or a first layer on one channel): the native
        # kernel on the unpadded input
        self.one_channel_per_group = self.channels_per_group == 1
        self.plane_shape = (self.channels_in, *spatial, self.channels_out, *kernel, *out)
        self.plane_shape += (*stride, pads[0], pads[2], *dilation, self.groups)
        self.pads = pads  # (top, bottom, left, right), as a 2-D convolution
        # the layer's own padding when it is the same on both sides of each dimension (else
        # None: the dense kernels run on the explicitly padded input, see dense_gradients)
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        self._padding = None
        if symmetric:
            self._padding = [pads[0], pads[2]] if two_d else [pads[2]]
        # the plain few-rows kernel (see few_rows_kernel): groups 1, dilation 1
        self.plain_kernel_fits = self.groups == 1 and dilation == (1, 1)
        self._plain_stride = list(stride)
        self.macs_per_row = self.channels_out * self.positions * self.fan_in

    def delta_matrix(self, grad_output: Tensor) -> Tensor:
        """(B, C_out, *spatial) -> (B, C_out, positions)."""
        return grad_output.reshape(grad_output.shape[0], self.channels_out, self.positions)

    def _padded(self, x: Tensor) -> Tensor:
        """``x`` with the layer's zero padding (the operation ``F.pad`` runs, called directly)."""
        return torch.constant_pad_nd(x, self.pad) if any(self.pad) else x

    def gather(self, x: Tensor, sample: Tensor, position: Tensor, group: Tensor) -> Tensor:
        """Receptive fields of the given (sample, position, group): (U, fan_in)."""
        flat = self._padded(x).reshape(-1)  # (B * C_in * Hp * Wp,)
        offsets = self.index.to(x.device)[group, position]  # (U, fan_in)
        return flat[sample.unsqueeze(1) * self.sample_size + offsets]

    def scatter(self, grad_patches: Tensor, sample, position, group, input_shape) -> Tensor:
        """Add receptive-field gradients (U, fan_in) back into the input's gradient."""
        flat = grad_patches.new_zeros(self.padded_shape[0] * self.sample_size)
        offsets = self.index.to(grad_patches.device)[group, position]  # (U, fan_in)
        flat.index_add_(
            0,
            (sample.unsqueeze(1) * self.sample_size + offsets).reshape(-1),
            grad_patches.reshape(-1),
        )
        padded = flat.reshape(self.padded_shape)
        if self.two_d:
            left, right, top, bottom = self.pad
            grad = padded[:, :, top : padded.shape[2] - bottom, left : padded.shape[3] - right]
        else:
            left, right = self.pad
            grad = padded[:, :, 0, left : padded.shape[3] - right]
        return grad.reshape(input_shape)

    def native_gradients(
        self, x, weight, row_start, column, value, needs_input, needs_weight, relu_mask=False
    ):  # fmt: skip
        """Input and weight gradients from the kept entries (CSR by sample over the whole
        batch: ``row_start`` (B + 1,), ``column`` (M,) = c · P + p, ``value`` (M,)) with the
        native kernel, channels-last (a depthwise convolution: on the input as it is).
        ``relu_mask``: ``x`` is a ReLU's output, the input gradient is taken through it
        (:mod:`tinyprop.relu_fusion`)."""
        if self.one_channel_per_group:
            grad_input, grad_weight = native.plane_conv_backward(
                x if self.two_d else x.unsqueeze(2),  # (B, C_in, H, W)
                weight.reshape(self.channels_out, *self.native_shape[4:6]),  # (C_out, kh, kw)
                (x.shape[0], *self.plane_shape),
                row_start, column, value, needs_input, needs_weight, relu_mask,
            )  # fmt: skip
        else:
            planes = x if self.two_d else x.unsqueeze(2)  # (B, C_in, H, W)
            grad_input, grad_weight = native.conv_backward(
                native.channels_last(planes, self.pads),  # (B, Hp, Wp, C_in)
                (weight if self.two_d else weight.unsqueeze(2)).permute(0, 2, 3, 1),
                (x.shape[0], *self.native_shape),  # weight above: (C_out, kh, kw, C_in / G)
                row_start, column, value, needs_input, needs_weight,
                pads=self.pads,  # grad_input (B, C_in, H, W), as PyTorch holds it
                relu_mask=relu_mask,
            )  # fmt: skip
            if grad_weight is not None:  # (C_out, kh, kw, C_in / G) -> (C_out, C_in / G, kh, kw)
                grad_weight = grad_weight.permute(0, 3, 1, 2)
        if not self.two_d:  # (B, C_in, 1, W) and (C_out, C_in / G, 1, kw) for a Conv1d
            grad_input = None if grad_input is None else grad_input.reshape(x.shape)
            grad_weight = None if grad_weight is None else grad_weight.reshape(weight.shape)
        elif self.one_channel_per_group and grad_weight is not None:  # (C_out, kh, kw)
            grad_weight = grad_weight.reshape(weight.shape)
        return grad_input, grad_weight

    def dense_gradients(self, x, weight, rows, masked, needs_input, needs_weight):
        """Input and weight gradients from the masked δ (B', N) with PyTorch's convolution
        backward: with the layer's own padding where it is the same on both sides (the call
        PyTorch's own backward of the layer makes, so the same bits), else on the explicitly
        padded input (any padding). On a padded input oneDNN's depthwise backward took 1.4-10
        times as long (docs/speed.md), and a strided Conv1d's input gradient could differ
        from PyTorch's in the last bits."""
        taken = take(x, rows)  # (B', C_in, [H,] W)
        grad_output = masked.reshape(rows.numel(), self.channels_out, *self._output_spatial)
        # a few rows: the weight gradient by the plain kernel (see few_rows_kernel)
        plain_weight = needs_weight and self.few_rows_kernel(taken)
        own_padding = self._padding is not None
        source = taken if own_padding else self._padded(taken)  # (B', C_in, [H(p),] W(p))
        grad_source = grad_weight = None
        if needs_input or not plain_weight:
            grad_source, grad_weight = self._onednn_gradients(
                grad_output, source, weight, self._padding, needs_input,
                needs_weight and not plain_weight,
            )  # fmt: skip
        if plain_weight:
            padded = self._padded(taken) if own_padding else source
            grad_weight = self._plain_weight_gradient(grad_output, padded, weight)
        grad_input = None
        if needs_input:
            grad_taken = grad_source if own_padding else self._crop(grad_source)
            grad_input = put(grad_taken, rows, x.shape)
        return grad_input, grad_weight

    def few_rows_kernel(self, taken: Tensor) -> bool:
        """Whether the weight gradient of these rows (B', C_in, [H,] W) goes to PyTorch's
        plain im2col + GEMM convolution backward (``_slow_conv2d_backward``) instead of the
        one ``convolution_backward`` picks, oneDNN's on float32 CPU tensors: a few rows (2 to
        a product of FEW_ROWS_MACS) of a small convolution (groups 1, dilation 1), where
        oneDNN's fixed cost is most of its time (on two rows it costs about what it costs on
        eight). Its sums are the same products in another order: the weight gradient equals
        oneDNN's up to float32 rounding. The input gradient stays oneDNN's, bit for bit: the
        δ of the layers below, their kept entries and k are the same as before from the same
        state (docs/speed.md). One row keeps ``convolution_backward``, which runs the
        plain kernel itself there."""
        rows = taken.shape[0]
        return (
            self.plain_kernel_fits
            and taken.dtype == torch.float32
            and taken.device.type == "cpu"
            and 2 <= rows
            and rows * self.macs_per_row <= FEW_ROWS_MACS
        )

    def _plain_weight_gradient(self, grad_output, padded, weight) -> Tensor:
        """The weight gradient by PyTorch's plain convolution backward (a Conv1d as a 2-D one
        of height 1): (C_out, C_in, *kernel). The kernel gets its tensors in the default
        strides: it refused a channels-last input ("grad_weight must be contiguous"), and
        wrote a wrong gradient for the weight of a channels-last 1x1 convolution (strides (C_in,
        1, C_in, C_in), which ``is_contiguous()`` accepts)."""
        padded, weight = default_strides(padded), default_strides(weight)
        if not self.two_d:  # (B', C, L) -> (B', C, 1, L)
            grad_output, padded = grad_output.unsqueeze(2), padded.unsqueeze(2)
            weight = weight.unsqueeze(2)
        _, grad_weight, _ = torch.ops.aten._slow_conv2d_backward(
            grad_output, padded, weight, list(weight.shape[2:]), self._plain_stride, [0, 0],
            [False, True, False],
        )  # fmt: skip
        return grad_weight if self.two_d else grad_weight.squeeze(2)

    def _onednn_gradients(self, grad_output, source, weight, padding, needs_input, needs_weight):
        """``convolution_backward``: the kernel PyTorch's own backward of the layer picks, on
        ``source`` with ``padding`` (None: an input padded already, padding 0)."""
        zeros = [0] * len(self._stride)
        grad_source, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_output, source, weight, None, self._stride,
            zeros if padding is None else padding, self._dilation, False, zeros, self.groups,
            [needs_input, needs_weight, False],
        )  # fmt: skip
        return grad_source, grad_weight

    def _crop(self, padded: Tensor) -> Tensor:
        """Remove the padding from a gradient w.r.t. the padded input."""
        if self.two_d:
            left, right, top, bottom = self.pad
            return padded[:, :, top : padded.shape[2] - bottom, left : padded.shape[3] - right]
        left, right = self.pad
        return padded[:, :, left : padded.shape[2] - right]


def zero_padding(layer: nn.Conv1d | nn.Conv2d, kernel: tuple | None = None) -> tuple[int, ...]:
    """The zeros a convolution's forward pads its input with, (left, right[, top, bottom]),
    from its ``padding`` as it is now, as PyTorch's forward reads it (``'same'`` from the
    ``kernel`` size, by default the layer's, and dilation). ``_reversed_padding_repeated_twice``,
    which the module computes once when built, missed a ``padding`` set afterwards
    (``conv.padding = (0, 1)``): the backward then took the old padding, a wrong weight
    gradient, silently."""
    padding, dilation = layer.padding, layer.dilation
    kernel = layer.kernel_size if kernel is None else kernel
    if isinstance(padding, int):  # conv.padding = 1 works in PyTorch's forward too
        padding = (padding,) * len(kernel)
    pads: list[int] = []
    for i in reversed(range(len(kernel))):  # the last dimension first, as F.pad takes them
        if padding == "valid":
            pads += [0, 0]
        elif padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [padding[i], padding[i]]
    return tuple(pads)


def default_strides(tensor: Tensor) -> Tensor:
    """``tensor``, or a copy of it in the row-major strides of its shape (the strides of size-1
    dimensions included) when it has others."""
    stride, strides = 1, []
    for size in reversed(tensor.shape):
        strides.append(stride)
        stride *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=64)
def _patch_index(channels_in, groups, padded, kernel, stride, dilation, out) -> Tensor:
    """Offsets into one padded sample (C_in, Hp, Wp) of every patch: (G, positions, fan_in)."""
    per_group = channels_in // groups
    channel = torch.arange(channels_in).view(groups, 1, per_group, 1, 1)
    ki = torch.arange(kernel[0]).view(1, 1, 1, -1, 1) * dilation[0]
    kj = torch.arange(kernel[1]).view(1, 1, 1, 1, -1) * dilation[1]
    oh = torch.arange(out[0]).repeat_interleave(out[1]) * stride[0]  # (positions,)
    ow = torch.arange(out[1]).repeat(out[0]) * stride[1]
    rows = oh.view(1, -1, 1, 1, 1) + ki  # (1, P, 1, kh, 1)
    cols = ow.view(1, -1, 1, 1, 1) + kj  # (1, P, 1, 1, kw)
    index = channel * padded[0] * padded[1] + rows * padded[1] + cols  # (G, P, Cg, kh, kw)
    return index.reshape(groups, out[0] * out[1], -1)


_GEOMETRY_CACHE_SIZE = 256  # convolution calls (layer, input shape) remembered per model


def cached_patches_for(
    cache: dict, layer: nn.Module, input_shape: torch.Size, weight_shape: torch.Size
) -> LinearPatches | ConvPatches:
    """:func:`patches_for`, a convolution's geometry kept in ``cache`` for the next call with the
    same input shape and settings (computing it costs more than the rest of a small forward)."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return LinearPatches(input_shape, weight_shape)
    key = (
        layer, tuple(input_shape), tuple(weight_shape), tuple(layer.stride),
        zero_padding(layer), tuple(layer.dilation), layer.groups,
    )  # fmt: skip
    geometry = cache.get(key)
    if geometry is None:
        if len(cache) >= _GEOMETRY_CACHE_SIZE:
            cache.clear()
        geometry = cache[key] = ConvPatches(layer, input_shape, weight_shape)
    return geometry


def patches_for(
    layer: nn.Module, input_shape: torch.Size, weight_shape: torch.Size
) -> LinearPatches | ConvPatches:
    """The patch geometry of a sparse layer for one input shape (``weight_shape`` as the
    sparse backward sees the weight: (out, in) for every linear layer)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return ConvPatches(layer, input_shape, weight_shape)
    return LinearPatches(input_shape, weight_shape)
