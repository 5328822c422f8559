"""How closely the C runtime follows PyTorch through its activations (ReLU, ReLU6, LeakyReLU,
Sigmoid, Tanh, ELU, CELU, SELU, Hardtanh, whose derivative the runtime takes from their
output, and SiLU, GELU in both forms, Hardswish, Hardsigmoid, Mish, whose derivative it takes
from their kept input): for a small model per activation (and one with the
first four), the largest absolute difference of the logits (forward), and of the weights
after N training steps under each policy (sparse backward and SGD-momentum updates in C
against ``tinyprop.train_step``), with the skip decisions and k per layer compared for
equality.

    python benchmarks/activation_parity.py              # 20 steps of 8 samples
    python benchmarks/activation_parity.py --steps 50
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

import tinyprop
from tinyprop.export.runtime import OptimizerSpec, RuntimeModel, load_library

SHAPE = (2, 6, 6)


def model(activation: nn.Module | None) -> nn.Module:
    """conv 3x3 -> activation -> max pool -> pointwise conv -> activation -> flatten ->
    linear -> activation -> linear; with None, ReLU6, LeakyReLU(0.1), Sigmoid and Tanh in
    turn. The first conv's weights are scaled up so that ReLU6 saturates at 6."""
    first, second, third = (
        (nn.ReLU6(), nn.LeakyReLU(0.1), nn.Sigmoid())
        if activation is None
        else (copy.deepcopy(activation), copy.deepcopy(activation), copy.deepcopy(activation))
    )
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), first, nn.MaxPool2d(2),  # (B, 4, 3, 3)
        nn.Conv2d(4, 6, 1), second, nn.Flatten(),
        nn.Linear(54, 16), third, nn.Linear(16, 12),
        nn.Tanh() if activation is None else copy.deepcopy(activation), nn.Linear(12, 5),
    )  # fmt: skip
    with torch.no_grad():
        net[0].weight.mul_(6.0)
    return net


def batches(steps: int, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(5, *SHAPE, generator=generator)
    for _ in range(steps):
        y = torch.randint(0, 5, (batch_size,), generator=generator)
        yield 2.0 * prototypes[y] + 0.7 * torch.randn(batch_size, *SHAPE, generator=generator), y


def compare(library, build, policy: str, steps: int) -> dict:
    torch.manual_seed(0)
    reference = build()
    config = tinyprop.TinyPropConfig(policy, skip_threshold=0.9)
    optimizer = OptimizerSpec("sgd", lr=0.02, momentum=0.9)
    c_model = RuntimeModel(reference, SHAPE, config, optimizer, library)
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        expected = reference(x).numpy()
    forward = max(
        float(np.abs(c_model.predict(x[i].numpy()) - expected[i]).max()) for i in range(16)
    )
    python_model = tinyprop.apply(copy.deepcopy(reference), config)
    python_optimizer = torch.optim.SGD(python_model.parameters(), lr=0.02, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    same_skips = same_k = True
    trained = 0
    for x, y in batches(steps, 8):
        python_stats = tinyprop.train_step(python_model, x, y, loss_fn, python_optimizer)
        c_stats = c_model.train_batch(x.numpy(), y.numpy())
        same_skips &= c_stats.trained_mask.tolist() == python_stats.trained_mask.tolist()
        for column, name in enumerate(python_stats.keep):
            c_keep = c_stats.keep[c_stats.trained_mask, column]
            same_k &= c_keep[c_keep > 0].tolist() == python_stats.keep[name].tolist()
        trained += c_stats.trained
    state = python_model.state_dict()
    weights = max(
        float(np.abs(value - state[name].numpy().reshape(-1)).max())
        for name, value in c_model.parameters().items()
    )
    scale = max(float(v.abs().max()) for v in state.values() if v.dtype.is_floating_point)
    return {
        "forward": forward,
        "weights": weights,
        "relative": weights / scale,
        "same_skips": same_skips,
        "same_k": same_k,
        "trained": trained,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    library = load_library()
    builds = {
        "ReLU": lambda: model(nn.ReLU()),
        "ReLU6": lambda: model(nn.ReLU6()),
        "LeakyReLU(0.1)": lambda: model(nn.LeakyReLU(0.1)),
        "Sigmoid": lambda: model(nn.Sigmoid()),
        "Tanh": lambda: model(nn.Tanh()),
        "all four": lambda: model(None),
        "SiLU": lambda: model(nn.SiLU()),
        "GELU": lambda: model(nn.GELU()),
        "GELU(tanh)": lambda: model(nn.GELU(approximate="tanh")),
        "Hardswish": lambda: model(nn.Hardswish()),
        "Hardsigmoid": lambda: model(nn.Hardsigmoid()),
        "Mish": lambda: model(nn.Mish()),
        "ELU": lambda: model(nn.ELU()),
        "ELU(0.5, inplace)": lambda: model(nn.ELU(0.5, inplace=True)),
        "CELU(0.7)": lambda: model(nn.CELU(0.7)),
        "SELU": lambda: model(nn.SELU()),
        "Hardtanh(-2, 3)": lambda: model(nn.Hardtanh(-2.0, 3.0)),
    }
    print(f"| activation | policy | max abs diff logits | max abs diff weights after {args.steps} "
          "steps (relative) | same skips, k | trained |")  # fmt: skip
    print("|---|---|---:|---:|---|---:|")
    worst = 0.0
    for name, build in builds.items():
        for policy in ("full", "topk", "tinypropv2"):
            r = compare(library, build, policy, args.steps)
            worst = max(worst, r["relative"])
            print(f"| {name} | {policy} | {r['forward']:.1e} | {r['weights']:.1e} "
                  f"({r['relative']:.1e}) | {'yes' if r['same_skips'] and r['same_k'] else 'NO'} "
                  f"| {r['trained']} |")  # fmt: skip
    torch.manual_seed(0)
    x, _ = next(batches(1, 64))
    saturated = float((builds["ReLU6"]()[:2](x) >= 6.0).float().mean())
    print(f"ReLU6: {saturated:.1%} of the first activation's outputs are at 6 (saturated)")
    with torch.no_grad():
        inputs = builds["Hardswish"]()[:1](x)
    outside = float((inputs.abs() >= 3.0).float().mean())
    print(f"Hardswish, Hardsigmoid: {outside:.1%} of the first activation's inputs lie beyond ±3")
    with torch.no_grad():
        clamped = builds["Hardtanh(-2, 3)"]()[:2](x)
    low, high = float((clamped <= -2.0).float().mean()), float((clamped >= 3.0).float().mean())
    print(f"Hardtanh(-2, 3): {low:.1%} of the first activation's outputs at -2, {high:.1%} at 3")
    print(f"largest relative weight difference {worst:.1e} (the parity tests' bound: 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
