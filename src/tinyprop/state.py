"""What an applied model remembers: its policy, its sparse layers, and the forward passes that
have not been accounted to a training step yet.

A forward pass of the root module is delimited by forward hooks (see :mod:`tinyprop.model`):
every sparse-layer call inside it is recorded as an immutable :class:`LayerCall`, which gives

- the layer's depth d (calls after it in the same forward pass: the output layer has d = 0),
  from the order the forward ran, never from the order the modules were registered;
- the forward MACs of the compute ledger.

Per-step state (the trained samples, the records of the backward) lives in a
:class:`tinyprop.step.StepContext`, never here.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tinyprop.batch_norm import swap_batch_norm
from tinyprop.config import TinyPropConfig
from tinyprop.policies import Policy, policy_for

MAX_PENDING_PASSES = 64  # forward passes kept for the ledger when no step consumes them


class ForwardPass:
    """The sparse-layer calls of one forward pass of the root module, in call order."""

    def __init__(self) -> None:
        self.calls: list[LayerCall] = []
        self.other_macs = 0  # forward MACs of everything that is not a sparse layer
        self.counter = None  # torch's FLOP counter while a new input shape is measured
        self.signature = None  # that input shape
        self.output = None  # the model output (for the skip decision); only the last pass keeps it
        # (weakref to the output of a sparse-layer call, that call): the last one, recorded
        # only while a loaded Ymax_L waits for its check (tinyprop.step)
        self.last_layer_output = None
        # ids of the weights the ``full`` policy's layer calls trained (the module's own, or
        # those torch.func.functional_call gave it): what the losses' graph must reach
        self.dense_weights: set[int] = set()
        # weak references to the output tensors (the ``full`` policy's): which passes a step's
        # backward goes through, when it has several or none of its own (tinyprop.step)
        self.output_refs: tuple = ()

    def add(self, call_fields: dict) -> LayerCall:
        """Record a layer call; ``call_fields``: every field of :class:`LayerCall` but
        ``forward_pass`` and ``index`` (``fixed_depth`` and ``recomputed`` optional)."""
        call = LayerCall.of(call_fields, self, len(self.calls))
        self.calls.append(call)
        return call


@dataclass(frozen=True, eq=False)
class LayerCall:
    """One call of a sparse layer: its geometry for one input shape, fixed at the forward.

    A *row* is one index of the layer input's first dimension: a sample for (B, ...) inputs, a
    token after a (B·T, D) reshape, a time step for sequence-first (T, B, D) inputs. Top-k and
    the running maximum work per row.
    """

    layer_name: str
    layer_index: int  # registration index (seeds random-k)
    rows: int  # R: first dimension of the layer input
    output_size: int  # N_l: output elements per row
    fan_in: int  # in_features, or C_in / groups · kh · kw
    input_size: int  # input elements per row
    has_bias: bool
    weight_trainable: bool
    input_requires_grad: bool
    geometry: object  # the patch geometry (tinyprop.patches), for the backward
    forward_pass: ForwardPass = field(repr=False)
    index: int = 0  # position among the sparse-layer calls of its forward pass
    fixed_depth: int | None = None  # set for a call outside a root forward (registration order)
    recomputed: bool = False  # run again by activation checkpointing (forward counted once)

    @classmethod
    def of(cls, call_fields: dict, forward_pass: ForwardPass, index: int) -> LayerCall:
        """The call with these fields, as ``LayerCall(**call_fields, forward_pass=...,
        index=...)`` makes it but without the frozen dataclass's ``__init__``, which sets each
        field through ``object.__setattr__``: a third of a small layer's bookkeeping per
        forward."""
        call = object.__new__(cls)
        call.__dict__.update(CALL_DEFAULTS, **call_fields)
        call.__dict__.update(forward_pass=forward_pass, index=index)
        return call

    @property
    def depth(self) -> int:
        """d: how many sparse-layer calls came after this one in its forward pass."""
        if self.fixed_depth is not None:
            return self.fixed_depth
        return len(self.forward_pass.calls) - 1 - self.index

    @property
    def forward_macs(self) -> int:
        return self.rows * self.output_size * self.fan_in


CALL_DEFAULTS = {"fixed_depth": None, "recomputed": False}  # LayerCall.of's defaults


@dataclass(frozen=True, eq=False)
class BackwardRecord:
    """What the backward of one layer call did (appended to the step context)."""

    call: LayerCall
    keep: Tensor  # (R',) k of each row with a non-zero δ, in row order
    selected: bool  # False when the layer kept everything without a selection
    computes_input_grad: bool
    selection_macs: int  # local errors and top-k selection, from the policy
    kernel: str = ""  # which kernel computed the gradients (see tinyprop.autograd.KERNELS)
    keeps_all_it_can: bool = False  # every row kept N_l entries, or all its non-zero ones
    kept: int | None = None  # Σ keep (None: the ledger sums ``keep``)


@dataclass
class TinyPropState:
    """Shared by the root module and its sparse layers."""

    config: TinyPropConfig
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    # thread id -> the root forward running in that thread (see :attr:`open_pass`)
    open_passes: dict = field(default_factory=dict)
    pending: list[ForwardPass] = field(default_factory=list)  # finished, not yet accounted
    step: object = None  # the StepContext whose backward is running (tinyprop.step)
    other_macs_cache: dict = field(default_factory=dict)  # input signature -> other MACs
    geometry_cache: dict = field(default_factory=dict)  # convolution call -> its patch geometry
    call_fields: dict = field(default_factory=dict)  # layer call key -> its LayerCall's fields
    warned: set = field(default_factory=set)
    handles: list = field(default_factory=list)  # hooks removed by tinyprop.remove
    batch_norms: list = field(default_factory=list)  # BatchNorms swapped (tinyprop.batch_norm)
    pools: list = field(default_factory=list)  # MaxPool2d swapped (tinyprop.pool_fusion)
    relus: list = field(default_factory=list)  # ReLUs swapped (tinyprop.relu_fusion)
    # every BatchNorm of the model: in training mode it hands skipped samples a δ through the
    # batch statistics, the only case where drop_skipped_rows has rows to leave out
    coupling_norms: list = field(default_factory=list)
    last_stats: object = None  # StepStats of the last finished step
    # the forward passes whose layer calls the last finished step's backward ran through
    # (their graph may be kept, retain_graph=True, for another step's losses)
    backpropagated: list = field(default_factory=list)
    # under ``full``: the forward passes of the last step that took any (a later step's losses
    # may come from them: micro-batches' forward passes first, a second loss of one pass)
    earlier_passes: list = field(default_factory=list)
    root: object = None  # the applied model (holds the budget controller's buffers)
    inside_ddp: bool = False  # run inside a DistributedDataParallel around a larger module
    deciding: bool = False  # the skip decision's gradient runs (tinyprop.step._output_error)
    # module registrations seen (tinyprop.model.module_changes): a layer set into the model
    # after apply (model[0] = nn.Linear(...)) is made sparse at the next forward
    module_changes: int = 0
    detached: list = field(default_factory=list)  # sparse layers taken out of the model
    load_prefix: str | None = None  # the model's prefix in the state_dict being loaded
    # the running state was made on the meta device: ``to_empty`` fills it with whatever the
    # memory held, so it starts afresh before the first training forward (a checkpoint loaded
    # first gives its own values instead)
    made_on_meta: bool = False
    # a checkpoint loaded Ymax_L > 0: checked at the next skip decision against the output
    # layer's Ymax_l (tinyprop.step._check_loaded_output_error_max)
    output_error_max_unchecked: bool = False
    # (id, parameter count) of the optimizer train_step found holding some of the model's
    # trainable parameters: not checked again until another optimizer (or group) comes
    checked_optimizer: tuple | None = None

    _policy: Policy | None = None

    @property
    def policy(self) -> Policy:
        """The policy object of ``config`` (made again when the config is replaced)."""
        if self._policy is None or self._policy.config is not self.config:
            self._policy = policy_for(self.config, self.root)
        return self._policy

    def __getstate__(self) -> dict:
        """For torch.save / pickle of a whole model: the per-step leftovers are not kept."""
        state = dict(self.__dict__)
        state.update(
            open_passes={}, pending=[], step=None, last_stats=None, _policy=None,
            backpropagated=[], earlier_passes=[],
            inside_ddp=False, deciding=False, geometry_cache={}, call_fields={},
            checked_optimizer=None,
        )  # fmt: skip
        return state

    def __deepcopy__(self, memo: dict) -> TinyPropState:
        """``copy.deepcopy`` of the applied model copies this state for the copy. A part of the
        model copied alone (one sparse layer: peft's ``modules_to_save`` copies the head it
        wraps) gets a state of its own, without a model: the applied model it is set into takes
        it over (:func:`tinyprop.model._take_over_moved_layer`). Before, the part took a hidden
        copy of the whole model with it, whose layer it stayed, and the model it was set into
        refused it at the forward pass ("is in two models given to tinyprop.apply")."""
        if self.root is not None and id(self.root) not in memo:  # the model is not copied
            alone = memo[id(self)] = TinyPropState(config=self.config)
            return alone
        copied = memo[id(self)] = object.__new__(TinyPropState)
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def __setstate__(self, state: dict) -> None:
        """Link the sparse layers and swapped BatchNorms to this state again (they are pickled
        without it: ``SparseBackpropLayer.__reduce_ex__``, ``tinyprop.batch_norm``); a whole
        model pickled before the open forward passes were kept per thread (or before
        ``earlier_passes``)."""
        state.pop("open_pass", None)
        state.setdefault("open_passes", {})
        state.setdefault("earlier_passes", [])
        self.__dict__.update(state)
        for _, layer in self.layers + self.detached:
            object.__setattr__(layer, "tinyprop_state", self)
        for module in self.batch_norms:
            swap_batch_norm(module, self)

    @property
    def open_pass(self) -> ForwardPass | None:
        """The root forward running in this thread, else None. Per thread: a forward under
        ``torch.no_grad`` in another thread (an evaluation beside the training loop, on the
        same model) neither joins the training forward's pass nor closes it; it did both, and
        the training step took the evaluation's output and layer calls (other depths, so
        another k and other weights, silently) while the evaluation failed ("trying to pop
        from empty mode stack")."""
        return self.open_passes.get(threading.get_ident()) if self.open_passes else None

    @open_pass.setter
    def open_pass(self, forward_pass: ForwardPass | None) -> None:
        if forward_pass is None:
            self.open_passes.pop(threading.get_ident(), None)
        else:
            self.open_passes[threading.get_ident()] = forward_pass

    def finish_pass(self, forward_pass: ForwardPass) -> None:
        if self.pending:  # only the newest pass holds on to its output tensor
            self.pending[-1].output = None
        self.pending.append(forward_pass)
        del self.pending[:-MAX_PENDING_PASSES]

    def take_passes(self) -> list[ForwardPass]:
        """The forward passes since the last step (they belong to this step's ledger)."""
        passes, self.pending = self.pending, []
        return passes


def backward_running() -> bool:
    """True while the autograd engine runs a backward pass: a layer called then is activation
    checkpointing (``torch.utils.checkpoint``) running its forward again."""
    return torch._C._current_graph_task_id() != -1


def recomputed_call(step, call_fields: dict, registration_depth: int) -> LayerCall:
    """The call of a layer whose forward activation checkpointing runs again in the backward.

    It takes the depth d of the original call (the same layer's last unmatched call with the
    same input shape in the step's forward passes; the registration order without one). The
    ledger does not count the recomputation. Non-reentrant checkpointing backpropagates the
    original call, so this one is left out; reentrant checkpointing ran the original under
    no_grad (recorded without a backward) and backpropagates this one: it joins the step's
    ``recomputed_pass``, and the ledger counts its dense backward as the reference.
    """
    original = None if step is None else step.original_call(call_fields)
    depth = registration_depth if original is None else original.depth
    call_fields = {**call_fields, "fixed_depth": depth, "recomputed": True}
    if original is None or original.weight_trainable or original.input_requires_grad:
        return ForwardPass().add(call_fields)  # not part of any step
    return step.recomputed_pass.add(call_fields)
