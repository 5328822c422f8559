"""Attention modules tinyprop meets besides the ones apply finds: an nn.MultiheadAttention set
into the model after apply (a fresh encoder block, or a deep copy of an applied one), a
subclass of nn.MultiheadAttention that keeps PyTorch's forward, and tinyprop.remove after
either: their out_proj is sparse (the masked reference's gradients, the names of a model
applied afresh in StepStats.keep), and remove leaves no tinyprop class anywhere."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_model_matrix import masked_reference, plain_gradients
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIG = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)


def block() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()


class Encoder(nn.Module):
    """One encoder block and a head; ``extra``, a second block, when set."""

    def __init__(self):
        super().__init__()
        self.body, self.head = block(), nn.Linear(8, 3).double()

    def forward(self, x):  # (B, T, 8) -> (B, 3)
        hidden = self.body(x)
        if "extra" in self._modules:
            hidden = self.extra(hidden)
        return self.head(hidden.mean(1))


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (4,), generator=generator)


def no_tinyprop_class(model: nn.Module) -> list[str]:
    return [
        f"{name}: {type(module).__name__}"
        for name, module in model.named_modules()
        if type(module).__module__.startswith("tinyprop")
    ]


@pytest.mark.parametrize("set_in", ["fresh block", "copy of an applied block"])
def test_attention_set_in_after_apply_is_sparse_and_removed(set_in):
    """Before: a fresh block's attention kept PyTorch's forward, which applies out_proj as a
    function of its weight: out_proj was made sparse but never called (trained dense, missing
    from StepStats.keep); after tinyprop.remove, a copied block's attention kept tinyprop's
    class."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense in-projections are named
        model = tinyprop.apply(Encoder(), CONFIG)
        x, y = data()
        tinyprop.backward(model, LOSS(model(x), y))
        model.extra = block() if set_in == "fresh block" else copy.deepcopy(model.body)
        fresh = copy.deepcopy(tinyprop.remove(copy.deepcopy(model)))
        expected = plain_gradients(masked_reference(copy.deepcopy(fresh), 0.5), (x,), y, LOSS)
        model.zero_grad()
        stats = tinyprop.backward(model, LOSS(model(x), y))
        fresh_stats = tinyprop.backward(tinyprop.apply(fresh, CONFIG), LOSS(fresh(x), y))
    assert "extra.self_attn.out_proj" in stats.keep
    assert list(stats.keep) == list(fresh_stats.keep)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=1e-10, msg=name)
    assert no_tinyprop_class(tinyprop.remove(model)) == []
    assert type(model.extra.self_attn) is nn.MultiheadAttention


class KeepsForward(nn.MultiheadAttention):
    """A subclass with a method of its own, PyTorch's forward."""

    def heads(self) -> int:
        return self.num_heads


class OwnForward(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        output, weights = super().forward(query, key, value, **kwargs)
        return 2 * output, weights


class Attends(nn.Module):
    def __init__(self, attention: type):
        super().__init__()
        self.attention = attention(8, 2, batch_first=True).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x):  # (B, T, 8) -> (B, 3)
        attended, _ = self.attention(x, x, x)
        return self.head(attended.mean(1))


def test_a_subclass_keeping_pytorchs_forward_has_a_sparse_out_proj_pickles_and_is_removed():
    """Before: such a subclass stayed dense (named in the warning), its out_proj never called
    as a module. Now its gradients equal nn.MultiheadAttention's under apply, bit for bit; the
    applied model pickles whole and loads; remove gives the subclass back."""
    torch.manual_seed(0)
    plain = Attends(nn.MultiheadAttention)
    subclassed = Attends(KeepsForward)
    subclassed.load_state_dict(plain.state_dict())
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = [
            tinyprop.backward(m, LOSS(m(x), y))
            for m in (tinyprop.apply(plain, CONFIG), tinyprop.apply(subclassed, CONFIG))
        ]
    assert "attention.out_proj" in stats[1].keep
    assert torch.equal(stats[1].keep["attention.out_proj"], stats[0].keep["attention.out_proj"])
    for (name, got), want in zip(subclassed.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(got.grad, want.grad), name
    assert isinstance(subclassed.attention, KeepsForward) and subclassed.attention.heads() == 2
    buffer = io.BytesIO()
    torch.save(subclassed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.zero_grad()
    again = tinyprop.backward(loaded, LOSS(loaded(x), y))
    assert torch.equal(again.keep["attention.out_proj"], stats[1].keep["attention.out_proj"])
    for model in (subclassed, loaded):
        tinyprop.remove(model)
        assert type(model.attention) is KeepsForward and no_tinyprop_class(model) == []


def test_a_subclass_with_its_own_forward_stays_as_it_is_and_is_named():
    model = Attends(OwnForward)
    with pytest.warns(UserWarning, match=r"dense.*attention \(OwnForward\)"):
        tinyprop.apply(model, CONFIG)
    assert type(model.attention) is OwnForward
    x, y = data()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert list(stats.keep) == ["head"]
