"""Batching examples of different lengths: the Trainer's default collator.

    collate = DataCollator(tokenizer)                  # pads with the tokenizer's pad id
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}])
    # input_ids (2, 3), attention_mask (2, 3), labels (2,)

What it does, per key: `label` / `label_ids` become `labels`; token sequences (`input_ids`,
`attention_mask`, `token_type_ids`, `position_ids`, per-token `labels`) are right-padded to the
longest example (labels with -100, so padding is never scored); everything else is stacked. Examples
given as text (`{"text": ..., "text_pair"?: ..., "label": ...}`) are tokenized on the fly when a
tokenizer is given. For causal language models without labels, labels = input_ids with padding -100.

Encoder-decoders (translation, summarisation) use `DataCollatorForSeq2Seq`: source and target have their own
lengths, so `input_ids` (+ `attention_mask`) and `labels` are padded separately, and with `model=` the
decoder's teacher-forcing input is built here, as transformers' collator of the same name does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import IGNORE_INDEX
from lmforge.models.seq2seq import shift_tokens_right

__all__ = ["DataCollator", "DataCollatorForSeq2Seq", "pad_sequences"]

#: keys holding one value per token, padded with this value
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "position_ids": 0, "labels": IGNORE_INDEX}
TEXT_KEYS = ("text", "text_pair")


def pad_sequences(rows: Sequence[Sequence[int] | Tensor], value: int, multiple_of: int | None = None) -> Tensor:
    """Right-pad 1-D rows to the longest (rounded up to `multiple_of`): (B, T)."""
    longest = max((len(r) for r in rows), default=0)
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class DataCollator:
    """Pads a list of examples (dicts) into a batch of tensors; see the module docstring.

    Args:
        tokenizer: gives the pad id and tokenizes `text` examples (truncated to its model_max_length).
        causal_lm: make `labels` from `input_ids` when an example has none (padding -> -100).
        keep: keys to pass to the model (None = all); `labels` and `weight` always pass. Other keys,
            such as leftover text columns, are dropped.
        pad_to_multiple_of: round the padded length up (tensor cores like multiples of 8).
        max_length: truncation length for text examples (default: the tokenizer's model_max_length,
            when it knows one).
        pad_token_id: the pad id when the tokenizer has none (or there is no tokenizer): the model's.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        causal_lm: bool = False,
        keep: Iterable[str] | None = None,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.causal_lm = causal_lm
        self.keep = None if keep is None else set(keep) | {"labels", "weight"}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if pad is not None else pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows = [self._normalise(ex, i) for i, ex in enumerate(examples)]
        keys = set(rows[0])
        for i, row in enumerate(rows[1:], start=1):
            if set(row) != keys:
                raise ValueError(
                    f"example {i} has keys {sorted(row)}, example 0 has {sorted(keys)}; every "
                    "example of a dataset needs the same fields"
                )
        if self.causal_lm and "labels" not in keys:
            for row in rows:
                row["labels"] = list(row["input_ids"])
            keys.add("labels")
            if "attention_mask" in keys:  # padding inside an example is not scored either
                for row in rows:
                    row["labels"] = [t if m else IGNORE_INDEX for t, m in zip(row["labels"], row["attention_mask"])]
        batch: dict[str, Tensor] = {}
        lengths = [len(row["input_ids"]) for row in rows] if "input_ids" in keys else None
        for key in sorted(keys):
            values = [row[key] for row in rows]
            if key in TOKEN_KEYS and self._per_token(key, values, lengths):
                pad = self.pad_id if key == "input_ids" else TOKEN_KEYS[key]
                batch[key] = pad_sequences(values, pad, self.pad_to_multiple_of)
            else:
                batch[key] = self._stack(key, values)
        if "input_ids" in batch and "attention_mask" not in batch and lengths and len(set(lengths)) > 1:
            batch["attention_mask"] = pad_sequences([[1] * n for n in lengths], 0, self.pad_to_multiple_of)
        return batch

    # ---- helpers -------------------------------------------------------------------------------
    def _normalise(self, example: Mapping[str, Any], index: int) -> dict[str, Any]:
        if not isinstance(example, Mapping):
            raise TypeError(
                f"example {index} is a {type(example).__name__}; the default collator needs dicts "
                "such as {'input_ids': [...], 'labels': ...} (or pass data_collator=)"
            )
        row = dict(example)
        for alias in ("label", "label_ids"):
            if alias in row:
                if "labels" in row:
                    raise ValueError(f"example {index} has both {alias!r} and 'labels'; keep one")
                row["labels"] = row.pop(alias)
        if "input_ids" not in row and "text" in row:
            row = self._tokenize(row, index)
        if "input_ids" not in row:
            raise ValueError(
                f"example {index} has no 'input_ids' (keys: {sorted(row)}); tokenize the data first, "
                "or give examples a 'text' field and pass tokenizer= to the Trainer"
            )
        for key in TEXT_KEYS:
            row.pop(key, None)
        if self.keep is not None:
            row = {k: v for k, v in row.items() if k in self.keep}
        return row

    def _tokenize(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        if self.tokenizer is None:
            raise ValueError(
                f"example {index} holds text but no input_ids; pass tokenizer= to the Trainer (or "
                "tokenize the dataset) so the text can be encoded"
            )
        text, pair = row["text"], row.get("text_pair")
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise TypeError(f"example {index}: 'text' (and 'text_pair') must be strings")
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", None)
        if limit is not None and limit >= 10**29:  # the tokenizer does not know its model's length
            limit = None
        enc = self.tokenizer(text, pair, truncation=limit is not None, max_length=limit)
        row.update({k: list(v) for k, v in enc.items() if k in TOKEN_KEYS})
        return row

    @staticmethod
    def _per_token(key: str, values: list[Any], lengths: list[int] | None) -> bool:
        """Whether `key` holds one value per token (labels may also be one per example)."""
        if key != "labels":
            return True
        first = values[0]
        if (
            isinstance(first, Tensor)
            and first.is_floating_point()
            or (isinstance(first, (list, tuple)) and first and isinstance(first[0], float))
        ):
            return False  # multi-label targets or regression values, one row per example
        sequence = isinstance(first, (list, tuple)) or (
            isinstance(first, Tensor) and first.dim() == 1 and lengths is not None and len(first) == lengths[0]
        )
        if not sequence or lengths is None:
            return False
        # token labels: one per token (or one more, for causal LMs that score every position)
        return all(len(v) in (n, n + 1) for v, n in zip(values, lengths))

    @staticmethod
    def _stack(key: str, values: list[Any]) -> Tensor:
        try:
            tensors = [torch.as_tensor(v) for v in values]
            return torch.stack(tensors)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(
                f"cannot batch field {key!r}: {err}; give it a number or an equally long list in "
                "every example, or drop it from the dataset"
            ) from None


class DataCollatorForSeq2Seq:
    """Pads (source, target) examples for an encoder-decoder: `input_ids` (and `attention_mask`, made of
    ones when missing) right-padded with the pad id to the longest source, `labels` with `label_pad_token_id`
    (-100: never scored) to the longest target, both rounded up to `pad_to_multiple_of`.

    With `model=` (a model or its config), `decoder_input_ids` = labels shifted right behind the model's
    decoder_start_token_id (padding -> pad id), so losses that pop the labels, or label smoothing, see the
    same decoder input the model would build. The pad id comes from `tokenizer`, else `pad_token_id`, else
    the model's config.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        model: Any = None,
        pad_to_multiple_of: int | None = None,
        label_pad_token_id: int = IGNORE_INDEX,
        pad_token_id: int | None = None,
    ) -> None:
        self.config = getattr(model, "config", model)
        candidates = (
            getattr(tokenizer, "pad_token_id", None),
            pad_token_id,
            getattr(self.config, "pad_token_id", None),
        )
        pad = next((p for p in candidates if p is not None), None)
        if pad is None:
            raise ValueError("DataCollatorForSeq2Seq needs a pad id: pass tokenizer=, model= or pad_token_id=")
        if self.config is not None and getattr(self.config, "decoder_start_token_id", None) is None:
            raise ValueError("model= has no config.decoder_start_token_id to build decoder_input_ids from")
        self.pad_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        keys = set(examples[0])
        unknown = keys - {"input_ids", "attention_mask", "labels"}
        if "input_ids" not in keys or unknown:
            raise ValueError(
                f"seq2seq examples hold 'input_ids' (the source), optionally 'attention_mask' and 'labels' (the "
                f"target ids); got keys {sorted(keys)}: tokenize both sides first and drop the text columns"
            )
        multiple = self.pad_to_multiple_of
        sources = [ex["input_ids"] for ex in examples]
        masks = [ex["attention_mask"] if "attention_mask" in ex else [1] * len(ex["input_ids"]) for ex in examples]
        batch = {
            "input_ids": pad_sequences(sources, self.pad_id, multiple),  # (B, S)
            "attention_mask": pad_sequences(masks, 0, multiple),  # (B, S)
        }
        if "labels" in keys:
            labels = pad_sequences([ex["labels"] for ex in examples], self.label_pad_token_id, multiple)  # (B, T)
            batch["labels"] = labels
            if self.config is not None:
                batch["decoder_input_ids"] = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )  # (B, T)
        return batch
