"""One training step as an explicit object, and the two ways to run it in your own loop.

- :func:`loss` makes the TinyPropv2 skip decision for a batch of per-sample losses and returns
  the scalar to backpropagate: the mean over the whole batch with skipped samples contributing
  zero. Whoever calls ``.backward()`` on it (you, ``GradScaler``, Lightning, a transformers
  ``Trainer``) runs the sparse backward of this step.
- :func:`backward` does both and returns the step's :class:`StepStats`.

While the step's backward runs, its :class:`StepContext` is the only thing the layers write
to: one immutable :class:`~tinyprop.state.BackwardRecord` per layer call, and the new running
maxima, which are written to the layers' buffers only when the whole backward succeeded.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tinyprop.autograd import SparseBackprop, check_finite, reads_are_free
from tinyprop.functional import few_cpu_rows, local_error
from tinyprop.ledger import Ledger, step_ledger
from tinyprop.loss_gradient import (
    OutputBoundary,
    is_power_of_two,
    is_row_cross_entropy,
    row_cross_entropy_gradient,
)
from tinyprop.loss_gradient import output_error as weighted_output_error
from tinyprop.model import (
    OUTPUT_ERROR_MAX,
    output_the_losses_come_from,
    state_of,
    unwrap,
    widen_running_state,
)
from tinyprop.state import BackwardRecord, ForwardPass, LayerCall

FLOAT32_LARGEST = float(torch.finfo(torch.float32).max)


class PendingCall(NamedTuple):
    """What one layer call's backward did, until the step's end makes it a
    :class:`~tinyprop.state.BackwardRecord` (k read from the device in one transfer)."""

    call: LayerCall
    keep: Tensor  # (R',) k of each row with a non-zero δ, or (R,) with 0 elsewhere (every_row)
    selected: bool  # the layer chose entries (False: dense)
    computes_input_grad: bool
    every_row: bool  # keep holds every row (the path without host reads)
    kernel: str  # which kernel computed the gradients
    keeps_all_it_can: Tensor | bool  # every row kept N_l entries or all its non-zero ones
    kept: int | None  # Σ keep when the layer knew it (Python ints), else None


@dataclass
class StepStats:
    """What one training step did.

    Attributes:
        loss: mean of the per-sample losses over the batch (all samples).
        trained: samples backpropagated.
        skipped: samples skipped by the TinyPropv2 decision (forward only).
        macs: the step's :class:`~tinyprop.Ledger` (complete once the backward has run).
        keep: layer name -> (rows,) k of each row the layer backpropagated (rows with a
            non-zero output gradient), layers in forward order.
        kernels: layer name -> the kernel that computed its gradients in this step (one of
            :data:`tinyprop.autograd.KERNELS`; the ledger counts the algorithm's MACs
            whichever ran), layers in forward order.
        trained_mask: (B,) True where the sample was trained.
        stepped: whether the optimizer stepped (set by :func:`tinyprop.train_step`).

    Example:
        >>> stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
        >>> stats.trained + stats.skipped == len(x)
        True
        >>> {name: k.float().mean().item() for name, k in stats.keep.items()}  # mean k per layer
    """

    loss: float
    trained: int
    skipped: int
    macs: Ledger = field(default_factory=Ledger)
    keep: dict[str, Tensor] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    trained_mask: Tensor | None = None
    stepped: bool = False


class StepContext:
    """The per-step state of one batch: the decision, the backward's records, new maxima."""

    def __init__(self, model: nn.Module, stats: StepStats, forward_passes: list, output_size: int):
        self.model = model
        self.state = state_of(model)
        self.stats = stats
        self.forward_passes = forward_passes
        self.output_size = output_size  # elements of δ_L per sample (the decision's Y_L)
        self.records: list = []  # BackwardRecord of every layer call, made by finish()
        self.error_unit = 1.0 / self.averaged_samples  # δ per unit of one sample's loss
        self.output_error_max: float | None = None
        self.skip_scores: Tensor | None = None  # (B,) what the skip decision ranked
        # (output, ∂ Σ losses / ∂ output) when δ_L may be taken from the decision's gradient
        # (tinyprop.loss_gradient), else None
        self.decision_gradient: tuple[Tensor, Tensor] | None = None
        self.failed = False
        self.finished = False
        self.defers_commit = False  # finish() leaves the running state's writes to commit()
        self.uncommitted = False  # finished, the running state not written yet
        # whether a NaN / inf δ reaches the gradients instead of raising: for a GradScaler,
        # which then skips the step (grad_scaler=, or None: decided when the backward starts,
        # a loss scaled above 1), and under DistributedDataParallel (every rank must finish
        # the all-reduce; tinyprop.backward then raises on every rank); False otherwise
        self.passes_overflow: bool | None = None
        self.quiet_overflow = False  # grad_scaler=, or tinyprop.backward raising after DDP
        self.distributed = False  # under DistributedDataParallel: no rank raises alone
        self.overflow_problem: str | None = None  # the first NaN / inf passed on, named
        # whether drop_skipped_rows has anything to drop: a BatchNorm in training mode couples
        # the samples (without one a skipped sample's rows hold a zero δ already, and rows that
        # are not samples must keep theirs: see tinyprop.autograd.rows_are_samples)
        self.couples_samples = any(norm.training for norm in self.state.coupling_norms)
        # the losses couple the samples (a contrastive loss): skipped rows are backpropagated
        self.loss_couples_samples = False
        # Ymax_l after this step's rows so far: a float64 () tensor, or a Python float (a few
        # rows' bookkeeping in Python floats, tinyprop.autograd.few_rows)
        self._error_max: dict[nn.Module, Tensor | float] = {}
        self._backward_calls: dict[nn.Module, int] = {}
        self._calls: list[PendingCall] = []  # what each layer call's backward did
        self._accounted_calls = 0  # how many of them the ledger holds
        self._finite_checks: list[tuple[Tensor, Tensor, str]] = []  # (all finite, Y_l, name)
        # id(weight) -> (data_ptr, version) of its gradient, proved finite (None: called twice)
        self.proven_finite: dict[int, tuple[int, int] | None] = {}
        # train_step(fused_update=True): id -> the Linear weights SGD may update from the kept
        # entries (tinyprop.fused_update), and the updates taken: (weight, x, CSR of the kept δ)
        self.fused_weights: dict[int, nn.Parameter] = {}
        self.deferred_updates: list[tuple[nn.Parameter, Tensor, Tensor, Tensor, Tensor]] = []
        # a graph-free fused step proven to be accepted before its backward: the permission
        # to step a fused weight in its layer's input-gradient walk (tinyprop.fused_walk)
        self.walks = None
        self.recomputed_pass = ForwardPass()  # calls run again by reentrant checkpointing
        # under ``full``: the forward passes the losses come from, its own and earlier steps',
        # when it has several or none of its own (None: its own passes)
        self.full_reached: list | None = None
        self._matched: set[int] = set()  # ids of the original calls of recomputed ones

    def original_call(self, call_fields: dict) -> LayerCall | None:
        """The forward call a recomputation (activation checkpointing) repeats: the layer's
        last call with the same input shape not matched yet, or None."""
        for forward_pass in reversed(self.forward_passes):
            for call in reversed(forward_pass.calls):
                same = all(
                    getattr(call, key) == call_fields[key]
                    for key in ("layer_index", "rows", "input_size")
                )
                if same and id(call) not in self._matched:
                    self._matched.add(id(call))
                    return call
        return None

    def add(
        self,
        call,
        keep: Tensor,
        selected: bool,
        computes_input_grad: bool,
        every_row: bool,
        kernel: str = "",
        limit: Tensor | None = None,
        full: bool | None = None,
        kept: int | None = None,
    ) -> None:
        """What one layer call's backward did: ``keep`` (R',) k of each row with a non-zero δ,
        or with ``every_row`` (the path without host reads) (R,) with 0 on the other rows;
        ``kernel``: which kernel computed its gradients; ``limit``: the most each row could
        keep (its non-zero entries), None: N_l; ``full``: whether every row kept its most,
        and ``kept``: Σ keep, when the caller knows them (a few rows' k in Python ints), else
        found from ``keep``."""
        if full is None:
            full = (keep >= (call.output_size if limit is None else limit)).all()  # () bool
        self._calls.append(
            PendingCall(call, keep, selected, computes_input_grad, every_row, kernel, full, kept)
        )

    def passes_overflow_on(self, layer_name: str) -> bool:
        """Whether a NaN / inf δ of ``layer_name`` goes on into the gradients (the step then
        records nothing; a GradScaler skips its optimizer step; under DistributedDataParallel
        the all-reduce takes it to every rank) rather than raising."""
        if not self.passes_overflow:
            return False
        self.pass_on(f"the output gradient of layer '{layer_name}' is NaN or infinite")
        return True

    def pass_on(self, problem: str, warn: bool = True) -> None:
        """Fail the step: ``problem`` (a NaN / inf) goes on into the gradients, with a
        warning (once) unless the caller raises it afterwards or a GradScaler handles it."""
        self.failed = True
        if self.overflow_problem is None:
            self.overflow_problem = problem
        if not warn or self.quiet_overflow or "overflow" in self.state.warned:
            return
        self.state.warned.add("overflow")
        if self.distributed:
            why = (
                "under DistributedDataParallel: it is passed on to the gradients, and through "
                "the all-reduce to every rank (a rank raising alone would leave the others "
                "waiting in the all-reduce), and tinyprop's running state is left as it was "
                "(warned once). An optimizer step would write NaN into the weights of every "
                "rank: tinyprop.backward and train_step raise FloatingPointError on every rank."
            )
        else:
            why = (
                f"under a loss scale of {self.error_unit * self.averaged_samples:g}, as "
                "when a GradScaler's scale overflows float16: it is passed on to the gradients, "
                "where the scaler finds it and skips the optimizer step, and tinyprop's running "
                "state is left as it was (warned once). Without a GradScaler, look for the NaN: "
                "tinyprop.backward(model, losses, scale=...) raises FloatingPointError instead."
            )
        warnings.warn(f"tinyprop: {problem} {why}", stacklevel=3)

    def check_finite_later(self, error: Tensor, layer_name: str) -> None:
        """Check a layer's Y_l (R,) for NaN / inf when the backward has finished (one host read
        per step instead of one per layer)."""
        self._finite_checks.append((torch.isfinite(error).all(), error, layer_name))

    def prove_finite(
        self,
        weight_id: int,
        grad_weight: Tensor,
        x: Tensor | None,
        error: Tensor | float,
        unit: float,
    ) -> None:
        """Record a layer's weight gradient as finite when a bound proves it, so that
        ``train_step`` need not read it again: each element sums δ · x over the rows and
        positions, so it is at most max |x| · Σ_rows Σ |δ| = max |x| · Σ Y_l · unit in size
        (rounding included, with a factor 4 to spare below the dtype's largest value). Only
        when reading ``x`` costs less than reading the gradient; a second call of the same
        weight in the step (its gradient is then a sum) withdraws it. ``x`` None: a bias
        gradient, Σ δ, at most Σ Y_l · unit in size (nothing to read). ``error``: the rows'
        Y_l (R',), or their sum."""
        if weight_id in self.proven_finite:
            self.proven_finite[weight_id] = None
            return
        self.proven_finite[weight_id] = None
        if x is not None and (x.numel() >= grad_weight.numel() or x.numel() == 0):
            return
        if _bounded(x, error, unit, grad_weight.dtype):
            self.proven_finite[weight_id] = (grad_weight.data_ptr(), grad_weight._version)

    def defer_update(
        self, weight_id: int, error: Tensor | float, unit: float, x: Tensor, row_start, column,
        value,
    ) -> bool:  # fmt: skip
        """Take a Linear layer's kept entries (CSR by sample) for SGD's fused update of its
        weight after the step (:func:`tinyprop.fused_update.apply_updates`), instead of its
        weight gradient: only when the bound of :meth:`prove_finite` proves that gradient
        finite (nothing then needs checking), once per weight and step."""
        weight = self.fused_weights.get(weight_id)
        if weight is None or x.numel() == 0 or not _bounded(x, error, unit, weight.dtype):
            return False
        del self.fused_weights[weight_id]
        self.deferred_updates.append((weight, x, row_start, column, value))
        return True

    def walk_update(
        self, weight_id: int, x: Tensor, row_start, column, value, relu_mask: bool
    ) -> Tensor | None:  # fmt: skip
        """A fused Linear layer's input gradient (B, in) by the one walk that also applies
        SGD's step to its weight (:meth:`tinyprop.fused_walk.Walks.walk`), when the step was
        proven accepted before its backward; None: :meth:`defer_update`'s path."""
        weight = self.fused_weights.get(weight_id)
        if self.walks is None or weight is None or x.numel() == 0 or not self.walks.pays(weight):
            return None
        del self.fused_weights[weight_id]
        return self.walks.walk(weight, x, row_start, column, value, relu_mask)

    def error_max(self, layer: nn.Module) -> Tensor:
        """Ymax_l as this step has it so far (the buffer until the step's backward wrote one)."""
        value = self._error_max.get(layer)
        if value is None:
            return layer.error_max.double()
        return torch.tensor(value, dtype=torch.float64) if isinstance(value, float) else value

    def error_max_float(self, layer: nn.Module) -> float:
        """:meth:`error_max` as a Python float (the same value: float32 and float64 buffers
        convert to float64 exactly), without a tensor operation when a few rows wrote it."""
        value = self._error_max.get(layer)
        if value is None:
            return float(layer.error_max)
        return value if isinstance(value, float) else float(value)

    def previous_output_error_max(self) -> Tensor:
        """Ymax_L before this step (the skip decision's running maximum)."""
        return getattr(self.model, OUTPUT_ERROR_MAX).double()

    def previous_output_error_max_float(self) -> float:
        """:meth:`previous_output_error_max` as a Python float (the same value)."""
        return float(getattr(self.model, OUTPUT_ERROR_MAX))

    def set_error_max(self, layer: nn.Module, value: Tensor | float) -> None:
        self._error_max[layer] = value if isinstance(value, float) else value.detach().double()

    @property
    def averaged_samples(self) -> int:
        """The step loss's denominator: the batch size B, or with ``mean_over_trained`` the
        trained samples K (at least 1)."""
        if self.state.policy.config.mean_over_trained:
            return max(self.stats.trained, 1)
        return len(self.stats.trained_mask)

    def next_backward_step(self, layer: nn.Module, read: bool) -> int | None:
        """Count a backward pass of ``layer``; its number (buffer + passes of this step) when
        ``read`` (random-k's seed), else None (nothing read on the host)."""
        calls = self._backward_calls.get(layer, 0) + 1
        self._backward_calls[layer] = calls
        return int(layer.backward_steps) + calls if read else None

    def begin_backward(self, scale: float) -> None:
        """Called when the backward reaches the step's loss; ``scale`` is its upstream gradient
        (GradScaler's factor, 1/n of gradient accumulation, 1 otherwise)."""
        self.state.step = self
        self.decision_gradient = None  # (a backward of tinyprop.loss's scalar: not taken)
        if scale != 0.0 and math.isfinite(scale):
            self.error_unit = scale / self.averaged_samples
        if self.passes_overflow is None:  # GradScaler's scales are 2^16 and so on
            self.passes_overflow = scale > 1.0 or self.distributed
        if self.overflow_problem is not None:  # a NaN loss (DDP, tinyprop.loss), found before
            if not self.passes_overflow:  # tinyprop.loss without a GradScaler
                self.state.step = None
                raise FloatingPointError(
                    f"{self.overflow_problem}; no update was applied (this backward stopped "
                    "before any gradient). Check the inputs for NaN/inf or lower the learning "
                    "rate."
                )
            self.pass_on(self.overflow_problem)
        torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        """Complete the ledger and write the new running state (after a whole backward; with
        ``defers_commit``, :meth:`commit` writes it)."""
        if self.state.step is self:
            self.state.step = None
        if self.finished:
            self._count_repeated_backward()
            return
        self.finished = True
        if not self._calls and not self.failed:  # no sparse layer of the model ran its backward
            self._check_the_backward_reached_the_model()
        if not self.failed:
            self._check_finite()  # fails the step (or raises) on a NaN / inf δ
        if self.failed:
            if self.overflow_problem is not None:  # passed on, not raised: step_stats tells
                self.state.last_stats = self.stats  # this step (its ledger empty), not the last
            return
        self.records = self._make_records(self._calls)
        self._accounted_calls = len(self._calls)
        reached = {id(record.call.forward_pass): record.call for record in self.records}
        self.state.backpropagated = [call.forward_pass for call in reached.values()]
        if self.forward_passes and not self.state.policy.sparse:
            self.state.earlier_passes = self.forward_passes
        stats = self.stats
        passes = self.forward_passes + [self.recomputed_pass]
        stats.macs = step_ledger(
            passes,
            self.records,
            self.state.policy,
            len(stats.trained_mask),
            stats.trained,
            self.output_size,
            backward_ran=bool(self.records) or (stats.trained > 0 and not self.state.policy.sparse),
            reached=None if self.full_reached is None else self.full_reached + passes[-1:],
        )
        by_call = {id(record.call): record for record in self.records}
        calls = [call for forward_pass in passes for call in forward_pass.calls]
        calls += _calls_of_earlier_passes(self.records, calls)
        for call in calls:  # forward order
            record = by_call.get(id(call))
            if record is None:
                continue
            name = call.layer_name
            stats.keep[name] = (
                record.keep
                if name not in stats.keep
                else torch.cat([stats.keep[name], record.keep])
            )
            stats.kernels[name] = record.kernel
        self.state.last_stats = stats
        self.uncommitted = True
        if not self.defers_commit:
            self.commit()

    def commit(self, repeated: tuple | None = None) -> None:
        """Write the step's new running state into the buffers: Ymax_l and the backward counts
        of the layers, Ymax_L, the score window and the budget controller. Done when the
        backward has finished, or with ``defers_commit`` by whoever set it (``train_step``,
        once the parameter gradients have passed its check: a refused step leaves the
        running state as it was without a copy of it taken every step)."""
        if not self.uncommitted:
            return
        self.state.policy.check_step(self)  # a loaded controller state of another scale
        self.uncommitted = False
        with torch.no_grad():
            for layer, value in self._error_max.items():  # float64 -> the buffer's dtype
                if isinstance(value, float) and abs(value) <= FLOAT32_LARGEST:
                    layer.error_max.fill_(value)  # rounded as copy_ rounds it
                else:  # (fill_ refuses a float past float32's range, where copy_ rounds)
                    layer.error_max.copy_(torch.as_tensor(value, dtype=torch.float64))
            counted: dict[tuple, list[Tensor]] = {}  # (calls, device) -> the buffers
            for layer, calls in self._backward_calls.items():
                buffer = layer.backward_steps
                counted.setdefault((calls, buffer.device), []).append(buffer)
            for (calls, _), buffers in counted.items():  # one dispatch for all the layers
                torch._foreach_add_(buffers, calls)
            self._backward_calls = {}  # written: a repeated backward counts on from here
            if self.output_error_max is not None:
                getattr(self.model, OUTPUT_ERROR_MAX).fill_(self.output_error_max)
            if repeated is None:
                self.state.policy.finish_step(self)  # the score window and the controller
            elif self.state.policy.budget is not None:  # a repeated backward (its ledger)
                self.state.policy.budget.finish_step(*repeated)

    def _check_the_backward_reached_the_model(self) -> None:
        """A ValueError when the step's backward trained samples but reached none of the
        model's sparse layers although its forward passes since the last step called one that
        needs a gradient (or it ran none with gradients): the losses come from another model
        (``tinyprop.backward(model_b, losses_of_model_a)``). That backward ran through the
        other model and this one recorded nothing: empty stats and ledger, silently. Called
        only when no layer call of the step ran its backward (no cost on a normal step); the
        ``full`` policy's layers run PyTorch's backward and record nothing: its steps are
        checked before the backward (:func:`_check_full_losses_reach_the_model`)."""
        if not self.stats.trained or not self.state.policy.sparse:
            return
        calls = [call for forward_pass in self.forward_passes for call in forward_pass.calls]
        if calls and not any(call.weight_trainable or call.input_requires_grad for call in calls):
            return  # every sparse layer frozen on an input without a gradient: nothing to run
        self.failed = True
        raise ValueError(
            _losses_of_another_model(
                self.forward_passes,
                calls,
                "reached none of the sparse layers",
                "this backward went through the other model (zero the gradients it added)",
            )  # fmt: skip
        )

    def _check_finite(self) -> None:
        """The deferred NaN / inf checks of the layers' Y_l: one host read for all of them."""
        if not self._finite_checks:
            return
        finite = torch.stack([flag for flag, _, _ in self._finite_checks]).cpu()
        for flag, (_, error, name) in zip(finite.tolist(), self._finite_checks, strict=True):
            if not flag:
                if self.passes_overflow_on(name):  # the gradients hold NaN: the scaler skips
                    return
                check_finite(error.cpu(), name, self)  # raises, with the rows

    def _count_repeated_backward(self) -> None:
        """Account another backward of the step's loss (``loss.backward(retain_graph=True)``
        then ``loss.backward()``): the layers ran their sparse backward again and the
        gradients are summed, as in PyTorch (TinyProp's k then follows the running maxima the
        first backward raised, as a new step on the same samples would). The step's ledger
        adds its backward, selection and dense backward (what full training's second backward
        would have done), not the forward or the skip decision, which ran once; the running
        maxima and backward counts are written again, and the budget controller accounts it.
        ``keep`` stays the first backward's. (It was not counted at all.)"""
        calls = self._calls[self._accounted_calls :]
        self._accounted_calls = len(self._calls)
        if self.failed:
            return
        self._check_finite()
        if self.failed:
            return
        records = self._make_records(calls)
        policy, stats = self.state.policy, self.stats
        passes = self.forward_passes + [self.recomputed_pass]
        batch = len(stats.trained_mask)
        ran = bool(records) or (stats.trained > 0 and not policy.sparse)
        again = step_ledger(passes, records, policy, batch, stats.trained, self.output_size, ran)
        again.forward = 0  # the forward and the skip decision ran once, in the first backward
        again.unattributed -= sum(forward_pass.other_macs for forward_pass in passes)
        again.selection -= policy.decision_macs(batch, self.output_size)
        stats.macs += again
        self.records += records
        self.uncommitted = True
        self.commit(repeated=(again, records))

    def _make_records(self, pending_calls: list[PendingCall]) -> list[BackwardRecord]:
        """One :class:`BackwardRecord` per layer call, k of the rows with a non-zero δ only;
        keeps left on a device are read in one transfer."""
        keeps = [pending.keep for pending in pending_calls]
        on_device = [keep for keep in keeps if keep.device.type != "cpu"]
        if on_device:
            moved = iter(torch.cat(on_device).cpu().split([k.numel() for k in on_device]))
            keeps = [keep if keep.device.type == "cpu" else next(moved) for keep in keeps]
        keeps = [  # (R',) the rows with a non-zero δ
            keep[keep > 0] if pending.every_row else keep
            for keep, pending in zip(keeps, pending_calls, strict=True)
        ]
        policy = self.state.policy
        records = []
        for pending, keep in zip(pending_calls, keeps, strict=True):
            call = pending.call
            total = int(keep.sum()) if pending.kept is None else pending.kept  # Σ k
            trained, kept = (keep.numel(), total) if pending.selected else (0, 0)
            selection = policy.selection_macs(trained, call.output_size, kept)
            if policy.caps_keep_at_nonzero():  # the non-zero entries of each row, counted
                selection += trained * call.output_size
            records.append(
                BackwardRecord(
                    call=call,
                    keep=keep,
                    selected=pending.selected,
                    computes_input_grad=pending.computes_input_grad,
                    selection_macs=selection,
                    kernel=pending.kernel,
                    keeps_all_it_can=bool(pending.keeps_all_it_can),
                    kept=total,
                )
            )
        return records


