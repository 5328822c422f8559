"""Exact multiply-accumulate (MAC) accounting of a training run (``docs/algorithm.md``).

Per trainable layer l and sample, with N_l output elements, fan_in inputs per output and k_l
kept entries:

- forward: N_l · fan_in, for every sample (skipped or not);
- backward done: k_l · fan_in (weight gradient) + k_l · fan_in (input gradient, not for the first
  layer) + N_l (dense bias gradient) + input size (the previous activation's derivative, when the
  input gradient is computed), for every trained sample;
- dense backward: the same with k_l = N_l, for every sample of the batch (what full training
  would have done on the same samples);
- selection: Y_l (N_l additions) and the top-k selection (N_l comparisons) for TinyProp, N_l for
  top-k, k_l random draws for random-k, plus, for TinyPropv2, the output error Y_L of every sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tinyprop.config import TinyPropConfig


@dataclass
class Ledger:
    """MAC counts, per step (``StepStats.macs``) or accumulated with ``+=``.

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

    def __iadd__(self, other: Ledger) -> Ledger:
        self.forward += other.forward
        self.backward += other.backward
        self.backward_dense += other.backward_dense
        self.selection += other.selection
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


def layer_backward_macs(call, keep: int) -> int:
    """Backward MACs of one layer call for one sample that keeps ``keep`` output entries."""
    macs = 0
    if call.weight_trainable:
        macs += keep * call.fan_in
    if call.computes_input_grad:
        macs += keep * call.fan_in + call.input_size
    if call.has_bias:
        macs += call.output_size
    return macs


def step_ledger(
    calls: list, config: TinyPropConfig, batch_size: int, trained: int, output_size: int
) -> Ledger:
    """The ledger of one ``train_step`` from the layer calls it recorded.

    Args:
        calls: the step's ``LayerCall`` records (``keep`` set for sparse layers).
        config: the policy that ran.
        batch_size: B, samples in the batch.
        trained: samples that were backpropagated.
        output_size: elements of the model output per sample (for the skip decision's Y_L).
    """
    ledger = Ledger()
    for call in calls:
        ledger.forward += batch_size * call.output_size * call.fan_in
        ledger.backward_dense += batch_size * layer_backward_macs(call, call.output_size)
        if not trained:
            continue
        if config.policy == "full" or call.keep is None:
            ledger.backward += trained * layer_backward_macs(call, call.output_size)
            continue
        kept = int(call.keep.sum())
        # layer_backward_macs is affine in keep: sum over samples = per-sample parts + kept part
        fixed = layer_backward_macs(call, 0)
        per_keep = layer_backward_macs(call, 1) - fixed
        ledger.backward += trained * fixed + kept * per_keep
        if not call.selected:
            continue
        if config.policy == "randomk":
            ledger.selection += kept
        elif config.adaptive:
            ledger.selection += trained * 2 * call.output_size
        else:
            ledger.selection += trained * call.output_size
    if config.skips:
        ledger.selection += batch_size * output_size
    return ledger
