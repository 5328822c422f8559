"""The FLOP counter of the ledger's forward measurement, and the formulas torch's FLOP counter
lacks on the CPU (registered on import).

The ledger measures what the modules tinyprop keeps dense compute with
``torch.utils.flop_counter.FlopCounterMode``. On the CPU, ``scaled_dot_product_attention``
runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which that counter does not know, so
attention's Q·Kᵀ and A·V products would go uncounted; here it gets the same formula as the
GPU kernels.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """2·B·H·L·S·(E + E_v): the two batched products of attention (softmax not counted)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_ATTENTION is not None and _CPU_ATTENTION not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_CPU_ATTENTION)(_cpu_attention_flops)


class _OneScope:
    """Stands in for FlopCounterMode's ModuleTracker, which registers process-wide module
    hooks while it counts: they fired on every module call of every thread, so a model
    training in another thread got gradient hooks on its tensors (and a leaf's hook broke
    its backward). The ledger reads the total only, so one scope ("Global") is all it needs;
    the counting itself is a dispatch mode, local to the thread that measures."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def forward_flop_counter() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that prints nothing and hooks no module: ``get_total_flops()`` counts
    what runs in this thread between its ``__enter__`` and ``__exit__``."""
    counter = flop_counter.FlopCounterMode(display=False)
    counter.mod_tracker = _OneScope()
    return counter
