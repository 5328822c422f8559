"""Models and loops users bring, checked against plain PyTorch (too slow for ``make test``).

For each transformers model family, built from a small config (no downloaded weights), in
float64 with dropout off: ``full`` and ``topk`` at ratio 1.0 must give the gradients of
``losses.mean().backward()``, ``topk`` at 0.1 those of a per-row top-k reference (the masked
reference of tests/test_model_matrix.py), to 1e-10; ``tinypropv2`` must run. With
``--float32`` the same in float32, where the native kernels run: ``full`` bit for bit, the
others to 1e-5 of the largest gradient entry (the float64 pass never reached those kernels:
ConvNeXt's first float32 step raised 'grad_weight must be contiguous'). Then PyTorch
Lightning with ``accumulate_grad_batches=2``, gradient clipping and ``precision="bf16-mixed"``
against the same steps written by hand.

    .venv/bin/python benchmarks/user_models.py            # everything (a few minutes)
    .venv/bin/python benchmarks/user_models.py vit llama  # some models only
    .venv/bin/python benchmarks/user_models.py --float32  # float32: the native kernels
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformers as T  # noqa: E402  (the test extra)
from core_models import mlp  # noqa: E402
from test_integrations import CONFIG, learnable_data, lightning_classifier  # noqa: E402
from test_model_matrix import masked_reference, plain_gradients  # noqa: E402

import tinyprop  # noqa: E402

BATCH = 3
LOSS = nn.CrossEntropyLoss(reduction="none")


def classifier_loss(output, y):
    return F.cross_entropy(output.logits, y, reduction="none")


def causal_lm_loss(output, ids):
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def token_loss(output, labels):
    return F.cross_entropy(output.logits.transpose(1, 2), labels, reduction="none").mean(1)


class WithLabels(nn.Module):
    """An encoder-decoder model called with (inputs, labels): it makes its decoder inputs."""

    def __init__(self, model: nn.Module, input_name: str):
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, inputs, labels):
        return self.model(**{self.input_name: inputs}, labels=labels)


def _ids(size, high=40):
    return torch.randint(3, high, size, generator=torch.Generator().manual_seed(0))


def vit():
    config = T.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    x = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return T.ViTForImageClassification(config), (x,), _ids((BATCH,)) % 3, classifier_loss


def distilbert():
    config = T.DistilBertConfig(
        vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )  # fmt: skip
    model = T.DistilBertForSequenceClassification(config)
    return model, (_ids((BATCH, 7)),), _ids((BATCH,)) % 3, classifier_loss


def llama(checkpointing: bool = False):
    config = T.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = T.LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    ids = _ids((BATCH, 7))
    return model, (ids,), ids, causal_lm_loss


def mistral():
    config = T.MistralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        sliding_window=4,
    )  # fmt: skip
    ids = _ids((BATCH, 7))
    return T.MistralForCausalLM(config), (ids,), ids, causal_lm_loss


def t5():
    config = T.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    labels = _ids((BATCH, 5))
    model = WithLabels(T.T5ForConditionalGeneration(config), "input_ids")
    return model, (_ids((BATCH, 7)), labels), labels, token_loss


def bart():
    config = T.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    labels = _ids((BATCH, 5))
    model = WithLabels(T.BartForConditionalGeneration(config), "input_ids")
    return model, (_ids((BATCH, 7)), labels), labels, token_loss


def whisper():
    config = T.WhisperConfig(
        vocab_size=40, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16, pad_token_id=0,
        decoder_start_token_id=1, eos_token_id=2, bos_token_id=1, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    features = torch.randn(BATCH, 8, 16, generator=torch.Generator().manual_seed(0))
    labels = _ids((BATCH, 5))
    model = WithLabels(T.WhisperForConditionalGeneration(config), "input_features")
    return model, (features, labels), labels, token_loss


def _images(channels=3, size=32):
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(0))


def efficientnet():
    """Depthwise and pointwise convolutions, squeeze-and-excitation, BatchNorm, SiLU."""
    config = T.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
        num_labels=3, dropout_rate=0.0, drop_connect_rate=0.0,
    )  # fmt: skip
    model = T.EfficientNetForImageClassification(config)
    return model, (_images(),), _ids((BATCH,)) % 3, classifier_loss


def resnet():
    config = T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        layer_type="bottleneck",
    )  # fmt: skip
    return T.ResNetForImageClassification(config), (_images(),), _ids((BATCH,)) % 3, classifier_loss


def convnext():
    """Depthwise 7x7 convolutions, channels-last LayerNorm, Linear layers on (B, H, W, C)."""
    config = T.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        drop_path_rate=0.0,
    )  # fmt: skip
    model = T.ConvNextForImageClassification(config)
    return model, (_images(),), _ids((BATCH,)) % 3, classifier_loss


def mobilevit():
    """Convolutions and transformer blocks on unfolded patches."""
    config = T.MobileViTConfig(
        image_size=32, patch_size=2, hidden_sizes=[16, 16, 16],
        neck_hidden_sizes=[8, 8, 16, 16, 16, 24, 32], num_attention_heads=2, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
    )  # fmt: skip
    model = T.MobileViTForImageClassification(config)
    return model, (_images(),), _ids((BATCH,)) % 3, classifier_loss


def wav2vec2():
    """A Conv1d feature encoder on raw audio (GroupNorm), a grouped positional Conv1d under
    weight_norm, a transformer encoder."""
    config = T.Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, num_labels=3, classifier_proj_size=8,
    )  # fmt: skip
    audio = torch.randn(BATCH, 400, generator=torch.Generator().manual_seed(0))
    model = T.Wav2Vec2ForSequenceClassification(config)
    return model, (audio,), _ids((BATCH,)) % 3, classifier_loss


def mobilenet_v2():
    """Inverted residuals: 1x1 expansion, depthwise 3x3 (TensorFlow padding), ReLU6, BatchNorm."""
    config = T.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=3, classifier_dropout_prob=0.0
    )
    model = T.MobileNetV2ForImageClassification(config)
    return model, (_images(),), _ids((BATCH,)) % 3, classifier_loss


def qwen2():
    """Grouped KV heads (4 query heads on 2), rotary, biased q/k/v, tied embeddings."""
    config = T.Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    ids = _ids((BATCH, 7))
    return T.Qwen2ForCausalLM(config), (ids,), ids, causal_lm_loss


def deberta_v2():
    """Disentangled attention: position projections called on the relative embeddings (one row
    of positions, no batch), content-to-position and position-to-content scores."""
    config = T.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, relative_attention=True, position_buckets=8,
        pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    model = T.DebertaV2ForSequenceClassification(config)
    return model, (_ids((BATCH, 7)),), _ids((BATCH,)) % 3, classifier_loss


def mamba():
    """A selective state-space model: a depthwise causal Conv1d on the transposed in_proj
    output, the scan in PyTorch (no CUDA kernels)."""
    config = T.MambaConfig(
        vocab_size=40, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=4, use_mambapy=False,
    )  # fmt: skip
    ids = _ids((BATCH, 7))
    return T.MambaForCausalLM(config), (ids,), ids, causal_lm_loss


def clip():
    """Two towers (a text transformer, a ViT) and one contrastive loss coupling the samples:
    each image's loss against every text of the batch, and each text's against every image."""
    text = T.CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
    )  # fmt: skip
    vision = T.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=8,
    )  # fmt: skip
    config = T.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8
    )
    model = ImageTextLogits(T.CLIPModel(config))
    images = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, (_ids((BATCH, 5)), images), torch.arange(BATCH), contrastive_loss


class ImageTextLogits(nn.Module):
    """CLIP called with (input_ids, pixel_values), returning its (images, texts) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, images):
        return self.model(input_ids=ids, pixel_values=images).logits_per_image


