"""transformers families no other test builds (small configs, float64, no weights
downloaded): GPT-NeoX, Falcon (its ``FalconLinear`` registered), Phi, BLOOM's ALiBi, CLIP's
text tower, Swin's windows, Wav2Vec2 (its weight_norm'd positional convolution) and Whisper's
encoder (DeBERTa-v2, ConvNeXt and MobileViT: benchmarks/user_models.py). ``topk`` at 1.0 gives
plain PyTorch's gradients; ``topk`` 0.3 the masked reference's (every converted layer's δ cut
to its k largest entries per row, in plain PyTorch)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_model_matrix import masked_reference

import tinyprop

transformers = pytest.importorskip("transformers")  # the test extra installs it
SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
TOKENS = dict(vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a padded sample
    return {"input_ids": ids, "attention_mask": mask}


def pixels():
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)}


def classes(output, y):
    return F.cross_entropy(output.logits, y, reduction="none")


def next_token(output, y):  # per sample: the mean over its positions
    logits = output.logits[:, :-1]
    targets = tokens()["input_ids"][:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses.view(targets.shape).mean(1)


def gpt_neox():
    config = transformers.GPTNeoXConfig(
        **SMALL, **TOKENS, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0
    )
    return transformers.GPTNeoXForCausalLM(config), tokens, next_token


def falcon():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    tinyprop.register_linear(FalconLinear)  # its own forward: x @ weight.T + bias
    config = transformers.FalconConfig(
        **TOKENS, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return transformers.FalconForCausalLM(config), tokens, next_token


def phi():
    config = transformers.PhiConfig(
        **SMALL, **TOKENS, max_position_embeddings=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    return transformers.PhiForCausalLM(config), tokens, next_token


def bloom():
    config = transformers.BloomConfig(
        **TOKENS, hidden_size=16, n_layer=1, n_head=2, hidden_dropout=0.0, attention_dropout=0.0
    )
    return transformers.BloomForCausalLM(config), tokens, next_token


def clip_text():
    config = transformers.CLIPTextConfig(**SMALL, **TOKENS, max_position_embeddings=16)
    model = transformers.CLIPTextModelWithProjection(config)
    return model, tokens, lambda output, y: output.text_embeds.pow(2).sum(1)


def swin():
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    return transformers.SwinForImageClassification(config), pixels, classes


def wav2vec2():
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 400, generator=generator, dtype=torch.float64)
    return (
        transformers.Wav2Vec2ForSequenceClassification(config),
        lambda: {"input_values": audio},
        classes,
    )


def whisper():
    config = transformers.WhisperConfig(
        vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=8, max_target_positions=8, num_labels=3,
        classifier_proj_size=8, dropout=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 8, 16, generator=generator, dtype=torch.float64)
    return (
        transformers.WhisperForAudioClassification(config),
        lambda: {"input_features": features},
        classes,
    )


FAMILIES = [gpt_neox, falcon, phi, bloom, clip_text, swin, wav2vec2, whisper]


@pytest.mark.parametrize("family", FAMILIES, ids=[family.__name__ for family in FAMILIES])
def test_a_transformers_family_trains_as_plain_pytorch_and_as_the_masked_reference(family):
    torch.manual_seed(0)
    plain, inputs, loss_fn = family()
    plain = plain.double().train()
    x, y = inputs(), torch.tensor([0, 1, 2])

    def forward(model):
        return model(**x)

    for ratio in (1.0, 0.3):
        reference = copy.deepcopy(plain)
        if ratio < 1:
            reference = masked_reference(reference, ratio)
        reference.zero_grad()
        loss_fn(forward(reference), y).mean().backward()
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the modules kept dense are named
            model = tinyprop.apply(
                copy.deepcopy(plain), tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
            )
        stats = tinyprop.backward(model, loss_fn(forward(model), y))
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == expected.keys()
        for name, gradient in expected.items():
            torch.testing.assert_close(got[name], gradient, rtol=0, atol=1e-10, msg=name)
        assert len(stats.keep) >= 5  # the family's linear layers are sparse
        if ratio < 1:
            assert stats.macs.backward_ratio() < 0.8
