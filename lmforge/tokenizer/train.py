"""Training a tokenizer from text: GPT-2-style byte-level BPE (also over both sides of translation pairs, for
encoder-decoders) and BERT-style WordPiece.

Each recipe checks its arguments, builds the pipeline (``backends.py``), trains it on text files (read through
:mod:`lmforge.textio`: compressed or not, UTF-8, a byte-order mark dropped) or on an iterator of strings, and
returns the :class:`~lmforge.tokenizer.backends.TokenizerParts` that ``Tokenizer.train_bpe`` /
``Tokenizer.train_translation_bpe`` / ``Tokenizer.train_wordpiece`` turn into a tokenizer. Special tokens take
ids 0, 1, ... in the order given.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tokenizers import AddedToken, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge import textio
from lmforge.tokenizer.backends import (
    BERT_INPUT_NAMES,
    TokenizerParts,
    bert_template,
    bert_wordpiece_backend,
    bos_eos_template,
    byte_level_bpe_backend,
)

#: The roles WordPiece training gives its first special tokens, in order.
WORDPIECE_ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
#: The special tokens of a translation BPE, at ids 0, 1: pad (also the decoder start) and eos, as Seq2SeqConfig.
SEQ2SEQ_SPECIAL_TOKENS = ("<pad>", "</s>")


def train_bpe(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    iterator: Iterable[str] | None,
    vocab_size: int,
    min_frequency: int,
    special_tokens: Sequence[str],
    show_progress: bool,
) -> TokenizerParts:
    """Byte-level BPE over every one of the 256 byte symbols (see ``Tokenizer.train_bpe``): ``special_tokens[0]``
    is bos and eos, ``special_tokens[1]`` pad, the rest role-less."""
    special_tokens = list(special_tokens)
    backend = _train_byte_level_bpe(files, iterator, vocab_size, min_frequency, special_tokens, show_progress)
    roles: dict[str, str] = {}
    if special_tokens:
        roles["bos_token"] = roles["eos_token"] = special_tokens[0]
    if len(special_tokens) > 1:
        roles["pad_token"] = special_tokens[1]
    return TokenizerParts(backend, roles, special_tokens[2:])


def train_translation_bpe(
    pairs: Iterable[tuple[str, str]], vocab_size: int, min_frequency: int, show_progress: bool
) -> TokenizerParts:
    """One byte-level BPE over both sides of (source, target) pairs (see ``Tokenizer.train_translation_bpe``):
    a joint vocabulary lets an encoder-decoder share one embedding between source, target and output.

    The special tokens are :data:`SEQ2SEQ_SPECIAL_TOKENS`: ``<pad>`` = 0 (also the decoder start) and
    ``</s>`` = 1, the ids ``Seq2SeqConfig`` expects by default; encoding with special tokens appends ``</s>``,
    as a Marian tokenizer does. Byte-level BPE encodes any text, so there is no unknown token."""
    pad, eos = SEQ2SEQ_SPECIAL_TOKENS
    texts = (text for pair in pairs for text in pair)
    backend = _train_byte_level_bpe(None, texts, vocab_size, min_frequency, list(SEQ2SEQ_SPECIAL_TOKENS), show_progress)
    backend.post_processor = bos_eos_template(backend, None, eos)
    return TokenizerParts(backend, {"pad_token": pad, "eos_token": eos})


def _train_byte_level_bpe(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    iterator: Iterable[str] | None,
    vocab_size: int,
    min_frequency: int,
    special_tokens: list[str],
    show_progress: bool,
) -> BackendTokenizer:
    """GPT-2's byte-level BPE pipeline trained on files or strings, with `special_tokens` at ids 0, 1, ..."""
    _check_unique(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs the {len(alphabet)} "
            f"byte symbols plus {len(special_tokens)} special tokens; use at least "
            f"{len(alphabet) + len(special_tokens)}"
        )
    backend = byte_level_bpe_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    _train(backend, trainer, files, iterator)
    return backend


