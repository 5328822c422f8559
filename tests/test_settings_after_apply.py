"""Layer settings changed after ``tinyprop.apply`` (model surgery between steps): the sparse
backward follows what PyTorch's forward reads (the weight's shape, not the ``kernel_size`` /
``out_channels`` / ``in_channels`` set when the layer was built), or refuses with a clear error
what it cannot follow (float64, against plain PyTorch)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model_matrix import masked_reference, plain_gradients
from torch import nn

import tinyprop
from tinyprop.layers import SparseBackpropLayer

LOSS = nn.CrossEntropyLoss(reduction="none")


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    ).double()  # fmt: skip


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 9, 9, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (6,), generator=generator)


def new_weight(*shape) -> nn.Parameter:
    return nn.Parameter(0.2 * torch.randn(*shape, dtype=torch.float64))


def kernel_2x2(model):  # kernel_size stays (3, 3)
    model[2].weight = new_weight(4, 4, 2, 2)


def kernel_2x2_same(model):  # 'same' padding from the weight's kernel, as F.conv2d takes it
    model[2].padding = "same"
    model[2].weight = new_weight(4, 4, 2, 2)


def six_channels(model):  # out_channels stays 4
    model[2].weight, model[2].bias = new_weight(6, 4, 3, 3), new_weight(6)
    model[6].weight = new_weight(3, 24)


def wider_input(model):  # in_channels of the second layer stays 4
    model[0].weight, model[0].bias = new_weight(6, 2, 3, 3), new_weight(6)
    model[2].weight = new_weight(4, 6, 3, 3)


CHANGES = [kernel_2x2, kernel_2x2_same, six_channels, wider_input]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("ratio", [1.0, 0.25])
@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
def test_a_weight_replaced_after_apply_is_backpropagated_with_its_own_shape(change, ratio):
    """Before: a weight of another kernel size or channel count than the layer was built with
    stopped the sparse step with "shape '[6, 4, 25]' is invalid for input of size 864" (or
    oneDNN's "could not create a primitive descriptor"), while PyTorch trains it."""
    model = tinyprop.apply(cnn(), tinyprop.TinyPropConfig(policy="topk", ratio=ratio))
    x, y = data()
    tinyprop.backward(model, LOSS(model(x), y))  # a first step with the layer as built
    torch.manual_seed(5)
    change(model)
    plain = tinyprop.remove(copy.deepcopy(model))
    plain = plain if ratio == 1.0 else masked_reference(plain, ratio)
    expected = plain_gradients(plain, (x,), y, LOSS)
    model.zero_grad()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert set(stats.keep) == {"0", "2", "6"}
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("policy", ["full", "topk"])
def test_a_padding_mode_set_after_apply_is_refused_where_the_backward_is_sparse(policy):
    """Before: ``conv.padding_mode = 'reflect'`` after apply gave a wrong weight gradient,
    silently (the forward padded by reflection, the sparse backward with zeros: 0.39 off
    relative to the largest entry at ``topk`` ratio 1.0). ``full`` runs PyTorch's backward."""
    model = tinyprop.apply(cnn(), tinyprop.TinyPropConfig(policy=policy, ratio=1.0))
    x, y = data()
    for net in (model, plain := tinyprop.remove(copy.deepcopy(model))):
        net[2].padding, net[2].padding_mode = (1, 1), "reflect"
        net[2]._reversed_padding_repeated_twice = [1, 1, 1, 1]  # what __init__ would have set
    if policy == "topk":
        with pytest.raises(ValueError, match=r"layer '2' \(Conv2d\) has padding_mode='reflect'"):
            model(x)
        return
    expected = plain_gradients(plain, (x,), y, LOSS)
    tinyprop.backward(model, LOSS(model(x), y))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, expected[name]), name


def replace_conv(model):
    model[2] = nn.Conv2d(4, 4, 3, stride=2).double()


def replace_head(model):
    model[6] = nn.Linear(16, 3).double()


def add_block(model):  # a new layer before the head; the head renamed "6.2"
    model[6] = nn.Sequential(nn.Linear(16, 16).double(), nn.Tanh(), model[6])


def insert_layer(model):  # Sequential.insert writes _modules itself: the head renamed "7"
    model.insert(6, nn.Linear(16, 16).double())


def delete_layer(model):  # del renumbers: the head renamed "5"
    del model[3]


def pop_and_insert(model):  # a layer swapped through pop and insert
    model.pop(2)
    model.insert(2, nn.Conv2d(4, 4, 3, stride=2).double())


REPLACEMENTS = [replace_conv, replace_head, add_block, insert_layer, delete_layer, pop_and_insert]


