"""What users bring that the other tests do not: parametrized weights (weight_norm,
spectral_norm, torch.nn.utils.parametrize), activation checkpointing (reentrant or not, and
transformers' gradient_checkpointing_enable), empty batches, torch.func transforms, plain
checkpoints loaded after apply, evaluation passes between training steps (float64)."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from model_zoo import tiny_bert
from test_model_matrix import masked_reference, plain_gradients
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils.checkpoint import checkpoint

import tinyprop
from tinyprop.model import state_of

LOSS = nn.CrossEntropyLoss(reduction="none")


class Symmetric(nn.Module):
    def forward(self, weight):
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def symmetric(layer):
    parametrize.register_parametrization(layer, "weight", Symmetric())
    return layer


def pruned(layer):  # torch.nn.utils.prune: weight = weight_orig * weight_mask, by a pre-hook
    return prune.l1_unstructured(layer, "weight", amount=0.5)


PARAMETRIZATIONS = {
    "weight_norm": nn.utils.parametrizations.weight_norm,
    "spectral_norm": nn.utils.parametrizations.spectral_norm,
    "symmetric": symmetric,
    "pruned": pruned,
}


def parametrized_mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    wrap = PARAMETRIZATIONS[kind]
    return nn.Sequential(wrap(nn.Linear(6, 6)), nn.ReLU(), nn.Linear(6, 3)).double()


def data(size: int = 4, features: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, features, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (size,), generator=generator)


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_parametrized_weights_equal_plain_pytorch(kind, ratio):
    """spectral_norm's power iteration runs once per forward, as in PyTorch (apply and the
    input check used to run it again: gradients 1e-9 off in float64); no dense warning for
    the parametrization of a sparse layer."""
    model = parametrized_mlp(kind)
    x, y = data()
    reference = parametrized_mlp(kind)  # the same weights (a pruned module cannot be deep-copied)
    if ratio < 1.0:
        reference = masked_reference(reference, ratio)
    expected = plain_gradients(reference, (x,), y, LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=ratio))
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert_same(gradients(model), expected)
    assert list(stats.keep) == ["0", "2"]
    for name, buffer in reference.named_buffers():  # spectral_norm's _u and _v
        torch.testing.assert_close(model.state_dict()[name], buffer, rtol=0, atol=0)


class DroppedBias(nn.Module):
    """A parametrization drawing a new dropout mask of the bias at each call, counting them."""

    calls = 0

    def forward(self, bias):
        DroppedBias.calls += 1
        return F.dropout(bias, 0.5, self.training)


def dropped_bias_model() -> nn.Module:
    """Conv2d (a dropout of its bias), ReLU, max pool (fused below float32's native kernels
    when the convolution's output has 2^18 entries), Linear (a dropout of its bias), head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 32 * 16, 8), nn.Tanh(), nn.Linear(8, 3),
    )  # fmt: skip
    for layer in (model[0], model[4]):
        parametrize.register_parametrization(layer, "bias", DroppedBias())
    return model


@pytest.mark.parametrize("policy", ["full", "topk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_parametrized_bias_is_computed_once_per_call_as_in_pytorch(policy, dtype):
    """A sparse layer read its bias twice per call (to record the call, then to compute), and
    the fused max pool a third time: a parametrized bias ran twice (thrice) per call, a
    dropout of the bias drew other masks than PyTorch (bias gradients 0.07 off under 'full',
    the pooled convolution's 100% off), silently."""
    model = dropped_bias_model()
    x = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    DroppedBias.calls = 0
    LOSS(reference(x), y).mean().backward()
    assert DroppedBias.calls == 2
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=1.0))
    torch.manual_seed(5)
    DroppedBias.calls = 0
    tinyprop.backward(model, LOSS(model(x), y))
    assert DroppedBias.calls == 2
    expected = gradients(reference)
    for name, gradient in gradients(model).items():  # float32: the native kernels' rounding
        largest = expected[name].abs().max().item()
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=1e-5 * largest)


