"""``train_step`` without an autograd graph, for a plain ``nn.Sequential``.

The step's graph costs more than the sparse backward of a small model (the har and mnist
finetune runs): one node per module, saved tensors, the engine's bookkeeping. For a model
where autograd would only chain the modules' own backward functions,
:func:`tinyprop.train_step` runs the same step without it (:func:`run_step`):

1. the forward under ``torch.no_grad``, keeping each module's input; each sparse layer call is
   recorded as the library's forward records it (the same :class:`~tinyprop.state.LayerCall`,
   the same forward MACs);
2. the model output y_L made a leaf that requires grad, and the user's ``loss_fn(y_L, y)``:
   autograd differentiates the loss alone (a graph of one or two nodes), so any loss works and
   δ_L = ∂ Σ_n w_n loss_n / ∂ y_L is what the step's backward receives at the output today;
   the skip decision is the library's own (:func:`tinyprop.step.run_backward`'s);
3. from the output down, each sparse layer's backward by the function its autograd Function
   calls (:meth:`~tinyprop.autograd.SparseBackprop.layer_backward`: k, the kept entries, the
   kernels, records, running maxima, finiteness checks; a ReLU right below it fused into its
   input gradient as :mod:`tinyprop.relu_fusion` fuses it), ReLU's, the pools' and Flatten's
   by the aten kernels autograd runs for them;
4. the step's end as before: records and ledger, the gradient check, the running state's
   commit, the optimizer step.

The same skips, k, weights, ledger, :class:`~tinyprop.step.StepStats` and optimizer state as
the autograd path, bit for bit (tests/test_graph_free.py). :func:`eligible` says when it
applies; anything else (hooks, other module types, autocast, DistributedDataParallel, the
``full`` policy, other dtypes or devices, an input that requires grad) takes the autograd
path. With ``fused_update`` the fused weights are updated as on the autograd path, and a step
proven accepted before its backward steps them in their layers' walks
(:mod:`tinyprop.fused_walk`).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _single

from tinyprop import fused_walk
from tinyprop import model as model_hooks
from tinyprop.autograd import SparseBackprop
from tinyprop.functional import list_tensor
from tinyprop.fused_update import fusable_weights
from tinyprop.layers import TinyPropConv1d, TinyPropConv2d, TinyPropLinear
from tinyprop.loss_gradient import is_power_of_two
from tinyprop.loss_gradient import output_error as weighted_output_error
from tinyprop.model import state_of
from tinyprop.patches import cached_patches_for
from tinyprop.pool_fusion import global_module_hooks, has_hooks
from tinyprop.relu_fusion import ConvInputReLU
from tinyprop.step import StepContext, _open_step, check_loss_fn_output, describe

aten = torch.ops.aten

SPARSE_LAYERS = (TinyPropLinear, TinyPropConv1d, TinyPropConv2d)  # exact types, no subclass
PASSING = (nn.Flatten, nn.Identity)  # δ passes unchanged but for its shape


def eligible(model: nn.Module, x: Tensor) -> bool:
    """Whether :func:`tinyprop.train_step` may run the step of ``model`` on ``x`` without a
    graph: a plain ``nn.Sequential`` of sparse Linear / Conv1d / Conv2d layers (exactly those
    classes), ReLU, non-overlapping MaxPool1d, AvgPool1d, Flatten, Identity and Dropout in
    eval mode (or p = 0); float32 CPU parameters and input, the input not requiring grad, no
    sparse layer whose bias alone trains with nothing below it training; no module, parameter
    or global hook but the library's own, no saved-tensor hooks, autocast, tracing or
    torch.func transforms; no module twice and no parameter two modules share (their
    gradients add up); a sparse policy. The walk over the modules and
    their parameters is kept per model until something it reads changes
    (:func:`_modules_key`)."""
    if type(model) is not nn.Sequential:
        return False
    state = state_of(model)
    if (
        not state.policy.sparse
        or state.output_error_max_unchecked
        or state.made_on_meta
        or state.inside_ddp
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled("cpu")
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        or type(x) is not Tensor
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.requires_grad
        or x.layout != torch.strided
    ):
        return False
    if (
        global_module_hooks()
        or len(model._forward_pre_hooks) != 1  # the library's two root hooks only
        or len(model._forward_hooks) != 1
        or model._backward_hooks
        or model._backward_pre_hooks
    ):
        return False
    key = _modules_key(model)
    cached = _VERDICTS.get(model)
    if cached is None or cached[0] != key:  # checked again after any change it reads
        cached = _VERDICTS[model] = (key, _modules_eligible(model))
    return cached[1]


# model -> (what _modules_eligible read, its verdict): the walk over the modules and their
# parameters, once per model until one of them changes
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# a module's attributes that _module_eligible reads, by its type
_SETTINGS = {
    nn.Dropout: ("p",),
    nn.MaxPool1d: ("return_indices", "ceil_mode", "padding", "dilation", "stride", "kernel_size"),
    **{layer: ("padding_mode",) for layer in SPARSE_LAYERS},
}


def _modules_key(model: nn.Sequential) -> list:
    """What :func:`_modules_eligible` reads of ``model``, as values that compare equal when
    nothing changed: the process-wide count of module registrations (a module set, inserted
    or deleted anywhere: ``model._MODULE_CHANGES``), then each module, its training flag,
    whether it has hooks and the attributes it is judged by, and each parameter: its
    identity, requires_grad, dtype, device and whether it has hooks (none of these counts as
    a registration when it changes)."""
    key = [model_hooks._MODULE_CHANGES[0]]
    for module in model._modules.values():
        key += (
            id(module), module.training, not module._forward_hooks,
            not module._forward_pre_hooks, not module._backward_hooks,
            not module._backward_pre_hooks,
        )  # fmt: skip
        settings = module.__dict__
        for name in _SETTINGS.get(type(module), ()):
            key.append(settings.get(name))
        for parameter in module._parameters.values():
            if parameter is None:
                key.append(None)
            else:
                key += (
                    id(parameter), parameter.requires_grad, parameter.dtype, parameter.device,
                    not parameter._backward_hooks, not parameter._post_accumulate_grad_hooks,
                )  # fmt: skip
    return key


def _modules_eligible(model: nn.Sequential) -> bool:
    """The part of :func:`eligible` that reads the model's modules and parameters."""
    trainable = False  # a parameter of this module or one before it trains
    seen = set()  # a module called twice or a weight two layers share: gradients that add up
    for module in model._modules.values():
        if not _module_eligible(module) or id(module) in seen:
            return False
        seen.add(id(module))
        if type(module) in SPARSE_LAYERS and not (trainable or module.weight.requires_grad):
            bias = module.bias  # trained alone by PyTorch's dense backward there
            if bias is not None and bias.requires_grad:
                return False
        for parameter in module._parameters.values():
            if parameter is None:  # a Linear without bias
                continue
            if id(parameter) in seen:
                return False
            seen.add(id(parameter))
            if (
                type(parameter) is not nn.Parameter
                or parameter.dtype != torch.float32
                or parameter.device.type != "cpu"
                or parameter._backward_hooks
                or parameter._post_accumulate_grad_hooks
            ):
                return False
            trainable = trainable or parameter.requires_grad
    return trainable


