"""Marian's tokenizer: two SentencePiece models (``source.spm`` for the inputs, ``target.spm`` for the labels) over
one shared id table (``vocab.json``), as in the Marian / OPUS-MT checkpoints.

SentencePiece splits a text into pieces; ``vocab.json`` gives each piece its id (a piece it lacks becomes
``<unk>``); ``</s>`` is appended to every sequence. Special tokens written in the text are matched whole, and a
leading language code such as ``>>es<<`` is one token. Decoding joins the pieces back with the source model, each
special token followed by a space, as transformers' ``MarianTokenizer`` does, so ids and texts match it.
The batching (padding, truncation, tensors) is the one :class:`~lmforge.tokenizer.Tokenizer` uses (``batch.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece

from lmforge.constants import NO_LENGTH_LIMIT
from lmforge.files import atomic_write_bytes, atomic_write_text
from lmforge.tokenizer.batch import (
    BatchEncoding,
    PaddingSide,
    as_id_list,
    as_id_rows,
    as_text_list,
    check_return_tensors,
    pack_batch,
    padding_mode,
    truncation_mode,
)
from lmforge.tokenizer.layout import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    LegacyVocab,
    legacy_vocab_of,
    read_json,
    resolve_tokenizer_path,
    token_content,
)

SOURCE_SPM_FILE = "source.spm"
TARGET_SPM_FILE = "target.spm"
VOCAB_FILE = "vocab.json"
#: transformers' default for Marian checkpoints whose config names no length
MARIAN_MAX_LENGTH = 512
SPIECE_UNDERLINE = "▁"  # SentencePiece's word-start mark


def is_marian_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a Marian tokenizer: its config names ``MarianTokenizer``, or it has no
    tokenizer.json but a ``source.spm``."""
    if legacy_vocab_of(read_json(directory / CONFIG_FILE)) is LegacyVocab.MARIAN_SPM:
        return True
    return not (directory / TOKENIZER_FILE).is_file() and (directory / SOURCE_SPM_FILE).is_file()


