"""The backward path for devices that pay for host reads (CUDA), run here on the CPU.

``tinyprop.autograd.HOST_DEVICES`` names the devices where the backward may read values on
the host; emptied, the CPU takes the path a GPU takes: every row, the kept entries as a mask,
no host read per layer. It must keep the same entries, skip the same samples, count the same
ledger and give the same gradients as the host path.
"""

import pytest
import torch
from core_models import BUILDERS, INPUT_SHAPES
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tinyprop
from tinyprop import autograd
from tinyprop.functional import select_mask, select_topk_torch

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIGS = {
    "topk": tinyprop.TinyPropConfig(policy="topk", ratio=0.2),
    "randomk": tinyprop.TinyPropConfig(policy="randomk", ratio=0.2),
    "tinyprop": tinyprop.TinyPropConfig(policy="tinyprop"),
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.97),
    "unified": tinyprop.TinyPropConfig(policy="topk", ratio=0.2, unified=True),
}
# host reads: a value copied to Python, or an op whose output size depends on the values
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "unique"}


class CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def train(builder, config, steps: int, host_path: bool, monkeypatch):
    monkeypatch.setattr(autograd, "HOST_DEVICES", ("cpu",) if host_path else ())
    torch.manual_seed(0)
    model = tinyprop.apply(builder().double(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x = torch.randn(6, *INPUT_SHAPES[builder.__name__], generator=generator).double()
        y = torch.randint(0, 5, (6,), generator=generator)
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        history.append(stats)
    return model, history


@pytest.mark.parametrize("policy", list(CONFIGS))
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d"])
def test_the_path_without_host_reads_keeps_skips_and_computes_what_the_host_path_does(
    name, policy, monkeypatch
):
    host_model, host = train(BUILDERS[name], CONFIGS[policy], 5, True, monkeypatch)
    device_model, device = train(BUILDERS[name], CONFIGS[policy], 5, False, monkeypatch)
    for a, b in zip(host, device, strict=True):
        assert torch.equal(a.trained_mask, b.trained_mask)
        assert a.macs == b.macs
        assert a.keep.keys() == b.keep.keys()
        for layer in a.keep:
            assert torch.equal(a.keep[layer], b.keep[layer]), layer
    if policy == "randomk":  # it draws for the rows it backpropagates: every row here, so
        return  # a row whose δ is all zero shifts the draws of the later rows (same k)
    for (key, a), b in zip(
        host_model.state_dict().items(), device_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=key)
    assert any(stats.skipped for stats in host) or policy != "tinypropv2"


@pytest.mark.parametrize("policy", ["topk", "tinypropv2", "unified"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_no_host_read_in_a_layer_backward(name, policy, monkeypatch):
    """Nothing is read on the host in the layers' backward (the step reads once, at its end,
    for the ledger and the NaN checks)."""
    reads = []
    backward = autograd.SparseBackprop.backward

    def counted(ctx, grad_output):
        with CountHostReads() as mode:
            result = backward(ctx, grad_output)
        reads.append(mode.count)
        return result

    monkeypatch.setattr(autograd.SparseBackprop, "backward", staticmethod(counted))
    _, history = train(BUILDERS[name], CONFIGS[policy], 3, False, monkeypatch)
    assert reads and reads == [0] * len(reads)
    assert sum(stats.trained for stats in history)


def test_a_nan_gradient_is_reported_after_the_backward_and_nothing_is_updated(monkeypatch):
    monkeypatch.setattr(autograd, "HOST_DEVICES", ())
    torch.manual_seed(0)
    model = tinyprop.apply(BUILDERS["mlp"](), CONFIGS["tinyprop"])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(output, y):  # finite loss, NaN gradient: sqrt at 0
        return torch.sqrt(output[:, 0] * 0.0) + LOSS(output, y)

    with pytest.raises(FloatingPointError, match="output gradient of layer"):
        tinyprop.train_step(model, torch.randn(4, 12), torch.zeros(4, dtype=torch.long),
                            loss_fn, optimizer)  # fmt: skip
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("seed", range(5))
def test_select_mask_keeps_what_select_topk_keeps(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (7, 30), generator=generator).double()  # many ties and zeros
    keep = torch.randint(1, 31, (7,), generator=generator)
    rows, columns = select_topk_torch(scores, keep)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected[rows, columns] = True
    assert torch.equal(select_mask(scores, keep), expected)
    keep[2] = 0  # a row that keeps nothing
    assert not select_mask(scores, keep)[2].any()
