"""The correctness matrix: every model x {full, topk 1.0, topk 0.1} against plain PyTorch
(float64), whatever rows the layers see: (B, ...), (B·T, D) reshapes, sequence-first (T, B, D),
attention, BERT and GPT-2 from small configs, a layer called twice.

- ``full`` and ``topk`` at ratio 1.0 equal ``losses.mean().backward()`` to 1e-10;
- ``topk`` at ratio 0.1 equals a masked reference: plain PyTorch with a hook on every converted
  layer's output (before the bias) that keeps the k largest |δ| of each row of that layer, the
  bias gradient from the whole δ.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from model_zoo import cross_entropy, zoo
from transformers.pytorch_utils import Conv1D  # the test extra: the matrix runs, never skips

import tinyprop
from tinyprop.attention import TinyPropMultiheadAttention
from tinyprop.functional import keep_count
from tinyprop.layers import layer_kind

tinyprop.register_linear(Conv1D, transposed=True)

MODELS = zoo()
SHAPES = {"B<T": (2, 5), "B>T": (5, 2), "B=T": (4, 4)}


def plain_gradients(model, inputs, y, loss_fn) -> dict:
    model.zero_grad()
    loss_fn(model(*inputs), y).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tinyprop_gradients(model, inputs, y, loss_fn, config) -> tuple[dict, tinyprop.StepStats]:
    tinyprop.apply(model, config)
    model.zero_grad()
    stats = tinyprop.backward(model, loss_fn(model(*inputs), y))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, stats


def keep_top_rows(grad: torch.Tensor, ratio: float, linear: bool) -> torch.Tensor:
    """Zero all but the k largest |δ| of each row (a row = the first dimension)."""
    rows = grad.shape[0]
    if linear:  # (R, *, out) -> (R, out, P), channel-major as the layer ranks them
        flat = grad.reshape(rows, -1, grad.shape[-1]).transpose(1, 2).reshape(rows, -1)
    else:
        flat = grad.reshape(rows, -1)
    k = int(keep_count(ratio, flat.shape[1]))
    # ties (pooling hands equal δ to several positions) go to the lower index, as in tinyprop
    index = flat.abs().sort(dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat).scatter_(1, index, 1.0)
    kept = flat * mask
    if linear:
        kept = kept.reshape(rows, grad.shape[-1], -1).transpose(1, 2)
    return kept.reshape(grad.shape)


def masked_reference(model, ratio: float):
    """Patch every layer tinyprop converts: forward without bias, hook on δ, bias added.
    Attention calls its out_proj as a module, as under tinyprop (whose full and topk-1.0 rows
    check that attention against PyTorch's own)."""
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = TinyPropMultiheadAttention
    for module in model.modules():
        kind = layer_kind(module)
        if kind not in ("linear", "conv1d", "conv2d"):
            continue
        transposed = isinstance(module, Conv1D)

        def forward(self, x, kind=kind, transposed=transposed):
            if kind == "linear":
                weight = self.weight.t() if transposed else self.weight
                z = F.linear(x, weight)
            else:
                z = self._conv_forward(x, self.weight, None)
            if z.requires_grad:
                z.register_hook(lambda g: keep_top_rows(g, ratio, kind == "linear"))
            if self.bias is None:
                return z
            shape = (-1,) if kind == "linear" else (-1, *[1] * (z.dim() - 2))
            return z + self.bias.view(shape)

        module.forward = types.MethodType(forward, module)
    return model


def build(name: str, tokens: int | None = None, size: int = 4):
    entry = zoo(size=size, tokens=tokens)[name] if tokens else MODELS[name]
    return entry()


CASES = [(name, None, 4) for name in MODELS if not name.startswith("encoder")]
CASES += [
    (name, tokens, size)
    for name in ("encoder_batch_first", "encoder_seq_first")
    for size, tokens in SHAPES.values()
]


def case_id(case) -> str:
    name, tokens, size = case
    return name if tokens is None else f"{name}-B{size}-T{tokens}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("policy", ["full", "topk-1.0", "topk-0.1"])
def test_gradients_equal_plain_pytorch(case, policy):
    name, tokens, size = case
    model, inputs, y, loss_fn = build(name, tokens, size)
    if policy == "topk-0.1":
        expected = plain_gradients(masked_reference(copy.deepcopy(model), 0.1), inputs, y, loss_fn)
        config = tinyprop.TinyPropConfig(policy="topk", ratio=0.1)
    else:
        expected = plain_gradients(copy.deepcopy(model), inputs, y, loss_fn)
        ratio = 1.0 if policy == "topk-1.0" else 0.1
        config = tinyprop.TinyPropConfig(policy=policy.split("-")[0], ratio=ratio)
    got, stats = tinyprop_gradients(model, inputs, y, loss_fn, config)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
    assert stats.trained == size and stats.macs.forward > 0
    if policy != "full":
        assert stats.keep, "no sparse layer ran"


def test_per_token_layer_selects_per_token():
    model, inputs, y, loss_fn = build("per_token")
    _, stats = tinyprop_gradients(
        model, inputs, y, loss_fn, tinyprop.TinyPropConfig(policy="topk", ratio=0.25)
    )
    assert stats.keep["token"].tolist() == [2] * 20  # 4 samples x 5 tokens, 25% of 8 outputs
    assert stats.keep["head"].tolist() == [1] * 4


class MaskedAttention(torch.nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x, key_padding_mask, attn_mask, is_causal, need_weights=False):
        x = x if self.batch_first else x.transpose(0, 1)
        attended, _ = self.attention(
            x, x, x, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
        attended = attended if self.batch_first else attended.transpose(0, 1)
        return self.head(attended.mean(1))


def mask_arguments(masks: str) -> tuple:
    """(key_padding_mask, attn_mask, is_causal) of 3 float64 sequences of 5 tokens, 2 heads:
    "none", "padding" (two shortened), "causal", "causal+padding", "float 3-D" (N·H, L, S)."""
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    return {
        "none": (None, None, False),
        "padding": (padding, None, False),
        "causal": (None, causal, True),
        "causal+padding": (padding, causal, True),
        "float 3-D": (None, torch.randn(6, 5, 5, dtype=torch.float64), False),
    }[masks]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["padding", "causal", "causal+padding", "float 3-D"])
def test_attention_with_masks_equals_pytorch(batch_first, masks):
    torch.manual_seed(0)
    model = MaskedAttention(batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    arguments = mask_arguments(masks)
    expected = copy.deepcopy(model)
    expected.zero_grad()
    F.cross_entropy(expected(x, *arguments), y).backward()
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    stats = tinyprop.backward(model, F.cross_entropy(model(x, *arguments), y, reduction="none"))
    assert "attention.out_proj" in stats.keep  # called as a module: sparse
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=name)
    tinyprop.remove(model)
    assert type(model.attention) is torch.nn.MultiheadAttention


class WeightedAttention(torch.nn.Module):
    """Attention called as most code calls it (need_weights=True, the default), its returned
    weights part of the loss."""

    def __init__(self, batch_first: bool, average: bool):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(8, 3)
        self.batch_first, self.average = batch_first, average

    def forward(self, x, key_padding_mask, attn_mask, is_causal):
        x = x if self.batch_first else x.transpose(0, 1)
        attended, weights = self.attention(
            x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            is_causal=is_causal, average_attn_weights=self.average,
        )  # fmt: skip
        attended = attended if self.batch_first else attended.transpose(0, 1)
        self.weights = weights
        return self.head(attended.mean(1)) + weights.flatten(1)[:, :3]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal+padding", "float 3-D"])
def test_attention_returning_its_weights_has_a_sparse_out_proj(batch_first, average, masks):
    """need_weights=True (nn.MultiheadAttention's default) went to PyTorch's own forward,
    which applies out_proj as a function: the projection stayed dense, counted dense. Now it
    is sparse, the weights returned are PyTorch's bit for bit, and the gradients (through
    the weights too) PyTorch's at ratio 1.0."""
    torch.manual_seed(0)
    model = WeightedAttention(batch_first, average).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    arguments = mask_arguments(masks)
    expected = copy.deepcopy(model)
    expected.zero_grad()
    F.cross_entropy(expected(x, *arguments), y).backward()
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    stats = tinyprop.backward(model, F.cross_entropy(model(x, *arguments), y, reduction="none"))
    assert "attention.out_proj" in stats.keep
    assert torch.equal(model.weights, expected.weights)
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=name)
    rows, embed = 3 * 5, 8  # tokens (B·L), E; q kᵀ and A v: S = 5 products of E per token
    attention_macs = 3 * rows * embed**2 + 2 * rows * 5 * embed  # in-projection, q kᵀ, A v
    assert stats.macs.forward == attention_macs + rows * embed**2 + 3 * embed * 3
    assert stats.macs.unattributed == 3 * attention_macs  # forward + twice it backward