class MarianTokenizer(PaddingSide):
    """Marian's SentencePiece tokenizer with the Hugging Face-shaped API of :class:`~lmforge.tokenizer.Tokenizer`.

    Args:
        source_spm, target_spm: the serialized SentencePiece models (the bytes of ``source.spm`` / ``target.spm``).
        vocab: ``{piece: id}`` shared by both sides; must hold the special tokens.
        eos_token, unk_token, pad_token: Marian's special tokens.
        additional_special_tokens: further tokens matched whole in the text and dropped by ``skip_special_tokens``.
        model_max_length: the length ``truncation=True`` cuts to without ``max_length``.
        padding_side: "right" (default) or "left".
        source_lang, target_lang: kept for the config file only.
    """

    model_input_names = ("input_ids", "attention_mask")

    def __init__(
        self,
        source_spm: bytes,
        target_spm: bytes,
        vocab: Mapping[str, int],
        *,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        additional_special_tokens: Sequence[str] = (),
        model_max_length: int = MARIAN_MAX_LENGTH,
        padding_side: str = "right",
        source_lang: str | None = None,
        target_lang: str | None = None,
    ) -> None:
        self._spm_bytes = (source_spm, target_spm)
        self._load_spm()
        self._vocab = dict(vocab)
        self._tokens = {i: t for t, i in self._vocab.items()}
        self._special_tokens = {"eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        self.additional_special_tokens = list(additional_special_tokens)
        for token in self.all_special_tokens:
            if token not in self._vocab:
                raise ValueError(f"special token {token!r} is not in {VOCAB_FILE}; add it to the vocabulary")
        # special tokens written in a text are matched whole, longest first
        by_length = sorted(self.all_special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.source_lang, self.target_lang = source_lang, target_lang

    def _load_spm(self) -> None:
        self._source, self._target = (
            sentencepiece.SentencePieceProcessor(model_proto=proto) for proto in self._spm_bytes
        )

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> MarianTokenizer:
        """Load a Marian tokenizer directory (``source.spm``, ``target.spm``, ``vocab.json`` and an optional
        ``tokenizer_config.json``), or a model id found in the local Hugging Face cache."""
        directory = resolve_tokenizer_path(path)
        missing = [n for n in (SOURCE_SPM_FILE, TARGET_SPM_FILE, VOCAB_FILE) if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{str(directory)!r} is not a Marian tokenizer directory: it lacks {', '.join(missing)}; expected "
                f"{SOURCE_SPM_FILE} + {TARGET_SPM_FILE} (SentencePiece models) and {VOCAB_FILE} (the shared ids), "
                "as written by MarianTokenizer.save_pretrained or transformers"
            )
        config = read_json(directory / CONFIG_FILE)
        if config.get("separate_vocabs"):
            raise ValueError(
                f"{str(directory / CONFIG_FILE)!r} sets separate_vocabs (a target_vocab.json of its own); lmforge's "
                f"MarianTokenizer reads one shared {VOCAB_FILE} only"
            )
        vocab = read_json(directory / VOCAB_FILE)
        roles = {r: token_content(config[r]) for r in ("eos_token", "unk_token", "pad_token") if config.get(r)}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        return cls(
            (directory / SOURCE_SPM_FILE).read_bytes(),
            (directory / TARGET_SPM_FILE).read_bytes(),
            {str(k): int(v) for k, v in vocab.items()},
            **roles,
            additional_special_tokens=[token_content(t) for t in extra],
            model_max_length=int(config.get("model_max_length", MARIAN_MAX_LENGTH)),
            padding_side=config.get("padding_side", "right"),
            source_lang=config.get("source_lang"),
            target_lang=config.get("target_lang"),
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write ``source.spm``, ``target.spm``, ``vocab.json`` and ``tokenizer_config.json`` into ``directory``
        (created if needed), each atomically; transformers' ``MarianTokenizer`` loads the result. Returns the
        paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "MarianTokenizer",
            **self._special_tokens,
            "additional_special_tokens": self.additional_special_tokens,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "separate_vocabs": False,
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
        }
        atomic_write_bytes(out / SOURCE_SPM_FILE, self._spm_bytes[0])
        atomic_write_bytes(out / TARGET_SPM_FILE, self._spm_bytes[1])
        atomic_write_text(out / VOCAB_FILE, json.dumps(self._vocab, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return [str(out / n) for n in (SOURCE_SPM_FILE, TARGET_SPM_FILE, VOCAB_FILE, CONFIG_FILE)]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_source"], state["_target"]  # rebuilt from the serialized models (e.g. in DataLoader workers)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load_spm()

    # ------------------------------------------------------------------ vocabulary / special tokens
    @property
    def vocab_size(self) -> int:
        """Number of entries of the shared vocabulary."""
        return len(self._vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """``{piece: id}`` of the shared vocabulary."""
        return dict(self._vocab)

    @property
    def eos_token(self) -> str:
        """The end-of-sequence token appended to every sequence."""
        return self._special_tokens["eos_token"]

    @property
    def unk_token(self) -> str:
        """The token of pieces missing from the vocabulary."""
        return self._special_tokens["unk_token"]

    @property
    def pad_token(self) -> str:
        """The padding token (also the decoder's start token in Marian models)."""
        return self._special_tokens["pad_token"]

    @property
    def eos_token_id(self) -> int:
        """Id of :attr:`eos_token`."""
        return self._vocab[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        """Id of :attr:`unk_token`."""
        return self._vocab[self.unk_token]

    @property
    def pad_token_id(self) -> int:
        """Id of :attr:`pad_token`."""
        return self._vocab[self.pad_token]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``{role: token}``."""
        return dict(self._special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        """eos, unk, pad, then the additional special tokens, each once."""
        return list(dict.fromkeys([*self._special_tokens.values(), *self.additional_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens`, same order."""
        return [self._vocab[t] for t in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id(s) of piece(s); a piece missing from the vocabulary gives ``unk_token_id``."""
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.unk_token_id)
        return [self._vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Piece(s) of id(s); a single int gives a single string."""
        if isinstance(ids, int) or getattr(ids, "ndim", None) == 0:
            return self._tokens[self._check_ids([int(ids)])[0]]
        id_list = self._check_ids(as_id_list(ids))
        if skip_special_tokens:
            special = set(self.all_special_ids)
            id_list = [i for i in id_list if i not in special]
        return [self._tokens[i] for i in id_list]

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str, target: bool = False) -> list[str]:
        """The pieces of ``text`` (``target.spm``'s when ``target``): special tokens matched whole, a leading
        ``>>xx<<`` language code kept as one piece, the rest split by SentencePiece."""
        model = self._target if target else self._source
        pieces: list[str] = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:  # the odd parts of a split on a capturing group are the matched special tokens
                pieces.append(part)
                continue
            if part.startswith(">>") and (end := part.find("<<")) != -1:
                pieces.append(part[: end + 2])
                part = part[end + 2 :]
            pieces.extend(model.encode(part, out_type=str))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = False, target: bool = False) -> list[int]:
        """Token ids of one string (source side, or target side when ``target``); ``</s>`` appended only when
        ``add_special_tokens``, like :meth:`Tokenizer.encode` (transformers appends it by default)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; use __call__ for a list of strings")
        ids = self.convert_tokens_to_ids(self.tokenize(text, target))
        return [*ids, self.eos_token_id] if add_special_tokens else ids  # type: ignore[list-item]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        text_target: str | Sequence[str] | None = None,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Tokenize source text(s) into ``input_ids`` / ``attention_mask``, and target text(s) into ``labels``
        (with ``target.spm``; padded with the pad id, as transformers does). With only ``text_target``, its
        ``input_ids`` / ``attention_mask`` are returned. ``padding``, ``truncation`` (to ``max_length`` or
        ``model_max_length`` tokens, ``</s>`` kept), ``return_tensors``: as :meth:`Tokenizer.__call__`."""
        if text is None and text_target is None:
            raise ValueError("pass text (the source) and/or text_target (the labels)")
        pad_mode = padding_mode(padding, max_length)
        trunc_mode = truncation_mode(truncation)
        if trunc_mode == "only_second":
            raise ValueError("truncation='only_second' needs a text pair; Marian encodes single texts")
        check_return_tensors(return_tensors)
        limit = self._truncation_limit(max_length, add_special_tokens) if trunc_mode else None
        settings = (pad_mode, max_length, limit, return_tensors, return_attention_mask, add_special_tokens)
        if text is None:
            return self._encode_side(text_target, True, *settings)
        out = self._encode_side(text, False, *settings)
        if text_target is not None:
            if isinstance(text, str) != isinstance(text_target, str):
                raise ValueError("text and text_target must both be str or both be lists of str")
            out["labels"] = self._encode_side(text_target, True, *settings)["input_ids"]
        return out

    def _encode_side(
        self,
        text: str | Sequence[str],
        target: bool,
        pad_mode: str,
        max_length: int | None,
        limit: int | None,
        return_tensors: str | None,
        return_attention_mask: bool,
        add_special_tokens: bool,
    ) -> BatchEncoding:
        """One side's batch: ids cut to ``limit - 1`` (room for ``</s>``) before ``</s>`` is appended."""
        n_special = 1 if add_special_tokens else 0
        rows = []
        for one in as_text_list(text, "text_target" if target else "text"):
            ids = self.encode(one, target=target)
            if limit is not None:
                ids = ids[: limit - n_special]
            rows.append(ids + [self.eos_token_id] * n_special)
        columns = {"input_ids": rows}
        if return_attention_mask:
            columns["attention_mask"] = [[1] * len(r) for r in rows]
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0}
        is_batch = not isinstance(text, str)
        return pack_batch(columns, pad_mode, max_length, pad_values, self.padding_side, return_tensors, is_batch)

    def _truncation_limit(self, max_length: int | None, add_special_tokens: bool) -> int:
        limit = max_length if max_length is not None else self.model_max_length
        if limit >= NO_LENGTH_LIMIT:
            raise ValueError("truncation=True needs a length: pass max_length=... or set tokenizer.model_max_length")
        if limit < int(add_special_tokens):
            raise ValueError(f"max_length={limit} leaves no room for the </s> this tokenizer appends; raise it")
        return limit

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, 1-D tensor or array): runs of pieces joined by the source
        SentencePiece model, each special token written followed by a space, the ends stripped (transformers'
        ``MarianTokenizer`` output)."""
        tokens = self.convert_ids_to_tokens(as_id_list(ids, what="decode"), skip_special_tokens=skip_special_tokens)
        special = set(self.all_special_tokens)
        text, run = "", []
        for token in tokens:
            if token in special:
                text += self._source.decode_pieces(run) + token + " "
                run = []
            else:
                run.append(token)
        text += self._source.decode_pieces(run)
        return text.replace(SPIECE_UNDERLINE, " ").strip()

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` for each row of a 2-D tensor/array or a list of id lists."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in as_id_rows(sequences)]

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if i not in self._tokens]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is not in the vocabulary (ids 0..{self.vocab_size - 1}); drop padding/ignore-index "
                "values such as -100 before decoding"
            )
        return ids

    def __repr__(self) -> str:
        return (
            f"MarianTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, unk_token="
            f"{self.unk_token!r}, pad_token={self.pad_token!r}, padding_side={self.padding_side!r}, "
            f"model_max_length={self.model_max_length})"
        )