def contrastive_loss(logits, y):
    return (LOSS(logits, y) + LOSS(logits.t(), y)) / 2


def swin():
    """Shifted-window attention on patch merging stages."""
    config = T.SwinConfig(
        image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
        num_heads=[2, 2], window_size=4, num_labels=3, drop_path_rate=0.0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = T.SwinForImageClassification(config)
    return model, (_images(size=16),), _ids((BATCH,)) % 3, classifier_loss


MODELS = {
    "vit": vit,
    "distilbert": distilbert,
    "llama": llama,
    "llama-checkpointing": lambda: llama(checkpointing=True),
    "mistral": mistral,
    "t5": t5,
    "bart": bart,
    "whisper": whisper,
    "efficientnet": efficientnet,
    "resnet": resnet,
    "convnext": convnext,
    "mobilevit": mobilevit,
    "wav2vec2": wav2vec2,
    "mobilenet_v2": mobilenet_v2,
    "qwen2": qwen2,
    "deberta_v2": deberta_v2,
    "mamba": mamba,
    "clip": clip,
    "swin": swin,
}


def build(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    model, inputs, y, loss = MODELS[name]()
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    return model.to(dtype), inputs, y, loss


def verdict(worst: float, largest: float, policy: str, dtype) -> str:
    """float64: equal to 1e-10. float32 (the native kernels): ``full`` equal bit for bit, the
    others to 1e-5 of the largest gradient entry (float32 sums in another order)."""
    if dtype == torch.float64:
        return "equal" if worst < 1e-10 else "DIFFERENT"
    if policy == "full":
        return "equal" if worst == 0 else "DIFFERENT"
    return "equal" if worst <= 1e-5 * largest else "DIFFERENT"


def check_model(name: str, dtype=torch.float64) -> list[str]:
    """One line per policy: the largest gradient difference, or that tinypropv2 ran."""
    lines = []
    for policy in ("full", "topk-1.0", "topk-0.1", "tinypropv2"):
        model, inputs, y, loss = build(name, dtype)
        if policy == "topk-0.1":
            expected = plain_gradients(masked_reference(copy.deepcopy(model), 0.1), inputs, y, loss)
            config = tinyprop.TinyPropConfig(policy="topk", ratio=0.1)
        elif policy == "tinypropv2":
            expected, config = None, tinyprop.TinyPropConfig(policy="tinypropv2")
        else:
            expected = plain_gradients(copy.deepcopy(model), inputs, y, loss)
            config = tinyprop.TinyPropConfig(policy=policy.split("-")[0], ratio=1.0)
        tinyprop.apply(model, config)
        model.zero_grad()
        stats = tinyprop.backward(model, loss(model(*inputs), y))
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ratio = f"backward ratio {stats.macs.backward_ratio():.3f}, {len(stats.keep)} sparse"
        if expected is None:
            lines.append(f"{name:20} {policy:10} trained {stats.trained}/{BATCH}, {ratio}")
            continue
        assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        largest = max(value.abs().max().item() for value in expected.values())
        same = verdict(worst, largest, policy, dtype)
        lines.append(f"{name:20} {policy:10} {same} (max difference {worst:.1e}), {ratio}")
    return lines


def lightning_run(accumulate: int, clip: float | None, precision: str, dtype) -> nn.Module:
    import pytorch_lightning as pl

    from tinyprop.integrations.lightning import TinyPropCallback

    torch.manual_seed(0)
    module = lightning_classifier(tinyprop.apply(mlp().to(dtype), CONFIG))
    x, y = learnable_data()
    data = torch.utils.data.TensorDataset(x.to(dtype), y)
    os.chdir(tempfile.mkdtemp())
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[TinyPropCallback()],
        accumulate_grad_batches=accumulate, precision=precision, gradient_clip_val=clip,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return module.model


def hand_run(accumulate: int, clip: float | None, autocast: bool, dtype) -> nn.Module:
    """The same steps in a loop of one's own: loss / n, no step when nothing trained."""
    torch.manual_seed(0)
    model = tinyprop.apply(mlp().to(dtype), CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = learnable_data()
    x, trained = x.to(dtype), 0
    for index, start in enumerate(range(0, len(x), 4), start=1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = LOSS(model(x[start : start + 4]), y[start : start + 4])
        (tinyprop.loss(model, losses) / accumulate).backward()
        trained += tinyprop.step_stats(model).trained
        if index % accumulate == 0:
            if trained == 0:  # what TinyPropCallback does
                for parameter in model.parameters():
                    parameter.grad = None
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
            trained = 0
    return model


def check_lightning() -> list[str]:
    lines = []
    for label, accumulate, clip, precision, dtype in [
        ("accumulate_grad_batches=2", 2, None, "64-true", torch.float64),
        ("gradient_clip_val=0.01", 1, 0.01, "64-true", torch.float64),
        ('precision="bf16-mixed"', 1, None, "bf16-mixed", torch.float32),
    ]:
        got = lightning_run(accumulate, clip, precision, dtype)
        expected = hand_run(accumulate, clip, precision == "bf16-mixed", dtype)
        worst = max(
            (p - q).abs().max().item()
            for p, q in zip(got.parameters(), expected.parameters(), strict=True)
        )
        lines.append(f"lightning {label:28} weights vs the hand loop: max difference {worst:.1e}")
    return lines


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")  # dense modules named by apply, deprecations
    dtype = torch.float32 if "--float32" in names else torch.float64
    names = [name for name in names if name != "--float32"]
    for name in names or MODELS:
        for line in check_model(name, dtype):
            print(line, flush=True)
    if not names and dtype == torch.float64:
        for line in check_lightning():
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