class CrossAttention(torch.nn.Module):
    """Queries of 8 features attending over keys and values of 5 and 6 (kdim, vdim)."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5, vdim=6)
        self.head = torch.nn.Linear(8, 3)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x):  # (B, 4, 8): queries; keys, values from its last 5 / 6 features
        query, key, value = x, x[..., 3:], x[..., 2:]
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        attended, _ = self.attention(query, key, value, need_weights=self.need_weights)
        attended = attended if self.batch_first else attended.transpose(0, 1)
        return self.head(attended.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_attention_with_kdim_and_vdim_has_a_sparse_out_proj(batch_first, need_weights, ratio):
    """Attention with its own key and value sizes (separate q / k / v projection weights) went
    to PyTorch's own forward: out_proj stayed dense, counted dense."""
    torch.manual_seed(0)
    model = CrossAttention(batch_first, need_weights).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    reference = copy.deepcopy(model)
    if ratio < 1.0:
        reference = masked_reference(reference, ratio)
    expected = plain_gradients(reference, (x,), y, cross_entropy)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
    got, stats = tinyprop_gradients(model, (x,), y, cross_entropy, config)
    assert "attention.out_proj" in stats.keep
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-10, msg=name)


class SequenceAtATime(torch.nn.Module):
    """Sequences of different lengths attended one at a time, unbatched (L, E), as a loop over
    variable-length inputs does; a padding mask hides the last key of each."""

    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(8, 3)
        self.need_weights = need_weights

    def forward(self, x):  # (B, 5, 8): sample n keeps its first 3 + n % 3 tokens
        pooled = []
        for n, sample in enumerate(x):
            tokens = sample[: 3 + n % 3]  # (L, E)
            padding = torch.zeros(tokens.shape[0], dtype=torch.bool)
            padding[-1] = True
            attended, _ = self.attention(
                tokens, tokens, tokens, key_padding_mask=padding, need_weights=self.need_weights
            )
            pooled.append(attended.mean(0))
        return self.head(torch.stack(pooled))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_unbatched_attention_has_a_sparse_out_proj(batch_first, need_weights, ratio):
    """An unbatched query (L, E) went to PyTorch's own forward: out_proj stayed dense."""
    torch.manual_seed(0)
    model = SequenceAtATime(batch_first, need_weights).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    reference = copy.deepcopy(model)
    if ratio < 1.0:
        reference = masked_reference(reference, ratio)
    expected = plain_gradients(reference, (x,), y, cross_entropy)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
    got, stats = tinyprop_gradients(model, (x,), y, cross_entropy, config)
    assert "attention.out_proj" in stats.keep
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("appended", ["bias_kv", "zero_attn", "both"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_with_appended_keys_has_a_sparse_out_proj(appended, need_weights):
    """add_bias_kv=True / add_zero_attn=True (a learned or a zero key and value appended to
    each sequence) went to PyTorch's own forward: out_proj stayed dense. Now it is sparse and
    the gradients equal PyTorch's at ratio 1.0, with a padding mask and a causal one."""
    bias_kv, zero_attention = appended in ("bias_kv", "both"), appended in ("zero_attn", "both")
    torch.manual_seed(0)
    model = MaskedAttention(batch_first=False).double()
    model.attention = torch.nn.MultiheadAttention(
        8, 2, add_bias_kv=bias_kv, add_zero_attn=zero_attention
    ).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    arguments = mask_arguments("causal+padding")
    expected = copy.deepcopy(model)
    expected.zero_grad()
    F.cross_entropy(expected(x, *arguments, need_weights), y).backward()
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    output = model(x, *arguments, need_weights)
    stats = tinyprop.backward(model, F.cross_entropy(output, y, reduction="none"))
    assert "attention.out_proj" in stats.keep
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=name)


def test_gpt2_body_is_sparse_and_counted():
    model, inputs, y, loss_fn = build("gpt2")
    _, stats = tinyprop_gradients(
        model, inputs, y, loss_fn, tinyprop.TinyPropConfig(policy="topk", ratio=0.1)
    )
    assert "transformer.h.0.attn.c_attn" in stats.keep and "lm_head" in stats.keep
    assert stats.macs.unattributed > 0  # attention products, counted dense
    assert 0.1 < stats.macs.backward_ratio() < 0.5


def test_whole_model_save_load_and_deepcopy_train_on():
    """torch.save(model) of an applied model (pending forward passes included) and deepcopy."""
    import io

    model, inputs, y, loss_fn = build("cnn")
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.0))
    tinyprop.backward(model, loss_fn(model(*inputs), y))
    model(*inputs)  # a forward pass no step has accounted yet
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        stats = tinyprop.backward(twin, loss_fn(twin(*inputs), y))
        assert stats.trained == 4 and stats.keep
        tinyprop.remove(twin)
        assert not tinyprop.is_tinyprop(twin)


