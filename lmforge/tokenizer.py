"""Tokenizer: a thin, Hugging Face-shaped wrapper over the Rust ``tokenizers`` library.

One class, :class:`Tokenizer`, owns a ``tokenizers.Tokenizer`` (the *backend*) plus the few
things the backend does not know: which token plays which role (eos, pad, ...), the padding
side and the model's maximum length. The backend does the heavy lifting (training, fast
batched encoding, decoding); this module adds the ``__call__`` API that models and trainers
expect (padding, truncation, attention masks, tensors) and a ``save_pretrained`` layout that
``transformers.AutoTokenizer`` can load. ``from_pretrained`` reads that layout, and also the
legacy files of checkpoints without a ``tokenizer.json``: GPT-2's ``vocab.json`` + ``merges.txt``
(the same byte-level BPE as transformers' ``GPT2Tokenizer``) and BERT's ``vocab.txt`` (the same
WordPiece as transformers' ``BertTokenizer``).

Training recipes are classmethods that build a backend and hand it to the constructor, so
adding another recipe (e.g. a BERT WordPiece one) needs no change to the rest of the class:
special tokens are a generic ``{role: token}`` mapping and special-token insertion is left to
the backend's post-processor.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from tokenizers import (
    AddedToken,
    Encoding,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.utils import atomic_write_text

__all__ = ["Tokenizer", "BatchEncoding", "SPECIAL_TOKEN_ROLES", "NO_MAX_LENGTH"]

PathLike = Union[str, "os.PathLike[str]"]

#: Roles a special token can play, in the order Hugging Face lists them.
SPECIAL_TOKEN_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

#: ``model_max_length`` meaning "no known limit" (the value Hugging Face uses for the same).
NO_MAX_LENGTH = int(1e30)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# GPT-2's legacy ("slow") tokenizer files, loaded when a directory has no tokenizer.json
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
#: GPT-2's one special token: bos, eos and unk unless a config says otherwise.
GPT2_SPECIAL_TOKEN = "<|endoftext|>"
# tokenizer_class values (tokenizer_config.json) whose vocab.json + merges.txt mean GPT-2's
# byte-level BPE; other classes (RoBERTa, GPT-1, ...) read the same files differently
_GPT2_TOKENIZER_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")
# BERT's legacy ("slow") vocabulary: one WordPiece token per line, the line number is its id
BERT_VOCAB_FILE = "vocab.txt"
# tokenizer_class values whose vocab.txt means BERT's WordPiece with [CLS] A [SEP] [B [SEP]]
_BERT_TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast")
#: BERT's special tokens by role: the defaults of transformers' ``BertTokenizer``.
BERT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
_BERT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")

# Well-known special token strings -> the roles they play; used only when a tokenizer.json is
# loaded without a tokenizer_config.json telling us the roles explicitly.
_KNOWN_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "<|endoftext|>": ("bos_token", "eos_token"),
    "<|pad|>": ("pad_token",),
    "[UNK]": ("unk_token",),
    "[SEP]": ("sep_token",),
    "[PAD]": ("pad_token",),
    "[CLS]": ("cls_token",),
    "[MASK]": ("mask_token",),
}

_COMPRESSED_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}


class BatchEncoding(dict):
    """Output of :meth:`Tokenizer.__call__`: a dict (``input_ids``, ``attention_mask``, ...)
    whose keys are also readable as attributes, like Hugging Face's ``BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"BatchEncoding has no field {name!r}; available: {sorted(self)}"
            ) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every torch tensor value to ``device`` (in place) and return ``self``."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def _token_property(role: str) -> property:
    def fget(self: Tokenizer) -> str | None:
        return self._special_tokens.get(role)

    def fset(self: Tokenizer, token: str | None) -> None:
        self._set_special_token(role, token)

    return property(fget, fset, doc=f"The {role.replace('_', ' ')} string, or None.")


def _token_id_property(role: str) -> property:
    def fget(self: Tokenizer) -> int | None:
        token = self._special_tokens.get(role)
        return None if token is None else self._backend.token_to_id(token)

    return property(fget, doc=f"Id of the {role.replace('_', ' ')}, or None.")


