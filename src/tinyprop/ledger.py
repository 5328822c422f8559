"""Multiply-accumulate (MAC) accounting of a training run (see docs/algorithm.md).

Per sparse layer call and row (a sample, or a token / time step when the layer sees them as
rows), with N_l output elements, fan_in inputs per output and k_l kept entries:

- forward: N_l · fan_in, for every row (skipped or not);
- backward done: k_l · fan_in (weight gradient) + k_l · fan_in (input gradient, not for the first
  layer) + N_l (dense bias gradient) + input size (the previous activation's derivative, when the
  input gradient is computed), for every row with a non-zero δ;
  A layer whose bias alone trains and whose input needs no gradient (a first trained layer
  with a frozen weight) runs no sparse backward; its dense bias gradient, N_l per trained
  row, is counted all the same, as the C runtime counts it;
- dense backward: the same with k_l = N_l, for every row of the batch (what full training
  would have done on the same samples);
- selection: per row with a non-zero δ, Y_l (N_l additions) and the top-k selection (N_l
  comparisons) for TinyProp, N_l for top-k, k_l random draws for random-k, plus, for
  TinyPropv2, the output error Y_L of every sample (with a budget also one selection pass over
  the recent errors), for Selective-Backprop each loss's rank among the recent losses;
- modules tinyprop does not make sparse (custom layers, attention products, embeddings...):
  their forward MACs as torch's FLOP counter measures them on the first forward pass of each
  input shape, their backward as twice that (done densely for the whole batch whenever a
  backward runs), reported in ``unattributed`` as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Ledger:
    """MAC counts, per step (``StepStats.macs``) or accumulated with ``+=``.

    Multiply-accumulates as ``docs/algorithm.md`` ("How compute is counted") defines them;
    :meth:`backward_ratio` and :meth:`ratio` compare them with full training on the same samples.

    Attributes:
        forward: the forward pass's MACs (every sample, skipped ones too).
        backward: the backward work done: the sparse layers' products on the kept entries,
            the dense modules' backward, nothing for a skipped sample.
        backward_dense: the backward full training would have done on the same samples.
        selection: the policy's own work: local errors Y_l, top-k selection, skip decision.
        unattributed: MACs of the modules tinyprop keeps dense (measured with torch's FLOP
            counter); already included in ``forward``, ``backward`` and ``backward_dense``.

    Example:
        >>> total = Ledger()
        >>> total += Ledger(forward=10, backward=4, backward_dense=20, selection=1)
        >>> round(total.backward_ratio(), 2)
        0.25
    """

    forward: int = 0
    backward: int = 0  # backward work actually done
    backward_dense: int = 0  # what full training would have done on the same samples
    selection: int = 0  # local errors, top-k selection, skip decision
    # MACs of the modules tinyprop does not make sparse (counted dense, measured with torch's
    # FLOP counter); already included in forward, backward and backward_dense
    unattributed: int = 0

    def __iadd__(self, other: Ledger) -> Ledger:
        self.forward += other.forward
        self.backward += other.backward
        self.backward_dense += other.backward_dense
        self.selection += other.selection
        self.unattributed += other.unattributed
        return self

    def __add__(self, other: Ledger) -> Ledger:
        result = Ledger(**asdict(self))
        result += other
        return result

    def ratio(self) -> float:
        """Total vs full: (forward + backward + selection) / (forward + dense backward)."""
        full = self.forward + self.backward_dense
        return (self.forward + self.backward + self.selection) / full if full else 0.0

    def backward_ratio(self) -> float:
        """Backward vs full: (backward + selection) / dense backward (the headline figure)."""
        return (
            (self.backward + self.selection) / self.backward_dense if self.backward_dense else 0.0
        )

    def as_dict(self) -> dict:
        """Counts and both ratios as a plain dict."""
        return {**asdict(self), "ratio": self.ratio(), "backward_ratio": self.backward_ratio()}


def layer_backward_macs(call, keep: int, computes_input_grad: bool) -> int:
    """Backward MACs of one layer call for one row that keeps ``keep`` output entries."""
    macs = 0
    if call.weight_trainable:
        macs += keep * call.fan_in
    if computes_input_grad:
        macs += keep * call.fan_in + call.input_size
    if call.has_bias:
        macs += call.output_size
    return macs


def bias_only_backward(forward_passes: list, records: list, batch_size: int, trained: int) -> int:
    """The dense bias gradient of the calls whose bias alone trains (a first trained layer with
    a frozen weight): no sparse backward runs there, so they have no record, but autograd
    forms their bias gradient, N_l additions per trained row (every row when the rows are not
    the batch's samples). A layer run again by activation checkpointing is counted once."""
    recorded = {id(record.call) for record in records}
    calls = [call for forward_pass in forward_passes for call in forward_pass.calls]
    bias_only = [
        call
        for call in calls
        if call.has_bias
        and not call.weight_trainable
        and not call.input_requires_grad
        and id(call) not in recorded
    ]
    first_run = {call.layer_name for call in bias_only if not call.recomputed}
    macs = 0
    for call in bias_only:
        if call.recomputed and call.layer_name in first_run:
            continue
        macs += (trained if call.rows == batch_size else call.rows) * call.output_size
    return macs


def unreached_calls(forward_passes: list, records: list) -> set[int]:
    """ids of the sparse-layer calls that needed a gradient (a trainable weight, or an input
    that requires grad) but whose backward did not run although the step's backward did: their
    output never reached the losses (an auxiliary head the loss leaves out, a branch cut off by
    ``backward(inputs=...)``). Plain PyTorch does not backpropagate them either, so they are
    no part of the dense backward the step is measured against (they were: ``topk`` at ratio
    1.0 on a 6-16-3 MLP with an unused 16-2 head claimed a backward ratio of 0.80, 1.08 now,
    selection included)."""
    recorded = {id(record.call) for record in records}
    return {
        id(call)
        for forward_pass in forward_passes
        for call in forward_pass.calls
        if (call.weight_trainable or call.input_requires_grad) and id(call) not in recorded
    }


def reached_passes(forward_passes: list, records: list, backward_ran: bool) -> list:
    """The forward passes a step's backward went through: its own passes but those whose
    layer calls needed a gradient and recorded no backward (an evaluation forward run with
    gradients, a micro-batch's forward pass another step backpropagates), and the passes of
    earlier steps its records come from (a second loss of one forward pass, micro-batches
    whose forward passes ran first). ``forward_passes`` itself when that is every one of them
    and no other (the common step), and when no layer recorded (the ``full`` policy, which
    records nothing) or no backward ran (the dense reference is what full training would
    have done)."""
    if not records or not backward_ran:
        return forward_passes
    recorded = {}  # id -> pass, in record order
    for record in records:
        forward_pass = record.call.forward_pass
        recorded[id(forward_pass)] = forward_pass
    own, reached = set(), []
    for forward_pass in forward_passes:
        own.add(id(forward_pass))
        if id(forward_pass) in recorded or not _needs_gradient(forward_pass):
            reached.append(forward_pass)
    earlier = [forward_pass for key, forward_pass in recorded.items() if key not in own]
    if len(reached) == len(forward_passes) and not earlier:
        return forward_passes
    return reached + earlier


def _needs_gradient(forward_pass) -> bool:
    """Whether a layer call of the pass needed a gradient (a trainable weight or an input
    that requires grad)."""
    for call in forward_pass.calls:
        if call.weight_trainable or call.input_requires_grad:
            return True
    return False


def _add_other_backward(ledger: Ledger, forward_pass, backward_ran: bool) -> None:
    """The backward of the modules that stay dense in a pass the step's backward went
    through: about twice their forward (gradients of their inputs and of their weights),
    done for the whole batch whenever a backward runs."""
    other = forward_pass.other_macs
    ledger.backward_dense += 2 * other
    if backward_ran:
        ledger.unattributed += 2 * other
        ledger.backward += 2 * other


def step_ledger(
    forward_passes: list,
    records: list,
    policy,
    batch_size: int,
    trained: int,
    output_size: int,
    backward_ran: bool,
    reached: list | None = None,
) -> Ledger:
    """The ledger of one training step: the forward of its own passes, and the backward
    (done, and the dense reference) of the passes its backward went through.

    Args:
        forward_passes: the step's forward passes (``tinyprop.state.ForwardPass``): every
            sparse-layer call and the MACs of everything else.
        records: the ``BackwardRecord`` of every sparse-layer call whose backward ran.
        policy: the policy that ran.
        batch_size: B, samples in the batch.
        trained: samples that were backpropagated.
        output_size: elements of the output error per sample (the skip decision's Y_L).
        backward_ran: whether a backward pass ran (not when every sample was skipped).
        reached: the passes the backward went through, its own and earlier steps' (the
            ``full`` policy's, found from their outputs); None: :func:`reached_passes`.
    """
    ledger = Ledger()
    unreached = unreached_calls(forward_passes, records) if backward_ran and policy.sparse else ()
    if reached is None:
        reached = reached_passes(forward_passes, records, backward_ran)
    for forward_pass in forward_passes:
        backpropagated = reached is forward_passes or any(forward_pass is p for p in reached)
        for call in forward_pass.calls:
            if not call.recomputed:  # activation checkpointing's second forward is not counted
                ledger.forward += call.forward_macs
            if not backpropagated or id(call) in unreached:  # no backward reached it
                continue
            dense = call.rows * layer_backward_macs(
                call, call.output_size, call.input_requires_grad
            )
            ledger.backward_dense += dense
            if backward_ran and not policy.sparse:
                ledger.backward += dense
        ledger.forward += forward_pass.other_macs
        ledger.unattributed += forward_pass.other_macs
        if backpropagated:
            _add_other_backward(ledger, forward_pass, backward_ran)
    if reached is not forward_passes:  # passes an earlier step took, backpropagated by this one
        for forward_pass in reached:
            if any(forward_pass is p for p in forward_passes):
                continue
            if not policy.sparse:  # (the sparse policies' come with their records, below)
                for call in forward_pass.calls:
                    dense = call.rows * layer_backward_macs(
                        call, call.output_size, call.input_requires_grad
                    )
                    ledger.backward_dense += dense
                    ledger.backward += dense
            _add_other_backward(ledger, forward_pass, backward_ran)
    if backward_ran and policy.sparse:
        ledger.backward += bias_only_backward(forward_passes, records, batch_size, trained)
    taken = {id(call) for forward_pass in forward_passes for call in forward_pass.calls}
    for record in records:
        call = record.call
        if id(call) not in taken:  # of a forward pass an earlier step took, unreached there
            # (micro-batches' forward passes first, then one backward each): its dense
            # reference comes with its backward, else the backward ratio counted it in neither
            ledger.backward_dense += call.rows * layer_backward_macs(
                call, call.output_size, call.input_requires_grad
            )
        fixed = layer_backward_macs(call, 0, record.computes_input_grad)
        per_keep = layer_backward_macs(call, 1, record.computes_input_grad) - fixed
        kept = int(record.keep.sum()) if record.kept is None else record.kept  # Σ k
        ledger.backward += record.keep.numel() * fixed + kept * per_keep
        ledger.selection += record.selection_macs
    ledger.selection += policy.decision_macs(batch_size, output_size)  # the skip decision
    return ledger
