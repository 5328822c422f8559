"""A whole applied model pickles (``torch.save(model)``, multiprocessing): the sparse classes
of subclasses (``nn.MultiheadAttention``'s ``out_proj``) and of registered classes (GPT-2's
``Conv1D``) are made at ``apply`` time, and pickle could not find them by name."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(40, 3))


def test_an_applied_encoder_saves_whole_loads_and_trains(tmp_path):
    model = tinyprop.apply(encoder(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    torch.save(model, tmp_path / "model.pt")  # PicklingError before
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded[0].self_attn.out_proj) is type(model[0].self_attn.out_proj)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    for net in (model, loaded):
        stats = tinyprop.train_step(net, x, y, LOSS, torch.optim.SGD(net.parameters(), lr=0.1))
        assert "0.self_attn.out_proj" in stats.keep
    for (name, expected), got in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(got, expected), name


LOAD = """
import sys, torch, tinyprop
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
torch.save(model(x).detach(), sys.argv[3])
print(type(model.projection).__name__)
"""


def test_a_registered_class_loads_in_a_process_that_never_registered_it(tmp_path):
    """The fresh process registers Conv1D again (transposed), as the saving one had; without
    that its sparse class would have been made as a convolution's."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    tinyprop.register_linear(conv1d, transposed=True)
    torch.manual_seed(0)
    model = nn.Sequential()
    model.projection = conv1d(8, 6)
    model.head = nn.Linear(8, 3)
    tinyprop.apply(model, tinyprop.TinyPropConfig())
    x = torch.randn(4, 6)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    paths = [str(tmp_path / name) for name in ("model.pt", "x.pt", "out.pt")]
    done = subprocess.run(
        [sys.executable, "-c", LOAD, *paths], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["TinyPropConv1D"]
    assert torch.equal(torch.load(paths[2]), model(x).detach())


def test_a_compiled_applied_model_trains_as_plain_pytorch_and_pickles(tmp_path):
    """torch.compile of an applied model (docs/models-and-loops.md): train_step on the
    compiled module gives plain PyTorch's weights (topk at 1.0, a training BatchNorm, batch
    sizes that change), and the compiled module saves whole, loads and trains."""
    import copy

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for batch in (8, 5):
        x, y = torch.randn(batch, 10), torch.randint(0, 3, (batch,))
        stats = tinyprop.train_step(compiled, x, y, LOSS, optimizer)
        assert stats.trained == batch and stats.macs.backward > 0
        plain_optimizer.zero_grad()
        LOSS(plain(x), y).mean().backward()
        plain_optimizer.step()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    torch.save(compiled, tmp_path / "compiled.pt")
    loaded = torch.load(tmp_path / "compiled.pt", weights_only=False)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    stats = tinyprop.train_step(loaded, x, y, LOSS, torch.optim.SGD(loaded.parameters(), lr=0.1))
    assert stats.trained == 8


def test_unwrap_finds_a_compiled_module_wherever_the_wrapper_holds_it():
    """unwrap looks ``_orig_mod`` up without hasattr's AttributeError on plain modules: the
    compiled module inside torch.compile's wrapper, inside DataParallel, held as a plain
    attribute, or reached through a wrapper's own ``__getattr__`` (as before); a plain module,
    or one whose ``_orig_mod`` is not a module, is its own."""
    from tinyprop.model import state_of, unwrap

    model = tinyprop.apply(nn.Sequential(nn.Linear(4, 2)), tinyprop.TinyPropConfig())
    compiled = torch.compile(model, backend="aot_eager")

    class Forwarding(nn.Module):  # a wrapper forwarding unknown attributes (peft-style)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    class Held(nn.Module):
        pass

    held, not_a_module = Held(), Held()
    object.__setattr__(held, "_orig_mod", model)  # in __dict__, not a submodule
    not_a_module._orig_mod = 3
    assert unwrap(compiled) is model and unwrap(nn.DataParallel(compiled)) is model
    assert unwrap(Forwarding(compiled)) is model and unwrap(held) is model
    assert unwrap(model) is model and unwrap(not_a_module) is not_a_module
    assert state_of(compiled) is state_of(model)
    with pytest.raises(ValueError, match="does not have tinyprop applied"):
        state_of(nn.Linear(2, 2))


@pytest.mark.parametrize("save", ["torch.save", "pickle"])
def test_a_layer_saved_alone_saves_the_layer_alone_and_trains_as_pytorch_until_a_model_takes_it(
    tmp_path, save
):
    """torch.save (or pickle) of one sparse layer of an applied model pickled the whole model
    along with it (its state refers to that model): a 16 -> 3 head's file held the 4 MB body,
    and loaded as a layer of a hidden copy of the model, which apply and any applied model
    refused. Now the file holds the layer alone, which loads as a layer of no model (as
    copy.deepcopy of it): it trains as PyTorch's layer in a plain loop, and the model it is
    set into takes it over and trains it as the same weights in a fresh layer."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    torch.manual_seed(0)
    body = [nn.Linear(4, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16)]
    source = tinyprop.apply(nn.Sequential(*body, nn.ReLU(), nn.Linear(16, 3)), config)
    if save == "torch.save":
        torch.save(source[6], tmp_path / "head.pt")
        assert (tmp_path / "head.pt").stat().st_size < 100_000  # 4.3 MB before
        head = torch.load(tmp_path / "head.pt", weights_only=False)
    else:
        saved = pickle.dumps(source[6])
        assert len(saved) < 100_000
        head = pickle.loads(saved)
    assert head.tinyprop_state.root is None and head.tinyprop_state is not source[6].tinyprop_state

    plain = nn.Linear(16, 3)
    plain.load_state_dict({"weight": head.weight, "bias": head.bias})
    x16 = torch.randn(6, 16)
    for layer in (head, plain):  # a plain loop: PyTorch's gradients, not top-k ones
        layer(x16).square().sum().backward()
    for p, q in zip(head.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        p.grad = q.grad = None

    torch.manual_seed(1)
    start = nn.Linear(4, 16)
    expected = tinyprop.apply(nn.Sequential(copy.deepcopy(start), nn.ReLU(), plain), config)
    given = tinyprop.apply(nn.Sequential(copy.deepcopy(start), nn.ReLU(), head), config)
    taken = tinyprop.apply(nn.Sequential(copy.deepcopy(start), nn.ReLU(), nn.Linear(16, 3)), config)
    taken[2] = copy.deepcopy(head)  # set into an applied model
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for model in (given, taken, expected):
        stats = tinyprop.backward(model, LOSS(model(x), y))
        assert set(stats.keep) == {"0", "2"}
    for model in (given, taken):
        for p, q in zip(model.parameters(), expected.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_a_whole_model_pickled_links_its_layers_to_its_own_state():
    """The layers are pickled without their state; the model's state links them again: every
    sparse layer of the loaded model (a layer taken out of it too) shares the loaded model's
    state, as in the model saved."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    model = tinyprop.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), config)
    model.append(nn.Linear(3, 2))
    model(torch.randn(2, 4))  # the appended layer made sparse
    loaded = pickle.loads(pickle.dumps(model))
    state = loaded._tinyprop_state
    assert state.root is loaded and [name for name, _ in state.layers] == ["0", "2", "3"]
    assert all(loaded[i].tinyprop_state is state for i in (0, 2, 3))


def test_a_part_saved_alone_with_a_swapped_batch_norm_is_applied_afresh(tmp_path):
    """A part of an applied model saved alone (torch.save(model.features)) whose BatchNorm
    was swapped (batch_norm_trained_rows) took the whole model along through the BatchNorm,
    and apply refused the part's layers as another model's. Now the BatchNorm loads plain and
    the part applies afresh: the same step as the same weights applied anew."""
    config = tinyprop.TinyPropConfig(batch_norm_trained_rows=True)
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU())
    source = tinyprop.apply(nn.Sequential(features, nn.Linear(16, 3)), config)
    torch.save(source[0], tmp_path / "features.pt")
    part = torch.load(tmp_path / "features.pt", weights_only=False)
    assert type(part[1]) is nn.BatchNorm1d
    head = nn.Linear(16, 3)
    plain = tinyprop.remove(copy.deepcopy(source))[0]
    expected = tinyprop.apply(nn.Sequential(plain, copy.deepcopy(head)), config)
    model = tinyprop.apply(nn.Sequential(part, head), config)  # ValueError before
    assert model._tinyprop_state.batch_norms == [part[1]]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for net in (model, expected):
        stats = tinyprop.backward(net, LOSS(net(x), y))
        assert set(stats.keep) == {"0.0", "1"}
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