class Tokenizer:
    """A trained tokenizer with a Hugging Face-like API (``__call__``, ``encode``, ``decode``,
    ``save_pretrained`` / ``from_pretrained``).

    Args:
        backend: the ``tokenizers.Tokenizer`` that does the work. It must have no padding or
            truncation enabled; this class applies both itself, per call.
        special_tokens: ``{role: token}`` with roles from :data:`SPECIAL_TOKEN_ROLES`; every
            token must already be in the backend's vocabulary.
        additional_special_tokens: further special tokens that have no role.
        model_max_length: longest sequence the model accepts (used by ``truncation=True``);
            :data:`NO_MAX_LENGTH` means unknown.
        padding_side: "right" (default) or "left".
        model_input_names: keys ``__call__`` returns; add "token_type_ids" for BERT-style models.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        additional_special_tokens: Sequence[str] = (),
        model_max_length: int = NO_MAX_LENGTH,
        padding_side: str = "right",
        model_input_names: Sequence[str] = ("input_ids", "attention_mask"),
    ) -> None:
        if backend.padding is not None or backend.truncation is not None:
            raise ValueError(
                "the backend tokenizer has padding/truncation enabled; call "
                "backend.no_padding() and backend.no_truncation() first — Tokenizer pads and "
                "truncates per call"
            )
        self._backend = backend
        # truncation is applied by switching it on in the backend for one call; the lock keeps
        # other threads from encoding with it switched on
        self._lock = threading.Lock()
        self._special_tokens: dict[str, str] = {}
        for role, token in (special_tokens or {}).items():
            if token is not None:
                self._check_role(role)
                self._require_in_vocab(token, role)
                self._special_tokens[role] = token
        for token in additional_special_tokens:
            self._require_in_vocab(token, "additional special token")
        self.additional_special_tokens: list[str] = list(additional_special_tokens)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.model_input_names: list[str] = list(model_input_names)

    # ------------------------------------------------------------------ training recipes
    @classmethod
    def train_bpe(
        cls,
        files: PathLike | Sequence[PathLike] | None = None,
        iterator: Iterable[str] | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>"),
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE tokenizer on text files or an iterator of strings.

        Text is split with GPT-2's regex (no prefix space added) and every one of the 256 byte
        symbols is in the vocabulary, so any string encodes without unknown tokens and decodes
        back exactly. Files are read line by line (``.gz``/``.xz``/``.bz2`` are decompressed
        on the fly); an iterator that yields the same lines gives the same tokenizer.

        ``special_tokens[0]`` becomes the eos and bos token, ``special_tokens[1]`` (if given)
        the pad token; any further ones are additional special tokens. They take ids 0, 1, ...
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {special_tokens}; list each once")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs the {len(alphabet)} "
                f"byte symbols plus {len(special_tokens)} special tokens; use at least "
                f"{len(alphabet) + len(special_tokens)}"
            )
        backend = cls._byte_level_bpe_backend()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
        _train_backend(backend, trainer, files, iterator)
        roles: dict[str, str] = {}
        if special_tokens:
            roles["bos_token"] = roles["eos_token"] = special_tokens[0]
        if len(special_tokens) > 1:
            roles["pad_token"] = special_tokens[1]
        return cls(backend, roles, additional_special_tokens=special_tokens[2:])

    @classmethod
    def train_wordpiece(
        cls,
        files: PathLike | Sequence[PathLike] | None = None,
        iterator: Iterable[str] | None = None,
        vocab_size: int = 30522,
        min_frequency: int = 2,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        special_tokens: Sequence[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a BERT-style WordPiece tokenizer on text files or an iterator of strings.

        The pipeline is the one :meth:`from_pretrained` builds for BERT's ``vocab.txt``, so a
        trained tokenizer behaves like ``BertTokenizer``: BERT's normalizer (clean text, every
        CJK character its own word, lowercasing if ``lowercase``, accents stripped when
        ``strip_accents`` or, if None, when lowercasing), BERT's pre-tokenizer, WordPiece with
        ``##`` continuation pieces (a word it cannot spell becomes the unknown token, in place),
        ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1, and ``__call__``
        returning ``token_type_ids``.

        ``special_tokens`` take ids 0, 1, ... and play, in order, the roles pad, unk, cls, sep
        and mask; any further ones are additional special tokens.
        """
        special_tokens = list(special_tokens)
        role_names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
        if len(special_tokens) < len(role_names):
            raise ValueError(
                f"special_tokens={special_tokens} is too short: WordPiece training needs the "
                f"{len(role_names)} BERT tokens in the order pad, unk, cls, sep, mask, e.g. "
                '("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")'
            )
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {special_tokens}; list each once")
        if vocab_size < len(special_tokens):
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {len(special_tokens)} special "
                "tokens; use a larger vocab_size"
            )
        roles = dict(zip(role_names, special_tokens))
        backend = _bert_wordpiece_backend(
            models.WordPiece(
                unk_token=roles["unk_token"],
                continuing_subword_prefix="##",
                max_input_chars_per_word=100,
            ),
            lowercase=lowercase,
            strip_accents=strip_accents,
            handle_chinese_chars=True,
        )
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
        _train_backend(backend, trainer, files, iterator)
        backend.post_processor = _bert_template(backend, roles["cls_token"], roles["sep_token"])
        return cls(
            backend,
            roles,
            additional_special_tokens=special_tokens[len(role_names):],
            model_input_names=list(_BERT_INPUT_NAMES),
        )

    @staticmethod
    def _byte_level_bpe_backend(
        model: models.BPE | None = None, add_prefix_space: bool = False
    ) -> BackendTokenizer:
        """A GPT-2-style byte-level BPE pipeline (no normalizer: lossless) around ``model``
        (default: an untrained BPE, for training)."""
        backend = BackendTokenizer(models.BPE() if model is None else model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=add_prefix_space, use_regex=True
        )
        backend.decoder = decoders.ByteLevel()
        # trim_offsets=False: a token's offsets include its leading space, so the offsets of
        # consecutive tokens tile the input text.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return backend

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_file(cls, path: PathLike) -> Tokenizer:
        """Load a ``tokenizer.json``; special-token roles are inferred from well-known token
        strings (``<|endoftext|>``, ``<|pad|>``, ``[CLS]``, ...)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: looked for {str(path)!r}; expected a tokenizer.json "
                "written by Tokenizer.save_pretrained or tokenizers.Tokenizer.save"
            )
        backend = _load_backend(path)
        roles, additional = _infer_special_tokens(backend)
        return cls(backend, roles, additional_special_tokens=additional)

    @classmethod
    def from_pretrained(cls, path: PathLike) -> Tokenizer:
        """Load from a directory written by :meth:`save_pretrained` (or by Hugging Face), or
        from a path to a file in it (its ``tokenizer.json``, ``vocab.json`` or ``vocab.txt``).

        Special tokens, ``padding_side`` and ``model_max_length`` come from
        ``tokenizer_config.json`` / ``special_tokens_map.json`` next to ``tokenizer.json``
        when present; otherwise roles are inferred as in :meth:`from_file`.

        A directory without ``tokenizer.json`` but with GPT-2's legacy ``vocab.json`` +
        ``merges.txt`` (as in the original ``gpt2`` checkpoint) loads as the byte-level BPE
        tokenizer Hugging Face's ``GPT2Tokenizer`` builds from them: same ids, same special
        tokens (see :meth:`_from_gpt2_files`). One with BERT's ``vocab.txt`` instead loads as
        the WordPiece tokenizer of transformers' ``BertTokenizer`` (see :meth:`_from_bert_files`).
        ``tokenizer.json`` wins when present.
        """
        path = Path(path).expanduser()
        if not path.exists() and _looks_like_model_id(str(path)):
            from lmforge.hub import cached_snapshot  # a model id in the local Hugging Face cache

            path = cached_snapshot(str(path))
        if path.is_dir():
            tokenizer_file, directory = path / TOKENIZER_FILE, path
            if not tokenizer_file.is_file():
                return cls._from_legacy_files(path)
        elif path.is_file() and path.name in (VOCAB_FILE, MERGES_FILE):
            return cls._from_gpt2_files(path.parent)
        elif path.is_file() and path.name == BERT_VOCAB_FILE:
            return cls._from_bert_files(path.parent)
        elif path.is_file():
            tokenizer_file, directory = path, path.parent
        else:
            raise FileNotFoundError(
                f"tokenizer path not found: {str(path)!r}; expected a directory containing "
                f"{TOKENIZER_FILE} (as written by Tokenizer.save_pretrained), BERT's "
                f"{BERT_VOCAB_FILE} or GPT-2's {VOCAB_FILE} + {MERGES_FILE}, or the path of a "
                f"{TOKENIZER_FILE} file"
            )
        backend = _load_backend(tokenizer_file)
        config = _read_json(directory / CONFIG_FILE)
        token_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        roles, additional = _configured_special_tokens(config, token_map)  # the config wins
        if not roles and not additional:
            roles, additional = _infer_special_tokens(backend)
        return cls(
            backend,
            {role: _token_content(token) for role, token in roles.items()},
            additional_special_tokens=[_token_content(t) for t in additional],
            **_config_settings(config),
        )

    @classmethod
    def _from_legacy_files(cls, directory: Path) -> Tokenizer:
        """Load a directory without tokenizer.json from BERT's vocab.txt or GPT-2's vocab.json
        + merges.txt; when both kinds are there, the config's ``tokenizer_class`` decides."""
        has_bert = (directory / BERT_VOCAB_FILE).is_file()
        has_gpt2 = (directory / VOCAB_FILE).is_file() or (directory / MERGES_FILE).is_file()
        if has_bert and has_gpt2:
            config = _read_json(directory / CONFIG_FILE)
            if str(config.get("tokenizer_class", "")) in _BERT_TOKENIZER_CLASSES:
                return cls._from_bert_files(directory)
            return cls._from_gpt2_files(directory)
        if has_bert:
            return cls._from_bert_files(directory)
        return cls._from_gpt2_files(directory)  # raises, listing what was expected

    @classmethod
    def _from_bert_files(cls, directory: Path) -> Tokenizer:
        """Build the WordPiece tokenizer of a BERT-style directory without tokenizer.json.

        Mirrors what ``transformers``' ``BertTokenizer`` makes of ``vocab.txt`` (+ optional
        ``tokenizer_config.json`` / ``special_tokens_map.json``), so ids match: WordPiece over
        the vocabulary (unknown token ``unk_token``, ``##`` continuation, words longer than 100
        characters become unknown), BERT's normalizer (clean text, spaces around CJK characters
        when ``tokenize_chinese_chars``, lowercase when ``do_lower_case``, accents stripped when
        ``strip_accents`` or, if that is unset, when lowercasing), BERT's pre-tokenizer, the
        ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` post-processor with segment ids 0/1 and the
        ``##``-joining decoder. Special tokens default to [UNK] [SEP] [PAD] [CLS] [MASK]; one
        missing from vocab.txt gets the next free id. ``__call__`` returns ``token_type_ids``.
        """
        vocab_path, config_path = directory / BERT_VOCAB_FILE, directory / CONFIG_FILE
        config = _read_json(config_path)
        _check_bert_tokenizer_class(config, config_path)
        vocab = _read_bert_vocab(vocab_path)
        # as in transformers (and _from_gpt2_files): special_tokens_map.json overrides the
        # config unless the config has an added_tokens_decoder
        token_map = {}
        if "added_tokens_decoder" not in config:
            token_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        roles, additional = _configured_special_tokens(token_map, config)
        for role, token in BERT_SPECIAL_TOKENS.items():
            roles.setdefault(role, token)
        cls_token, sep_token = _token_content(roles["cls_token"]), _token_content(roles["sep_token"])
        if cls_token is None or sep_token is None:
            raise ValueError(
                f"{str(config_path)!r} sets cls_token or sep_token to null, but BERT's inputs "
                "are [CLS] A [SEP] (B [SEP]); give both tokens (e.g. \"[CLS]\" and \"[SEP]\") "
                "or remove the null entries to use those defaults"
            )
        unk_token = _token_content(roles["unk_token"]) or BERT_SPECIAL_TOKENS["unk_token"]

        backend = _bert_wordpiece_backend(
            models.WordPiece(
                vocab,
                unk_token=unk_token,
                continuing_subword_prefix="##",
                max_input_chars_per_word=100,
            ),
            lowercase=bool(config.get("do_lower_case", True)),
            strip_accents=config.get("strip_accents"),  # None: follow lowercase, as BERT does
            handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        )
        _add_legacy_added_tokens(
            backend, config, directory, roles, additional, len(vocab), BERT_VOCAB_FILE
        )
        backend.post_processor = _bert_template(backend, cls_token, sep_token)
        return cls(
            backend,
            {role: _token_content(token) for role, token in roles.items()},
            additional_special_tokens=[_token_content(t) for t in additional],
            **{"model_input_names": list(_BERT_INPUT_NAMES), **_config_settings(config)},
        )

    @classmethod
    def _from_gpt2_files(cls, directory: Path) -> Tokenizer:
        """Build the byte-level BPE tokenizer of a GPT-2-style directory without tokenizer.json.

        Mirrors what ``transformers``' ``GPT2Tokenizer`` makes of the same files, so ids match:
        GPT-2's regex pre-tokenizer (a prefix space only if ``tokenizer_config.json`` sets
        ``add_prefix_space``), byte-level decoder, no unknown token in the model; bos, eos and
        unk default to ``<|endoftext|>``, pad to none. Every special token and every token of
        ``added_tokens.json`` (or of the config's ``added_tokens_decoder``) becomes an added
        token, so it is matched as a whole in the text; one missing from vocab.json gets the
        next free id, in Hugging Face's order. ``add_bos_token`` / ``add_eos_token`` in the
        config make ``__call__`` add them, as Hugging Face does.
        """
        vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
        found = [p.name for p in (vocab_path, merges_path) if p.is_file()]
        if len(found) < 2:
            if found:
                other = MERGES_FILE if found[0] == VOCAB_FILE else VOCAB_FILE
                what = f"it has {found[0]} but no {other}"
            else:
                what = (
                    f"no {BERT_VOCAB_FILE} (BERT) or {VOCAB_FILE} + {MERGES_FILE} (GPT-2) either"
                )
            present = sorted(p.name for p in directory.iterdir())
            listing = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in directory {str(directory)!r}, and {what} (files "
                f"there: {listing or 'none'}); expected {TOKENIZER_FILE} (as written by "
                f"Tokenizer.save_pretrained or transformers), or the legacy files: BERT's "
                f"{BERT_VOCAB_FILE} (WordPiece) or GPT-2's {VOCAB_FILE} + {MERGES_FILE} "
                f"(byte-level BPE), with optional {CONFIG_FILE}, {SPECIAL_TOKENS_MAP_FILE} and "
                f"{ADDED_TOKENS_FILE}"
            )
        config = _read_json(directory / CONFIG_FILE)
        _check_gpt2_tokenizer_class(config, directory / CONFIG_FILE)
        vocab = _read_gpt2_vocab(vocab_path)
        merges = _read_gpt2_merges(merges_path, vocab)
        backend = cls._byte_level_bpe_backend(
            models.BPE(vocab=vocab, merges=merges),
            add_prefix_space=bool(config.get("add_prefix_space", False)),
        )

        # as in transformers: special_tokens_map.json overrides the config, unless the config
        # has an added_tokens_decoder (a transformers >= 4.34 save), which makes it ignored
        token_map = {}
        if "added_tokens_decoder" not in config:
            token_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        roles, additional = _configured_special_tokens(token_map, config)
        for role in ("bos_token", "eos_token", "unk_token"):  # GPT2Tokenizer's defaults
            roles.setdefault(role, GPT2_SPECIAL_TOKEN)
        _add_legacy_added_tokens(
            backend, config, directory, roles, additional, len(vocab), VOCAB_FILE
        )

        add_bos = bool(config.get("add_bos_token", False)) and roles.get("bos_token") is not None
        add_eos = bool(config.get("add_eos_token", False)) and roles.get("eos_token") is not None
        if add_bos or add_eos:
            backend.post_processor = _bos_eos_template(
                backend,
                _token_content(roles["bos_token"]) if add_bos else None,
                _token_content(roles["eos_token"]) if add_eos else None,
            )
        return cls(
            backend,
            {role: _token_content(token) for role, token in roles.items()},
            additional_special_tokens=[_token_content(t) for t in additional],
            **_config_settings(config),
        )

    def save_pretrained(self, directory: PathLike) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
        into ``directory`` (created if needed), each atomically; return the paths written.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` loads the result as a
        ``PreTrainedTokenizerFast`` that gives the same ids and decoded text.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        token_map: dict[str, Any] = dict(self._special_tokens)
        if self.additional_special_tokens:
            token_map["additional_special_tokens"] = list(self.additional_special_tokens)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **token_map,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": "right",
            "model_input_names": list(self.model_input_names),
            # decode must stay lossless: never "clean up" spaces before punctuation
            "clean_up_tokenization_spaces": False,
        }
        files = {
            TOKENIZER_FILE: self._backend.to_str(pretty=True),
            CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            SPECIAL_TOKENS_MAP_FILE: json.dumps(token_map, indent=2, ensure_ascii=False) + "\n",
        }
        written = []
        for name, text in files.items():
            atomic_write_text(directory / name, text)
            written.append(str(directory / name))
        return written

    # ------------------------------------------------------------------ vocabulary / special tokens
    @property
    def backend(self) -> BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (every id is < vocab_size)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    bos_token = _token_property("bos_token")
    eos_token = _token_property("eos_token")
    unk_token = _token_property("unk_token")
    sep_token = _token_property("sep_token")
    pad_token = _token_property("pad_token")
    cls_token = _token_property("cls_token")
    mask_token = _token_property("mask_token")
    bos_token_id = _token_id_property("bos_token")
    eos_token_id = _token_id_property("eos_token")
    unk_token_id = _token_id_property("unk_token")
    sep_token_id = _token_id_property("sep_token")
    pad_token_id = _token_id_property("pad_token")
    cls_token_id = _token_id_property("cls_token")
    mask_token_id = _token_id_property("mask_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``{role: token}`` for the roles that are set."""
        return dict(self._special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        """Every special token once (role tokens in role order, then additional ones)."""
        tokens = [self._special_tokens[r] for r in SPECIAL_TOKEN_ROLES if r in self._special_tokens]
        return list(dict.fromkeys(tokens + self.additional_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens`, same order."""
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    @property
    def padding_side(self) -> str:
        """Where ``padding`` adds pad tokens: "right" (default) or "left" (for generation)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        self._padding_side = side

    def get_vocab(self) -> dict[str, int]:
        """``{token: id}`` for the whole vocabulary, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        """Token string(s) for id(s); a single int gives a single string."""
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._backend.id_to_token(self._check_ids([int(ids)])[0])
        id_list = self._check_ids(_as_id_list(ids))
        if skip_special_tokens:
            special = set(self.all_special_ids)
            id_list = [i for i in id_list if i not in special]
        return [self._backend.id_to_token(i) for i in id_list]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Id(s) for token string(s); unknown tokens give ``unk_token_id`` (None for byte-level
        BPE, whose byte symbols cover everything)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one string (no special tokens unless asked)."""
        if not isinstance(text, str):
            raise TypeError(
                f"encode takes one str, got {type(text).__name__}; use encode_batch_fast or "
                "__call__ for a list of strings"
            )
        with self._lock:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of one text, e.g. "质量很好" -> ["质", "量", "很", "好"] (WordPiece) or
        byte-level pieces such as "Ġword" (BPE); as transformers' `tokenize`."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens))  # type: ignore[return-value]

    def encode_batch_fast(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many strings, encoded in parallel by the Rust backend without offsets
        or special tokens: the fast path for corpus preparation."""
        if isinstance(texts, str):
            raise TypeError("encode_batch_fast takes a list of str, got one str; wrap it in a list")
        texts = list(texts)
        fast = getattr(self._backend, "encode_batch_fast", None)  # tokenizers >= 0.20
        encode_batch = fast if fast is not None else self._backend.encode_batch
        with self._lock:
            encodings = encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Tokenize a string or a batch of strings (optionally paired) into model inputs.

        Args:
            text: one string or a list of strings.
            text_pair: optional second segment(s), same form as ``text``; each pair is encoded
                as one sequence (the backend's post-processor joins them).
            padding: False/"do_not_pad"; True/"longest" (pad to the longest in the batch);
                "max_length" (pad to ``max_length``). Pads with ``pad_token_id`` on
                :attr:`padding_side`.
            truncation: True/"longest_first", "only_first", "only_second" cut sequences to
                ``max_length`` (or ``model_max_length``) tokens, special tokens included.
            return_tensors: None (Python lists), "pt" (torch.long) or "np" (int64).
            return_offsets_mapping: add ``offset_mapping``, the (start, end) character span of
                each token in the string it came from; (0, 0) for padding and added special
                tokens.
                A byte-level token holding part of a multi-byte character gets that whole
                character's span, so neighbouring tokens may share a span.
            add_special_tokens: let the backend's post-processor add special tokens (BERT's
                [CLS]/[SEP]); byte-level BPE adds none, like GPT-2.

        A single string gives flat lists, or tensors of shape [1, T] with ``return_tensors``.
        """
        is_batch = not isinstance(text, str)
        texts = _as_text_list(text, "text")
        pairs: list[str] | None = None
        if text_pair is not None:
            if is_batch == isinstance(text_pair, str):
                raise ValueError(
                    "text and text_pair must both be str or both be lists of str, got "
                    f"{type(text).__name__} and {type(text_pair).__name__}"
                )
            pairs = _as_text_list(text_pair, "text_pair")
            if len(pairs) != len(texts):
                raise ValueError(
                    f"text has {len(texts)} items but text_pair has {len(pairs)}; pass one pair "
                    "per text"
                )
        pad_mode = _padding_mode(padding, max_length)
        trunc_mode = _truncation_mode(truncation)
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if pad_mode != "do_not_pad" and self.pad_token_id is None:
            raise ValueError(
                "padding was requested but this tokenizer has no pad token; set one first, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token, or call with padding=False"
            )

        inputs: list[Any] = texts if pairs is None else list(zip(texts, pairs, strict=True))
        if trunc_mode is None:
            with self._lock:
                encodings = self._backend.encode_batch(
                    inputs, add_special_tokens=add_special_tokens
                )
        else:
            limit = self._truncation_limit(max_length)
            n_special = (
                self._backend.num_special_tokens_to_add(pairs is not None)
                if add_special_tokens
                else 0
            )
            if limit < n_special:
                raise ValueError(
                    f"max_length={limit} leaves no room for the {n_special} special tokens this "
                    "tokenizer adds; raise max_length"
                )
            encodings = self._encode_truncated(inputs, limit, trunc_mode, add_special_tokens)

        columns: dict[str, list[list[Any]]] = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in self.model_input_names:
            columns["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            columns["attention_mask"] = [[1] * len(e.ids) for e in encodings]
        if return_offsets_mapping:
            columns["offset_mapping"] = [list(e.offsets) for e in encodings]

        if pad_mode != "do_not_pad":
            longest = max((len(e.ids) for e in encodings), default=0)
            target = max_length if pad_mode == "max_length" else longest
            pad_values = {
                "input_ids": self.pad_token_id,
                "token_type_ids": 0,
                "attention_mask": 0,
                "offset_mapping": (0, 0),
            }
            for key, rows in columns.items():
                columns[key] = [
                    _pad_row(row, target, pad_values[key], self.padding_side) for row in rows
                ]

        out = BatchEncoding()
        for key, rows in columns.items():
            if return_tensors is not None:
                out[key] = _to_tensor(rows, key, return_tensors)
            else:
                out[key] = rows if is_batch else rows[0]
        return out

    @contextlib.contextmanager
    def truncating(
        self, max_length: int, stride: int = 0, strategy: str = "longest_first"
    ) -> Iterator[BackendTokenizer]:
        """The backend with its truncation switched on (and overflowing chunks kept `stride`
        tokens apart) for the ``with`` block only. Truncation is a backend-wide setting, so the
        block holds this tokenizer's lock: other threads wait rather than see it."""
        with self._lock:
            self._backend.enable_truncation(max_length, stride=stride, strategy=strategy)
            try:
                yield self._backend
            finally:
                self._backend.no_truncation()

    def _encode_truncated(
        self, inputs: list[Any], limit: int, strategy: str, add_special_tokens: bool
    ) -> list[Encoding]:
        """Encode with the backend's truncation (applied before special tokens are added, so
        they always survive) switched on for this call only."""
        with self.truncating(limit, strategy=strategy) as backend:
            try:
                return backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as err:  # the backend raises a bare Exception
                raise ValueError(
                    f"cannot truncate to max_length={limit} with truncation={strategy!r}: {err}; "
                    "use truncation='longest_first' or a larger max_length"
                ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # locks cannot be pickled (e.g. into DataLoader worker processes)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _truncation_limit(self, max_length: int | None) -> int:
        limit = max_length if max_length is not None else self.model_max_length
        if limit >= NO_MAX_LENGTH:
            raise ValueError(
                "truncation=True needs a length: pass max_length=... or set "
                "tokenizer.model_max_length"
            )
        if limit < 0:
            raise ValueError(f"max_length must be >= 0, got {limit}")
        return limit

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text for one sequence of ids (list, 1-D torch tensor or numpy array).

        Byte-level BPE decoding is lossless (no clean-up of tokenization spaces), so
        ``decode(encode(s)) == s``; WordPiece (BERT) joins "##" pieces as transformers does, which
        cannot restore case, accents or spacing removed by its normaliser.
        """
        id_list = self._check_ids(_as_id_list(ids, what="decode"))
        if skip_special_tokens:
            special = set(self.all_special_ids)
            id_list = [i for i in id_list if i not in special]
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` for each row of a 2-D tensor/array or a list of id lists."""
        if hasattr(sequences, "tolist"):
            if getattr(sequences, "ndim", 2) != 2:
                raise ValueError(
                    f"batch_decode takes a 2-D tensor/array, got {sequences.ndim}-D; use decode "
                    "for a single sequence"
                )
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ------------------------------------------------------------------ helpers
    def _check_ids(self, ids: list[int]) -> list[int]:
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range [0, {size}); drop padding/ignore-index "
                "values such as -100 before decoding"
            )
        return ids

    def _check_role(self, role: str) -> None:
        if role not in SPECIAL_TOKEN_ROLES:
            raise ValueError(
                f"unknown special-token role {role!r}; use one of {SPECIAL_TOKEN_ROLES}"
            )

    def _require_in_vocab(self, token: str, role: str) -> None:
        if self._backend.token_to_id(token) is None:
            raise ValueError(
                f"{role} {token!r} is not in the vocabulary; include it in special_tokens when "
                "training, or set it through the attribute (e.g. tokenizer.pad_token = ...), "
                "which adds it"
            )

    def _set_special_token(self, role: str, token: str | None) -> None:
        """Assign ``token`` to ``role``, adding it to the vocabulary as a special token if new."""
        self._check_role(role)
        if token is None:
            self._special_tokens.pop(role, None)
            return
        if not isinstance(token, str):
            raise TypeError(f"{role} must be a str or None, got {type(token).__name__}")
        if self._backend.token_to_id(token) is None:
            with self._lock:
                self._backend.add_special_tokens(
                    [AddedToken(token, special=True, normalized=False)]
                )
        self._special_tokens[role] = token

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={t!r}" for r, t in self._special_tokens.items())
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, "
            f"model={type(self._backend.model).__name__}, {roles}, "
            f"padding_side={self.padding_side!r}, model_max_length={self.model_max_length})"
        )


# ---------------------------------------------------------------------- module helpers
def _train_backend(
    backend: BackendTokenizer,
    trainer: Any,
    files: PathLike | Sequence[PathLike] | None,
    iterator: Iterable[str] | None,
) -> None:
    """Train ``backend`` on exactly one of ``files`` / ``iterator``."""
    if (files is None) == (iterator is None):
        raise ValueError(
            "pass exactly one of files=... (text file paths) or iterator=... (strings) to train; "
            f"got {'both' if files is not None else 'neither'}"
        )
    if iterator is not None:
        if isinstance(iterator, str):
            raise ValueError(
                "iterator must yield strings, got a single str (it would be read character by "
                "character); wrap it in a list: iterator=[text]"
            )
        backend.train_from_iterator(iterator, trainer)
        return
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)  # type: ignore[arg-type]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("files is empty; pass at least one text file path")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"training file not found: {p!r}")
    if any(_opener(p) is not open for p in paths):
        backend.train_from_iterator(_iter_lines(paths), trainer)
    else:  # plain text: let the Rust reader stream the files (same lines as _iter_lines)
        backend.train(paths, trainer)


def _opener(path: str) -> Any:
    return _COMPRESSED_OPENERS.get(Path(path).suffix.lower(), open)


def _iter_lines(paths: Sequence[str]) -> Iterator[str]:
    """Yield the lines (newlines kept, "\\r\\n" untranslated) of each file, decompressing
    ``.gz``/``.xz``/``.lzma``/``.bz2`` by extension."""
    for path in paths:
        with _opener(path)(path, "rt", encoding="utf-8", newline="") as f:
            yield from f


def _load_backend(path: Path) -> BackendTokenizer:
    backend = BackendTokenizer.from_file(str(path))
    # a tokenizer.json may carry padding/truncation settings; this class applies its own
    backend.no_padding()
    backend.no_truncation()
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not valid UTF-8 JSON ({err}); fix or remove the file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _config_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor settings a ``tokenizer_config.json`` may carry."""
    settings: dict[str, Any] = {}
    if "model_max_length" in config:
        settings["model_max_length"] = int(config["model_max_length"])
    if "padding_side" in config:
        settings["padding_side"] = config["padding_side"]
    if "model_input_names" in config:
        settings["model_input_names"] = config["model_input_names"]
    elif str(config.get("tokenizer_class", "")).startswith("Bert"):
        # BERT-family tokenizers return segment ids too, as transformers' BertTokenizer does
        settings["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return settings


def _configured_special_tokens(
    first: Mapping[str, Any], second: Mapping[str, Any]
) -> tuple[dict[str, Any], list[Any]]:
    """``({role: token}, additional)`` as written in two JSON files (tokenizer_config.json,
    special_tokens_map.json; str, None or Hugging Face AddedToken dicts), ``first`` winning."""
    roles: dict[str, Any] = {}
    for source in (second, first):
        for role in SPECIAL_TOKEN_ROLES:
            if role in source:
                roles[role] = source[role]
    for key in ("additional_special_tokens", "extra_special_tokens"):  # transformers 5 name
        for source in (first, second):
            if isinstance(source.get(key), list):
                return roles, list(source[key])
    return roles, []


def _check_gpt2_tokenizer_class(config: Mapping[str, Any], path: Path) -> None:
    """Refuse configs naming a tokenizer that reads vocab.json + merges.txt unlike GPT-2's
    (RoBERTa adds <s>...</s>, GPT-1 uses </w> word ends): they would load with wrong ids."""
    name = config.get("tokenizer_class")
    if name is not None and name not in _GPT2_TOKENIZER_CLASSES:
        raise ValueError(
            f"{str(path)!r} names tokenizer_class {name!r}, but without a {TOKENIZER_FILE} only "
            f"GPT-2's byte-level BPE ({' / '.join(_GPT2_TOKENIZER_CLASSES)}) can be loaded from "
            f"{VOCAB_FILE} + {MERGES_FILE}; write a {TOKENIZER_FILE} once with transformers "
            "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) and load that"
        )


def _check_bert_tokenizer_class(config: Mapping[str, Any], path: Path) -> None:
    """Refuse configs naming a tokenizer that reads vocab.txt unlike BERT's (other special
    tokens or templates, e.g. MPNet's <s>...</s>): they would load with wrong ids."""
    name = config.get("tokenizer_class")
    if name is not None and name not in _BERT_TOKENIZER_CLASSES:
        raise ValueError(
            f"{str(path)!r} names tokenizer_class {name!r}, but without a {TOKENIZER_FILE} only "
            f"BERT's WordPiece ({' / '.join(_BERT_TOKENIZER_CLASSES)}) can be loaded from "
            f"{BERT_VOCAB_FILE}; write a {TOKENIZER_FILE} once with transformers "
            "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) and load that"
        )


def _read_bert_vocab(path: Path) -> dict[str, int]:
    """BERT's ``vocab.txt``: token ``i`` is line ``i`` (line ends stripped, a repeated token
    keeps its last line), read exactly as transformers' ``load_vocab`` does."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({err}); expected BERT's vocab.txt, one token per "
            "line"
        ) from None
    vocab = {line.rstrip("\n"): index for index, line in enumerate(lines)}
    if not vocab:
        raise ValueError(
            f"{str(path)!r} is empty; expected BERT's vocab.txt, one token per line (the "
            "line number is the id)"
        )
    return vocab


def _read_gpt2_vocab(path: Path) -> dict[str, int]:
    """GPT-2's ``vocab.json`` ({token: id}), checked: ids 0..N-1 each used once and all 256
    byte-level symbols present (else text could not be encoded, and the file is not GPT-2's
    kind of vocabulary at all)."""
    hint = "expected GPT-2's vocab.json: one JSON object mapping each token to its id"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 JSON ({err}); {hint}") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(vocab).__name__}; {hint}")
    for token, index in vocab.items():
        if type(index) is not int or index < 0:
            raise ValueError(
                f"{str(path)!r} gives token {token!r} the id {index!r}; {hint} (an integer >= 0)"
            )
    ids = sorted(vocab.values())
    for expected, index in enumerate(ids):
        if index != expected:
            problem = f"{index} is used twice" if index < expected else f"{expected} is unused"
            raise ValueError(
                f"{str(path)!r} is not a complete vocabulary: id {problem}; ids must be "
                f"0..{len(ids) - 1}, each given to exactly one token"
            )
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks {len(missing)} of the 256 byte-level symbols (e.g. "
            f"{sorted(missing)[:5]}), so it is not a GPT-2-style byte-level BPE vocabulary and "
            f"text with those bytes could not be encoded; load the model's {TOKENIZER_FILE} "
            "instead, or add the missing symbols"
        )
    return vocab


def _read_gpt2_merges(path: Path, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """GPT-2's ``merges.txt``: an optional ``#version`` line, then one merge per line, two
    tokens separated by one space, highest priority first; each part and their concatenation
    must be in ``vocab``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({err}); expected GPT-2's merges.txt"
        ) from None
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line or line.startswith("#version"):  # the header, as tokenizers skips it
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(
                f"{str(path)!r} line {number}: {line!r} is not a merge; after the '#version' "
                "header each line must be two tokens separated by one space, e.g. 'Ġ t'"
            )
        for token in (*parts, parts[0] + parts[1]):
            if token not in vocab:
                raise ValueError(
                    f"{str(path)!r} line {number}: merge {line!r} needs {token!r}, which is not "
                    f"in {VOCAB_FILE}; use the {VOCAB_FILE} saved together with these merges"
                )
        merges.append((parts[0], parts[1]))
    return merges