def _calls_of_earlier_passes(records: list, calls: list) -> list:
    """The layer calls of ``records`` that are not among the step's own ``calls``, in forward
    order: of a forward pass an earlier step took (a second loss of one forward pass after
    retain_graph=True, a micro-batch whose forward ran before the last step). Their k and
    kernel were left out of the step's ``keep`` and ``kernels``."""
    own = {id(call) for call in calls}
    earlier = [record.call for record in reversed(records) if id(record.call) not in own]
    passes = {id(call.forward_pass): order for order, call in enumerate(reversed(earlier))}
    return sorted(earlier, key=lambda call: (passes[id(call.forward_pass)], call.index))


def _bounded(x: Tensor | None, error: Tensor | float, unit: float, dtype: torch.dtype) -> bool:
    """Whether every element of a weight gradient from the input ``x`` and the rows' local
    errors ``error`` (R',) Y_l (or their sum) is finite: at most max |x| · Σ Y_l · unit in
    size, rounding included, with a factor 4 to spare below the dtype's largest value (False
    for NaN / inf). ``x`` None: a bias gradient, at most Σ Y_l · unit."""
    total = error if isinstance(error, float) else float(error.sum())  # Σ Y_l
    largest = 1.0
    if x is not None:
        low, high = (float(value) for value in torch.aminmax(x))  # NaN when x holds one
        if math.isnan(low) or math.isnan(high):
            return False
        largest = max(-low, high)  # max |x|
    return largest * total * unit < torch.finfo(dtype).max / 4


