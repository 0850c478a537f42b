"""BERT pretraining data: masked-LM batches (:class:`MLMCollator`) and next-sentence pairs
(:func:`nsp_pairs`).

    pairs = nsp_pairs(documents, max_length=128, seed=0, tokenizer=tok)   # list of dicts
    collate = MLMCollator(tok, mlm_probability=0.15, seed=0)
    batch = collate(pairs[:32])          # input_ids, attention_mask, token_type_ids, labels, ...
    loss = BertForPreTraining(config)(**batch).loss

Masking follows BERT: 15% of the real, non-special tokens are chosen; of those 80% become
[MASK], 10% a random non-special token and 10% stay unchanged; ``labels`` hold the original id
at chosen positions and -100 (ignored by the loss) elsewhere.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import IGNORE_INDEX

__all__ = ["MLMCollator", "nsp_pairs"]

_CONTINUATION_PREFIX = "##"


def _required_id(tokenizer: Any, role: str, why: str) -> int:
    """The id of ``tokenizer``'s ``role`` token (e.g. "mask_token"), or a ValueError naming it."""
    token_id = getattr(tokenizer, f"{role}_id", None)
    if token_id is None:
        raise ValueError(
            f"the tokenizer has no {role} ({why}); train it with Tokenizer.train_wordpiece or "
            f"set tokenizer.{role} to a token of its vocabulary"
        )
    return int(token_id)


class MLMCollator:
    """Turn a list of examples into a padded, masked batch for BERT's masked-LM objective.

    Each example is a mapping with ``input_ids`` (token ids, specials already added, e.g. by
    :func:`nsp_pairs` or ``tokenizer(text)``), optionally ``token_type_ids`` (default all 0) and
    ``next_sentence_label`` (passed through as a (B,) tensor when every example has one).

    Args:
        tokenizer: gives the pad and mask ids, the special ids (never chosen) and the vocabulary
            (random replacements are drawn from its non-special tokens; ``##`` pieces mark
            word continuations for ``whole_word``).
        mlm_probability: chance that a real, non-special token (or word) is chosen.
        whole_word: choose whole words: a chosen word has all its ``##`` pieces chosen too.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor cores).
        seed: seeds the collator's own ``torch.Generator`` so batches are reproducible; None
            draws a fresh seed. (Each DataLoader worker gets a copy of the same generator: give
            workers distinct seeds, or collate in the main process, to avoid repeated masks.)
    """

    def __init__(
        self,
        tokenizer: Any,
        mlm_probability: float = 0.15,
        whole_word: bool = False,
        pad_to_multiple_of: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={mlm_probability} must be in (0, 1); BERT uses 0.15")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be a positive int or None")
        self.tokenizer = tokenizer
        self.mlm_probability = float(mlm_probability)
        self.whole_word = bool(whole_word)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = _required_id(tokenizer, "pad_token", "needed to pad batches")
        self.mask_id = _required_id(tokenizer, "mask_token", "needed to mask tokens")
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab: Mapping[str, int] = tokenizer.get_vocab()
        self.vocab_size = max(len(tokenizer), max(vocab.values()) + 1)
        is_special = torch.zeros(self.vocab_size, dtype=torch.bool)
        is_special[self.special_ids] = True
        # ids a "random token" replacement may take: (R,)
        self.replacement_ids = torch.nonzero(~is_special).flatten()
        if self.replacement_ids.numel() == 0:
            raise ValueError("the tokenizer's vocabulary has only special tokens; train it first")
        # (V,) True for "##" word-continuation pieces
        self.is_continuation = torch.zeros(self.vocab_size, dtype=torch.bool)
        for token, index in vocab.items():
            if token.startswith(_CONTINUATION_PREFIX) and not is_special[index]:
                self.is_continuation[index] = True
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Pad ``examples`` and mask them; returns input_ids, attention_mask, token_type_ids,
        labels (all (B, T) long) and next_sentence_label (B,) when the examples have it."""
        if not examples:
            raise ValueError("MLMCollator got an empty list of examples; pass at least one")
        rows = [self._ids(example, "input_ids", i) for i, example in enumerate(examples)]
        types = [
            self._ids(example, "token_type_ids", i) if "token_type_ids" in example else [0] * len(row)
            for i, (example, row) in enumerate(zip(examples, rows))
        ]
        for i, (row, type_row) in enumerate(zip(rows, types)):
            if len(type_row) != len(row):
                raise ValueError(
                    f"example {i} has {len(row)} input_ids but {len(type_row)} token_type_ids; "
                    "they must have the same length"
                )
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch, width = len(rows), length
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # (B, T)
        token_type_ids = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for i, (row, type_row) in enumerate(zip(rows, types)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            token_type_ids[i, : len(row)] = torch.tensor(type_row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        if int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(
                f"input_ids hold ids outside the tokenizer's vocabulary [0, {self.vocab_size}); "
                "were the examples made with another tokenizer?"
            )

        chosen = self.choose(input_ids, attention_mask)  # (B, T) bool
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        masked = self.corrupt(input_ids, chosen)
        out = {
            "input_ids": masked,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
        }
        has_nsp = ["next_sentence_label" in example for example in examples]
        if any(has_nsp):
            if not all(has_nsp):
                raise ValueError(
                    f"{sum(has_nsp)} of {len(examples)} examples have a next_sentence_label; "
                    "give it to every example of a batch or to none"
                )
            out["next_sentence_label"] = torch.tensor(
                [int(example["next_sentence_label"]) for example in examples], dtype=torch.long
            )
        return out

    def choose(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) bool: the positions to predict, ~``mlm_probability`` of the real,
        non-special tokens (whole words when ``whole_word``)."""
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)  # (B, T)
        draw = torch.rand(input_ids.shape, generator=self.generator) < self.mlm_probability
        if not self.whole_word:
            return candidates & draw
        # a continuation piece right after another candidate belongs to that word; every other
        # candidate starts a word. Each word takes the draw of its first piece.
        continuation = self.is_continuation[input_ids] & candidates  # (B, T)
        continuation[:, 0] = False
        continuation[:, 1:] &= candidates[:, :-1]
        starts = candidates & ~continuation  # (B, T)
        word_index = torch.cumsum(starts.long(), dim=1)  # (B, T): 1-based word number, per row
        start_draw = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.bool)
        start_draw.scatter_(1, word_index * starts, draw & starts)  # column 0 collects non-starts
        start_draw[:, 0] = False
        return candidates & torch.gather(start_draw, 1, word_index)

    def corrupt(self, input_ids: Tensor, chosen: Tensor) -> Tensor:
        """A copy of ``input_ids`` (B, T) with the chosen positions replaced: 80% by [MASK],
        10% by a random non-special token, 10% left as they are."""
        out = input_ids.clone()
        roll = torch.rand(input_ids.shape, generator=self.generator)  # (B, T)
        to_mask = chosen & (roll < 0.8)
        to_random = chosen & (roll >= 0.8) & (roll < 0.9)
        out[to_mask] = self.mask_id
        picks = torch.randint(len(self.replacement_ids), (int(to_random.sum()),), generator=self.generator)
        out[to_random] = self.replacement_ids[picks]
        return out

    @staticmethod
    def _ids(example: Mapping[str, Any], key: str, index: int) -> list[int]:
        if not isinstance(example, Mapping) or key not in example:
            raise ValueError(
                f"example {index} has no {key!r}; MLMCollator takes dicts with input_ids "
                "(and optional token_type_ids, next_sentence_label)"
            )
        value = example[key]
        if isinstance(value, Tensor):
            value = value.tolist()
        ids = [int(v) for v in value]
        if key == "input_ids" and not ids:
            raise ValueError(f"example {index} has empty input_ids; drop empty examples")
        return ids


