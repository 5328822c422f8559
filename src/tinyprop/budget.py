"""Say the budget: hold a run's backward ratio at a stated share of full training's.

``TinyPropConfig(policy=..., budget=b)`` replaces the settings that fix the cost (``ratio``,
``skip_threshold``) by one number b, the backward ratio of the run as
:meth:`tinyprop.Ledger.backward_ratio` counts it: (backward + selection MACs) / dense backward
MACs. The policy still decides per sample and per layer *where* the compute goes (TinyProp's k
follows each layer's local error, TinyPropv2 trains the samples with the largest output error);
the controller decides *how much*, from what the ledger measured after every step. No setting
depends on the dataset.

Symbols (one step = one :class:`tinyprop.step.StepContext`):

- b: the budget. S, D: the run's spent (backward + selection) and dense backward MACs so far;
  R = S / D the run's backward ratio; n the finished steps.
- r* = b + (b - R) · n / H: the step ratio that pays R's deviation from b back within H steps
  (:func:`tinyprop.functional.budget_step_target`), limited to [b / 4, min(1, 4 b)]. With a
  schedule (``budget_schedule`` a, ``budget_steps`` T) b is the next step's budget
  b (1 + a (1 - 2 t / T)) and R is paid back to the run's budget so far, b (1 + a (1 - n / T)),
  which is b at n = T (:func:`tinyprop.functional.scheduled_budget`).
- r̃ = Ŝ / D̂: the measured step ratio, with Ŝ, D̂ exponential averages (factor λ) of the
  steps' spent and dense MACs (a step that skipped every sample has Ŝ += 0).
- the integral law on the log cost: Δ = η · (log r* - log r̃), limited to ±log 2 per step (a
  run of steps that trained no sample has r̃ near 0 and would otherwise wind c up by orders
  of magnitude: finetune har, batches of 8, at b = 0.1 reached 13.1% instead of 10%), shared
  by split range
  (:func:`tinyprop.functional.split_range`) between two actuators:

  - c = exp(u_k), the keep scale: TinyProp's bpr_l = (S_min + α (S_max - S_min)) ζ^d · c
    (k at most N_l); top-k / random-k keep the ratio c. Starts at the ratio left per trained
    sample, (b / q0) / ((S_min + S_max) / 2) for TinyProp, b for top-k.
  - q = q0 · exp(u_q), the trained share (``tinypropv2``, ``selective_backprop``): TinyPropv2
    trains the samples whose output error Y_L is at least the (1 - q) quantile of the last W
    samples' (and the batch's own; D is increasing in Y_L, so this is the skip decision with
    τ set by a percentile, as Selective-Backprop does with losses); Selective-Backprop uses
    β = 1 / q - 1. q0 = √b for TinyPropv2 (the budget split evenly, in log, between skipping
    and sparsity), b for Selective-Backprop (its kept samples are dense).

  A decrease lowers c to its floor first, then q; an increase restores q to q0, then raises c,
  then q. c's floor and cap are also where it stops having an effect: when every kept row of
  the step kept 1 entry (or all N_l), c is not moved further down (up). A step that trained
  no sample moves neither c nor q above q0 (neither had an effect there; with small batches
  such steps came in runs and wound c up, finetune har at b = 0.1 reached 13.1%).

Constants: W = 256 scores, H = 20 steps, λ = 0.5, η = 0.5 (chosen once on a toy stream and
checked on the benchmark datasets, never per dataset; see ``docs/budget.md``).

Every number the controller remembers is a buffer of the root module (``tinyprop_budget_*``,
``tinyprop_score_window*``), so ``state_dict`` / ``load_state_dict`` resume a run exactly. The
buffers change only when a step's backward finished (:meth:`BudgetController.finish_step`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tinyprop.functional import budget_step_target, scheduled_budget, split_range
from tinyprop.ledger import layer_backward_macs

WINDOW = 256  # W: recent skip scores (output errors or losses) the percentile looks at
HORIZON = 20  # H: steps over which the run ratio's deviation from b is paid back
SMOOTHING = 0.5  # λ: weight of the past in the measured step ratio r̃
GAIN = 0.5  # η: integral gain on the log cost
LARGEST_CHANGE = math.log(2)  # |Δ| per step: c and q at most double or halve in one step
CHEAP_OUTPUT_SHARE = 0.25  # the output layer is dense when it is <= 1/4 of the dense backward
# what a checkpoint's controller state may hold (anything beyond is refused when it is loaded)
LARGEST_COUNT = 2**62  # a MAC count near int64's limit overflows the buffers within steps
LARGEST_RUN_RATIO = 1e6  # S / D: no step spends more than a few hundred times its dense
# backward (a Selective-Backprop decision over W + B losses on a layer of one weight)
LARGEST_STEP_SCALE = 2**16  # the checkpoint's dense MACs per step over the first step's after
# it was loaded: a batch or input 65,536 times smaller than the run's (a checkpoint scaled by
# 1e9 froze R, and the run spent b / 4 from then on)
DECISION_ALLOWANCE = 16  # the skip decision's share of a step, times this, bounds R (inputs
# of another size than the first step's after loading)


def is_cheap_output_layer(call, budget: float, skips: bool) -> bool:
    """Whether the output layer call's dense backward is at most ``CHEAP_OUTPUT_SHARE`` of its
    forward pass's dense backward (sparse layers and the dense modules between them) and, for
    a policy that trains every sample (``skips`` False), at most b / 2 (so that the other
    layers keep half the budget; a policy that skips samples meets b by skipping more).
    Depends on the shapes only, so a resumed run decides the same."""
    forward_pass = call.forward_pass

    def dense(each) -> int:
        return each.rows * layer_backward_macs(each, each.output_size, each.input_requires_grad)

    whole = sum(dense(each) for each in forward_pass.calls) + 2 * forward_pass.other_macs
    limit = CHEAP_OUTPUT_SHARE if skips else min(CHEAP_OUTPUT_SHARE, budget / 2)
    return dense(call) <= limit * whole


RESTART_CONTROLLER = (
    "delete its tinyprop_budget_* and tinyprop_score_window* entries to start the budget "
    "controller afresh"
)


def check_count(value, name: str, fix: str = RESTART_CONTROLLER) -> int | None:
    """A checkpoint's count (steps, MACs) must be a whole number in [0, 2^62]; returns it
    (None for an entry that is missing or not one number: load_state_dict names those).
    ``fix``: what to do about a bad one."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        return None
    number = float(value)
    if not (0 <= number <= LARGEST_COUNT and number == int(number)):  # NaN fails too
        raise ValueError(
            f"checkpoint entry '{name}' is {number}: a count must be a whole number in [0, "
            f"2^62] (a float 1e30 became a negative count in the int64 buffer); the checkpoint "
            f"is corrupt: {fix}"
        )
    return int(number)