class _StepBoundary(torch.autograd.Function):
    """Identity on the step's scalar loss; its backward opens the step for the layers."""

    @staticmethod
    def forward(ctx, total: Tensor, step: StepContext) -> Tensor:
        ctx.step = step
        return total.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.step.begin_backward(float(grad))
        return grad, None


def loss(
    model: nn.Module, losses: Tensor, output: Tensor | None = None, *, sample_dim: int = 0
) -> Tensor:
    """The scalar to backpropagate for one batch, with the TinyPropv2 skip decision made.

    Equal to ``losses.mean()`` with the skipped samples' losses set to zero (the mean is over
    the whole batch; with ``mean_over_trained``, over the trained samples).
    Call ``.backward()`` on it, in any way (``scaler.scale(l).backward()``,
    Lightning, a transformers ``Trainer``): the sparse layers then run this step's policy,
    and :func:`step_stats` gives what the step did once the backward has finished.

    Args:
        model: the model given to :func:`tinyprop.apply` (or its DistributedDataParallel
            wrapper).
        losses: (B,) per-sample losses of the last forward pass(es), e.g. from
            ``nn.CrossEntropyLoss(reduction="none")``.
        output: the model output the losses come from, for the decision's output error Y_L
            (``tinypropv2`` only). By default the output of the model's last forward pass (a
            tensor, or the ``logits`` of a dict-like output; of another tuple or dict output, the
            one tensor the losses are computed from, found in their autograd graph: the
            logits, not the features they come from; a ValueError when that is ambiguous).
            Several heads whose losses are summed: a tuple, ``output=(logits_a, logits_b)``;
            Y_L is then Σ |δ_L| over all their elements, as of one output of the heads side
            by side.
        sample_dim: the dimension of ``output`` that indexes the samples (1 for
            sequence-first outputs (T, B, ...)).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: losses that are not one value per sample; an output whose sample
            dimension does not match, or that does not require grad; when the backward of
            the returned scalar ends, losses whose backward reached none of the model's
            sparse layers (they come from another model).
        FloatingPointError: a NaN or infinite loss or output error, when the backward of
            the returned scalar starts (before any gradient), unless a GradScaler scaled it:
            then the NaN goes on into the gradients and the scaler skips the step.

    Example:
        >>> optimizer.zero_grad()
        >>> losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        >>> tinyprop.loss(model, losses).backward()
        >>> optimizer.step()
    """
    return _step_loss(model, losses, output, sample_dim, scaling=None)[0]


