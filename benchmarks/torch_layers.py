"""torch's own layers and layer settings, checked against plain PyTorch (not part of ``make test``).

Each case is a small model around one layer setting (convolution padding, padding modes,
dilation, strides, groups, channels-last, batch 1, ``F.pad`` before a convolution; Linear on
3-D, 4-D, transposed and expanded inputs, on ``nn.Unfold`` patches, called in a loop, its
weight also used by ``F.linear``, forward hooks that change its input or output; the fused
float modules of ``torch.ao.nn.intrinsic``; attention, transformer layers; layers tinyprop
keeps dense). Per case:

- float64: ``full`` and ``topk`` at ratio 1.0 against ``losses.mean().backward()``, ``topk`` at
  0.1 against the per-row top-k reference of tests/test_model_matrix.py (PyTorch's kernels);
- float32, ``topk`` 0.1, ``tinyprop`` and ``randomk`` 0.3: the kernels tinyprop picks (the
  native ones where it picks them) against its PyTorch kernels, the same kept entries and
  gradients within 1e-5 of the largest entry;
- the weights after three ``train_step`` at ``topk`` 1.0 against three plain SGD steps;
- the layers tinyprop keeps dense, as its warning names them.

    .venv/bin/python benchmarks/torch_layers.py                # every case (about a minute)
    .venv/bin/python benchmarks/torch_layers.py "conv2d same"  # cases whose name holds it
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_model_matrix import masked_reference, plain_gradients  # noqa: E402

import tinyprop  # noqa: E402
import tinyprop.native  # noqa: E402

BATCH = 4
RATIO = 0.1


def loss_fn(output, y):
    return F.cross_entropy(output, y, reduction="none")


class Head(nn.Module):
    """A body (one layer setting) and a LazyLinear classifier on its flattened output."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        h = self.body(x)
        return self.head((h[0] if isinstance(h, tuple) else h).flatten(1))


class LinearOn(nn.Module):
    """A Linear on a view of a (B, 36) input: 3-D, 4-D, transposed or expanded."""

    def __init__(self, view: str):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.head = nn.Linear(36, 3)
        self.view = view

    def forward(self, x):  # (B, 36)
        batch = x.shape[0]
        z = {
            "3-D": lambda: x.view(batch, 6, 6),
            "4-D": lambda: x.view(batch, 2, 3, 6),
            "transposed": lambda: x.view(batch, 6, 6).transpose(1, 2),
            "expanded": lambda: x[:, :6].unsqueeze(1).expand(batch, 6, 6),
        }[self.view]()
        return self.head(torch.tanh(self.layer(z)).reshape(batch, -1))


class Unrolled(nn.Module):
    """One Linear called three times per forward (RNN-style unrolling)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 6)
        h = torch.zeros_like(x)
        for _ in range(3):
            h = torch.tanh(self.cell(h) + x)
        return self.head(h)


class Sequences(nn.Module):
    """A (B, 24) input as (B, 3, 8) sequences through ``layer``, mean-pooled."""

    def __init__(self, layer: nn.Module, call: str = "layer"):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(8, 3)
        self.call = call

    def forward(self, x):
        x = x.view(x.shape[0], 3, 8)
        if self.call == "attention":
            h = self.layer(x, x, x)[0]
        elif self.call == "decoder":
            h = self.layer(x, x)
        else:
            h = self.layer(x)
        return self.head((h[0] if isinstance(h, tuple) else h).mean(1))


def conv(*args, **kwargs) -> Head:
    kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[kwargs.pop("dims", 2)]
    return Head(kind(*args, **kwargs), nn.Tanh())


class PaddedConv(nn.Module):
    """``F.pad`` by (left 0, right 2, top 1, bottom 0), then a convolution without padding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.LazyLinear(3)

    def forward(self, x):  # (B, 3, H, W)
        return self.head(torch.tanh(self.conv(F.pad(x, (0, 2, 1, 0)))).flatten(1))


