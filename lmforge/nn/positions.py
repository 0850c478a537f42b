"""Position encodings: sinusoidal (fixed), learned (a table) and rotary (RoPE).

Sinusoidal and learned encodings are added to the token embeddings; rotary encodings rotate
queries and keys inside attention, so relative offsets show up in the dot products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SINUSOIDAL_LAYOUTS = ("interleaved", "split")


def sinusoidal_table(num_positions: int, dim: int, layout: str = "interleaved") -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)).

    layout "interleaved" (the original Transformer) puts sine and cosine in alternate columns; "split"
    (Marian) puts all sines first, then all cosines: [sin(angle) | cos(angle)].
    Returns a (num_positions, dim) float32 table, computed in float64 for accuracy.
    """
    if layout not in SINUSOIDAL_LAYOUTS:
        raise ValueError(f"sinusoidal layout must be one of {SINUSOIDAL_LAYOUTS}, got {layout!r}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (ceil(dim/2),) = 2i
    angle = pos / torch.pow(10000.0, two_i / dim)  # (P, ceil(dim/2))
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    if layout == "split":  # ceil(dim/2) sine columns, then the cosines
        half = angle.size(1)
        table[:, :half] = torch.sin(angle)
        table[:, half:] = torch.cos(angle[:, : dim // 2])
        return table.float()
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])  # an odd dim has one fewer cosine column
    return table.float()


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal encodings looked up by position id (no parameters)."""

    def __init__(self, num_positions: int, dim: int, layout: str = "interleaved") -> None:
        super().__init__()
        self.num_positions = num_positions
        self.register_buffer("table", sinusoidal_table(num_positions, dim, layout), persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:  # (B, T) -> (B, T, dim)
        return self.table[position_ids]


class LearnedPositionalEmbedding(nn.Embedding):
    """A trained (num_positions, dim) table, as in GPT-2 and BERT."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__(num_positions, dim)
        self.num_positions = num_positions


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), "rotate-half" layout.

    Feature pair (j, j + d/2) of a head vector at position p is rotated by the angle
    p * base^(-2j/d): q'_j = q_j cos - q_{j+d/2} sin, q'_{j+d/2} = q_{j+d/2} cos + q_j sin.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.head_dim, self.max_positions, self.base = head_dim, max_positions, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
        angle = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq  # (P, d/2)
        angle = torch.cat((angle, angle), dim=-1)  # (P, d)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """Rotate x (B, H, T, d) by the positions (B, T) (or (T,))."""
        cos = self.cos[position_ids].to(x.dtype)  # (B, T, d)
        sin = self.sin[position_ids].to(x.dtype)
        if cos.dim() == 3:  # broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return x * cos + rotate_half(x) * sin
