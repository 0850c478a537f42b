"""Extractive question answering: SQuAD v1/v2 JSON files, and (question, context) features for training.

- `load_squad`: flat examples ``{"id", "question", "context", "answers", "is_impossible"}``, answers checked
  against their contexts.
- `prepare_qa_features`: long contexts cut into overlapping chunks like Hugging Face's run_qa.py, each with the
  answer's token positions and the offsets that `lmforge.data.extract_answer` maps back to text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.textio import TextFileError, read_text

if TYPE_CHECKING:  # type hints only: reading files needs no `tokenizers` library
    from lmforge.tokenizer import Tokenizer


def load_squad(path: str | Path) -> list[dict[str, Any]]:
    """Read SQuAD v1/v2 JSON (data -> paragraphs -> qas) into flat examples
    ``{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]},
    "is_impossible"}``. Answer offsets are checked against the context."""
    path = Path(path)
    try:
        root = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise TextFileError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}); fix the file") from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise TextFileError(
            f'{path}: no top-level "data" list; a SQuAD file looks like '
            '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}'
        )
    examples: list[dict[str, Any]] = []
    for a, article in enumerate(root["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise TextFileError(f'{where}: no "context" string; add the paragraph text')
            for q, qa in enumerate(paragraph.get("qas", [])):
                if "question" not in qa:
                    raise TextFileError(f'{where}.qas[{q}]: no "question"; add it')
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else qa.get("answers", [])
                texts, starts = [], []
                for answer in answers:
                    start, text = answer.get("answer_start"), answer.get("text")
                    if not isinstance(start, int) or not isinstance(text, str):
                        raise TextFileError(
                            f'{where}.qas[{q}]: each answer needs "text" (str) and "answer_start" (int)'
                        )
                    if context[start : start + len(text)] != text:
                        raise TextFileError(
                            f"{where}.qas[{q}]: answer {text!r} is not at answer_start={start} "
                            f"of the context (found {context[start : start + len(text)]!r}); "
                            "fix answer_start (a character offset into the context)"
                        )
                    texts.append(text)
                    starts.append(start)
                if not impossible and not texts:
                    raise TextFileError(f'{where}.qas[{q}]: no answers; add one or set "is_impossible": true')
                examples.append(
                    {
                        "id": str(qa.get("id", f"{a}-{p}-{q}")),
                        "question": qa["question"],
                        "context": context,
                        "answers": {"text": texts, "answer_start": starts},
                        "is_impossible": impossible,
                    }
                )
    if not examples:
        raise TextFileError(f"{path}: holds no questions; add some qas")
    return examples


def prepare_qa_features(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
) -> list[dict[str, Any]]:
    """Encode (question, context) pairs, splitting long contexts into chunks of at most
    ``max_length`` tokens that overlap by ``doc_stride`` tokens; only the context is cut.

    Each feature has input_ids, token_type_ids, attention_mask, start/end_positions (token
    indices of the first answer, or 0, the [CLS] index, when the answer is not wholly inside
    this chunk or there is none), ``example_id`` and ``offset_mapping`` (character spans into
    the context for context tokens, None elsewhere) for `extract_answer`.
    """
    features: list[dict[str, Any]] = []
    for example in examples:
        question = example["question"].lstrip()  # leading spaces only waste room
        with tokenizer.truncating(max_length, stride=doc_stride, strategy="only_second") as backend:
            try:
                encoding = backend.encode(question, example["context"])
            except Exception as err:  # noqa: BLE001 - the backend raises a bare Exception
                raise ValueError(
                    f"example {example.get('id')!r}: cannot fit the question and a context chunk "
                    f"in max_length={max_length} with doc_stride={doc_stride} ({err}); raise "
                    "max_length or lower doc_stride"
                ) from None
        answers = example.get("answers") or {"text": [], "answer_start": []}
        has_answer = bool(answers["text"]) and not example.get("is_impossible", False)
        if has_answer:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
        for chunk in [encoding, *encoding.overflowing]:
            sequence_ids = chunk.sequence_ids
            offsets = [tuple(span) if seq == 1 else None for span, seq in zip(chunk.offsets, sequence_ids, strict=True)]
            start_pos = end_pos = 0
            if has_answer:
                context_idx = [i for i, seq in enumerate(sequence_ids) if seq == 1]
                first, last = context_idx[0], context_idx[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start_pos = first
                    while start_pos <= last and offsets[start_pos][1] <= start_char:
                        start_pos += 1
                    end_pos = last
                    while end_pos >= first and offsets[end_pos][0] >= end_char:
                        end_pos -= 1
            features.append(
                {
                    "input_ids": list(chunk.ids),
                    "token_type_ids": list(chunk.type_ids),
                    "attention_mask": [1] * len(chunk.ids),
                    "start_positions": start_pos,
                    "end_positions": end_pos,
                    "example_id": example.get("id"),
                    "offset_mapping": offsets,
                }
            )
    return features
