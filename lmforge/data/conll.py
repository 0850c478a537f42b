"""Token classification: CoNLL-style BIO files, and word tags aligned to sub-tokens.

- `load_conll`: sentences ``{"tokens": [...], "tags": [...]}`` from "token ... tag" lines.
- `tokenize_and_align`: model features; the tag goes on the first sub-token of each word,
  `IGNORE_INDEX` (skipped by the loss) everywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.constants import IGNORE_INDEX
from lmforge.textio import TextFileError, read_text

if TYPE_CHECKING:  # type hints only: reading files needs no `tokenizers` library
    from lmforge.tokenizer import Tokenizer


def load_conll(path: str | Path) -> list[dict[str, list[str]]]:
    """Read a CoNLL-style file: one "token ... tag" per line (tag last), blank line between
    sentences, ``-DOCSTART-`` lines skipped. Returns ``{"tokens": [...], "tags": [...]}``."""
    path = Path(path)
    text = read_text(path)
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2:
            raise TextFileError(
                f"{path}, line {lineno}: {line.strip()!r} has no tag; write 'token tag' "
                "(tag in the last column, whitespace-separated)"
            )
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise TextFileError(f"{path}: holds no sentences (only -DOCSTART- lines); add some")
    return sentences


def tokenize_and_align(
    examples: Sequence[Mapping[str, Sequence[str]]],
    tokenizer: Tokenizer,
    label2id: Mapping[str, int],
    max_length: int = 512,
) -> list[dict[str, list[int]]]:
    """Tokenize pre-split words and align word tags to sub-tokens.

    The first sub-token of each word carries the tag id; later sub-tokens of the word and the
    special tokens get `IGNORE_INDEX` so the loss skips them. Sequences are cut to ``max_length``.
    """
    with_types = "token_type_ids" in tokenizer.model_input_names
    features: list[dict[str, list[int]]] = []
    with tokenizer.truncating(max_length) as backend:
        encodings = backend.encode_batch([list(ex["tokens"]) for ex in examples], is_pretokenized=True)
    for index, (example, encoding) in enumerate(zip(examples, encodings, strict=True)):
        tags = example["tags"]
        if len(tags) != len(example["tokens"]):
            raise ValueError(
                f"example {index}: {len(example['tokens'])} tokens but {len(tags)} tags; give one tag per token"
            )
        labels: list[int] = []
        previous: int | None = None
        for word in encoding.word_ids:
            if word is None or word == previous:
                labels.append(IGNORE_INDEX)
            else:
                tag = tags[word]
                if tag not in label2id:
                    raise ValueError(
                        f"example {index}: unknown tag {tag!r}; known tags are {sorted(label2id)}. Add it to label2id"
                    )
                labels.append(label2id[tag])
            previous = word
        feature = {"input_ids": list(encoding.ids), "attention_mask": [1] * len(encoding.ids)}
        if with_types:
            feature["token_type_ids"] = list(encoding.type_ids)
        feature["labels"] = labels
        features.append(feature)
    return features
