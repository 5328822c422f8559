"""A transformers model in bfloat16 (Llama with grouped-query attention, from a small config)
through ``tinyprop.train_step`` and through the user's own loop: plain PyTorch's weights bit for
bit under ``full`` and ``topk`` at ratio 1.0 after three AdamW steps; ``topk`` 0.1 and
``tinypropv2`` train, their ledger below full's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tinyprop

STEPS = 3


def llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).to(torch.bfloat16)


def data():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (6, 7), generator=generator)
    return ids, torch.randint(0, 3, (6,), generator=generator)


def per_sample_loss(output, y):  # the whole ModelOutput, as the loop hands it
    return F.cross_entropy(output.logits.float(), y, reduction="none")


def run(model, way: str) -> list:
    ids, y = data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = []
    for _ in range(STEPS):
        if way == "train_step":
            stats.append(tinyprop.train_step(model, ids, y, per_sample_loss, optimizer))
            continue
        optimizer.zero_grad()
        losses = per_sample_loss(model(input_ids=ids), y)
        if way == "plain":
            losses.mean().backward()
        else:
            stats.append(tinyprop.backward(model, losses))
        optimizer.step()
    return stats


@pytest.mark.parametrize("way", ["train_step", "own loop"])
@pytest.mark.parametrize("policy", ["full", "topk-1.0", "topk-0.1", "tinypropv2"])
def test_a_bfloat16_transformers_model_trains_as_plain_pytorch(policy, way):
    """Before: train_step refused a transformers model ("the model must return one output
    tensor (B, ...) with B=6; got a SequenceClassifierOutputWithPast"), though the own loop
    finds the logits in the same output."""
    name, _, ratio = policy.partition("-")
    config = tinyprop.TinyPropConfig(policy=name, ratio=float(ratio or 0.1))
    model = tinyprop.apply(llama(), config)
    plain = tinyprop.remove(copy.deepcopy(model))
    run(plain, "plain")
    stats = run(model, way)
    assert all(step.trained + step.skipped == 6 for step in stats)
    same = [torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True)]
    if name == "full" or ratio == "1.0":
        assert all(same)
    else:
        assert not all(same)  # sparse: some weights differ from dense training
        assert stats[0].keep and 0 < stats[0].macs.backward_ratio() < 0.5
        untrained = llama().parameters()
        assert not all(map(torch.equal, model.parameters(), untrained))  # it trained
