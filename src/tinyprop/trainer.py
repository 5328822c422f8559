"""train_step: zero the gradients, forward, :func:`tinyprop.backward`, one optimizer step."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tinyprop import graph_free
from tinyprop.fused_update import apply_updates, fold_into_gradients, fusable_weights
from tinyprop.model import main_tensor, output_the_losses_come_from, state_of, unwrap
from tinyprop.step import (
    StepContext,
    StepStats,
    check_loss_fn_output,
    describe,
    is_distributed,
    run_backward,
)


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    *,
    fused_update: bool = False,
) -> StepStats:
    """One training step with the policy given to :func:`tinyprop.apply`.

    ``zero_grad()`` of the model and of the optimizer (parameters outside the optimizer hold
    this step's gradient, never a sum over steps), the forward pass, :func:`tinyprop.backward`
    (the gradient of the mean loss over the batch, skipped samples contributing zero) and one
    optimizer step, or none at all when every sample is skipped (its state stays untouched).
    Under DistributedDataParallel the optimizer steps on every rank when any rank trained.

    Args:
        model: a model prepared by :func:`tinyprop.apply`, or its DistributedDataParallel
            wrapper.
        x: (B, ...) a batch of inputs, or a mapping of keyword inputs, each (B, ...), for
            ``model(**x)`` (a tokenizer's output: ``input_ids``, ``attention_mask``).
        y: (B, ...) targets, passed to ``loss_fn`` unchanged.
        loss_fn: ``loss_fn(output, y) -> (B,)`` per-sample losses (``output`` as the model
            returns it: a transformers ``ModelOutput`` too, whose ``logits`` the skip decision
            measures), e.g.
            ``nn.CrossEntropyLoss(reduction="none")``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        fused_update: with ``torch.optim.SGD`` (plain, or with momentum, dampening and
            nesterov; no weight decay or maximize) and the native kernels, the weights of the
            sparse Linear layers are updated from the kept entries of δ without a dense
            weight gradient: the same weights (and momentum buffers) as SGD's step, their
            ``.grad`` left None (see :mod:`tinyprop.fused_update`; other optimizers: a
            warning, and the usual step).

    Returns:
        :class:`StepStats`.

    Raises:
        ValueError: on mismatched batch sizes or a loss that is not one value per sample.
        FloatingPointError: when a loss, an output error, a layer's output gradient or a
            parameter gradient is NaN or infinite (parameters, running maxima and optimizer
            state are left untouched; the gradients are zeroed). Under DistributedDataParallel
            on every rank, after the backward's all-reduce.

    Example:
        >>> stats = train_step(model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer)
        >>> stats.loss, stats.trained, stats.macs.backward_ratio()
    """
    check_optimizer_holds_the_model(model, optimizer)  # a clear error when not applied too
    batch_size = _batch_size(x)
    if isinstance(y, Tensor) and (y.dim() == 0 or y.shape[0] != batch_size):
        raise ValueError(f"x has batch size {batch_size} but y has shape {tuple(y.shape)}")
    zero_gradients(unwrap(model), optimizer)  # also parameters outside the optimizer
    state_of(model).take_passes()  # earlier forward passes with grad (an evaluation) have no
    # backward: only this step's forward belongs to its ledger
    try:
        step = None  # a plain nn.Sequential: the same step without an autograd graph
        if graph_free.eligible(model, x):
            step = graph_free.run_step(model, x, y, loss_fn, optimizer if fused_update else None)
        if step is None:
            step = _autograd_step(model, x, y, loss_fn, optimizer, fused_update)
        stats = step.stats
        check_gradients(optimizer, step.proven_finite)
    except FloatingPointError:
        zero_gradients(unwrap(model), optimizer)
        raise
    step.commit()
    trained = stats.trained
    if in_join(model):  # ranks that ran out of data shadow DDP's collectives only: no count
        trained = 1  # every rank steps, as in plain DDP (a zero gradient when none trained)
    elif is_distributed(model):  # every rank steps when any rank trained: weights stay equal
        count = torch.tensor([trained], dtype=torch.long, device=stats.trained_mask.device)
        dist.all_reduce(count)
        trained = int(count)
    if trained:
        fold_into_gradients(step)  # a fused weight with a gradient from elsewhere too
        optimizer.step()
        apply_updates(step, optimizer)
        stats.stepped = True
    return stats


def zero_gradients(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``module.zero_grad(set_to_none=True)`` and ``optimizer.zero_grad(set_to_none=True)``:
    every gradient of the module's parameters and of the optimizer's set to None. Where
    PyTorch's own methods would run, by a walk over the modules' and groups' parameters
    itself: ``Module.parameters()`` and the optimizer's wrapper (``torch._disable_dynamo``, a
    profiler range) cost about 35 µs a step on the CPU, 2-3% of a small model's step.
    Overridden methods (``zero_grad``, ``parameters``, ``named_parameters`` and
    ``_named_members`` of the module, ``named_modules`` of a module the walk meets) are
    called as they are."""
    if not _own_methods(module, ("zero_grad", "parameters", "named_parameters", "_named_members")):
        module.zero_grad(set_to_none=True)  # (or a DataParallel replica: zero_grad warns)
    elif not _zero_module_gradients(module):
        module.zero_grad(set_to_none=True)  # a module lists its submodules its own way
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                parameter.grad = None


def _own_methods(module: nn.Module, names: tuple) -> bool:
    """Whether ``module`` runs PyTorch's own ``nn.Module`` methods ``names`` (none overridden)
    and is no DataParallel replica."""
    if module.__dict__.get("_is_replica", False):  # (without __getattr__'s AttributeError)
        return False
    kind = type(module)
    return all(getattr(kind, name) is getattr(nn.Module, name) for name in names)


def _zero_module_gradients(module: nn.Module) -> bool:
    """Set the gradient of every parameter ``module.parameters()`` yields to None, by the
    modules' ``_modules`` and ``_parameters`` (what ``Module.named_modules`` walks); False
    when a module overrides ``named_modules`` (the caller then calls ``zero_grad``)."""
    modules, seen = [module], set()
    while modules:
        current = modules.pop()
        if current is None or id(current) in seen:  # None, or met before (shared, a cycle)
            continue
        seen.add(id(current))
        if type(current).named_modules is not nn.Module.named_modules:
            return False
        for parameter in current._parameters.values():
            if parameter is not None and parameter.grad is not None:
                parameter.grad = None
        modules.extend(current._modules.values())
    return True


def _batch_size(x) -> int:
    """B of ``x``: a (B, ...) tensor, or a mapping whose tensors are all (B, ...) (keyword
    inputs; a dict or a tokenizer's BatchEncoding was refused: "x must be a non-empty batched
    tensor (B, ...), got a BatchEncoding")."""
    tensors = [v for v in x.values() if isinstance(v, Tensor)] if isinstance(x, Mapping) else [x]
    sizes = {t.shape[0] if isinstance(t, Tensor) and t.dim() > 0 else 0 for t in tensors}
    if len(sizes) != 1 or 0 in sizes:
        shapes = {k: describe(v) for k, v in x.items()} if isinstance(x, Mapping) else describe(x)
        raise ValueError(
            "x must be a non-empty batched tensor (B, ...), or a mapping of keyword inputs "
            f"whose tensors are all (B, ...) with one B; got {shapes}"
        )
    return sizes.pop()


def _autograd_step(model, x, y, loss_fn, optimizer, fused_update: bool) -> StepContext:
    """The forward with a graph and :func:`tinyprop.step.run_backward`: the step, its running
    state not committed yet."""
    batch_size = _batch_size(x)
    output = model(**x) if isinstance(x, Mapping) else model(x)
    # a transformers model's ModelOutput: its logits (loss_fn gets the whole output)
    main = output if isinstance(output, Tensor) else main_tensor(output)
    losses = None
    if isinstance(main, tuple):  # (logits, features), a dict, a dataclass: the losses tell
        losses = loss_fn(output, y)
        check_loss_fn_output(losses, batch_size)
        main = _output_of_the_losses(losses, main)
    if not isinstance(main, Tensor) or main.shape[:1] != (batch_size,):
        raise ValueError(
            f"the model must return one output tensor (B, ...) with B={batch_size}, or an "
            f"output holding its logits; got {describe(output)}. For another output, call "
            "tinyprop.backward(model, losses, output=...) in your own loop"
        )
    if losses is None:
        losses = loss_fn(output, y)
        check_loss_fn_output(losses, batch_size)
    fused = fusable_weights(unwrap(model), optimizer) if fused_update else None
    if is_distributed(model):  # the gradients go through the all-reduce
        fused = None
    # the running state is written only once the gradients passed the check (commit)
    return run_backward(model, losses, main, 0, None, 1.0, fused, defers_commit=True)


def _output_of_the_losses(losses: Tensor, candidates: tuple[Tensor, ...]) -> Tensor:
    """Of the tensors with a gradient in a tuple / dict / dataclass model output, the one the
    losses come from (the logits of ``(logits, features)``, whichever place it has); a
    ValueError naming the ways out when the losses depend on several of them (an auxiliary
    term on the features): train_step takes no ``output=``. Before, train_step refused every
    such output, even when the losses came from one of its tensors alone."""
    try:
        return output_the_losses_come_from(losses, candidates)
    except ValueError as error:
        raise ValueError(
            f"train_step: {error}. train_step takes no output=: have the model return the "
            "output the skip decision should measure alone, or in a field named 'logits', "
            "or write the step with tinyprop.backward in your own loop"
        ) from None


def check_optimizer_holds_the_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError when the optimizer holds none of the model's trainable parameters: it was
    built over another model (before ``copy.deepcopy``, a reload, or an ``apply`` to a copy),
    and train_step computed gradients that no step ever applied, silently. Checked once per
    optimizer and number of parameters (a group added is checked again)."""
    module = unwrap(model)
    state = state_of(module)
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return  # not a torch.optim optimizer: nothing to look into
    key = (id(optimizer), sum(len(group["params"]) for group in groups))
    if state.checked_optimizer == key:
        return
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    held = {id(p) for group in groups for p in group["params"]}
    if trainable and not trainable & held:
        raise ValueError(
            f"the optimizer holds none of the model's {len(trainable)} trainable parameters: "
            "it was built over another model (before copy.deepcopy, a reload or tinyprop.apply "
            "to a copy), so no step would change this model. Build it over the model given "
            "to train_step: torch.optim.SGD(model.parameters(), ...)"
        )
    state.checked_optimizer = key


def in_join(model: nn.Module) -> bool:
    """True inside ``with model.join():`` (DDP with uneven inputs across the ranks)."""
    config = getattr(model, "_join_config", None) if is_distributed(model) else None
    return bool(getattr(config, "enable", False))


def check_gradients(optimizer: torch.optim.Optimizer, proven: dict | None = None) -> None:
    """FloatingPointError when a parameter gradient holds NaN or inf (before the step).

    One sum per gradient (a single pass, threaded by torch): a NaN / inf element makes it NaN /
    inf. A sum of finite elements can overflow too, so a non-finite sum is confirmed element by
    element before the step is refused. ``proven``: id(parameter) -> (data_ptr, version) of
    gradients a sparse layer proved finite from a bound (:meth:`StepContext.prove_finite`),
    not read again when the parameter's gradient is still that tensor, unmodified.
    """
    proven = proven or {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [_values(p.grad) for p in params if p.grad is not None and not _proven(p, proven)]
    if not grads:
        return
    sums = [grad.sum(dtype=_sum_dtype(grad.dtype)) for grad in grads]
    # one stack, which promotes to a common dtype (a float32 sum is finite exactly when its
    # float64 value is: no conversion of each sum first)
    if bool(torch.stack([s.abs() if s.is_complex() else s for s in sums]).isfinite().all()):
        return
    names = {id(p): i for i, p in enumerate(params)}
    bad = [
        names[id(p)]
        for p in params
        if p.grad is not None and not bool(torch.isfinite(_values(p.grad)).all())
    ]
    if not bad:  # finite elements whose sum overflowed
        return
    raise FloatingPointError(
        f"a parameter gradient is NaN or infinite (optimizer parameters {bad[:10]}, in "
        "param_groups order) although every loss was finite; no update was applied"
    )


def _proven(parameter: nn.Parameter, proven: dict) -> bool:
    """Whether the parameter's gradient is still the tensor a layer proved finite."""
    key = proven.get(id(parameter))
    grad = parameter.grad
    return (
        key is not None and grad.layout == torch.strided and key == (grad.data_ptr(), grad._version)
    )


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 gradients are summed in float32 (their own range overflows first)."""
    if dtype in (torch.float32, torch.float64):  # without a dispatch
        return dtype
    return torch.promote_types(dtype, torch.float32)


def _values(grad: Tensor) -> Tensor:
    """The stored values of a gradient: a sparse one (``nn.Embedding(sparse=True)``) has no
    dense norm kernel."""
    return grad.coalesce().values() if grad.is_sparse else grad
