"""One object per policy: how many output gradients a layer keeps, which ones, and what the
choice costs. The layers know only their geometry; everything policy-specific is here.

Each policy is a setting of the same code path (``full`` keeps everything and is run by
PyTorch's own backward; the others go through :class:`tinyprop.autograd.SparseBackprop`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyprop.budget import WINDOW, BudgetController, ScoreWindow, is_cheap_output_layer
from tinyprop.config import TinyPropConfig
from tinyprop.functional import (
    adaptive_keep_count,
    few_cpu_rows,
    fixed_keep_count,
    list_tensor,
    percentile_keep,
    running_max,
    scalar_keep_counts,
    scalar_skip_decision,
    selective_backprop_probability,
    skip_decision,
)

SMALLEST_KEEP_SCALE = 1e-4  # floors and caps of the budget controller's c and q
LARGEST_KEEP_SCALE = 1e4
SMALLEST_TRAINED_SHARE = 1e-3


class Policy:
    """The fixed-ratio policy (meProp's top-k); the others override what differs.

    Args:
        config: the validated settings.
        root: the model given to :func:`tinyprop.apply`, whose buffers hold the budget
            controller's and the score window's state (None: a policy without them).
    """

    adaptive = False  # k follows the local error Y_l / Ymax_l (TinyProp)
    skips = False  # whole samples may be skipped (TinyPropv2)
    random = False  # random-k: random scores instead of |δ|
    skip_score = "output_error"  # what the skip decision ranks: Y_L, or the "loss"
    keeps_window = False  # remembers the last W skip scores (without a budget too)

    def __init__(self, config: TinyPropConfig, root: nn.Module | None = None):
        self.config = config
        self.budget: BudgetController | None = None
        self.window: ScoreWindow | None = None
        if root is not None and config.budget is not None:
            self.budget = BudgetController(
                root, config.budget, *self.budget_plan(config.budget),
                schedule=config.budget_schedule, total_steps=config.budget_steps,
            )  # fmt: skip
        if root is not None and (self.keeps_window or (self.skips and self.budget is not None)):
            self.window = ScoreWindow(root)

    def budget_plan(self, budget: float) -> tuple:
        """(c at the start, (smallest, largest) c, q0, (smallest, largest) q) of the budget
        controller (:mod:`tinyprop.budget`): top-k keeps the ratio c = b of every sample."""
        return budget, (SMALLEST_KEEP_SCALE, 1.0), 1.0, (1.0, 1.0)

    def control_buffers(self) -> dict[str, Tensor]:
        """Name -> initial value of the buffers the root module needs for this policy."""
        buffers = {}
        if self.window is not None:
            buffers.update(ScoreWindow.initial_buffers())
        if self.budget is not None:
            buffers.update(self.budget.initial_buffers())
        return buffers

    def check_loaded(self, state_dict: dict, prefix: str) -> None:
        """Refuse a checkpoint whose score window or budget controller state is corrupt."""
        if self.window is not None:
            self.window.check_loaded(state_dict, prefix)
        if self.budget is not None:
            self.budget.check_loaded(state_dict, prefix)

    def check_step(self, step) -> None:
        """Before a finished step writes the running state: refuse a loaded budget controller
        state whose scale does not fit this model (:meth:`BudgetController.check_step`)."""
        if self.budget is not None and self.budget.unchecked_scale:  # once, after loading
            batch = len(step.stats.trained_mask)
            per_sample = max(  # the decision's largest MACs per sample: batch 1, or 64 x larger
                self.decision_macs(1, step.output_size),
                self.decision_macs(64 * batch, step.output_size) / (64 * batch),
            )
            self.budget.check_step(step.stats.macs, per_sample, batch)

    @property
    def name(self) -> str:
        return self.config.policy

    @property
    def sparse(self) -> bool:
        """False for ``full``: PyTorch's dense backward, no selection at all."""
        return True

    def keep_count(self, error: Tensor, error_max: Tensor, depth: int, size: int) -> Tensor:
        """k per row. ``error`` Y_l (R,), ``error_max`` Ymax_l after each row (R,) -> (R,)."""
        ratio = self.config.ratio if self.budget is None else self.budget.keep_scale
        count = fixed_keep_count(ratio, size)  # the same k for every row
        return torch.full(error.shape, count, dtype=torch.long, device=error.device)

    def scalar_keep_counts(
        self, errors: list[float], maxima: list[float], depth: int, size: int
    ) -> list[int] | None:
        """:meth:`keep_count` of a few rows in Python floats (the same values, bit for bit);
        None: left to :meth:`keep_count`."""
        ratio = self.config.ratio if self.budget is None else self.budget.keep_scale
        return [fixed_keep_count(ratio, size)] * len(errors)

    def keeps_everything(self, call) -> bool:
        """True when the layer call is backpropagated densely (no selection): meProp's dense
        output layer; with a budget and ``dense_output_layer=None``, an output layer that is
        cheap (:func:`tinyprop.budget.is_cheap_output_layer`)."""
        if call.depth != 0:
            return False
        if self.config.dense_output_layer is None:
            return is_cheap_output_layer(call, self.config.budget, self.skips)
        return self.config.dense_output_layer

    def caps_keep_at_nonzero(self) -> bool:
        """True when a row keeps at most its non-zero entries of δ (``skip_zero_entries``)."""
        return self.config.skip_zero_entries and not self.random

    def trained_mask(self, scores: Tensor, step) -> Tensor:
        """(B,) True for the samples to train, from their (B,) skip scores (``skips`` only)."""
        raise NotImplementedError(f"the {self.name} policy trains every sample")

    def decision_macs(self, batch_size: int, output_size: int) -> int:
        """Work of the per-sample skip decision of one step (0 without one)."""
        return 0

    def finish_step(self, step) -> None:
        """After a whole backward: remember the step's skip scores, move the controller."""
        if self.window is not None and step.skip_scores is not None:
            self.window.push(step.skip_scores)
        if self.budget is not None:
            self.budget.finish_step(step.stats.macs, step.records)

    def scores(self, delta: Tensor, layer_index: int, backward_step: int) -> Tensor:
        """What the top-k ranks: |δ| (R, N)."""
        return delta.abs()

    def selection_macs(self, trained: int, size: int, kept: int) -> int:
        """Selection work of one layer call with ``trained`` rows: N_l comparisons per row for
        the k-th largest |δ|. (The library also sums |δ| of every row to find the rows whose δ
        is all zero, e.g. skipped samples; that check is not part of the algorithm and is not
        counted, as in the C runtime.)"""
        return trained * size


class FullPolicy(Policy):
    """Dense backprop (the 100% reference)."""

    @property
    def sparse(self) -> bool:
        return False

    def keep_count(self, error, error_max, depth, size):
        return torch.full_like(error, size, dtype=torch.long)

    def scalar_keep_counts(self, errors, maxima, depth, size):
        return [size] * len(errors)

    def selection_macs(self, trained, size, kept):
        return 0


class RandomKPolicy(Policy):
    """k as top-k, a uniformly random subset of the entries (a control)."""

    random = True

    def scores(self, delta, layer_index, backward_step):
        seed = self.config.seed * 1_000_003 + layer_index * 10_007 + backward_step
        generator = torch.Generator().manual_seed(seed % (2**63))
        # float32 draws whatever torch's default dtype: the same entries under any default
        draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
        return draws.to(delta.device)  # (R, N)

    def selection_macs(self, trained, size, kept):
        return kept  # one random draw per kept entry


class TinyPropPolicy(Policy):
    """TinyProp v1: bpr_l = (S_min + Y_l / Ymax_l · (S_max - S_min)) · ζ^d per row (times the
    budget controller's keep scale c with a budget)."""

    adaptive = True

    def budget_plan(self, budget):
        train_start = self.trained_share_start(budget)
        middle = max((self.config.s_min + self.config.s_max) / 2, SMALLEST_KEEP_SCALE)
        keep_start = min(max(budget / train_start / middle, SMALLEST_KEEP_SCALE), 1.0 / middle)
        smallest_share = min(SMALLEST_TRAINED_SHARE, train_start)
        return (
            keep_start, (SMALLEST_KEEP_SCALE, LARGEST_KEEP_SCALE),
            train_start, (smallest_share if self.skips else 1.0, 1.0),
        )  # fmt: skip

    def trained_share_start(self, budget: float) -> float:
        """q0: TinyProp v1 trains every sample."""
        return 1.0

    def keep_count(self, error, error_max, depth, size):
        config = self.config
        scale = 1.0 if self.budget is None else self.budget.keep_scale
        return adaptive_keep_count(
            error, error_max, config.s_min, config.s_max, config.zeta, depth, size, scale
        ).to(error.device)

    def scalar_keep_counts(self, errors, maxima, depth, size):
        config = self.config
        scale = 1.0 if self.budget is None else self.budget.keep_scale
        return scalar_keep_counts(
            errors, maxima, config.s_min, config.s_max, config.zeta, depth, size, scale
        )

    def selection_macs(self, trained, size, kept):
        return 2 * trained * size  # Y_l (N_l additions) and the k-th largest (N_l comparisons)


class TinyPropV2Policy(TinyPropPolicy):
    """TinyProp v1 plus the per-sample skip decision D < τ (TinyPropv2); with a budget, τ is the
    (1 - q) percentile of the recent output errors Y_L (see :mod:`tinyprop.budget`)."""

    skips = True

    def trained_share_start(self, budget):
        return budget**self.config.skip_split  # q0 = b^e (e = 1/2: split evenly in log)

    def trained_mask(self, scores, step):
        """``scores``: the (B,) output errors Y_L."""
        if self.budget is not None:
            return percentile_keep(scores, self.window.values, self.budget.trained_share)
        config = self.config
        if few_cpu_rows(scores):
            decided = scalar_skip_decision(
                scores.tolist(), step.previous_output_error_max_float(), config.d_min,
                config.d_max, config.beta, config.skip_threshold,
            )  # fmt: skip
            if decided is not None:
                trained, step.output_error_max = decided
                return list_tensor(trained, torch.bool)
        previous = step.previous_output_error_max()  # () Ymax_L before this step
        error_max = running_max(scores, previous)  # (B,) Ymax_L
        step.output_error_max = float(error_max[-1])
        return skip_decision(
            scores, error_max, config.d_min, config.d_max, config.beta, config.skip_threshold
        )

    def decision_macs(self, batch_size, output_size):
        # Y_L of every sample; with a budget, one selection pass over the window and the batch
        window = WINDOW + batch_size if self.budget is not None else 0
        return batch_size * output_size + window


class SelectiveBackpropPolicy(Policy):
    """Selective-Backprop (Jiang et al. 2019): each sample is trained with probability
    CDF(loss)^β, the CDF over the last W losses and the batch's; trained samples are
    backpropagated densely. With a budget, β = 1 / q - 1 for the controller's share q."""

    skips = True
    skip_score = "loss"
    keeps_window = True

    def budget_plan(self, budget):
        smallest_share = min(SMALLEST_TRAINED_SHARE, budget)
        return 1.0, (1.0, 1.0), budget, (smallest_share, 1.0)

    def keeps_everything(self, call):
        return True

    def selection_macs(self, trained, size, kept):
        return 0

    def trained_mask(self, scores, step):
        """``scores``: the (B,) per-sample losses."""
        if self.budget is None:
            beta = self.config.beta
        else:
            beta = 1.0 / max(self.budget.trained_share, SMALLEST_TRAINED_SHARE) - 1.0
        probability = selective_backprop_probability(scores.cpu(), self.window.values.cpu(), beta)
        seed = self.config.seed * 1_000_003 + self.window.steps
        generator = torch.Generator().manual_seed(seed)
        draws = torch.rand(scores.shape[0], generator=generator, dtype=torch.float32)  # (B,)
        return draws < probability  # (B,)

    def decision_macs(self, batch_size, output_size):
        return batch_size * (WINDOW + batch_size)  # each loss against the window and batch


_POLICIES = {
    "full": FullPolicy,
    "topk": Policy,
    "randomk": RandomKPolicy,
    "tinyprop": TinyPropPolicy,
    "tinypropv2": TinyPropV2Policy,
    "selective_backprop": SelectiveBackpropPolicy,
}


def policy_for(config: TinyPropConfig, root: nn.Module | None = None) -> Policy:
    """The policy object of a configuration (``root``: the applied model, for the buffers of
    the budget controller and the score window)."""
    return _POLICIES[config.policy](config, root)
