"""The forward's record of each sparse-layer call (tinyprop.state.LayerCall): made from fields
kept per layer, input shape and gradient flags, it must follow every change of those."""

import dataclasses

import torch
from torch import nn

import tinyprop
from tinyprop.model import state_of
from tinyprop.state import ForwardPass, LayerCall


def last_calls(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """The layer calls of one forward pass with gradients."""
    model(x)
    return state_of(model).take_passes()[-1].calls


def fields_of(call: LayerCall) -> dict:
    """Every field but the forward pass it belongs to."""
    return {
        field.name: getattr(call, field.name)
        for field in dataclasses.fields(LayerCall)
        if field.name not in ("forward_pass", "geometry")
    }


def test_a_call_made_without_init_equals_the_dataclass_one():
    model = tinyprop.apply(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4)))
    for call in last_calls(model, torch.randn(5, 2, 6)):
        forward_pass = ForwardPass()
        given = {**fields_of(call), "geometry": call.geometry}
        del given["index"]
        made = LayerCall(forward_pass=forward_pass, index=call.index, **given)
        fast = LayerCall.of(given, forward_pass, call.index)
        assert fields_of(fast) == fields_of(made)
        assert fast.forward_pass is made.forward_pass and fast.geometry is made.geometry
        assert fast.depth == made.depth and fast.forward_macs == made.forward_macs
    try:
        fast.rows = 1
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("a LayerCall made by LayerCall.of must stay frozen")


def test_calls_follow_changes_of_shape_flags_and_settings():
    """After each change a call records what a fresh model with the same changes records
    (the fields kept for the earlier calls would be wrong)."""

    def build(changes):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(6, 4)
        )
        for change in changes:
            change(model)
        return model

    def geometry(call) -> tuple:
        shape = call.geometry
        return type(shape), shape.positions, shape.fan_in, shape.channels_out, shape.groups

    changes = []
    model = tinyprop.apply(build(changes))
    x = torch.randn(5, 2, 8)
    for new_x, change in [
        (torch.randn(3, 2, 8), None),  # fewer rows
        (torch.randn(5, 2, 11), None),  # longer inputs
        (x.clone().requires_grad_(), None),  # an input gradient
        (x, lambda model: model[0].bias.requires_grad_(False)),
        (x, lambda model: model[3].weight.requires_grad_(False)),
        (x, lambda model: setattr(model[0], "stride", (2,))),
        (x, lambda model: setattr(model[0], "padding", (1,))),
    ]:
        if change is not None:
            change(model)
            changes.append(change)
        got = last_calls(model, new_x)
        expected = last_calls(tinyprop.apply(build(changes)), new_x)
        assert [fields_of(call) for call in got] == [fields_of(call) for call in expected]
        assert [geometry(call) for call in got] == [geometry(call) for call in expected]
