"""Attention: the textbook formula, masks, a preallocated KV cache, and multi-head attention.

`reference_attention` is softmax(QK^T / sqrt(d_k)) V written out literally: tests prove the fast
path equal to it, and it returns the attention weights for attention maps. `MultiHeadAttention`
runs on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.nn.inference import apply
from lmforge.nn.positions import RotaryEmbedding


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V.

    q: (..., Tq, d_k), k: (..., Tk, d_k), v: (..., Tk, d_v); mask: bool, broadcastable to
    (..., Tq, Tk), True where a query may attend. A query row with no allowed key gets zero
    weights and a zero output (not NaN). Returns (output (..., Tq, d_v), weights (..., Tq, Tk)).
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:  # fully masked rows: softmax of all -inf is NaN; they attend to nothing
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return weights @ v, weights


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """(Tq, Tk) bool: the queries are the last Tq of Tk positions; each sees itself and the past."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


@dataclass
class AttentionMask:
    """What every layer of one forward pass may attend to, built once per forward.

    allowed: (B or 1, 1, Tq, Tk) bool, True = may attend; None = no mask beyond `is_causal`.
    is_causal: let SDPA apply its own causal mask (fast path; only with allowed=None, Tq == Tk).
    empty_rows: (B, 1, Tq, 1) bool for query rows with no allowed key (e.g. left padding); their
        output is set to zero. None when there are none.
    """

    allowed: Tensor | None = None
    is_causal: bool = False
    empty_rows: Tensor | None = None

    @classmethod
    def build(cls, padding_mask: Tensor | None, q_len: int, k_len: int, causal: bool) -> AttentionMask:
        """padding_mask: (B, Tk) with 1 for real tokens and 0 for padding (or None)."""
        if padding_mask is None or bool(padding_mask.all()):
            if not causal or q_len == 1:
                return cls()
            if q_len == k_len:
                return cls(is_causal=True)
            return cls(allowed=causal_mask(q_len, k_len, getattr(padding_mask, "device", None))[None, None])
        allowed = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        if causal:
            allowed = allowed & causal_mask(q_len, k_len, padding_mask.device)  # (B, 1, Tq, Tk)
        else:
            allowed = allowed.expand(-1, 1, q_len, -1)
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1)
        if bool(empty.any()):
            # Let empty rows attend everywhere (keeps SDPA finite); their output is zeroed later.
            return cls(allowed=allowed | empty, empty_rows=empty)
        return cls(allowed=allowed)

    def as_bool(self, q_len: int, k_len: int, device: torch.device) -> Tensor | None:
        """The mask as one explicit bool tensor (for the reference path); None = attend everywhere."""
        mask = self.allowed
        if self.is_causal:
            mask = causal_mask(q_len, k_len, device)[None, None]
        if mask is not None and self.empty_rows is not None:
            mask = mask & ~self.empty_rows
        return mask


class KVCache:
    """Preallocated keys and values for all layers: (n_layer, B, H, max_len, head_dim).

    `length` positions are filled. Each layer writes its new keys/values at [length, length + T)
    and reads [0, length + T); the model calls `advance(T)` once the whole forward is done.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        # cross-attention keys/values per decoder layer, (B, H, S, hs) each: computed once from the encoder's output
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}
        # rows come in groups of this many sharing one source (a source's beams): the cross-attention keys/values
        # are then kept once per group, (B / cross_group, H, S, hs), and the group's queries read them together
        self.cross_group = 1
        self._split()

    def _split(self) -> None:
        self._k = [self.k[i] for i in range(self.k.size(0))]  # per-layer views (B, H, max_len, hs)
        self._v = [self.v[i] for i in range(self.v.size(0))]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, hs) for `layer`; return all keys/values so far (B, H, length+T, hs)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        k_all, v_all = self._k[layer], self._v[layer]
        k_all.narrow(2, start, end - start).copy_(k)  # narrow: a view, without Python indexing's parsing
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (for beam search or dropping finished rows). The cross-attention keys/values
        are kept as they are: rows are only reordered among rows with the same source (a prompt's beams).

        Only the `length` filled positions are copied: beam search reorders every step, and copying whole rows
        (`k[:, index]`) took a quarter of a Marian beam-4 batch-8 step. Most beams keep their own row from one
        step to the next (~85% there), so when at most half the rows change, only those are copied, in place."""
        n, rows = self.length, self.k.size(1)
        if self.cross_group > 1 and index.numel() != rows:
            raise ValueError(
                "rows sharing cross-attention keys/values (cross_group > 1) can only be reordered, not dropped"
            )
        if n and index.numel() == rows:
            moved = (index != torch.arange(rows, device=index.device)).nonzero().flatten()  # rows that change
            if 2 * moved.numel() <= rows:
                if moved.numel():
                    parents = index[moved]
                    for buf in (self.k, self.v):  # the right side is gathered first: a source row may move too
                        buf[:, moved, :, :n] = buf[:, parents, :, :n]
                return
        shape = (self.k.size(0), index.numel()) + tuple(self.k.shape[2:])
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)  # positions >= length are written before read
        if n:
            torch.index_select(self.k.narrow(3, 0, n), 1, index, out=k.narrow(3, 0, n))
            torch.index_select(self.v.narrow(3, 0, n), 1, index, out=v.narrow(3, 0, n))
        self.k, self.v = k, v
        self._split()