def _module_eligible(module: nn.Module) -> bool:
    """Whether the graph-free step can run ``module``'s backward as autograd would."""
    if has_hooks(module) or module._modules:
        return False
    kind = type(module)
    if kind in SPARSE_LAYERS:  # padding_mode set after apply: the forward's error says so
        return getattr(module, "padding_mode", "zeros") == "zeros"
    if kind is nn.ReLU or kind is ConvInputReLU or kind in PASSING or kind is nn.AvgPool1d:
        return True
    if kind is nn.Dropout:
        return not module.training or module.p == 0
    if kind is nn.MaxPool1d:
        return (
            not module.return_indices
            and not module.ceil_mode
            and _single(module.padding) == (0,)
            and _single(module.dilation) == (1,)
            and _single(module.stride) == _single(module.kernel_size)
        )
    return False


class _Unbatched(Exception):
    """A sparse layer received one unbatched sample: the autograd path handles it."""


def run_step(model: nn.Sequential, x: Tensor, y, loss_fn, optimizer=None) -> StepContext | None:
    """What :func:`tinyprop.step.run_backward` does in ``train_step`` (``defers_commit``),
    from the forward on, without a graph, on a model :func:`eligible` accepted: the step, its
    records and ledger finished, the gradients set, the running state not committed yet;
    None when the forward found that it cannot (the autograd path then runs the step,
    nothing of this attempt kept). ``optimizer``: ``fused_update``'s (None: no fused update)."""
    modules = list(model._modules.values())
    first_trainable = next(  # modules after it get an input gradient
        position
        for position, module in enumerate(modules)
        if any(p is not None and p.requires_grad for p in module._parameters.values())
    )
    forward = _forward(model, modules, x, first_trainable)
    if forward is None:
        return None
    inputs, calls, output = forward
    fused = {} if optimizer is None else fusable_weights(model, optimizer)
    batch_size = x.shape[0]
    if output.shape[:1] != (batch_size,):
        raise ValueError(
            f"the model must return one output tensor (B, ...) with B={batch_size}; "
            f"got {describe(output)}"
        )
    output = output.detach().requires_grad_()  # y_L: a leaf, the loss's graph ends there
    try:
        losses = loss_fn(output, y)
    except Exception:  # noqa: BLE001 (e.g. an in-place change of y_L, refused on a leaf):
        state_of(model).take_passes()  # the autograd path runs the step, and raises what
        return None  # the loss itself raises there
    check_loss_fn_output(losses, batch_size)
    if not _reaches_only(losses, output):  # a penalty on the weights, a learnt loss weight:
        state_of(model).take_passes()  # gradients past y_L; the autograd path runs the step
        return None
    # the autograd path takes δ_L from the decision's gradient when y_L comes from a sparse
    # layer's backward (tinyprop.loss_gradient)
    last = len(modules) - 1
    from_sparse_layer = last in calls and calls[last][1]
    step = _open_step(model, losses, output, 0, False, from_sparse_layer=from_sparse_layer)
    step.defers_commit = True
    step.passes_overflow = step.quiet_overflow = False
    step.fused_weights = fused
    if step.stats.trained:
        # (R, ...) δ_L of the trained samples (R,), None: of every row
        delta, trained = _output_error(step, losses, output)
        if fused:
            step.walks = fused_walk.prove(model, modules, inputs, calls, delta, step, optimizer)
        step.state.step = step  # what StepContext.begin_backward opens
        with torch.no_grad():
            _backward(modules, inputs, calls, delta, trained)
    step.finish()  # records, ledger, the deferred finiteness checks
    return step


