"""TinyPropConfig: the settings of every sparse-backprop policy, validated, plus named presets.

The policies are settings of one code path (see ``docs/algorithm.md``):

- ``full``: dense backprop, PyTorch's own backward (the 100% reference).
- ``topk``: meProp, a fixed ratio of output gradients kept per layer and sample.
- ``randomk``: as ``topk`` but a uniformly random subset (a control for "does top-k matter").
- ``tinyprop``: TinyProp v1, k adapts to the current local error per layer and sample.
- ``tinypropv2``: TinyProp v1 plus the per-sample decision to skip the whole training step.
- ``selective_backprop``: Selective-Backprop (Jiang et al. 2019), a baseline: each sample is
  kept with probability CDF(loss)^β over a window of recent losses, kept samples dense.

``budget`` (any policy but ``full``) replaces the knobs that set the cost by one number, the
backward ratio the run is held at (see :mod:`tinyprop.budget` and ``docs/budget.md``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

POLICIES = ("full", "topk", "randomk", "tinyprop", "tinypropv2", "selective_backprop")
LARGEST_SETTING = 1e6  # bound of d_max and beta: far above any useful value, far below overflow
DEFAULT_ZETA = 0.5  # ζ without a budget (the authors' C examples); 1.0 with a budget
LARGEST_SEED = 2**31 - 1  # seeds (plus the offsets the benchmark adds) fit every RNG's range


# the settings that are numbers: a NumPy scalar given for one becomes the Python number
_NUMBER_FIELDS = (
    "s_min", "s_max", "zeta", "ratio", "d_min", "d_max", "beta", "skip_threshold", "seed",
    "budget", "skip_split", "budget_schedule", "budget_steps",
)  # fmt: skip


@dataclass(frozen=True)
class TinyPropConfig:
    """Settings of sparse backpropagation. Defaults follow ``docs/algorithm.md``.

    Args:
        policy: one of ``full``, ``topk``, ``randomk``, ``tinyprop``, ``tinypropv2``,
            ``selective_backprop``.
        s_min: S_min, the smallest backprop ratio of TinyProp (at zero local error).
        s_max: S_max, the largest backprop ratio of TinyProp (at the largest error seen).
        zeta: ζ, damping per layer of distance d from the output: ratio times ζ^d. None
            (default) becomes 0.5 (the authors' setting) without a budget and 1.0 with one:
            under a budget, ζ = 0.5 left the early layers of deep conv nets below 1% of their
            entries while the controller raised the last layers' share (MobileNet stand-in of
            flowers102 at b = 0.2, seed 0, skipped rows kept: 23.4% with ζ = 0.5, 46.2% with
            ζ = 1, full 45.7%; see ``docs/budget.md``). The field always holds a number after
            construction (a copy made with :meth:`replace` keeps it).
        ratio: the fixed kept fraction of ``topk`` and ``randomk``.
        d_min: D_min of the TinyPropv2 decision metric D (at zero output error).
        d_max: D_max of the decision metric D (at the largest output error seen).
        beta: β, damping factor of the decision metric D (``tinypropv2``); for
            ``selective_backprop`` the exponent of CDF(loss)^β (1 keeps half the samples).
        skip_threshold: τ, a sample is skipped when D < τ (``tinypropv2`` only).
        seed: seed of the random choice of ``randomk``.

        dense_output_layer: keep the output layer (d = 0) dense, as meProp's reference code
            does. None (default) becomes False without a budget (every layer sparse, as
            ``docs/algorithm.md`` defines); with a budget it stays None, which keeps the output
            layer dense when that is cheap: when its dense backward is at most a quarter of
            the forward pass's dense backward (every classifier of the benchmark: 0.01% to
            5.2%; not the dcase2020 autoencoder, 58%), and, for a policy that trains every
            sample (``topk``, ``randomk``, ``tinyprop``), at most b / 2. A sparse output layer
            with few logits stopped learning from scratch (MLP on MNIST at b = 0.1: k/N 44% of
            10 logits, 86.88% test, dense 95.82%, full 96.06%; the digits MLP, whose output
            layer is 5.2% of its backward, 45.08% at b = 0.2 with a rule of b / 4; see
            ``docs/budget.md``).
        budget: b in (0, 1]: hold the run's backward ratio (backward + selection MACs over
            dense backward MACs, as ``Ledger.backward_ratio`` counts them) at b by adapting
            the keep ratios (and, for ``tinypropv2`` and ``selective_backprop``, the share of
            trained samples) online; ``ratio`` and ``skip_threshold`` are then not used.
            None (default): the fixed settings decide the cost.
        dense_small_layers: backpropagate densely (k = N, no selection) the layers whose
            sparse backward cannot be faster than their dense one: convolutions with a fan-in
            C_in / G · kh · kw below 64 (a first layer on one channel, depthwise and narrow
            pointwise convolutions), where selecting k entries already costs more than the
            whole dense backward (measured in ``benchmarks/speed.py``). The ledger counts
            them as dense. Off by default.
        unified: meProp's unified top-k (``topk``, ``tinyprop``, ``tinypropv2``): one set of
            kept output channels per layer call, shared by the rows it trains: the channels of
            largest Σ |δ| over the rows (and positions), ⌈mean k / P⌉ of them (P output
            positions per channel, 1 for a Linear layer on (B, in)), so the sparse backward is
            a smaller dense product. Off by default (k entries per row, chosen per row).
        skip_split: with a budget (``tinypropv2``), the share, in log, of the saving that
            skipping samples takes at the start: the trained share starts at q0 = b^skip_split
            (0: train every sample and make the layers sparser first, skipping only once the
            keep ratios cannot go lower; 1: skip first). In [0, 1].
        drop_skipped_rows: a skipped sample gets no backward in any sparse layer (its rows
            are left out of every layer's selection and gradients; layers that see one row per
            sample, R = B: a sequence layer keeps its rows, and so does a (T, B, F) layer with
            T = B; rows are left out only while a BatchNorm in training mode couples the
            samples, see ``tinyprop.autograd.rows_are_samples``). Without it, a BatchNorm
            in training mode hands skipped samples a non-zero δ (through the batch mean and
            variance) and the layers below it backpropagate them, so skipping saves nothing
            there. None (default) becomes True with a budget (ResNet-8 on the cifar10
            stand-in at b = 0.2, ζ = 1, seeds 0-2: 73.75% mean with it, 71.55% without, full
            75.88%)
            and False without one (the library's behaviour before the setting existed).
        batch_norm_trained_rows: a BatchNorm in training mode takes the means of its backward
            over the trained samples' rows only (the skipped ones' share of the gradient,
            which ``drop_skipped_rows`` leaves out, estimated by the trained ones'; see
            :mod:`tinyprop.batch_norm`); policies that skip samples only. None (default)
            becomes ``drop_skipped_rows``'s value (ResNet-8 finetuned at b = 0.2, seed 0:
            cifar100 stand-in 24.10% with it, 14.15% without, full 25.60%; see
            ``docs/budget.md``). Decided when :func:`tinyprop.apply` runs (it swaps the
            ``nn.BatchNorm1d/2d/3d`` modules' class, ``remove`` swaps them back).
        skip_zero_entries: a row keeps at most its non-zero entries of δ (k ≤ nnz): a zero
            entry adds nothing to any gradient and only costs its k · fan_in MACs (behind a
            ReLU there are many). Counting them costs N_l comparisons per row, counted as
            selection.
            Not for ``randomk`` (its entries are random by design). Off by default: with a
            budget the controller spent the saving on training more samples (MNIST MLP from
            scratch at b = 0.1, seed 0: 51% of the samples trained instead of 31%), and the
            run lost accuracy (93.16% against 95.82% without it; see ``docs/budget.md``).
        mean_over_trained: the step's loss is the mean over the trained samples,
            Σ_trained ℓ_n / K, instead of over the batch, Σ_trained ℓ_n / B (skipped samples
            count as 0), as Selective-Backprop averages over the samples it keeps: a step on K
            samples is as large as a step on B. Under SGD the step otherwise shrinks by K / B;
            Adam divides a constant factor out. The same as the batch mean when nothing is
            skipped. Off by default.
        running_max_per_batch: TinyProp's running maximum Ymax_l is taken once per step,
            so every row of a batch is measured against the largest local error up to and
            including its batch, instead of after each row in batch order (the sequential
            definition of ``docs/algorithm.md``, which the C runtime follows). Off by default.
        budget_schedule: with a budget, a in (-1, 1): spend the budget unevenly over the run,
            the step's share falling linearly from (1 + a)·b at the first step to (1 - a)·b at
            step ``budget_steps`` (a > 0: more backward early, less late; a < 0 the other way),
            so that the run's backward ratio is still b at its end; after ``budget_steps``
            steps, b. 0 (default): b at every step.
        budget_steps: T, the run's length in optimizer steps (``train_step`` calls) over
            which ``budget_schedule`` spreads the budget; needed when ``budget_schedule`` is
            not 0. None (default).

    Valid ranges, checked at construction (ValueError or TypeError naming the field):
    every float finite; 0 <= S_min <= S_max <= 1; 0 < ζ <= 1; 0 < ratio <= 1;
    0 <= D_min <= D_max <= 1e6 (τ >= 0, so a negative D_min would only move where D crosses τ,
    which τ itself sets); 0 < β <= 1e6; 0 <= τ <= D_max·β, the largest value D reaches (a
    larger τ would skip every sample); 0 <= seed <= 2^31 - 1.

    Example:
        >>> cfg = TinyPropConfig(policy="topk", ratio=0.05)
        >>> cfg.replace(ratio=0.1).ratio
        0.1
    """

    policy: str = "tinypropv2"
    s_min: float = 0.1  # S_min: backprop ratio at zero local error
    s_max: float = 0.9  # S_max: backprop ratio at the largest local error seen so far
    zeta: float | None = None  # ζ: per-layer damping, ratio · ζ^d; None: 0.5, or 1 with a budget
    ratio: float = 0.1  # fixed kept fraction for topk / randomk
    d_min: float = 0.0  # D_min of the skip decision metric
    d_max: float = 1.0  # D_max of the skip decision metric
    beta: float = 1.0  # β: damping of the skip decision metric
    skip_threshold: float = 0.5  # τ: skip the sample when D < τ
    seed: int = 0  # randomk's random stream
    dense_output_layer: bool | None = None  # dense output layer; None: False, or if cheap (budget)
    budget: float | None = None  # b: the backward ratio held over the run (tinyprop.budget)
    dense_small_layers: bool = False  # dense backward where sparse cannot be faster
    unified: bool = False  # one kept index set per layer call, shared by its rows (meProp)
    skip_split: float = 0.5  # with a budget: q0 = b^skip_split, the trained share at the start
    drop_skipped_rows: bool | None = None  # skipped samples: no backward; None: True with a budget
    skip_zero_entries: bool = False  # a row keeps at most its non-zero entries of δ
    batch_norm_trained_rows: bool | None = None  # BatchNorm's backward means over trained rows
    mean_over_trained: bool = False  # the step's loss: mean over the trained samples, not B
    running_max_per_batch: bool = False  # Ymax_l once per batch, not after each row
    budget_schedule: float = 0.0  # a: step budget from (1 + a) b down to (1 - a) b over T steps
    budget_steps: int | None = None  # T: the run's optimizer steps (for budget_schedule)

    def __post_init__(self) -> None:
        for name in _NUMBER_FIELDS:  # NumPy scalars (a sweep over np.linspace) as Python ones
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and type(value).__module__ == "numpy":
                plain = int(value) if isinstance(value, numbers.Integral) else float(value)
                object.__setattr__(self, name, plain)
        if self.zeta is None:  # the defaults depend on whether a budget is set
            object.__setattr__(self, "zeta", DEFAULT_ZETA if self.budget is None else 1.0)
        if self.drop_skipped_rows is None:
            object.__setattr__(self, "drop_skipped_rows", self.budget is not None)
        if self.batch_norm_trained_rows is None and isinstance(self.drop_skipped_rows, bool):
            object.__setattr__(self, "batch_norm_trained_rows", self.drop_skipped_rows)
        if self.dense_output_layer is None and self.budget is None:
            object.__setattr__(self, "dense_output_layer", False)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in (
            "s_min",
            "s_max",
            "zeta",
            "ratio",
            "d_min",
            "d_max",
            "beta",
            "skip_threshold",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not 0.0 <= self.s_min <= 1.0 or not 0.0 <= self.s_max <= 1.0:
            raise ValueError(
                f"s_min and s_max must lie in [0, 1], got s_min={self.s_min}, s_max={self.s_max}"
            )
        if self.s_min > self.s_max:
            raise ValueError(
                f"s_min ({self.s_min}) must not exceed s_max ({self.s_max}); swap them"
            )
        if not 0.0 < self.zeta <= 1.0:
            raise ValueError(f"zeta must lie in (0, 1], got {self.zeta}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio}; 1.0 keeps everything")
        if not 0.0 <= self.d_min <= self.d_max <= LARGEST_SETTING:
            raise ValueError(
                f"d_min and d_max must satisfy 0 <= d_min <= d_max <= {LARGEST_SETTING:g}, got "
                f"d_min={self.d_min}, d_max={self.d_max}"
            )
        if not 0.0 < self.beta <= LARGEST_SETTING:
            raise ValueError(
                f"beta must be positive and at most {LARGEST_SETTING:g}, got {self.beta}"
            )
        if self.skip_threshold < 0.0:
            raise ValueError(
                f"skip_threshold must be >= 0, got {self.skip_threshold}; 0 never skips"
            )
        largest_metric = self.d_max * self.beta  # D at the largest output error seen
        if self.skip_threshold > largest_metric:
            raise ValueError(
                f"skip_threshold τ={self.skip_threshold} exceeds the largest decision metric D "
                f"can reach, d_max·beta = {largest_metric:g}: every sample would be skipped; "
                f"choose τ <= {largest_metric:g} (or raise d_max or beta)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= LARGEST_SEED:
            raise ValueError(f"seed must lie in [0, {LARGEST_SEED}], got {self.seed}")
        self._check_budget()
        self._check_budget_schedule()
        if isinstance(self.skip_split, bool) or not isinstance(self.skip_split, (int, float)):
            raise TypeError(f"skip_split must be a number in [0, 1], got {self.skip_split!r}")
        if not 0.0 <= self.skip_split <= 1.0:
            raise ValueError(f"skip_split must lie in [0, 1], got {self.skip_split}")
        for name in (
            "dense_small_layers", "unified", "drop_skipped_rows", "skip_zero_entries",
            "batch_norm_trained_rows", "mean_over_trained", "running_max_per_batch",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.unified and self.policy not in ("topk", "tinyprop", "tinypropv2"):
            raise ValueError(
                f"unified applies to topk, tinyprop and tinypropv2, not {self.policy!r}"
            )
        if not isinstance(self.dense_output_layer, bool) and not (
            self.dense_output_layer is None and self.budget is not None
        ):
            raise TypeError(
                f"dense_output_layer must be True or False (or None with a budget: dense when "
                f"cheap), got {self.dense_output_layer!r}"
            )

    def _check_budget(self) -> None:
        budget = self.budget
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be a number in (0, 1] or None, got {budget!r}")
        if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
            raise ValueError(
                f"budget must lie in (0, 1] (the share of full training's backward compute, "
                f"e.g. 0.1), got {budget}"
            )
        if self.policy == "full":
            raise ValueError(
                "the full policy has no budget (it is the 100% reference); choose topk, "
                "randomk, tinyprop, tinypropv2 or selective_backprop, or drop budget"
            )

    def _check_budget_schedule(self) -> None:
        schedule, steps = self.budget_schedule, self.budget_steps
        if isinstance(schedule, bool) or not isinstance(schedule, (int, float)):
            raise TypeError(f"budget_schedule must be a number in (-1, 1), got {schedule!r}")
        if not -1.0 < schedule < 1.0:  # NaN fails too
            raise ValueError(
                f"budget_schedule must lie in (-1, 1) (0: the same budget at every step), got "
                f"{schedule}"
            )
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"budget_steps must be a positive int or None, got {steps!r}")
        if schedule == 0.0:
            return
        if self.budget is None:
            raise ValueError(
                f"budget_schedule={schedule} spreads a budget over the run: set budget too "
                "(e.g. budget=0.2), or budget_schedule=0"
            )
        if steps is None:
            raise ValueError(
                f"budget_schedule={schedule} needs the run's length: set budget_steps to the "
                "number of train_step calls of the run (epochs x batches per epoch)"
            )
        if (1.0 + abs(schedule)) * self.budget > 1.0:
            raise ValueError(
                f"budget_schedule={schedule} would ask for (1 + |a|)·b = "
                f"{(1 + abs(schedule)) * self.budget:g} of full's backward at one end of the "
                f"run, more than full; choose |budget_schedule| <= {1 / self.budget - 1:g}"
            )

    @property
    def adaptive(self) -> bool:
        """True when k follows the local error (TinyProp v1 and v2)."""
        return self.policy in ("tinyprop", "tinypropv2")

    @property
    def skips(self) -> bool:
        """True when whole samples may be skipped (TinyPropv2, Selective-Backprop)."""
        return self.policy in ("tinypropv2", "selective_backprop")

    def replace(self, **changes) -> TinyPropConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The fields as a plain dict (for result records)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, TinyPropConfig] = {
    "full": TinyPropConfig(policy="full"),
    "meprop": TinyPropConfig(policy="topk", ratio=0.1, dense_output_layer=True),
    "randomk": TinyPropConfig(policy="randomk", ratio=0.1),
    # the defaults of the authors' C examples
    "tinyprop": TinyPropConfig(policy="tinyprop", s_min=0.1, s_max=0.9, zeta=0.5),
    # the settings of the authors' PyTorch notebook
    "tinyprop-notebook": TinyPropConfig(policy="tinyprop", s_min=0.0, s_max=1.0, zeta=1.0),
    "tinypropv2": TinyPropConfig(policy="tinypropv2"),
}


def preset(name: str) -> TinyPropConfig:
    """The configuration of one of the paper's policies by name (:data:`PRESETS`).

    ``full`` (dense training), ``meprop`` (top-k, ratio 0.1, dense output layer, as meProp's
    code), ``randomk`` (ratio 0.1), ``tinyprop`` (TinyProp v1: S_min 0.1, S_max 0.9, ζ 0.5,
    the authors' C examples), ``tinyprop-notebook`` (S_min 0, S_max 1, ζ 1, the authors'
    PyTorch notebook) and ``tinypropv2`` (``TinyPropConfig()``'s defaults). The configs are
    frozen: change a setting with :meth:`TinyPropConfig.replace`.

    Args:
        name: one of the keys of :data:`PRESETS`; a ValueError naming them otherwise.

    Example:
        >>> preset("meprop").ratio
        0.1
        >>> preset("meprop").replace(ratio=0.05).dense_output_layer
        True
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