class PatchLinear(nn.Module):
    """``nn.Unfold`` into 2x2 patches, a Linear on each patch, ``nn.Fold`` back."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(2)
        self.layer = nn.Linear(12, 5)
        self.fold = nn.Fold((5, 5), 1)
        self.head = nn.LazyLinear(3)

    def forward(self, x):  # (B, 3, 6, 6)
        patches = self.unfold(x).transpose(1, 2)  # (B, 25, 12)
        h = torch.tanh(self.layer(patches)).transpose(1, 2)  # (B, 5, 25)
        return self.head(self.fold(h).flatten(1))


class SharedWeights(nn.Module):
    """Weights of a ParameterList used with ``F.linear``, and a Linear's weight used by
    ``F.linear`` too (its gradient adds up from both)."""

    def __init__(self):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(6, 6) / 3) for _ in range(2)])
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 6)
        h = torch.tanh(F.linear(x, self.weights[0]))
        h = torch.tanh(self.inner(h))
        h = torch.tanh(F.linear(h, self.weights[1]) + F.linear(h, self.inner.weight))
        return self.head(h)


class Hooked(nn.Module):
    """A Linear whose input a forward pre-hook changes, or whose output a forward hook does."""

    def __init__(self, hook: str):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        if hook == "pre":
            self.second.register_forward_pre_hook(lambda module, args: (args[0] * 2 + 0.1,))
        else:
            self.second.register_forward_hook(lambda module, args, output: output * 3 - 0.2)

    def forward(self, x):  # (B, 6)
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


CASES = {  # name: (model builder, input shape, memory format of the input and the model)
    "conv2d padding='same'": (lambda: conv(3, 4, 3, padding="same"), (3, 7, 7), None),
    "conv2d same, even kernel (2, 4)": (
        lambda: conv(3, 4, (2, 4), padding="same"),
        (3, 7, 6),
        None,
    ),
    "conv2d same, dilation 2": (lambda: conv(3, 4, 3, padding="same", dilation=2), (3, 7, 7), None),
    "conv1d same, even kernel": (lambda: conv(3, 4, 4, padding="same", dims=1), (3, 9), None),
    "conv2d stride 3 > kernel 2": (lambda: conv(3, 4, 2, stride=3), (3, 8, 8), None),
    "conv2d dilation (2, 1)": (lambda: conv(3, 4, 3, dilation=(2, 1)), (3, 9, 9), None),
    "conv2d depthwise": (lambda: conv(4, 4, 3, groups=4), (4, 7, 7), None),
    "conv2d multiplier 2, no bias": (lambda: conv(4, 8, 3, groups=4, bias=False), (4, 7, 7), None),
    "conv2d groups 2": (lambda: conv(4, 6, 3, groups=2), (4, 7, 7), None),
    "conv2d kernel (1, 5)": (
        lambda: conv(3, 4, (1, 5), stride=(2, 1), padding=(0, 2)),
        (3, 7, 9),
        None,
    ),
    "conv2d channels-last": (lambda: conv(3, 4, 3, padding=1), (3, 7, 7), torch.channels_last),
    "conv2d channels-last, depthwise x2 dilated": (
        lambda: conv(4, 8, 3, groups=4, dilation=2, stride=2, padding=1),
        (4, 9, 8),
        torch.channels_last,
    ),
    "conv2d same, kernel 2, dilation 3": (
        lambda: conv(3, 4, 2, padding="same", dilation=3),
        (3, 7, 7),
        None,
    ),
    "conv1d same, kernel 2, dilation 5, groups 3": (
        lambda: conv(3, 6, 2, padding="same", dilation=5, groups=3, dims=1),
        (3, 9),
        None,
    ),
    "conv2d padding 3 > kernel 2": (lambda: conv(3, 4, 2, padding=3), (3, 5, 5), None),
    "F.pad (0, 2, 1, 0), then conv2d": (PaddedConv, (3, 7, 7), None),
    "intrinsic ConvReLU2d (fused float modules)": (
        lambda: Head(intrinsic.ConvReLU2d(nn.Conv2d(3, 4, 3), nn.ReLU())),
        (3, 7, 7),
        None,
    ),
    "conv1d stride 5, dilation 3": (
        lambda: conv(4, 6, 2, stride=5, dilation=3, padding=2, dims=1),
        (4, 23),
        None,
    ),
    "conv2d padding_mode reflect (dense)": (
        lambda: conv(3, 4, 3, padding=1, padding_mode="reflect"),
        (3, 7, 7),
        None,
    ),
    "conv1d padding_mode circular (dense)": (
        lambda: conv(3, 4, 3, padding=2, padding_mode="circular", dims=1),
        (3, 9),
        None,
    ),
    "conv3d (dense)": (lambda: conv(2, 3, 3, dims=3), (2, 5, 5, 5), None),
    "conv_transpose2d (dense)": (
        lambda: Head(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.Tanh()),
        (3, 5, 5),
        None,
    ),
    "conv3d channels-last (dense)": (
        lambda: conv(2, 3, 3, dims=3),
        (2, 5, 5, 5),
        torch.channels_last_3d,
    ),
    "conv_transpose1d output_padding (dense)": (
        lambda: Head(nn.ConvTranspose1d(4, 6, 3, stride=3, output_padding=2, groups=2)),
        (4, 5),
        None,
    ),
    "lstm (dense)": (lambda: Sequences(nn.LSTM(8, 8, batch_first=True)), (24,), None),
    "linear on 3-D input": (lambda: LinearOn("3-D"), (36,), None),
    "linear on 4-D input": (lambda: LinearOn("4-D"), (36,), None),
    "linear on a transposed input": (lambda: LinearOn("transposed"), (36,), None),
    "linear on an expanded input": (lambda: LinearOn("expanded"), (36,), None),
    "linear called 3 times": (Unrolled, (6,), None),
    "linear on Unfold patches, then Fold": (PatchLinear, (3, 6, 6), None),
    "linear weights with F.linear, ParameterList": (SharedWeights, (6,), None),
    "linear, forward pre-hook changes its input": (lambda: Hooked("pre"), (6,), None),
    "linear, forward hook changes its output": (lambda: Hooked("post"), (6,), None),
    "intrinsic LinearReLU (fused float modules)": (
        lambda: nn.Sequential(intrinsic.LinearReLU(nn.Linear(24, 8), nn.ReLU()), nn.Linear(8, 3)),
        (24,),
        None,
    ),
    "attention, need_weights=True": (
        lambda: Sequences(nn.MultiheadAttention(8, 2, batch_first=True), "attention"),
        (24,),
        None,
    ),
    "encoder layer, norm_first": (
        lambda: Sequences(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        ),
        (24,),
        None,
    ),
    "decoder layer": (
        lambda: Sequences(
            nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), "decoder"
        ),
        (24,),
        None,
    ),
}


def gradients(model: nn.Module) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def difference(got: dict, expected: dict) -> float:
    if got.keys() != expected.keys():
        return float("inf")
    return max((got[name] - expected[name]).abs().max().item() for name in expected)


def build(name: str, dtype: torch.dtype):
    """The case's model (its lazy layers drawn) and a batch, in ``dtype``."""
    builder, shape, layout = CASES[name]
    torch.manual_seed(0)
    model = builder().to(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *shape, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (BATCH,), generator=generator)
    with torch.no_grad():
        model(x)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
        model = model.to(memory_format=layout)
    return model, x, y


