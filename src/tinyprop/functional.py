"""Pure tensor functions of TinyProp: local error, running max, ratio, k, top-k, skip decision;
and of the budget controller and Selective-Backprop (the last section).

Everything works on a batch of samples at once, in batch order, and matches the per-sample,
sequential definition of ``docs/algorithm.md`` exactly (the running maximum is a cumulative max).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tinyprop import native


def local_error(delta: Tensor) -> Tensor:
    """Y = Σ_i |δ_i| per sample. ``delta`` (B, ...) -> (B,)."""
    if delta.dim() == 2:  # flatten(1) would return it as it is: one dispatch fewer
        return delta.abs().sum(1)
    return delta.abs().flatten(1).sum(1)


def running_max(error: Tensor, previous: Tensor) -> Tensor:
    """Ymax after each sample in batch order: max(previous, Y_1..Y_n). (B,) -> (B,)."""
    if error.numel() == 0:
        return error
    return torch.cummax(error, 0).values.clamp_min(previous)


def error_fraction(error: Tensor, error_max: Tensor) -> Tensor:
    """α = Y / Ymax in [0, 1], with α = 0 where Ymax = 0 (no error seen yet)."""
    safe = torch.where(error_max > 0, error_max, torch.ones_like(error_max))
    return torch.where(error_max > 0, error / safe, torch.zeros_like(error))


def backprop_ratio(
    error: Tensor, error_max: Tensor, s_min: float, s_max: float, zeta: float, depth: int
) -> Tensor:
    """bpr = (S_min + (Y / Ymax) · (S_max - S_min)) · ζ^d, per sample (TinyProp v1, exact)."""
    alpha = error_fraction(error, error_max)  # (B,)
    return (s_min + alpha * (s_max - s_min)) * zeta**depth


def keep_count(ratio: Tensor | float, size: int) -> Tensor:
    """k = clamp(floor(ratio · N + 1/2), 1, N): round half up, at least one, at most all."""
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    return torch.floor(ratio * size + 0.5).long().clamp(1, size)


def fixed_keep_count(ratio: float, size: int) -> int:
    """:func:`keep_count` of one ratio as a Python int (the same float64 arithmetic)."""
    return min(max(math.floor(ratio * size + 0.5), 1), size)


def adaptive_keep_count(
    error: Tensor,
    error_max: Tensor,
    s_min: float,
    s_max: float,
    zeta: float,
    depth: int,
    size: int,
    scale: float = 1.0,
) -> Tensor:
    """TinyProp's k per sample; k = 1 where Ymax = 0 (avoids 0/0). (B,) -> (B,) long.

    ``scale`` is the budget controller's keep scale c (bpr · c, k at most N); 1 without one.
    A few rows on the CPU are computed in Python floats (:func:`scalar_keep_counts`).
    """
    if few_cpu_rows(error, error_max):
        counts = scalar_keep_counts(
            error.tolist(), error_max.tolist(), s_min, s_max, zeta, depth, size, scale
        )
        if counts is not None:
            return torch.tensor(counts, dtype=torch.long)
    ratio = backprop_ratio(error.double(), error_max.double(), s_min, s_max, zeta, depth)
    keep = keep_count(ratio * scale, size)
    return torch.where(error_max > 0, keep, torch.ones_like(keep))


# Up to this many rows on the CPU, k and the skip decision are computed in Python floats: the
# same IEEE float64 operations in the same order as the tensor code (so the same k and the same
# decisions, bit for bit), with one host read instead of about twenty small tensor operations,
# whose dispatch costs more than the arithmetic at a fine-tuning batch of 8-32 samples.
SCALAR_ROWS = 128
LARGEST_EXACT_COUNT = 2.0**62  # a float64 k past this is left to the tensor code's conversion


def few_cpu_rows(*tensors: Tensor) -> bool:
    """True when every tensor is a 1-D CPU tensor of the same 1 to ``SCALAR_ROWS`` rows."""
    first = tensors[0]  # (is_cpu and a loop without a generator: called a few times a step)
    if first.dim() != 1 or not first.is_cpu or not 0 < first.shape[0] <= SCALAR_ROWS:
        return False
    for other in tensors[1:]:
        if other.dim() != 1 or not other.is_cpu or other.shape != first.shape:
            return False
    return True


def list_tensor(values: list, dtype: torch.dtype) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` on the CPU for a few rows' Python ints or bools,
    by one ``full`` when every value is the same or one ``arange`` for 0, 1, ..., n - 1 (the
    rows of a layer call that every row trains): a tensor from a list of a hundred values
    costs ten times as much as either."""
    count = len(values)
    if count and values.count(values[0]) == count:
        return torch.full((count,), values[0], dtype=dtype)
    if dtype == torch.long and values == list(range(count)):
        return torch.arange(count, dtype=dtype)
    return torch.tensor(values, dtype=dtype)


