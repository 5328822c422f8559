"""The shared in-memory dataset: float32 inputs, int64 labels, and where they came from."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """A dataset held as two tensors, labelled with its source.

    Every loader in :mod:`tinyprop.data` returns one of these, so results can always say which
    data produced them (``source``), and models can be sized from ``input_shape`` and
    ``num_classes``.

    Args:
        x: inputs, shape ``(N, *input_shape)``; converted to float32.
        y: integer labels, shape ``(N,)``; converted to int64, each in ``[0, num_classes)``.
        source: human-readable origin, e.g. ``"mnist"`` or ``"synthetic flowers102 stand-in"``.
        num_classes: number of classes of the task.

    Example:
        >>> ds = ArrayDataset(torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 1]), "toy", 3)
        >>> len(ds), ds.input_shape, ds[1][1].item()
        (4, (1, 28, 28), 1)
    """

    def __init__(self, x: Tensor, y: Tensor, source: str, num_classes: int) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"ArrayDataset needs x of shape (N, ...) and y of shape (N,); got x "
                f"{tuple(x.shape)} and y {tuple(y.shape)}: give one label per sample"
            )
        if y.is_floating_point():
            raise ValueError("ArrayDataset labels y must be integers, got a floating-point tensor")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); found range "
                f"[{int(y.min())}, {int(y.max())}]: check num_classes or the label mapping"
            )
        self.x = x.to(torch.float32).contiguous()  # (N, *input_shape)
        self.y = y.to(torch.int64).contiguous()  # (N,)
        self.source = str(source)
        self.num_classes = int(num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x.shape[1:])

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """All inputs and labels as ``(x, y)``: ``(N, *input_shape)`` float32, ``(N,)`` int64."""
        return self.x, self.y

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )
