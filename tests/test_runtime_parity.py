"""Parity of the C runtime with the Python library: same weights, data, settings and batches.

Every model (an MLP, a small CNN with a depthwise conv, the HAR 1-D CNN, a CNN with ReLU6,
LeakyReLU, Sigmoid and Tanh, one with SiLU, GELU, Hardswish, Hardsigmoid and Mish) runs
several training steps under every policy in C (through ctypes) and in
``tinyprop.train_step``; after every step the weights agree within 1e-5 relative (float32),
and the k per layer and sample, the skip decisions, the running maxima and the MAC counts
agree exactly.

Ties among equal |δ| (an average pool hands the same error to every position it covers) go to
the lower index, in C and in the library's ``select_topk`` alike, so the tests run the library
as it is.
"""

from __future__ import annotations

import copy
import ctypes
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import models
from tinyprop.export.arena import plan_arena
from tinyprop.export.graph import arena_bytes
from tinyprop.export.runtime import (
    OptimizerSpec,
    RuntimeModel,
    StepStatsC,
    build_library,
    load_library,
)
from tinyprop.memory import MemoryMode, freeze, train_step_in_place
from tinyprop.moments import Adam8bit

POLICIES = ("full", "topk", "tinyprop", "tinypropv2")


@pytest.fixture(scope="module")
def library():
    return load_library()


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(36, 24),
        nn.ReLU(),
        nn.Linear(24, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def cnn_depthwise() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),  # (B, 6, 6, 6)
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),  # depthwise (B, 6, 3, 3)
        nn.ReLU(),
        nn.Conv2d(6, 8, 1),  # pointwise
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),  # (B, 8, 2, 2)
        nn.AvgPool2d(2),  # (B, 8, 1, 1)
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def har() -> nn.Module:
    return models.build("har", input_shape=(6, 40), channels=8)


def activations() -> nn.Module:
    """The runtime's other activations: ReLU6 (saturating at 6: the first conv's weights
    scaled up), LeakyReLU, Sigmoid and Tanh."""
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # (B, 4, 6, 6)
        nn.ReLU6(),
        nn.MaxPool2d(2),  # (B, 4, 3, 3)
        nn.Conv2d(4, 6, 1),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(54, 16),
        nn.Sigmoid(),
        nn.Linear(16, 12),
        nn.Tanh(),
        nn.Linear(12, 5),
    )
    with torch.no_grad():
        net[0].weight.mul_(6.0)
    return net


def smooth_activations() -> nn.Module:
    """The activations whose derivative needs their input (an output of their own, the input
    kept): SiLU after a conv and on a max pool's input, Hardswish (the first conv's weights
    scaled up so that some inputs lie beyond ±3), GELU after an in-place ReLU, Mish with a Tanh
    in place after it, GELU's tanh form and Hardsigmoid (MobileNetV3 / EfficientNet blocks)."""
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # (B, 4, 6, 6)
        nn.Hardswish(),
        nn.MaxPool2d(2),  # (B, 4, 3, 3)
        nn.Conv2d(4, 6, 1),
        nn.ReLU(),
        nn.GELU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(54, 16),
        nn.Mish(),
        nn.Tanh(),
        nn.Linear(16, 12),
        nn.GELU(approximate="tanh"),
        nn.Linear(12, 8),
        nn.Hardsigmoid(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        net[0].weight.mul_(4.0)
    return net


def settings_activations() -> nn.Module:
    """The activations with settings that work in place, their derivative from their output:
    Hardtanh(-0.5, 0.8) after a conv whose weights are scaled up (so that it saturates on both
    sides), CELU(0.7) after a pointwise conv, SELU, ELU(0.5, inplace=True) (PyTorch then takes
    its derivative from the output too), ELU on the logits' input."""
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # (B, 4, 6, 6)
        nn.Hardtanh(-0.5, 0.8),
        nn.MaxPool2d(2),  # (B, 4, 3, 3)
        nn.Conv2d(4, 6, 1),
        nn.CELU(0.7),
        nn.Flatten(),
        nn.Linear(54, 16),
        nn.SELU(),
        nn.Linear(16, 12),
        nn.ELU(0.5, inplace=True),
        nn.Linear(12, 8),
        nn.ELU(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        net[0].weight.mul_(4.0)
    return net


# name -> (builder, one sample's shape, SGD learning rate that makes some samples get skipped)
MODELS = {
    "mlp": (mlp, (1, 6, 6), 0.05),
    "cnn_depthwise": (cnn_depthwise, (2, 6, 6), 0.2),
    "har": (har, (6, 40), 0.05),
    "activations": (activations, (2, 6, 6), 0.1),
    "smooth_activations": (smooth_activations, (2, 6, 6), 0.1),
    "settings_activations": (settings_activations, (2, 6, 6), 0.1),
}


def batches(shape, classes, steps, batch_size, seed):
    """A learnable task: class prototypes plus noise, so errors spread and samples get skipped."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, *shape, generator=generator)
    for _ in range(steps):
        y = torch.randint(0, classes, (batch_size,), generator=generator)
        x = 2.0 * prototypes[y] + 0.7 * torch.randn(batch_size, *shape, generator=generator)
        yield x, y


def torch_optimizer(spec: OptimizerSpec, parameters, moment_bits: int = 32):
    if spec.kind == "adam" and moment_bits == 8:
        return Adam8bit(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.kind == "adam":
        return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(
        parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def assert_close_but_code_flips(c_value, python_value, scale, lr, where):
    """8-bit moments: C and the mirror run the same operations, but an entry whose float lands
    within the last bits of a rounding boundary can round to the neighbouring code on one side
    (their gradients differ in the last bits: the order of additions), which moves that weight
    by a fraction of a step. Every entry within 1e-5 relative but at most 1% of them (at least
    one), and those within one learning rate."""
    close = np.isclose(c_value, python_value, rtol=1e-5, atol=1e-5 * scale)
    assert (~close).sum() <= max(1, 0.01 * close.size), f"{where}: {(~close).sum()} entries"
    np.testing.assert_allclose(c_value, python_value, rtol=0, atol=lr, err_msg=where)


def run_parity(library, model_name, config, optimizer, steps=6, batch_size=8, seed=0, memory=None):
    """Train in C and in Python side by side; assert agreement after every step.

    ``memory``: a :class:`MemoryMode`; the Python side freezes the same layers and, with
    ``sgd_in_place`` or ``adam_in_place``, steps once per sample (:func:`train_step_in_place`);
    with ``moment_bits`` 8 it runs :class:`tinyprop.moments.Adam8bit`."""
    build, shape, _ = MODELS[model_name]
    memory = memory or MemoryMode()
    torch.manual_seed(seed)
    reference = build()
    c_model = RuntimeModel(reference, shape, config, optimizer, library, memory)
    python_model = copy.deepcopy(reference)
    freeze(python_model, memory)
    python_model = tinyprop.apply(python_model, config)
    python_optimizer = torch_optimizer(
        optimizer, [p for p in python_model.parameters() if p.requires_grad], memory.moment_bits
    )
    step_function = train_step_in_place if memory.in_place else tinyprop.train_step
    trained_layers = [  # (column among the dense/conv layers, name); bias-only ones too
        (column, name)
        for column, (name, module) in enumerate(tinyprop.model.state_of(python_model).layers)
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    classes = c_model.layers[-1].output_size
    trained = skipped = 0
    for step, (x, y) in enumerate(batches(shape, classes, steps, batch_size, seed)):
        python_stats = step_function(python_model, x, y, loss_fn, python_optimizer)
        c_stats = c_model.train_batch(x.numpy(), y.numpy())
        where = f"{model_name}/{config.policy}/{optimizer.kind}/{memory} step {step}"
        assert c_stats.trained_mask.tolist() == python_stats.trained_mask.tolist(), where
        # every mode: the runtime counts the trained layers' work as the library's ledger
        # does (a first layer that trains its bias only: its dense bias gradient, both sides)
        assert c_stats.macs == python_stats.macs, where
        assert c_stats.loss == pytest.approx(python_stats.loss, rel=1e-5), where
        for column, name in trained_layers:
            if column == memory.first_trained_layer and column in memory.bias_only_layers:
                continue  # a first layer that trains its bias only selects nothing (dense)
            if name not in python_stats.keep:  # no k recorded: nothing trained, or full
                assert config.policy == "full" or c_stats.trained == 0, f"{where}: {name}"
                continue
            python_keep = python_stats.keep[name]
            c_keep = c_stats.keep[c_stats.trained_mask, column]
            c_keep = c_keep[c_keep > 0]  # 0: this sample's error was zero here (no k recorded)
            assert c_keep.tolist() == python_keep.tolist(), f"{where}: k of layer {name}"
        state = python_model.state_dict()
        for name, c_value in c_model.parameters().items():
            python_value = state[name].numpy().reshape(-1)
            scale = float(np.abs(python_value).max())
            if memory.moment_bits == 8:
                assert_close_but_code_flips(c_value, python_value, scale, optimizer.lr,
                                            f"{where}: {name}")  # fmt: skip
                continue
            np.testing.assert_allclose(
                c_value, python_value, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{where}: {name}"
            )
        if config.adaptive:
            layer_max, output_max = c_model.running_max()
            python_max = [
                float(m.error_max) for _, m in tinyprop.model.state_of(python_model).layers
            ]
            np.testing.assert_allclose(layer_max, python_max, rtol=1e-5, err_msg=where)
            if config.skips:
                expected = float(getattr(python_model, tinyprop.model.OUTPUT_ERROR_MAX))
                assert output_max == pytest.approx(expected, rel=1e-5), where
        trained += c_stats.trained
        skipped += c_stats.skipped
    return c_model, trained, skipped


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("policy", POLICIES)
def test_parity_sgd_momentum(library, model_name, policy):
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=MODELS[model_name][2], momentum=0.9, weight_decay=1e-4)
    c_model, trained, skipped = run_parity(library, model_name, config, optimizer)
    if policy == "tinypropv2":  # the skip decision was exercised both ways
        assert trained > 0 and skipped > 0, (trained, skipped)
    else:
        assert skipped == 0


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("policy", ["full", "tinypropv2"])
def test_parity_adam(library, model_name, policy):
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    run_parity(library, model_name, config, OptimizerSpec("adam", lr=0.01), steps=4)


def test_parity_topk_small_ratio_and_v1_settings(library):
    run_parity(library, "har", tinyprop.TinyPropConfig("topk", ratio=0.05), OptimizerSpec(lr=0.1))
    notebook = tinyprop.PRESETS["tinyprop-notebook"]
    run_parity(library, "cnn_depthwise", notebook, OptimizerSpec(lr=0.1, momentum=0.5))


def test_parity_of_the_zero_skipping_build():
    """-DTP_SKIP_ZERO_ERRORS=1 (the benchmark's extra baseline) only leaves out zero terms."""
    library = load_library(build_library(("-O3", "-DTP_SKIP_ZERO_ERRORS=1")))
    for model_name in ("har", "cnn_depthwise"):
        for policy in ("full", "topk", "tinypropv2"):
            config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
            optimizer = OptimizerSpec("sgd", lr=MODELS[model_name][2], momentum=0.9)
            run_parity(library, model_name, config, optimizer, steps=3)


def test_arena_size_is_what_training_uses(library):
    for model_name, (build, shape, _) in MODELS.items():
        for policy in POLICIES:
            config = tinyprop.TinyPropConfig(policy=policy)
            for optimizer in (OptimizerSpec(), OptimizerSpec(momentum=0.9), OptimizerSpec("adam")):
                c_model = RuntimeModel(build(), shape, config, optimizer, library)
                _, used = c_model.totals()
                expected = arena_bytes(c_model.layers, policy, optimizer.kind, optimizer.momentum)
                assert c_model.arena_bytes == used == expected, (model_name, policy, optimizer)


def test_predict_matches_pytorch_forward(library):
    for build, shape, _ in MODELS.values():
        torch.manual_seed(3)
        net = build()
        c_model = RuntimeModel(
            net, shape, tinyprop.TinyPropConfig("full"), OptimizerSpec(), library
        )
        x = torch.randn(1, *shape)
        with torch.no_grad():
            expected = net(x)[0].numpy()
        np.testing.assert_allclose(c_model.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)


def test_runtime_rejects_bad_input(library):
    c_model = RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), OptimizerSpec(), library)
    x = np.zeros((2, 1, 6, 6), dtype=np.float32)
    with pytest.raises(RuntimeError, match="label is outside"):
        c_model.train_batch(x, np.array([0, 5]))
    x[1, 0, 0, 0] = np.nan
    before = c_model.parameters()
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        c_model.train_batch(x, np.array([0, 1]))
    for name, value in c_model.parameters().items():
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(ValueError, match="randomk"):
        RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig("randomk"), OptimizerSpec(), library)
    with pytest.raises(ValueError, match="SGD dampening"):
        OptimizerSpec.from_torch(torch.optim.SGD(mlp().parameters(), lr=0.1, dampening=0.5))


# memory modes: (model, first trained dense/conv layer) pairs that freeze a conv, a depthwise
# conv and everything but the classifier
FROZEN = [
    ("mlp", 1), ("cnn_depthwise", 2), ("har", 2), ("har", 3), ("smooth_activations", 2),
    ("settings_activations", 3),
]  # fmt: skip


def runs_with_adam_and_sgd(library, model_name, config, memory):
    """Four parity steps under a memory mode with Adam, then with SGD with momentum: yields the
    C model and its parameters before and after each run (the runs train some sample)."""
    for optimizer in (
        OptimizerSpec("adam", lr=0.01),
        OptimizerSpec("sgd", lr=MODELS[model_name][2], momentum=0.9, weight_decay=1e-4),
    ):
        torch.manual_seed(0)
        before = RuntimeModel(MODELS[model_name][0](), MODELS[model_name][1], config, optimizer,
                              library, memory).parameters()  # fmt: skip
        c_model, trained, _ = run_parity(
            library, model_name, config, optimizer, steps=4, memory=memory
        )
        assert trained > 0
        yield c_model, before, c_model.parameters()


@pytest.mark.parametrize(("model_name", "first"), FROZEN)
@pytest.mark.parametrize("policy", ["full", "tinypropv2"])
def test_parity_frozen_layers(library, model_name, first, policy):
    """Frozen layers (weights read from the spec) and the last layers trained: the same run as
    the library with requires_grad False on the frozen layers, Adam and SGD with momentum."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    memory = MemoryMode(first)
    for c_model, before, after in runs_with_adam_and_sgd(library, model_name, config, memory):
        for layer in c_model.trainable[:first]:  # frozen: exactly as they were
            np.testing.assert_array_equal(
                after[f"{layer.path}.weight"], before[f"{layer.path}.weight"]
            )


# bias-only layers (weights frozen, bias trained, error passed on; a ReLU before them keeps a
# bit mask): (model, first trained layer, bias-only layers): the depthwise and pointwise convs
# of the CNN (the first conv's weights train), the depthwise one alone, a dense layer of the
# MLP, a conv of the HAR CNN behind frozen layers
BIAS_ONLY = [
    ("cnn_depthwise", 0, (1, 2)),
    ("cnn_depthwise", 0, (1,)),
    ("mlp", 0, (1,)),
    ("har", 1, (2,)),
    ("activations", 0, (1, 3)),  # after a max pool of ReLU6, after a Sigmoid
    ("smooth_activations", 0, (2, 3)),  # after a GELU, after a SiLU (inputs still kept)
    ("settings_activations", 0, (1, 3)),  # after a max pool of Hardtanh, after a SELU
]


@pytest.mark.parametrize(("model_name", "first", "bias_only"), BIAS_ONLY)
@pytest.mark.parametrize("policy", ["full", "topk", "tinypropv2"])
def test_parity_bias_only_layers(library, model_name, first, bias_only, policy):
    """Bias-only layers: the same run as the library with requires_grad False on their
    weights (Adam and SGD with momentum); their weights stay exactly as they were."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    memory = MemoryMode(first, bias_only_layers=bias_only)
    for c_model, before, after in runs_with_adam_and_sgd(library, model_name, config, memory):
        for index in bias_only:
            name = f"{c_model.trainable[index].path}.weight"
            np.testing.assert_array_equal(after[name], before[name])
            bias = f"{c_model.trainable[index].path}.bias"
            assert not np.array_equal(after[bias], before[bias]), bias


@pytest.mark.parametrize(("model_name", "first"), [("mlp", 0), ("cnn_depthwise", 0), ("har", 2)])
@pytest.mark.parametrize("policy", ["full", "topk", "tinypropv2"])
def test_parity_sgd_in_place(library, model_name, first, policy):
    """In-place SGD: every trained sample is its own step, as the library's per-sample loop."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=MODELS[model_name][2], weight_decay=1e-3)
    _, trained, _ = run_parity(
        library, model_name, config, optimizer, steps=3, memory=MemoryMode(first, True)
    )
    assert trained > 0


# momentum in place (the batch gradient gathered in the SGD momentum buffer): every layer, with
# bias-only layers, behind frozen layers
MOMENTUM_IN_PLACE = [
    MemoryMode(0, momentum_in_place=True),
    MemoryMode(0, bias_only_layers=(1, 2), momentum_in_place=True),
    MemoryMode(2, momentum_in_place=True),
]


@pytest.mark.parametrize("memory", MOMENTUM_IN_PLACE)
@pytest.mark.parametrize("policy", ["full", "topk", "tinypropv2"])
@pytest.mark.parametrize("batch_size", [8, 6])
def test_parity_momentum_in_place(library, memory, policy, batch_size):
    """SGD momentum without a gradient buffer: the same run as torch.optim.SGD(momentum=0.9,
    weight_decay) (a batch of 6 is not a power of two: the buffer's scaling by the batch size
    rounds there, still within 1e-5)."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    _, trained, _ = run_parity(
        library, "cnn_depthwise", config, optimizer, steps=6, batch_size=batch_size,
        memory=memory,
    )  # fmt: skip
    assert trained > 0


def test_parity_momentum_in_place_har(library):
    """The HAR CNN behind a frozen conv with bias-only layers, momentum in place."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=MODELS["har"][2], momentum=0.9)
    memory = MemoryMode(1, bias_only_layers=(2,), momentum_in_place=True)
    _, trained, _ = run_parity(library, "har", config, optimizer, steps=4, memory=memory)
    assert trained > 0


# selection in place (top-k chosen in delta itself, no selection scratch): every layer, with
# bias-only layers (the first trained one too), behind frozen layers, with momentum in place
SELECTION_IN_PLACE = [
    ("cnn_depthwise", MemoryMode(0, selection_in_place=True)),
    ("cnn_depthwise", MemoryMode(0, bias_only_layers=(0, 1, 2), selection_in_place=True)),
    ("mlp", MemoryMode(0, bias_only_layers=(1,), selection_in_place=True)),
    ("har", MemoryMode(1, selection_in_place=True)),
    ("activations", MemoryMode(0, selection_in_place=True)),
    ("smooth_activations", MemoryMode(1, selection_in_place=True)),
    ("settings_activations", MemoryMode(0, selection_in_place=True)),
]


@pytest.mark.parametrize(("model_name", "memory"), SELECTION_IN_PLACE)
@pytest.mark.parametrize("policy", ["topk", "tinyprop", "tinypropv2"])
def test_parity_selection_in_place(library, model_name, memory, policy):
    """The same kept entries as the scratch-based selection: the library's run, Adam and SGD
    with momentum (the second one also with momentum in place)."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    for _ in runs_with_adam_and_sgd(library, model_name, config, memory):
        pass
    optimizer = OptimizerSpec("sgd", lr=MODELS[model_name][2], momentum=0.9)
    _, trained, _ = run_parity(
        library, model_name, config, optimizer, steps=4,
        memory=replace(memory, momentum_in_place=True),
    )  # fmt: skip
    assert trained > 0


def test_selection_in_place_equals_the_scratch_selection(library):
    """Weights after training with and without selection_in_place agree to float rounding
    (the same kept entries; where a selection keeps zero errors, k above the non-zero count,
    the scratch-based backward pairs them with other channels and the in-place one skips
    them, so a few additions pair up differently)."""
    for model_name, memory in SELECTION_IN_PLACE:
        build, shape, lr = MODELS[model_name]
        for policy in ("topk", "tinypropv2"):
            config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
            weights = []
            for lean in (False, True):
                torch.manual_seed(0)
                optimizer = OptimizerSpec(lr=lr, momentum=0.9)
                lean_memory = replace(memory, selection_in_place=lean)
                c_model = RuntimeModel(build(), shape, config, optimizer, library, lean_memory)
                for x, y in batches(shape, c_model.layers[-1].output_size, 4, 8, 0):
                    c_model.train_batch(x.numpy(), y.numpy())
                weights.append(c_model.parameters())
            for name, value in weights[0].items():
                np.testing.assert_allclose(weights[1][name], value, rtol=1e-6, atol=1e-7,
                                           err_msg=name)  # fmt: skip


def checked_arena(library, model_name, policy, optimizer, memory):
    """The C model of `model_name` under `memory`, its arena checked three ways:
    tp_arena_bytes_mode = the bytes tp_init_mode lays out = the Python plan."""
    build, shape, _ = MODELS[model_name]
    config = tinyprop.TinyPropConfig(policy=policy)
    c_model = RuntimeModel(build(), shape, config, optimizer, library, memory)
    expected = arena_bytes(c_model.layers, policy, optimizer.kind, optimizer.momentum, memory)
    where = (model_name, memory, policy, optimizer.kind)
    assert c_model.arena_bytes == c_model.totals()[1] == expected, where
    return c_model


def test_arena_of_every_mode_is_what_training_uses(library):
    """tp_arena_bytes_mode = the bytes tp_init_mode lays out = the Python plan."""
    for model_name, (build, _, _) in MODELS.items():
        count = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in build().modules())
        for first in range(count):
            for in_place in (False, True):
                optimizers = (
                    [OptimizerSpec(weight_decay=1e-4)]
                    if in_place
                    else [OptimizerSpec(momentum=0.9), OptimizerSpec("adam")]
                )
                for optimizer in optimizers:
                    for policy in ("full", "tinypropv2"):
                        memory = MemoryMode(first, in_place)
                        checked_arena(library, model_name, policy, optimizer, memory)
    for model_name, first, bias_only in BIAS_ONLY:
        memory = MemoryMode(first, bias_only_layers=bias_only)
        for optimizer in (OptimizerSpec(momentum=0.9), OptimizerSpec("adam")):
            for policy in ("full", "tinypropv2"):
                checked_arena(library, model_name, policy, optimizer, memory)
    for model_name, memory in SELECTION_IN_PLACE:
        for policy in ("topk", "tinypropv2"):
            checked_arena(library, model_name, policy, OptimizerSpec("adam"), memory)
    for memory in MOMENTUM_IN_PLACE:
        for policy in ("full", "tinypropv2"):
            c_model = checked_arena(
                library, "cnn_depthwise", policy, OptimizerSpec(momentum=0.9), memory
            )
            expected = c_model.arena_bytes
            without = plan_arena(c_model.layers, policy, "sgd", 0.9, replace(memory,
                                 momentum_in_place=False))  # fmt: skip
            assert without.bytes - expected == 4 * without.gradients > 0, memory  # no gradients


def test_memory_mode_rejects_what_it_cannot_do(library):
    with pytest.raises(ValueError, match="sgd_in_place needs plain SGD"):
        RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), OptimizerSpec("adam"), library,
                     MemoryMode(0, True))  # fmt: skip
    with pytest.raises(RuntimeError, match="out of range"):
        RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), OptimizerSpec(), library,
                     MemoryMode(3))  # fmt: skip


