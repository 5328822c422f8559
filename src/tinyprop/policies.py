"""One object per policy: how many output gradients a layer keeps, which ones, and what the
choice costs. The layers know only their geometry; everything policy-specific is here.

Each policy is a setting of the same code path (``full`` keeps everything and is run by
PyTorch's own backward; the others go through :class:`tinyprop.autograd.SparseBackprop`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyprop.config import TinyPropConfig
from tinyprop.functional import adaptive_keep_count, keep_count


class Policy:
    """The fixed-ratio policy (meProp's top-k); the others override what differs.

    Args:
        config: the validated settings.
    """

    adaptive = False  # k follows the local error Y_l / Ymax_l (TinyProp)
    skips = False  # whole samples may be skipped (TinyPropv2)
    random = False  # random-k: random scores instead of |δ|

    def __init__(self, config: TinyPropConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.policy

    @property
    def sparse(self) -> bool:
        """False for ``full``: PyTorch's dense backward, no selection at all."""
        return True

    def keep_count(self, error: Tensor, error_max: Tensor, depth: int, size: int) -> Tensor:
        """k per row. ``error`` Y_l (R,), ``error_max`` Ymax_l after each row (R,) -> (R,)."""
        return keep_count(self.config.ratio, size).expand(error.shape[0]).to(error.device)

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

    def selection_macs(self, trained, size, kept):
        return 0


class RandomKPolicy(Policy):
    """k as top-k, a uniformly random subset of the entries (a control)."""

    random = True

    def scores(self, delta, layer_index, backward_step):
        seed = self.config.seed * 1_000_003 + layer_index * 10_007 + backward_step
        generator = torch.Generator().manual_seed(seed % (2**63))
        return torch.rand(delta.shape, generator=generator).to(delta.device)  # (R, N)

    def selection_macs(self, trained, size, kept):
        return kept  # one random draw per kept entry


class TinyPropPolicy(Policy):
    """TinyProp v1: bpr_l = (S_min + Y_l / Ymax_l · (S_max - S_min)) · ζ^d per row."""

    adaptive = True

    def keep_count(self, error, error_max, depth, size):
        config = self.config
        return adaptive_keep_count(
            error, error_max, config.s_min, config.s_max, config.zeta, depth, size
        ).to(error.device)

    def selection_macs(self, trained, size, kept):
        return 2 * trained * size  # Y_l (N_l additions) and the k-th largest (N_l comparisons)


class TinyPropV2Policy(TinyPropPolicy):
    """TinyProp v1 plus the per-sample skip decision D < τ (TinyPropv2)."""

    skips = True


_POLICIES = {
    "full": FullPolicy,
    "topk": Policy,
    "randomk": RandomKPolicy,
    "tinyprop": TinyPropPolicy,
    "tinypropv2": TinyPropV2Policy,
}


def policy_for(config: TinyPropConfig) -> Policy:
    """The policy object of a configuration."""
    return _POLICIES[config.policy](config)
