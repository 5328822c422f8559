"""Build the C runtime with the system compiler and drive it from Python (ctypes).

Used by the parity tests and the benchmarks: the same model, data and settings run in the C
runtime and in the Python library, and their weights, k per layer, skip decisions and MAC
counts are compared.

Example:
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> c_model = RuntimeModel(net, (1, 4, 4), TinyPropConfig("tinypropv2"), OptimizerSpec(lr=0.1))
    >>> stats = c_model.train_batch(x.numpy(), y.numpy())   # x (B, 1, 4, 4), y (B,)
    >>> stats.keep, stats.trained_mask, c_model.parameters()
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyprop.config import TinyPropConfig
from tinyprop.data.cache import cache_dir, digest_matches, private_folder, record_digest
from tinyprop.export.frozen import mode_of_frozen_layers
from tinyprop.export.graph import LayerSpec, describe
from tinyprop.ledger import Ledger
from tinyprop.memory import MemoryMode

POLICY_CODES = {"full": 0, "topk": 1, "tinyprop": 2, "tinypropv2": 3}
OPTIMIZER_CODES = {"sgd": 0, "adam": 1}
MAX_OPTIMIZER_SETTING = 1e30  # tp_check_optimizer: lr, momentum, weight decay, eps in [0, 1e30]
STATUS = {
    0: "ok",
    -1: "a required pointer is NULL",
    -2: "a setting or count is out of range",
    -3: "layer shapes do not fit together",
    -4: "the arena is too small or not 4-byte aligned",
    -5: "a label is outside [0, classes)",
    -6: "a loss, input, gradient or weight is NaN or infinite; nothing was updated",
    -7: "the model was not initialised",
    -8: "a layer or setting the runtime does not offer",
    -9: "the program and the runtime were compiled with different TP_MAX_LAYERS",
    -10: "a float or int32 buffer is not at a 4-byte aligned address; nothing changed",
}


def runtime_dir() -> Path:
    """The C runtime's folder (``include/``, ``src/``, ``examples/train_example.c``): the copy
    installed with the package (``tinyprop/_runtime`` in a wheel), else the ``runtime/`` folder
    of the source checkout this module runs from (an editable install)."""
    package = Path(__file__).resolve().parents[1]
    for path in (package / "_runtime", package.parents[1] / "runtime"):
        if (path / "include" / "tinyprop.h").is_file():
            return path
    raise FileNotFoundError(
        f"the C runtime sources are neither in {package / '_runtime'} nor in a source checkout; "
        "reinstall tinyprop (pip install tinyprop-*.whl, or pip install -e . in a clone)"
    )


def runtime_max_layers() -> int:
    """The layer count the runtime is built for: ``TP_MAX_LAYERS`` in ``include/tinyprop.h``."""
    header = (runtime_dir() / "include" / "tinyprop.h").read_text()
    found = re.search(r"#define\s+TP_MAX_LAYERS\s+(\d+)", header)
    if found is None:
        raise RuntimeError("include/tinyprop.h does not define TP_MAX_LAYERS; reinstall tinyprop")
    return int(found.group(1))


def runtime_sources() -> list[Path]:
    """The runtime's C files, sorted."""
    return sorted((runtime_dir() / "src").glob("*.c"))


def build_library(flags: tuple[str, ...] = ("-O3",), compiler: str = "gcc") -> Path:
    """Compile the runtime into a shared library (cached by a hash of sources and flags, in a
    folder only this user can write, its SHA-256 recorded at build time and checked on reuse).

    Args:
        flags: extra compiler flags, e.g. ``("-O0", "-g")``.
        compiler: the C compiler to call.

    Returns:
        Path of the ``.so`` file.
    """
    if shutil.which(compiler) is None:
        raise FileNotFoundError(
            f"C compiler {compiler!r} not found; install gcc (apt-get install gcc)"
        )
    root = runtime_dir()
    files = runtime_sources() + sorted((root / "src").glob("*.h")) + [root / "include/tinyprop.h"]
    digest = hashlib.sha256(" ".join((compiler,) + flags).encode())
    for path in files:
        digest.update(path.read_bytes())
    out_dir = private_folder(cache_dir() / "runtime")  # 0700, owner-checked
    if out_dir is None:
        raise PermissionError(f"{cache_dir() / 'runtime'} belongs to another user; not using it")
    library = out_dir / f"libtinyprop-{digest.hexdigest()[:16]}.so"
    if not digest_matches(library):  # missing, planted, truncated: built again, never loaded
        command = [
            compiler,
            "-std=c99",
            "-fPIC",
            "-shared",
            "-Wall",
            "-Wextra",
            "-Werror",
            *flags,
            "-I",
            str(root / "include"),
            *map(str, runtime_sources()),
            "-lm",
            "-o",
            str(library) + ".tmp",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"building the C runtime failed:\n{' '.join(command)}\n{result.stderr}"
            )
        Path(str(library) + ".tmp").replace(library)
        record_digest(library)
    return library