def train_wordpiece(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    iterator: Iterable[str] | None,
    vocab_size: int,
    min_frequency: int,
    lowercase: bool,
    strip_accents: bool | None,
    special_tokens: Sequence[str],
    show_progress: bool,
) -> TokenizerParts:
    """BERT's WordPiece pipeline (see ``Tokenizer.train_wordpiece``); the first special tokens play the
    :data:`WORDPIECE_ROLES`, the rest are role-less."""
    special_tokens = list(special_tokens)
    if len(special_tokens) < len(WORDPIECE_ROLES):
        raise ValueError(
            f"special_tokens={special_tokens} is too short: WordPiece training needs the "
            f"{len(WORDPIECE_ROLES)} BERT tokens in the order pad, unk, cls, sep, mask, e.g. "
            '("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")'
        )
    _check_unique(special_tokens)
    if vocab_size < len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(special_tokens)} special tokens; use a larger vocab_size"
        )
    roles = dict(zip(WORDPIECE_ROLES, special_tokens[: len(WORDPIECE_ROLES)], strict=True))
    backend = bert_wordpiece_backend(
        models.WordPiece(unk_token=roles["unk_token"], continuing_subword_prefix="##", max_input_chars_per_word=100),
        lowercase=lowercase,
        strip_accents=strip_accents,
        handle_chinese_chars=True,
    )
    vocab = _wordpiece_vocab(backend, _texts(files, iterator), vocab_size, min_frequency, special_tokens, show_progress)
    backend.model = models.WordPiece(
        vocab, unk_token=roles["unk_token"], continuing_subword_prefix="##", max_input_chars_per_word=100
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    backend.post_processor = bert_template(backend, roles["cls_token"], roles["sep_token"])
    return TokenizerParts(
        backend,
        roles,
        special_tokens[len(WORDPIECE_ROLES) :],
        {"model_input_names": list(BERT_INPUT_NAMES)},
    )


#: How many characters can have a symbol for "this character inside a word": the code points of Unicode's
#: supplementary private use planes 15 and 16, which BERT's normalizer removes from text (a pipeline that kept them
#: is refused).
_PLANE = 0xFFFE


class _ContinuationMarks(dict[int, int]):
    """str.translate table: a character's code -> the code of the private-use symbol that stands for it inside a
    word, given out in order of first sight; `new` lists the characters seen since it was last emptied."""

    def __init__(self) -> None:
        super().__init__()
        self.new: list[int] = []

    def __missing__(self, code: int) -> int:
        n = len(self)
        if n == 2 * _PLANE:
            raise ValueError(f"WordPiece training supports up to {2 * _PLANE} distinct characters inside words")
        self[code] = mark = (0xF0000 if n < _PLANE else 0x100000 - _PLANE) + n
        self.new.append(code)
        return mark


def _wordpiece_vocab(
    backend: BackendTokenizer,
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    special_tokens: list[str],
    show_progress: bool,
) -> dict[str, int]:
    """WordPiece's vocabulary (piece -> id) learnt from `texts` by BPE merges, as tokenizers' WordPieceTrainer
    learns it, but the same on every run.

    tokenizers' trainer gives the ``##x`` symbols their ids in hash-map order, and merges of equal counts are
    ranked by those ids, so two runs on the same text learn different vocabularies (tokenizers issue #1794).
    Here each word is split by `backend`'s own normalizer and pre-tokenizer, and every character after the first
    is replaced by a private-use symbol of its own: BPE then learns over an alphabet whose ids are fixed (sorted
    by code point), and the symbols are turned back into ``##`` pieces afterwards. Every character also joins the
    alphabet on its own, as in the WordPiece trainer."""
    marks = _ContinuationMarks()
    normalize, split = backend.normalizer.normalize_str, backend.pre_tokenizer.pre_tokenize_str

    def lines() -> Iterator[str]:  # each text as its words, inner characters marked, space-separated
        for text in texts:
            text = normalize(text)  # BERT's clean-text step drops private-use characters (category Co)
            if text and max(text) >= "\U000f0000":
                raise ValueError(
                    "the normalized training text holds a character of Unicode's private use planes 15-16 "
                    f"(U+{ord(max(text)):X}), which WordPiece training reserves; remove such characters"
                )
            words = [word[0] + word[1:].translate(marks) for word, _ in split(text)]
            if marks.new:  # a character first seen inside a word: it is also a piece on its own
                words += map(chr, marks.new)
                marks.new.clear()
            yield " ".join(words)

    bpe = BackendTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        show_progress=show_progress,
    )
    bpe.train_from_iterator(lines(), trainer)
    unmark = {mark: code for code, mark in marks.items()}
    specials = set(special_tokens)
    vocab: dict[str, int] = {}
    for symbol, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):  # special tokens first
        piece = symbol if symbol in specials else symbol.translate(unmark)
        # (a learnt word that spells a special token, e.g. "bos", is that token: ids stay 0..n-1 without a gap)
        vocab.setdefault("##" + piece if ord(symbol[0]) in unmark else piece, len(vocab))
    return vocab


def _check_unique(special_tokens: list[str]) -> None:
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}; list each once")


def _train(
    backend: BackendTokenizer,
    trainer: Any,
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    iterator: Iterable[str] | None,
) -> None:
    """Train ``backend`` on exactly one of ``files`` / ``iterator``."""
    backend.train_from_iterator(_texts(files, iterator), trainer)


def _texts(
    files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None, iterator: Iterable[str] | None
) -> Iterable[str]:
    """The training text: ``iterator``, or the lines of each file in turn (endings kept: an iterator over the same
    lines trains the same tokenizer). The arguments are checked now, before the (long) training starts."""
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
        return iterator
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)  # type: ignore[arg-type]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("files is empty; pass at least one text file path")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"training file not found: {p!r}")
    return itertools.chain.from_iterable(map(textio.iter_lines, paths))