LEAN_ADAM = [  # (model, memory): Adam in place, 8-bit moments, recomputed inputs, and mixes
    ("mlp", MemoryMode(0, adam_in_place=True)),
    ("cnn_depthwise", MemoryMode(0, adam_in_place=True, selection_in_place=True)),
    ("har", MemoryMode(1, adam_in_place=True, moment_bits=8)),
    ("mlp", MemoryMode(0, moment_bits=8)),
    ("cnn_depthwise", MemoryMode(0, moment_bits=8)),
    ("har", MemoryMode(0, moment_bits=8, recompute_layers=(1, 2, 3))),
    ("cnn_depthwise", MemoryMode(0, recompute_layers=(1, 2, 3))),
    ("mlp", MemoryMode(0, recompute_layers=(1, 2))),
    ("activations", MemoryMode(0, recompute_layers=(1, 2, 3, 4))),  # activations in place
    ("settings_activations", MemoryMode(0, recompute_layers=(1, 2, 3, 4))),  # likewise
    # SiLU and the like recomputed as any layer with an output; their own inputs kept
    ("smooth_activations", MemoryMode(0, recompute_layers=(1, 2, 3, 4, 5, 6))),
    (
        "smooth_activations",
        MemoryMode(1, adam_in_place=True, moment_bits=8, recompute_layers=(2, 4)),
    ),  # fmt: skip
    (
        "cnn_depthwise",  # the keyword model's mode on a small DS-CNN
        MemoryMode(
            0,
            bias_only_layers=(0, 1),
            adam_in_place=True,
            moment_bits=8,
            recompute_layers=(2, 3),
            selection_in_place=True,
        ),
    ),
]


@pytest.mark.parametrize(("model_name", "memory"), LEAN_ADAM)
@pytest.mark.parametrize("policy", ["full", "tinypropv2"])
def test_parity_lean_adam(library, model_name, memory, policy):
    """Adam per sample in place, 8-bit moments (tinyprop.moments.Adam8bit) and recomputed
    inputs: the C runtime against the library's mirror, step by step."""
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    optimizer = OptimizerSpec("adam", lr=0.01, weight_decay=1e-4 if memory.adam_in_place else 0)
    run_parity(library, model_name, config, optimizer, steps=4, memory=memory)


@pytest.mark.parametrize("policy", ["full", "tinypropv2"])
def test_recomputed_inputs_give_the_same_floats(library, policy):
    """Recomputing a layer's input for its backward runs the same forward on the same floats:
    the weights after training equal those of the kept-input run bit for bit."""
    build, shape, _ = MODELS["cnn_depthwise"]
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.9)
    weights = []
    for recompute in ((), (1, 2, 3)):
        memory = MemoryMode(0, bias_only_layers=(0,), adam_in_place=True, moment_bits=8,
                            recompute_layers=recompute)  # fmt: skip
        torch.manual_seed(0)
        c_model = RuntimeModel(build(), shape, config, OptimizerSpec("adam", lr=0.01), library,
                               memory)  # fmt: skip
        for x, y in batches(shape, c_model.layers[-1].output_size, 4, 8, 0):
            c_model.train_batch(x.numpy(), y.numpy())
        weights.append(c_model.parameters())
    for name, value in weights[0].items():
        np.testing.assert_array_equal(weights[1][name], value, err_msg=name)


def test_arena_of_the_lean_adam_modes(library):
    """tp_arena_bytes_mode = what tp_init_mode lays out = the Python plan; recomputing and
    8-bit moments make it smaller on the small DS-CNN."""
    for model_name, memory in LEAN_ADAM:
        for policy in ("full", "tinypropv2"):
            c_model = checked_arena(library, model_name, policy, OptimizerSpec("adam"), memory)
            expected = c_model.arena_bytes
            plain = plan_arena(c_model.layers, policy, "adam", 0.0,
                               replace(memory, moment_bits=32))  # fmt: skip
            if memory.moment_bits == 8:
                assert expected < plain.bytes, memory


def test_lean_adam_modes_reject_what_they_cannot_do(library):
    sgd = OptimizerSpec("sgd", lr=0.1)
    for memory, message in (
        (MemoryMode(0, adam_in_place=True), "need Adam"),
        (MemoryMode(0, moment_bits=8), "need Adam"),
    ):
        with pytest.raises(ValueError, match=message):
            RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), sgd, library, memory)
    with pytest.raises(ValueError, match="after first_trained_layer"):
        MemoryMode(1, recompute_layers=(1,))
    with pytest.raises(ValueError, match="must not be bias-only"):
        MemoryMode(0, bias_only_layers=(1,), recompute_layers=(1,))
    with pytest.raises(ValueError, match="moment_bits must be 32 or 8"):
        MemoryMode(0, moment_bits=16)
    with pytest.raises(RuntimeError, match="out of range"):  # the MLP has 3 dense layers
        RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), OptimizerSpec("adam"), library,
                     MemoryMode(0, recompute_layers=(3,)))  # fmt: skip