def split_segments(sentences: Sequence[Sequence[int]], target: int) -> list[list[int]]:
    """Pack consecutive sentences into segments of up to ~``target`` tokens (a longer sentence
    is a segment of its own; it is cut when paired)."""
    segments: list[list[int]] = []
    current: list[int] = []
    for sentence in sentences:
        sentence = [int(t) for t in sentence]
        if not sentence:
            continue
        if current and len(current) + len(sentence) > target:
            segments.append(current)
            current = []
        current = current + sentence
    if current:
        segments.append(current)
    return segments


def nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    max_length: int,
    seed: int,
    tokenizer: Any,
) -> list[dict[str, Any]]:
    """Next-sentence-prediction examples from ``documents`` (each a list of sentences, each a
    list of token ids without specials).

    Every document is cut into segments of consecutive sentences (about half of the
    ``max_length - 3`` token budget each). Each segment A that has a following segment gives one
    example: with probability 1/2 that following segment as B (``next_sentence_label`` 0, "B is
    next", the Hugging Face convention), otherwise a random segment of a *different* document
    (label 1). A pair longer than the budget loses tokens from A's start and B's end, so the
    A|B boundary stays intact. Returns dicts with ``input_ids`` ([CLS] A [SEP] B [SEP]),
    ``token_type_ids`` (0 for [CLS] A [SEP], 1 for B [SEP]) and ``next_sentence_label``; feed
    them to :class:`MLMCollator`.
    """
    if max_length < 5:
        raise ValueError(f"max_length={max_length} is too small for [CLS] A [SEP] B [SEP]; use at least 5")
    cls_id = _required_id(tokenizer, "cls_token", "needed for [CLS] A [SEP] B [SEP]")
    sep_id = _required_id(tokenizer, "sep_token", "needed for [CLS] A [SEP] B [SEP]")
    budget = max_length - 3
    segmented = [split_segments(document, max(1, budget // 2)) for document in documents]
    non_empty = [d for d, segments in enumerate(segmented) if segments]
    if len(non_empty) < 2:
        raise ValueError(
            f"NSP needs at least two documents with text (random 'not next' segments must come "
            f"from another document), got {len(non_empty)}; add documents (e.g. split the corpus "
            "into documents by blank lines) or disable NSP and train with the masked-LM loss "
            "alone (MLMCollator without nsp_pairs)"
        )
    rng = random.Random(seed)
    examples: list[dict[str, Any]] = []
    for d, segments in enumerate(segmented):
        for i in range(len(segments) - 1):
            a = segments[i]
            if rng.random() < 0.5:
                b, label = segments[i + 1], 0
            else:
                other = rng.choice([o for o in non_empty if o != d])
                b, label = rng.choice(segmented[other]), 1
            a, b = _fit_pair(a, b, budget)
            examples.append(
                {
                    "input_ids": [cls_id, *a, sep_id, *b, sep_id],
                    "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                    "next_sentence_label": label,
                }
            )
    return examples


def _fit_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut the longer of ``a`` / ``b`` until both fit in ``budget`` tokens (each keeps >= 1):
    ``a`` loses tokens at its start, ``b`` at its end."""
    over = len(a) + len(b) - budget
    if over <= 0:
        return a, b
    # share the cut so the longer side shrinks first: target lengths la + lb == budget
    la = max(1, min(len(a), max(budget - len(b), budget // 2)))
    lb = budget - la
    if lb > len(b):
        lb, la = len(b), budget - len(b)
    return a[len(a) - la :], b[:lb]
