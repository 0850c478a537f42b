"""Shared Transformer building blocks used by every model family."""

from lmforge.nn.attention import (
    AttentionMask,
    CrossAttention,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    reference_attention,
)
from lmforge.nn.layers import ACTIVATIONS, DecoderBlock, FeedForward, TransformerBlock, get_activation, layer_norm
from lmforge.nn.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    sinusoidal_table,
)

__all__ = [
    "AttentionMask",
    "CrossAttention",
    "DecoderBlock",
    "KVCache",
    "MultiHeadAttention",
    "causal_mask",
    "reference_attention",
    "ACTIVATIONS",
    "FeedForward",
    "TransformerBlock",
    "get_activation",
    "layer_norm",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "sinusoidal_table",
]
