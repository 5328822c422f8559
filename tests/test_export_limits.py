"""Exporter inputs beyond what the C runtime runs, refused before anything is written: shapes
past the runtime's int32 limits (the exporter wrote them, then ``tp_init`` stopped with status
-3), weights computed by parametrizations (exported as plain weights: another training than
PyTorch's), TorchScript modules (an AttributeError naming nothing), float64 weights beyond
float32's range (named as NaN), complex weights; and a ``torch.compile``'d model, exported as
the module it wraps (it was refused as an unknown layer). The limits mirror ``model.c`` and
``plan.c``: the C runtime refuses exactly the shapes the exporter refuses."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.arena import plan_arena
from tinyprop.export.graph import (
    CONV2D,
    DENSE,
    FLATTEN,
    MAXPOOL,
    LayerSpec,
    UnsupportedLayerError,
)
from tinyprop.export.limits import RuntimeLimitError, check_layers
from tinyprop.export.runtime import (
    LayerSpecC,
    ModelSpecC,
    load_library,
    memory_to_c,
    policy_to_c,
    runtime_dir,
)
from tinyprop.memory import MemoryMode

TP_ERR_SHAPE = -3


def conv(channels: int, out: int, height: int, width: int) -> list[LayerSpec]:
    """A 1x1 conv from (channels, height, width), a global max pool, flatten, dense to 2."""
    return [
        LayerSpec(
            CONV2D,
            "0",
            "Conv2d",
            (channels, height, width),
            (out, height, width),
            out,
            (1, 1),
            (1, 1),
            has_bias=True,
        ),  # fmt: skip
        LayerSpec(
            MAXPOOL,
            "1",
            "MaxPool2d",
            (out, height, width),
            (out, 1, 1),
            kernel=(height, width),
            stride=(height, width),
        ),  # fmt: skip
        LayerSpec(FLATTEN, "2", "Flatten", (out, 1, 1), (out, 1, 1)),
        LayerSpec(DENSE, "3", "Linear", (out, 1, 1), (2, 1, 1), 2, has_bias=True),
    ]


def dense(widths: list[int]) -> list[LayerSpec]:
    """Dense layers of these widths (the first is the input)."""
    return [
        LayerSpec(DENSE, str(i), "Linear", (a, 1, 1), (b, 1, 1), b, has_bias=True)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]


# (layers, policy, optimizer): at and just past each limit
BORDERS = [
    (conv(1, 2, 4096, 4096), "topk", "sgd"),  # selection scratch 2 x 2^25 = 2^26 floats
    (conv(1, 2, 4097, 4096), "topk", "sgd"),  # ... 2^26 + 8192: one buffer too large
    (conv(1, 2, 4097, 4096), "full", "sgd"),  # no selection: fits
    (conv(1, 4, 4096, 4096), "full", "sgd"),  # an output of 2^26
    (conv(1, 4, 4097, 4096), "full", "sgd"),  # an output past 2^26
    (dense([8192, 8192, 2]), "full", "adam"),  # a weight of 2^26
    (dense([8192, 8193, 2]), "full", "sgd"),  # a weight past 2^26
    (dense([8192, 8192, 8192, 2]), "full", "sgd"),  # weights and gradients: 2^28 floats
    (dense([8192, 8192, 8192, 2]), "full", "adam"),  # with two moments: 2^29 floats
]


def c_status(library, layers, policy, optimizer) -> int:
    specs = (LayerSpecC * len(layers))()
    for spec, layer in zip(specs, layers, strict=True):
        spec.kind, spec.out_channels, spec.groups = layer.kind, layer.out_channels, layer.groups
        spec.kernel_h, spec.kernel_w = layer.kernel
        spec.stride_h, spec.stride_w = layer.stride
        spec.padding_h, spec.padding_w = layer.padding
        spec.dilation_h, spec.dilation_w = layer.dilation
        spec.has_bias = int(layer.has_bias)
    model = ModelSpecC(*layers[0].input_shape, len(layers), specs)
    size = ctypes.c_size_t()
    return library.tp_arena_bytes_mode(
        ctypes.byref(model),
        ctypes.byref(policy_to_c(tinyprop.TinyPropConfig(policy))),
        ctypes.byref(OptimizerSpec(optimizer).to_c()),
        ctypes.byref(memory_to_c(MemoryMode())),
        ctypes.byref(size),
    )


def test_the_exporter_refuses_exactly_what_the_runtime_refuses():
    library = load_library()
    refused = []
    for layers, policy, optimizer in BORDERS:
        try:
            check_layers(layers)
            plan_arena(layers, policy, optimizer, 0.0)
            python_refuses = False
        except RuntimeLimitError:
            python_refuses = True
        status = c_status(library, layers, policy, optimizer)
        assert status in (0, TP_ERR_SHAPE), status
        assert python_refuses == (status == TP_ERR_SHAPE), (layers[0], policy, optimizer)
        refused.append(python_refuses)
    assert refused == [False, True, False, False, True, False, True, False, True]


def refused_before_writing(tmp_path, model, shape, match, error=ValueError):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        export_c(model, tinyprop.TinyPropConfig("topk"), out, shape, OptimizerSpec(), 4)
    assert not out.exists()


def test_shapes_beyond_the_runtime_are_refused_naming_the_layer(tmp_path):
    big = nn.Sequential(nn.Conv2d(1, 4096, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4096, 2))  # fmt: skip
    refused_before_writing(
        tmp_path, big, (1, 200, 200), r"layer '0' \(Conv2d\): its output of shape \(4096, 200, "
        r"200\).*67,108,864 elements", RuntimeLimitError
    )  # fmt: skip
    selection = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                              nn.Linear(2, 2))  # fmt: skip
    refused_before_writing(
        tmp_path,
        selection,
        (1, 4097, 4096),
        r"layer '0' \(Conv2d\): a buffer of 67,125,248",
        RuntimeLimitError,
    )
    wide = nn.Linear(8193, 8192, device="meta").to_empty(device="cpu")  # no values drawn
    refused_before_writing(
        tmp_path, nn.Sequential(wide), (8193,), r"'0' has a weight of 67,117,056 values"
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
def test_weights_pytorch_computes_or_cannot_hold_in_float32_are_refused(tmp_path):
    torch.manual_seed(0)
    with_norm = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2)
    )
    refused_before_writing(
        tmp_path, with_norm, (4,), r"'0' \(ParametrizedLinear\): its weight is computed by a "
        r"parametrization.*remove_parametrizations", UnsupportedLayerError
    )  # fmt: skip
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    refused_before_writing(tmp_path, scripted, (4,), "TorchScript module", UnsupportedLayerError)
    wide = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        wide[2].weight[1, 3] = 1e300
    refused_before_writing(tmp_path, wide, (4,), r"'2' has a weight value of magnitude 1e\+300")
    complex_weights = nn.Sequential(nn.Linear(4, 2).to(torch.complex64))
    refused_before_writing(tmp_path, complex_weights, (4,), r"'0' has a weight of dtype")


def test_a_compiled_model_exports_as_the_module_it_wraps(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    config = tinyprop.TinyPropConfig("tinypropv2")
    plain = export_c(net, config, tmp_path / "plain", (4,), OptimizerSpec(), 4)
    compiled = export_c(torch.compile(net), config, tmp_path / "compiled", (4,), OptimizerSpec(), 4)
    assert compiled.arena_bytes == plain.arena_bytes
    header = (tmp_path / "compiled" / "tinyprop_model.h").read_text()
    assert header == (tmp_path / "plain" / "tinyprop_model.h").read_text()


def test_a_data_parallel_model_exports_as_the_module_it_wraps(tmp_path):
    """nn.DataParallel (and DistributedDataParallel) around the model, or around its compiled
    form: exported as the module inside, its frozen first layer found through the wrappers;
    before, the export refused '<root>' (DataParallel) as a forward torch.fx cannot trace.
    ram_bytes and flash_bytes take NumPy integers too (refused as not an int before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    config, spec = tinyprop.TinyPropConfig("tinypropv2"), OptimizerSpec()
    plain = export_c(net, config, tmp_path / "plain", (4,), spec, 4)
    assert plain.memory.frozen_parameters == 40
    expected = (tmp_path / "plain" / "tinyprop_model.h").read_text()
    for name, wrapped in (
        ("dp", nn.DataParallel(net)),
        ("dp-compiled", nn.DataParallel(torch.compile(net))),
    ):
        result = export_c(wrapped, config, tmp_path / name, (4,), spec, 4,
                          ram_bytes=np.int64(1 << 20), flash_bytes=np.uint32(1 << 20))  # fmt: skip
        assert result.memory == plain.memory
        assert (tmp_path / name / "tinyprop_model.h").read_text() == expected
    with pytest.raises(ValueError, match="flash_bytes must be a positive int"):
        export_c(net, config, tmp_path / "b", (4,), spec, 4, flash_bytes=np.bool_(True))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_more_layers_than_the_plan_counts_are_refused_in_python_and_in_c():
    """The plan's steps 0 .. 2L are int16: at most 16,383 runtime layers (a build for more
    wrapped them and overlapped buffers alive together)."""
    layers = dense([4, 4]) * 16384
    with pytest.raises(RuntimeLimitError, match="16,384 runtime layers.*at most 16,383"):
        check_layers(layers)
    check_layers(layers[:16383])
    plan = str(runtime_dir() / "src" / "plan.c")
    include = ["-I", str(runtime_dir() / "include")]
    for count, compiles in ((16383, True), (16384, False)):
        run = subprocess.run(
            ["gcc", "-std=c99", "-fsyntax-only", *include, f"-DTP_MAX_LAYERS={count}", plan],
            capture_output=True, text=True,
        )  # fmt: skip
        assert (run.returncode == 0) == compiles, run.stderr
        assert compiles or "TP_MAX_LAYERS is at most 16383" in run.stderr
