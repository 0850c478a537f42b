"""text2text-generation, translation, summarization: an encoder-decoder turns each input text into a new one.

    "In the beginning God created the heaven and the earth."
        -> [{"translation_text": "En el principio creó Dios los cielos y la tierra."}]
    a list of texts -> a list of those (num_return_sequences dicts each)

The source is encoded once per input and the decoder generates with any option of `lmforge.generation`:
greedy (the default), beam search (`num_beams`, `length_penalty`, `early_stopping`, `no_repeat_ngram_size`,
`num_return_sequences`) or sampling (`do_sample`, `temperature`, `top_k`, `top_p`, `seed`). Sources are
batched by length and right-padded (the encoder masks the padding), so a text translates the same alone
or in a batch, up to float rounding.

A source longer than the model's position table is an error (`truncation=True` cuts it to fit, with a
warning). `translation_en_to_es`-style task names are checked against the language pair the model was
trained on, when its config records one (`config.json`'s "source_lang" / "target_lang", which
lmforge's translation recipe writes).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch

from lmforge.constants import context_length
from lmforge.generation import GenerationConfig
from lmforge.pipelines.base import Feature, Pipeline, check_model_kind, describe, index_list, warn

DEFAULT_MAX_NEW_TOKENS = 256
_TRANSLATION_TASK = re.compile(r"^translation_([A-Za-z_-]+?)_to_([A-Za-z_-]+)$")


def translation_languages(task: str) -> tuple[str, str] | None:
    """("en", "es") for "translation_en_to_es"; None for plain "translation"; ValueError for a malformed name."""
    if task == "translation":
        return None
    match = _TRANSLATION_TASK.match(task)
    if not match:
        raise ValueError(
            f"task {task!r}: a translation task is 'translation' or 'translation_XX_to_YY' (e.g. translation_en_to_es)"
        )
    return match.group(1), match.group(2)


def model_languages(model: Any) -> tuple[str, str] | None:
    """The (source, target) language pair a model's config records, or None when it says nothing."""
    extra = getattr(getattr(model, "config", None), "extra", None) or {}
    source, target = extra.get("source_lang"), extra.get("target_lang")
    return (source, target) if source and target else None