def scalar_keep_counts(
    errors: list[float],
    maxima: list[float],
    s_min: float,
    s_max: float,
    zeta: float,
    depth: int,
    size: int,
    scale: float,
) -> list[int] | None:
    """:func:`adaptive_keep_count` on Python floats, operation for operation: α = Y / Ymax
    (k = 1 where Ymax is not positive), bpr = (S_min + α · (S_max - S_min)) · ζ^d, times c,
    k = clamp(floor(bpr · N + 1/2), 1, N). None when a value is not finite or too large for
    an exact int64 (the tensor code decides those)."""
    spread, decay = s_max - s_min, zeta**depth
    counts = []
    for error, error_max in zip(errors, maxima, strict=True):
        if not error_max > 0:  # also NaN, as torch.where(error_max > 0, ...) has it
            counts.append(1)
            continue
        value = (s_min + error / error_max * spread) * decay * scale * size + 0.5
        if not abs(value) < LARGEST_EXACT_COUNT:  # NaN, inf or too large
            return None
        counts.append(min(max(math.floor(value), 1), size))
    return counts


def scalar_running_max(
    errors: list[float], previous: float, per_batch: bool = False
) -> list[float] | None:
    """:func:`running_max` on Python floats, operation for operation: Ymax after each row,
    max(previous, Y_1..Y_n) (with ``per_batch``, the last one for every row, as
    ``running_max_per_batch`` has it). None when a value is not finite (the tensor code
    decides those)."""
    if not math.isfinite(previous) or not all(math.isfinite(error) for error in errors):
        return None
    maxima, running = [], -math.inf
    for error in errors:
        running = max(running, error)  # cummax
        maxima.append(max(running, previous))  # clamp_min(previous)
    if per_batch and maxima:
        maxima = [maxima[-1]] * len(maxima)
    return maxima


def kth_largest(scores: Tensor, keep: Tensor) -> Tensor:
    """The ``keep[n]``-th largest score of each row: (B, N), (B,) -> (B, 1).

    On the CPU this is NumPy's introselect (``np.partition``, O(N) per row, an order of
    magnitude faster than ``torch.topk`` for long rows); elsewhere ``torch.topk``.
    """
    size = scores.shape[1]
    if scores.device.type != "cpu":
        largest = scores.topk(int(keep.max()), dim=1, sorted=True).values  # (B, most)
        return largest.gather(1, (keep - 1).unsqueeze(1))
    array = scores.detach().numpy()
    # δ behind ReLU and pooling is mostly exact zeros, and introselect slows down tenfold on
    # that many equal keys: give the zeros distinct negative stand-ins. The k-th largest is
    # unchanged where a row has at least k non-zero scores; elsewhere it is 0.
    positive = array > 0  # (B, N)
    distinct = np.where(positive, array, -np.arange(1, size + 1, dtype=array.dtype))
    counts = keep.unique()
    if counts.numel() == 1:  # one k for every row (top-k, random-k)
        column = size - int(counts[0])
        part = np.partition(distinct, column, axis=1)[:, column : column + 1]  # (B, 1)
        return torch.from_numpy(part).clamp_min_(0)
    threshold = torch.empty(scores.shape[0], 1, dtype=scores.dtype)
    for count in counts.tolist():  # one partition per distinct k
        rows = (keep == count).nonzero().flatten()
        part = np.partition(distinct[rows.numpy()], size - count, axis=1)
        threshold[rows] = torch.from_numpy(part[:, size - count : size - count + 1])
    return threshold.clamp_min_(0)  # rows with fewer than k non-zero scores: 0


