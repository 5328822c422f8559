"""apply / remove / is_tinyprop: walk a model and give its trainable layers sparse backprop."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from tinyprop.attention import (
    TinyPropMultiheadAttention,
    plain_attention_class,
    sparse_attention_class,
)
from tinyprop.batch_norm import restore_batch_norms, swap_batch_norms
from tinyprop.budget import check_count
from tinyprop.config import TinyPropConfig
from tinyprop.flop_formulas import forward_flop_counter
from tinyprop.layers import (
    QCONFIG_AT_APPLY,
    SparseBackpropLayer,
    exporting,
    layer_kind,
    sparse_class,
)
from tinyprop.pool_fusion import fuse_pools, restore_pools
from tinyprop.relu_fusion import fuse_relus, restore_relus
from tinyprop.state import ForwardPass, TinyPropState

OUTPUT_ERROR_MAX = "tinyprop_output_error_max"  # Ymax_L of the skip decision, on the root module
_STATE = "_tinyprop_state"
_ORIGINAL_CLASS = "_tinyprop_original_class"
_LAYER_BUFFERS = (".error_max", ".backward_steps")  # tinyprop's buffers on a sparse layer
_LAYER_ATTRIBUTES = ("tinyprop_state", "layer_name", "layer_index", "registration_depth")
_MAX_SIGNATURES = 1024  # input shapes whose other-module MACs are remembered
# the running maxima Ymax_l, Ymax_L: float32 whatever torch's default dtype is (a float16
# default, set by PyTorch Lightning's precision="16-true" while the model is built, would make
# a maximum past 65504 inf)
RUNNING_MAX_DTYPE = torch.float32
_NARROW_DTYPES = (torch.float16, torch.bfloat16)  # where model.half() / .to(bfloat16) put buffers
# trainable modules that keep their normal dense backward without a warning
_DENSE_BY_DESIGN = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)


def apply(model: nn.Module, config: TinyPropConfig | None = None) -> nn.Module:
    """Give every linear and convolution layer of ``model`` sparse backprop, in place.

    Converted: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (zero padding) and their
    subclasses that keep the parent's forward, and classes registered with
    :func:`tinyprop.register_linear`; lazy ones (``nn.LazyLinear``) too, before their first
    forward; a supported layer set into the model afterwards (``model[0] = nn.Linear(...)``,
    ``model.head = ...``, ``Sequential.insert``, ``append``, an adapter) is made sparse at the
    next forward. A layer's distance d from the output comes from the order
    in which the forward pass calls the layers (the last one called has d = 0). Other trainable
    modules stay dense, are counted dense by the ledger, and are named in a warning
    (normalisation and embedding layers without one).

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
    if unwrap(model) is not model:
        raise ValueError(
            f"apply tinyprop to the model inside {type(model).__name__} (before wrapping it), "
            "then wrap it"
        )
    if is_tinyprop(model):
        raise ValueError("model already has tinyprop applied; call tinyprop.remove(model) first")
    for module in model.modules():  # a copy of a sparse layer that no applied model holds
        if isinstance(module, SparseBackpropLayer) and module.tinyprop_state.root is None:
            _drop_copied_hook(module)
            _make_plain(module)  # (copy.deepcopy of the layer alone): made sparse afresh below
    inner, inner_module = next(
        (
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, SparseBackpropLayer) or is_tinyprop(module)
        ),
        (None, None),
    )
    if isinstance(inner_module, SparseBackpropLayer):  # its root is set: copies made plain above
        root = inner_module.tinyprop_state.root
        if not any(module is root for module in model.modules()) and not any(
            module is model for module in root.modules()
        ):  # a layer of another applied model (or of the copy torch.load made of that model)
            raise ValueError(
                f"'{inner}' is a sparse layer of another applied model (a layer saved alone "
                "by an older tinyprop took that model with it, and torch.load brings it back); "
                "give this model a copy of its own, copy.deepcopy(layer), which apply makes "
                "sparse afresh, or call tinyprop.remove on the model it came from first"
            )
    if inner is not None:  # a part of it, or a model containing it, was applied before
        raise ValueError(
            f"'{inner}' inside this model already has tinyprop applied (it, or a module "
            "around it, was given to tinyprop.apply); call tinyprop.remove on the module that "
            "was applied first, then apply to the whole model once"
        )
    kinds = {name: layer_kind(module) for name, module in model.named_modules()}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if kinds[name] not in (None, "override")
    ]
    if not targets:
        raise ValueError(
            "model has no layer tinyprop supports (nn.Linear, nn.Conv1d, nn.Conv2d with "
            "padding_mode='zeros', or a class given to tinyprop.register_linear); found only: "
            f"{_module_types(model)}"
            + (
                " (the quantization-aware layers of torch.ao.quantization.prepare_qat "
                "fake-quantize their weight in their own forward: they stay dense)"
                if any(_fake_quantized(module) for module in model.modules())
                else ""
            )
        )
    _warn_dense_modules(model, kinds)
    state = TinyPropState(config=config, layers=targets, root=model)
    _swap_attention(model)  # so that their out_proj is called, and can be sparse
    state.coupling_norms = [
        module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if config.batch_norm_trained_rows:
        state.batch_norms = swap_batch_norms(model, state)
    for index, (name, module) in enumerate(targets):
        _make_sparse(module, state, name, index, len(targets))
    state.pools = fuse_pools(model, [module for _, module in targets])
    state.relus = fuse_relus(model, [module for _, module in targets])
    device = _device(targets[-1][1])
    model.register_buffer(OUTPUT_ERROR_MAX, torch.zeros((), dtype=RUNNING_MAX_DTYPE, device=device))
    for name, value in state.policy.control_buffers().items():  # budget controller (budget.py)
        model.register_buffer(name, value.to(device))
    state.handles += [
        model.register_load_state_dict_pre_hook(_check_loaded_maxima),
        model.register_load_state_dict_post_hook(_accept_plain_checkpoint),
        model.register_state_dict_pre_hook(_follow_changes_before_saving),
        model.register_forward_pre_hook(_open_forward_pass, with_kwargs=True),
        model.register_forward_hook(_close_forward_pass, with_kwargs=True, always_call=True),
    ]
    state.made_on_meta = any(buffer.is_meta for buffer in _running_state(model, state).values())
    setattr(model, _STATE, state)
    state.module_changes = _MODULE_CHANGES[0]
    return model


def _swap_attention(model: nn.Module) -> None:
    """Give each attention module of ``model`` whose ``out_proj`` PyTorch calls as a function
    (``nn.MultiheadAttention``, a subclass keeping its forward) the class that calls it as a
    module (:mod:`tinyprop.attention`); at apply, and at the first forward after an attention
    module was set into the model (before, its ``out_proj`` was made sparse, never called,
    and trained dense)."""
    for module in model.modules():
        made = sparse_attention_class(type(module))
        if made is not None:
            module.__class__ = made  # (remove finds them by class: copies set in too)


def _make_sparse(module: nn.Module, state: TinyPropState, name: str, index: int, count: int):
    """Turn one supported layer into its sparse class, the ``index``-th of ``count``."""
    original = type(module)
    module.__class__ = sparse_class(original)
    setattr(module, _ORIGINAL_CLASS, original)
    if isinstance(module, LazyModuleMixin):  # nn.LazyLinear before its first forward
        module.cls_to_become = sparse_class(original.cls_to_become)
    module.tinyprop_state = state
    module.layer_name = name or "<root>"
    module.layer_index = index
    module.registration_depth = count - 1 - index
    module.__dict__[QCONFIG_AT_APPLY] = module.__dict__.get("qconfig")  # see check_qconfig
    device = _device(module)
    maximum = torch.zeros((), dtype=RUNNING_MAX_DTYPE, device=device)
    module.register_buffer("error_max", maximum)
    module.register_buffer("backward_steps", torch.zeros((), dtype=torch.long, device=device))
    state.handles.append(module.register_load_state_dict_pre_hook(_check_loaded_maxima))


# submodules registered anywhere in the process since tinyprop was imported (nn.Module's
# __setattr__, add_module, Sequential / ModuleList / ModuleDict item assignment all register):
# a cheap test, at each forward, of whether an applied model may have changed. Counted from
# the import, not from the first apply: a model unpickled in a process that never applied
# (torch.load, a spawned worker) follows its changes too
_MODULE_CHANGES = [0]


def _count_module_change(module: nn.Module, name: str, submodule) -> None:
    _MODULE_CHANGES[0] += 1


nn.modules.module.register_module_module_registration_hook(_count_module_change)


def _counting_module_changes(method):
    """``method`` of a torch container, counting a module change once it has run."""

    @functools.wraps(method)
    def counted(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        _MODULE_CHANGES[0] += 1
        return result

    return counted


# the container methods that write ``_modules`` without the registration hook (and
# nn.Module.__delattr__, below): a layer
# inserted after apply (Sequential.insert, ModuleList.insert) kept its dense backward and was
# left out of the ledger, silently; after a deletion (del model[0], pop) the layers behind it
# kept their old names in StepStats.keep
for _container, _method in (
    (nn.Sequential, "insert"),
    (nn.ModuleList, "insert"),
    (nn.Sequential, "__delitem__"),
    (nn.ModuleList, "__delitem__"),
    (nn.ModuleDict, "__delitem__"),
    (nn.ModuleDict, "clear"),
):
    setattr(_container, _method, _counting_module_changes(getattr(_container, _method)))


def _counting_submodule_deletions(method):
    """``nn.Module.__delattr__``, counting a module change when it deletes a submodule: after
    ``del model.head`` (or ``delattr``) the removed layer stayed in tinyprop's bookkeeping and
    the layers behind it kept their registration index (random-k drew other rows than a fresh
    apply). Deleting a parameter, a buffer or a plain attribute counts nothing."""

    @functools.wraps(method)
    def counted(self, name):
        submodule = name in self.__dict__.get("_modules", ())
        method(self, name)
        if submodule:
            _MODULE_CHANGES[0] += 1

    return counted


nn.Module.__delattr__ = _counting_submodule_deletions(nn.Module.__delattr__)


def _follow_module_changes(
    model: nn.Module, state: TinyPropState, refuse_shared: bool = True
) -> None:
    """After model surgery (``model[0] = nn.Linear(...)``, ``model.head = nn.Conv2d(...)``, an
    adapter added): make the supported layers set into the model since :func:`apply` sparse,
    as apply would have, and forget the sparse layers no longer in it. Before, a layer set
    after apply kept its dense backward without a word, and the ledger left its compute out
    (its MACs were neither a sparse layer's nor in the other modules' count measured before).
    Returns at once when no module was registered or removed anywhere in the process since
    the model's last look (the counter ``_MODULE_CHANGES``)."""
    if state.module_changes == _MODULE_CHANGES[0]:
        return
    state.module_changes = _MODULE_CHANGES[0]
    modules = list(model.named_modules())
    current = {id(module) for _, module in modules}
    moved = [  # sparse layers of another applied model set into this one
        (name, module)
        for name, module in modules
        if isinstance(module, SparseBackpropLayer) and module.tinyprop_state is not state
    ]
    moved = [entry for entry in moved if _take_over_moved_layer(*entry, state, refuse_shared)]
    layers = [  # the sparse layers only: a swapped BatchNorm holds the state too, and a
        # wrapper may hand out its inner layer's (peft's ModulesToSaveWrapper.__getattr__)
        (name, module)
        for name, module in modules
        if (isinstance(module, SparseBackpropLayer) and module.tinyprop_state is state)
        or (
            not isinstance(module, SparseBackpropLayer)
            and layer_kind(module) not in (None, "override")
        )
    ]
    known = {id(module) for _, module in state.layers + moved}
    if [id(m) for _, m in layers] == [id(m) for _, m in state.layers] and all(
        m.layer_name == (name or "<root>") for name, m in layers
    ):
        return
    state.detached += [entry for entry in state.layers if id(entry[1]) not in current]
    _swap_attention(model)  # an nn.MultiheadAttention set in: its out_proj called
    for index, (name, module) in enumerate(layers):
        if id(module) in known:
            module.layer_name, module.layer_index = name or "<root>", index
            module.registration_depth = len(layers) - 1 - index
        else:
            _make_sparse(module, state, name, index, len(layers))
    state.layers = layers
    state.other_macs_cache.clear()  # what the other modules compute changed too
    state.call_fields.clear()
    state.geometry_cache.clear()


def _take_over_moved_layer(
    name: str, layer: nn.Module, state: TinyPropState, refuse_shared: bool
) -> bool:
    """A sparse layer of another applied model set into this one (``target.head =
    source.head``) becomes this model's, with its running state, as if this model had been
    applied with it. Before, it stayed the other model's: left out of this model's
    ``StepStats.keep`` and ledger, selected by the other model's policy, and left sparse by
    ``tinyprop.remove`` of this model. A layer still inside the other model too is refused
    (one layer cannot follow two models' policies and passes), or, for ``tinyprop.remove``
    (``refuse_shared`` False), left to the other model. True when taken over."""
    other = layer.tinyprop_state
    if other.root is not None and any(module is layer for module in other.root.modules()):
        if not refuse_shared:
            return False
        raise ValueError(
            f"layer '{name or '<root>'}' ({getattr(layer, _ORIGINAL_CLASS).__name__}) is in "
            f"two models given to tinyprop.apply: it is still '{layer.layer_name}' of the "
            "other one (a layer saved alone by an older tinyprop took that model with it, and "
            "torch.load brings it back). Take the layer out of the other model first, or give "
            "this model a copy of its own: copy.deepcopy(layer)"
        )
    other.layers = [entry for entry in other.layers if entry[1] is not layer]
    other.detached = [entry for entry in other.detached if entry[1] is not layer]
    hooks = layer._load_state_dict_pre_hooks  # its _check_loaded_maxima goes with it
    handles = [handle for handle in other.handles if handle.hooks_dict_ref() is hooks]
    other.handles = [handle for handle in other.handles if handle not in handles]
    if not handles:  # a copy (copy.deepcopy): its hook came with the dict, without a handle
        _drop_copied_hook(layer)
        handles = [layer.register_load_state_dict_pre_hook(_check_loaded_maxima)]
    state.handles += handles
    layer.tinyprop_state = state  # named and numbered by the caller, with the others
    return True


def _drop_copied_hook(layer: nn.Module) -> None:
    """Take :func:`_check_loaded_maxima` off a copied sparse layer (``copy.deepcopy`` copies
    the hook with the layer, but no handle of the model's removes it)."""
    hooks = layer._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "hook", None) is _check_loaded_maxima:
            del hooks[key]


def _follow_changes_before_saving(model: nn.Module, prefix: str, keep_vars: bool) -> None:
    """Root state_dict pre-hook: the running state of a layer set into the model since the
    last forward is saved too, as it would be after one (see :func:`_check_loaded_maxima`)."""
    _follow_module_changes(model, getattr(model, _STATE))


def reset_error_maxima(model: nn.Module) -> nn.Module:
    """Start TinyProp's running maxima afresh: Ymax_l of every sparse layer and the skip
    decision's Ymax_L at 0, as :func:`apply` leaves them.

    Ymax_l ← max(Ymax_l, Y_l) is never decayed, so after a change of data (another dataset,
    fine-tuning a pretrained model on a new task, a new loss) the errors are measured against
    the largest ones of the old data: k_l near S_min · ζ^(d_l) · N_l for every row, and under
    ``tinypropv2`` α = Y_L / Ymax_L small enough to skip nearly every sample. After the reset
    the next step raises them from the new data's errors, as at the start of training. The
    weights, the layers' backward counts (random-k's draws), the budget controller and the
    score window (which forgets old scores after its W = 256 samples) stay as they are.

    Args:
        model: the model given to :func:`apply` (or its DistributedDataParallel wrapper;
            call it on every rank).

    Returns:
        The same model.

    Example:
        >>> tinyprop.reset_error_maxima(model)  # before fine-tuning on the new dataset
    """
    module = unwrap(model)
    state = state_of(module)
    _follow_module_changes(module, state)  # a sparse layer moved in since the last forward
    with torch.no_grad():
        for _, layer in state.layers:
            layer.error_max.zero_()
        getattr(module, OUTPUT_ERROR_MAX).zero_()
    state.output_error_max_unchecked = False  # 0 is the initial value: nothing to check
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: plain torch modules, the same ``state_dict`` keys and values.

    Every sparse layer gets its own class back (``nn.Linear``, ``nn.Conv2d``, a registered
    class, a lazy layer's class), and so do the swapped BatchNorms, fused pools and ReLUs and
    ``nn.MultiheadAttention``; tinyprop's buffers (the running maxima Ymax_l, Ymax_L and the
    budget controller's) are deleted. The weights and the optimizer's state are untouched.
    Call it before saving a model for plain PyTorch, before ``torch.ao.quantization.convert``,
    or to apply another config (:func:`apply` refuses a model already applied).

    Args:
        model: the model given to :func:`apply` (or its DistributedDataParallel,
            DataParallel or ``torch.compile`` wrapper). A ValueError when it is not applied.

    Returns:
        The model given to :func:`apply` (inside any wrapper).

    Example:
        >>> net = apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        >>> type(remove(net)[0]).__name__, is_tinyprop(net)
        ('Linear', False)
    """
    model = unwrap(model)
    state = state_of(model)
    _follow_module_changes(model, state, refuse_shared=False)  # a layer moved in since a forward
    for handle in state.handles:
        handle.remove()
    for module in model.modules():  # a copy (copy.deepcopy) set in since apply too
        if isinstance(module, TinyPropMultiheadAttention):
            module.__class__ = plain_attention_class(type(module))
    restore_batch_norms(state.batch_norms)
    restore_pools(getattr(state, "pools", []))
    restore_relus(getattr(state, "relus", []))
    for _, module in state.layers + state.detached:
        _make_plain(module)
    del model._buffers[OUTPUT_ERROR_MAX]
    for name in state.policy.control_buffers():
        del model._buffers[name]
    delattr(model, _STATE)
    return model


def _make_plain(module: nn.Module) -> None:
    """One sparse layer back to its plain class, without tinyprop's attributes and buffers."""
    original = getattr(module, _ORIGINAL_CLASS)
    if "cls_to_become" in module.__dict__:  # a lazy layer (LazyLinear, LazyConv2d)
        del module.cls_to_become
        if not isinstance(module, LazyModuleMixin):  # initialized by a forward since
            original = original.cls_to_become
    module.__class__ = _restored_class(type(module), original)
    for attribute in (_ORIGINAL_CLASS, *_LAYER_ATTRIBUTES):
        delattr(module, attribute)
    module.__dict__.pop(QCONFIG_AT_APPLY, None)
    del module._buffers["error_max"], module._buffers["backward_steps"]


def _restored_class(made: type, original: type) -> type:
    """The class :func:`remove` gives back to a sparse layer of class ``made``: ``original``,
    or, when a parametrization was registered on the layer after :func:`apply` (weight_norm,
    spectral_norm, ``torch.nn.utils.parametrize``: a subclass of the sparse class made for this
    one module, holding the property that computes the weight), that subclass made again on
    ``original``. Before, the layer lost it, and its weight with it ("'Linear' object has no
    attribute 'weight'")."""
    if len(made.__bases__) != 1:  # the sparse class itself: (mixin, original); see sparse_class
        return original
    base = made.__bases__[0]
    restored = _restored_class(base, original)
    name = made.__name__.replace(base.__name__, restored.__name__)  # ParametrizedLinear
    return type(name, (restored,), dict(made.__dict__))


def is_tinyprop(model: nn.Module) -> bool:
    """True when :func:`apply` has been called on ``model`` (and not undone by :func:`remove`).

    Args:
        model: any ``nn.Module``, or a DistributedDataParallel, DataParallel or
            ``torch.compile`` wrapper (the model inside is asked). False for a part of an
            applied model (one of its layers or submodules).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> is_tinyprop(net), is_tinyprop(apply(net))
        (False, True)
    """
    return isinstance(getattr(unwrap(model), _STATE, None), TinyPropState)


def state_of(model: nn.Module) -> TinyPropState:
    """The shared state of an applied model; a clear error when tinyprop is not applied."""
    state = getattr(unwrap(model), _STATE, None)  # one unwrap (is_tinyprop's test, inline)
    if not isinstance(state, TinyPropState):
        raise ValueError(_not_applied(unwrap(model)))
    return state


def _not_applied(model: nn.Module) -> str:
    """Why ``model`` has no tinyprop state, and what to do: apply it, or, when it holds the
    sparse layers of a model that was applied (it is a part of that model: the model peft's
    ``merge_and_unload()`` returns from an applied PeftModel), pass that model. Before, the
    part was told to call apply, which then refused it ("already has tinyprop applied")."""
    modules = model.named_modules() if isinstance(model, nn.Module) else ()
    held = next(
        (
            (name, module)
            for name, module in modules
            if isinstance(module, SparseBackpropLayer) and module.tinyprop_state.root is not None
        ),
        None,
    )
    if held is None:
        return "model does not have tinyprop applied; call tinyprop.apply(model, config)"
    name, layer = held
    return (
        f"model does not have tinyprop applied, but its layer '{name}' is a sparse layer of "
        f"the {type(layer.tinyprop_state.root).__name__} given to tinyprop.apply (this model is "
        "a part of it, such as the model peft's merge_and_unload() returns): pass that model, "
        "or call tinyprop.remove on it first and then tinyprop.apply(model, config)"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, DataParallel or torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = _compiled_module(model)
        if inner is None:
            return model
        model = inner


def _compiled_module(model) -> nn.Module | None:
    """torch.compile's module inside its wrapper (``_orig_mod``), else None. A module with
    nn.Module's own attribute lookup holds it in ``_modules`` or ``__dict__``: looked up there,
    without the AttributeError (and its message) that ``hasattr`` costs on every other module,
    every step; others (a ``__getattr__`` of their own) are asked as before."""
    if isinstance(model, nn.Module) and type(model).__getattr__ is nn.Module.__getattr__:
        inner = model.__dict__.get("_orig_mod")
        if inner is None:
            found = hasattr(type(model), "_orig_mod")  # a class attribute, else a submodule
            inner = model._orig_mod if found else model._modules.get("_orig_mod")
    elif hasattr(model, "_orig_mod"):
        inner = model._orig_mod
    else:
        return None
    return inner if isinstance(inner, nn.Module) else None


def _open_forward_pass(model: nn.Module, args, kwargs) -> None:
    """Root forward pre-hook: record the sparse-layer calls of a training forward pass; none
    while torch.export records the model (the plain layers: ``strict=True`` failed here,
    "Dynamo does not know how to trace the builtin _thread.get_ident")."""
    if exporting():
        return
    state = getattr(model, _STATE)
    _follow_module_changes(model, state)
    if state.made_on_meta:
        _fill_running_state_made_on_meta(model, state)
    if not torch.is_grad_enabled() or state.open_pass is not None or torch.jit.is_tracing():
        return  # torch.jit.trace: no FLOP counter in the recorded graph
    if not state.inside_ddp:  # Lightning wraps the LightningModule, not the applied model
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        state.inside_ddp = ddp is not None and any(m is model for m in ddp.module.modules())
    forward_pass = ForwardPass()
    state.open_pass = forward_pass
    signature = (model.training, _signature(args, kwargs))
    if signature in state.other_macs_cache:
        forward_pass.other_macs = state.other_macs_cache[signature]
    else:  # first pass with these shapes: measure what the other modules compute
        forward_pass.counter = forward_flop_counter()
        forward_pass.signature = signature
        forward_pass.counter.__enter__()


def _close_forward_pass(model: nn.Module, args, kwargs, output) -> None:
    if exporting():
        return
    state = getattr(model, _STATE)
    forward_pass = state.open_pass
    if forward_pass is None:
        return
    state.open_pass = None
    counter, forward_pass.counter = forward_pass.counter, None
    if counter is not None:
        counter.__exit__(None, None, None)
        sparse = sum(call.forward_macs for call in forward_pass.calls)
        forward_pass.other_macs = max(0, counter.get_total_flops() // 2 - sparse)
        if len(state.other_macs_cache) >= _MAX_SIGNATURES:
            state.other_macs_cache.pop(next(iter(state.other_macs_cache)))
            _warn_signatures_churn(state)
        state.other_macs_cache[forward_pass.signature] = forward_pass.other_macs
    forward_pass.output = main_tensor(output)
    if not state.policy.sparse:  # which passes a step reaches (tinyprop.step._full_reached)
        outputs = forward_pass.output
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        forward_pass.output_refs = tuple(
            weakref.ref(tensor) for tensor in outputs if isinstance(tensor, Tensor)
        )
    state.finish_pass(forward_pass)


def _warn_signatures_churn(state: TinyPropState) -> None:
    """Once per model: the other modules' MACs were measured for ``_MAX_SIGNATURES`` call
    signatures, and each new one runs the FLOP counter again (a counted forward). An int that
    changes at every call without changing the work (a step index) is the usual cause; it
    made steps up to 1.4x slower, silently."""
    if "signatures" not in state.warned:
        state.warned.add("signatures")
        warnings.warn(
            f"tinyprop: the ledger has measured the MACs of the modules it keeps dense for "
            f"{_MAX_SIGNATURES} different call signatures (input shapes, int / bool / str "
            "arguments) and measures again at every new one, a forward under a FLOP counter "
            "each time; an argument that changes at every call without changing the work (a "
            "step index as an int) can be passed as a tensor instead, and inputs of many "
            "lengths can be padded to a few",
            stacklevel=4,
        )


def _signature(args, kwargs) -> tuple:
    """What decides the MACs of a forward call besides the module's own code: each tensor's
    shape, dtype and whether it requires grad, the names of the keyword arguments, and the
    values of flags and counts (bools, ints, strings, None: ``output_hidden_states=True`` runs
    more than ``False``, ``model(x, steps=5)`` unrolls a dense cell five times; they were one
    signature, and the ledger counted the first call's MACs for every later one). Other
    numbers (floats) count by their type, and a tensor by its shape: a value that changes at
    every call would run the FLOP counter at every call."""
    if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # model(x): no flattening
        leaves = args
    else:
        leaves, _ = tree_flatten((args, kwargs))
    return tuple(sorted(kwargs)) + tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.requires_grad)
        if isinstance(leaf, Tensor)
        else ((type(leaf), leaf) if isinstance(leaf, (bool, int, str, type(None))) else type(leaf))
        for leaf in leaves
    )


def main_tensor(output) -> Tensor | tuple[Tensor, ...] | None:
    """The tensor the losses are computed from: the output, or its ``logits`` (a key, or a
    field of a namedtuple or dataclass); for another tuple / dict / dataclass output, its
    tensors with a gradient (the step finds the one the losses come from:
    :func:`output_the_losses_come_from`). A namedtuple's ``logits`` and a dataclass's fields
    were not looked into: train_step refused both."""
    if isinstance(output, Tensor):
        return output
    try:
        logits = output["logits"]
    except (KeyError, TypeError, IndexError):
        logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if dataclasses.is_dataclass(output) and not isinstance(output, type):  # not a pytree
        output = [getattr(output, field.name) for field in dataclasses.fields(output)]
    leaves, _ = tree_flatten(output)
    tensors = list({id(leaf): leaf for leaf in leaves if isinstance(leaf, Tensor)}.values())
    with_grad = tuple(tensor for tensor in tensors if tensor.grad_fn is not None)
    if len(with_grad) > 1:
        return with_grad
    return with_grad[0] if with_grad else next(iter(tensors), None)


def output_the_losses_come_from(losses: Tensor, candidates: tuple[Tensor, ...]) -> Tensor:
    """Of the tensors of a tuple or dict model output, the one the losses are computed from:
    the losses' autograd graph reaches it, and through no other of them (the logits, not the
    hidden features the logits are computed from). One walk of the graph, each node at most
    twice; a ValueError naming the way out when there is not exactly one."""
    nodes = {}
    for tensor in candidates:  # two tensors of one autograd node cannot be told apart
        nodes.setdefault(tensor.grad_fn, []).append(tensor)
    directly, through_another = set(), set()  # nodes reached without / through a candidate
    stack = [(losses.grad_fn, False)]
    while stack:
        node, through = stack.pop()
        seen = through_another if through else directly
        if node is None or node in seen:
            continue
        seen.add(node)
        through = through or node in nodes
        stack.extend((next_node, through) for next_node, _ in node.next_functions)
    found = [node for node in nodes if node in directly and node not in through_another]
    if len(found) == 1 and len(nodes[found[0]]) == 1:
        return nodes[found[0]][0]
    reached = sum(len(nodes[node]) for node in nodes if node in directly)
    raise ValueError(
        f"the model returned {len(candidates)} tensors with a gradient and the losses depend on "
        f"{reached} of them, so tinypropv2 cannot tell which one is the output its skip "
        "decision measures; pass it: tinyprop.backward(model, losses, output=logits) (or "
        "tinyprop.loss(..., output=logits)), or several heads whose losses are summed "
        "together, output=(logits_a, logits_b)"
    )


def widen_running_state(model: nn.Module) -> None:
    """Give tinyprop's floating buffers on the root module their own dtype back after
    ``model.half()`` or ``.to(torch.bfloat16)`` narrowed them (float32 for Ymax_L, float64 for
    the budget controller and the score window): in float16 a running maximum past 65504 is
    inf, and every sample would then be skipped. A value the cast already turned into inf
    restarts afresh (Ymax_L at 0, the window's slot empty), with a warning. The sparse layers
    keep their own Ymax_l wide through the cast (``SparseBackpropLayer._apply``)."""
    buffers = model._buffers
    for name, buffer in list(buffers.items()):
        if not name.startswith("tinyprop_") or buffer is None or buffer.dtype not in _NARROW_DTYPES:
            continue
        maximum = name == OUTPUT_ERROR_MAX  # float32; the window and the controller float64
        wide = buffers[name] = buffer.to(torch.float32 if maximum else torch.float64)
        if bool(torch.isinf(wide).any()):
            with torch.no_grad():
                wide.masked_fill_(torch.isinf(wide), 0.0 if maximum else math.nan)
            warnings.warn(
                f"tinyprop: '{name}' was cast to {buffer.dtype} (model.half() or .to()) while it "
                "held more than that dtype can, and became inf; it restarts afresh as at the "
                "start of training. Cast the model before tinyprop.apply, or before training, "
                "to keep it.",
                stacklevel=4,
            )


def _check_loaded_maxima(module, state_dict, prefix, *args) -> None:
    """Refuse a checkpoint whose running maxima are NaN, infinite or negative (or, on the
    root module, whose budget controller or score window is corrupt). The buffers it loads
    into are widened first: a float16 model keeps them in float32 (or float64). The root,
    loaded first, checks every sparse layer's entries before any weight loads: a corrupt
    entry of a later layer left the weights of the layers before it loaded, the model half
    one checkpoint's and half the other's."""
    _check_loaded_dtypes(module, state_dict, prefix)
    state = getattr(module, _STATE, None)
    if state is not None:
        _follow_module_changes(module, state)  # a layer set in since the last forward: its
        # running maxima load too (it refused them)
        state.load_prefix = prefix  # where this model sits in the module being loaded
        widen_running_state(module)
        _check_loaded_shapes(module, state_dict, prefix)
        for name, layer in module.named_modules():
            if layer is not module and isinstance(layer, SparseBackpropLayer):
                _check_loaded_dtypes(layer, state_dict, f"{prefix}{name}.")
                _check_loaded_entries(layer, state_dict, f"{prefix}{name}.")
        state.policy.check_loaded(state_dict, prefix)
        loaded = state_dict.get(prefix + OUTPUT_ERROR_MAX)  # checked at the next decision
        state.output_error_max_unchecked = isinstance(loaded, Tensor) and bool(loaded.gt(0).all())
    _check_loaded_entries(module, state_dict, prefix)


def _check_loaded_shapes(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Refuse, before anything loads, a checkpoint entry whose shape is not the one it loads
    into, as PyTorch's ``load_state_dict`` does when it reaches that entry: by then the
    modules before it had loaded, and a caller who caught the error trained a model half one
    checkpoint's and half the other's. Modules that load in their own way (their own
    ``_load_from_state_dict`` or a load hook that may convert the entries) are left to it."""
    for name, module in model.named_modules(remove_duplicate=False):  # as load visits them
        if type(module)._load_from_state_dict not in _PLAIN_LOADS or any(
            getattr(hook, "hook", None) is not _check_loaded_maxima
            for hook in module._load_state_dict_pre_hooks.values()
        ):
            continue
        persistent = {
            key: buffer
            for key, buffer in module._buffers.items()
            if key not in module._non_persistent_buffers_set
        }
        for key, tensor in {**module._parameters, **persistent}.items():
            entry = f"{prefix}{name}.{key}" if name else prefix + key
            value = state_dict.get(entry)
            if (
                not isinstance(value, Tensor)
                or tensor is None
                or isinstance(tensor, nn.parameter.UninitializedTensorMixin)
                or (tensor.dim() == 0 and value.shape == (1,))  # PyTorch takes value[0]
                or value.shape == tensor.shape
            ):
                continue
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(model).__name__}:\n\tsize mismatch "
                f"for {entry}: copying a param with shape {value.shape} from checkpoint, the "
                f"shape in current model is {tensor.shape}. Nothing was loaded: give a "
                "checkpoint of this model, or load the entries that fit with strict=False "
                "after deleting this one"
            )


# the _load_from_state_dict of modules that load their entries as they are
_PLAIN_LOADS = {nn.Module._load_from_state_dict, _NormBase._load_from_state_dict}


def _check_loaded_entries(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Refuse a backward count or a running maximum of ``module`` that the checkpoint cannot
    hold (see :func:`_check_loaded_maxima`)."""
    # random-k's draws follow it; -5, 2^63 - 1 (wrapping to -2^63) or a float NaN loaded as is
    fix = "set it to 0 (the count of the layer's backward passes)"
    check_count(state_dict.get(prefix + "backward_steps"), prefix + "backward_steps", fix)
    for name in ("error_max", OUTPUT_ERROR_MAX):
        value = state_dict.get(prefix + name)
        buffer = module._buffers.get(name)
        if isinstance(value, Tensor) and value.numel() == 1 and buffer is not None:
            number = float(value)
            # what the buffer can hold: a float64 1e39 became inf in the float32 buffer (every
            # sample then skipped, or k at its floor, silently)
            largest = torch.finfo(buffer.dtype).max if buffer.is_floating_point() else math.inf
            if not math.isfinite(number) or not 0 <= number <= largest:
                raise ValueError(
                    f"checkpoint entry '{prefix + name}' is {number}: a running maximum must "
                    f"be finite, >= 0 and at most {largest:.4g} (the largest {buffer.dtype} it "
                    "loads into); the checkpoint is corrupt: reset it to 0 to restart the error "
                    "statistics"
                )


def _check_loaded_dtypes(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Refuse a checkpoint entry of tinyprop's running state (``tinyprop_*`` on the root,
    ``error_max`` and ``backward_steps`` on a sparse layer) of a kind tinyprop never writes:
    bool or complex, or an integer where tinyprop saves a float. PyTorch's copy took them as
    they came: an integer score window turned its NaN (empty) slots into -9.2e18 scores and
    trained every sample, a bool running maximum became 1.0, a complex one's imaginary part
    was dropped, silently (or ``"gt_cpu" not implemented for 'ComplexFloat'``)."""
    for name, buffer in module._buffers.items():
        if buffer is None or not name.startswith(("tinyprop_", "error_max", "backward_steps")):
            continue
        value = state_dict.get(prefix + name)
        if not isinstance(value, Tensor):
            continue
        if (
            value.dtype == torch.bool
            or value.is_complex()
            or (buffer.is_floating_point() and not value.is_floating_point())
        ):
            restart = (  # what starts that part of the running state afresh
                "delete its tinyprop_budget_* and tinyprop_score_window* entries"
                if name.startswith(_CONTROL_GROUPS)
                else f"set it to a {buffer.dtype} zero"
            )
            raise ValueError(
                f"checkpoint entry '{prefix + name}' is a {value.dtype} tensor, but tinyprop "
                f"saves it as {buffer.dtype}: the checkpoint was changed or written by another "
                f"program, and its value cannot be trusted; {restart} to start it afresh"
            )


# the entries of the budget controller and of the score window (tinyprop.budget): one group each
_CONTROL_GROUPS = ("tinyprop_budget_", "tinyprop_score_window")


def _accept_plain_checkpoint(model: nn.Module, incompatible_keys) -> None:
    """Load a checkpoint saved without tinyprop (no running maxima at all) into an applied
    model, strict or not: the running state starts afresh, as after :func:`apply`. The same
    for the budget controller and the score window alone, whose entries depend on the policy
    and the budget: a checkpoint of a run without them starts them afresh, and the entries
    of a run with them are left out when this model's policy has none. A checkpoint holding
    only some entries of a group stays an error."""
    state = getattr(model, _STATE)
    prefix, state.load_prefix = state.load_prefix or "", None
    control = state.policy.control_buffers()
    initial = _initial_running_state(state)
    missing = incompatible_keys.missing_keys
    not_loaded = [name for name in initial if prefix + name in missing]
    groups = [initial] + [
        {name: value for name, value in control.items() if name.startswith(group)}
        for group in _CONTROL_GROUPS
    ]
    for group in groups:
        names = {prefix + name for name in group}
        if not names or not names <= set(missing):
            continue
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in group.items():
                buffers[name].copy_(value)
        missing[:] = [entry for entry in missing if entry not in names]
    if state.made_on_meta:  # loaded (strict=False: what the checkpoint lacks starts afresh)
        _fill_running_state_made_on_meta(model, state, not_loaded)
    if state.policy.budget is not None:  # saved before the counts' check value existed
        state.policy.budget.accept_without_check(missing, prefix)
    unexpected = incompatible_keys.unexpected_keys
    unexpected[:] = [  # another policy's controller or window: nothing here to load it into
        entry
        for entry in unexpected
        if not (
            entry.startswith(prefix)
            and entry[len(prefix) :].startswith(_CONTROL_GROUPS)
            and "." not in entry[len(prefix) :]
        )
    ]


def _initial_running_state(state: TinyPropState) -> dict[str, Tensor]:
    """Name (from the applied model) -> the value :func:`apply` gives each of tinyprop's
    buffers: Ymax_L and every layer's Ymax_l at 0, no backward steps, the budget controller
    and the score window (if the policy has them) afresh."""
    initial = {OUTPUT_ERROR_MAX: torch.zeros(()), **state.policy.control_buffers()}
    for name, _ in state.layers:
        layer = f"{name}." if name else ""
        initial[layer + "error_max"] = torch.zeros(())
        initial[layer + "backward_steps"] = torch.zeros((), dtype=torch.long)
    return initial


def _running_state(model: nn.Module, state: TinyPropState) -> dict[str, Tensor]:
    """Name -> tinyprop's buffers of the applied model (see :func:`_initial_running_state`)."""
    buffers = dict(model.named_buffers())
    return {name: buffers[name] for name in _initial_running_state(state)}


def _fill_running_state_made_on_meta(
    model: nn.Module, state: TinyPropState, names: list[str] | None = None
) -> None:
    """Give the running state of a model applied on the meta device its initial values, once
    the model's parameters have left it (``to_empty``, or ``load_state_dict(...,
    assign=True)``): ``to_empty`` leaves whatever the memory held (a Ymax_l of 7e14 that
    skipped every sample, a negative one, a budget controller's garbage counts), and a
    buffer still on meta failed at the step ("cannot be called on meta tensors"). ``names``:
    only these (the entries a checkpoint did not load); all of them when None."""
    buffers = _running_state(model, state)
    owners = {"": model, **{name: layer for name, layer in state.layers}}
    targets = {}
    for name in buffers:
        owner = owners[name.rpartition(".")[0] if name.endswith(_LAYER_BUFFERS) else ""]
        device = next((p.device for p in owner.parameters()), buffers[name].device)
        if device.type == "meta":
            return  # not materialised yet: the next forward or load tries again
        targets[name] = device
    initial = _initial_running_state(state)
    with torch.no_grad():
        for name in buffers if names is None else names:
            buffer, value = buffers[name], initial[name]
            if buffer.is_meta:  # load_state_dict(..., assign=True) left tinyprop's on meta
                module_name, _, attribute = name.rpartition(".")
                module = model.get_submodule(module_name)
                module._buffers[attribute] = value.to(targets[name], buffer.dtype)
            else:
                buffer.copy_(value)
    state.made_on_meta = False


def _warn_dense_modules(model: nn.Module, kinds: dict) -> None:
    dense = [
        f"{name or '<root>'} ({_type_name(module)}"
        + (
            ", quantization-aware: its forward fake-quantizes the weight"
            if _fake_quantized(module)
            else ", forward overridden: see tinyprop.register_linear"
            if kinds[name] == "override"
            else ""
        )
        + ")"
        for name, module in model.named_modules()
        if kinds[name] in (None, "override")
        and not isinstance(module, _DENSE_BY_DESIGN)
        and not _parametrizes_a_target(name, module, kinds)
        and not (kinds[name] is None and _vector_parameters_only(module))
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if dense:
        warnings.warn(
            "tinyprop keeps these trainable modules dense (their backward is counted dense in "
            "the ledger): " + ", ".join(dense),
            stacklevel=3,
        )


def _vector_parameters_only(module: nn.Module) -> bool:
    """True when each trainable parameter of the module itself is a vector (one entry per
    feature: at most one dimension longer than 1): a normalisation of another library
    (transformers' LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm), a layer scale, PReLU. Such a
    module multiplies or adds its parameters entry by entry, as nn.LayerNorm does: no matrix
    product to make sparse, so dense by design, without the warning (every LLaMA-style model
    named each of its RMSNorms in it, though nn.RMSNorm was not named). A lazy module before
    its first forward (``nn.LazyConv3d``, ``nn.LazyConvTranspose2d``) has no shape yet: it is
    named (reading its shape made ``apply`` fail)."""
    return all(
        not isinstance(parameter, nn.parameter.UninitializedParameter)
        and sum(size > 1 for size in parameter.shape) <= 1
        for parameter in module.parameters(recurse=False)
        if parameter.requires_grad
    )


def _parametrizes_a_target(name: str, module: nn.Module, kinds: dict) -> bool:
    """True for the parametrizations (weight_norm, spectral_norm, ...) of a sparse layer: the
    layer computes its weight through them and is sparse itself."""
    if not isinstance(module, parametrize.ParametrizationList):
        return False
    owner = name.rsplit("parametrizations.", 1)[0].rstrip(".")  # "0.parametrizations.weight"
    return kinds.get(owner) not in (None, "override")


def _device(layer: nn.Module) -> torch.device:
    """The device of a layer's parameters, read without computing ``layer.weight``: under a
    parametrization that would run it (spectral_norm's power iteration would step once more
    than in PyTorch's own training)."""
    return next(layer.parameters()).device


def _module_types(model: nn.Module) -> str:
    names = sorted({_type_name(module) for module in model.modules()})
    return ", ".join(names)


def _type_name(module: nn.Module) -> str:
    """The class name, with its package for torch.ao.nn.qat's layers (named Linear, Conv2d)."""
    kind = type(module)
    return f"{kind.__module__}.{kind.__name__}" if _fake_quantized(module) else kind.__name__


def _fake_quantized(module: nn.Module) -> bool:
    """A quantization-aware layer (``torch.ao.quantization.prepare_qat``'s ``qat.Linear``,
    ``qat.Conv2d``, the fused ``ConvBnReLU2d``...): its forward fake-quantizes its weight."""
    return "weight_fake_quant" in module._modules
