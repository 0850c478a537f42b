"""Auto classes and Hugging Face's familiar names: dispatch on `model_type` in config.json.

    from lmforge import AutoTokenizer, AutoModelForCausalLM   # was: from transformers import ...
    tok = AutoTokenizer.from_pretrained("runs/shakespeare")
    model = AutoModelForCausalLM.from_pretrained("runs/shakespeare")

Families register here, one entry per table.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

# model_type in config.json -> "module:Class"
CONFIGS = {"gpt2": "lmforge.config:GPTConfig", "lmforge-gpt": "lmforge.config:GPTConfig",
           "bert": "lmforge.config:BertConfig"}
CAUSAL_LM = {"gpt2": "lmforge.models.gpt:GPTForCausalLM", "lmforge-gpt": "lmforge.models.gpt:GPTForCausalLM"}
SEQUENCE_CLASSIFICATION = {"gpt2": "lmforge.models.gpt:GPTForSequenceClassification",
                           "lmforge-gpt": "lmforge.models.gpt:GPTForSequenceClassification",
                           "bert": "lmforge.models.bert:BertForSequenceClassification"}
BASE_MODEL = {"bert": "lmforge.models.bert:BertModel"}
MASKED_LM = {"bert": "lmforge.models.bert:BertForMaskedLM"}
PRETRAINING = {"bert": "lmforge.models.bert:BertForPreTraining"}
TOKEN_CLASSIFICATION = {"bert": "lmforge.models.bert:BertForTokenClassification"}
QUESTION_ANSWERING = {"bert": "lmforge.models.bert:BertForQuestionAnswering"}


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def model_type_of(name_or_path: str | os.PathLike) -> str:
    """The `model_type` of a model directory (or cached model id)."""
    from lmforge.hub import resolve_model_dir

    directory = resolve_model_dir(name_or_path)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'} is not valid JSON ({e})") from None
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(f"{directory / 'config.json'} has no model_type; lmforge cannot tell which model it is")
    return model_type


def _dispatch(table: dict[str, str], model_type: str, what: str) -> Any:
    try:
        return _load(table[model_type])
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported by {what}; lmforge supports "
                         f"{sorted(table)}") from None


class AutoConfig:
    """`AutoConfig.from_pretrained(path)` -> the config class that matches model_type."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        from lmforge.hub import resolve_model_dir

        cls = _dispatch(CONFIGS, model_type_of(name_or_path), "AutoConfig")
        config = cls.from_pretrained(resolve_model_dir(name_or_path))
        for key in kwargs:
            if not hasattr(config, key):
                raise TypeError(f"{cls.__name__} has no option {key!r}")
        return config.updated(**kwargs) if kwargs else config  # num_labels=3 brings a 3-entry label map


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path)` -> lmforge's Tokenizer for the directory's files."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(name_or_path)  # a folder or a cached model id
        for key in ("padding_side", "model_max_length"):
            if key in kwargs:
                setattr(tokenizer, key, kwargs.pop(key))
        if kwargs:
            raise TypeError(f"AutoTokenizer.from_pretrained got unknown option(s) {sorted(kwargs)}")
        return tokenizer


class _AutoModel:
    """Picks the class for a task from `model_type`; subclasses name their table."""

    table: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        return _dispatch(cls.table, model_type_of(name_or_path), cls.__name__).from_pretrained(name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any) -> Any:
        return _dispatch(cls.table, type(config).model_type, cls.__name__)(config)


class AutoModelForCausalLM(_AutoModel):
    """`AutoModelForCausalLM.from_pretrained(path)` / `.from_config(config)` for decoder models."""

    table = CAUSAL_LM


class AutoModelForSequenceClassification(_AutoModel):
    """`AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)`: a classifier on the
    directory's trunk (its head is freshly initialised, with a warning, when the checkpoint has none or
    one of another size)."""

    table = SEQUENCE_CLASSIFICATION


class AutoModel(_AutoModel):
    """`AutoModel.from_pretrained(path)`: the bare trunk (hidden states; BERT's pooled output too)."""

    table = BASE_MODEL


class AutoModelForMaskedLM(_AutoModel):
    """`AutoModelForMaskedLM.from_pretrained(path)` for fill-in-the-mask encoders."""

    table = MASKED_LM


class AutoModelForPreTraining(_AutoModel):
    """`AutoModelForPreTraining.from_pretrained(path)`: the model with its pretraining heads."""

    table = PRETRAINING


class AutoModelForTokenClassification(_AutoModel):
    """`AutoModelForTokenClassification.from_pretrained(path, num_labels=9)`: a label per token."""

    table = TOKEN_CLASSIFICATION


class AutoModelForQuestionAnswering(_AutoModel):
    """`AutoModelForQuestionAnswering.from_pretrained(path)`: answer-span start/end logits."""

    table = QUESTION_ANSWERING
