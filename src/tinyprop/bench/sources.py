"""Where a benchmark's data comes from: ``tinyprop.data`` (or a test-only tiny dataset), capped
to the suite's sizes, as in-memory tensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from tinyprop.bench import tiny

POOL_SEED = 12345  # the same capped pool for every seed and policy


@dataclass(frozen=True)
class Arrays:
    """One split as tensors, with what the results must say about it."""

    x: torch.Tensor  # (N, *input_shape)
    y: torch.Tensor  # (N,)
    source: str
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.x.shape[1:])


def model_dataset(name: str) -> str:
    """The dataset whose reference model a (possibly test-only) dataset uses."""
    return tiny.TINY_DATASETS.get(name, name)


@functools.lru_cache(maxsize=2)
def _load_all(
    name: str, split: str, data_dir: str | None, options: tuple[tuple[str, object], ...]
) -> Arrays:
    """A whole split as :class:`Arrays` (cached: the pool and the samples outside it come from
    one load)."""
    if name in tiny.TINY_DATASETS:
        if options:
            raise ValueError(f"the test dataset {name!r} takes no data options, got {options}")
        dataset = tiny.load(name, split)
    else:
        from tinyprop import data

        dataset = data.load(name, split, data_dir=data_dir, **dict(options))
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        x, y = dataset.x, dataset.y
    else:
        pairs = [dataset[index] for index in range(len(dataset))]
        x = torch.stack([torch.as_tensor(pair[0]) for pair in pairs])
        y = torch.as_tensor([int(pair[1]) for pair in pairs])
    if len(y) == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty")
    return Arrays(x.float().contiguous(), y.long(), str(dataset.source), int(dataset.num_classes))


def _pool_order(count: int) -> torch.Tensor:
    """The fixed order whose first ``cap`` indices are the capped pool."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(POOL_SEED))


@functools.lru_cache(maxsize=4)
def load(
    name: str,
    split: str,
    cap: int | None,
    data_dir: str | None = None,
    options: tuple[tuple[str, object], ...] = (),
) -> Arrays:
    """Load a split and keep at most ``cap`` samples (a fixed seeded random subset).

    Args:
        name: a ``tinyprop.data`` dataset name or a test-only ``tiny-*`` name.
        split: ``"train"`` or ``"test"``.
        cap: maximum number of samples; None keeps all.
        data_dir: folder of the real datasets (see ``tinyprop.data.load``).
        options: ``(name, value)`` pairs passed to ``tinyprop.data.load`` (e.g. resolution);
            must be empty for a ``tiny-*`` dataset.

    Returns:
        :class:`Arrays` of the (capped) split.

    Example:
        >>> load("tiny-blobs", "test", 10).x.shape
        torch.Size([10, 1, 4, 4])
    """
    whole = _load_all(name, split, data_dir, options)
    if cap is None or cap >= len(whole.y):
        return whole
    keep = _pool_order(len(whole.y))[:cap].sort().values
    return replace(whole, x=whole.x[keep].contiguous(), y=whole.y[keep])


def outside_pool(
    name: str,
    split: str,
    cap: int | None,
    count: int,
    seed: int,
    data_dir: str | None = None,
    options: tuple[tuple[str, object], ...] = (),
) -> Arrays:
    """Up to ``count`` samples of ``split`` that are not in the capped pool ``load(name, split,
    cap)`` (a random subset, seeded by ``seed``): extra validation data where the split holds
    more than the pool. Empty when the pool is the whole split.

    Example:
        >>> extra = outside_pool("tiny-blobs", "train", 200, 30, seed=0)
        >>> len(extra.y), len(outside_pool("tiny-blobs", "train", None, 30, seed=0).y)
        (30, 0)
    """
    whole = _load_all(name, split, data_dir, options)
    if cap is None or cap >= len(whole.y) or count <= 0:
        return replace(whole, x=whole.x[:0], y=whole.y[:0])
    rest = _pool_order(len(whole.y))[cap:]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:count]
    index = rest[pick].sort().values
    return replace(whole, x=whole.x[index].contiguous(), y=whole.y[index])


def standardize_last_axis(reference: torch.Tensor, *splits: Arrays) -> list[Arrays]:
    """Standardise every feature of the last axis with statistics of ``reference`` only.

    Each position of the last axis (e.g. each MFCC coefficient of ``(N, 1, frames, 10)``)
    gets its mean and standard deviation over all other axes of ``reference`` (the training
    inputs; never validation or test data); every split is shifted and scaled with them.

    Args:
        reference: ``(N, ..., F)`` training inputs the statistics come from.
        splits: the splits to standardise (e.g. the whole pool and the test split).

    Returns:
        The standardised splits, in order (new :class:`Arrays`; the inputs are unchanged).

    Example:
        >>> pool = Arrays(torch.tensor([[0.0, 10.0], [2.0, 30.0]]), torch.tensor([0, 1]), "s", 2)
        >>> standardize_last_axis(pool.x, pool)[0].x
        tensor([[-0.7071, -0.7071],
                [ 0.7071,  0.7071]])
    """
    if len(reference) < 2:
        raise ValueError(f"standardisation needs at least 2 training samples, got {len(reference)}")
    axes = tuple(range(reference.dim() - 1))
    mean = reference.mean(axes)  # (F,)
    std = reference.std(axes).clamp_min(1e-6)  # (F,)
    return [replace(split, x=((split.x - mean) / std).contiguous()) for split in splits]