class ScoreWindow:
    """The last W skip scores, oldest first, NaN where empty; and how many steps pushed."""

    VALUES = "tinyprop_score_window"
    STEPS = "tinyprop_score_window_steps"

    def __init__(self, root: nn.Module):
        self._root = root  # a plain reference: the model pickles and deep-copies with it

    @classmethod
    def initial_buffers(cls) -> dict[str, Tensor]:
        return {
            cls.VALUES: torch.full((WINDOW,), math.nan, dtype=torch.float64),
            cls.STEPS: torch.zeros((), dtype=torch.long),
        }

    @property
    def values(self) -> Tensor:
        """(W,) the recent scores (NaN where empty)."""
        return getattr(self._root, self.VALUES)

    @property
    def steps(self) -> int:
        return int(getattr(self._root, self.STEPS))

    @classmethod
    def check_loaded(cls, state_dict: dict, prefix: str) -> None:
        """Refuse a checkpoint whose window holds an infinite score (NaN marks an empty slot)
        or whose step count is negative."""
        values, steps = state_dict.get(prefix + cls.VALUES), state_dict.get(prefix + cls.STEPS)
        if isinstance(values, Tensor) and bool(torch.isinf(values).any()):
            raise ValueError(f"checkpoint entry '{prefix + cls.VALUES}' holds an infinite score")
        check_count(steps, prefix + cls.STEPS)

    def push(self, scores: Tensor) -> None:
        """Append a batch's (B,) scores, dropping the oldest."""
        values = self.values
        recent = torch.cat([values, scores.detach().to(values)])[-WINDOW:]  # (W,)
        values.copy_(recent)
        getattr(self._root, self.STEPS).add_(1)


