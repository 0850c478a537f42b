"""fill-mask: the most likely tokens for each mask token of a text.

    "Paris is the [MASK] of France."  -> [{"score", "token", "token_str", "sequence"}, ...]   (top_k of them)
    "[MASK] is the [MASK] of France." -> [[...], [...]]                                   (a list per mask)
    a list of texts                   -> a list of those

`targets=[...]` scores only those words (a word missing from the vocabulary is replaced by its first
token, with a warning). Probabilities are a softmax over the whole vocabulary, as in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.pipelines.base import Feature, Pipeline, check_model_kind, warn


class FillMaskPipeline(Pipeline):
    """Predict the masked tokens with a masked-LM (BertForMaskedLM / BertForPreTraining).

    Options: `top_k` (default 5), `targets` (a word or list of words to choose from), `truncation`,
    `max_length`.
    """

    task = "fill-mask"

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["a masked language model (BertForMaskedLM)"],
            lambda m: hasattr(m, "lm_head") and hasattr(m, "bert"),
            "load it with AutoModelForMaskedLM.from_pretrained(path)",
        )

    def _options(
        self,
        top_k: int = 5,
        targets: str | list[str] | None = None,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        if self.tokenizer.mask_token_id is None:
            raise ValueError(
                "fill-mask needs a tokenizer with a mask token (tokenizer.mask_token is None); set one, "
                'e.g. tokenizer.mask_token = "[MASK]"'
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        target_ids = None if targets is None else self._target_ids(targets)
        return {
            "top_k": top_k,
            "target_ids": target_ids,
            "truncation": bool(truncation),
            "max_length": self._limit(max_length),
        }

    def _target_ids(self, targets: str | list[str]) -> torch.Tensor:
        """Vocabulary ids of the target words (a word not in the vocabulary: its first token)."""
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a str or a list of str, got {targets!r}")
        vocab = self.tokenizer.get_vocab()
        ids: list[int] = []
        for target in targets:
            if target in vocab:
                ids.append(vocab[target])
                continue
            pieces = self.tokenizer.encode(target)
            if not pieces:
                warn(f"fill-mask: target {target!r} gives no token; it is ignored")
                continue
            token = self.tokenizer.convert_ids_to_tokens(pieces[0])
            warn(f"fill-mask: target {target!r} is not in the vocabulary; using its first token {token!r}")
            ids.append(pieces[0])
        ids = sorted(set(ids))
        if not ids:
            raise ValueError(f"none of the targets {list(targets)} gives a token; pass words of the vocabulary")
        return torch.tensor(ids)

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        indices = list(range(start, start + len(items)))
        texts = [self._check_text(item, i) for i, item in zip(indices, items)]
        mask_id = self.tokenizer.mask_token_id
        features = []
        for index, text, enc in zip(
            indices, texts, self._encode(texts, None, indices, opts["max_length"], opts["truncation"])
        ):
            positions = [t for t, token in enumerate(enc.ids) if token == mask_id]
            if not positions:
                cut = " after truncation" if enc.overflowing else ""
                raise ValueError(
                    f"fill-mask: input {index} ({text[:40]!r}) has no mask token "
                    f"{self.tokenizer.mask_token!r}{cut}; put it where the word to predict goes"
                )
            features.append(Feature([{**self._row(enc), "mask_positions": positions}], {"ids": list(enc.ids)}))
        return features

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[torch.Tensor]:
        batch = self._collate(rows)
        hidden = self.model.bert(**self._model_inputs(batch)).last_hidden_state  # (B, T, C)
        rows_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r["mask_positions"]], device=hidden.device)
        cols_idx = torch.tensor([t for r in rows for t in r["mask_positions"]], device=hidden.device)
        logits = self.model.lm_head(hidden[rows_idx, cols_idx])  # (masks, V): the vocabulary only where needed
        probs = logits.float().softmax(-1).cpu()
        counts = [len(r["mask_positions"]) for r in rows]
        return list(probs.split(counts))  # per row: (n_masks, V)

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        probs = outputs[0]  # (n_masks, V)
        ids = feature.meta["ids"]
        positions = feature.rows[0]["mask_positions"]
        target_ids = opts["target_ids"]
        if target_ids is not None:
            probs = probs[:, target_ids]  # (n_masks, n_targets)
        k = min(opts["top_k"], probs.size(-1))
        values, best = probs.topk(k, dim=-1)  # (n_masks, k)
        single = len(positions) == 1
        results = []
        for m, position in enumerate(positions):
            row = []
            for score, choice in zip(values[m].tolist(), best[m].tolist()):
                token = int(target_ids[choice]) if target_ids is not None else choice
                filled = list(ids)
                filled[position] = token
                # one mask: readable text without [CLS]/[SEP]; several: keep the other masks visible
                sequence = self.tokenizer.decode(filled, skip_special_tokens=single)
                row.append(
                    {"score": score, "token": token, "token_str": self.tokenizer.decode([token]), "sequence": sequence}
                )
            results.append(row)
        return results[0] if single else results
