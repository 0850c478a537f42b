"""feature-extraction and sentence-embeddings: the encoder's vectors for texts.

    feature-extraction:   "a text" -> [[[h_0], [h_1], ..., [h_T-1]]]  (1, T, C) nested lists, [CLS]/[SEP] included
    sentence-embeddings:  "a text" -> [v_0, ..., v_C-1]                (C,): pooled (mean or [CLS]), unit length
    a list of texts       -> a list of those;  return_tensors=True -> torch tensors of the same shapes

Mean pooling averages the real tokens (special tokens included, padding excluded) and `normalize`
scales to unit length: exactly sentence-transformers' Transformer -> Pooling(mean) -> Normalize, so
all-MiniLM-L6-v2's vectors equal `SentenceTransformer(dir).encode(texts)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.pipelines.base import Feature, Pipeline

POOLINGS = ("mean", "cls")


def sentence_transformers_options(directory: Path) -> dict[str, Any]:
    """Pooling, normalization and length from a sentence-transformers folder (modules.json & co), if any."""
    options: dict[str, Any] = {}
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        config = json.loads((directory / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return options
    if isinstance(config.get("max_seq_length"), int):
        options["max_length"] = config["max_seq_length"]
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
    options["normalize"] = "Normalize" in types
    if "Pooling" in types:
        try:
            pooling = json.loads((directory / types["Pooling"] / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pooling = {}
        if pooling.get("pooling_mode_cls_token"):
            options["pooling"] = "cls"
        elif pooling.get("pooling_mode_mean_tokens"):
            options["pooling"] = "mean"
    return options


def trunk(model: Any) -> Any:
    """The encoder of a model: BertModel / GPTModel themselves, or the `bert` / `transformer` of a head."""
    for name in ("bert", "transformer"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


class FeatureExtractionPipeline(Pipeline):
    """Hidden states of an encoder (BertModel, any BERT head's trunk, GPTModel), per token or pooled.

    Options: `pooling` (None: token features; "mean" or "cls": one vector per text), `normalize`
    (unit-length vectors; default False), `return_tensors` (tensors instead of lists), `truncation`
    (default True: cut to `max_length` with a warning), `max_length` (default: the model's length).
    """

    task = "feature-extraction"

    def __init__(
        self, model: Any, tokenizer: Any = None, device: Any = None, batch_size: int = 8, **options: Any
    ) -> None:
        super().__init__(trunk(model), tokenizer, device, batch_size, **options)
        if options.get("pooling") is not None:
            self.task = "sentence-embeddings"

    def _check_model(self, model: Any) -> None:
        if not hasattr(model, "config") or not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"the {self.task} pipeline needs a lmforge encoder (BertModel, a BERT head, GPTModel), "
                f"got {type(model).__name__}"
            )

    def _options(
        self,
        pooling: str | None = None,
        normalize: bool = False,
        return_tensors: bool = False,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be None (token features), 'mean' or 'cls', got {pooling!r}")
        if normalize and pooling is None:
            raise ValueError("normalize=True needs pooled vectors: pass pooling='mean' or 'cls'")
        return {
            "pooling": pooling,
            "normalize": bool(normalize),
            "return_tensors": bool(return_tensors),
            "truncation": bool(truncation),
            "max_length": self._limit(max_length),
        }

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        indices = list(range(start, start + len(items)))
        texts = [self._check_text(item, i) for i, item in zip(indices, items)]
        encodings = self._encode(texts, None, indices, opts["max_length"], opts["truncation"])
        return [Feature([self._row(enc)]) for enc in encodings]

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[torch.Tensor]:
        batch = self._collate(rows)
        hidden = self.model(**self._model_inputs(batch)).last_hidden_state.float()  # (B, T, C)
        pooling = opts["pooling"]
        if pooling is None:
            return [h[: len(r["input_ids"])].cpu() for h, r in zip(hidden, rows)]  # per row (T_i, C)
        if pooling == "cls":
            vectors = hidden[:, 0]  # (B, C)
        else:
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
        if opts["normalize"]:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return list(vectors.cpu())

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        values = outputs[0]  # (T, C) token features or (C,) a sentence vector
        if opts["pooling"] is None:
            values = values.unsqueeze(0)  # (1, T, C), as transformers returns it
        if opts["return_tensors"]:
            return values.clone()  # an ordinary tensor (not an inference-mode one)
        return values.tolist()
