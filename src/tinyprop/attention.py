"""nn.MultiheadAttention whose output projection is called as a module, so it can be sparse.

PyTorch's ``nn.MultiheadAttention.forward`` applies ``out_proj`` as a function of its weight,
never calling the module, so a sparse ``out_proj`` would never run. ``apply`` gives attention
modules this subclass: for every call (batched or not, a packed in-projection or ``kdim`` /
``vdim``, ``bias_k`` / ``add_zero_attn``) it computes the same attention, with
``scaled_dot_product_attention`` under ``need_weights=False`` and as PyTorch does under
``need_weights=True`` (the default: the weights softmax(q kᵀ / √d + mask), returned averaged
over the heads or not), and then calls ``self.out_proj`` on the (L·N, E) token rows. Inputs
of other dimensions go to PyTorch's own forward (its errors), and so does every call where
``out_proj`` cannot be sparse: under the ``full`` policy (PyTorch's own attention, to the bit:
the rewritten one rounds differently) and under ``torch.no_grad`` (evaluation).

A subclass of ``nn.MultiheadAttention`` that keeps its ``forward`` (and ``merge_masks``, which
that forward calls) computes PyTorch's attention: it gets a subclass of both,
:func:`sparse_attention_class`, and a sparse ``out_proj`` too (it stayed dense before, named in
the warning). A subclass with a forward of its own stays as it is: tinyprop cannot know what
that forward computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyPropMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with ``out_proj`` called as a module (sparse under tinyprop)."""

    def __reduce_ex__(self, protocol):
        """Pickle the class made for a subclass (:func:`sparse_attention_class`) by that
        subclass: the made class cannot be found by name. Unpickling makes it again."""
        reduced = super().__reduce_ex__(protocol)
        if protocol < 2 or type(self) is TinyPropMultiheadAttention:
            return reduced
        return (_unpickled_attention, (plain_attention_class(type(self)),), *reduced[2:])

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if (
            not self._sparse_out_proj()
            or query.dim() not in (2, 3)
            or not query.dim() == key.dim() == value.dim()
        ):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        if query.dim() == 2:  # one unbatched sequence (L, E): a batch of one, as in PyTorch
            dim = 0 if self.batch_first else 1
            padding = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            output, attention = self.forward(
                query.unsqueeze(dim), key.unsqueeze(dim), value.unsqueeze(dim), padding,
                need_weights, attn_mask, average_attn_weights, is_causal,
            )  # fmt: skip
            return output.squeeze(dim), None if attention is None else attention.squeeze(0)
        if self.batch_first:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        targets, batch, embed = query.shape  # (L, N, E)
        added = (self.bias_k is not None) + int(self.add_zero_attn)  # keys appended to each
        sources = key.shape[0] + added  # S, the appended keys included
        heads = self.num_heads
        attn_mask, is_causal = _attention_mask(
            attn_mask, key_padding_mask, is_causal, need_weights, query.dtype, batch, heads,
            sources, added,
        )  # fmt: skip
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:  # packed (3E, E)
            weights = self.in_proj_weight.chunk(3)
        else:  # kdim / vdim: (E, E), (E, kdim), (E, vdim)
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        q, k, v = (
            F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )  # (L or S, N, E)
        if self.bias_k is not None:  # a learned key and value appended to each sequence
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
        q, k, v = (t.reshape(t.shape[0], batch * heads, -1).transpose(0, 1) for t in (q, k, v))
        if self.add_zero_attn:  # a zero key and value appended: (N·H, S, E / H)
            k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, v.shape[2])], dim=1)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            attended, attention = _attention_with_weights(q, k, v, attn_mask, dropout)
            attended = attended.reshape(batch, heads, targets, -1)  # (N, H, L, E / H)
            attention = attention.view(batch, heads, targets, sources)  # (N, H, L, S)
            attention = attention.mean(dim=1) if average_attn_weights else attention
        else:
            q, k, v = (t.reshape(batch, heads, t.shape[1], t.shape[2]) for t in (q, k, v))
            if attn_mask is not None:
                attn_mask = (
                    attn_mask.view(batch, heads, -1, sources)
                    if attn_mask.shape[0] > 1
                    else attn_mask.unsqueeze(0)
                )
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout, is_causal
            )  # (N, H, L, E / H)
            attention = None
        rows = attended.permute(2, 0, 1, 3).reshape(targets * batch, embed)  # (L·N, E)
        output = self.out_proj(rows).reshape(targets, batch, -1)  # (L, N, E)
        return (output.transpose(0, 1) if self.batch_first else output), attention

    def _sparse_out_proj(self) -> bool:
        """Whether this call's ``out_proj`` runs tinyprop's sparse backward: a sparse policy,
        in a forward with gradients (or one that records the calls: reentrant activation
        checkpointing runs it under no_grad first). Without tinyprop's state (the class used on
        its own, as the tests' reference does) ``out_proj`` is always called as a module; a
        copy of the module alone (``copy.deepcopy``, in no applied model: its ``out_proj``
        trains as PyTorch's layer) runs PyTorch's forward, and so does every call that
        ``torch.jit.trace`` or ``torch.export`` records (the layers record their plain
        forward there too: the exported model is the plain one, to the bit)."""
        state = getattr(self.out_proj, "tinyprop_state", None)
        if state is None:
            return True
        if state.root is None or not state.policy.sparse or _recorded():
            return False
        return torch.is_grad_enabled() or state.open_pass is not None