def backward(
    model: nn.Module,
    losses: Tensor,
    output: Tensor | None = None,
    *,
    sample_dim: int = 0,
    grad_scaler=None,
    scale: float = 1.0,
    retain_graph: bool = False,
) -> StepStats:
    """Accumulate into ``.grad`` what ``losses.mean().backward()`` would under the policy.

    Skipped samples contribute zero (the mean is over the whole batch); gradients are added to
    what ``.grad`` already holds, never zeroed, and no optimizer step is taken, so gradient
    accumulation, clipping, schedulers and ``GradScaler`` work as with plain PyTorch. When
    every sample is skipped no backward runs at all (except under DistributedDataParallel,
    where every rank must join the gradient all-reduce).

    Args:
        model, losses, output, sample_dim: as for :func:`loss`.
        grad_scaler: a ``torch.amp.GradScaler``: backpropagates ``grad_scaler.scale(loss)``;
            an overflow (a NaN / inf δ, or loss: a float16 forward that overflowed) then
            reaches the gradients, where the scaler finds it and skips the step, instead of
            raising (the running state stays as it was).
        scale: multiplies the loss before the backward: ``1 / n`` makes ``n`` calls on
            batches of ``B`` samples accumulate the gradient of one batch of ``n · B``
            (gradient accumulation). As with ``GradScaler``'s factor, the policy sees the
            unscaled errors (running maxima and k do not depend on it).
        retain_graph: keep the autograd graph of the forward pass for another backward
            through it, as ``loss.backward(retain_graph=True)``: two losses of one forward
            pass, each given to its own ``tinyprop.backward`` (the last one without it).
            The second call is a step of its own that adds its backward to the ledger (the
            forward pass was counted once, by the first) and to ``.grad``; under a policy
            that skips samples (``tinypropv2``) it is a ValueError, before any backward:
            the skip decision is made once per forward pass, from the sum of its losses.

    Returns:
        :class:`StepStats` of the step (``stepped`` stays False).

    Example:
        >>> optimizer.zero_grad()
        >>> stats = tinyprop.backward(model, loss_fn(model(x), y))
        >>> optimizer.step()
    """
    if not isinstance(retain_graph, bool):
        raise TypeError(f"retain_graph must be True or False, got {retain_graph!r}")
    return run_backward(
        model, losses, output, sample_dim, grad_scaler, scale, retain_graph=retain_graph
    ).stats