class Checkpointed(nn.Module):
    """Two Linear layers inside torch.utils.checkpoint (or not: ``reentrant=None``), a head."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.reentrant = reentrant
        self.first = nn.Linear(6, 16)
        self.second = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def block(self, x):
        return torch.relu(self.second(torch.relu(self.first(x))))

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


CHECKPOINT_POLICIES = [
    tinyprop.TinyPropConfig(policy="topk", ratio=0.3),
    tinyprop.TinyPropConfig(policy="tinyprop"),
    tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9),  # skips 2, then 4 of 8
    tinyprop.TinyPropConfig(policy="full"),
]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("config", CHECKPOINT_POLICIES, ids=lambda config: config.policy)
def test_activation_checkpointing_equals_the_plain_forward(reentrant, config):
    """Non-reentrant checkpointing unpacked the saved tensors twice (CheckpointError); the
    recomputed forward left stray forward passes that the next step's ledger counted (topk:
    backward ratio 0.23 instead of 0.41), and under reentrant checkpointing the layers' dense
    backward was counted twice (1.86). Now gradients, k, ledger, skips and running state
    (Ymax_l, Ymax_L, backward counts) equal the plain run."""
    torch.manual_seed(0)
    plain = tinyprop.apply(Checkpointed(None).double(), config)
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    for step in range(2):
        x, y = data(size=8, seed=step)
        x.requires_grad_()  # reentrant checkpointing needs an input that requires grad
        results = []
        for model in (plain, checkpointed):
            model.zero_grad()
            stats = tinyprop.backward(model, LOSS(model(x), y))
            results.append((gradients(model), stats))
        (expected, expected_stats), (got, got_stats) = results
        assert_same(got, expected)
        assert got_stats.macs == expected_stats.macs
        assert {name: keep.tolist() for name, keep in got_stats.keep.items()} == {
            name: keep.tolist() for name, keep in expected_stats.keep.items()
        }
        assert state_of(checkpointed).pending == []
        assert (got_stats.trained, got_stats.skipped) == (
            expected_stats.trained,
            expected_stats.skipped,
        )
        # the forward run again moves no running state: Ymax_l, Ymax_L, backward counts
        for (name, got_buffer), want in zip(
            checkpointed.named_buffers(), plain.buffers(), strict=True
        ):
            assert torch.equal(got_buffer, want), name


def test_transformers_gradient_checkpointing_trains_sparse():
    """A LLaMA-style model (RMSNorm, rotary, tied embeddings) from a small config with
    gradient_checkpointing_enable(): the same gradients as without, at topk 0.1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    checkpointed = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the method's rename, use_cache
        checkpointed.gradient_checkpointing_enable()
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(0))

    def losses(model):
        logits = model(ids).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    results = []
    for each in (model, checkpointed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RMSNorm stays dense
            tinyprop.apply(each, tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
        each.train()
        results.append((tinyprop.backward(each, losses(each)), gradients(each)))
    (expected_stats, expected), (got_stats, got) = results
    assert_same(got, expected)
    assert got_stats.macs == expected_stats.macs and len(got_stats.keep) == 15


def test_empty_batch_forward_works_and_backward_says_why():
    model = tinyprop.apply(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double())
    x, y = data()
    output = model(x[:0])  # IndexError in the layer before
    assert output.shape == (0, 3)
    with pytest.raises(ValueError, match=r"one loss per sample.*an empty batch \(B = 0\)"):
        tinyprop.backward(model, LOSS(output, y[:0]))  # it said: use reduction='none'
    with pytest.raises(ValueError, match=r"an empty batch \(B = 0\) has no sample to train"):
        tinyprop.loss(model, LOSS(model(x[:0]), y[:0]))


def test_torch_func_transforms_give_a_clear_error():
    """torch.func.grad / vmap raised PyTorch's 'must override setup_context'; now an error
    names tinyprop and the way out; the full policy (dense) works under them."""
    x, y = data()
    for policy, works in (("topk", False), ("full", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
        plain = copy.deepcopy(model)
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy))
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params, model=model):
            return LOSS(torch.func.functional_call(model, params, (x,)), y).mean()

        if not works:
            with pytest.raises(RuntimeError, match="torch.func transforms"):
                torch.func.grad(loss)(params)
            continue
        expected = torch.func.grad(functools.partial(loss, model=plain))(params)
        assert_same(torch.func.grad(loss)(params), expected)


class Critic(nn.Module):
    """A sparse head beside a dense path: a gradient penalty reaches both."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 1)
        self.scale = nn.Parameter(torch.full((6,), 0.5))

    def forward(self, x):
        return self.head(x) + (x * self.scale).sum(1, keepdim=True)


def gradient_penalty(model, x) -> None:
    """WGAN-GP: backpropagate (||∂ model(x) / ∂x|| - 1)², differentiating the gradient."""
    x = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    (gradient.norm(dim=1) - 1).pow(2).mean().backward()


@pytest.mark.parametrize("build", [Critic, lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh())])
def test_create_graph_through_a_sparse_layer_names_tinyprop_and_the_way_out(build):
    """A second backward through a sparse layer: PyTorch's '@once_differentiable' error, or
    (Critic: the sparse head got a gradient that did not require grad) a penalty whose
    gradient silently left the head out. Now the first backward says what to do; the full
    policy gives plain PyTorch's gradients."""
    x, _ = data()
    for policy in ("topk", "full"):
        torch.manual_seed(0)
        model = build().double()
        plain = copy.deepcopy(model)
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=1.0))
        if policy == "topk":
            with pytest.raises(RuntimeError, match="create_graph=True.*policy='full'"):
                gradient_penalty(model, x)
            continue
        gradient_penalty(model, x)
        gradient_penalty(plain, x)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert_same(grads, {n: p.grad for n, p in plain.named_parameters() if p.grad is not None})


