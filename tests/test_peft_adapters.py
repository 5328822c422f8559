"""peft adapters besides LoRA (test_integrations.py has LoRA and modules_to_save): IA3 (learned
scalings of the keys, values and feed-forward input) and prompt tuning (learned virtual tokens)
on a small Llama: tinyprop applied to the PeftModel trains the adapters with plain PyTorch's
gradients at ``topk`` 1.0 and the masked reference's at 0.3."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_model_matrix import masked_reference

import tinyprop

peft = pytest.importorskip("peft")  # the test extra installs it
transformers = pytest.importorskip("transformers")


def adapter_config(kind: str):
    if kind == "ia3":
        return peft.IA3Config(
            task_type="SEQ_CLS", target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        )  # fmt: skip
    return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)


@pytest.mark.parametrize("kind", ["ia3", "prompt tuning"])
def test_a_peft_adapter_trains_as_plain_pytorch_and_as_the_masked_reference(kind):
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForSequenceClassification(config).double()
    plain = peft.get_peft_model(base, adapter_config(kind))
    generator = torch.Generator().manual_seed(0)
    ids, y = torch.randint(1, 40, (4, 7), generator=generator), torch.tensor([0, 1, 2, 1])

    def losses(model):
        return F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")

    for ratio in (1.0, 0.3):
        reference = copy.deepcopy(plain)
        if ratio < 1:
            reference = masked_reference(reference, ratio)
        losses(reference).mean().backward()
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the modules kept dense are named
            model = tinyprop.apply(
                copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
            )
        stats = tinyprop.backward(model, losses(model))
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == expected.keys() and len(got) >= 2  # the adapters and the head
        for name, gradient in expected.items():
            torch.testing.assert_close(got[name], gradient, rtol=0, atol=1e-10, msg=name)
        assert len(stats.keep) >= 5
        if ratio < 1:
            assert stats.macs.backward_ratio() < 0.8
