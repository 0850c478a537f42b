"""Auto classes and Hugging Face's familiar names: dispatch on `model_type` in config.json.

    from lmforge import AutoTokenizer, AutoModelForCausalLM   # was: from transformers import ...
    tok = AutoTokenizer.from_pretrained("runs/shakespeare")
    model = AutoModelForCausalLM.from_pretrained("runs/shakespeare")

Families register their classes in their own files (`lmforge.models.registry`); nothing here names one.
"""

from __future__ import annotations

import os
from typing import Any

from lmforge.hub import read_config_dict, resolve_model_dir
from lmforge.models import registry  # importing lmforge.models imports every family, which fills the registry
from lmforge.tokenizer import MarianTokenizer, Tokenizer
from lmforge.tokenizer.layout import resolve_tokenizer_path
from lmforge.tokenizer.marian import is_marian_dir


def model_type_of(name_or_path: str | os.PathLike) -> str:
    """The `model_type` of a model directory (or cached model id)."""
    directory = resolve_model_dir(name_or_path)
    model_type = read_config_dict(directory).get("model_type")
    if not model_type:
        raise ValueError(f"{directory / 'config.json'} has no model_type; lmforge cannot tell which model it is")
    return model_type


class AutoConfig:
    """`AutoConfig.from_pretrained(path)` -> the config class that matches model_type."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        cls = registry.config_class(model_type_of(name_or_path), "AutoConfig")
        config = cls.from_pretrained(resolve_model_dir(name_or_path))
        for key in kwargs:
            if not hasattr(config, key):
                raise TypeError(f"{cls.__name__} has no option {key!r}")
        return config.updated(**kwargs) if kwargs else config  # num_labels=3 brings a 3-entry label map


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path)` -> lmforge's Tokenizer for the directory's files (a MarianTokenizer
    for Marian's SentencePiece files)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        path = resolve_tokenizer_path(name_or_path)  # a folder, a file in one, or a cached model id
        tokenizer_class = MarianTokenizer if path.is_dir() and is_marian_dir(path) else Tokenizer
        tokenizer = tokenizer_class.from_pretrained(path)
        for key in ("padding_side", "model_max_length"):
            if key in kwargs:
                setattr(tokenizer, key, kwargs.pop(key))
        if kwargs:
            raise TypeError(f"AutoTokenizer.from_pretrained got unknown option(s) {sorted(kwargs)}")
        return tokenizer


class _AutoModel:
    """Picks the class for a task from `model_type`; subclasses name their task (the name families register under)."""

    task: str

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        model_class = registry.model_class(cls.task, model_type_of(name_or_path), cls.__name__)
        return model_class.from_pretrained(name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any) -> Any:
        return registry.model_class(cls.task, type(config).model_type, cls.__name__)(config)


class AutoModelForCausalLM(_AutoModel):
    """`AutoModelForCausalLM.from_pretrained(path)` / `.from_config(config)` for decoder models."""

    task = "causal-lm"


class AutoModelForSequenceClassification(_AutoModel):
    """`AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)`: a classifier on the
    directory's trunk (its head is freshly initialised, with a warning, when the checkpoint has none or
    one of another size)."""

    task = "sequence-classification"


class AutoModel(_AutoModel):
    """`AutoModel.from_pretrained(path)`: the bare trunk (hidden states; BERT's pooled output too)."""

    task = "base-model"


class AutoModelForMaskedLM(_AutoModel):
    """`AutoModelForMaskedLM.from_pretrained(path)` for fill-in-the-mask encoders."""

    task = "masked-lm"


class AutoModelForPreTraining(_AutoModel):
    """`AutoModelForPreTraining.from_pretrained(path)`: the model with its pretraining heads."""

    task = "pretraining"


class AutoModelForTokenClassification(_AutoModel):
    """`AutoModelForTokenClassification.from_pretrained(path, num_labels=9)`: a label per token."""

    task = "token-classification"


class AutoModelForQuestionAnswering(_AutoModel):
    """`AutoModelForQuestionAnswering.from_pretrained(path)`: answer-span start/end logits."""

    task = "question-answering"


class AutoModelForSeq2SeqLM(_AutoModel):
    """`AutoModelForSeq2SeqLM.from_pretrained(path)` for encoder-decoders (Marian, BART)."""

    task = "seq2seq-lm"


class AutoModelForCTC(_AutoModel):
    """`AutoModelForCTC.from_pretrained(path)` for speech encoders with a CTC head (`lmforge speech train`)."""

    task = "speech-ctc"


class AutoModelForSpeechSeq2Seq(_AutoModel):
    """`AutoModelForSpeechSeq2Seq.from_pretrained(path)` for speech recognisers that read audio features and write
    text (Whisper)."""

    task = "speech-seq2seq"
