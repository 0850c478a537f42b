"""text-classification (alias sentiment-analysis): labels and scores for texts or text pairs.

    "great film"                                 -> [{"label": "positive", "score": 0.98}]
    ["great film", "dull"]                       -> [{"label": ...}, {"label": ...}]     (one dict per text)
    {"text": a, "text_pair": b}                  -> a pair, encoded as one sequence ([CLS] a [SEP] b [SEP]);
                                                    alone it gives the dict itself, as in transformers
    top_k=2 / top_k=None                         -> the 2 best / all labels, best first, a list per text

Scores are softmax, sigmoid or the raw logits, chosen by `config.problem_type` as transformers does
(override with `function_to_apply`).
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.models.bert import BertForSequenceClassification
from lmforge.models.gpt import GPTForSequenceClassification
from lmforge.pipelines.base import Feature, Pipeline, check_model_kind

FUNCTIONS = ("softmax", "sigmoid", "none")
_LEGACY = "legacy"  # top_k not given: one dict per text, as transformers returns by default


class TextClassificationPipeline(Pipeline):
    """Classify texts (or text pairs) with a sequence-classification model: BERT (pooled [CLS]) or GPT
    (the last real token).

    Options: `top_k` (default: the best label as one dict; an int: that many labels, best first; None:
    every label), `function_to_apply` ("softmax" | "sigmoid" | "none"; default from
    `config.problem_type`), `truncation` (default True: longer inputs are cut to the model's length with
    a warning; False: a ValueError), `max_length`.
    """

    task = "text-classification"
    single_types = (str, dict)

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["BertForSequenceClassification", "GPTForSequenceClassification"],
            lambda m: isinstance(m, (BertForSequenceClassification, GPTForSequenceClassification)),
            "load it with AutoModelForSequenceClassification.from_pretrained(path)",
        )

    def _input_kinds(self) -> str:
        return 'a str or a {"text": ..., "text_pair": ...} dict'

    def _options(
        self,
        top_k: int | None | str = _LEGACY,
        function_to_apply: str | None = None,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        if (
            top_k is not None
            and top_k != _LEGACY
            and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1)
        ):
            raise ValueError(f"top_k must be a positive integer or None (every label), got {top_k!r}")
        if function_to_apply is not None:
            if not isinstance(function_to_apply, str) or function_to_apply.lower() not in FUNCTIONS:
                raise ValueError(f"function_to_apply must be one of {FUNCTIONS}, got {function_to_apply!r}")
            function_to_apply = function_to_apply.lower()
        return {
            "top_k": top_k,
            "function_to_apply": function_to_apply or self._default_function(),
            "truncation": bool(truncation),
            "max_length": self._limit(max_length),
        }

    def _default_function(self) -> str:
        """transformers' rule: regression -> none; multi-label or one output -> sigmoid; else softmax."""
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        texts: list[str] = []
        pairs: list[str | None] = []
        for k, item in enumerate(items):
            index = start + k
            if isinstance(item, dict):
                unknown = sorted(set(item) - {"text", "text_pair"})
                if "text" not in item or unknown:
                    raise ValueError(
                        f"{self.task}: input {index} is a dict with keys {sorted(item)}; a text pair is "
                        '{"text": first, "text_pair": second}'
                    )
                texts.append(self._check_text(item["text"], index))
                pair = item.get("text_pair")
                pairs.append(None if pair is None else self._check_text(pair, index, what="text_pair of input"))
            else:
                texts.append(self._check_text(item, index))
                pairs.append(None)
        encodings: list[Any] = [None] * len(items)
        singles = [k for k, p in enumerate(pairs) if p is None]
        doubles = [k for k, p in enumerate(pairs) if p is not None]
        for group, with_pairs in ((singles, False), (doubles, True)):
            if group:
                encoded = self._encode(
                    [texts[k] for k in group],
                    [pairs[k] for k in group] if with_pairs else None,
                    [start + k for k in group],
                    opts["max_length"],
                    opts["truncation"],
                )
                for k, enc in zip(group, encoded):
                    encodings[k] = enc
        return [Feature([self._row(enc)]) for enc in encodings]

    def _batches(self, rows: list[dict[str, Any]], batch_size: int, opts: dict[str, Any]) -> list[list[int]]:
        if getattr(self.model.config, "pad_token_id", None) is None and not hasattr(self.model, "bert"):
            # GPT finds each row's last token by the pad id: without one, rows must run alone
            return [[i] for i in range(len(rows))]
        return super()._batches(rows, batch_size, opts)

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[torch.Tensor]:
        pad = getattr(self.model.config, "pad_token_id", None)  # GPT: the id its head treats as padding
        batch = self._collate(rows, pad_id=pad)
        logits = self.model(**self._model_inputs(batch)).logits  # (B, num_labels)
        return list(logits.float().cpu())

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        logits = outputs[0]  # (num_labels,)
        function = opts["function_to_apply"]
        scores = (
            logits.softmax(-1) if function == "softmax" else logits.sigmoid() if function == "sigmoid" else logits
        ).tolist()
        id2label = self.model.config.id2label
        top_k = opts["top_k"]
        if top_k == _LEGACY:
            best = max(range(len(scores)), key=scores.__getitem__)
            return {"label": id2label[best], "score": scores[best]}
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [{"label": id2label[i], "score": scores[i]} for i in ranked[:top_k]]

    def _single_result(self, result: Any, item: Any, opts: dict[str, Any]) -> Any:
        # as in transformers: one text gives [{"label", "score"}] by default (a pair dict: the dict itself)
        return [result] if opts["top_k"] == _LEGACY and isinstance(item, str) else result
