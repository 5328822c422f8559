"""Property tests (hypothesis) for the top-k selection and the ratio formula."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyprop.functional import (
    adaptive_keep_count,
    backprop_ratio,
    keep_count,
    running_max,
    select_topk,
)

rows_and_keep = st.integers(1, 6).flatmap(
    lambda rows: st.integers(1, 40).flatmap(
        lambda size: st.tuples(
            st.lists(
                st.lists(st.floats(-1e3, 1e3), min_size=size, max_size=size),
                min_size=rows,
                max_size=rows,
            ),
            st.lists(st.integers(1, size), min_size=rows, max_size=rows),
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(rows_and_keep)
def test_select_topk_keeps_exactly_k_of_the_largest(case):
    values, keep = case
    scores = torch.tensor(values, dtype=torch.float64).abs()
    keep = torch.tensor(keep)
    rows, columns = select_topk(scores, keep)
    for row in range(scores.shape[0]):
        chosen = columns[rows == row]
        assert chosen.numel() == keep[row] == chosen.unique().numel()
        left_out = torch.ones(scores.shape[1], dtype=torch.bool)
        left_out[chosen] = False
        if left_out.any():
            assert scores[row, chosen].min() >= scores[row, left_out].max()


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.integers(1, 10_000))
def test_keep_count_is_in_range_and_rounds(ratio, size):
    k = int(keep_count(ratio, size))
    assert 1 <= k <= size
    assert abs(k - ratio * size) <= 0.5 or k == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1e6), min_size=1, max_size=20),
    st.floats(0, 1e6),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0.01, 1),
    st.integers(0, 6),
)
def test_backprop_ratio_stays_between_damped_bounds(errors, previous, a, b, zeta, depth):
    s_min, s_max = min(a, b), max(a, b)
    error = torch.tensor(errors, dtype=torch.float64)
    error_max = running_max(error, torch.tensor(previous, dtype=torch.float64))
    assert torch.all(error_max >= error) and torch.all(error_max[1:] >= error_max[:-1])
    ratio = backprop_ratio(error, error_max, s_min, s_max, zeta, depth)
    low, high = s_min * zeta**depth, s_max * zeta**depth
    assert torch.all(ratio >= low - 1e-12) and torch.all(ratio <= high + 1e-12)
    keep = adaptive_keep_count(error, error_max, s_min, s_max, zeta, depth, 50)
    assert torch.all((keep >= 1) & (keep <= 50))
    # a larger error never gets fewer kept entries under the same running maximum
    same_max = torch.full_like(error, float(error_max[-1]))
    ordered = adaptive_keep_count(error.sort().values, same_max, s_min, s_max, zeta, depth, 50)
    assert torch.all(ordered[1:] >= ordered[:-1])


def test_select_topk_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0], [0.0] * 8])
    rows, columns = select_topk(scores, torch.tensor([3, 2]))
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert columns.tolist() == [1, 2, 3, 0, 1]
