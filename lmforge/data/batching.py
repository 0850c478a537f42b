"""Length-bucketed batching for inference: sort examples by length so that each batch pads to
nearly its own length, run the batches, and put the results back in the caller's order.

    order = length_sorted_batches([len(ids) for ids in encoded], batch_size=32)
    for batch_indices in order: ...          # each a list of example indices, similar lengths

On sentences of varied length this skips most of the padding a batch in file order would compute.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fit_to_context", "length_sorted_batches"]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices of the examples grouped into batches of similar length (longest first, so a memory
    problem shows up at once). A batch holds at most `batch_size` examples and, when `max_tokens`
    is given, at most `max_tokens` padded tokens (batch size x longest length; a single example
    longer than that still gets a batch of its own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # stable: ties keep input order
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]  # sorted: the first is the longest
        too_many_tokens = max_tokens is not None and (len(current) + 1) * longest > max_tokens
        if current and (len(current) == batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def fit_to_context(
    batches: list[list[int]], prompt_lengths: Sequence[int], new_tokens: Sequence[int], context: int
) -> list[list[int]]:
    """Split each batch (in order) so that its longest prompt plus its largest new-token budget fits
    `context`: left-padded prompts all start generating at the longest one's length."""
    out: list[list[int]] = []
    for batch in batches:
        current: list[int] = []
        longest = most_new = 0
        for i in batch:
            grown = (max(longest, prompt_lengths[i]), max(most_new, new_tokens[i]))
            if current and grown[0] + grown[1] > context:
                out.append(current)
                current, grown = [], (prompt_lengths[i], new_tokens[i])
            current.append(i)
            longest, most_new = grown
        if current:
            out.append(current)
    return out
