"""The answer-span decoder of extractive QA: from a model's start/end logits to character spans of the context.

One decoder for both users: `lmforge finetune qa` evaluation (SQuAD exact match / F1) and the
`question-answering` pipeline, so that the answer a fine-tuned model is scored on is the answer users get.
The rules are those of transformers' question-answering pipeline:

- a (question, context) input is cut into overlapping chunks (`prepare_qa_features`); each chunk is decoded
  on its own, then the spans of all chunks compete;
- in a chunk, the start and end logits of the context tokens and of the no-answer token ([CLS], position 0
  for BERT) go through a softmax (question, separators and padding are left out); a span's score is
  P(start) * P(end), with both ends on context tokens and start <= end < start + `max_answer_len`;
- the no-answer score is P(start=[CLS]) * P(end=[CLS]), the lowest over the chunks (the chunk most sure
  that it holds the answer decides); with `handle_impossible_answer` it competes with the spans as the
  answer "" at 0..0, otherwise a span is always given;
- `top_k` answers, best first: each chunk offers its `top_k` best token spans, and the best `top_k` of all
  chunks are kept. One difference: a character span that several chunks offer (their overlap) or that
  several token spans give (after growing to whole words) is listed once, with its best score, where
  transformers' pipeline lists it again.

`MAX_ANSWER_LEN` = 15 tokens, transformers' pipeline default, is the default of both users; the SQuAD
evaluation scripts often use 30, but answers of more than 15 word pieces are rare in SQuAD and a longer
limit mostly admits over-long spans.

    spans = decode_answers([QAChunk(f["offset_mapping"], start, end) for f, start, end in chunks], top_k=3)
    [(score, start_char, end_char), ...]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_ANSWER_LEN = 15  # tokens; transformers' question-answering pipeline default


@dataclass
class QAChunk:
    """One chunk of a (question, context) input and the model's logits for it.

    `offsets`: per token, its (start, end) characters in the context, None for a token outside the context
    ([CLS], question, [SEP]); `start_logits`/`end_logits`: (T,) or longer (padding past len(offsets) is
    ignored); `null_index`: the token that stands for "no answer" ([CLS]; None when there is none);
    `word_ids`: per token, the word it belongs to (None: no growing to whole words).
    """

    offsets: Sequence[tuple[int, int] | None]
    start_logits: Any
    end_logits: Any
    null_index: int | None = 0
    word_ids: Sequence[int | None] | None = None


def chunk_spans(
    chunk: QAChunk, top_k: int = 1, max_answer_len: int = MAX_ANSWER_LEN
) -> tuple[list[tuple[float, int, int]], float]:
    """The `top_k` best token spans of one chunk as (score, start token, end token), best first, and the
    chunk's no-answer score (0.0 when it has no no-answer token)."""
    n = len(chunk.offsets)
    in_context = torch.tensor([span is not None for span in chunk.offsets], dtype=torch.bool)  # (T,)
    allowed = in_context.clone()
    if chunk.null_index is not None:
        allowed[chunk.null_index] = True
    start = torch.as_tensor(chunk.start_logits, dtype=torch.float32)[:n]  # (T,)
    end = torch.as_tensor(chunk.end_logits, dtype=torch.float32)[:n]
    p_start = start.masked_fill(~allowed, float("-inf")).softmax(-1)  # (T,)
    p_end = end.masked_fill(~allowed, float("-inf")).softmax(-1)
    null = 0.0 if chunk.null_index is None else float(p_start[chunk.null_index] * p_end[chunk.null_index])
    scores = p_start[:, None] * p_end[None, :]  # (T, T): start x end
    valid = (in_context[:, None] & in_context[None, :]).triu().tril(max_answer_len - 1)  # s <= e < s + max_len
    k = min(top_k, int(valid.sum()))
    values, flat = scores.masked_fill(~valid, -1.0).flatten().topk(k)
    return [(score, *divmod(position, n)) for score, position in zip(values.tolist(), flat.tolist())], null


def whole_words(start: int, end: int, word_ids: Sequence[int | None]) -> tuple[int, int]:
    """The token span start..end grown to the first token of its first word and the last of its last word."""
    word = word_ids[start]
    while word is not None and start > 0 and word_ids[start - 1] == word:
        start -= 1
    word = word_ids[end]
    while word is not None and end + 1 < len(word_ids) and word_ids[end + 1] == word:
        end += 1
    return start, end


def decode_answers(
    chunks: Sequence[QAChunk],
    top_k: int = 1,
    max_answer_len: int = MAX_ANSWER_LEN,
    handle_impossible_answer: bool = False,
) -> list[tuple[float, int, int]]:
    """The best answers over all chunks of one input as (score, start char, end char), best first, at most
    `top_k`; the no-answer is (score, 0, 0). Empty when no chunk holds a context token and the no-answer
    is not allowed."""
    best: dict[tuple[int, int], float] = {}  # (start char, end char) -> its best score over the chunks
    null = float("inf")
    for chunk in chunks:
        spans, chunk_null = chunk_spans(chunk, top_k, max_answer_len)
        null = min(null, chunk_null)
        for score, s, e in spans:
            if chunk.word_ids is not None:
                s, e = whole_words(s, e, chunk.word_ids)
            span = (chunk.offsets[s][0], chunk.offsets[e][1])
            best[span] = max(score, best.get(span, -1.0))
    answers = [(score, s, e) for (s, e), score in best.items()]
    if handle_impossible_answer and chunks:
        answers.append((null, 0, 0))
    answers.sort(key=lambda a: -a[0])
    return answers[:top_k]


def best_span(
    feature: Mapping[str, Any], start_logits: Any, end_logits: Any, max_answer_len: int = MAX_ANSWER_LEN
) -> tuple[float, int, int] | None:
    """(score, start char, end char) of the best span of one `prepare_qa_features` feature (its [CLS] at 0
    is the no-answer token), or None when the feature holds no context token."""
    spans = decode_answers(
        [QAChunk(feature["offset_mapping"], start_logits, end_logits)], max_answer_len=max_answer_len
    )
    return spans[0] if spans else None


def extract_answer(
    feature: Mapping[str, Any], start_logits: Any, end_logits: Any, context: str, max_answer_len: int = MAX_ANSWER_LEN
) -> str:
    """The text of `best_span` in `context`; "" when the feature holds no context token."""
    span = best_span(feature, start_logits, end_logits, max_answer_len)
    return "" if span is None else context[span[1] : span[2]]