class PackedCache:
    """What a cache that takes one row of several sequences' tokens provides (the server's scheduler has one).

    With `packed = True`, the model's input is (1, T): tokens of different sequences side by side, each at its own
    position (`position_ids` given). Each attention layer hands its projections to `attend(layer, q, k, v)`
    (each (1, H, T, hs)), which stores the keys/values where each sequence keeps them and returns the attention
    output with the heads side by side, (1, T, H * hs) (the input of W^O), every token attending only to its own
    sequence. Context limits are the owner's to keep.
    """

    packed = True

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def advance(self, n: int) -> None:
        """Called by the model after the forward; the owner keeps each sequence's length."""


class MultiHeadAttention(nn.Module):
    """Multi-head attention with W^Q, W^K, W^V (fused into one `qkv` projection) and W^O (`proj`)."""

    def __init__(
        self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0, rotary: RotaryEmbedding | None = None
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # [W^Q; W^K; W^V]
        self.proj = nn.Linear(d_model, d_model, bias=bias)  # W^O
        self.dropout = dropout
        self.rotary = rotary

    def forward(
        self,
        x: Tensor,
        mask: AttentionMask,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, C) -> (B, T, C), and the (B, H, T, Tk) weights if output_attentions."""
        B, T, C = x.shape
        qkv = apply(self.qkv, x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hs), views into qkv
        if self.rotary is not None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        if cache is not None and getattr(cache, "packed", False):
            # one row holding several sequences' new tokens (a server's step): the cache knows where each
            # sequence's keys live, so it stores these and computes the attention (see `PackedCache`)
            y = cache.attend(layer_idx, q, k, v)  # (1, T, C)
            return apply(self.proj, y), None
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H, Tk, hs)
        weights = None
        if output_attentions:
            y, weights = reference_attention(q, k, v, mask.as_bool(T, k.size(2), x.device))
            if self.training and self.dropout:
                y = F.dropout(weights, self.dropout) @ v
        else:
            y = fast_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return apply(self.proj, y), weights


def fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float = 0.0) -> Tensor:
    """SDPA under `mask`: q (B, H, Tq, hs), k and v (B, H, Tk, hs) -> (B, H, Tq, hs); rows with nothing
    to attend to give zeros."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, dropout_p=dropout_p, is_causal=mask.is_causal)
    if mask.empty_rows is not None:
        y = y.masked_fill(mask.empty_rows, 0.0)
    return y


class CrossAttention(nn.Module):
    """Encoder-decoder attention: queries from the decoder (`q` = W^Q), keys and values from the encoder's
    output (`kv` = [W^K; W^V], fused), output projection `proj` = W^O."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, C) attends over memory: (B, S, C) (mask: which of the S positions are real) -> (B, T, C),
        and the (B, H, T, S) weights if output_attentions (computed explicitly then; SDPA otherwise).
        With a cache, the keys/values of memory are projected on the first call and reused afterwards."""
        B, T, C = x.shape
        S = memory.size(1)
        H, hs = self.n_heads, self.head_dim
        q = apply(self.q, x).view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        g = getattr(cache, "cross_group", 1) if cache is not None else 1  # rows sharing one source
        if cache is not None and layer_idx in cache.cross:
            k, v = cache.cross[layer_idx]
        else:
            src = memory[::g] if g > 1 else memory  # (B / g, S, C): a group's rows hold copies of one memory
            kv = apply(self.kv, src).view(src.size(0), S, 2, H, hs)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B / g, H, S, hs)
            if cache is not None:
                cache.cross[layer_idx] = (k, v)
        if g > 1 and not output_attentions and mask.empty_rows is None:
            # The g rows of a group attend as g x T queries to the group's one copy of the keys/values: the same
            # dot products, a quarter of the memory traffic for 4 beams.
            G = B // g
            qg = q.reshape(G, g, H, T, hs).transpose(1, 2).reshape(G, H, g * T, hs)
            allowed = None if mask.allowed is None else mask.allowed[::g, :, :1]  # (G, 1, 1, S): padding only
            p = self.dropout if self.training else 0.0
            y = fast_attention(qg, k, v, AttentionMask(allowed=allowed), p)  # (G, H, g * T, hs)
            y = y.view(G, H, g, T, hs).transpose(1, 2).reshape(B, H, T, hs)
            return apply(self.proj, y.transpose(1, 2).reshape(B, T, C)), None
        if g > 1:  # attention maps or rows with nothing to attend to: the plain path, on one copy per row
            k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        weights = None
        if output_attentions:
            y, weights = reference_attention(q, k, v, mask.as_bool(T, S, x.device))  # weights (B, H, T, S)
            if self.training and self.dropout:
                y = F.dropout(weights, self.dropout) @ v
        else:
            y = fast_attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hs)
        return apply(self.proj, y.transpose(1, 2).reshape(B, T, C)), weights