class LayerSpecC(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("out_channels", ctypes.c_int32),
        ("kernel_h", ctypes.c_int32),
        ("kernel_w", ctypes.c_int32),
        ("stride_h", ctypes.c_int32),
        ("stride_w", ctypes.c_int32),
        ("padding_h", ctypes.c_int32),
        ("padding_w", ctypes.c_int32),
        ("dilation_h", ctypes.c_int32),
        ("dilation_w", ctypes.c_int32),
        ("groups", ctypes.c_int32),
        ("has_bias", ctypes.c_int32),
        ("weight", ctypes.POINTER(ctypes.c_float)),
        ("bias", ctypes.POINTER(ctypes.c_float)),
    ]


class ModelSpecC(ctypes.Structure):
    _fields_ = [
        ("input_channels", ctypes.c_int32),
        ("input_height", ctypes.c_int32),
        ("input_width", ctypes.c_int32),
        ("layer_count", ctypes.c_int32),
        ("layers", ctypes.POINTER(LayerSpecC)),
    ]


class PolicyC(ctypes.Structure):
    _fields_ = [("policy", ctypes.c_int)] + [
        (name, ctypes.c_double)
        for name in ("s_min", "s_max", "zeta", "ratio", "d_min", "d_max", "beta", "skip_threshold")
    ]