def _forward(model: nn.Sequential, modules: list, x: Tensor, first_trainable: int):
    """The forward without a graph, recorded as the library's hooks record it: each module's
    input, position -> (the sparse layer's LayerCall, whether autograd would run its
    backward), the output; None for an unbatched input of a sparse layer."""
    model_hooks._open_forward_pass(model, (x,), {})
    inputs, calls, output = [], {}, x
    try:
        with torch.no_grad():
            for position, module in enumerate(modules):
                inputs.append(output)
                if type(module) in SPARSE_LAYERS:
                    weight = module.weight
                    module.check_input(output, weight)
                    module.check_sparse_settings()  # as the layer's own forward refuses
                    module.check_qconfig()
                    if output.dim() == module.unbatched_dims:
                        raise _Unbatched
                    input_grad = position > first_trainable  # as x.requires_grad would be
                    bias = module.bias
                    flags = (  # as the forward with gradients records them
                        bias is not None and bias.requires_grad, weight.requires_grad, input_grad
                    )  # fmt: skip
                    calls[position] = (module._record(output, weight, flags), any(flags[1:]))
                    output = module.dense_forward(output, weight, bias)
                else:  # its forward itself (eligible: no hooks to run)
                    output = module.forward(output)
    except _Unbatched:
        _abandon_forward_pass(model)
        return None
    except BaseException:
        model_hooks._close_forward_pass(model, (x,), {}, None)  # as its always_call hook
        raise
    model_hooks._close_forward_pass(model, (x,), {}, output)
    return inputs, calls, output


