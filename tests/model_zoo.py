"""Models nobody on the team designed, for the correctness matrix: row layouts other than
(B, ...), attention, transformers' BERT and GPT-2 from small configs, shared weights.

Every entry builds (model, inputs, per-sample loss function) in float64 with dropout off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from core_models import BUILDERS, batch, build
from torch import nn


class PerToken(nn.Module):
    """A Linear on the (B·T, D) reshape of a (B, T, D) input: its rows are tokens."""

    def __init__(self, tokens: int = 5, features: int = 6, hidden: int = 8, classes: int = 4):
        super().__init__()
        self.token = nn.Linear(features, hidden)
        self.head = nn.Linear(tokens * hidden, classes)

    def forward(self, x):  # (B, T, D)
        batch_size, tokens, features = x.shape
        h = torch.tanh(self.token(x.reshape(batch_size * tokens, features)))  # (B·T, H)
        return self.head(h.reshape(batch_size, -1))  # (B, classes)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer, batch-first or sequence-first, mean-pooled, and a head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=batch_first
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention (self-attention) and a head."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(attended.mean(1))


class CalledTwice(nn.Module):
    """One Linear applied twice per forward (shared weights), then a head."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def cross_entropy(output, y):
    return F.cross_entropy(output, y, reduction="none")


def _classifier(model: nn.Module, shape: tuple, classes: int, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (size,), generator=generator)
    return model.double(), (x,), y, cross_entropy


def tiny_bert(layers: int = 1, seed: int = 0) -> nn.Module:
    """A BERT sequence classifier from a small config (vocabulary 40, width 16, 3 labels, no
    weights loaded), dropout off, float64, its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).double()


def _bert(size: int, seed: int):
    model = tiny_bert(layers=2, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (size, 7), generator=generator)
    y = torch.randint(0, 3, (size,), generator=generator)

    def loss(output, y):
        return F.cross_entropy(output.logits, y, reduction="none")

    return model, (ids,), y, loss


def _gpt2(size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).double()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (size, 7), generator=generator)

    def loss(output, ids):  # mean next-token cross-entropy per sequence
        logits = output.logits[:, :-1]  # (B, T - 1, V)
        tokens = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return tokens.mean(1)  # (B,)

    return model, (ids,), ids, loss


def zoo(size: int = 4, seed: int = 0, tokens: int = 5) -> dict:
    """name -> a function building (model, inputs, targets, per-sample loss)."""
    entries = {}
    for name in BUILDERS:

        def builder(name=name):
            model = build(name, seed=seed)
            x, y = batch(name, size=size, seed=seed)
            return model, (x,), y, cross_entropy

        entries[name] = builder

    def seeded(factory):
        torch.manual_seed(seed)
        return factory()

    entries["per_token"] = lambda: _classifier(seeded(PerToken), (5, 6), 4, size, seed)
    for batch_first in (True, False):
        layout = "batch_first" if batch_first else "seq_first"
        entries[f"encoder_{layout}"] = lambda batch_first=batch_first: _classifier(
            seeded(lambda: Encoder(batch_first)), (tokens, 8), 3, size, seed
        )
    entries["attention"] = lambda: _classifier(seeded(Attention), (tokens, 8), 3, size, seed)
    entries["called_twice"] = lambda: _classifier(seeded(CalledTwice), (6,), 3, size, seed)
    entries["bert"] = lambda: _bert(size, seed)
    entries["gpt2"] = lambda: _gpt2(size, seed)
    return entries
