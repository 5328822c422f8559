"""Benchmark suites: per dataset how much data and training, and each policy's settings grid.

``small`` is sized for all 8 datasets x 5 policies x 3 seeds on a 2-core machine in a few hours
(the sizes are in :data:`SMALL`); ``paper`` uses the full datasets; ``tiny`` is for tests.

Small-suite cost, estimated from measured per-sample training times (one core, torch 2.13 CPU;
the sparse conv backward costs 10-30 ms per sample on ResNet-8/MobileNet/DS-CNN, dense about
1-2 ms) and checked on cifar10 (scratch: full 9 s, tinypropv2 102 s per run; finetune: full
4 s, tinypropv2 28 s per run): about 470 core-seconds per sparse setting and seed for all 8
datasets under ``scratch`` (half that under ``finetune``), so 10 sparse settings x 3 seeds come
to about 4 core-hours for ``scratch`` and 2 for ``finetune``: about 2 h and 1 h of wall time on
2 cores with ``--ray local`` (twice that run sequentially without Ray).

flowers102, food101 (7-block MobileNetV1-0.5 at 32x32, 15 epochs) and speech_commands
(standardised MFCCs, 15 epochs) were enlarged later so that full training learns them (seed 0,
full, test accuracy scratch / finetune: flowers 63% / 35% -> 43%, food 65% / 39% -> 52%,
speech 71% / 63% -> 74%). Measured per run on one core: full 24, 16, 19 s (scratch) and 11, 8,
5 s (finetune, plus 14, 10, 6 s of pretraining once per seed); tinypropv2 71 s on speech
(scratch) and 25, 15 s on flowers, speech (finetune); sparse flowers/food scratch runs are
estimated at 60-190 s (12 s per epoch measured on a busy machine). Together about 250
core-seconds per sparse setting and seed under ``scratch`` and 60 under ``finetune`` for the
three, on top of the figures above: roughly 2 more core-hours for ``scratch`` and 0.5 for
``finetune`` with 10 sparse settings x 3 seeds.

Measured on the committed records (16 sparse settings since the grid grew by three, 408 runs per
protocol, one core each, the native sparse kernels for the newer runs): the ``wall_s`` of all runs
adds up to 1.1 core-hours for ``finetune`` and 2.3 for ``scratch``, under 2 h of wall time on 2
cores with ``--ray local``. The validation top-up to 2000 samples (``min_val_samples``) costs one
forward pass over them per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("full", "topk", "randomk", "tinyprop", "tinypropv2", "selective_backprop")


@dataclass(frozen=True)
class DatasetPlan:
    """How one dataset is trained in a suite.

    Attributes:
        train_samples: cap on the training pool (validation and pretraining parts are carved
            from it); None = the whole training split.
        test_samples: cap on the test split; None = all of it.
        epochs: epochs of the trained run (on-device training).
        pretrain_epochs: epochs of the dense pretraining of the ``finetune`` protocol.
        batch_size: minibatch size (one optimizer step per batch).
        lr: Adam learning rate.
        variant: model variant of :func:`tinyprop.models.build` (None = the default).
        data_options: ``(name, value)`` pairs passed to ``tinyprop.data.load(name, split,
            **options)``, e.g. ``(("resolution", 32),)`` (a tuple, so plans stay hashable).
        standardize: ``"last_axis"`` standardises every feature of the last axis (e.g. each
            MFCC coefficient) to mean 0 and std 1 with statistics of the training data only
            (the pretraining part under ``finetune``, the training part under ``scratch``);
            None = inputs as loaded.
    """

    train_samples: int | None
    test_samples: int | None
    epochs: int
    pretrain_epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    variant: str | None = None
    # fields added later: at their defaults they are left out of the pretraining cache key
    data_options: tuple[tuple[str, object], ...] = ()
    standardize: str | None = None

    @property
    def options(self) -> dict:
        """``data_options`` as keyword arguments of ``tinyprop.data.load``."""
        return dict(self.data_options)


STANDARDIZE = (None, "last_axis")


@dataclass(frozen=True)
class Suite:
    """A named benchmark: datasets with their plans, policies with settings grids, seeds.

    Attributes:
        val_fraction: part of the training pool held out as the validation split (settings
            are chosen on it, never on the test split).
        pretrain_fraction: part of the remaining training pool used for dense pretraining in the
            ``finetune`` protocol; the rest is the on-device training data.
        min_val_samples: the validation split's least size: when ``val_fraction`` of the pool
            gives fewer and the dataset's training split holds samples outside the (capped)
            pool, the missing ones are drawn from those (seeded by the run's seed), so the
            pretraining and training parts stay as they are. 0 = the pool's share only.
    """

    name: str
    datasets: dict[str, DatasetPlan]
    settings: dict[str, list[dict]]
    seeds: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.1
    pretrain_fraction: float = 0.5
    notes: dict[str, str] = field(default_factory=dict)
    min_val_samples: int = 0


# settings grids: every entry is a set of TinyPropConfig fields on top of the policy's defaults.
# topk and randomk keep the output layer dense, as meProp's reference code does (with k = 1 of
# 10 logits the output layer collapses; see benchmarks/results/accuracy_study.md).
MEPROP = {"dense_output_layer": True}
SMALL_SETTINGS: dict[str, list[dict]] = {
    "full": [{}],
    "topk": [{"ratio": 0.1, **MEPROP}, {"ratio": 0.2, **MEPROP}, {"ratio": 0.3, **MEPROP}],
    "randomk": [{"ratio": 0.1, **MEPROP}, {"ratio": 0.3, **MEPROP}],
    # zeta = 0.9 (added with the same point for tinypropv2, so each has the curve between
    # zeta 1 and 0.5): 0.5^d keeps almost nothing in the early conv layers of ResNet-8
    "tinyprop": [{"zeta": 1.0}, {"zeta": 0.9}, {"zeta": 0.5}, {"zeta": 1.0, "s_max": 0.5}],
    "tinypropv2": [
        {"zeta": 1.0, "skip_threshold": 0.1},
        {"zeta": 1.0, "skip_threshold": 0.3},
        {"zeta": 1.0, "skip_threshold": 0.5},
        {"zeta": 0.9, "skip_threshold": 0.5},
        # cheaper: a smaller largest ratio (deep conv nets keep too much at s_max = 0.9)
        {"zeta": 1.0, "s_max": 0.7, "skip_threshold": 0.5},
        {"zeta": 1.0, "s_max": 0.5, "skip_threshold": 0.3},
        {"zeta": 1.0, "s_max": 0.5, "skip_threshold": 0.5},
    ],
}

# budget runs (tinyprop.budget): every sparse policy held at the same backward ratio b, so the
# policies compare at equal compute with one flag and no per-dataset setting
BUDGETS = (0.2, 0.1, 0.05)  # the most useful first (--max-settings 1 runs 0.2)


def budget_settings(extra: dict | None = None) -> list[dict]:
    """``{"budget": b}`` for every b of :data:`BUDGETS` (plus ``extra``)."""
    return [{"budget": budget, **(extra or {})} for budget in BUDGETS]


SMALL_SETTINGS["selective_backprop"] = budget_settings()
# the optimizer question: SGD with momentum 0.9 at two learning rates beside the plan's Adam,
# and Adam with per-entry moments (tinyprop.optim.LazyAdam); chosen on validation like a setting
SGD_SETTINGS = [{"optimizer": "sgd", "lr": 0.01}, {"optimizer": "sgd", "lr": 0.05}]
# what the budget defaults (zeta = 1, skipped rows dropped, BatchNorm's backward over the
# trained rows, q0 = sqrt(b), a cheap output layer dense) were chosen against: BatchNorm's
# backward over every row, the defaults before the output layer was dense (a sparse output
# layer, also at b = 0.1 and from scratch), the earlier defaults (zeta = 0.5, skipped rows
# backpropagated), skipped rows backpropagated alone, and no skipping until the layers are as
# sparse as they go (all three with a sparse output layer)
SPARSE_OUTPUT = {"dense_output_layer": False}
BUDGET_ALTERNATIVES = [
    {"budget": 0.2, "batch_norm_trained_rows": False},  # the defaults before it existed
    {"budget": 0.2, **SPARSE_OUTPUT},
    {"budget": 0.1, **SPARSE_OUTPUT},
    {"budget": 0.2, "zeta": 0.5, "drop_skipped_rows": False, **SPARSE_OUTPUT},
    {"budget": 0.2, "drop_skipped_rows": False, **SPARSE_OUTPUT},
    {"budget": 0.2, "skip_split": 0.0, **SPARSE_OUTPUT},
]
# candidate defaults for ResNet-8 (Fashion-MNIST as the cifar10 stand-in lost 1.15 pp at b = 0.2),
# chosen on validation: a larger or smaller trained share at the start (q0 = b^0.25, b^0.75), a
# little more of the keep ratio to the top layers (zeta 0.9), dense small layers (ResNet-8's stem,
# fan-in 27), Ymax_l once per batch, and the step's loss averaged over the trained samples
BUDGET_CANDIDATES = [
    {"budget": 0.2, "skip_split": 0.25},
    {"budget": 0.2, "skip_split": 0.25, **SGD_SETTINGS[0]},
    {"budget": 0.2, "skip_split": 0.75},
    {"budget": 0.2, "zeta": 0.9},
    {"budget": 0.2, "dense_small_layers": True},
    {"budget": 0.2, "running_max_per_batch": True},
    {"budget": 0.2, "mean_over_trained": True},
    {"budget": 0.2, "mean_over_trained": True, **SGD_SETTINGS[0]},
]
# is the plan's Adam learning rate (1e-3 on the ResNet-8 pair) tuned? Twice it, for full and the
# budget alike, so each chooses its learning rate on validation; and SGD-momentum at half its 0.01
LEARNING_RATE_CHECK = {"lr": 0.002}
LEARNING_RATE_LOWER = {"lr": 0.0005}  # half the plan's: does a sparser gradient want smaller steps?
# the same budget spent unevenly over the run (tinyprop.budget): 1.5 b at the start falling to
# 0.5 b at the end, and the other way round
BUDGET_SCHEDULES = [{"budget": 0.2, "budget_schedule": a} for a in (0.5, -0.5)]
SGD_SLOWER = {"optimizer": "sgd", "lr": 0.005}
BUDGET_SETTINGS: dict[str, list[dict]] = {
    "full": [{}, *SGD_SETTINGS, LEARNING_RATE_CHECK, SGD_SLOWER, LEARNING_RATE_LOWER],
    "topk": budget_settings(MEPROP),
    "randomk": budget_settings(MEPROP),
    "tinyprop": budget_settings(),
    "tinypropv2": budget_settings()
    + [{"budget": 0.2, **sgd} for sgd in SGD_SETTINGS]
    + [{"budget": 0.2, "optimizer": "lazy_adam"}]
    + BUDGET_ALTERNATIVES
    + BUDGET_CANDIDATES
    + [{"budget": 0.2, **LEARNING_RATE_CHECK}, {"budget": 0.2, **SGD_SLOWER}]
    + [{"budget": 0.2, **LEARNING_RATE_LOWER}]
    + [{"budget": 0.3}]  # how much backward the ResNet-8 pair needs to come within 1 pp
    + BUDGET_SCHEDULES,
    "selective_backprop": budget_settings(),
}

PAPER_SETTINGS: dict[str, list[dict]] = {
    "full": [{}],
    "topk": [{"ratio": r, **MEPROP} for r in (0.02, 0.05, 0.1, 0.2, 0.3)],
    "randomk": [{"ratio": r, **MEPROP} for r in (0.05, 0.1, 0.2, 0.3)],
    "tinyprop": [{"zeta": z, "s_max": s} for z in (1.0, 0.75, 0.5) for s in (0.5, 0.9)],
    "tinypropv2": [
        {"zeta": z, "s_max": 0.9, "skip_threshold": t}
        for z in (1.0, 0.75, 0.5)
        for t in (0.1, 0.3, 0.5, 0.7)
    ]
    + budget_settings(),
    "selective_backprop": budget_settings(),
}

# the image stand-ins at 32x32, the whole training split (40 and 30 per class), a 7-block
# MobileNetV1-0.5: MobileNetV1-0.25 at 64x64 stayed near chance in 3 epochs
IMAGE_STAND_IN_PLAN = DatasetPlan(
    None,
    None,
    epochs=15,
    pretrain_epochs=20,
    lr=3e-3,
    variant="mobilenet-short",
    data_options=(("resolution", 32),),
)

SMALL = Suite(
    name="small",
    datasets={
        "mnist": DatasetPlan(20000, 5000, epochs=3, pretrain_epochs=1),
        "cifar10": DatasetPlan(2000, 2000, epochs=2, pretrain_epochs=3),
        "cifar100": DatasetPlan(3000, 2000, epochs=2, pretrain_epochs=3),
        "flowers102": IMAGE_STAND_IN_PLAN,
        "food101": IMAGE_STAND_IN_PLAN,
        # MFCCs standardised per coefficient (c0 spreads ~50 and the DS-CNN has no BatchNorm)
        "speech_commands": DatasetPlan(
            3000, 1000, epochs=15, pretrain_epochs=20, lr=3e-3, standardize="last_axis"
        ),
        "har": DatasetPlan(None, None, epochs=30, pretrain_epochs=30, batch_size=8),
        "dcase2020": DatasetPlan(5000, None, epochs=5, pretrain_epochs=2),
    },  # fmt: skip
    settings=SMALL_SETTINGS,
    notes={
        "sizes": "train_samples is the pool before the 10% validation split; finetune "
        "pretrains on half of the rest and trains on-device on the other half",
        "validation": "at least 2000 validation samples per seed where the training split "
        "has them outside the pool (cifar10, cifar100; mnist has 2000 from its pool): with "
        "200-300 samples a 1 pp tolerance is within the noise",
    },
    min_val_samples=2000,
)

PAPER = Suite(
    name="paper",
    datasets={
        "mnist": DatasetPlan(None, None, epochs=10, pretrain_epochs=10),
        "cifar10": DatasetPlan(None, None, epochs=30, pretrain_epochs=30, batch_size=64),
        "cifar100": DatasetPlan(None, None, epochs=30, pretrain_epochs=30, batch_size=64),
        "flowers102": DatasetPlan(None, None, epochs=30, pretrain_epochs=30),
        "food101": DatasetPlan(None, None, epochs=20, pretrain_epochs=20, batch_size=64),
        "speech_commands": DatasetPlan(None, None, epochs=20, pretrain_epochs=20, batch_size=64),
        "har": DatasetPlan(None, None, epochs=50, pretrain_epochs=50, batch_size=8),
        "dcase2020": DatasetPlan(None, None, epochs=30, pretrain_epochs=30, batch_size=64),
    },
    settings=PAPER_SETTINGS,
)

PAPER_SETTINGS["topk"] += budget_settings(MEPROP)
PAPER_SETTINGS["randomk"] += budget_settings(MEPROP)

# the small suite's datasets and sizes, every policy at the budgets only (equal compute), plus
# the real datasets besides the paper's eight: Fashion-MNIST on the MNIST MLP (sized as mnist)
# and the 8x8 digits (1,198 train digits: 120 validation, 539 pretraining, 539 on-device)
BUDGET = Suite(
    name="budget",
    datasets={
        **SMALL.datasets,
        "fashion_mnist": DatasetPlan(20000, 5000, epochs=3, pretrain_epochs=1),
        "digits": DatasetPlan(None, None, epochs=20, pretrain_epochs=20, batch_size=16),
    },
    settings=BUDGET_SETTINGS,
    notes=SMALL.notes,
    min_val_samples=SMALL.min_val_samples,
)

TINY = Suite(
    name="tiny",
    datasets={
        "tiny-blobs": DatasetPlan(None, None, epochs=2, pretrain_epochs=2, batch_size=16),
        "tiny-anomaly": DatasetPlan(None, None, epochs=2, pretrain_epochs=2, batch_size=16),
    },
    settings={
        "full": [{}],
        "topk": [{"ratio": 0.2}],
        "randomk": [{"ratio": 0.2}],
        "tinyprop": [{}],
        "tinypropv2": [{"skip_threshold": 0.3}, {"skip_threshold": 0.6}],
        "selective_backprop": [{"budget": 0.3}],
    },
    seeds=(0,),
)

SUITES = {suite.name: suite for suite in (SMALL, PAPER, BUDGET, TINY)}


def get(name: str) -> Suite:
    """The suite called ``name`` (``small``, ``paper``, ``budget`` or ``tiny``)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {list(SUITES)}")
    return SUITES[name]


def settings_label(settings: dict) -> str:
    """A short stable label of a settings dict, e.g. ``ratio=0.1`` or ``default``.

    Example:
        >>> settings_label({"zeta": 1.0, "skip_threshold": 0.3})
        'skip_threshold=0.3,zeta=1.0'
    """
    if not settings:
        return "default"
    return ",".join(f"{key}={settings[key]}" for key in sorted(settings))
