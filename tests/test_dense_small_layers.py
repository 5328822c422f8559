"""dense_small_layers: convolutions whose sparse backward cannot win are backpropagated densely."""

import copy

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import native
from tinyprop.export import export_c

LOSS = nn.CrossEntropyLoss(reduction="none")


def model() -> nn.Module:
    """A 1-channel first conv (fan-in 9), a depthwise conv (9), a wide conv (8·9 = 72 >= 64)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 5),
    )


def step(config):
    torch.manual_seed(0)
    trained = tinyprop.apply(model(), config)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.0)
    return trained, tinyprop.train_step(trained, x, y, LOSS, optimizer)


@pytest.mark.parametrize("policy", ["topk", "tinyprop", "tinypropv2"])
def test_small_fan_in_convolutions_keep_every_entry_and_count_as_dense(policy, monkeypatch):
    settings = {"skip_threshold": 0.0} if policy == "tinypropv2" else {}
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.1, dense_small_layers=True, **settings)
    selected = []  # N of every δ a native top-k ran on (with or without the sums of |δ|)
    for name in ("topk", "topk_with_sums"):
        original = getattr(native, name)
        monkeypatch.setattr(
            native,
            name,
            lambda delta, *args, original=original, **kw: (
                selected.append(delta.shape[1]) or original(delta, *args, **kw)
            ),
        )
    _, stats = step(config)
    assert stats.keep["0"].tolist() == [8 * 64] * 4  # fan-in 9: dense
    assert stats.keep["2"].tolist() == [8 * 64] * 4  # depthwise, fan-in 9: dense
    assert (stats.keep["4"] < 6 * 64).all()  # fan-in 72: sparse
    if native.can_select(torch.zeros(1, 1)):
        assert selected and 8 * 64 not in selected  # the dense layers selected nothing
    # and the ledger counts them as dense: more backward MACs than without the setting
    _, sparse_stats = step(config.replace(dense_small_layers=False))
    assert stats.macs.backward > sparse_stats.macs.backward


def test_default_keeps_every_layer_sparse_and_export_refuses_the_setting(tmp_path):
    _, stats = step(tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    assert all((keep < 64 * 8).all() for keep in stats.keep.values())
    with pytest.raises(TypeError, match="dense_small_layers"):
        tinyprop.TinyPropConfig(policy="topk", dense_small_layers=1)
    net = copy.deepcopy(model())
    config = tinyprop.TinyPropConfig(policy="topk", dense_small_layers=True)
    with pytest.raises(ValueError, match="dense_small_layers=False"):
        export_c(net, config, tmp_path, input_shape=(1, 8, 8))