def _recorded() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording this call."""
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return torch.jit.is_tracing() or (exporting is not None and exporting())


_SPARSE_ATTENTION_CLASSES: dict[type, type] = {nn.MultiheadAttention: TinyPropMultiheadAttention}


def sparse_attention_class(original: type) -> type | None:
    """The class :func:`tinyprop.apply` gives an attention module of class ``original``:
    :class:`TinyPropMultiheadAttention` for ``nn.MultiheadAttention``, a subclass of both for
    a subclass that keeps PyTorch's ``forward`` and ``merge_masks`` (made once per class);
    None for any other class (its own forward, or not an attention module)."""
    if original not in _SPARSE_ATTENTION_CLASSES:
        keeps_forward = (
            issubclass(original, nn.MultiheadAttention)
            and not issubclass(original, TinyPropMultiheadAttention)
            and original.forward is nn.MultiheadAttention.forward
            and original.merge_masks is nn.MultiheadAttention.merge_masks
        )
        if not keeps_forward:
            return None
        name = f"TinyProp{original.__name__}"
        made = type(name, (TinyPropMultiheadAttention, original), {"__module__": __name__})
        _SPARSE_ATTENTION_CLASSES[original] = made
    return _SPARSE_ATTENTION_CLASSES[original]


def plain_attention_class(made: type) -> type:
    """The class :func:`tinyprop.remove` gives back to an attention module of class
    ``made`` (:func:`sparse_attention_class`'s inverse)."""
    if made is TinyPropMultiheadAttention:
        return nn.MultiheadAttention
    return made.__bases__[1]


def _unpickled_attention(original: type) -> nn.Module:
    """An empty instance of the class made for ``original``, for pickle to fill in."""
    made = sparse_attention_class(original)
    return made.__new__(made)


def _attention_mask(
    attn_mask, key_padding_mask, is_causal, need_weights, dtype, batch, heads, sources, added
):
    """The float mask (1 or N·H, L, S), merged as PyTorch's attention merges ``attn_mask``
    (L, S) or (N·H, L, S) and ``key_padding_mask`` (N, S), and whether the attention is
    causal without it (``is_causal`` and no padding mask; the weights take the mask). Both
    masks leave the ``added`` keys (``bias_k``, ``add_zero_attn``) at the end unmasked."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype,
    )  # fmt: skip
    if key_padding_mask is not None and added:
        key_padding_mask = F.pad(key_padding_mask, (0, added))
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention")
    if is_causal and key_padding_mask is None and not need_weights:
        return None, True
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=dtype, check_other=False,
    )  # fmt: skip
    if attn_mask is not None and added:
        attn_mask = F.pad(attn_mask, (0, added))
    if key_padding_mask is not None:
        is_causal = False
        padding = key_padding_mask.view(batch, 1, 1, sources).expand(-1, heads, -1, -1)
        padding = padding.reshape(batch * heads, 1, sources)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if attn_mask is not None and attn_mask.dim() == 2:  # (L, S)
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask, is_causal  # (1 or N·H, L, S)


def _attention_with_weights(q, k, v, attn_mask, dropout: float):
    """PyTorch's attention when ``need_weights=True``, in its order of operations: the output
    (N·H, L, E / H) and the weights softmax(q kᵀ / √d + mask) (N·H, L, S), d = E / H."""
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    if attn_mask is None:
        attention = torch.bmm(q_scaled, k.transpose(-2, -1))
    else:
        attention = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    attention = F.softmax(attention, dim=-1)
    if dropout > 0.0:
        attention = F.dropout(attention, p=dropout)
    return torch.bmm(attention, v), attention