class BudgetController:
    """The controller of one run (see the module docstring for the symbols).

    Args:
        root: the model given to :func:`tinyprop.apply` (holds the buffers).
        budget: b.
        keep_start: c at the start.
        keep_limits: (smallest, largest) c; equal for a policy without a keep scale.
        train_start: q0.
        train_limits: (smallest, largest) q; both q0 for a policy that trains every sample.
        schedule: a, the budget's tilt over the run (0: b at every step).
        total_steps: T, the run's steps over which ``schedule`` spreads the budget.
    """

    SPENT = "tinyprop_budget_spent"  # S
    DENSE = "tinyprop_budget_dense"  # D
    STEPS = "tinyprop_budget_steps"  # n
    SMOOTHED_SPENT = "tinyprop_budget_smoothed_spent"  # Ŝ
    SMOOTHED_DENSE = "tinyprop_budget_smoothed_dense"  # D̂
    LOG_KEEP_SCALE = "tinyprop_budget_log_keep_scale"  # u_k = log c
    LOG_TRAINED_SHARE = "tinyprop_budget_log_trained_share"  # u_q = log(q / q0)
    CHECK = "tinyprop_budget_check"  # a check value of the five counts (count_check)
    COUNTS = (SPENT, DENSE, STEPS, SMOOTHED_SPENT, SMOOTHED_DENSE)
    NAMES = (*COUNTS, LOG_KEEP_SCALE, LOG_TRAINED_SHARE, CHECK)

    def __init__(
        self,
        root: nn.Module,
        budget: float,
        keep_start: float,
        keep_limits: tuple[float, float],
        train_start: float,
        train_limits: tuple[float, float],
        schedule: float = 0.0,
        total_steps: int | None = None,
    ):
        self._root = root
        self.budget = budget
        self.schedule = schedule
        self.total_steps = total_steps
        self.unchecked_scale = False  # a checkpoint's counts loaded, not yet met a step
        self.keep_start = keep_start
        self.keep_limits = (math.log(keep_limits[0]), math.log(keep_limits[1]))
        self.train_start = train_start
        self.train_limits = (
            math.log(train_limits[0] / train_start),
            math.log(train_limits[1] / train_start),
        )

    def initial_buffers(self) -> dict[str, Tensor]:
        count = {"dtype": torch.long}  # MAC counts stay exact (and out of model.half())
        return {
            self.SPENT: torch.zeros((), **count),
            self.DENSE: torch.zeros((), **count),
            self.STEPS: torch.zeros((), **count),
            self.SMOOTHED_SPENT: torch.zeros((), **count),
            self.SMOOTHED_DENSE: torch.zeros((), **count),
            self.LOG_KEEP_SCALE: torch.tensor(math.log(self.keep_start), dtype=torch.float64),
            self.LOG_TRAINED_SHARE: torch.zeros((), dtype=torch.float64),
            self.CHECK: torch.zeros((), **count),  # count_check of five zeros
        }

    def _buffer(self, name: str) -> Tensor:
        return getattr(self._root, name)

    def check_loaded(self, state_dict: dict, prefix: str) -> None:
        """Refuse a checkpoint whose counts are negative, not whole, or do not fit together
        (:meth:`check_counts`), or whose log c, log(q / q0) lie outside the controller's
        limits (NaN, infinite or huge: the step would fail or silently train nothing). The
        counts' scale is checked against this model at the first step (:meth:`check_step`)."""
        counts = [check_count(state_dict.get(prefix + name), prefix + name) for name in self.COUNTS]
        if None not in counts:
            self._check_value(state_dict.get(prefix + self.CHECK), counts, prefix)
            self.check_counts(*counts, prefix)
            self.unchecked_scale = True
        for name, (low, high) in (
            (self.LOG_KEEP_SCALE, self.keep_limits),
            (self.LOG_TRAINED_SHARE, self.train_limits),
        ):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.numel() == 1:
                number = float(value)
                if not low - 1e-9 <= number <= high + 1e-9:  # NaN fails too
                    raise ValueError(
                        f"checkpoint entry '{prefix + name}' is {number}, outside the budget "
                        f"controller's limits [{low:.4g}, {high:.4g}] for this policy and budget "
                        "(the checkpoint is corrupt, or was saved with another policy or budget, "
                        "whose controller state does not carry over: delete its "
                        "tinyprop_budget_* entries to start the controller afresh)"
                    )

    def _check_value(self, value, counts: list[int], prefix: str) -> None:
        """Refuse counts that do not give the checkpoint's check value (:func:`count_check`,
        written with the counts at every step): one of them was changed after it was saved
        (a count x 10 passes every other check). A checkpoint without one (saved before the
        check value existed) is taken as it is: :meth:`accept_without_check`."""
        if not isinstance(value, Tensor) or value.numel() != 1:
            return
        if value.is_floating_point() or int(value) != count_check(counts):
            names = ", ".join(f"{prefix}{name} = {count}" for name, count in zip(
                self.COUNTS, counts, strict=True))  # fmt: skip
            raise ValueError(
                f"checkpoint entries '{prefix}tinyprop_budget_*' do not give their check value "
                f"'{prefix}{self.CHECK}' ({names}): one of them was changed after the "
                f"checkpoint was saved; the checkpoint is corrupt: {RESTART_CONTROLLER}"
            )

    def accept_without_check(self, missing: list[str], prefix: str) -> None:
        """A checkpoint saved before the check value existed (its counts loaded, the check
        value missing): loads, strict, with the check value computed from its counts (which
        passed every other check)."""
        entry = prefix + self.CHECK
        if entry not in missing or any(prefix + name in missing for name in self.COUNTS):
            return
        missing.remove(entry)
        with torch.no_grad():
            self._buffer(self.CHECK).fill_(self._count_check())

    def _count_check(self) -> int:
        return count_check([int(self._buffer(name)) for name in self.COUNTS])

    def check_counts(
        self, spent: int, dense: int, steps: int, smoothed_spent: int, smoothed_dense: int, prefix
    ) -> None:
        """Refuse counts no run can reach: S, D, Ŝ, D̂ above 0 after n = 0 steps; D < n (each
        step counts at least one dense MAC); Ŝ > S or D̂ > D (an average of the steps' counts
        is at most their sum); R = S / D above ``LARGEST_RUN_RATIO``."""
        if steps == 0 and spent + dense + smoothed_spent + smoothed_dense > 0:
            problem = f"{self.STEPS} is 0, yet the MAC counts are not"
        elif dense < steps:
            problem = f"{self.DENSE} ({dense}) is below {self.STEPS} ({steps})"
        elif smoothed_spent > spent or smoothed_dense > dense:
            problem = "a smoothed count (the average of a step) exceeds the run's total"
        elif spent > LARGEST_RUN_RATIO * dense:
            problem = f"the run's backward ratio {self.SPENT} / {self.DENSE} is {spent / dense:.3g}"
        else:
            return
        raise ValueError(
            f"checkpoint entries '{prefix}tinyprop_budget_*' do not fit together: {problem}; "
            "the checkpoint is corrupt: delete its tinyprop_budget_* entries to start the "
            "budget controller afresh"
        )

    def check_step(self, ledger, decision_per_sample: float, batch_size: int) -> None:
        """At the first step after a checkpoint was loaded, refuse its counts when they do not
        fit this model: its dense MACs per step (D / n, or D̂) above ``LARGEST_STEP_SCALE``
        times this step's, or its run ratio R = S / D above what a step can spend: the whole
        dense backward (k = N_l), twice that in selection, and the skip decision, taken
        ``DECISION_ALLOWANCE`` times over (``decision_per_sample``: its largest MACs per
        sample at any batch size, over this step's dense MACs per sample). Such counts outweigh
        every later step or hold R far from b: the controller then spends b / 4 (or its cap)
        for good."""
        dense = ledger.backward_dense
        if not self.unchecked_scale or dense <= 0:
            return
        steps = int(self._buffer(self.STEPS))
        per_step = max(
            int(self._buffer(self.DENSE)) / max(steps, 1), int(self._buffer(self.SMOOTHED_DENSE))
        )
        largest_ratio = 3 + DECISION_ALLOWANCE * decision_per_sample / (dense / batch_size)
        if per_step > LARGEST_STEP_SCALE * dense:
            problem = (
                f"counts {per_step:.4g} dense backward MACs per step ({self.DENSE} over "
                f"{self.STEPS}, or {self.SMOOTHED_DENSE}), {per_step / dense:.3g} times this "
                f"step's {dense}"
            )
        elif self.run_ratio > largest_ratio:
            problem = (
                f"has a run ratio {self.SPENT} / {self.DENSE} of {self.run_ratio:.4g}, more "
                f"than this model can spend ({largest_ratio:.3g} at most)"
            )
        else:
            self.unchecked_scale = False
            return
        raise ValueError(
            f"the budget controller state loaded from the checkpoint {problem}: the checkpoint "
            "is corrupt or comes from another model, and its counts would hold the run's "
            "backward ratio where they left it. Delete its tinyprop_budget_* entries and load "
            "it again to start the controller afresh"
        )

    @property
    def keep_scale(self) -> float:
        """c, the factor on the keep ratios of the running step."""
        return math.exp(float(self._buffer(self.LOG_KEEP_SCALE)))

    @property
    def trained_share(self) -> float:
        """q, the share of samples the running step trains."""
        return self.train_start * math.exp(float(self._buffer(self.LOG_TRAINED_SHARE)))

    @property
    def run_ratio(self) -> float:
        """R = S / D, the backward ratio of the run so far (0 before the first step)."""
        dense = int(self._buffer(self.DENSE))
        return int(self._buffer(self.SPENT)) / dense if dense else 0.0

    def finish_step(self, ledger, records=()) -> None:
        """Account a finished step's :class:`~tinyprop.Ledger` and move c and q.

        ``records``: the step's :class:`~tinyprop.state.BackwardRecord` (k per row), to see
        whether c still has an effect."""
        spent, dense = ledger.backward + ledger.selection, ledger.backward_dense
        if dense <= 0:
            return
        buffers = {name: self._buffer(name) for name in self.NAMES}
        run_spent = int(buffers[self.SPENT]) + spent
        run_dense = int(buffers[self.DENSE]) + dense
        steps = int(buffers[self.STEPS]) + 1
        smoothed_spent = _smooth(buffers[self.SMOOTHED_SPENT], spent)  # Ŝ
        smoothed_dense = _smooth(buffers[self.SMOOTHED_DENSE], dense)  # D̂
        run_budget, step_budget = scheduled_budget(
            self.budget, self.schedule, steps, self.total_steps
        )
        target = budget_step_target(  # r*
            step_budget, run_spent, run_dense, steps, HORIZON, run_budget
        )
        measured = max(smoothed_spent, 1) / smoothed_dense  # r̃ (tiny after skipped steps)
        change = GAIN * (math.log(target) - math.log(measured))
        change = min(max(change, -LARGEST_CHANGE), LARGEST_CHANGE)  # |Δ| <= log 2 per step
        log_keep = float(buffers[self.LOG_KEEP_SCALE])
        log_train = float(buffers[self.LOG_TRAINED_SHARE])
        keep_limits = _effective_limits(self.keep_limits, log_keep, records)
        log_keep, log_train = split_range(
            log_keep, log_train, change, keep_limits, self.train_limits
        )
        with torch.no_grad():
            buffers[self.SPENT].fill_(run_spent)
            buffers[self.DENSE].fill_(run_dense)
            buffers[self.STEPS].fill_(steps)
            buffers[self.SMOOTHED_SPENT].fill_(smoothed_spent)
            buffers[self.SMOOTHED_DENSE].fill_(smoothed_dense)
            buffers[self.LOG_KEEP_SCALE].fill_(log_keep)
            buffers[self.LOG_TRAINED_SHARE].fill_(log_train)
            buffers[self.CHECK].fill_(
                count_check([run_spent, run_dense, steps, smoothed_spent, smoothed_dense])
            )