def _added_token(value: Any, special: bool) -> AddedToken:
    """An ``AddedToken`` from a str or a Hugging Face AddedToken dict, keeping the dict's flags
    (lstrip/rstrip change which spaces the token swallows, hence the ids)."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    content = _token_content(value)
    flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip") if k in value}
    return AddedToken(
        content, special=special, normalized=bool(value.get("normalized", not special)), **flags
    )


def _declared_added_tokens(
    config: Mapping[str, Any], directory: Path, special: set[str]
) -> tuple[list[tuple[int, AddedToken]], Path]:
    """Tokens with explicit ids, sorted by id, and the file that declares them: the config's
    ``added_tokens_decoder`` ({id: AddedToken dict}) if present, as Hugging Face then ignores
    ``added_tokens.json``; else ``added_tokens.json`` ({token: id}; a token there is special
    if a role or additional special token names it)."""
    if "added_tokens_decoder" in config:
        source, entries = directory / CONFIG_FILE, config["added_tokens_decoder"]
        expected = "added_tokens_decoder must map each id to {'content': token, ...}"
        raw = list(entries.items()) if isinstance(entries, dict) else [(None, entries)]
    else:
        source = directory / ADDED_TOKENS_FILE
        expected = f"{ADDED_TOKENS_FILE} must map each token to its id (an integer >= 0)"
        raw = [(index, token) for token, index in _read_json(source).items()]
    declared: list[tuple[int, AddedToken]] = []
    for index, value in raw:
        content = value.get("content") if isinstance(value, dict) else value
        if not isinstance(content, str) or isinstance(index, bool) or not str(index).isdigit():
            raise ValueError(f"{str(source)!r}: cannot read entry {index!r}: {value!r}; {expected}")
        if isinstance(value, dict):
            is_special = bool(value.get("special", False))
        else:
            is_special = content in special
        declared.append((int(index), _added_token(value, special=is_special)))
    return sorted(declared, key=lambda item: item[0]), source


def _add_legacy_added_tokens(
    backend: BackendTokenizer,
    config: Mapping[str, Any],
    directory: Path,
    roles: Mapping[str, Any],
    additional: Sequence[Any],
    vocab_size: int,
    vocab_file: str,
) -> None:
    """Add the special tokens and declared added tokens of a legacy (no tokenizer.json)
    directory to ``backend`` the way transformers does, so each is matched whole in the text
    and gets Hugging Face's id; refuse declared ids that the vocabulary contradicts."""
    special = {_token_content(t) for t in [*roles.values(), *additional]} - {None}
    declared, source = _declared_added_tokens(config, directory, special)
    # Hugging Face adds, in this order and skipping repeats: the declared added tokens (by
    # id), the role tokens (in role order), the additional special tokens. A token already
    # in the vocabulary keeps its id; a new one gets the next free id.
    to_add: dict[str, AddedToken] = {}
    for _, token in declared:
        to_add.setdefault(token.content, token)
    for token in [roles.get(r) for r in SPECIAL_TOKEN_ROLES] + list(additional):
        if token is not None:
            added = _added_token(token, special=True)
            to_add.setdefault(added.content, added)
    backend.add_tokens(list(to_add.values()))
    for index, token in declared:
        got = backend.token_to_id(token.content)
        if got != index:
            raise ValueError(
                f"{str(source)!r} gives token {token.content!r} id {index}, but with "
                f"{vocab_file} it gets id {got}: the files do not belong together; fix the "
                "id in the file (added tokens follow the vocabulary: the first has id "
                f"{vocab_size}) or remove the entry"
            )