def run_backward(
    model: nn.Module,
    losses: Tensor,
    output,
    sample_dim: int,
    grad_scaler,
    scale: float,
    fused_weights: dict | None = None,
    defers_commit: bool = False,
    retain_graph: bool = False,
) -> StepContext:
    """:func:`backward`, returning the whole :class:`StepContext` (``train_step`` also reads
    the gradients it proved finite, and the weight updates it deferred, from
    ``fused_weights``: id -> weight, see :mod:`tinyprop.fused_update`; with
    ``defers_commit`` it writes the running state itself: :meth:`StepContext.commit`).

    A step that skips every sample (outside DistributedDataParallel) builds no step loss
    and runs no backward: after the forward and the decision, only the ledger and the
    running state (Ymax_L, the score window, the budget controller) are updated."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number (e.g. 1 / n), got {scale!r}")
    scaling = grad_scaler is not None and grad_scaler.is_enabled()  # it checks for inf
    step = _open_step(model, losses, output, sample_dim, scaling)
    step.fused_weights = dict(fused_weights or {})
    step.defers_commit = defers_commit
    step.passes_overflow = step.quiet_overflow = scaling or step.distributed
    if not (step.stats.trained or step.distributed):
        step.finish()
        return step
    decided = step.decision_gradient
    step.decision_gradient = None
    if (
        decided is not None
        and scale == 1.0
        and grad_scaler is None
        and is_power_of_two(step.averaged_samples)
    ):  # δ_L from the decision's gradient, bit for bit (tinyprop.loss_gradient)
        output, gradient = decided
        delta = weighted_output_error(gradient, step.stats.trained_mask, step.averaged_samples)
        OutputBoundary.apply(output, step).backward(delta, retain_graph=retain_graph)
    else:
        scalar = _step_scalar(losses, step)
        if scale != 1.0:
            scalar = scalar * scale
        scaled = grad_scaler.scale(scalar) if grad_scaler is not None else scalar
        scaled.backward(retain_graph=retain_graph)
    if step.distributed and not scaling:
        _raise_on_every_rank(model, step)
    return step


def _raise_on_every_rank(model: nn.Module, step: StepContext) -> None:
    """Under DistributedDataParallel, after the backward: FloatingPointError on every rank
    when a NaN / inf reached this rank's gradients, its own (this rank's loss or δ) or another
    rank's (through the gradient all-reduce). Raised before the backward, it left the other
    ranks waiting in the all-reduce."""
    todo = "no update was applied: zero the gradients and go on with the next batch on every rank"
    if step.overflow_problem is not None:
        raise FloatingPointError(
            f"{step.overflow_problem}; under DistributedDataParallel it went on through the "
            f"gradient all-reduce, so that every rank finishes the backward and raises; {todo}"
        )
    grads = [p.grad for p in unwrap(model).parameters() if p.grad is not None]
    grads = [grad.coalesce().values() if grad.is_sparse else grad for grad in grads]
    if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
        raise FloatingPointError(
            "a parameter gradient is NaN or infinite after DistributedDataParallel's gradient "
            "all-reduce (another rank's loss or gradient was not finite, and it raises too); "
            f"{todo}"
        )


def step_stats(model: nn.Module) -> StepStats | None:
    """The :class:`StepStats` of the model's last finished step (None before the first).

    A step finishes when its backward has run: :func:`train_step` and :func:`backward`
    return these stats themselves; after ``tinyprop.loss(model, losses).backward()`` (a
    ``GradScaler``, Lightning, a transformers ``Trainer``) this is where they are. A step whose
    backward stopped on a NaN / inf under a ``GradScaler`` is returned too, its ledger empty.

    Args:
        model: the model given to :func:`tinyprop.apply` (or its DistributedDataParallel
            wrapper).

    Example:
        >>> tinyprop.loss(model, loss_fn(model(x), y)).backward()
        >>> stats = tinyprop.step_stats(model)
        >>> stats.trained, stats.skipped, stats.macs.backward_ratio()
    """
    return state_of(unwrap(model)).last_stats


def is_distributed(model: nn.Module) -> bool:
    """True for a DistributedDataParallel model (every rank must run every backward)."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def warn_without_ddp(model: nn.Module, state) -> None:
    """Warn once when torch.distributed runs several ranks but ``model`` is not wrapped in
    DistributedDataParallel, nor run inside one (a LightningModule holding it is wrapped):
    nothing would average the gradients across the ranks."""
    if is_distributed(model) or state.inside_ddp or "without ddp" in state.warned:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        state.warned.add("without ddp")
        warnings.warn(
            f"torch.distributed runs {dist.get_world_size()} ranks but the model given to "
            "tinyprop is not wrapped in DistributedDataParallel: its gradients are not "
            "averaged across the ranks and their weights will drift apart. Pass the "
            "DistributedDataParallel wrapper (tinyprop unwraps it).",
            stacklevel=4,
        )


def _step_loss(model: nn.Module, losses: Tensor, output, sample_dim: int, scaling=False):
    """The step's scalar loss (the masked mean, through the step boundary) and its context;
    ``scaling``: a GradScaler will find a NaN / inf loss in the gradients and skip the step
    (None: not known before the backward, :func:`loss`)."""
    step = _open_step(model, losses, output, sample_dim, scaling)
    return _step_scalar(losses, step), step


def _step_scalar(losses: Tensor, step: StepContext) -> Tensor:
    """The masked mean of the losses (B,), through the step boundary: a scalar."""
    weights = step.stats.trained_mask.to(losses.dtype) / step.averaged_samples  # (B,)
    return _StepBoundary.apply((losses * weights).sum(), step)


def _open_step(
    model: nn.Module,
    losses: Tensor,
    output,
    sample_dim: int,
    scaling: bool | None = False,
    from_sparse_layer: bool | None = None,
) -> StepContext:
    """The step of these losses, its skip decision made; the forward passes it takes let go of
    their output tensors afterwards (kept, each output's graph holds the step's layer calls,
    which hold their pass: a cycle through autograd's nodes that the garbage collector cannot
    break, one model output and graph kept alive per step). ``from_sparse_layer``: whether
    the output is a sparse layer's (None: found in its autograd graph; the graph-free step,
    :mod:`tinyprop.graph_free`, tells it of its leaf output)."""
    state = state_of(unwrap(model))
    pending = state.pending  # the list take_passes hands to the step
    try:
        return _decide_step(model, losses, output, sample_dim, scaling, from_sparse_layer)
    finally:
        if state.pending is not pending:  # taken by this step
            for forward_pass in pending:
                forward_pass.output = forward_pass.last_layer_output = None


