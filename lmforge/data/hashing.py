"""Counter-based hashing: a random-looking number for any (seed, index) without stored state.

Used for the train/val document split and for the start offsets of random training blocks.
Because the value depends only on (seed, index), item i is the same on every call, in every
DataLoader worker and after a resume, and no random generator has to be replayed.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Return the SplitMix64 hash of a 64-bit integer (a bijection on [0, 2**64))."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_hash(seed: int, index: int) -> int:
    """Return a 64-bit hash of (seed, index); distinct indices give distinct values for a seed."""
    return splitmix64((splitmix64(seed & _MASK64) + index) & _MASK64)


def counter_uniform(seed: int, index: int) -> float:
    """Return a number in [0, 1) determined by (seed, index)."""
    return (counter_hash(seed, index) >> 11) / float(1 << 53)
