"""Which modules get sparse backprop, and the sparse class each one is turned into.

``apply`` turns a supported module into a subclass of its own class with the sparse forward
(as ``torch.nn.utils.parametrize`` does), so the module keeps its parameters, its name, its
``state_dict`` keys and every method it had; it gains two buffers:

- ``error_max``: Ymax_l, the running maximum of the layer's local error (TinyProp);
- ``backward_steps``: how many backward passes the layer has done (seeds random-k).

Supported: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (any stride, padding, dilation, groups)
and their subclasses that keep the parent's ``forward`` (e.g. the ``out_proj`` of
``nn.MultiheadAttention``), plus any module registered with :func:`register_linear` (e.g.
transformers' GPT-2 ``Conv1D``). ``remove`` restores the original class and drops both buffers.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyprop.autograd import SparseBackprop
from tinyprop.config import TinyPropConfig
from tinyprop.patches import cached_patches_for, zero_padding
from tinyprop.relu_fusion import relu_input, take_mark
from tinyprop.state import ForwardPass, TinyPropState, backward_running, recomputed_call

# user-registered linear-like classes -> whether their weight is stored (in, out)
_REGISTERED_LINEAR: dict[type, bool] = {}
_REGISTERED = "_RegisteredLinear"  # the name of their sparse classes' mixin
CALL_FIELDS_CACHE_SIZE = 256  # (layer, input shape, gradient flags) remembered per model
QCONFIG_AT_APPLY = "_tinyprop_qconfig"  # a layer's qconfig when it was made sparse


def register_linear(module_class: type, transposed: bool = False) -> None:
    """Let :func:`tinyprop.apply` give ``module_class`` sparse backprop as a linear layer.

    The class must hold a 2-D ``weight`` and a ``bias`` (or ``None``) and compute
    ``y = x @ weight.T + bias`` on inputs (..., in), or ``y = x @ weight + bias`` with
    ``transposed=True`` (weight stored (in, out), as transformers' GPT-2 ``Conv1D``). Its
    ``forward`` is replaced by the sparse one while tinyprop is applied. Register before
    :func:`tinyprop.apply`: the registration holds for the whole process, subclasses included.

    Args:
        module_class: an ``nn.Module`` subclass (a TypeError otherwise).
        transposed: the weight is stored (in, out) instead of PyTorch's (out, in).

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> tinyprop.register_linear(Conv1D, transposed=True)
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_linear expects an nn.Module subclass, got {module_class!r}")
    _REGISTERED_LINEAR[module_class] = bool(transposed)


class SparseBackpropLayer:
    """Mixin giving a supported layer the sparse backward (placed before the torch class)."""

    tinyprop_state: TinyPropState
    layer_name: str
    layer_index: int  # registration order (seeds random-k; depth fallback)
    registration_depth: int  # L - l by registration, used only outside a root forward
    unbatched_dims: int  # input dims of one unbatched sample

    def check_input(self, x: Tensor, weight: Tensor) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``.half()``, ``.to()``, ``.cuda()``), but Ymax_l keeps at
        least float32: in float16 a running maximum past 65504 would become inf. Moved to the
        meta device (``model.to("meta")``), or given fresh storage in place (``to_empty`` on
        its own device), the running state has no values left: it starts afresh once the
        model has memory again, as a model applied on meta."""
        kept = self._buffers.get("error_max")
        module = super()._apply(fn, recurse)
        cast = self._buffers.get("error_max")
        if kept is not None and cast is not None and cast.dtype != kept.dtype:
            wide = torch.promote_types(cast.dtype, torch.float32)
            self._buffers["error_max"] = kept.to(device=cast.device, dtype=wide)
        emptied = cast is not None and (cast.is_meta or getattr(fn, "__qualname__", "") == EMPTY)
        if kept is not None and not kept.is_meta and emptied:
            self.tinyprop_state.made_on_meta = True
        return module

    def __reduce_ex__(self, protocol):
        """Pickle (``torch.save(model)``, multiprocessing) by the original class: the sparse
        class of a subclass (``NonDynamicallyQuantizableLinear``, the ``out_proj`` of every
        ``nn.MultiheadAttention``) or of a registered class (GPT-2's ``Conv1D``) is made at
        ``apply`` time and cannot be found by name, and pickling the model failed ("attribute
        lookup TinyPropConv1D on tinyprop.layers failed"). Unpickling makes it again.

        The layer is pickled without its link to the model's state: the state comes with the
        model, which links its layers again (``TinyPropState.__setstate__``), and a layer
        pickled alone (``torch.save(model.head)``) is saved alone and loads as a layer of no
        model, as ``copy.deepcopy`` of it does. It took the whole model along, and loaded as a
        layer of a hidden copy of that model."""
        reduced = super().__reduce_ex__(protocol)
        if protocol < 2:
            return reduced
        mixin, original = type(self).__bases__  # see sparse_class
        registered = mixin.transposed_weight if mixin.__name__ == _REGISTERED else None
        attributes = dict(reduced[2])
        config = attributes.pop("tinyprop_state").config
        return (_unpickled_layer, (original, registered, config), attributes, *reduced[3:])

    def sparse_weight(self) -> Tensor:
        """The weight as the sparse backward sees it: (out, in) or (C_out, C_in / G, ...)."""
        return self.weight

    def dense_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        mark = take_mark(x)  # from a fused ReLU before this layer (tinyprop.relu_fusion)
        if isinstance(x, Tensor) and x.dim() == self.unbatched_dims:  # one unbatched sample
            return self.forward(x.unsqueeze(0)).squeeze(0)
        # the weight and the bias are computed once per call: a parametrization (spectral_norm's
        # power iteration, a dropout of the bias) must run as often as in PyTorch's own forward
        weight, bias = self.sparse_weight(), self.bias
        self.check_input(x, weight)
        self.check_qconfig()
        state = self.tinyprop_state
        if state.root is None:  # a copy of the layer alone (copy.deepcopy), in no applied model
            return self.dense_forward(x, weight, bias)  # yet: PyTorch's layer, uncounted
        trains = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if torch.jit.is_tracing() or exporting():  # jit.trace and torch.export record the
            return self.dense_forward(x, weight, bias)  # plain layer, for inference
        if not trains or not state.policy.sparse:
            # the ledger counts the call: frozen, or under no_grad inside a training forward
            # (reentrant activation checkpointing) it has no backward there
            if torch.is_grad_enabled() or state.open_pass is not None:
                call = self._record(x, weight, bias=bias)
                if trains and weight.requires_grad:  # (a transposed weight's leaf: its base)
                    leaf = weight if weight._base is None else weight._base
                    call.forward_pass.dense_weights.add(id(leaf))
            return self.dense_forward(x, weight, bias)
        self.check_sparse_settings()
        if weight.is_complex() or x.is_complex():
            raise TypeError(
                f"layer '{self.layer_name}' has a complex weight or input ({weight.dtype}, "
                f"{x.dtype}); tinyprop's sparse backward ranks real output gradients |δ| only. "
                "Use the 'full' policy (PyTorch's dense backward, which trains complex layers), "
                "or call tinyprop.remove(model) first"
            )
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"layer '{self.layer_name}': tinyprop's sparse backward does not run under "
                "torch.func transforms (grad, vmap, jacrev); call tinyprop.remove(model) first "
                "(or use the 'full' policy), or tinyprop.backward on a batch"
            )
        call = self._record(x, weight, bias=bias)
        relu = None if mark is None else relu_input(x, self, mark)  # the ReLU's input y
        fused = () if relu is None else (relu,)  # the backward then returns dL/dy, not dL/dx
        output = SparseBackprop.apply(x, weight, bias, self, call, *fused)
        if state.output_error_max_unchecked and state.open_pass is not None:
            state.open_pass.last_layer_output = (weakref.ref(output), call)
        return output

    def geometry_settings(self) -> tuple:
        """The layer settings its patch geometry depends on besides the shapes."""
        return ()

    def check_qconfig(self) -> None:
        """Refuse a layer given a ``qconfig`` since it was made sparse: torch.ao.quantization's
        ``prepare_qat`` / ``prepare`` ran on the applied model. They swap and observe modules
        by their exact class, which a sparse layer's is not: the layer trained and converted
        without any (fake) quantization, silently."""
        qconfig = self.__dict__.get("qconfig")
        if qconfig is not None and qconfig is not self.__dict__.get(QCONFIG_AT_APPLY):
            raise ValueError(
                f"layer '{self.layer_name}' was given a qconfig after tinyprop.apply "
                "(torch.ao.quantization's prepare_qat or prepare ran on the applied model); "
                "they swap modules by their exact class and skip tinyprop's layers, which "
                "would train and convert without quantization. Call tinyprop.remove(model), "
                "prepare_qat, then tinyprop.apply (its fake-quantized layers stay dense), and "
                "tinyprop.remove(model) again before torch.ao.quantization.convert"
            )

    def check_sparse_settings(self) -> None:
        """Refuse settings changed after :func:`tinyprop.apply` that the sparse backward
        cannot follow (a clear error, never a wrong gradient)."""

    def _record(self, x: Tensor, weight: Tensor, flags: tuple | None = None, bias=None):
        """The :class:`~tinyprop.state.LayerCall` of this call on ``x`` with ``weight`` and
        ``bias``; ``flags``: its (has_bias, weight_trainable, input_requires_grad), when the
        caller knows them (the graph-free step, :mod:`tinyprop.graph_free`), else found from
        the tensors."""
        state = self.tinyprop_state
        if flags is None:
            grad = torch.is_grad_enabled()
            flags = (  # has_bias, weight_trainable, input_requires_grad
                grad and bias is not None and bias.requires_grad,
                grad and weight.requires_grad,
                grad and x.requires_grad,
            )
        key = (
            self, self.layer_name, self.layer_index, x.shape, weight.shape, flags,
            self.geometry_settings(),
        )  # fmt: skip
        fields = state.call_fields.get(key)  # the same for every call of this shape
        if fields is None:
            fields = self._call_fields(x, weight, flags)
            if len(state.call_fields) >= CALL_FIELDS_CACHE_SIZE:
                state.call_fields.clear()
            state.call_fields[key] = fields
        if state.open_pass is not None:
            return state.open_pass.add(fields)
        if backward_running():  # activation checkpointing runs the forward again
            return recomputed_call(state.step, fields, self.registration_depth)
        # called outside the root module's forward (a submodule called directly): the depth
        # falls back to the registration order
        forward_pass = ForwardPass()
        state.finish_pass(forward_pass)
        return forward_pass.add({**fields, "fixed_depth": self.registration_depth})

    def _call_fields(self, x: Tensor, weight: Tensor, flags: tuple) -> dict:
        """The fields of a :class:`~tinyprop.state.LayerCall` on an input like ``x``: kept by
        :meth:`_record` per layer, shapes and gradient flags (a frozen dict is rebuilt no
        more; reused as it is, never written to)."""
        state = self.tinyprop_state
        geometry = cached_patches_for(state.geometry_cache, self, x.shape, weight.shape)
        has_bias, weight_trainable, input_requires_grad = flags
        return dict(
            layer_name=self.layer_name,
            layer_index=self.layer_index,
            rows=x.shape[0],
            output_size=geometry.channels_out * geometry.positions,
            fan_in=geometry.fan_in,
            input_size=math.prod(x.shape[1:]),  # x[0] fails on an empty batch
            has_bias=has_bias,
            weight_trainable=weight_trainable,
            input_requires_grad=input_requires_grad,
            geometry=geometry,
        )


class _LinearLayer(SparseBackpropLayer):
    """A linear layer: y = x Wᵀ + b on (..., in)."""

    unbatched_dims = 1
    transposed_weight = False

    def sparse_weight(self) -> Tensor:
        return self.weight.t() if self.transposed_weight else self.weight

    def check_input(self, x: Tensor, weight: Tensor) -> None:
        in_features = weight.shape[1]
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"layer '{self.layer_name}' ({self._original_name()}, in_features="
                f"{in_features}) expects input of shape (batch, ..., {in_features}), got {shape}"
            )

    def dense_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _original_name(self) -> str:
        return self._tinyprop_original_class.__name__


class _ConvLayer(SparseBackpropLayer):
    spatial_dims: int

    @property
    def unbatched_dims(self) -> int:
        return self.spatial_dims + 1

    def check_input(self, x: Tensor, weight: Tensor) -> None:
        # C_in from the weight (C_out, C_in / G, *kernel), as PyTorch's forward reads it:
        # in_channels is set once when the layer is built and misses a weight replaced since
        channels = weight.shape[1] * self.groups
        if not isinstance(x, Tensor) or x.dim() != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(self._shape_message(shape, channels))
        if x.shape[1] != channels:
            raise ValueError(self._shape_message(tuple(x.shape), channels))

    def _shape_message(self, shape, channels: int) -> str:
        spatial = "L" if self.spatial_dims == 1 else "H, W"
        return (
            f"layer '{self.layer_name}' (Conv{self.spatial_dims}d, in_channels={channels}) "
            f"expects input of shape (batch, {channels}, {spatial}), got {shape}"
        )

    def check_sparse_settings(self) -> None:
        """``padding_mode`` set to ``'reflect'`` (or another) after apply: the forward pads
        that way, the sparse backward would take zeros (a wrong weight gradient, silently)."""
        if self.padding_mode != "zeros":
            raise ValueError(
                f"layer '{self.layer_name}' (Conv{self.spatial_dims}d) has padding_mode="
                f"'{self.padding_mode}', set after tinyprop.apply; its sparse backward pads "
                "with zeros only. Set padding_mode before tinyprop.apply (the layer then keeps "
                "its dense backward), or call tinyprop.remove(model) and apply again"
            )

    def dense_forward(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def geometry_settings(self) -> tuple:
        return (
            tuple(self.stride), zero_padding(self),
            tuple(self.dilation), self.groups,
        )  # fmt: skip


class _Conv1dLayer(_ConvLayer):
    spatial_dims = 1


class _Conv2dLayer(_ConvLayer):
    spatial_dims = 2


class TinyPropLinear(_LinearLayer, nn.Linear):
    """nn.Linear with sparse backprop."""


class TinyPropConv1d(_Conv1dLayer, nn.Conv1d):
    """nn.Conv1d with sparse backprop."""


class TinyPropConv2d(_Conv2dLayer, nn.Conv2d):
    """nn.Conv2d (incl. grouped / depthwise) with sparse backprop."""


_SPARSE_CLASSES: dict[type, type] = {
    nn.Linear: TinyPropLinear,
    nn.Conv1d: TinyPropConv1d,
    nn.Conv2d: TinyPropConv2d,
}


def _keeps_forward(module: nn.Module, base: type) -> bool:
    """True when a subclass of ``base`` computes what ``base`` computes (same forward)."""
    kind = type(module)
    same = kind.forward is base.forward
    if base is not nn.Linear:
        same = same and kind._conv_forward is base._conv_forward
    return same


# the function nn.Module.to_empty applies: storage without values (whatever memory held)
EMPTY = "Module.to_empty.<locals>.<lambda>"

# whether torch.export records this call (torch >= 2.6; a flag read, 34 ns)
exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def layer_kind(module: nn.Module) -> str | None:
    """'linear' / 'conv1d' / 'conv2d' for a module tinyprop can make sparse, else None.

    Returns 'override' for a subclass of a supported class whose forward differs (it stays
    dense: tinyprop cannot know what that forward computes).
    """
    for registered in type(module).__mro__:
        if registered in _REGISTERED_LINEAR:
            return "linear"
    for base, kind in ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d")):
        if isinstance(module, base):
            if kind != "linear" and getattr(module, "padding_mode", "zeros") != "zeros":
                return None
            return kind if _keeps_forward(module, base) else "override"
    return None


def sparse_class(original: type) -> type:
    """The sparse subclass of a supported class (created once per class)."""
    if original not in _SPARSE_CLASSES:
        transposed = next(
            (_REGISTERED_LINEAR[c] for c in original.__mro__ if c in _REGISTERED_LINEAR), None
        )
        if transposed is not None:
            mixin = type(_REGISTERED, (_LinearLayer,), {"transposed_weight": transposed})
        elif issubclass(original, nn.Linear):
            mixin = _LinearLayer
        elif issubclass(original, nn.Conv1d):
            mixin = _Conv1dLayer
        else:
            mixin = _Conv2dLayer
        name = f"TinyProp{original.__name__}"
        _SPARSE_CLASSES[original] = type(name, (mixin, original), {"__module__": __name__})
    return _SPARSE_CLASSES[original]


def _unpickled_layer(
    original: type, registered: bool | None = None, config: TinyPropConfig | None = None
) -> nn.Module:
    """An empty instance of the sparse class of ``original``, for pickle to fill in, with a
    state of no model (``config``: its model's) until its model's state links it again; a
    class that was given to :func:`register_linear` (``registered``: its ``transposed``) is
    registered again in a process that has not done so (it would become a convolution). A
    file saved before ``config`` was passed holds the layer's state itself."""
    if registered is not None and original not in _SPARSE_CLASSES:
        register_linear(original, transposed=registered)
    cls = sparse_class(original)
    layer = cls.__new__(cls)
    if config is not None:
        object.__setattr__(layer, "tinyprop_state", TinyPropState(config=config))
    return layer