def select_topk(scores: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the ``keep[n]`` largest scores of each row; ties go to the lower index.

    The tie rule is the C runtime's and does not depend on the other rows of the batch (ties
    are common: average pooling hands the same error to many positions, ReLU many zeros).

    Args:
        scores: (B, N) non-negative scores (|δ| for top-k, random keys for random-k).
        keep: (B,) how many to keep per row, each in [1, N].

    Returns:
        ``(rows, columns)``, two (M,) long tensors with M = Σ keep, in row-major order with
        ascending columns.
    """
    if scores.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        return empty, empty
    if native.can_select(scores):  # the same entries, selected in compiled code
        rows, columns, _ = native.topk(scores, keep)  # (M,), (M,)
        return rows, columns
    return select_topk_torch(scores, keep)


def select_topk_torch(scores: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``select_topk`` with PyTorch/NumPy kernels (any device; the reference of the native one)."""
    threshold = kth_largest(scores, keep).to(scores.device)  # (B, 1)
    above = scores > threshold  # (B, N)
    tied = scores == threshold  # (B, N)
    room = keep.unsqueeze(1) - above.sum(1, keepdim=True)  # (B, 1): ties still to keep
    if bool((tied.sum(1, keepdim=True) <= room).all()):  # every tie fits: keep them all
        kept = above | tied
    else:  # the lower-index ties up to the room left
        kept = above | (tied & (tied.cumsum(1) <= room))  # (B, N), exactly keep[n] per row
    return kept.nonzero(as_tuple=True)


def select_mask(scores: Tensor, keep: Tensor) -> Tensor:
    """The entries ``select_topk`` keeps, as a mask, without reading anything on the host.

    The ``keep[n]`` largest scores of each row, ties to the lower index (a stable descending
    sort puts equal scores in index order): the selection of devices where a host read would
    stall the queue (CUDA). ``scores`` (B, N), ``keep`` (B,) in [0, N] -> (B, N) bool.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    rank = torch.arange(scores.shape[1], device=scores.device)  # (N,)
    taken = rank.unsqueeze(0) < keep.unsqueeze(1)  # (B, N): the first keep[n] ranks
    return torch.zeros_like(taken).scatter_(1, order, taken)


def decision_metric(
    error: Tensor, error_max: Tensor, d_min: float, d_max: float, beta: float
) -> Tensor:
    """D = (D_min + α · (D_max - D_min)) · β with α = Y_L / Ymax_L (TinyPropv2)."""
    alpha = error_fraction(error, error_max)
    return (d_min + alpha * (d_max - d_min)) * beta


def skip_decision(
    error: Tensor, error_max: Tensor, d_min: float, d_max: float, beta: float, threshold: float
) -> Tensor:
    """True where the sample is trained (D >= τ), False where it is skipped. (B,) -> (B,)."""
    return decision_metric(error, error_max, d_min, d_max, beta) >= threshold


def scalar_skip_decision(
    scores: list[float],
    previous: float,
    d_min: float,
    d_max: float,
    beta: float,
    threshold: float,
) -> tuple[list[bool], float] | None:
    """:func:`running_max` and :func:`skip_decision` on Python floats, operation for
    operation: Ymax_L after each sample (from ``previous``), D >= τ per sample. Returns (the
    trained flags, Ymax_L after the last sample), or None when a value is not finite (the
    tensor code decides those)."""
    if not all(math.isfinite(score) for score in scores) or not math.isfinite(previous):
        return None
    spread = d_max - d_min
    trained, running = [], -math.inf
    for score in scores:
        running = max(running, score)  # cummax
        error_max = max(running, previous)  # clamp_min(previous)
        alpha = score / error_max if error_max > 0 else 0.0
        trained.append((d_min + alpha * spread) * beta >= threshold)
    return trained, error_max


# --- the budget controller (tinyprop.budget) and Selective-Backprop --------------------------


def budget_step_target(
    budget: float,
    spent: float,
    dense: float,
    steps: int,
    horizon: int,
    run_budget: float | None = None,
) -> float:
    """r* = b + (B - R) · n / H: the step ratio that pays a run ratio R = S / D back to the
    run's budget B (``run_budget``, default b) within H steps (after n steps, D / n is the mean
    dense MACs of a step), limited to [b / 4, min(1, 4 b)]. ``budget`` b: the next step's
    budget; ``spent`` S, ``dense`` D: the run's MACs so far."""
    if dense <= 0:
        return budget
    run_budget = budget if run_budget is None else run_budget
    run_ratio = spent / dense
    target = budget + (run_budget - run_ratio) * steps / horizon
    return min(max(target, budget / 4), min(1.0, 4 * budget))


