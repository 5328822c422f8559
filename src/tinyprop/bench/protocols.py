"""The two protocols: ``scratch`` (train from random initialisation) and ``finetune``.

``finetune`` (the on-device setting, a deployed model adapting to new data): the training pool
minus the validation split is cut in two by seeded random sampling; the model is pretrained
with plain dense PyTorch training on the first part (``pretrain_fraction``, default half), then
trained on the device with each policy on the other part only. Pretrained weights depend on
(dataset, seed, sizes), not on the policy, so every policy starts from the same weights; they
are cached under ``cache_dir()/pretrained``.

The validation split (``val_fraction`` of the pool, default 10%) is carved from the training
data in both protocols; the test split is used only for the reported metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass

import torch

from tinyprop.bench import store
from tinyprop.bench.suites import DatasetPlan
from tinyprop.data.cache import arrays_digest

PROTOCOLS = ("scratch", "finetune")
PRETRAIN_VERSION = 2  # bump when pretraining changes, to invalidate cached weights
# 2: BatchNorm statistics recomputed on the pretraining data at the end


@dataclass(frozen=True)
class Splits:
    """Indices into the training pool."""

    val: torch.Tensor  # (V,)
    pretrain: torch.Tensor  # (P,) empty for scratch
    train: torch.Tensor  # (T,) the (on-device) training data


def split_pool(
    count: int, protocol: str, seed: int, val_fraction: float, pretrain_fraction: float
) -> Splits:
    """Cut a training pool of ``count`` samples into validation, pretraining and training parts.

    Args:
        count: size of the training pool.
        protocol: ``"scratch"`` (no pretraining part) or ``"finetune"``.
        seed: seeds the random assignment.
        val_fraction: share of the pool for validation (at least one sample).
        pretrain_fraction: share of the rest for pretraining (finetune only).

    Returns:
        Disjoint :class:`Splits` covering the pool.

    Example:
        >>> s = split_pool(100, "finetune", 0, 0.1, 0.5)
        >>> len(s.val), len(s.pretrain), len(s.train)
        (10, 45, 45)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if not 0 < val_fraction < 1 or not 0 < pretrain_fraction < 1:
        raise ValueError(
            f"val_fraction and pretrain_fraction must lie in (0, 1), got {val_fraction} and "
            f"{pretrain_fraction}"
        )
    minimum = 3 if protocol == "finetune" else 2
    if count < minimum:
        raise ValueError(f"the {protocol} protocol needs at least {minimum} samples, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_count = min(max(1, round(val_fraction * count)), count - minimum + 1)
    val, rest = order[:val_count], order[val_count:]
    if protocol == "scratch":
        return Splits(val, rest[:0], rest)
    pretrain_count = min(max(1, round(pretrain_fraction * len(rest))), len(rest) - 1)
    return Splits(val, rest[:pretrain_count], rest[pretrain_count:])


# DatasetPlan fields added after weights were cached: left out of the key at these defaults, so
# plans that do not use them keep their cached weights (and keys)
_LATER_PLAN_DEFAULTS = {"data_options": (), "standardize": None}


def pretrain_key(dataset: str, source: str, model_name: str, plan: DatasetPlan, **extra) -> str:
    """A stable hash of everything the pretrained weights depend on."""
    plan_fields = {
        name: value
        for name, value in asdict(plan).items()
        if name not in _LATER_PLAN_DEFAULTS or value != _LATER_PLAN_DEFAULTS[name]
    }
    text = json.dumps(
        {"dataset": dataset, "source": source, "model": model_name, "plan": plan_fields,
         "version": PRETRAIN_VERSION, **extra},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_state(state: dict[str, torch.Tensor], path: os.PathLike) -> None:
    """Write a state_dict atomically (safe with several writers of the same weights). A
    symlink's target is written; a path that is not a regular file (``/dev/null``) raises
    OSError instead of being replaced."""
    store.not_regular_file(path, "state_dict file")
    path = os.path.realpath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


def save_pretrained(state: dict[str, torch.Tensor], path: os.PathLike) -> None:
    """:func:`save_state` for the pretrained-weights cache: the state_dict together with the
    SHA-256 of its tensors, so that :func:`load_pretrained` can tell a damaged file."""
    save_state({"state_dict": state, "sha256": arrays_digest(state.items())}, path)


def load_pretrained(path: os.PathLike) -> dict[str, torch.Tensor] | None:
    """The state_dict :func:`save_pretrained` wrote to ``path``; None when there is none, or with
    a warning when the file is unreadable (truncated, empty) or fails its SHA-256 check, so the
    caller trains it again. Loaded with ``weights_only=True``: nothing in the file is run."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "sha256" not in saved:
            problem = "has no recorded SHA-256 (written by an older tinyprop)"
        elif saved["sha256"] == arrays_digest(saved["state_dict"].items()):
            return saved["state_dict"]
        else:
            problem = "does not match the SHA-256 recorded when it was written"
    except Exception as error:  # torch.load raises many kinds on a damaged file
        first_line = (str(error).splitlines() or [""])[0][:120]
        problem = f"is unreadable ({type(error).__name__}: {first_line})"
    warnings.warn(f"pretrained weights {path} {problem}; training them again", stacklevel=2)
    return None