@pytest.mark.parametrize("policy", ["full", "topk-1.0", "topk-0.1"])
@pytest.mark.parametrize("change", REPLACEMENTS, ids=[c.__name__ for c in REPLACEMENTS])
def test_a_layer_set_into_the_model_after_apply_is_sparse_and_counted(change, policy):
    """Before: ``model[2] = nn.Conv2d(...)`` after apply kept the new layer dense without a
    word, and the ledger left its compute out: forward 21456 MACs against 29232 for the same
    model applied afresh, dense backward 23034 against 39978, under every policy. So did
    ``Sequential.insert`` until recently (it writes ``_modules`` past the registration hook;
    the inserted layer was missing from ``stats.keep``), and after ``del model[3]`` the head
    kept its old name "6" in ``stats.keep``."""
    name, _, ratio = policy.partition("-")
    config = tinyprop.TinyPropConfig(policy=name, ratio=float(ratio or 1.0))
    model = tinyprop.apply(cnn(), config)
    x, y = data()
    tinyprop.backward(model, LOSS(model(x), y))  # a first step with the model as applied
    torch.manual_seed(5)
    change(model)
    fresh = copy.deepcopy(tinyprop.remove(copy.deepcopy(model)))
    plain = fresh if ratio in ("", "1.0") else masked_reference(copy.deepcopy(fresh), 0.1)
    expected = plain_gradients(plain, (x,), y, LOSS)
    model.zero_grad()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=1e-10, msg=name)
    tinyprop.apply(fresh, config)
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert stats.macs == fresh_stats.macs
    assert list(stats.keep) == list(fresh_stats.keep)
    assert model.state_dict().keys() == fresh.state_dict().keys()
    tinyprop.remove(model)
    assert all(not isinstance(m, SparseBackpropLayer) for m in model.modules())


def test_a_padding_mode_set_after_apply_is_refused_by_train_step_too():
    """train_step's graph-free path (a plain float32 nn.Sequential) runs the layers without
    their forward, where the refusal above sits: it took the reflect padding in the forward
    and zeros in the backward, silently (0.021 off at topk ratio 1.0)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 18, 3),
    )  # fmt: skip
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    x, y = torch.randn(8, 2, 20), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tinyprop.train_step(model, x, y, LOSS, optimizer)
    model[2].padding_mode = "reflect"
    model[2]._reversed_padding_repeated_twice = [1, 1]  # what __init__ would have set
    with pytest.raises(ValueError, match=r"layer '2' \(Conv1d\) has padding_mode='reflect'"):
        tinyprop.train_step(model, x, y, LOSS, optimizer)


PARAMETRIZATIONS = {
    "weight_norm": nn.utils.parametrizations.weight_norm,
    "orthogonal": nn.utils.parametrizations.orthogonal,
}


@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
def test_a_parametrization_registered_after_apply_trains_and_survives_remove(kind):
    """weight_norm (or any torch.nn.utils.parametrize) registered on a sparse layer after
    apply: PyTorch's gradients at ratio 1.0, and ``tinyprop.remove`` leaves the layer
    parametrized as PyTorch made it. Before, remove gave it back its plain class without the
    parametrization's property: the next forward failed with "'Linear' object has no
    attribute 'weight'"."""
    model = tinyprop.apply(cnn(), tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    plain = cnn()
    x, y = data()
    tinyprop.backward(model, LOSS(model(x), y))  # a first step with the model as applied
    for net in (model, plain):
        torch.manual_seed(3)  # orthogonal draws a base
        PARAMETRIZATIONS[kind](net[6])
    model.zero_grad()
    tinyprop.backward(model, LOSS(model(x), y))
    expected = plain_gradients(plain, (x,), y, LOSS)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=1e-12, msg=name)
    tinyprop.remove(model)
    assert type(model[6]).__name__ == type(plain[6]).__name__ == "ParametrizedLinear"
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(model(x), plain(x))
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=0.25))  # again
    assert "6" in tinyprop.backward(model, LOSS(model(x), y)).keep
    tinyprop.remove(model)
    nn.utils.parametrize.remove_parametrizations(model[6], "weight")
    assert type(model[6]) is nn.Linear and torch.allclose(model(x), plain(x), atol=1e-12)


def test_a_checkpoint_of_a_model_changed_after_apply_loads_before_its_first_forward():
    """A builder that applies, then adds a layer (``append``): the checkpoint of a trained
    model loads into a fresh one, strict, the new layer's running maximum too, and the fresh
    model saves the same keys. Before, the new layer became sparse only at the first forward:
    "Unexpected key(s) in state_dict: "7.error_max", "7.backward_steps"", and a model saved
    before its first forward left them out."""

    def build():
        model = tinyprop.apply(cnn(), tinyprop.TinyPropConfig(policy="tinypropv2"))
        model.append(nn.Linear(3, 3).double())
        return model

    trained = build()
    x, y = data()
    tinyprop.backward(trained, LOSS(trained(x), y))
    assert float(trained[7].error_max) > 0
    fresh = build()
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    fresh.load_state_dict(trained.state_dict())
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