class OptimizerC(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("lr", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("nesterov", ctypes.c_int32),
        ("weight_decay", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
    ]


class MemoryC(ctypes.Structure):
    _fields_ = [
        ("first_trained_layer", ctypes.c_int32),
        ("sgd_in_place", ctypes.c_int32),
        ("bias_only_layers", ctypes.c_uint32),
        ("momentum_in_place", ctypes.c_int32),
        ("selection_in_place", ctypes.c_int32),
        ("adam_in_place", ctypes.c_int32),
        ("moment_bits", ctypes.c_int32),
        ("recompute_layers", ctypes.c_uint32),
    ]


def memory_to_c(mode: MemoryMode) -> MemoryC:
    """The ``tp_memory_config`` struct of a :class:`tinyprop.memory.MemoryMode`."""
    return MemoryC(
        mode.first_trained_layer,
        int(mode.sgd_in_place),
        mode.bias_only_bits,
        int(mode.momentum_in_place),
        int(mode.selection_in_place),
        int(mode.adam_in_place),
        mode.moment_bits,
        mode.recompute_bits,
    )


class LedgerC(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64) for name in ("forward", "backward", "backward_dense", "selection")
    ]


class StepStatsC(ctypes.Structure):
    _fields_ = [
        ("loss", ctypes.c_float),
        ("trained", ctypes.c_int32),
        ("skipped", ctypes.c_int32),
        ("macs", LedgerC),
    ]


def load_library(path: Path | None = None) -> ctypes.CDLL:
    """Load the runtime (built by :func:`build_library` when no path is given) with signatures."""
    lib = ctypes.CDLL(str(path or build_library()))
    pointer = ctypes.c_void_p
    lib.tp_arena_bytes.argtypes = [
        ctypes.POINTER(ModelSpecC),
        ctypes.POINTER(PolicyC),
        ctypes.POINTER(OptimizerC),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.tp_arena_bytes_mode.argtypes = [
        ctypes.POINTER(ModelSpecC),
        ctypes.POINTER(PolicyC),
        ctypes.POINTER(OptimizerC),
        ctypes.POINTER(MemoryC),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.tp_inference_bytes.argtypes = [ctypes.POINTER(ModelSpecC), ctypes.POINTER(ctypes.c_size_t)]
    lib.tp_init_mode.argtypes = [
        pointer,
        ctypes.POINTER(ModelSpecC),
        ctypes.POINTER(PolicyC),
        ctypes.POINTER(OptimizerC),
        ctypes.POINTER(MemoryC),
        pointer,
        ctypes.c_size_t,
    ]
    lib.tp_init.argtypes = [
        pointer,
        ctypes.POINTER(ModelSpecC),
        ctypes.POINTER(PolicyC),
        ctypes.POINTER(OptimizerC),
        pointer,
        ctypes.c_size_t,
    ]
    lib.tp_train_batch.argtypes = [
        pointer,
        pointer,
        pointer,
        ctypes.c_int32,
        ctypes.POINTER(StepStatsC),
        pointer,
        pointer,
    ]
    lib.tp_batch_begin.argtypes = [pointer, pointer, ctypes.c_int32]
    lib.tp_batch_add.argtypes = [pointer, pointer, pointer, ctypes.c_int32, pointer, pointer]
    lib.tp_batch_end.argtypes = [pointer, pointer, ctypes.POINTER(StepStatsC)]
    lib.tp_batch_struct_bytes.restype = ctypes.c_size_t
    lib.tp_predict.argtypes = [pointer, pointer, pointer, pointer]
    lib.tp_read_parameters.argtypes = [pointer, pointer, ctypes.c_size_t]
    lib.tp_parameter_count.argtypes = [pointer, ctypes.POINTER(ctypes.c_size_t)]
    lib.tp_read_running_max.argtypes = [pointer, pointer, ctypes.c_int32, pointer]
    lib.tp_read_totals.argtypes = [
        pointer,
        ctypes.POINTER(LedgerC),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.tp_model_struct_bytes.restype = ctypes.c_size_t
    lib.tp_status_string.restype = ctypes.c_char_p
    for name in (
        "tp_arena_bytes",
        "tp_arena_bytes_mode",
        "tp_inference_bytes",
        "tp_init",
        "tp_init_mode",
        "tp_train_batch",
        "tp_batch_begin",
        "tp_batch_add",
        "tp_batch_end",
        "tp_predict",
        "tp_read_parameters",
        "tp_parameter_count",
        "tp_read_running_max",
        "tp_read_totals",
    ):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer the runtime runs: SGD (momentum, Nesterov, weight decay) or Adam.

    Example:
        >>> OptimizerSpec.from_torch(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    """

    kind: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # from_torch: the ids of the tensors the torch optimizer updates; the export freezes a
    # parameter it leaves out (None: every parameter with requires_grad)
    parameters: frozenset[int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Refuse what the runtime's ``tp_check_optimizer`` refuses, before anything is written
        (an exported program stopped at ``tp_init`` with status -2)."""
        if self.kind not in OPTIMIZER_CODES:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.kind!r}")
        for name in ("lr", "momentum", "weight_decay", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"optimizer {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and 0 <= value <= MAX_OPTIMIZER_SETTING):
                raise ValueError(
                    f"optimizer {name} must be finite and in [0, {MAX_OPTIMIZER_SETTING:g}] (the "
                    f"C runtime's range), got {value!r}"
                )
        if self.kind == "adam" and self.momentum:
            raise ValueError(
                f"optimizer momentum={self.momentum!r} has no meaning for Adam (it would be "
                "ignored): Adam's moments take betas; give momentum 0, or use SGD"
            )
        if self.nesterov and self.momentum <= 0:
            raise ValueError("Nesterov needs momentum > 0, as in torch.optim.SGD")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ValueError(f"Adam betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """The settings of a ``torch.optim.SGD`` or ``torch.optim.Adam`` with one param group,
        and the parameters it updates (an export freezes those it leaves out, as PyTorch does)."""
        if len(optimizer.param_groups) != 1:
            raise ValueError("the C runtime supports one parameter group (one lr for all)")
        group = optimizer.param_groups[0]
        updated = frozenset(id(parameter) for parameter in group["params"])
        if group.get("maximize") or group.get("differentiable"):
            raise ValueError("maximize/differentiable optimizers are not supported by the runtime")
        if type(optimizer) is torch.optim.SGD:
            if group["dampening"] != 0:
                raise ValueError(f"SGD dampening={group['dampening']} is not supported (use 0)")
            return cls(
                "sgd",
                float(group["lr"]),
                float(group["momentum"]),
                bool(group["nesterov"]),
                float(group["weight_decay"]),
                parameters=updated,
            )
        if type(optimizer) is torch.optim.Adam:
            if group["amsgrad"] or group.get("decoupled_weight_decay"):
                raise ValueError("Adam with amsgrad or decoupled weight decay is not supported")
            return cls(
                "adam",
                float(group["lr"]),
                weight_decay=float(group["weight_decay"]),
                betas=tuple(map(float, group["betas"])),
                eps=float(group["eps"]),
                parameters=updated,
            )
        raise ValueError(
            "the C runtime runs torch.optim.SGD or torch.optim.Adam, "
            f"not {type(optimizer).__name__}"
        )

    def to_c(self) -> OptimizerC:
        """The ``tp_optimizer_config`` struct."""
        return OptimizerC(
            OPTIMIZER_CODES[self.kind],
            self.lr,
            self.momentum,
            int(self.nesterov),
            self.weight_decay,
            self.betas[0],
            self.betas[1],
            self.eps,
        )


def check_config(config: TinyPropConfig) -> None:
    """Refuse, naming the setting and what to export with, a :class:`TinyPropConfig` the
    runtime would run as another algorithm than the library's ``train_step``.

    The runtime backpropagates every layer sparsely with k entries chosen per sample among all
    of δ (zeros too), averages the loss over the batch and updates Ymax_l after each sample.
    """
    if not isinstance(config, TinyPropConfig):
        raise TypeError(f"config must be a TinyPropConfig, got {type(config).__name__}")
    if config.budget is not None or config.policy == "selective_backprop":
        raise ValueError(
            "the C runtime has no budget controller and no selective_backprop policy; export "
            "with fixed settings (full, topk, tinyprop or tinypropv2 without budget)"
        )
    if config.policy not in POLICY_CODES:
        raise ValueError(
            f"the C runtime has no {config.policy} policy; export with one of "
            f"{', '.join(POLICY_CODES)}"
        )
    if config.dense_output_layer or config.dense_small_layers or config.unified:
        raise ValueError(
            "the C runtime backpropagates every layer sparsely, k entries chosen per sample; "
            "export with dense_output_layer=False, dense_small_layers=False, unified=False"
        )
    if config.mean_over_trained or config.running_max_per_batch:
        raise ValueError(
            "the C runtime averages the loss over the batch and updates Ymax_l after each "
            "sample; export with mean_over_trained=False, running_max_per_batch=False"
        )
    if config.skip_zero_entries:
        raise ValueError(
            "the C runtime chooses k entries of δ among all of them, zeros too, and counts their "
            "MACs; skip_zero_entries=True caps k at the non-zero entries, which gives the same "
            "weights but other k and MAC counts: export with skip_zero_entries=False"
        )


def policy_to_c(config: TinyPropConfig) -> PolicyC:
    """The ``tp_policy_config`` struct of a :class:`TinyPropConfig` (checked by
    :func:`check_config`)."""
    check_config(config)
    return PolicyC(
        POLICY_CODES[config.policy],
        config.s_min,
        config.s_max,
        config.zeta,
        config.ratio,
        config.d_min,
        config.d_max,
        config.beta,
        config.skip_threshold,
    )


@dataclass
class RuntimeStepStats:
    """What one C training step did (mirrors :class:`tinyprop.StepStats`)."""

    loss: float
    trained: int
    skipped: int
    macs: Ledger
    keep: np.ndarray  # (B, trainable layers) k per sample and layer, 0 where skipped
    trained_mask: np.ndarray  # (B,) bool


def check(lib: ctypes.CDLL, status: int, what: str) -> None:
    """Raise a clear error for a non-zero ``tp_status``."""
    if status != 0:
        raise RuntimeError(f"{what} failed: {STATUS.get(status, status)} (tp_status {status})")


class RuntimeModel:
    """A model living in the C runtime: its own arena, weights and optimizer state.

    Args:
        model: an ``nn.Sequential`` the exporter supports (its current weights are copied).
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` or ``(6, 100)``.
        config: the policy (``full``, ``topk``, ``tinyprop``, ``tinypropv2``).
        optimizer: :class:`OptimizerSpec`.
        library: a loaded runtime (see :func:`load_library`); built when omitted.
        memory: the :class:`tinyprop.memory.MemoryMode` (frozen layers, in-place SGD); when
            omitted, the one that trains what the model trains (``requires_grad``,
            :mod:`tinyprop.export.frozen`), one update per batch.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        config: TinyPropConfig,
        optimizer: OptimizerSpec,
        library: ctypes.CDLL | None = None,
        memory: MemoryMode | None = None,
    ):
        self.lib = library or load_library()
        self.layers: list[LayerSpec] = describe(model, input_shape)
        self.memory_mode = mode_of_frozen_layers(model, self.layers, memory, optimizer.parameters)
        self.memory_mode.check(optimizer.kind, optimizer.momentum, optimizer.nesterov)
        limit = runtime_max_layers()
        if len(self.layers) > limit:
            raise ValueError(
                f"the model has {len(self.layers)} runtime layers (activations and pools count), "
                f"the runtime built here holds at most {limit} (TP_MAX_LAYERS); export it with "
                f"`tinyprop export` and build with -DTP_MAX_LAYERS={len(self.layers)}"
            )
        self.input_shape = tuple(input_shape)
        self._weights = []  # keep the arrays alive while C holds pointers
        specs = (LayerSpecC * len(self.layers))()
        for spec, layer in zip(specs, self.layers, strict=True):
            spec.kind = layer.kind
            spec.out_channels = layer.out_channels
            spec.kernel_h, spec.kernel_w = layer.kernel
            spec.stride_h, spec.stride_w = layer.stride
            spec.padding_h, spec.padding_w = layer.padding
            spec.dilation_h, spec.dilation_w = layer.dilation
            spec.groups = layer.groups
            spec.has_bias = int(layer.has_bias)
            for name in ("weight", "bias"):
                array = getattr(layer, name)
                if array is not None:
                    self._weights.append(array)
                    setattr(spec, name, array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        self._specs = specs
        c, h, w = self.layers[0].input_shape
        self.spec = ModelSpecC(c, h, w, len(self.layers), specs)
        self.policy = policy_to_c(config)
        self.optimizer = optimizer.to_c()
        self.memory = memory_to_c(self.memory_mode)
        size = ctypes.c_size_t()
        check(
            self.lib,
            self.lib.tp_arena_bytes_mode(
                ctypes.byref(self.spec),
                ctypes.byref(self.policy),
                ctypes.byref(self.optimizer),
                ctypes.byref(self.memory),
                ctypes.byref(size),
            ),
            "tp_arena_bytes_mode",
        )
        self.arena_bytes = size.value
        check(
            self.lib,
            self.lib.tp_inference_bytes(ctypes.byref(self.spec), ctypes.byref(size)),
            "tp_inference_bytes",
        )
        self.inference_bytes = size.value
        self.arena = np.zeros(self.arena_bytes // 4 + 1, dtype=np.float32)
        self.model = ctypes.create_string_buffer(self.lib.tp_model_struct_bytes())
        check(
            self.lib,
            self.lib.tp_init_mode(
                self.model,
                ctypes.byref(self.spec),
                ctypes.byref(self.policy),
                ctypes.byref(self.optimizer),
                ctypes.byref(self.memory),
                self.arena.ctypes.data,
                self.arena_bytes,
            ),
            "tp_init_mode",
        )
        self.trainable = [layer for layer in self.layers if layer.trainable]
        self.sample_size = int(np.prod(self.layers[0].input_shape))

    def _batch_arrays(self, x: np.ndarray, y: np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.int32)
        if x.ndim < 1 or x.shape[0] != y.shape[0] or x[0].size != self.sample_size:
            raise ValueError(
                f"x must be (B, {self.input_shape}) and y (B,), got {x.shape} and {y.shape}"
            )
        keep = np.zeros((x.shape[0], len(self.trainable)), dtype=np.int32)
        return x, y, keep, np.zeros(x.shape[0], dtype=np.uint8), StepStatsC()

    @staticmethod
    def _step_stats(stats: StepStatsC, keep: np.ndarray, mask: np.ndarray) -> RuntimeStepStats:
        macs = Ledger(
            stats.macs.forward, stats.macs.backward, stats.macs.backward_dense, stats.macs.selection
        )
        return RuntimeStepStats(
            float(stats.loss), stats.trained, stats.skipped, macs, keep, mask.astype(bool)
        )

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> RuntimeStepStats:
        """One training step on a batch. x: (B, *input_shape) float32; y: (B,) class labels."""
        x, y, keep, mask, stats = self._batch_arrays(x, y)
        status = self.lib.tp_train_batch(self.model, x.ctypes.data, y.ctypes.data, x.shape[0],
                                          ctypes.byref(stats), keep.ctypes.data,
                                          mask.ctypes.data)  # fmt: skip
        check(self.lib, status, "tp_train_batch")
        return self._step_stats(stats, keep, mask)

    def train_one_at_a_time(self, x: np.ndarray, y: np.ndarray) -> RuntimeStepStats:
        """The same step fed sample by sample: tp_batch_begin, tp_batch_add per sample,
        tp_batch_end (what a device holding one sample at a time calls)."""
        x, y, keep, mask, stats = self._batch_arrays(x, y)
        batch = ctypes.create_string_buffer(self.lib.tp_batch_struct_bytes())
        check(self.lib, self.lib.tp_batch_begin(self.model, batch, x.shape[0]), "tp_batch_begin")
        for index in range(x.shape[0]):
            sample, row, trained = x[index], keep[index], mask[index:]
            status = self.lib.tp_batch_add(self.model, batch, sample.ctypes.data, int(y[index]),
                                           row.ctypes.data, trained.ctypes.data)  # fmt: skip
            check(self.lib, status, "tp_batch_add")
        check(self.lib, self.lib.tp_batch_end(self.model, batch, ctypes.byref(stats)),
              "tp_batch_end")  # fmt: skip
        return self._step_stats(stats, keep, mask)

    def parameters(self) -> dict[str, np.ndarray]:
        """Current weights by state_dict name (``<path>.weight``, ``<path>.bias``)."""
        count = ctypes.c_size_t()
        check(self.lib, self.lib.tp_parameter_count(self.model, ctypes.byref(count)), "count")
        flat = np.zeros(count.value, dtype=np.float32)
        check(
            self.lib,
            self.lib.tp_read_parameters(self.model, flat.ctypes.data, count.value),
            "tp_read_parameters",
        )
        result, offset = {}, 0
        for layer in self.trainable:
            size = layer.weight.size
            result[f"{layer.path}.weight"] = flat[offset : offset + size].copy()
            offset += size
            if layer.has_bias:
                result[f"{layer.path}.bias"] = flat[offset : offset + layer.out_channels].copy()
                offset += layer.out_channels
        return result

    def running_max(self) -> tuple[np.ndarray, float]:
        """Ymax per trainable layer and the output error's Ymax."""
        layer_max = np.zeros(len(self.trainable), dtype=np.float32)
        output_max = np.zeros(1, dtype=np.float32)
        check(
            self.lib,
            self.lib.tp_read_running_max(
                self.model, layer_max.ctypes.data, len(self.trainable), output_max.ctypes.data
            ),
            "tp_read_running_max",
        )
        return layer_max, float(output_max[0])

    def totals(self) -> tuple[Ledger, int]:
        """MACs since initialisation and the arena bytes in use."""
        ledger, used = LedgerC(), ctypes.c_size_t()
        check(
            self.lib,
            self.lib.tp_read_totals(self.model, ctypes.byref(ledger), ctypes.byref(used)),
            "tp_read_totals",
        )
        return Ledger(
            ledger.forward, ledger.backward, ledger.backward_dense, ledger.selection
        ), used.value

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of one sample."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if x.size != self.sample_size:
            raise ValueError(f"x must hold {self.sample_size} values, got {x.size}")
        logits = np.zeros(int(np.prod(self.layers[-1].output_shape)), dtype=np.float32)
        check(
            self.lib,
            self.lib.tp_predict(self.model, x.ctypes.data, logits.ctypes.data, None),
            "tp_predict",
        )
        return logits
