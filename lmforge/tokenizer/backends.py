"""The ``tokenizers`` pipelines lmforge builds, and the parts a :class:`~lmforge.tokenizer.Tokenizer` is made of.

A pipeline (the *backend*) is normalizer -> pre-tokenizer -> model -> post-processor, with a decoder for the way
back. Two are built here, each the way Hugging Face builds it so ids match: GPT-2's byte-level BPE and BERT's
WordPiece; plus the post-processor templates that add special tokens (BERT's ``[CLS] A [SEP]``, a config's
``add_bos_token`` / ``add_eos_token``). Training (``train.py``) and the legacy-file readers (``legacy.py``) fill
these pipelines with a vocabulary; both hand back :class:`TokenizerParts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

#: The inputs a BERT-style tokenizer returns: segment ids too, as transformers' ``BertTokenizer`` does.
BERT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class TokenizerParts:
    """Everything ``Tokenizer(...)`` is built from: the backend, ``{role: token}``, the role-less special tokens
    and the other constructor settings (``model_max_length``, ``padding_side``, ``model_input_names``)."""

    backend: BackendTokenizer
    special_tokens: Mapping[str, str | None]
    additional_special_tokens: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def byte_level_bpe_backend(model: models.BPE | None = None, add_prefix_space: bool = False) -> BackendTokenizer:
    """GPT-2's byte-level BPE pipeline (no normalizer: lossless) around ``model`` (default: an untrained BPE, for
    training): GPT-2's regex pre-tokenizer, every byte one of 256 symbols, the byte-level decoder."""
    backend = BackendTokenizer(models.BPE() if model is None else model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets include its leading space, so the offsets of
    # consecutive tokens tile the input text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def bert_wordpiece_backend(
    model: models.WordPiece,
    *,
    lowercase: bool,
    strip_accents: bool | None,
    handle_chinese_chars: bool,
) -> BackendTokenizer:
    """BERT's pipeline around a WordPiece ``model``: clean-text normalizer (spaces around CJK characters, optional
    lowercasing; accents stripped when ``strip_accents`` or, if None, when lowercasing), BERT's pre-tokenizer and
    the ``##``-joining decoder. The post-processor is set by the caller (:func:`bert_template`) once the special
    tokens have ids."""
    backend = BackendTokenizer(model)
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=handle_chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def bert_template(backend: BackendTokenizer, cls_token: str, sep_token: str) -> processors.TemplateProcessing:
    """BERT's post-processor: ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``, segment ids 0 for the first part
    and 1 for ``B [SEP]``."""
    return processors.TemplateProcessing(
        single=[f"{cls_token}:0", "$A:0", f"{sep_token}:0"],
        pair=[f"{cls_token}:0", "$A:0", f"{sep_token}:0", "$B:1", f"{sep_token}:1"],
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys((cls_token, sep_token))],
    )


def bos_eos_template(backend: BackendTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """The post-processor Hugging Face builds for ``add_bos_token`` / ``add_eos_token``: ``bos A eos`` for one
    sequence, ``bos A eos bos B eos`` for a pair."""
    # pieces as a list (not one space-separated string): a token may contain spaces
    single = [*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])]
    second = [*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    tokens = {t: backend.token_to_id(t) for t in (bos, eos) if t is not None}
    return processors.TemplateProcessing(single=single, pair=single + second, special_tokens=list(tokens.items()))