def to_float32(built):
    """A zoo entry in float32: the dtype the native kernels and the few-row paths run in (the
    float64 matrix never reaches them; both layout bugs of the convolution kernels hid there)."""
    model, inputs, y, loss_fn = built
    inputs = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    return model.float(), inputs, y, loss_fn


FLOAT32_CASES = [name for name in MODELS if not name.startswith("encoder")]
FLOAT32_CASES += ["encoder_batch_first", "encoder_seq_first"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
@pytest.mark.parametrize("policy", ["full", "topk-1.0", "topk-0.1"])
def test_float32_gradients_equal_plain_pytorch(name, policy):
    """``full``: PyTorch's own backward, bit for bit. ``topk``: other kernels summing in
    another order, so equal to float32 rounding: each gradient within 1e-5 of its largest
    entry, or 1e-11 (float32's epsilon is 1.2e-7; a wrong layout or padding was off by 1e-2
    or more)."""
    model, inputs, y, loss_fn = to_float32(MODELS[name]())
    ratio = 0.1 if policy == "topk-0.1" else 1.0
    reference = copy.deepcopy(model)
    if ratio < 1.0:
        reference = masked_reference(reference, ratio)
    expected = plain_gradients(reference, inputs, y, loss_fn)
    config = tinyprop.TinyPropConfig(policy=policy.split("-")[0], ratio=ratio)
    got, stats = tinyprop_gradients(model, inputs, y, loss_fn, config)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if policy == "full":
            assert torch.equal(got[key], value), key
        else:
            # (a key bias's gradient is 0 up to rounding: softmax ignores it; 1e-14 here)
            scale = max(float(value.abs().max()), 1e-6)
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5 * scale, msg=key)
    if policy != "full":
        assert stats.keep, "no sparse layer ran"