def _reaches_only(losses: Tensor, output: Tensor) -> bool:
    """Whether the graph of ``losses`` reaches no tensor that requires grad but the leaf
    ``output`` (y_L): a loss that also reads the parameters (``+ λ·Σ w²``) or a tensor computed
    from them sends them gradients the graph-free step would drop."""
    seen, nodes = set(), [losses.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and variable is not output:
            return False
        nodes.extend(function for function, _ in node.next_functions)
    return True


def _abandon_forward_pass(model: nn.Module) -> None:
    """Drop the open forward pass unrecorded (its FLOP counter closed, nothing cached)."""
    state = state_of(model)
    forward_pass, state.open_pass = state.open_pass, None
    if forward_pass is not None and forward_pass.counter is not None:
        forward_pass.counter.__exit__(None, None, None)
        forward_pass.counter = None


def _output_error(step: StepContext, losses: Tensor, output: Tensor):
    """δ_L of the rows to backpropagate (R, ...), and those rows (R,) of the batch (None:
    every row, R = B): what the autograd path's backward hands the output on them, bit for
    bit. From the decision's g = ∂ Σ losses / ∂ y_L where that path takes it: w_n · g_n with
    w_n = 1 / n on the trained rows (a power of two: no rounding), computed on those rows
    alone (a skipped row's is zero); else autograd's gradient of the step loss Σ_n w_n loss_n
    (w_n the trained mask over the averaged samples n) at y_L, and its trained rows
    (:func:`_trained_rows`)."""
    decided, step.decision_gradient = step.decision_gradient, None
    stats, averaged = step.stats, step.averaged_samples
    if decided is not None and is_power_of_two(averaged):
        gradient = decided[1]  # (B, ...) g
        if stats.trained == len(stats.trained_mask):  # every w_n = 1 / n
            return gradient * (1.0 / averaged), None
        if step.couples_samples:  # (drop_skipped_rows: the batch's rows)
            return weighted_output_error(gradient, stats.trained_mask, averaged), None
        trained = stats.trained_mask.nonzero().flatten()  # (R,)
        return gradient.index_select(0, trained) * (1.0 / averaged), trained
    weights = stats.trained_mask.to(losses.dtype) / averaged  # (B,)
    (delta,) = torch.autograd.grad((losses * weights).sum(), output)
    trained = _trained_rows(step, delta)
    if trained is not None:
        delta = delta.index_select(0, trained)  # (R, ...) the rows that are not zero
    return delta, trained


def _trained_rows(step: StepContext, delta: Tensor) -> Tensor | None:
    """(R,) the trained samples of a step that skipped some, else None. A skipped sample's
    δ_L (``delta`` (B, ...)) is zero for per-sample losses (w_n = 0) and stays zero down the
    model (ReLU, the pools and the sparse layers' input gradients are zero on a zero row),
    and a row of zero Σ |δ| adds nothing to a sparse layer's gradients (its backward leaves
    it out), so the backward may run on the trained rows alone: the same rows reach each
    layer's kernels, the same gradients bit for bit, without copying each layer's input
    gradient back into the batch and running the ReLU's and the pools' backward on rows of
    zeros. None too when a skipped sample's δ_L is not zero: a loss that couples the samples
    (sample n's loss reads sample m's output) sends it a gradient, backpropagated as before."""
    stats = step.stats
    batch = len(stats.trained_mask)
    if stats.trained == batch or step.couples_samples:  # (drop_skipped_rows: the batch's rows)
        return None
    mask = stats.trained_mask.tolist()  # (B,)
    skipped = list_tensor([row for row in range(batch) if not mask[row]], torch.long)
    if bool(delta.index_select(0, skipped).any()):  # a loss coupling the samples
        return None
    return list_tensor([row for row in range(batch) if mask[row]], torch.long)


def _backward(
    modules: list, inputs: list, calls: dict, delta: Tensor, trained: Tensor | None = None
) -> None:
    """From δ at the output down: each module's backward, until no module below needs δ. A
    ReLU fused with the sparse layer above it (:mod:`tinyprop.relu_fusion`) is passed over:
    the layer's backward returned δ at the ReLU's input already. ``trained``: δ holds these
    rows (R,) of the batch only (:func:`_trained_rows`), and so does each module's input
    here; None: every row."""
    position = len(modules) - 1
    while position >= 0:
        module, below = modules[position], inputs[position]
        if trained is not None:
            below = below.index_select(0, trained)  # (R, ...)
        if position in calls:
            call, trains = calls[position]
            if not trains:  # no parameter at or below it trains
                return
            relu = modules[position - 1] if position > 0 else None
            if type(relu) is ConvInputReLU and id(module) in relu.tinyprop_fused_convs:
                delta = _layer_backward(module, call, below, delta, fused_relu=True)
                position -= 1  # the ReLU's backward is done
            else:
                delta = _layer_backward(module, call, below, delta)
        else:
            delta = module_backward(module, delta, below)
        if delta is None:
            return
        position -= 1


def _layer_backward(layer, call, x: Tensor, delta: Tensor, fused_relu=False) -> Tensor | None:
    """A sparse layer's backward by :meth:`SparseBackprop.layer_backward`, its gradients set
    as autograd's accumulation sets them on ``.grad`` of None: δ at its input (with
    ``fused_relu``, at the input of the ReLU whose output x is, as the fused autograd node
    returns it), or None."""
    weight, bias = layer.weight, layer.bias
    input_grad = call.input_requires_grad
    context = types.SimpleNamespace(
        layer=layer, call=call, relu_fused=False, weight_id=id(weight), bias_id=id(bias),
        bias_dtype=None if bias is None else bias.dtype, saved_tensors=(x, weight),
        needs_input_grad=(
            input_grad, weight.requires_grad, bias is not None and bias.requires_grad,
            False, False, input_grad,  # the last: the fused ReLU's input y
        ),
    )  # fmt: skip
    geometry = None  # the call's, of the batch's rows (computed in the forward), or
    if x.shape[0] != call.rows and type(layer) is not TinyPropLinear:  # the trained rows':
        state = layer.tinyprop_state  # a convolution's geometry holds the batch size
        geometry = cached_patches_for(state.geometry_cache, layer, x.shape, weight.shape)
    relu = {"masked": False} if fused_relu else None
    grad_input, grad_weight, grad_bias, _, _ = SparseBackprop.layer_backward(
        context, delta, relu, geometry
    )
    if fused_relu and grad_input is not None and not relu["masked"]:
        grad_input = aten.threshold_backward(grad_input, relu["x"], 0)  # as SparseBackprop does
    if weight.requires_grad and grad_weight is not None:
        weight.grad = _as_accumulated(grad_weight, weight)
    if bias is not None and bias.requires_grad and grad_bias is not None:
        bias.grad = _as_accumulated(grad_bias, bias)
    return grad_input if input_grad else None


def _as_accumulated(grad: Tensor, parameter: nn.Parameter) -> Tensor:
    """``grad`` as autograd stores a first gradient: itself when its strides are the
    parameter's, else a copy with them (the same values)."""
    if grad.stride() == parameter.stride():
        return grad
    return torch.empty_like(parameter).copy_(grad)


def module_backward(module: nn.Module, delta: Tensor, below: Tensor) -> Tensor:
    """δ at the input ``below`` of a ReLU, pool, Flatten, Identity or Dropout (eval) from δ
    at its output, by the aten kernels autograd runs (ReLU's mask from its input: x > 0
    exactly where ReLU(x) > 0)."""
    if type(module) is nn.ReLU or type(module) is ConvInputReLU:
        return aten.threshold_backward(delta, below, 0)
    if type(module) is nn.MaxPool1d:  # as a 2-D pool of height 1, its indices found again
        (size,) = _single(module.kernel_size)  # an int or a tuple of one
        _, index = aten.max_pool1d_with_indices(below, [size], [size])
        return aten.max_pool2d_with_indices_backward(
            delta.unsqueeze(2), below.unsqueeze(2), [1, size], [1, size], [0, 0], [1, 1], False,
            index.unsqueeze(2),
        ).squeeze(2)  # fmt: skip
    if type(module) is nn.AvgPool1d:
        return aten.avg_pool2d_backward(
            delta.unsqueeze(2), below.unsqueeze(2), [1, *module.kernel_size],
            [1, *module.stride], [0, *module.padding], module.ceil_mode,
            module.count_include_pad, None,
        ).squeeze(2)  # fmt: skip
    return delta.reshape(below.shape)  # Flatten, Identity, Dropout in eval
