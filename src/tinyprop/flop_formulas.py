"""FLOP formulas torch's FLOP counter lacks on the CPU (registered on import).

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