def test_torch_jit_trace_of_an_applied_model_records_the_plain_model():
    """torch.jit.trace (deployment) failed its sanity check: the first call of an input shape
    ran under torch's FLOP counter, the check call did not, and the graphs differed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    tinyprop.apply(model, tinyprop.TinyPropConfig())
    x = torch.randn(2, 3, 4, 4)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    assert "flop_counter" not in str(traced.graph)


def test_plain_checkpoint_loads_into_an_applied_model():
    """A state_dict saved before apply (a pretrained model) loads strictly, also inside a
    wrapper module; the running state starts afresh. Some tinyprop entries only: an error."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    model = tinyprop.apply(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    model[0].error_max.fill_(3.0)
    assert str(model.load_state_dict(plain.state_dict())) == "<All keys matched successfully>"
    assert torch.equal(model[0].weight, plain[0].weight) and float(model[0].error_max) == 0.0
    wrapped, wrapped_plain = nn.ModuleDict({"net": model}), nn.ModuleDict({"net": plain})
    wrapped.load_state_dict(wrapped_plain.state_dict())
    partial = {**plain.state_dict(), "0.error_max": torch.tensor(1.0)}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial)


def test_train_step_ledger_leaves_out_an_evaluation_pass_with_grad():
    """An evaluation forward run with grad enabled between two steps (no torch.no_grad) has
    no backward: train_step's ledger counted its forward and dense backward."""
    torch.manual_seed(0)
    model = tinyprop.apply(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double())
    other = copy.deepcopy(model)
    x, y = data(size=8)
    ledgers = []
    for each, evaluate in ((model, False), (other, True)):
        optimizer = torch.optim.SGD(each.parameters(), lr=0.1)
        if evaluate:
            each.eval()
            each(x)
            each.train()
        ledgers.append(tinyprop.train_step(each, x, y, LOSS, optimizer).macs)
    assert ledgers[0] == ledgers[1]


class SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids))


def test_train_step_with_sparse_gradients_equals_plain_pytorch():
    """nn.Embedding(sparse=True): train_step's NaN check raised NotImplementedError (no
    norm kernel for sparse tensors); now 3 SGD steps equal plain PyTorch's."""
    torch.manual_seed(0)
    plain = SparseEmbedding().double()
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    optimizers = [torch.optim.SGD(each.parameters(), lr=0.1) for each in (plain, model)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 10, (8,), generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizers[0].zero_grad()
        LOSS(plain(ids), y).mean().backward()
        optimizers[0].step()
        tinyprop.train_step(model, ids, y, LOSS, optimizers[1])
    for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


def test_apply_to_a_model_holding_an_applied_part_says_what_to_do():
    """apply(model.encoder) then apply(model) left the encoder's layers dense with a warning
    about an overridden forward (and the encoder's own hooks on); apply(model.encoder) after
    apply(model) said the encoder had no supported layer."""
    body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(8, 3))
    tinyprop.apply(body)
    with pytest.raises(ValueError, match="'0' inside this model already has tinyprop applied"):
        tinyprop.apply(model)
    tinyprop.remove(body)
    tinyprop.apply(model)
    with pytest.raises(ValueError, match="'0' inside this model already has tinyprop applied"):
        tinyprop.apply(body)