class OptionalBlock(nn.Module):
    """A model whose forward skips ``extra`` once it is deleted (a block taken out by name)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, 4) -> (B, 3)
        x = torch.relu(self.body(x))
        if "extra" in self._modules:
            x = torch.relu(self.extra(x))
        return self.head(x)


def delete_attribute(model):
    del model.extra


def delete_with_delattr(model):
    delattr(model, "extra")


@pytest.mark.parametrize("policy", ["randomk", "topk"])
@pytest.mark.parametrize("change", [delete_attribute, delete_with_delattr])
def test_a_sparse_layer_deleted_as_an_attribute_after_apply_leaves_the_bookkeeping(change, policy):
    """``del model.extra`` / ``delattr`` after apply: the same names, ledger, state_dict
    keys and gradients as the model applied afresh, and remove gives the deleted layer back
    plain. Before, nn.Module.__delattr__ went unnoticed: the deleted layer stayed among the
    model's sparse layers and the head kept its registration index 2 (a fresh apply gives
    1), so random-k drew other rows for it than the same model applied afresh."""
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.3)
    model = tinyprop.apply(OptionalBlock().double(), config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    tinyprop.backward(model, LOSS(model(x), y))  # a first step with the model as applied
    extra = model.extra
    change(model)
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(model)), config)
    fresh.load_state_dict(model.state_dict())  # the steps taken (random-k's seed), the maxima
    model.zero_grad()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert list(stats.keep) == list(fresh_stats.keep) == ["body", "head"]
    assert stats.macs == fresh_stats.macs
    assert model.state_dict().keys() == fresh.state_dict().keys()
    assert [name for name, _ in model._tinyprop_state.layers] == ["body", "head"]
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, fresh_parameters[name].grad), name
    tinyprop.remove(model)
    assert type(extra) is nn.Linear and type(model.head) is nn.Linear


def small_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_a_sparse_layer_moved_between_two_applied_models_becomes_the_new_ones():
    """``target[2] = source[2]`` (both applied): the moved layer is the target's, with its
    running state: the target's names, ledger and gradients are those of the same model
    applied afresh (its checkpoint loaded), and removing the source leaves it sparse. Before,
    it stayed the source's: missing from the target's ``StepStats.keep``, its MACs
    unattributed (432) and its rows selected at the source's ratio, silently."""
    source = tinyprop.apply(small_mlp(0), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.25)
    target = tinyprop.apply(small_mlp(1), config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    for model in (source, target):
        tinyprop.backward(model, LOSS(model(x), y))
    head = source[2]
    source[2] = nn.Linear(8, 3).double()
    target[2] = head
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(target)), config)
    fresh.load_state_dict(target.state_dict())
    target.zero_grad()
    stats = tinyprop.backward(target, LOSS(target(x), y))
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert list(stats.keep) == list(fresh_stats.keep) == ["0", "2"]
    assert stats.macs == fresh_stats.macs and stats.macs.unattributed == 0
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in target.named_parameters():
        assert torch.equal(parameter.grad, fresh_parameters[name].grad), name
    tinyprop.backward(source, LOSS(source(x), y))
    tinyprop.remove(source)
    assert isinstance(target[2], SparseBackpropLayer)
    tinyprop.remove(target)
    assert type(head) is nn.Linear


