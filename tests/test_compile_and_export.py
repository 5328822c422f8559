"""What users do with the model they trained: evaluate it compiled (``torch.compile``, under
``torch.no_grad``), and export it (``torch.export``): a trained applied model exports as the
plain model, attention included (the graph and the outputs of ``tinyprop.remove``'s copy)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


class Attends(nn.Module):
    """Attention, a convolution over its tokens, a ReLU and a head: (B, 5, 8) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.Flatten(), nn.ReLU())
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        attended, _ = self.attention(x, x, x)
        return self.head(self.mix(attended.transpose(1, 2)))


def mlp() -> nn.Module:  # a ReLU before a sparse Linear: the fused ReLU's mark
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def trained(build, policy: str = "tinypropv2") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, 5, 8) if isinstance(model, Attends) else torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the in-projection kept dense is named
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        tinyprop.train_step(model, x, y, LOSS, optimizer)
    return model, x


@pytest.mark.parametrize("build", [mlp, Attends], ids=["mlp", "attention"])
def test_a_compiled_applied_model_evaluates_under_no_grad(build):
    """Before: torch.compile's trace failed inside every sparse layer under torch.no_grad
    (InternalTorchDynamoError "'dict' object has no attribute 'node'", reading the fused
    ReLU's mark), so a compiled model could train but not be evaluated."""
    model, x = trained(build)
    model.eval()
    plain = tinyprop.remove(copy.deepcopy(model))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("build", [mlp, Attends], ids=["mlp", "attention"])
def test_torch_export_of_a_trained_applied_model_is_the_plain_model(build, strict):
    """Before: the attention exported tinyprop's rewritten forward (scaled_dot_product_attention
    on the split projections), not PyTorch's: other operations, other bits (3e-8 off); and
    ``strict=True`` failed in tinyprop's forward hooks and fused ReLU (dynamo could not trace
    threading.get_ident, nor a tensor's grad_fn)."""
    model, x = trained(build)
    model.eval()
    plain = tinyprop.remove(copy.deepcopy(model))
    exported, expected = (torch.export.export(m, (x,), strict=strict) for m in (model, plain))
    operations = [
        [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        for program in (exported, expected)
    ]
    assert operations[0] == operations[1]
    with torch.no_grad():
        assert torch.equal(exported.module()(x), expected.module()(x))