def _decide_step(
    model: nn.Module,
    losses: Tensor,
    output,
    sample_dim: int,
    scaling: bool | None = False,
    from_sparse_layer: bool | None = None,
) -> StepContext:
    module = unwrap(model)
    state = state_of(module)
    warn_without_ddp(model, state)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"losses must be one loss per sample, shape (B,), got {describe(losses)}; "
            + how_to_get_per_sample_losses(losses)
        )
    if not losses.requires_grad:
        raise ValueError("losses do not require grad: compute them from the model's output")
    distributed = is_distributed(model) or state.inside_ddp
    # a NaN / inf loss or output error goes on into the gradients instead of raising: every
    # rank must join DDP's all-reduce; a GradScaler skips the step (a float16 forward that
    # overflowed, as in plain PyTorch). For tinyprop.loss (scaling None) the backward decides:
    # a loss scaled above 1 (a GradScaler) passes it on, otherwise it raises there
    passes_on = distributed or scaling is not False
    detached = losses.detach()
    if detached.dtype != torch.float32:  # (a float32 .float() is dispatched all the same)
        detached = detached.float()
    mean_loss = float(detached.mean())  # NaN / inf when any loss is
    problem = None
    if not math.isfinite(mean_loss) and not torch.isfinite(losses.detach()).all():
        bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
        problem = f"loss is NaN or infinite for samples {bad[:10]} of the batch"
        if not passes_on:
            raise FloatingPointError(
                f"{problem}; no update was applied. {_where_the_nan_is(module)}(a float16 "
                "forward that overflowed, under a GradScaler: let it see the loss, "
                "tinyprop.backward(..., grad_scaler=scaler) or "
                "scaler.scale(tinyprop.loss(...)).backward(), and it skips the step)."
            )
    state.step = None  # a step whose backward never finished is over
    widen_running_state(module)  # after model.half(): Ymax_L past 65504 would be inf
    batch = losses.shape[0]
    trained_mask = torch.ones(batch, dtype=torch.bool, device=losses.device)
    stats = StepStats(
        loss=mean_loss, trained=batch, skipped=0,
        trained_mask=trained_mask,
    )  # fmt: skip
    passes = state.take_passes()
    output_size = 0
    step = StepContext(module, stats, passes, output_size)
    step.distributed = distributed
    if problem is not None:  # DDP or a GradScaler: every sample, the NaN reaches the gradients
        step.passes_overflow = True if distributed or scaling else None  # None: at the backward
        step.pass_on(problem, warn=False)  # warned when the backward starts, if at all
        return step
    policy = state.policy
    if not policy.sparse:
        _check_full_losses_reach_the_model(module, losses, passes)
        step.full_reached = _full_reached(losses, passes, state.earlier_passes)
    if policy.skips:
        if not passes:
            _check_a_forward_pass_is_decided_once(losses, state.backpropagated)
        output_grad = None  # ∂ Σ losses / ∂ output, when the decision computed it
        heads = None  # output=(head_a, head_b): several heads, their losses summed
        if policy.skip_score == "loss":  # Selective-Backprop ranks the losses
            scores = losses.detach().double()
        else:  # TinyPropv2 ranks the output errors
            chosen = output is not None
            output = _losses_output(losses, output, passes)
            if not chosen and len(passes) > 1 and _one_loss_per_row(losses, output, sample_dim):
                _check_one_forward_pass(losses, output, passes)  # (other shapes: named later)
            elif not chosen and len(passes) > 1 and isinstance(output, Tensor):
                _name_the_forward_passes(losses, output, passes)
            if not isinstance(output, Tensor) and not passes:
                raise ValueError(
                    "the model ran no forward pass with gradients since its last step, so "
                    "the losses come from a forward pass a step used already (the same "
                    "losses given to tinyprop twice?) or from another model: run the "
                    "model's forward pass again for each step"
                )
            if chosen and _several_heads(output):
                heads = tuple(output)
            elif not isinstance(output, Tensor) and chosen:  # (it asked for the output= given)
                raise ValueError(
                    f"output= must be the model output the losses come from, one tensor or "
                    f"a tuple of tensors (several heads, their losses summed: "
                    f"output=(logits_a, logits_b)); got {describe(output)}"
                )
            if not isinstance(output, Tensor) and heads is None:
                raise ValueError(
                    "tinypropv2 needs the model output the losses come from, for the skip "
                    "decision: pass it as output=..."
                )
            state.deciding = True  # an output= before sparse layers: no step work in them
            try:
                # (B,) Y_L; ∂ Σ losses / ∂ output; whether the losses are row cross-entropy
                if heads is None:
                    scores, output_grad, row_cross_entropy = _output_error(
                        losses, output, sample_dim
                    )
                else:
                    scores, output_grad = _output_error_of_heads(losses, heads, sample_dim)
            except FloatingPointError as error:
                if not passes_on:
                    raise
                step.passes_overflow = True if distributed or scaling else None
                step.pass_on(str(error).split("; no update")[0], warn=False)
                return step
            finally:
                state.deciding = False
            step.output_size = sum(head.numel() // batch for head in heads or (output,))
            if heads is None:  # (several heads: δ_L is no one layer's, Ymax_L no one layer's)
                if from_sparse_layer is None:
                    forward_class = getattr(output.grad_fn, "_forward_cls", None)
                    from_sparse_layer = forward_class is SparseBackprop
                if (  # a CPU output straight from a sparse layer, per-sample cross-entropy
                    not distributed
                    and reads_are_free(output.device)
                    and from_sparse_layer
                    and row_cross_entropy
                ):
                    step.decision_gradient = (output, output_grad)
                if state.output_error_max_unchecked:
                    _check_loaded_output_error_max(module, state, passes, output, batch)
        step.skip_scores = scores
        trained_mask = policy.trained_mask(scores, step)  # (B,)
        if trained_mask.device != losses.device:
            trained_mask = trained_mask.to(losses.device)
        stats.trained_mask = trained_mask
        stats.trained = (  # a few CPU rows counted in Python: no sum and read dispatched
            sum(trained_mask.tolist()) if few_cpu_rows(trained_mask) else int(trained_mask.sum())
        )
        stats.skipped = batch - stats.trained
        step.error_unit = 1.0 / step.averaged_samples
        config = policy.config
        leaves_out = config.drop_skipped_rows or config.batch_norm_trained_rows
        if 0 < stats.skipped and leaves_out and step.couples_samples:
            if heads is None:
                output = _losses_output(losses, output, passes)
                _keep_rows_of_a_coupled_loss(step, losses, output, output_grad, sample_dim)
            else:  # each head's output gradient, until one shows the loss couples samples
                for head, grad in zip(heads, output_grad, strict=True):
                    if not step.loss_couples_samples:
                        _keep_rows_of_a_coupled_loss(step, losses, head, grad, sample_dim)
    return step


def _losses_of_another_model(passes: list, calls: list, reached: str, done: str) -> str:
    """The message for losses whose backward does not reach the model given to tinyprop:
    ``reached`` what it missed, ``done`` what happened to the gradients."""
    ran = (
        f"its {len(passes)} forward pass(es) since the last step called {len(calls)} sparse "
        "layer(s)"
        if calls
        else "it ran no forward pass with gradients since the last step"
    )
    return (
        f"the losses' backward {reached} of the model given to tinyprop.backward / "
        f"tinyprop.loss ({ran}): the losses come from another model, or from a forward pass "
        f"before the last step. Give tinyprop the model the losses were computed from; {done}"
    )


def _check_full_losses_reach_the_model(module: nn.Module, losses: Tensor, passes: list) -> None:
    """Under ``full`` (PyTorch's dense backward, nothing recorded by the layers): a ValueError,
    before the backward, when the losses' autograd graph reaches none of the model's
    trainable parameters although its forward passes since the last step called a sparse
    layer that needs a gradient (or it ran none): losses of another model. Its step returned
    full stats and ledger for a backward that went through the other model, silently. The
    walk is breadth first from the losses and stops at the first of the model's parameters
    (a few nodes: the output layer's), or at reentrant activation checkpointing, whose
    graph is built in the backward."""
    calls = [call for forward_pass in passes for call in forward_pass.calls]
    if calls and not any(call.weight_trainable or call.input_requires_grad for call in calls):
        return  # every sparse layer frozen on an input without a gradient: nothing to check
    trained = set().union(*(forward_pass.dense_weights for forward_pass in passes))
    if calls and trained and _reaches_a_parameter(losses.grad_fn, trained):
        return  # the weights the layer calls trained are among the parameters looked for
    parameters = {id(p) for p in module.parameters() if p.requires_grad} | trained
    if calls and not parameters:
        return  # the inputs alone need the gradient
    if _reaches_a_parameter(losses.grad_fn, parameters):
        return  # also without a forward pass since the last step: the forward passes of
        # micro-batches run first, then one tinyprop.backward each (it raised on the second)
    raise ValueError(
        _losses_of_another_model(
            passes, calls, "reaches none of the trainable parameters", "no backward ran"
        )
    )


def _full_reached(losses: Tensor, passes: list, earlier: list) -> list | None:
    """Under ``full`` (whose layers record nothing), the forward passes the losses come from,
    when the step has several forward passes or none of its own (micro-batches' forward
    passes first, then one backward each; a second loss of one forward pass after
    retain_graph=True): those of the step's passes, or else of the last step's, whose output
    the losses' autograd graph reaches. None (the step's own passes) for one pass of its own,
    or when no output is left to tell (the tensors were let go). Before, the first step
    counted the backward of every pass and a later one none: the steps' ledgers added up,
    but a second loss's backward was in none of them, though PyTorch ran it."""
    if len(passes) == 1:
        return None
    candidates = passes or earlier
    outputs = {}  # autograd node of an output tensor -> its pass (the nodes held while walking)
    for forward_pass in candidates:
        for reference in forward_pass.output_refs:
            tensor = reference()
            if tensor is not None and tensor.grad_fn is not None:
                outputs[tensor.grad_fn] = forward_pass
    if not outputs:
        return None
    found = {
        id(outputs[node])
        for node in _autograd_nodes(losses.grad_fn, lambda node: node not in outputs)
        if node in outputs
    }
    return [forward_pass for forward_pass in candidates if id(forward_pass) in found] or None


def _reaches_a_parameter(node, parameters: set[int]) -> bool:
    """Whether the autograd graph below ``node`` accumulates into one of ``parameters``
    (ids), breadth first."""
    for node in _autograd_nodes(node, lambda node: getattr(node, "variable", None) is None):
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in parameters:
            return True
        if "Checkpoint" in type(node).__name__:  # reentrant: its graph is built in the backward
            return True
    return False


def _autograd_nodes(start, descend: Callable) -> Iterator:
    """The autograd nodes reached from ``start``, breadth first, each once; the walk goes on
    below a node only where ``descend(node)`` holds."""
    seen, todo = set(), collections.deque([start])
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if descend(node):
            todo.extend(next_node for next_node, _ in node.next_functions)


def _where_the_nan_is(module: nn.Module) -> str:
    """What to check for a NaN / inf loss: the model's parameters that hold one, by name (an
    earlier step with too large a learning rate, a broken checkpoint), else the inputs. Only
    on that error: one pass over the weights."""
    broken = [
        name
        for name, parameter in module.named_parameters()
        if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all())
    ]
    if broken:
        return (
            f"The model's weights hold NaN or inf: {', '.join(broken[:5])}"
            f"{f' and {len(broken) - 5} more' if len(broken) > 5 else ''}; reload a "
            "checkpoint saved before they broke (and lower the learning rate) "
        )
    return "Check the inputs for NaN/inf or lower the learning rate "


# how far apart Ymax_L and the output layer's Ymax_l may lie (beyond the rows per sample)
# before a loaded checkpoint is refused: rounding and an in-place scaling of the output stay far
# below it, a corrupt or foreign value (1e30) far above
LOADED_MAXIMA_SLACK = 1000.0