def scheduled_budget(
    budget: float, schedule: float, steps: int, total_steps: int | None
) -> tuple[float, float]:
    """(B(n), b(n + 1)): the run's budget after n steps and the next step's, when the step
    budget falls linearly from (1 + a) b to (1 - a) b over T steps (a = ``schedule``,
    T = ``total_steps``): b(t) = b (1 + a (1 - 2 t / T)) at the middle t of a step, and
    B(n) = b (1 + a (1 - n / T)), the mean of b(t) over the first n steps, which is b at
    n = T. After T steps (and with a = 0) both are b.

    Example:
        >>> scheduled_budget(0.2, 0.5, 0, 10)
        (0.30000000000000004, 0.29000000000000004)
    """
    if schedule == 0.0 or total_steps is None or steps >= total_steps:
        return budget, budget
    run = budget * (1.0 + schedule * (1.0 - steps / total_steps))
    middle = (steps + 0.5) / total_steps  # the next step's middle, as a share of the run
    return run, budget * (1.0 + schedule * (1.0 - 2.0 * middle))


def split_range(
    log_keep: float,
    log_train: float,
    change: float,
    keep_limits: tuple[float, float],
    train_limits: tuple[float, float],
) -> tuple[float, float]:
    """Share a change of the log cost between the two actuators, one after the other.

    ``log_keep`` u_k = log c (the keep scale), ``log_train`` u_q = log(q / q0) (the trained
    share). A decrease lowers u_k to its floor first, then u_q; an increase raises u_q back to
    0 (q = q0) first, then u_k to its cap, then u_q to its cap. What no actuator can take is
    dropped (anti-windup).
    """
    keep_low, keep_high = keep_limits
    train_low, train_high = train_limits
    if change < 0:
        step = max(change, keep_low - log_keep)
        log_keep, change = log_keep + step, change - step
        log_train += max(change, train_low - log_train)
        return log_keep, log_train
    for actuator in ("train_to_start", "keep", "train"):
        if actuator == "keep":
            step = min(change, max(0.0, keep_high - log_keep))
            log_keep += step
        else:
            high = min(0.0, train_high) if actuator == "train_to_start" else train_high
            step = min(change, max(0.0, high - log_train))
            log_train += step
        change -= step
    return log_keep, log_train


def percentile_keep(scores: Tensor, window: Tensor, share: float) -> Tensor:
    """True for the samples whose score is at least the (1 - q) quantile of the recent scores
    and the batch's own: about the share q of samples with the largest scores is trained.
    ``scores`` (B,), ``window`` (W,) with NaN where empty -> (B,) bool."""
    pool = torch.cat([window.to(scores), scores])  # (W + B,)
    threshold = torch.nanquantile(pool, 1.0 - min(max(share, 0.0), 1.0))
    return scores >= threshold


def loss_cdf(losses: Tensor, window: Tensor) -> Tensor:
    """CDF(loss): the share of the recent losses and the batch's own at or below each loss.
    ``losses`` (B,), ``window`` (W,) with NaN where empty -> (B,) in (0, 1]."""
    pool = torch.cat([window.to(losses), losses])  # (W + B,)
    pool = pool[~torch.isnan(pool)]
    return (pool.unsqueeze(0) <= losses.unsqueeze(1)).double().mean(1)  # (B,)


def selective_backprop_probability(losses: Tensor, window: Tensor, beta: float) -> Tensor:
    """Selective-Backprop's keep probability CDF(loss)^β (Jiang et al. 2019). (B,) -> (B,).

    With β = 1 / q - 1 a sample is kept with probability q on average (CDF(loss) is uniform
    when the losses are i.i.d.: E[U^β] = 1 / (β + 1))."""
    return loss_cdf(losses, window) ** beta