class Text2TextGenerationPipeline(Pipeline):
    """Generate a new text from each input text with an encoder-decoder (Seq2SeqForConditionalGeneration,
    MarianMTModel, BartForConditionalGeneration).

    Options: `max_new_tokens` (256, or fewer when the decoder has fewer positions), `min_new_tokens`,
    `num_beams` (1), `length_penalty`, `early_stopping`, `no_repeat_ngram_size`, `num_return_sequences`,
    `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`, `seed`, `generation_config`,
    `prefix` (text put in front of every input, for models trained with a task prefix), `truncation`
    (False: an over-long source is an error), `return_tensors` (True: `{"generated_token_ids": ids}`, or
    `translation_token_ids` / `summary_token_ids`: the new ids up to the end token, instead of text),
    `skip_special_tokens` (True).
    """

    task: ClassVar[str] = "text2text-generation"
    result_key: ClassVar[str] = "generated_text"

    def __init__(self, model: Any, tokenizer: Any = None, task: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if task is not None:
            self.task = task  # e.g. translation_en_to_es: the name errors use

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["an encoder-decoder model (Seq2SeqForConditionalGeneration, MarianMTModel, BartForConditionalGeneration)"],
            lambda m: bool(getattr(getattr(m, "config", None), "is_encoder_decoder", False)),
            "load it with AutoModelForSeq2SeqLM.from_pretrained(path); for a causal LM use text-generation",
        )

    def _options(
        self,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        no_repeat_ngram_size: int | None = None,
        num_return_sequences: int = 1,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        generation_config: Any = None,
        prefix: str = "",
        truncation: bool = False,
        return_tensors: bool = False,
        skip_special_tokens: bool = True,
    ) -> dict[str, Any]:
        if max_new_tokens is None and generation_config is None:  # as long as the decoder's positions allow
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, context_length(self.model.config, 1 << 30) - 1)
        cfg = (generation_config or GenerationConfig()).updated(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_return_sequences=num_return_sequences,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self._pad_id()
        cfg.validate()
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        return {
            "config": cfg,
            "prefix": prefix,
            "truncation": bool(truncation),
            "return_tensors": bool(return_tensors),
            "skip_special_tokens": bool(skip_special_tokens),
        }

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        texts = [opts["prefix"] + self._check_text(item, start + k, what="source") for k, item in enumerate(items)]
        encoded = self.tokenizer(texts)["input_ids"]  # each ends in </s> (Marian's and lmforge's seq2seq tokenizers)
        limit = self.model_max_length()
        cut = [start + k for k, ids in enumerate(encoded) if len(ids) > limit]
        if cut and not opts["truncation"]:
            raise ValueError(
                f"{self.task}: input {index_list(cut)} is longer than {limit} tokens (the model's limit); "
                "shorten it, or pass truncation=True to cut it to fit"
            )
        if cut:
            warn(
                f"{self.task}: input {index_list(cut)} is longer than {limit} tokens (the model's limit) and was "
                f"truncated to {limit}; pass truncation=False to get an error instead"
            )
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for k, ids in enumerate(encoded):
            if all(t in special for t in ids):
                raise ValueError(
                    f"{self.task}: source {start + k} ({describe(texts[k])}) gives no tokens; give it text"
                )
        # an over-long source keeps its first limit - 1 tokens and its end token
        return [
            Feature([{"input_ids": list(ids) if len(ids) <= limit else ids[: limit - 1] + ids[-1:]}]) for ids in encoded
        ]

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[Any]:
        batch = self._collate(rows)
        cfg = opts["config"]
        generator = None
        if cfg.seed is not None and not cfg.greedy:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        out = self.model.generate(
            batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            generation_config=dataclasses.replace(cfg, seed=None),
            generator=generator,
        )  # (B * R, 1 + n): the decoder start, then the new tokens
        per_row = cfg.num_return_sequences
        eos = self._eos_ids()
        sequences = [self._cut(ids[1:].tolist(), eos) for ids in out.cpu()]
        return [sequences[i * per_row : (i + 1) * per_row] for i in range(len(rows))]

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        (sequences,) = outputs
        if opts["return_tensors"]:
            return [{self.result_key.replace("_text", "_token_ids"): ids} for ids in sequences]
        skip = opts["skip_special_tokens"]
        return [{self.result_key: self.tokenizer.decode(ids, skip_special_tokens=skip).strip()} for ids in sequences]

    # ------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.config, "eos_token_id", None)
        return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def _cut(self, ids: list[int], eos: set[int]) -> list[int]:
        """New token ids up to (not including) the first end token; padding after it goes too."""
        for i, t in enumerate(ids):
            if t in eos:
                return ids[:i]
        return ids


class TranslationPipeline(Text2TextGenerationPipeline):
    """Translate: `{"translation_text": ...}` per input. `pipeline("translation_en_to_es", model=...)` checks
    the pair against the one the model records (config "source_lang" / "target_lang")."""

    task: ClassVar[str] = "translation"
    result_key: ClassVar[str] = "translation_text"

    def __init__(self, model: Any, tokenizer: Any = None, task: str | None = None, **kwargs: Any) -> None:
        wanted = translation_languages(task or "translation")
        known = model_languages(model)
        if wanted and known and tuple(wanted) != tuple(known):
            raise ValueError(
                f"task {task!r} asks for {wanted[0]} -> {wanted[1]}, but this model translates {known[0]} -> "
                f"{known[1]}; use task 'translation_{known[0]}_to_{known[1]}' (or plain 'translation'), or a "
                f"model trained for {wanted[0]} -> {wanted[1]}"
            )
        super().__init__(model, tokenizer, task=task, **kwargs)


class SummarizationPipeline(Text2TextGenerationPipeline):
    """Summarise: `{"summary_text": ...}` per input document."""

    task: ClassVar[str] = "summarization"
    result_key: ClassVar[str] = "summary_text"
