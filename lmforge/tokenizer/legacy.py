"""Readers of legacy ("slow") tokenizer files, for checkpoints without a ``tokenizer.json``.

GPT-2's ``vocab.json`` + ``merges.txt`` load as the byte-level BPE that transformers' ``GPT2Tokenizer`` builds from
them, and BERT's ``vocab.txt`` as the WordPiece of its ``BertTokenizer``: same ids, same special tokens. The optional
``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` beside them are read as transformers
reads them. Each reader returns the :class:`~lmforge.tokenizer.backends.TokenizerParts` of the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.tokenizer.backends import (
    BERT_INPUT_NAMES,
    TokenizerParts,
    bert_template,
    bert_wordpiece_backend,
    bos_eos_template,
    byte_level_bpe_backend,
)
from lmforge.tokenizer.layout import (
    CONFIG_FILE,
    SPECIAL_TOKEN_ROLES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CLASSES,
    TOKENIZER_FILE,
    LegacyVocab,
    added_token,
    config_settings,
    configured_special_tokens,
    legacy_vocab_of,
    read_json,
    token_content,
)
from lmforge.tokenizer.marian import is_marian_dir

# GPT-2's legacy files
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
#: GPT-2's one special token: bos, eos and unk unless a config says otherwise.
GPT2_SPECIAL_TOKEN = "<|endoftext|>"
# BERT's legacy vocabulary: one WordPiece token per line, the line number is its id
BERT_VOCAB_FILE = "vocab.txt"
#: BERT's special tokens by role: the defaults of transformers' ``BertTokenizer``.
BERT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# the files each legacy vocabulary is read from, for error messages
_FILES_OF = {LegacyVocab.GPT2_BPE: f"{VOCAB_FILE} + {MERGES_FILE}", LegacyVocab.BERT_WORDPIECE: BERT_VOCAB_FILE}


def read_legacy_dir(directory: Path) -> TokenizerParts:
    """A directory without tokenizer.json, from BERT's vocab.txt or GPT-2's vocab.json + merges.txt; when both
    kinds are there, the config's ``tokenizer_class`` decides. Marian's SentencePiece files are refused with a
    pointer to ``MarianTokenizer``."""
    if is_marian_dir(directory):
        raise ValueError(
            f"{str(directory)!r} holds Marian's SentencePiece tokenizer, which is not a Tokenizer; load it with "
            "lmforge.MarianTokenizer.from_pretrained or lmforge.AutoTokenizer.from_pretrained"
        )
    has_bert = (directory / BERT_VOCAB_FILE).is_file()
    has_gpt2 = (directory / VOCAB_FILE).is_file() or (directory / MERGES_FILE).is_file()
    if has_bert and has_gpt2:
        if legacy_vocab_of(read_json(directory / CONFIG_FILE)) is LegacyVocab.BERT_WORDPIECE:
            return read_bert_files(directory)
        return read_gpt2_files(directory)
    if has_bert:
        return read_bert_files(directory)
    return read_gpt2_files(directory)  # raises, listing what was expected


def read_bert_files(directory: Path) -> TokenizerParts:
    """The WordPiece tokenizer of a BERT-style directory without tokenizer.json.

    Mirrors what ``transformers``' ``BertTokenizer`` makes of ``vocab.txt`` (+ optional ``tokenizer_config.json`` /
    ``special_tokens_map.json``), so ids match: WordPiece over the vocabulary (unknown token ``unk_token``, ``##``
    continuation, words longer than 100 characters become unknown), BERT's normalizer (clean text, spaces around CJK
    characters when ``tokenize_chinese_chars``, lowercase when ``do_lower_case``, accents stripped when
    ``strip_accents`` or, if that is unset, when lowercasing), BERT's pre-tokenizer, the ``[CLS] A [SEP]`` /
    ``[CLS] A [SEP] B [SEP]`` post-processor with segment ids 0/1 and the ``##``-joining decoder. Special tokens
    default to [UNK] [SEP] [PAD] [CLS] [MASK]; one missing from vocab.txt gets the next free id. The tokenizer
    returns ``token_type_ids``.
    """
    vocab_path, config_path = directory / BERT_VOCAB_FILE, directory / CONFIG_FILE
    config = read_json(config_path)
    _check_tokenizer_class(config, config_path, LegacyVocab.BERT_WORDPIECE)
    vocab = _read_bert_vocab(vocab_path)
    roles, additional = _legacy_special_tokens(config, directory)
    for role, token in BERT_SPECIAL_TOKENS.items():
        roles.setdefault(role, token)
    cls_token, sep_token = token_content(roles["cls_token"]), token_content(roles["sep_token"])
    if cls_token is None or sep_token is None:
        raise ValueError(
            f"{str(config_path)!r} sets cls_token or sep_token to null, but BERT's inputs "
            'are [CLS] A [SEP] (B [SEP]); give both tokens (e.g. "[CLS]" and "[SEP]") '
            "or remove the null entries to use those defaults"
        )
    unk_token = token_content(roles["unk_token"]) or BERT_SPECIAL_TOKENS["unk_token"]

    backend = bert_wordpiece_backend(
        models.WordPiece(vocab, unk_token=unk_token, continuing_subword_prefix="##", max_input_chars_per_word=100),
        lowercase=bool(config.get("do_lower_case", True)),
        strip_accents=config.get("strip_accents"),  # None: follow lowercase, as BERT does
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
    )
    _add_legacy_added_tokens(backend, config, directory, roles, additional, len(vocab), BERT_VOCAB_FILE)
    backend.post_processor = bert_template(backend, cls_token, sep_token)
    return _parts(backend, roles, additional, {"model_input_names": list(BERT_INPUT_NAMES), **config_settings(config)})


def read_gpt2_files(directory: Path) -> TokenizerParts:
    """The byte-level BPE tokenizer of a GPT-2-style directory without tokenizer.json.

    Mirrors what ``transformers``' ``GPT2Tokenizer`` makes of the same files, so ids match: GPT-2's regex
    pre-tokenizer (a prefix space only if ``tokenizer_config.json`` sets ``add_prefix_space``), byte-level decoder,
    no unknown token in the model; bos, eos and unk default to ``<|endoftext|>``, pad to none. Every special token
    and every token of ``added_tokens.json`` (or of the config's ``added_tokens_decoder``) becomes an added token, so
    it is matched as a whole in the text; one missing from vocab.json gets the next free id, in Hugging Face's
    order. ``add_bos_token`` / ``add_eos_token`` in the config make the tokenizer add them, as Hugging Face does.
    """
    vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
    found = [p.name for p in (vocab_path, merges_path) if p.is_file()]
    if len(found) < 2:
        if found:
            other = MERGES_FILE if found[0] == VOCAB_FILE else VOCAB_FILE
            what = f"it has {found[0]} but no {other}"
        else:
            what = f"no {BERT_VOCAB_FILE} (BERT) or {VOCAB_FILE} + {MERGES_FILE} (GPT-2) either"
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
    config = read_json(directory / CONFIG_FILE)
    _check_tokenizer_class(config, directory / CONFIG_FILE, LegacyVocab.GPT2_BPE)
    vocab = _read_gpt2_vocab(vocab_path)
    merges = _read_gpt2_merges(merges_path, vocab)
    backend = byte_level_bpe_backend(
        models.BPE(vocab=vocab, merges=merges), add_prefix_space=bool(config.get("add_prefix_space", False))
    )
    roles, additional = _legacy_special_tokens(config, directory)
    for role in ("bos_token", "eos_token", "unk_token"):  # GPT2Tokenizer's defaults
        roles.setdefault(role, GPT2_SPECIAL_TOKEN)
    _add_legacy_added_tokens(backend, config, directory, roles, additional, len(vocab), VOCAB_FILE)

    add_bos = bool(config.get("add_bos_token", False)) and roles.get("bos_token") is not None
    add_eos = bool(config.get("add_eos_token", False)) and roles.get("eos_token") is not None
    if add_bos or add_eos:
        backend.post_processor = bos_eos_template(
            backend,
            token_content(roles["bos_token"]) if add_bos else None,
            token_content(roles["eos_token"]) if add_eos else None,
        )
    return _parts(backend, roles, additional, config_settings(config))


def _parts(
    backend: BackendTokenizer, roles: Mapping[str, Any], additional: Sequence[Any], settings: dict[str, Any]
) -> TokenizerParts:
    return TokenizerParts(
        backend,
        {role: token_content(token) for role, token in roles.items()},
        [token_content(t) for t in additional],
        settings,
    )


def _legacy_special_tokens(config: Mapping[str, Any], directory: Path) -> tuple[dict[str, Any], list[Any]]:
    """Roles and additional special tokens as transformers reads them next to legacy files:
    special_tokens_map.json overrides the config, unless the config has an ``added_tokens_decoder`` (a
    transformers >= 4.34 save), which makes it ignored."""
    token_map = {}
    if "added_tokens_decoder" not in config:
        token_map = read_json(directory / SPECIAL_TOKENS_MAP_FILE)
    return configured_special_tokens(token_map, config)


def _check_tokenizer_class(config: Mapping[str, Any], path: Path, vocab: LegacyVocab) -> None:
    """Refuse configs naming a tokenizer that reads the legacy files of ``vocab`` differently (RoBERTa adds
    <s>...</s>, GPT-1 uses </w> word ends, MPNet has other special tokens): they would load with wrong ids."""
    name = config.get("tokenizer_class")
    if name is not None and legacy_vocab_of(config) is not vocab:
        classes = " / ".join(n for n, v in TOKENIZER_CLASSES.items() if v is vocab)
        raise ValueError(
            f"{str(path)!r} names tokenizer_class {name!r}, but without a {TOKENIZER_FILE} only "
            f"{vocab.value} ({classes}) can be loaded from {_FILES_OF[vocab]}; write a {TOKENIZER_FILE} once with "
            "transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) and load that"
        )


def _read_bert_vocab(path: Path) -> dict[str, int]:
    """BERT's ``vocab.txt``: token ``i`` is line ``i`` (line ends stripped, a repeated token
    keeps its last line), read exactly as transformers' ``load_vocab`` does."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text ({err}); expected BERT's vocab.txt, one token per line"
        ) from None
    vocab = {line.rstrip("\n"): index for index, line in enumerate(lines)}
    if not vocab:
        raise ValueError(
            f"{str(path)!r} is empty; expected BERT's vocab.txt, one token per line (the line number is the id)"
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
            raise ValueError(f"{str(path)!r} gives token {token!r} the id {index!r}; {hint} (an integer >= 0)")
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
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}); expected GPT-2's merges.txt") from None
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
        raw = [(index, token) for token, index in read_json(source).items()]
    declared: list[tuple[int, AddedToken]] = []
    for index, value in raw:
        content = value.get("content") if isinstance(value, dict) else value
        if not isinstance(content, str) or isinstance(index, bool) or not str(index).isdigit():
            raise ValueError(f"{str(source)!r}: cannot read entry {index!r}: {value!r}; {expected}")
        if isinstance(value, dict):
            is_special = bool(value.get("special", False))
        else:
            is_special = content in special
        declared.append((int(index), added_token(value, special=is_special)))
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
    special = {token_content(t) for t in [*roles.values(), *additional]} - {None}
    declared, source = _declared_added_tokens(config, directory, special)
    # Hugging Face adds, in this order and skipping repeats: the declared added tokens (by
    # id), the role tokens (in role order), the additional special tokens. A token already
    # in the vocabulary keeps its id; a new one gets the next free id.
    to_add: dict[str, AddedToken] = {}
    for _, token in declared:
        to_add.setdefault(token.content, token)
    for token in [roles.get(r) for r in SPECIAL_TOKEN_ROLES] + list(additional):
        if token is not None:
            added = added_token(token, special=True)
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