def _check_loaded_output_error_max(
    module: nn.Module, state, passes: list[ForwardPass], output: Tensor, batch: int
) -> None:
    """Refuse a loaded Ymax_L that no run of this model can have reached, at the first skip
    decision after loading, before anything is written. When the model's output is the output
    of its last sparse layer (R rows per sample), every trained sample has Y_l ≤ Y_L ≤ R·Y_l
    there, and the sample that set Ymax_L was trained (α = 1 gives D = D_max·β ≥ τ), so
    Ymax_l ≤ Ymax_L ≤ R·Ymax_l. A finite but absurd Ymax_L (1e30) passes every check on its
    own value and skips every later sample for good, silently: here it is an error. Other
    models (something after the last sparse layer, a budget's percentile decision, an output
    layer that never trained) cannot tell, and are not checked."""
    last = passes[-1].last_layer_output if passes else None
    state.output_error_max_unchecked = False
    if last is None or state.policy.budget is not None or last[0]() is not output:
        return
    call = last[1]
    if call.rows % batch:
        return
    layer = dict(state.layers)[call.layer_name if call.layer_name != "<root>" else ""]
    output_max = float(getattr(module, OUTPUT_ERROR_MAX))
    layer_max = float(layer.error_max)
    rows = call.rows // batch  # R: rows of the output layer per sample
    if layer_max > 0 and not (
        layer_max / LOADED_MAXIMA_SLACK <= output_max <= rows * layer_max * LOADED_MAXIMA_SLACK
    ):
        state.output_error_max_unchecked = True  # refused again at the next step
        prefix = state.load_prefix or ""
        raise ValueError(
            f"the loaded running maximum '{OUTPUT_ERROR_MAX}' (Ymax_L = {output_max:.4g}) "
            f"does not fit the output layer '{call.layer_name}' (Ymax_l = {layer_max:.4g}, "
            f"{rows} row(s) per sample): in a run of this model Ymax_l <= Ymax_L <= "
            f"{rows} x Ymax_l, and with this value the skip decision would skip every sample "
            "(or none). The checkpoint is corrupt or of another model: set "
            f"'{prefix}{OUTPUT_ERROR_MAX}' to 0 (and the layers' error_max too) to restart "
            "the error statistics"
        )


def _losses_output(losses: Tensor, output, passes):
    """The output the losses come from: ``output`` when given, else the last forward pass's
    (of a tuple / dict output, the losses' one); not always a tensor."""
    if output is None:
        output = passes[-1].output if passes else None
        if isinstance(output, tuple):
            output = output_the_losses_come_from(losses, output)
    return output


def _one_loss_per_row(losses: Tensor, output, sample_dim: int) -> bool:
    """Whether ``output`` is a tensor with as many samples along ``sample_dim`` as losses."""
    if not isinstance(output, Tensor) or not -output.dim() <= sample_dim < output.dim():
        return False
    return output.shape[sample_dim] == losses.shape[0]


def _check_one_forward_pass(losses: Tensor, output: Tensor, passes: list) -> None:
    """A ValueError when the losses come from several forward passes of the model since its
    last step (two views of a batch, a consistency or distillation term of a second
    forward): the skip decision measured Y_L of the last pass's output alone and skipped
    samples by a part of their loss (a KL term near zero skipped every sample, silently).
    Walks the losses' graph down to the last output (not below it) for a sparse layer of an
    earlier pass: only when the step has several passes (an evaluation run with gradients
    is one too, and is not reached)."""
    earlier = {id(forward_pass) for forward_pass in passes[:-1]}
    stop = output.grad_fn

    def of_an_earlier_pass(node) -> bool:
        call = getattr(node, "call", None)  # a sparse layer's backward (its LayerCall)
        return isinstance(call, LayerCall) and id(call.forward_pass) in earlier

    reached_last = reached_earlier = False  # (losses of an earlier pass alone: named later)
    for node in _autograd_nodes(
        losses.grad_fn, lambda node: node is not stop and not of_an_earlier_pass(node)
    ):
        reached_last = reached_last or node is stop
        reached_earlier = reached_earlier or (node is not stop and of_an_earlier_pass(node))
        if reached_last and reached_earlier:
            break
    if reached_last and reached_earlier:
        raise ValueError(
            f"the losses come from {len(passes)} forward passes of the model since its last "
            "step (two views, a consistency or distillation term of a second forward), and "
            "tinypropv2's skip decision measures the output error Y_L of one output: the "
            "last pass's alone leaves the other losses out of it. Pass the output whose "
            "error should decide, tinyprop.backward(model, losses, output=...) (or "
            "tinyprop.loss), or give each forward pass its own losses and tinyprop.backward"
        )


def _check_a_forward_pass_is_decided_once(losses: Tensor, backpropagated: list) -> None:
    """A ValueError, before any backward, when losses of a forward pass whose backward the
    last step ran already (``tinyprop.backward(model, losses_a, retain_graph=True)`` then
    ``tinyprop.backward(model, losses_b)``) come to a policy that skips samples: a second
    decision from ``losses_b`` alone skipped other samples than one from the sum of the
    losses, against a running maximum Ymax_L of the first losses' errors (a small auxiliary
    loss skipped every sample, silently). Walks the losses' graph down to the first sparse
    layer of such a pass: only on a step without a forward pass of its own."""
    earlier = {id(forward_pass) for forward_pass in backpropagated}
    if not earlier:
        return

    def of_a_backpropagated_pass(node) -> bool:
        call = getattr(node, "call", None)  # a sparse layer's backward (its LayerCall)
        return isinstance(call, LayerCall) and id(call.forward_pass) in earlier

    nodes = _autograd_nodes(losses.grad_fn, lambda node: not of_a_backpropagated_pass(node))
    if any(of_a_backpropagated_pass(node) for node in nodes):
        raise ValueError(
            "these losses come from a forward pass whose backward the last step ran already: "
            "the same losses given to tinyprop twice (run the model's forward pass again for "
            "each step), or other losses of that forward pass after retain_graph=True. A "
            "policy that skips samples (tinypropv2) decides once per forward pass, from all "
            "of its losses (a second decision from these losses alone would skip other "
            "samples): add the per-sample losses and call tinyprop.backward once, "
            "tinyprop.backward(model, losses_a + losses_b) (no gradient was added by this call)"
        )


def _name_the_forward_passes(losses: Tensor, output: Tensor, passes: list) -> None:
    """A ValueError naming the forward passes when the losses do not fit the last pass's
    output in size (an evaluation forward run with gradients after the training forward, or
    the losses of several passes concatenated): it asked for ``sample_dim=``, which the
    output's shape did not call for."""
    if losses.shape[0] in output.shape:
        return  # a dimension of as many samples (sample_dim=): _output_error names it
    raise ValueError(
        f"there are {losses.shape[0]} losses, but the model's last forward pass gave an "
        f"output of shape {tuple(output.shape)}, and {len(passes)} forward passes ran with "
        "gradients since the last step: run evaluation forward passes under torch.no_grad(), "
        "call one tinyprop.backward per pass with its own losses (scale=1/n adds them up as "
        "one batch), or pass output= the tensor the losses come from"
    )


def _keep_rows_of_a_coupled_loss(step: StepContext, losses: Tensor, output, grad, dim) -> None:
    """Backpropagate the skipped samples' rows when the losses couple the samples (a
    contrastive or pairwise loss: loss m depends on sample n's output): their output gradient
    from the trained samples' losses is not zero, and ``drop_skipped_rows`` /
    ``batch_norm_trained_rows`` leaving them out gave the trained samples' loss a wrong
    gradient, silently. Warned once; the gradient is then the exact one. ``grad``:
    ∂ Σ losses / ∂ output when the skip decision computed it, else None."""
    if not isinstance(output, Tensor) or output.dim() == 0:
        return
    dim = dim % output.dim()
    if output.shape[dim] != losses.shape[0]:
        return
    step.state.deciding = True  # an output= before sparse layers: no step work in them
    try:
        if grad is None:
            (grad,) = torch.autograd.grad(
                losses.sum(), output, retain_graph=True, allow_unused=True
            )
        if grad is None or _loss_n_comes_from_slice_n(losses, output, grad)[dim]:
            return
    finally:
        step.state.deciding = False
    step.couples_samples = False  # no row is dropped, BatchNorm's backward is PyTorch's
    step.loss_couples_samples = True
    if "coupled loss" not in step.state.warned:
        step.state.warned.add("coupled loss")
        warnings.warn(
            "tinyprop: the per-sample losses couple the samples (loss m depends on the output "
            "of sample n, as a contrastive, triplet or InfoNCE loss does), so a skipped "
            "sample's output still gets a gradient from the trained samples' losses: its "
            "rows are backpropagated (drop_skipped_rows and batch_norm_trained_rows do not "
            "apply to such steps), which gives the exact gradient of the trained samples' "
            "loss and saves less compute (warned once)",
            stacklevel=5,
        )