@pytest.mark.parametrize(
    "entry, value",
    [
        ("tinyprop_budget_log_keep_scale", math.nan),  # was: ignored, or a ValueError in k
        ("tinyprop_budget_log_keep_scale", 1e30),  # was: OverflowError at the next step
        ("tinyprop_budget_log_trained_share", math.nan),  # was: quantile() q must be in [0, 1]
        ("tinyprop_score_window", math.inf),  # was: every later sample skipped, silently
        ("tinyprop_budget_steps", -1),
    ],
)
def test_corrupt_budget_state_in_a_checkpoint_is_refused(entry, value):
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.3)
    model = tinyprop.apply(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), config)
    x, y = data(size=8)
    tinyprop.train_step(model, x.float(), y, LOSS, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoint = model.state_dict()
    checkpoint[entry] = torch.full_like(checkpoint[entry], value)
    with pytest.raises(ValueError, match=entry):
        model.load_state_dict(checkpoint)


def lazy_cnn() -> nn.Module:
    return nn.Sequential(
        nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_lazy_layers_applied_before_their_first_forward_train_sparse(ratio):
    """nn.LazyLinear / nn.LazyConv2d given to apply before any forward: their first forward
    turned them into plain Linear / Conv2d and the call failed ('Linear' object has no
    attribute 'unbatched_dims'); now they become tinyprop's layers, and remove() gives the
    plain classes (the lazy ones when no forward ran)."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    model = tinyprop.apply(lazy_cnn(), tinyprop.TinyPropConfig(policy="topk", ratio=ratio))
    torch.manual_seed(1)
    model(x)  # the lazy layers draw their weights here
    torch.manual_seed(0)
    plain = lazy_cnn()
    torch.manual_seed(1)
    plain(x)
    reference = plain if ratio == 1.0 else masked_reference(copy.deepcopy(plain), ratio)
    expected = plain_gradients(reference, (x,), y, LOSS)
    model.zero_grad()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert_same(gradients(model), expected)
    assert list(stats.keep) == ["0", "3", "5"]
    tinyprop.remove(model)
    assert [type(layer) for layer in model] == [type(layer) for layer in plain]
    untouched = tinyprop.remove(tinyprop.apply(lazy_cnn()))
    assert [type(layer).__name__ for layer in untouched][::3] == ["LazyConv2d", "LazyLinear"]


LAZY_DENSE_LAYERS = {  # a lazy layer tinyprop keeps dense, the input, its forward MACs per sample
    "LazyConv3d": (lambda: nn.LazyConv3d(4, 3), (2, 5, 5, 5), 4 * 3**3 * 2 * 3**3),
    "LazyConvTranspose2d": (lambda: nn.LazyConvTranspose2d(4, 3), (2, 5, 5), 2 * 5**2 * 4 * 3**2),
    "LazyConv1d reflect": (
        lambda: nn.LazyConv1d(4, 3, padding=1, padding_mode="reflect"),
        (3, 7),
        4 * 7 * 3 * 3,
    ),
}


@pytest.mark.parametrize("name", list(LAZY_DENSE_LAYERS))
def test_a_lazy_layer_kept_dense_applied_before_its_first_forward_trains_as_pytorch(name):
    """apply on a model holding a lazy layer tinyprop keeps dense (Conv3d, ConvTranspose2d, a
    padding mode other than zeros), before its first forward, failed: "Can't access the shape
    of an uninitialized parameter" (the dense-module warning read its shape). Now the layer
    is named in that warning, trains as in PyTorch and is counted dense in the ledger."""
    build, shape, layer_macs = LAZY_DENSE_LAYERS[name]
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])

    def lazy_model():
        torch.manual_seed(0)
        return nn.Sequential(build(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()

    with pytest.warns(UserWarning, match=rf"dense.*: 0 \({name.split()[0]}\)"):
        model = tinyprop.apply(lazy_model(), tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    plain = lazy_model()
    plain_gradients(plain, (x,), y, LOSS)  # draws the weights, as the model's first forward
    torch.manual_seed(0)
    stats = tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.0))
    expected = plain_gradients(plain, (x,), y, LOSS)
    assert_same(gradients(model), expected)
    assert list(stats.keep) == ["3"]  # the LazyLinear is sparse
    head_macs = plain[3].weight.numel()
    assert stats.macs.forward == 4 * (layer_macs + head_macs)
    assert stats.macs.unattributed == 3 * 4 * layer_macs  # its forward and dense backward


CHECKPOINT_CONFIGS = {
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2"),
    "tinypropv2-budget": tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.3),
    "topk-budget": tinyprop.TinyPropConfig(policy="topk", budget=0.3),
}


@pytest.mark.parametrize("saved", list(CHECKPOINT_CONFIGS))
@pytest.mark.parametrize("loaded", list(CHECKPOINT_CONFIGS))
def test_checkpoint_of_another_policy_loads_its_weights_and_maxima(saved, loaded):
    """A checkpoint of a run without a budget loaded into a model with one failed ('Missing
    key(s): tinyprop_budget_spent, ...'), and the reverse ('Unexpected key(s)'), though the
    weights and running maxima fit: the controller and the score window now start afresh,
    or are left out; a group of entries only part of which is there stays an error."""
    x, y = data(size=8)
    source = tinyprop.apply(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), CHECKPOINT_CONFIGS[saved]
    )
    tinyprop.train_step(source, x.float(), y, LOSS, torch.optim.SGD(source.parameters(), lr=0.1))
    checkpoint = source.state_dict()
    target = tinyprop.apply(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), CHECKPOINT_CONFIGS[loaded]
    )
    fresh = {k: v.clone() for k, v in target.state_dict().items() if "budget" in k or "window" in k}
    wrapped = nn.ModuleDict({"net": target})  # also inside a larger module
    assert str(wrapped.load_state_dict({f"net.{k}": v for k, v in checkpoint.items()})) == (
        "<All keys matched successfully>"
    )
    state = target.state_dict()
    for key in ("0.weight", "0.error_max", "2.error_max", "tinyprop_output_error_max"):
        assert torch.equal(state[key], checkpoint[key]), key
    for key, value in state.items():
        if key in fresh:
            expected = checkpoint[key] if key in checkpoint else fresh[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, equal_nan=True)
    if "budget" in loaded:
        partial = {k: v for k, v in checkpoint.items() if k != "tinyprop_budget_spent"}
        partial.setdefault("tinyprop_budget_steps", torch.tensor(1))
        with pytest.raises(RuntimeError, match="tinyprop_budget_spent"):
            target.load_state_dict(partial)


def test_input_gradients_for_saliency_are_exact_on_a_removed_copy_and_sparse_on_the_model():
    """A saliency map or an adversarial example (FGSM) needs the exact input gradient. Through
    the applied model, torch.autograd.grad runs the sparse layers (k entries per row, the
    running state moved), as docs/models-and-loops.md says; tinyprop.remove on a deep copy
    gives plain PyTorch's gradient and leaves the training model's state as it was."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="tinyprop"))
    x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay plain's
    tinyprop.train_step(model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer)
    before = copy.deepcopy(model.state_dict())
    probe = x.clone().requires_grad_()
    exact = torch.autograd.grad(F.cross_entropy(plain(probe), y), probe)[0]

    copied = tinyprop.remove(copy.deepcopy(model))
    assert torch.equal(torch.autograd.grad(F.cross_entropy(copied(probe), y), probe)[0], exact)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # the model untouched

    sparse = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)[0]
    assert not torch.allclose(sparse, exact)  # the documented behaviour: sparse, not exact


@pytest.mark.parametrize(
    "padding", [(0, 1), 1, "same", "valid"], ids=["(0, 1)", "1", "same", "valid"]
)
@pytest.mark.parametrize("when", ["before apply", "after apply"])
def test_a_convolution_padding_set_after_it_was_built_is_the_one_backpropagated(padding, when):
    """``conv.padding = ...`` after construction (model surgery): PyTorch's forward reads it,
    tinyprop's backward took the padding the module computed when built: built with (1, 0)
    and set to (0, 1) on a square input, the output keeps its size and the weight gradient was
    wrong, silently (0.4 off a largest entry of 0.23 in float32); the other settings stopped
    with "shape '[4, 4, 48]' is invalid"."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=(1, 0)).double()
    plain = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(5).double())
    config = tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
    model = tinyprop.apply(copy.deepcopy(plain), config) if when == "after apply" else None
    for net in (plain, model):
        if net is not None:
            net[0].padding = padding
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    plain(x)  # the LazyLinear draws its weights from the output size
    if model is None:
        model = tinyprop.apply(copy.deepcopy(plain), config)
    model.load_state_dict(plain.state_dict())
    expected = plain_gradients(plain, (x,), y, LOSS)
    tinyprop.backward(model, LOSS(model(x), y))
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=1e-10, msg=name)


def test_train_step_takes_a_tokenizers_batch_as_keyword_inputs():
    """``train_step(model, batch, y, ...)`` with ``batch`` a mapping of keyword inputs (a
    tokenizer's BatchEncoding: input_ids and an attention mask with padding) calls
    ``model(**batch)``: at topk 1.0 plain PyTorch's weights after two SGD steps. Before, it
    refused the batch ("x must be a non-empty batched tensor (B, ...), got a
    BatchEncoding"). Tensors of different B are refused, naming each entry."""
    import transformers

    def losses(output, y):
        return nn.functional.cross_entropy(output.logits, y, reduction="none")

    plain = tiny_bert()
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="topk", ratio=1))
    ids = torch.randint(3, 40, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = mask[2, 3:] = 0  # padded samples
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    y = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    for _ in range(2):
        stats = tinyprop.train_step(model, batch, y, losses, optimizer)
        plain_optimizer.zero_grad()
        losses(plain(**batch), y).mean().backward()
        plain_optimizer.step()
    assert stats.trained == 4 and stats.stepped
    for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match=r"tensors are all \(B, \.\.\.\) with one B; got "):
        tinyprop.train_step(model, {"input_ids": ids, "attention_mask": mask[:3]}, y, losses,
                            optimizer)  # fmt: skip
