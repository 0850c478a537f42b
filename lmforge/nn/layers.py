"""Feed-forward network, layer norm and the Transformer block (pre-norm or post-norm)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lmforge.nn.attention import AttentionMask, CrossAttention, KVCache, MultiHeadAttention
from lmforge.nn.inference import apply, apply_activated, hook_free
from lmforge.nn.positions import RotaryEmbedding


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU (a named function, not a lambda, so models pickle)."""
    return F.gelu(x, approximate="tanh")


# Activation names follow Hugging Face's config values, so configs map one to one.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as in BERT
    "gelu_new": gelu_tanh,  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,  # Marian's name for SiLU
}


# The same activations computed in place, bit for bit equal to the above (same kernels). FeedForward uses
# them when no graph is recorded (inference_mode / no_grad): the (B, T, d_ff) output of `fc` is then
# overwritten instead of a second buffer being allocated, written and freed per layer.
# (Named functions, not lambdas, so that a pickled model still pickles.)
def gelu_(x: Tensor) -> Tensor:
    return torch.ops.aten.gelu_(x)


def gelu_tanh_(x: Tensor) -> Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


def silu_(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


INPLACE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": gelu_,
    "gelu_new": gelu_tanh_,
    "gelu_pytorch_tanh": gelu_tanh_,
    "relu": torch.relu_,
    "silu": silu_,
    "swish": silu_,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout, skipped entirely when it would do nothing (saves a call per use when decoding)."""
    return F.dropout(x, p, True) if training and p > 0 else x


def layer_norm(dim: int, eps: float = 1e-5, bias: bool = True) -> nn.LayerNorm:
    """LayerNorm with an optional bias (GPT-2/BERT have one; some modern models drop it)."""
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class FeedForward(nn.Module):
    """Position-wise MLP: proj(act(fc(x))), d_model -> d_ff -> d_model."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "gelu_new", bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = activation
        self.act = get_activation(activation)
        self.act_inplace = INPLACE_ACTIVATIONS.get(activation)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        if self._can_act_inplace():
            h = apply_activated(self.fc, x, self.activation)  # (B, T, d_ff) fc and activation in one call
            if h is None:  # not on the packed path: in place, BERT encoder on 2 cores GELU 40 -> 14 ms of ~490
                h = self.act_inplace(apply(self.fc, x))
        else:
            h = self.act(apply(self.fc, x))
        return dropout(apply(self.proj, h), self.dropout, self.training)

    def _can_act_inplace(self) -> bool:
        """Overwrite fc's output only when nothing can see it: no autograd graph (which would keep the
        pre-activation for backward), fc a Linear (fresh output) and no forward hooks (which may have
        kept a reference to that output)."""
        return (
            self.act_inplace is not None
            and not torch.is_grad_enabled()
            and isinstance(self.fc, nn.Linear)
            and self.act is ACTIVATIONS.get(self.activation)  # not swapped for another function
            and hook_free(self.fc)
        )


class TransformerBlock(nn.Module):
    """Attention + feed-forward with residuals.

    pre-norm (GPT-2):  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    post-norm (BERT, original Transformer):  x = ln_1(x + attn(x));  x = ln_2(x + mlp(x))
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        activation: str = "gelu_new",
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
        norm_position: str = "pre",
        eps: float = 1e-5,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        self.pre_norm = norm_position == "pre"
        self.ln_1 = layer_norm(d_model, eps, bias)
        self.attn = MultiHeadAttention(
            d_model, n_heads, bias, dropout if attn_dropout is None else attn_dropout, rotary
        )
        self.ln_2 = layer_norm(d_model, eps, bias)
        self.mlp = FeedForward(d_model, d_ff, activation, bias, dropout)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        mask: AttentionMask,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        output_attentions: bool = False,
        keep: Tensor | slice | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) -> (B, T, C), or (B, len(keep), C): `keep` names the positions whose output is needed (a
        last block whose other positions only had to write their keys and values to the cache); the others are
        dropped after the attention, so the feed-forward runs on the kept positions only."""
        if self.pre_norm:
            a, weights = self.attn(apply(self.ln_1, x), mask, position_ids, cache, layer_idx, output_attentions)
            x = x + dropout(a, self.dropout, self.training)
            if keep is not None:
                x = x[:, keep]
            x = x + self.mlp(apply(self.ln_2, x))
        else:
            a, weights = self.attn(x, mask, position_ids, cache, layer_idx, output_attentions)
            x = apply(self.ln_1, x + dropout(a, self.dropout, self.training))
            if keep is not None:
                x = x[:, keep]
            x = apply(self.ln_2, x + self.mlp(x))
        return x, weights


class DecoderBlock(nn.Module):
    """An encoder-decoder's decoder layer: causal self-attention, cross-attention over the encoder's
    output (`memory`), feed-forward, each with a residual.

    pre-norm:  x = x + attn(ln_1(x));  x = x + cross_attn(ln_cross(x), memory);  x = x + mlp(ln_2(x))
    post-norm (original Transformer, Marian, BART):  x = ln_1(x + attn(x));  x = ln_cross(x + cross_attn(x, memory));
        x = ln_2(x + mlp(x))
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
        norm_position: str = "post",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        self.pre_norm = norm_position == "pre"
        attn_p = dropout if attn_dropout is None else attn_dropout
        self.ln_1 = layer_norm(d_model, eps, bias)
        self.attn = MultiHeadAttention(d_model, n_heads, bias, attn_p)
        self.ln_cross = layer_norm(d_model, eps, bias)
        self.cross_attn = CrossAttention(d_model, n_heads, bias, attn_p)
        self.ln_2 = layer_norm(d_model, eps, bias)
        self.mlp = FeedForward(d_model, d_ff, activation, bias, dropout)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        mask: AttentionMask,
        memory_mask: AttentionMask,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: (B, T, C), memory: (B, S, C) -> (B, T, C), and if output_attentions the self-attention
        weights (B, H, T, Tk) and the cross-attention weights (B, H, T, S) (else None, None)."""
        if self.pre_norm:
            a, self_w = self.attn(apply(self.ln_1, x), mask, None, cache, layer_idx, output_attentions)
            x = x + dropout(a, self.dropout, self.training)
            c, cross_w = self.cross_attn(
                apply(self.ln_cross, x), memory, memory_mask, cache, layer_idx, output_attentions
            )
            x = x + dropout(c, self.dropout, self.training)
            return x + self.mlp(apply(self.ln_2, x)), self_w, cross_w
        a, self_w = self.attn(x, mask, None, cache, layer_idx, output_attentions)
        x = apply(self.ln_1, x + dropout(a, self.dropout, self.training))
        c, cross_w = self.cross_attn(x, memory, memory_mask, cache, layer_idx, output_attentions)
        x = apply(self.ln_cross, x + dropout(c, self.dropout, self.training))
        return apply(self.ln_2, x + self.mlp(x)), self_w, cross_w


def run_blocks(
    blocks: Sequence[TransformerBlock],
    x: Tensor,
    mask: AttentionMask,
    position_ids: Tensor | None = None,
    cache: KVCache | None = None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    checkpointing: bool = False,
    keep: Tensor | slice | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Apply the blocks in order: (output, the input of every block if output_hidden_states, every
    block's attention weights if output_attentions). `checkpointing` recomputes activations in the
    backward pass instead of keeping them (training only; no KV cache then). `keep`: the positions whose
    output is wanted (the output is then (B, len(keep), C)); the last block's feed-forward runs on those
    only (`TransformerBlock.forward`)."""
    hidden: list[Tensor] = []
    attentions: list[Tensor] = []
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if output_hidden_states:
            hidden.append(x)
        kept = keep if i == last else None
        if checkpointing:
            x, w = torch.utils.checkpoint.checkpoint(
                block, x, mask, position_ids, None, i, output_attentions, kept, use_reentrant=False
            )
        else:
            x, w = block(x, mask, position_ids, cache, i, output_attentions, kept)
        if output_attentions:
            attentions.append(w)
    if keep is not None and not blocks:
        x = x[:, keep]
    return x, hidden, attentions
