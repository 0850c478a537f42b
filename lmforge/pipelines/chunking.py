"""Cutting a document into overlapping passages for retrieval (used by `KnowledgeBase.build`).

A chunk has at most `chunk_chars` characters and ends, in order of preference, at a paragraph end, a sentence
end (. ! ? and 。！？) or between words in its second half; the next one starts up to `overlap` characters
earlier. `fit_to_tokens` cuts again, smaller, any chunk with more tokens than the embedder takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# where a chunk may end (see chunk_text); cut before a blank line, after a sentence end, at a space
_PARAGRAPH = re.compile(r"\n[^\S\n]*\n")
_SENTENCE = re.compile(r"[.!?…;:][\"'”’)\]]*(?=\s)|[。！？；：][”’」』）]*|\n")
_WORD = re.compile(r"(?<=[，、,])|\s")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _cut(text: str, start: int, limit: int, chunk_chars: int) -> int:
    """Where a chunk starting at `start` ends, at most at `limit`: the last paragraph end, else sentence
    end, else word end in its second half; else `limit` itself."""
    low = start + chunk_chars // 2
    for pattern, after in ((_PARAGRAPH, False), (_SENTENCE, True), (_WORD, False)):
        cuts = [m.end() if after else m.start() for m in pattern.finditer(text, low, limit + 1)]
        cuts = [c for c in cuts if low < c <= limit]
        if cuts:
            return max(cuts)
    return limit


def _overlap_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the chunk after text[start:end] starts: the earliest sentence start, else word start, in
    the last `overlap` characters; else `end - overlap`. Always after `start`, before `end`."""
    low = max(end - overlap, start + 1)
    for pattern, after in ((_SENTENCE, True), (_WORD, False)):
        for m in pattern.finditer(text, low, end):
            q = _skip_space(text, m.end() if after else m.start())
            if low <= q < end:
                return q
    return _skip_space(text, low)


def chunk_text(text: str, chunk_chars: int = 600, overlap: int = 100) -> list[tuple[int, int]]:
    """(start, end) character spans of overlapping chunks of `text`, in order.

    Each chunk has at most `chunk_chars` characters, no leading or trailing whitespace, and ends at a
    paragraph end, sentence end (. ! ? ; and 。！？；) or word end in its second half when there is one.
    The next chunk starts up to `overlap` characters before the previous one ends (at a sentence or word
    start when possible), so a fact cut at a boundary is whole in one of the two. Every non-space
    character of `text` is in some chunk.
    """
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 2:
        raise ValueError(f"chunk_chars must be an integer >= 2, got {chunk_chars!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= chunk_chars // 2:
        raise ValueError(f"overlap must be an integer from 0 to chunk_chars // 2 = {chunk_chars // 2}, got {overlap!r}")
    spans: list[tuple[int, int]] = []
    start = _skip_space(text, 0)
    while start < len(text):
        limit = start + chunk_chars
        end = len(text) if limit >= len(text) else _cut(text, start, limit, chunk_chars)
        stop = end
        while stop > start and text[stop - 1].isspace():
            stop -= 1
        spans.append((start, stop))
        following = _skip_space(text, end)
        if following >= len(text):
            break
        start = _overlap_start(text, start, stop, overlap) if overlap else following
    return spans


def fit_to_tokens(
    text: str, spans: list[tuple[int, int]], count: Callable[[list[str]], list[int]], max_tokens: int, overlap: int
) -> list[tuple[int, int]]:
    """`spans` with every span of more than `max_tokens` tokens cut again into smaller chunks."""
    fitted: list[tuple[int, int]] = []
    pending = list(spans)
    while pending:
        lengths = count([text[s:e] for s, e in pending])
        later: list[tuple[int, int]] = []
        for (s, e), n in zip(pending, lengths):
            if n <= max_tokens or e - s <= 8:
                fitted.append((s, e))
                continue
            chars = max(8, int((e - s) * max_tokens / n * 0.9))
            later += [(s + a, s + b) for a, b in chunk_text(text[s:e], chars, min(overlap, chars // 2))]
        pending = later
    return sorted(fitted)