def _output_error(losses: Tensor, output: Tensor, sample_dim: int) -> tuple[Tensor, Tensor, bool]:
    """Y_L of every sample: Σ |∂loss_n / ∂output_n|, (B,) float64; ∂ Σ losses / ∂ output
    (the output's shape), which the coupled-loss check reuses; and whether the losses are
    per-sample cross-entropy of the output (:func:`is_row_cross_entropy`)."""
    batch = losses.shape[0]
    if isinstance(sample_dim, bool) or not isinstance(sample_dim, int):
        raise TypeError(f"sample_dim must be an int (0, or 1 for (T, B, ...)), got {sample_dim!r}")
    if output.dim() and not -output.dim() <= sample_dim < output.dim():
        raise ValueError(
            f"sample_dim={sample_dim} is not a dimension of the output, of shape "
            f"{tuple(output.shape)}: pass the dimension that indexes the samples (0, or 1 for "
            "sequence-first outputs)"
        )
    if output.dim() == 0 or output.shape[sample_dim] != batch:
        raise ValueError(
            f"the output has shape {tuple(output.shape)} but there are {batch} losses: its "
            f"dimension {sample_dim} must index the samples (pass sample_dim=..., e.g. 1 for "
            "sequence-first outputs, or output=... the losses come from). Losses of several "
            "forward passes need one tinyprop.backward per pass (scale=1/n adds them up as "
            "one batch)"
        )
    if not output.requires_grad:  # detached, or from torch.no_grad: autograd.grad would fail
        raise ValueError(
            "the output the skip decision measures (output=, or by default the model's last "
            "forward pass's) does not require grad: it is detached (output.detach()) or was "
            "computed under torch.no_grad, so the losses cannot come from it; pass output= "
            "the tensor the losses were computed from, as it is"
        )
    row_cross_entropy = is_row_cross_entropy(losses, output)
    if row_cross_entropy and not output._backward_hooks:
        grad = row_cross_entropy_gradient(losses)  # the same, without a backward pass
    else:
        (grad,) = torch.autograd.grad(losses.sum(), output, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(
            "the losses do not depend on the output (by default the one of the model's last "
            "forward pass); pass the output they come from as output=..."
        )
    others = [
        d
        for d in range(output.dim())
        if output.shape[d] == batch and d != sample_dim % output.dim()
    ]
    if others:  # (T, B, ...) with T = B passes the shape check whichever dimension is given
        _check_sample_dim(losses, output, grad, sample_dim, others)
    # (B,) Y_L; a (B,) output (one logit per sample, squeezed for a binary loss) is (B, 1)
    by_sample = grad.detach()
    if sample_dim % grad.dim() != 0:
        by_sample = by_sample.movedim(sample_dim, 0)
    by_sample = by_sample.double()
    error = local_error(by_sample if by_sample.dim() == 2 else by_sample.reshape(batch, -1))
    # one sum finds a NaN / inf (a sum of finite Y_L past float64's range is looked at again);
    # a few CPU rows are summed in Python floats, without a sum and a read dispatched
    total = sum(error.tolist()) if few_cpu_rows(error) else float(error.sum())
    if not math.isfinite(total) and not torch.isfinite(error).all():
        bad = (~torch.isfinite(error)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"the output error is NaN or infinite for samples {bad[:10]} (the loss is finite "
            "but its gradient is not); no update was applied"
        )
    return error, grad, row_cross_entropy


def _several_heads(output) -> bool:
    """Whether ``output`` (given as output=) is a tuple or list of tensors: several heads."""
    if not isinstance(output, (tuple, list)) or not output:
        return False
    return all(isinstance(head, Tensor) for head in output)


def _output_error_of_heads(losses: Tensor, heads: tuple, sample_dim: int):
    """Y_L of every sample over several heads whose losses are summed (output=(logits_a,
    logits_b)): Σ |∂loss_n / ∂head_n| over every head's elements, the output error of the
    heads side by side as one output layer; (B,) float64, and ∂ Σ losses / ∂ head of each
    head. Each head is checked as one output is (a head the losses do not depend on, a
    sample dimension that does not fit, NaN: the same errors)."""
    errors, grads = [], []
    for head in heads:
        error, grad, _ = _output_error(losses, head, sample_dim)
        errors.append(error)
        grads.append(grad)
    return torch.stack(errors).sum(0), tuple(grads)


def _check_sample_dim(losses: Tensor, output: Tensor, grad: Tensor, sample_dim: int, others):
    """A ValueError when loss n does not come from slice n of ``output`` along ``sample_dim``
    but does along another dimension of B entries (``others``). When it comes from no single
    slice (a contrastive loss couples the samples: a (B, D) embedding with D = B), the given
    dimension stands (it raised, asking for a sample_dim no dimension could satisfy)."""
    along = _loss_n_comes_from_slice_n(losses, output, grad)
    if along[sample_dim % output.dim()] or not any(along[d] for d in others):
        return
    batch, other = losses.shape[0], next(d for d in others if along[d])
    raise ValueError(
        f"the loss of sample n does not come from slice n of the output along dimension "
        f"{sample_dim} (the output has shape {tuple(output.shape)}: dimension "
        f"{other} has {batch} entries too, e.g. a sequence-first (T, B, ...) output "
        "with T = B); pass sample_dim=... the dimension that indexes the samples (1 for "
        "sequence-first outputs), or output=... the tensor each loss comes from"
    )


def _loss_n_comes_from_slice_n(losses: Tensor, output: Tensor, grad: Tensor) -> list[bool]:
    """For each dimension d of ``output``: whether loss n comes from slice n along d alone
    (False for a dimension without B entries). ``grad`` is ∂ Σ losses / ∂ output. Weighting
    the losses by n + 1 must scale slice n of the gradient by n + 1: one more gradient of the
    loss function, by the output."""
    batch = losses.shape[0]
    weights = torch.arange(1, batch + 1, dtype=losses.dtype, device=losses.device)  # (B,)
    (weighted,) = torch.autograd.grad((losses * weights).sum(), output, retain_graph=True)
    along = []
    for dim in range(output.dim()):
        if output.shape[dim] != batch:
            along.append(False)
            continue
        scaled = grad.movedim(dim, 0).double() * weights.double().view(-1, *[1] * (grad.dim() - 1))
        got = weighted.movedim(dim, 0).double()
        tolerance = 1e-3 * float(scaled.abs().max())
        along.append(torch.allclose(got, scaled, rtol=1e-2, atol=tolerance))
    return along


def check_loss_fn_output(losses, batch_size: int) -> None:
    """ValueError unless ``loss_fn`` returned one loss per sample, shape (B,)."""
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch_size,):
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({batch_size},), got "
            f"{describe(losses)}; " + how_to_get_per_sample_losses(losses)
        )


def how_to_get_per_sample_losses(losses) -> str:
    """What to do about losses that are not one per sample: a scalar (a reduced loss), or
    (B, T, ...) losses (one per token or pixel) to reduce over all but the sample dimension,
    or no losses at all (an empty batch: it said to use reduction='none', which they had)."""
    if isinstance(losses, Tensor) and losses.dim() == 1 and losses.numel() == 0:
        return (
            "an empty batch (B = 0) has no sample to train: leave it out of the loop "
            "(if len(x) == 0: continue), no optimizer step for it"
        )
    if isinstance(losses, Tensor) and losses.dim() > 1:
        return (
            "reduce each sample's losses to one, keeping dimension 0 the samples: "
            "losses.flatten(1).mean(1), or over the tokens not labelled -100 "
            "losses.sum(1) / (labels != -100).sum(1).clamp(min=1)"
        )
    return "use reduction='none', e.g. nn.CrossEntropyLoss(reduction='none')"


def describe(value) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
