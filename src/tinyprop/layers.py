"""Sparse-backprop versions of nn.Linear / nn.Conv1d / nn.Conv2d and their per-layer state.

``apply`` turns a supported module into its sparse-backprop class in place (as
``torch.nn.utils.parametrize`` does), so the module keeps its parameters, its name and its
``state_dict`` keys; it gains two buffers:

- ``error_max``: Ymax_l, the running maximum of the layer's local error (TinyProp);
- ``backward_steps``: how many backward passes the layer has done (seeds random-k).

``remove`` restores the original class and drops both buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyprop import native
from tinyprop.autograd import SparseBackprop
from tinyprop.config import TinyPropConfig
from tinyprop.functional import (
    adaptive_keep_count,
    keep_count,
    local_error,
    running_max,
    select_topk,
)
from tinyprop.patches import patches_for


@dataclass
class LayerCall:
    """What one forward call of a layer needs for the compute ledger."""

    layer: nn.Module
    output_size: int  # N_l: output elements per sample
    fan_in: int  # in_features, or C_in / groups · kh · kw
    has_bias: bool
    weight_trainable: bool
    input_size: int  # input elements per sample (the previous activation's derivative)
    computes_input_grad: bool
    keep: Tensor | None = None  # (trained,) k per trained sample, set by the backward
    selected: bool = True  # False when the layer kept everything without a selection
    geometry: object = None  # the layer's patch geometry for this input shape (patches.py)


@dataclass
class TinyPropState:
    """State shared by the layers of one model: config, layer order and the current step."""

    config: TinyPropConfig
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    collecting: bool = False  # record LayerCalls (inside train_step only)
    calls: list[LayerCall] = field(default_factory=list)
    rows: Tensor | None = None  # indices of the trained samples of the current step

    def trained_rows(self, batch_size: int, device: torch.device) -> Tensor:
        """Indices of the samples the backward must process (all, outside train_step)."""
        if self.rows is None:
            return torch.arange(batch_size, device=device)
        return self.rows.to(device)


class SparseBackpropLayer:
    """Mixin giving a supported layer the sparse backward (placed before the torch class)."""

    tinyprop_state: TinyPropState
    layer_name: str
    layer_index: int  # l - 1, in forward (registration) order
    depth: int  # d_l = L - l, 0 for the output layer

    def check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    def dense_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        state = self.tinyprop_state
        call = None
        if state.collecting:
            call = self.describe_call(x)
            state.calls.append(call)
        dense = state.config.policy == "full" or not torch.is_grad_enabled()
        if dense or not (x.requires_grad or self.weight.requires_grad):
            return self.dense_forward(x, self.weight, self.bias)
        if call is None:
            call = self.describe_call(x)
        return SparseBackprop.apply(x, self.weight, self.bias, self, call)

    def describe_call(self, x: Tensor) -> LayerCall:
        geometry = patches_for(self, x.shape)
        return LayerCall(
            layer=self,
            output_size=geometry.channels_out * geometry.positions,
            fan_in=geometry.fan_in,
            has_bias=self.bias is not None,
            weight_trainable=self.weight.requires_grad,
            input_size=x[0].numel(),
            computes_input_grad=x.requires_grad,
            geometry=geometry,
        )

    def keep_count(self, delta: Tensor) -> Tensor:
        """k per sample for the policy. ``delta`` (B', N) -> (B',) long."""
        config = self.tinyprop_state.config
        samples, size = delta.shape
        if self.keeps_everything:
            return torch.full((samples,), size, dtype=torch.long, device=delta.device)
        if not config.adaptive:
            return keep_count(config.ratio, size).expand(samples).to(delta.device)
        error = local_error(delta)  # (B',) Y_l
        error_max = running_max(error, self.error_max.to(error.dtype))  # (B',) Ymax_l
        if samples:
            self.error_max.fill_(float(error_max[-1]))
        return adaptive_keep_count(
            error, error_max, config.s_min, config.s_max, config.zeta, self.depth, size
        ).to(delta.device)

    @property
    def keeps_everything(self) -> bool:
        """True for the output layer under ``dense_output_layer`` (no selection at all)."""
        return self.depth == 0 and self.tinyprop_state.config.dense_output_layer

    def select(self, delta: Tensor, keep: Tensor, masked: bool = False):
        """The kept entries of δ: top-|δ| for every policy but random-k.

        ``delta`` (B', N), ``keep`` (B',). Returns ``(rows, columns, values)``, three (M,)
        tensors in row-major order, or with ``masked`` the (B', N) tensor of δ at the kept
        entries and zeros elsewhere.
        """
        config = self.tinyprop_state.config
        self.backward_steps += 1
        if config.policy != "randomk" and native.can_select(delta):  # one compiled pass
            return native.topk(delta, keep, masked=masked)  # CPU only, like the layer
        if config.policy == "randomk":
            generator = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + self.layer_index * 10_007 + int(self.backward_steps))
                % (2**63)
            )
            scores = torch.rand(delta.shape, generator=generator).to(delta.device)
        else:
            scores = delta.abs()
        rows, columns = select_topk(scores, keep)  # (M,), (M,)
        values = delta[rows, columns]  # (M,)
        if masked:
            return torch.zeros_like(delta).index_put_((rows, columns), values)
        return rows, columns, values


class TinyPropLinear(SparseBackpropLayer, nn.Linear):
    """nn.Linear with sparse backprop."""

    def check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer '{self.layer_name}' (Linear, in_features={self.in_features}) expects "
                f"input of shape (batch, ..., {self.in_features}), got {tuple(x.shape)}"
            )

    def dense_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


class _TinyPropConv(SparseBackpropLayer):
    spatial_dims: int

    def check_input(self, x: Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            spatial = "L" if self.spatial_dims == 1 else "H, W"
            raise ValueError(
                f"layer '{self.layer_name}' (Conv{self.spatial_dims}d, in_channels="
                f"{self.in_channels}) expects batched input of shape (batch, {self.in_channels}, "
                f"{spatial}), got {tuple(x.shape)}"
            )

    def dense_forward(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class TinyPropConv1d(_TinyPropConv, nn.Conv1d):
    """nn.Conv1d with sparse backprop."""

    spatial_dims = 1


class TinyPropConv2d(_TinyPropConv, nn.Conv2d):
    """nn.Conv2d (incl. grouped / depthwise) with sparse backprop."""

    spatial_dims = 2


SPARSE_CLASSES: dict[type, type] = {
    nn.Linear: TinyPropLinear,
    nn.Conv1d: TinyPropConv1d,
    nn.Conv2d: TinyPropConv2d,
}