CHECK_MODULUS = 2**61 - 1  # a prime: the check value fits an int64 buffer
CHECK_FACTORS = (0x2545F4914F6CDD1D, 0x1B873593CC9E2D51, 0x27D4EB2F165667C5, 0x165667B19E3779F9,
                 0x0FD7046C5EF9AB54)  # fmt: skip


def count_check(counts) -> int:
    """The check value of the budget controller's five counts (S, D, n, Ŝ, D̂): Σ f_i · c_i mod
    the prime 2^61 - 1, f_i fixed factors. Written with the counts at every step and checked
    when a checkpoint is loaded: a count changed by itself (x 10) gives another value,
    unless its change is a multiple of the prime."""
    return sum(f * (c % CHECK_MODULUS) for f, c in zip(CHECK_FACTORS, counts, strict=True)) % (
        CHECK_MODULUS
    )


def _smooth(average: Tensor, value: int) -> int:
    """λ · average + (1 - λ) · value, rounded (MAC counts stay integers)."""
    return round(SMOOTHING * int(average) + (1 - SMOOTHING) * value)


def _effective_limits(limits: tuple, log_keep: float, records) -> tuple[float, float]:
    """(floor, cap) of u_k, narrowed to the current u_k where moving c has no effect: every
    selecting layer kept all it could of every row, N_l entries or all its non-zero ones
    (``skip_zero_entries``) (cap), or 1 entry (floor)."""
    selected = [record for record in records if record.selected and record.keep.numel()]
    if not selected:
        return limits
    low, high = limits
    if all(record.keeps_all_it_can for record in selected):
        high = min(high, max(low, log_keep))
    if all(bool((record.keep <= 1).all()) for record in selected):
        low = max(low, min(high, log_keep))
    return low, high
