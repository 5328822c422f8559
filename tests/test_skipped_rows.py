"""drop_skipped_rows (on by default with a budget) leaves the skipped samples' rows out of the
layers' backward only where the rows are the samples and a BatchNorm couples them: a layer
whose rows merely number B (time steps of a sequence-first (T, B, F) input with T = B, the
rows of a weight product on an identity, as peft's DoRA computes) keeps every row (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinyprop

BATCH = 6
LOSS = nn.CrossEntropyLoss(reduction="none")
# every entry kept, half the samples skipped from the first step (q0 = b with skip_split 1)
CONFIG = dict(
    policy="tinypropv2", budget=0.5, skip_split=1.0, s_min=1.0, s_max=1.0, zeta=1.0
)  # fmt: skip


class SequenceFirst(nn.Module):
    """Linear layers on a (T, B, F) input, averaged over T; a BatchNorm1d head with ``norm``."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.token = nn.Linear(5, 16)
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (T, B, 5)
        return self.head(self.norm(torch.relu(self.token(x)).mean(0)))


class WeightProduct(nn.Module):
    """A low-rank weight B·A computed by calling both layers on an identity (peft's DoRA)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(BATCH, 4, bias=False)
        self.up = nn.Linear(4, BATCH, bias=False)
        self.head = nn.Linear(BATCH, 3)

    def forward(self, x):  # (B, 6)
        weight = self.up(self.down(torch.eye(BATCH, dtype=x.dtype))).T  # (6, 6)
        return self.head(torch.relu(x @ weight.T))


def inputs(name: str):
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, BATCH, 5) if name == "sequence_first" else (BATCH, BATCH)  # T = B
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (BATCH,), generator=generator)


BUILDERS = {"sequence_first": SequenceFirst, "weight_product": WeightProduct}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_rows_that_merely_number_b_keep_their_gradient(name):
    """The gradient is plain autograd's of the masked mean loss (skipped samples weighted 0):
    dropping rows 'of skipped samples' there left out time steps / weight rows of the trained
    samples (gradients 0.1 off, silently)."""
    torch.manual_seed(0)
    plain = BUILDERS[name]().double()
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(**CONFIG))
    x, y = inputs(name)
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert 0 < stats.trained < BATCH
    (LOSS(plain(x), y) * stats.trained_mask / BATCH).sum().backward()
    for (key, expected), got in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-12, msg=key)


def test_a_sequence_first_layer_keeps_its_rows_below_a_batch_norm():
    """With a BatchNorm coupling the samples, the (B, 16) head drops the skipped samples'
    rows, the (T, B, 5) layer with T = B keeps its T rows."""
    torch.manual_seed(0)
    model = tinyprop.apply(SequenceFirst(norm=True).double(), tinyprop.TinyPropConfig(**CONFIG))
    x, y = inputs("sequence_first")
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert 0 < stats.trained < BATCH
    assert stats.keep["head"].numel() == stats.trained
    assert stats.keep["token"].numel() == BATCH  # every time step (it kept `trained` before)


def info_nce(embeddings, labels=None):
    """Symmetric InfoNCE of 2·P rows (P anchors, then their P positives): (2P,) one loss per
    row, each depending on every row of the batch."""
    z = nn.functional.normalize(embeddings, dim=1)
    pairs = z.shape[0] // 2
    logits = z[:pairs] @ z[pairs:].T / 0.5  # (P, P)
    target = torch.arange(pairs)
    return torch.cat(
        [LOSS(logits, target), LOSS(logits.T, target)]
    )  # fmt: skip


@pytest.mark.parametrize("width", [BATCH, 16])
def test_a_contrastive_loss_gets_the_exact_gradient_of_the_trained_samples(width):
    """InfoNCE couples the samples: a skipped sample's embedding gets a gradient from the
    trained samples' losses. Below a BatchNorm, drop_skipped_rows left those rows out (the
    gradient 0.18 off, silently), and an embedding as wide as the batch (D = B) was refused
    with a ValueError asking for a sample_dim no dimension could satisfy."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, width)
    ).double()  # fmt: skip
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(**CONFIG))
    x = torch.randn(BATCH, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="losses couple the samples"):
        stats = tinyprop.backward(model, info_nce(model(x)))
    assert 0 < stats.trained < BATCH
    assert stats.keep["0"].numel() == BATCH  # the skipped rows are backpropagated too
    (info_nce(plain(x)) * stats.trained_mask / BATCH).sum().backward()
    for (key, expected), got in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-12, msg=key)
