"""Bad input gets a clear error that names the problem."""

import warnings

import pytest
import torch
from core_models import batch, build
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(s_min=0.9, s_max=0.1), "must not exceed s_max"),
        (dict(ratio=0.0), "ratio must lie in"),
        (dict(ratio=1.5), "ratio must lie in"),
        (dict(skip_threshold=-0.1), "skip_threshold must be >= 0"),
        (dict(policy="sparse"), "unknown policy"),
        (dict(zeta=0.0), "zeta must lie in"),
        (dict(d_min=1.0, d_max=0.5), "d_min"),
        (dict(beta=0.0), "beta must be positive"),
        (dict(s_max=float("nan")), "must be finite"),
    ],
)
def test_invalid_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        tinyprop.TinyPropConfig(**changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        tinyprop.preset("nope")
    assert tinyprop.preset("meprop").policy == "topk"


def prepared(policy="tinypropv2"):
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy=policy))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_loss_that_is_not_per_sample():
    model, optimizer = prepared()
    x, y = batch("mlp")
    with pytest.raises(ValueError, match="one loss per sample.*reduction='none'"):
        tinyprop.train_step(model, x, y, nn.CrossEntropyLoss(), optimizer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_loss_applies_no_update(bad):
    model, optimizer = prepared("full")
    x, y = batch("mlp")
    x[2, 0] = bad
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"NaN or infinite for samples \[2\]"):
        tinyprop.train_step(model, x, y, LOSS, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "name,shape,message",
    [
        ("mlp", (4, 11), r"layer '0' \(Linear, in_features=12\)"),
        ("cnn", (4, 2, 8, 8), r"layer '0' \(Conv2d, in_channels=3\)"),
        # an unbatched image goes through the convolutions (as in PyTorch), not the head
        ("cnn", (3, 8, 8), r"layer '8' \(Linear, in_features=16\)"),
        (
            "conv1d",
            (4, 2, 4, 4),
            r"Conv1d, in_channels=2\) expects input of shape \(batch, 2, L\)",
        ),
    ],
)
def test_wrong_input_shape(name, shape, message):
    model = tinyprop.apply(build(name), tinyprop.TinyPropConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        tinyprop.train_step(
            model,
            torch.randn(shape, dtype=torch.float64),
            torch.zeros(shape[0], dtype=torch.long),
            LOSS,
            optimizer,
        )


def test_batch_size_mismatch():
    model, optimizer = prepared()
    x, y = batch("mlp")
    with pytest.raises(ValueError, match="batch size 6 but y has shape"):
        tinyprop.train_step(model, x, y[:3], LOSS, optimizer)


def test_an_optimizer_over_another_model_is_refused():
    """An optimizer built before the model was copied (or over the model tinyprop.apply was
    not given): train_step computed gradients and stepped an optimizer that held none of the
    model's parameters, so the weights never moved, silently. One of them is enough (a head
    trained alone); a group added later is checked again."""
    torch.manual_seed(0)
    model, other = build("mlp"), build("mlp")
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    x, y = batch("mlp")
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="holds none of the model's 6 trainable parameters"):
        tinyprop.train_step(model, x, y, loss_fn, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    head = list(model.parameters())[-2:]
    optimizer = torch.optim.SGD(head, lr=0.1)
    assert tinyprop.train_step(model, x, y, loss_fn, optimizer).stepped
    assert not torch.equal(head[0], before[-2])
    optimizer.add_param_group({"params": list(other.parameters())})
    assert tinyprop.train_step(model, x, y, loss_fn, optimizer).stepped


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer tinyprop supports.*Embedding"):
        tinyprop.apply(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))


def test_unsupported_trainable_module_is_named_in_a_warning():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GRU(8, 8))
    with pytest.warns(
        UserWarning, match=r"dense \(their backward is counted dense in the ledger\): 2 \(GRU\)"
    ):
        tinyprop.apply(model)
    assert type(model[0]).__name__ == "TinyPropLinear"


class OwnRMSNorm(nn.Module):
    """Another library's RMSNorm (as transformers' LlamaRMSNorm, GemmaRMSNorm): a weight vector
    and a forward of its own."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LayerScale(nn.Module):  # ConvNeXt's per-channel scale
    def __init__(self, size):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((size, 1), 1e-6))

    def forward(self, x):
        return x * self.gamma.squeeze(-1)


class Mixing(nn.Module):  # a matrix product tinyprop does not know
    def __init__(self, size):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(size))

    def forward(self, x):
        return x @ self.mix


def test_modules_with_vector_parameters_only_stay_dense_without_a_warning():
    """A normalisation of another library, a layer scale, PReLU: their parameters are vectors,
    multiplied entry by entry, as nn.LayerNorm's; dense by design like it. Before, every
    LLaMA-style transformers model named each of its RMSNorms in the warning (nn.RMSNorm was
    not named). A module with a matrix of its own is still named."""
    model = nn.Sequential(
        nn.Linear(4, 8), OwnRMSNorm(8), LayerScale(8), nn.PReLU(8), Mixing(8), nn.Linear(8, 2)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tinyprop.apply(model)
    messages = [str(warning.message) for warning in caught]
    assert [message.split(": ", 1)[1] for message in messages] == ["4 (Mixing)"]


def test_apply_twice_and_remove_without_apply():
    model, _ = prepared()
    with pytest.raises(ValueError, match="already has tinyprop applied"):
        tinyprop.apply(model)
    with pytest.raises(ValueError, match="does not have tinyprop applied"):
        tinyprop.remove(build("mlp"))
    with pytest.raises(ValueError, match="does not have tinyprop applied"):
        x, y = batch("mlp")
        tinyprop.train_step(build("mlp"), x, y, LOSS, torch.optim.SGD(build("mlp").parameters()))


def test_circular_padding_conv_stays_dense_with_warning():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(12, 2)
    )
    with pytest.warns(UserWarning, match=r"0 \(Conv1d\)"):
        tinyprop.apply(model)


def test_normalisation_layers_stay_dense_without_a_warning():
    """nn.RMSNorm, like LayerNorm and GroupNorm, is dense by design (before: a warning named it
    among the layers tinyprop could not make sparse)."""
    model = nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8), nn.RMSNorm(8), nn.GroupNorm(2, 8), nn.Linear(8, 2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tinyprop.apply(model)