def sparse_gradients(model, x, y, config, native: bool = True):
    model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tinyprop.apply(model, config)
    kept = (tinyprop.native.can_select, tinyprop.native.can_backward)
    if not native:
        tinyprop.native.can_select = lambda delta: False
        tinyprop.native.can_backward = lambda x, weight: False
    try:
        stats = tinyprop.backward(model, loss_fn(model(x), y))
    finally:
        tinyprop.native.can_select, tinyprop.native.can_backward = kept
    dense = [str(w.message).split(": ", 1)[-1] for w in caught if "dense" in str(w.message)]
    return gradients(model), stats, dense


def three_steps(model, x, y) -> float:
    """Largest weight difference after three train_step at topk 1.0 and three SGD steps."""
    sparse, plain = copy.deepcopy(model), copy.deepcopy(model)
    tinyprop.apply(sparse, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sparse, plain)]
    for _ in range(3):
        tinyprop.train_step(sparse, x, y, loss_fn, optimizers[0])
        optimizers[1].zero_grad()
        loss_fn(plain(x), y).mean().backward()
        optimizers[1].step()
    pairs = zip(sparse.parameters(), plain.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def check(name: str) -> str:
    model, x, y = build(name, torch.float64)
    expected = plain_gradients(copy.deepcopy(model), (x,), y, loss_fn)
    worst = 0.0
    for policy in ("full", "topk"):
        config = tinyprop.TinyPropConfig(policy=policy, ratio=1.0)
        got, stats, dense = sparse_gradients(model, x, y, config)
        worst = max(worst, difference(got, expected))
    reference = plain_gradients(masked_reference(copy.deepcopy(model), RATIO), (x,), y, loss_fn)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=RATIO)
    masked = difference(sparse_gradients(model, x, y, config, native=False)[0], reference)
    model32, x32, y32 = build(name, torch.float32)
    native_worst, same_keep = 0.0, True
    for policy, ratio in (("topk", RATIO), ("tinyprop", 0.3), ("randomk", 0.3)):
        config = tinyprop.TinyPropConfig(policy=policy, ratio=ratio)
        native, native_stats, _ = sparse_gradients(model32, x32, y32, config)
        plain, plain_stats, _ = sparse_gradients(model32, x32, y32, config, native=False)
        largest = max(value.abs().max().item() for value in plain.values())
        native_worst = max(native_worst, difference(native, plain) / largest)
        same_keep &= all(
            torch.equal(keep, plain_stats.keep[layer]) for layer, keep in native_stats.keep.items()
        )
    steps = three_steps(model, x, y)
    verdict = "equal" if max(worst, masked, steps) < 1e-10 and native_worst < 1e-5 else "DIFFERS"
    return (
        f"{name:44s} {verdict}: vs PyTorch {worst:.0e}, top-k {masked:.0e}, "
        f"native {native_worst:.0e} (keep {'same' if same_keep else 'DIFFERS'}), 3 steps "
        f"{steps:.0e}, {len(stats.keep)} sparse" + (f"; dense: {dense[0]}" if dense else "")
    )


def main(selection: list[str]) -> None:
    torch.set_num_threads(1)
    names = [name for name in CASES if not selection or any(s in name for s in selection)]
    for name in names:
        print(check(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