ONE_AT_A_TIME = [  # (model, memory, optimizer): the update kinds a batch can end with
    ("cnn_depthwise", MemoryMode(), OptimizerSpec(lr=0.2, momentum=0.9, weight_decay=1e-4)),
    ("cnn_depthwise", MemoryMode(0, momentum_in_place=True), OptimizerSpec(lr=0.2, momentum=0.9)),
    ("har", MemoryMode(2, sgd_in_place=True), OptimizerSpec(lr=0.05)),
    ("mlp", MemoryMode(0, adam_in_place=True, moment_bits=8), OptimizerSpec("adam", lr=0.01)),
    ("cnn_depthwise", MemoryMode(0, bias_only_layers=(0, 1), selection_in_place=True),
     OptimizerSpec("adam", lr=0.01)),
]  # fmt: skip


@pytest.mark.parametrize(("model_name", "memory", "optimizer"), ONE_AT_A_TIME)
def test_samples_fed_one_at_a_time_train_as_the_whole_batch(library, model_name, memory, optimizer):
    """tp_batch_begin / tp_batch_add per sample / tp_batch_end: the same floats, k, skips and
    MACs as tp_train_batch with the whole batch (a device holds one sample, not the batch)."""
    build, shape, _ = MODELS[model_name]
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    torch.manual_seed(0)
    reference = build()
    whole, one_at_a_time = (
        RuntimeModel(copy.deepcopy(reference), shape, config, optimizer, library, memory)
        for _ in range(2)
    )
    trained = 0
    for x, y in batches(shape, whole.layers[-1].output_size, 4, 8, 0):
        expected = whole.train_batch(x.numpy(), y.numpy())
        got = one_at_a_time.train_one_at_a_time(x.numpy(), y.numpy())
        assert (got.loss, got.trained, got.macs) == (expected.loss, expected.trained, expected.macs)
        np.testing.assert_array_equal(got.keep, expected.keep)
        np.testing.assert_array_equal(got.trained_mask, expected.trained_mask)
        for name, value in whole.parameters().items():
            np.testing.assert_array_equal(one_at_a_time.parameters()[name], value, err_msg=name)
        trained += got.trained
    assert trained > 0


def test_a_batch_fed_one_at_a_time_is_checked(library):
    """Too few samples before the end, too many, a bad label or a NaN value (the batch goes on
    without that sample) and a sample whose loss is not finite (the model stays as it was and
    the batch is cancelled)."""
    c_model = RuntimeModel(mlp(), (1, 6, 6), tinyprop.TinyPropConfig(), OptimizerSpec(), library)
    lib, model = c_model.lib, c_model.model
    batch = ctypes.create_string_buffer(lib.tp_batch_struct_bytes())
    stats = StepStatsC()
    x = np.ones((1, 6, 6), dtype=np.float32)
    status = {name: code for code, name in enumerate(
        ["ok", "null", "argument", "shape", "arena", "label", "nonfinite", "state"])}  # fmt: skip
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 0, None, None) == -status["state"]
    assert lib.tp_batch_begin(model, batch, 2) == 0
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 5, None, None) == -status["label"]
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 1, None, None) == 0
    assert lib.tp_batch_end(model, batch, ctypes.byref(stats)) == -status["argument"]
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 2, None, None) == 0
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 3, None, None) == -status["state"]
    assert lib.tp_batch_end(model, batch, ctypes.byref(stats)) == 0
    assert stats.trained + stats.skipped == 2
    before = c_model.parameters()
    assert lib.tp_batch_begin(model, batch, 2) == 0
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 0, None, None) == 0
    x[0, 0, 0] = np.nan
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 1, None, None) == -status["nonfinite"]
    assert lib.tp_batch_end(model, batch, ctypes.byref(stats)) == -status["argument"]  # pending
    x[:] = 3e38  # finite values whose forward overflows: the loss is not finite
    assert lib.tp_batch_add(model, batch, x.ctypes.data, 1, None, None) == -status["nonfinite"]
    assert lib.tp_batch_end(model, batch, ctypes.byref(stats)) == -status["state"]
    for name, value in c_model.parameters().items():
        np.testing.assert_array_equal(value, before[name])
