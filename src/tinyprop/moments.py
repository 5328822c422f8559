"""Adam with 8-bit moments: the Python mirror of the runtime's ``moment_bits = 8``.

Adam keeps two floats per trained parameter between steps, the first moment m and the second
moment v. Here both are kept in 8 bits per entry plus one float per block of
:data:`BLOCK` entries (each parameter tensor flattened, cut into blocks in order, the last one
shorter):

- m: signed codes c_m in [-127, 127] and the block's a_m = max |m|: m = c_m · (a_m / 127);
  encoding c_m = round(m / (a_m / 127)) (half to even), 0 where a_m = 0.
- v: through w = √v (whose range is the square root of v's): codes c_w in [0, 255] and the
  block's a_w = max w: w = c_w · (a_w / 255), v = w · w; encoding c_w = round(w / (a_w / 255))
  (half to even) but at least 1 where w > 0, so that a non-zero v never becomes 0 (a step
  divided by ε alone); 0 where a_w = 0. (Rounding to nearest, not up: where a block had no
  gradient, w / (a_w / 255) is an integer up to float rounding, on which rounding up would
  depend.)

A step decodes m and v, runs torch.optim.Adam's single-tensor step in float32 (the same floats
as the runtime's Adam), updates the weight with those floats, then encodes m and v again: only
what is kept between steps is 8-bit. The runtime (``runtime/src/optimizer.c``) does the same
float operations in the same order, so the two agree as the float32 Adam paths do.

Memory per trained parameter: 2 bytes instead of 8, plus 8 bytes per block.

Example:
    >>> optimizer = Adam8bit(model.parameters(), lr=3e-3)
"""

from __future__ import annotations

import math

import torch

from tinyprop.optim import check_adam_settings

BLOCK = 64  # entries per block of a moment (the runtime's TP_MOMENT_BLOCK)
FIRST_CODES = 127  # m: codes -127..127
SECOND_CODES = 255  # √v: codes 0..255


def blocks(values: torch.Tensor) -> torch.Tensor:
    """A flat tensor as (blocks, BLOCK), the last block padded with zeros (no max changes)."""
    count = values.numel()
    padded = torch.zeros(math.ceil(count / BLOCK) * BLOCK, dtype=values.dtype)
    padded[:count] = values.reshape(-1)
    return padded.view(-1, BLOCK)  # (blocks, BLOCK)


def _largest(grouped: torch.Tensor) -> torch.Tensor:
    """Each block's largest entry, NaN left out (a diverged run: NaN entries get code 0)."""
    return torch.where(torch.isnan(grouped), 0.0, grouped).amax(dim=1)


def encode_first(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m (flat float32) -> (int8 codes, per-block max |m|)."""
    grouped = blocks(m)  # (blocks, BLOCK)
    largest = _largest(grouped.abs())  # (blocks,)
    scale = largest / FIRST_CODES
    codes = torch.where(
        largest[:, None] > 0, torch.round(grouped / scale[:, None]), torch.zeros_like(grouped)
    )
    codes = torch.clamp(torch.nan_to_num(codes, nan=0.0), -FIRST_CODES, FIRST_CODES)
    return codes.reshape(-1)[: m.numel()].to(torch.int8), largest


def decode_first(codes: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """The float32 m of :func:`encode_first`'s codes (flat)."""
    scale = largest / FIRST_CODES
    return (blocks(codes.to(torch.float32)) * scale[:, None]).reshape(-1)[: codes.numel()]


def encode_second(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w = √v (flat float32, >= 0) -> (uint8 codes, at least 1 where w > 0; per-block max w)."""
    grouped = blocks(w)  # (blocks, BLOCK)
    largest = _largest(grouped)  # (blocks,)
    scale = largest / SECOND_CODES
    rounded = torch.nan_to_num(torch.round(grouped / scale[:, None]), nan=0.0)
    rounded = torch.clamp(rounded, max=SECOND_CODES)
    rounded = torch.where(grouped > 0, torch.clamp(rounded, min=1), rounded)
    codes = torch.where(largest[:, None] > 0, rounded, torch.zeros_like(grouped))
    return codes.reshape(-1)[: w.numel()].to(torch.uint8), largest


def decode_second(codes: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """The float32 v = w · w of :func:`encode_second`'s codes (flat)."""
    scale = largest / SECOND_CODES
    w = (blocks(codes.to(torch.float32)) * scale[:, None]).reshape(-1)[: codes.numel()]
    return w * w


class Adam8bit(torch.optim.Optimizer):
    """torch.optim.Adam (no AMSGrad) whose moments are kept in 8 bits between steps.

    Args:
        params: parameters or parameter groups (float32).
        lr: learning rate.
        betas: (β1, β2).
        eps: ε, added outside the square root.
        weight_decay: L2 term added to the gradient (torch.optim.Adam's semantics).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        check_adam_settings(lr, betas)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.dtype != torch.float32:
                    raise ValueError(f"Adam8bit needs float32 parameters, got {parameter.dtype}")
                self._step_one(parameter, group, beta1, beta2)
        return loss

    def _step_one(self, parameter, group, beta1: float, beta2: float) -> None:
        state = self.state[parameter]
        count = parameter.numel()
        if not state:
            state["step"] = 0
            state["first_codes"] = torch.zeros(count, dtype=torch.int8)
            state["first_max"] = torch.zeros(math.ceil(count / BLOCK), dtype=torch.float32)
            state["second_codes"] = torch.zeros(count, dtype=torch.uint8)
            state["second_max"] = torch.zeros(math.ceil(count / BLOCK), dtype=torch.float32)
        state["step"] += 1
        t = state["step"]
        grad = parameter.grad.reshape(-1)  # (count,)
        if group["weight_decay"] != 0:
            grad = grad.add(parameter.reshape(-1), alpha=group["weight_decay"])
        m = decode_first(state["first_codes"], state["first_max"])
        v = decode_second(state["second_codes"], state["second_max"])
        # torch.optim.Adam's single-tensor step, float32
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1**t)
        w = v.sqrt()
        denominator = (w / math.sqrt(1 - beta2**t)).add_(group["eps"])
        parameter.view(-1).addcdiv_(m, denominator, value=-step_size)
        state["first_codes"], state["first_max"] = encode_first(m)
        state["second_codes"], state["second_max"] = encode_second(w)


__all__ = ["BLOCK", "Adam8bit", "decode_first", "decode_second", "encode_first", "encode_second"]