def test_a_sparse_layer_in_two_applied_models_at_once_is_refused():
    """The same layer set into a second applied model while still in the first: one layer
    cannot follow two policies and two models' passes. Before, the second model trained it
    as the first one's, left out of its own ``StepStats.keep`` and ledger, silently."""
    first = tinyprop.apply(small_mlp(0), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    second = tinyprop.apply(small_mlp(1), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    second[2] = first[2]
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) is in two models given to"):
        second(x)
    first(x)  # the model the layer came from goes on


def two_hidden_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize("part", ["linear", "conv", "encoder block"])
def test_a_sparse_layer_copied_alone_trains_as_pytorch_outside_any_applied_model(part):
    """A copy of a sparse layer alone (copy.deepcopy) used in a model nobody applied ran the
    sparse backward of the policy it was copied under, with nobody counting it: a plain
    training loop got top-k gradients, silently (1.12 off for a 40 -> 3 Linear at topk 0.5).
    It now trains as PyTorch's layer until an applied model takes it over."""
    torch.manual_seed(0)
    layer, x = {
        "linear": (nn.Linear(40, 3), torch.randn(4, 40)),
        "conv": (nn.Conv2d(3, 6, 3), torch.randn(2, 3, 6, 6)),
        "encoder block": (
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            torch.randn(4, 5, 8),
        ),
    }[part]
    plain = copy.deepcopy(layer)
    model = tinyprop.apply(nn.Sequential(layer), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    lone = copy.deepcopy(model[0])
    lone(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (name, p), q in zip(lone.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("policy", ["randomk", "topk"])
def test_a_sparse_layer_copied_alone_is_taken_over_by_the_model_it_is_set_into(policy):
    """``copy.deepcopy`` of one sparse layer of an applied model, set into that model (peft's
    ``modules_to_save`` copies a classification head so): the model's names, ledger and
    gradients are those of the same model applied afresh (its checkpoint loaded), and remove
    gives the copy back plain, without tinyprop's load_state_dict hook. Before, the copy took
    a hidden copy of the whole model with it and stayed its layer: the forward refused it
    ("is in two models given to tinyprop.apply")."""
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.3)
    model = tinyprop.apply(two_hidden_layers(), config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    tinyprop.backward(model, LOSS(model(x), y))  # running maxima and steps to copy
    copied = copy.deepcopy(model[2])
    model.insert(3, copied)
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(model)), config)
    fresh.load_state_dict(model.state_dict())
    model.zero_grad()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert list(stats.keep) == list(fresh_stats.keep) == ["0", "2", "3", "5"]
    assert stats.macs == fresh_stats.macs and stats.macs.unattributed == 0
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, fresh_parameters[name].grad), name
    tinyprop.remove(model)
    assert type(copied) is nn.Linear and not copied._load_state_dict_pre_hooks


def test_a_layer_set_in_after_apply_leaves_the_swapped_batch_norms_as_they_are():
    """``batch_norm_trained_rows=True`` swaps the BatchNorms, which then hold the model's
    state too: a layer set into the model after apply made them sparse layers as well
    (TinyPropTinyPropBatchNorm1d): the forward failed ("IndexError: tuple index out of
    range"), tinyprop.remove too (KeyError). Now the model trains as the same model applied
    afresh."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5, batch_norm_trained_rows=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = tinyprop.apply(model.double(), config)
    model.append(nn.Linear(3, 2).double())
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(model)), config)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    stats = tinyprop.backward(model, LOSS(model(x), y))
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert list(stats.keep) == list(fresh_stats.keep) == ["0", "3", "4"]
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, fresh_parameters[name].grad), name


def test_a_sparse_layer_copied_into_a_model_not_applied_is_made_sparse_afresh_by_apply():
    """A copy of one sparse layer (``copy.deepcopy``) in a model not applied yet: backward
    asks for apply, and apply makes the copy a sparse layer of that model, as a plain layer
    (remove gives it back plain, without tinyprop's hook). Before, apply refused it ("'2'
    inside this model already has tinyprop applied ... call tinyprop.remove on the module
    that was applied first"): no module could be removed to free it."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    source = tinyprop.apply(small_mlp(0), config)
    model = small_mlp(1)
    model[2] = copy.deepcopy(source[2])
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    with pytest.raises(ValueError, match=r"^model does not have tinyprop applied; call tinyprop"):
        tinyprop.backward(model, LOSS(model(x), y))
    tinyprop.apply(model, config)
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(model)), config)
    stats = tinyprop.backward(model, LOSS(model(x), y))
    fresh_stats = tinyprop.backward(fresh, LOSS(fresh(x), y))
    assert list(stats.keep) == list(fresh_stats.keep) == ["0", "2"]
    assert stats.macs == fresh_stats.macs
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, fresh_parameters[name].grad), name
    tinyprop.remove(model)
    assert type(model[2]) is nn.Linear and not model[2]._load_state_dict_pre_hooks
    assert isinstance(source[2], SparseBackpropLayer)


def test_a_part_of_an_applied_model_passed_as_the_model_names_the_applied_one():
    """tinyprop.backward / step_stats / remove on a part of an applied model (the model
    peft's merge_and_unload() returns is one) name the model that was applied. Before: "model
    does not have tinyprop applied; call tinyprop.apply(model, config)", and apply then
    refused the part."""
    outer = tinyprop.apply(nn.Sequential(small_mlp(0)), tinyprop.TinyPropConfig(policy="topk"))
    part = outer[0]
    x = torch.randn(6, 4, dtype=torch.float64)
    message = r"its layer '0' is a sparse layer of the Sequential given to tinyprop.apply"
    for call in (
        lambda: tinyprop.backward(part, LOSS(part(x), torch.zeros(6, dtype=torch.long))),
        lambda: tinyprop.step_stats(part),
        lambda: tinyprop.remove(part),
    ):
        with pytest.raises(ValueError, match=message):
            call()
