"""The ``Tokenizer`` class: a thin, Hugging Face-shaped API over a Rust ``tokenizers`` pipeline (the *backend*).

The backend does the heavy lifting (fast batched encoding, decoding); this class adds what it does not know: which
token plays which role (eos, pad, ...), the padding side and the model's maximum length, and the ``__call__`` that
models and trainers expect (padding, truncation, attention masks, tensors). Building a tokenizer is delegated: the
training recipes to ``train.py``, reading and writing the Hugging Face directory (``tokenizer.json`` and its config
files) to ``layout.py``, the legacy files of checkpoints without a ``tokenizer.json`` to ``legacy.py``. Each hands
back the same parts (backend, ``{role: token}``, settings), so a new recipe or reader needs no change here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding, decoders
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.constants import NO_LENGTH_LIMIT
from lmforge.tokenizer import legacy, train
from lmforge.tokenizer.backends import TokenizerParts
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
    SPECIAL_TOKEN_ROLES,
    TOKENIZER_FILE,
    read_tokenizer_dir,
    read_tokenizer_file,
    resolve_tokenizer_path,
    write_tokenizer_dir,
)


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


class Tokenizer(PaddingSide):
    """A trained tokenizer with a Hugging Face-like API (``__call__``, ``encode``, ``decode``,
    ``save_pretrained`` / ``from_pretrained``).

    Args:
        backend: the ``tokenizers.Tokenizer`` that does the work. It must have no padding or
            truncation enabled; this class applies both itself, per call.
        special_tokens: ``{role: token}`` with roles from :data:`SPECIAL_TOKEN_ROLES`; every
            token must already be in the backend's vocabulary.
        additional_special_tokens: further special tokens that have no role.
        model_max_length: longest sequence the model accepts (used by ``truncation=True``);
            :data:`lmforge.constants.NO_LENGTH_LIMIT` means unknown.
        padding_side: "right" (default) or "left".
        model_input_names: keys ``__call__`` returns; add "token_type_ids" for BERT-style models.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        additional_special_tokens: Sequence[str] = (),
        model_max_length: int = NO_LENGTH_LIMIT,
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
        self._special_ids: tuple[tuple, frozenset[int]] = ((), frozenset())  # (what it was made from, the ids)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.model_input_names: list[str] = list(model_input_names)

    # ------------------------------------------------------------------ training recipes
    @classmethod
    def train_bpe(
        cls,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        iterator: Iterable[str] | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>"),
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE tokenizer on text files or an iterator of strings.

        Text is split with GPT-2's regex (no prefix space added) and every one of the 256 byte
        symbols is in the vocabulary, so any string encodes without unknown tokens and decodes
        back exactly. Files are read line by line (``.gz``/``.xz``/``.lzma``/``.bz2`` are
        decompressed on the fly, a UTF-8 byte-order mark is dropped); an iterator that yields
        the same lines gives the same tokenizer.

        ``special_tokens[0]`` becomes the eos and bos token, ``special_tokens[1]`` (if given)
        the pad token; any further ones are additional special tokens. They take ids 0, 1, ...
        """
        return cls._from_parts(
            train.train_bpe(files, iterator, vocab_size, min_frequency, special_tokens, show_progress)
        )

    @classmethod
    def train_translation_bpe(
        cls,
        pairs: Iterable[tuple[str, str]],
        vocab_size: int = 8000,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train one byte-level BPE over both sides of translation pairs (e.g. ``load_translation_pairs()[0]``)
        for an encoder-decoder with shared embeddings: ``<pad>`` = 0 (the decoder start), ``</s>`` = 1, the ids
        ``Seq2SeqConfig`` expects; ``tokenizer(text)`` appends ``</s>``. See ``train.train_translation_bpe``."""
        return cls._from_parts(train.train_translation_bpe(pairs, vocab_size, min_frequency, show_progress))

    @classmethod
    def train_wordpiece(
        cls,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
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
        returning ``token_type_ids``. Files are read as in :meth:`train_bpe`.

        The vocabulary is the same on every run over the same text (tokenizers' own WordPiece trainer
        breaks ties between equally frequent merges differently from run to run).

        ``special_tokens`` take ids 0, 1, ... and play, in order, the roles pad, unk, cls, sep
        and mask; any further ones are additional special tokens.
        """
        parts = train.train_wordpiece(
            files, iterator, vocab_size, min_frequency, lowercase, strip_accents, special_tokens, show_progress
        )
        return cls._from_parts(parts)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def _from_parts(cls, parts: TokenizerParts) -> Tokenizer:
        """The tokenizer a recipe or reader built (see :class:`~lmforge.tokenizer.backends.TokenizerParts`)."""
        return cls(
            parts.backend,
            parts.special_tokens,
            additional_special_tokens=parts.additional_special_tokens,
            **parts.settings,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json``; special-token roles are inferred from well-known token
        strings (``<|endoftext|>``, ``<|pad|>``, ``[CLS]``, ...)."""
        return cls._from_parts(read_tokenizer_file(Path(path)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a directory written by :meth:`save_pretrained` (or by Hugging Face), from a
        path to a file in it (its ``tokenizer.json``, ``vocab.json`` or ``vocab.txt``), or from a
        model id ("gpt2", "org/name") found in the local Hugging Face cache.

        Special tokens, ``padding_side`` and ``model_max_length`` come from
        ``tokenizer_config.json`` / ``special_tokens_map.json`` next to ``tokenizer.json``
        when present; otherwise roles are inferred as in :meth:`from_file`.

        A directory without ``tokenizer.json`` but with GPT-2's legacy ``vocab.json`` +
        ``merges.txt`` (as in the original ``gpt2`` checkpoint) loads as the byte-level BPE
        tokenizer Hugging Face's ``GPT2Tokenizer`` builds from them: same ids, same special
        tokens. One with BERT's ``vocab.txt`` instead loads as the WordPiece tokenizer of
        transformers' ``BertTokenizer`` (see :mod:`lmforge.tokenizer.legacy`).
        ``tokenizer.json`` wins when present.
        """
        path = resolve_tokenizer_path(path)
        if path.is_dir():
            if not (path / TOKENIZER_FILE).is_file():
                return cls._from_parts(legacy.read_legacy_dir(path))
            return cls._from_parts(read_tokenizer_dir(path / TOKENIZER_FILE, path))
        if path.is_file() and path.name in (legacy.VOCAB_FILE, legacy.MERGES_FILE):
            return cls._from_parts(legacy.read_gpt2_files(path.parent))
        if path.is_file() and path.name == legacy.BERT_VOCAB_FILE:
            return cls._from_parts(legacy.read_bert_files(path.parent))
        if path.is_file():
            return cls._from_parts(read_tokenizer_dir(path, path.parent))
        raise FileNotFoundError(
            f"tokenizer path not found: {str(path)!r}; expected a directory containing "
            f"{TOKENIZER_FILE} (as written by Tokenizer.save_pretrained), BERT's "
            f"{legacy.BERT_VOCAB_FILE} or GPT-2's {legacy.VOCAB_FILE} + {legacy.MERGES_FILE}, or the path of a "
            f"{TOKENIZER_FILE} file"
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
        into ``directory`` (created if needed), each atomically; return the paths written.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` loads the result as a
        ``PreTrainedTokenizerFast`` that gives the same ids and decoded text.
        """
        settings = {
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "model_input_names": self.model_input_names,
        }
        return write_tokenizer_dir(
            Path(directory), self._backend, self._special_tokens, self.additional_special_tokens, settings
        )

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

    def _special_id_set(self) -> frozenset[int]:
        """`set(all_special_ids)`, made again only when the special tokens change (a streamed decode asks for
        it twice per token)."""
        key = (tuple(self._special_tokens.values()), tuple(self.additional_special_tokens))
        if getattr(self, "_special_ids", ((),))[0] != key:  # (absent from a tokenizer pickled by an older version)
            self._special_ids = (key, frozenset(self.all_special_ids))
        return self._special_ids[1]

    def get_vocab(self) -> dict[str, int]:
        """``{token: id}`` for the whole vocabulary, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token string(s) for id(s); a single int gives a single string."""
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._backend.id_to_token(self._check_ids([int(ids)])[0])
        id_list = self._check_ids(as_id_list(ids))
        if skip_special_tokens:
            special = self._special_id_set()
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
        texts = as_text_list(text, "text")
        pairs: list[str] | None = None
        if text_pair is not None:
            if is_batch == isinstance(text_pair, str):
                raise ValueError(
                    "text and text_pair must both be str or both be lists of str, got "
                    f"{type(text).__name__} and {type(text_pair).__name__}"
                )
            pairs = as_text_list(text_pair, "text_pair")
            if len(pairs) != len(texts):
                raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs)}; pass one pair per text")
        pad_mode = padding_mode(padding, max_length)
        trunc_mode = truncation_mode(truncation)
        check_return_tensors(return_tensors)
        if pad_mode != "do_not_pad" and self.pad_token_id is None:
            raise ValueError(
                "padding was requested but this tokenizer has no pad token; set one first, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token, or call with padding=False"
            )

        inputs: list[Any] = texts if pairs is None else list(zip(texts, pairs, strict=True))
        if trunc_mode is None:
            with self._lock:
                encodings = self._backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        else:
            limit = self._truncation_limit(max_length)
            n_special = self._backend.num_special_tokens_to_add(pairs is not None) if add_special_tokens else 0
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

        pad_values = {
            "input_ids": self.pad_token_id,
            "token_type_ids": 0,
            "attention_mask": 0,
            "offset_mapping": (0, 0),
        }
        return pack_batch(columns, pad_mode, max_length, pad_values, self.padding_side, return_tensors, is_batch)

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
        if limit >= NO_LENGTH_LIMIT:
            raise ValueError("truncation=True needs a length: pass max_length=... or set tokenizer.model_max_length")
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
        return self.decoder(skip_special_tokens)(as_id_list(ids, what="decode"))

    def decoder(self, skip_special_tokens: bool = False) -> Callable[[list[int]], str]:
        """`decode` as a function of a list of ints, for decoding many short lists in a row (a streamed text is
        decoded twice per token): the special ids and the vocabulary size are looked up once, when it is made,
        not per call (they took three quarters of a short decode). Decodes as `decode` would then, and raises
        what it raises."""
        backend, size = self._backend, self.vocab_size
        special = self._special_id_set() if skip_special_tokens else frozenset()

        def decode(ids: list[int]) -> str:
            if ids and not (min(ids) >= 0 and max(ids) < size):
                self._check_ids(ids)  # raises, naming the id
            if special:
                ids = [i for i in ids if i not in special]
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode

    def token_bytes(self, skip_special_tokens: bool = False) -> list[bytes] | None:
        """Each id's bytes in decoded text, for a byte-level BPE tokenizer (GPT-2's: each character of a token
        stands for one byte, and a text is its tokens' bytes read as UTF-8); None for any other decoder. A stream
        can then be decoded a token at a time by an incremental UTF-8 decoder (`generation.IncrementalDecoder`)
        instead of twice a token over a window. Checked against `decode` over the whole vocabulary when made (None
        if any slice differs), and made again when the vocabulary or the special tokens change."""
        backend, size = self._backend, self.vocab_size
        special = self._special_id_set() if skip_special_tokens else frozenset()
        key = (skip_special_tokens, size, special)
        tables = self.__dict__.setdefault("_token_bytes", {})  # one per key: skipping does not evict keeping
        if key not in tables:
            tables[key] = _byte_level_table(backend, size, special, skip_special_tokens)
        return tables[key]

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` for each row of a 2-D tensor/array or a list of id lists."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in as_id_rows(sequences)]

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
            raise ValueError(f"unknown special-token role {role!r}; use one of {SPECIAL_TOKEN_ROLES}")

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
                self._backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._special_tokens[role] = token

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={t!r}" for r, t in self._special_tokens.items())
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, "
            f"model={type(self._backend.model).__name__}, {roles}, "
            f"padding_side={self.padding_side!r}, model_max_length={self.model_max_length})"
        )


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, DEL, NBSP, soft hyphen) for the characters from U+0100 on, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    shifted = [b for b in range(256) if b not in kept]
    chars = {chr(b): b for b in kept}
    chars.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return chars


def _byte_level_table(
    backend: BackendTokenizer, size: int, special: frozenset[int], skip_special_tokens: bool
) -> list[bytes] | None:
    """The bytes each id decodes to where the backend decodes byte-level BPE alone, checked against its decode."""
    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    chars = _gpt2_byte_chars()
    added = backend.get_added_tokens_decoder()
    table: list[bytes] = []
    for i in range(size):
        if i in special:
            table.append(b"")
        elif i in added:  # an added token decodes to its own text
            table.append(backend.decode([i], skip_special_tokens=skip_special_tokens).encode("utf-8"))
        else:
            token = backend.id_to_token(i)
            if token is None or any(c not in chars for c in token):
                return None
            table.append(bytes(chars[c] for c in token))
    step = 61  # slices that end inside characters too
    for start in range(0, size, step):
        ids = [i for i in range(start, min(start + step, size)) if i not in special]  # as `decode` skips them
        text = b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
        if text != backend.decode(ids, skip_special_tokens=skip_special_tokens):
            return None
    return table