def _bert_wordpiece_backend(
    model: models.WordPiece,
    *,
    lowercase: bool,
    strip_accents: bool | None,
    handle_chinese_chars: bool,
) -> BackendTokenizer:
    """BERT's pipeline around a WordPiece ``model``: clean-text normalizer (spaces around CJK
    characters, optional lowercasing; accents stripped when ``strip_accents`` or, if None,
    when lowercasing), BERT's pre-tokenizer and the ``##``-joining decoder. The post-processor
    is set by the caller (:func:`_bert_template`) once the special tokens have ids."""
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


def _bert_template(
    backend: BackendTokenizer, cls_token: str, sep_token: str
) -> processors.TemplateProcessing:
    """BERT's post-processor: ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``, segment ids 0
    for the first part and 1 for ``B [SEP]``."""
    return processors.TemplateProcessing(
        single=[f"{cls_token}:0", "$A:0", f"{sep_token}:0"],
        pair=[f"{cls_token}:0", "$A:0", f"{sep_token}:0", "$B:1", f"{sep_token}:1"],
        special_tokens=[
            (t, backend.token_to_id(t)) for t in dict.fromkeys((cls_token, sep_token))
        ],
    )


def _bos_eos_template(
    backend: BackendTokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """The post-processor Hugging Face builds for ``add_bos_token`` / ``add_eos_token``:
    ``bos A eos`` for one sequence, ``bos A eos bos B eos`` for a pair."""
    # pieces as a list (not one space-separated string): a token may contain spaces
    single = [*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])]
    second = [*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    tokens = {t: backend.token_to_id(t) for t in (bos, eos) if t is not None}
    return processors.TemplateProcessing(
        single=single, pair=single + second, special_tokens=list(tokens.items())
    )


def _token_content(value: Any) -> str | None:
    """A special token as written by Hugging Face: a str, None, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}; expected a str or {{'content': str}}")


def _infer_special_tokens(backend: BackendTokenizer) -> tuple[dict[str, str], list[str]]:
    """Roles for the backend's special added tokens, from well-known token strings."""
    roles: dict[str, str] = {}
    additional: list[str] = []
    for _, added in sorted(backend.get_added_tokens_decoder().items()):
        if not added.special:
            continue
        known = [r for r in _KNOWN_SPECIAL_TOKENS.get(added.content, ()) if r not in roles]
        for role in known:
            roles[role] = added.content
        if not known:
            additional.append(added.content)
    unk = getattr(backend.model, "unk_token", None)
    if unk is not None and "unk_token" not in roles and backend.token_to_id(unk) is not None:
        roles["unk_token"] = unk
        if unk in additional:
            additional.remove(unk)
    return roles, additional


def _as_text_list(text: Any, name: str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"{name} must be a str or a list of str, got {type(text).__name__}")


def _as_id_list(ids: Any, what: str = "convert_ids_to_tokens") -> list[int]:
    """Token ids from a list, tuple, 1-D torch tensor or numpy array."""
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # torch.Tensor / numpy.ndarray
        if getattr(ids, "ndim", 1) > 1:
            raise ValueError(
                f"{what} takes one sequence, got a {ids.ndim}-D array/tensor; use batch_decode"
            )
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else [int(i) for i in ids]
    out = []
    for i in ids:
        if isinstance(i, (list, tuple)) or getattr(i, "ndim", 0) > 0:
            raise ValueError(
                f"{what} takes one sequence of ids, got nested lists; use batch_decode"
            )
        out.append(int(i))
    return out


def _padding_mode(padding: bool | str, max_length: int | None) -> str:
    modes = {
        False: "do_not_pad",
        "do_not_pad": "do_not_pad",
        True: "longest",
        "longest": "longest",
        "max_length": "max_length",
    }
    try:
        mode = modes[padding]
    except (KeyError, TypeError):
        raise ValueError(
            f"padding must be False/'do_not_pad', True/'longest' or 'max_length', got {padding!r}"
        ) from None
    if mode == "max_length" and max_length is None:
        raise ValueError(
            "padding='max_length' needs max_length=...; or use padding=True to pad to the longest"
        )
    return mode


def _truncation_mode(truncation: bool | str) -> str | None:
    modes = {
        False: None,
        "do_not_truncate": None,
        True: "longest_first",
        "longest_first": "longest_first",
        "only_first": "only_first",
        "only_second": "only_second",
    }
    try:
        return modes[truncation]
    except (KeyError, TypeError):
        raise ValueError(
            "truncation must be False/'do_not_truncate', True/'longest_first', 'only_first' or "
            f"'only_second', got {truncation!r}"
        ) from None


def _pad_row(row: list[Any], target: int, value: Any, side: str) -> list[Any]:
    missing = target - len(row)
    if missing <= 0:
        return row
    return row + [value] * missing if side == "right" else [value] * missing + row


def _to_tensor(rows: list[list[Any]], key: str, kind: str) -> Any:
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor of {key}: sequences have different lengths "
            f"({min(lengths)}..{max(lengths)}); pass padding=True (or padding='max_length' with "
            "max_length=...) to return tensors for a batch of unequal texts"
        )
    if kind == "pt":
        import torch

        tensor = torch.tensor(rows, dtype=torch.long)
        if not rows or not lengths or max(lengths) == 0:
            tensor = tensor.reshape(len(rows), 0, *((2,) if key == "offset_mapping" else ()))
        return tensor
    import numpy as np

    array = np.array(rows, dtype=np.int64)
    if not rows or max(lengths) == 0:
        array = array.reshape(len(rows), 0, *((2,) if key == "offset_mapping" else ()))
    return array


def _looks_like_model_id(name: str) -> bool:
    """"gpt2" or "org/name" (no path separators beyond one slash, no file suffix)."""
    from lmforge.hub import is_repo_id

    return is_repo_id(name) and not name.endswith((".json", ".txt"))
