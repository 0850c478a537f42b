"""token-classification (alias ner): a label for every token, or entities grouped from them.

    aggregation_strategy="none"    -> one dict per token: {"entity", "score", "index", "word", "start", "end"}
    "simple"                       -> adjacent tokens with the same tag (B-X, I-X, I-X) become one entity
    "first" / "max" / "average"    -> first the tokens of each word agree on one label (the first token's,
                                      the most confident token's, or the averaged scores'), then words group
    grouped results                -> {"entity_group", "score" (mean of the members), "word", "start", "end"}

`start`/`end` are character offsets into the input; a grouped entity's `word` is `text[start:end]`, the
input's own characters (with "first"/"max"/"average" it always covers whole words). Words are the
tokenizer's pre-tokenized words (whitespace and punctuation split; every CJK character is its own
word). Entities labelled with `ignore_labels` (default ["O"]) are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.models.bert import BertForTokenClassification
from lmforge.pipelines.base import Feature, Pipeline, check_model_kind

STRATEGIES = ("none", "simple", "first", "max", "average")


def split_tag(label: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("I", "PER") for "I-PER"; a label without a prefix counts as I."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


class TokenClassificationPipeline(Pipeline):
    """Label tokens with a token-classification model (BertForTokenClassification).

    Options: `aggregation_strategy` ("none" default, "simple", "first", "max", "average"),
    `ignore_labels` (default ["O"]), `truncation` (default True: cut to the model's length with a
    warning), `max_length`.
    """

    task = "token-classification"

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["BertForTokenClassification"],
            lambda m: isinstance(m, BertForTokenClassification),
            "load it with AutoModelForTokenClassification.from_pretrained(path)",
        )

    def _options(
        self,
        aggregation_strategy: str = "none",
        ignore_labels: list[str] | None = None,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        strategy = str(aggregation_strategy).lower()
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {STRATEGIES}, got {aggregation_strategy!r}")
        ignore = ["O"] if ignore_labels is None else ignore_labels
        if isinstance(ignore, str) or not all(isinstance(x, str) for x in ignore):
            raise TypeError(f"ignore_labels must be a list of label names, got {ignore_labels!r}")
        return {
            "aggregation_strategy": strategy,
            "ignore_labels": set(ignore),
            "truncation": bool(truncation),
            "max_length": self._limit(max_length),
        }

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        indices = list(range(start, start + len(items)))
        texts = [self._check_text(item, i) for i, item in zip(indices, items)]
        encodings = self._encode(texts, None, indices, opts["max_length"], opts["truncation"])
        return [Feature([self._row(enc)], {"text": text, "encoding": enc}) for text, enc in zip(texts, encodings)]

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[torch.Tensor]:
        batch = self._collate(rows)
        probs = self.model(**self._model_inputs(batch)).logits.float().softmax(-1).cpu()  # (B, T, labels)
        return [p[: len(r["input_ids"])] for p, r in zip(probs, rows)]  # per row (T_i, labels)

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> list[dict[str, Any]]:
        probs = outputs[0]  # (T, labels)
        text, enc = feature.meta["text"], feature.meta["encoding"]
        id2label = self.model.config.id2label
        strategy = opts["aggregation_strategy"]
        best_scores, best_ids = probs.max(-1)  # (T,)
        unk = self.tokenizer.unk_token_id
        tokens = []  # the real (non-special) tokens: index, word id, offsets, label scores
        for t, (special, word, (s, e)) in enumerate(zip(enc.special_tokens_mask, enc.word_ids, enc.offsets)):
            if not special:
                tokens.append(
                    {
                        "index": t,
                        "word_id": word,
                        "start": s,
                        "end": e,
                        "probs": probs[t],
                        "label": id2label[int(best_ids[t])],
                        "score": float(best_scores[t]),
                        # the token ("##ing"); an unknown token shows the text it stands for
                        "word": text[s:e] if enc.ids[t] == unk else enc.tokens[t],
                    }
                )
        if strategy == "none":
            entities = [
                {
                    "entity": tok["label"],
                    "score": tok["score"],
                    "index": tok["index"],
                    "word": tok["word"],
                    "start": tok["start"],
                    "end": tok["end"],
                }
                for tok in tokens
            ]
        else:
            units = tokens if strategy == "simple" else self._words(tokens, strategy, id2label)
            entities = self._group(units, text)
        key = "entity" if strategy == "none" else "entity_group"
        return [ent for ent in entities if ent[key] not in opts["ignore_labels"]]

    @staticmethod
    def _words(tokens: list[dict[str, Any]], strategy: str, id2label: dict[int, str]) -> list[dict[str, Any]]:
        """One unit per word: its tokens agree on the label chosen by `strategy`."""
        words: list[list[dict[str, Any]]] = []
        for tok in tokens:
            if words and tok["word_id"] is not None and tok["word_id"] == words[-1][-1]["word_id"]:
                words[-1].append(tok)
            else:
                words.append([tok])
        units = []
        for members in words:
            if strategy == "first":
                probs = members[0]["probs"]
            elif strategy == "max":
                probs = max(members, key=lambda m: m["score"])["probs"]
            else:  # average
                probs = torch.stack([m["probs"] for m in members]).mean(0)
            score, label = probs.max(-1)
            units.append(
                {
                    "label": id2label[int(label)],
                    "score": float(score),
                    "start": members[0]["start"],
                    "end": members[-1]["end"],
                }
            )
        return units

    @staticmethod
    def _group(units: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        """Adjacent units with the same tag become one entity, unless the next one begins (B-) a new one."""
        groups: list[list[dict[str, Any]]] = []
        for unit in units:
            prefix, tag = split_tag(unit["label"])
            if groups and prefix != "B" and split_tag(groups[-1][-1]["label"])[1] == tag:
                groups[-1].append(unit)
            else:
                groups.append([unit])
        entities = []
        for members in groups:
            start, end = members[0]["start"], members[-1]["end"]
            entities.append(
                {
                    "entity_group": split_tag(members[0]["label"])[1],
                    "score": sum(m["score"] for m in members) / len(members),
                    "word": text[start:end],
                    "start": start,
                    "end": end,
                }
            )
        return entities
