"""The Hugging Face tokenizer directory: its file names, reading and writing ``tokenizer.json`` with the
``tokenizer_config.json`` / ``special_tokens_map.json`` beside it, and the special-token roles and settings those
files declare.

It also holds the one table of ``tokenizer_class`` names (a field of ``tokenizer_config.json``) that lmforge
understands: which legacy vocabulary each class means (read by ``legacy.py``) and which inputs it returns.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.files import atomic_write_text
from lmforge.hub import cached_snapshot, is_repo_id
from lmforge.tokenizer.backends import BERT_INPUT_NAMES, TokenizerParts

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

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class LegacyVocab(enum.Enum):
    """A legacy ("slow") vocabulary that a ``tokenizer_class`` reads when a directory has no tokenizer.json."""

    GPT2_BPE = "GPT-2's byte-level BPE"  # vocab.json + merges.txt
    BERT_WORDPIECE = "BERT's WordPiece"  # vocab.txt, [CLS] A [SEP] [B [SEP]], segment ids
    MARIAN_SPM = "Marian's SentencePiece models"  # source.spm + target.spm + vocab.json (read by marian.py)


#: ``tokenizer_class`` values lmforge understands -> the legacy vocabulary they mean. Other classes read the same
#: files differently (RoBERTa adds <s>...</s>, GPT-1 uses </w> word ends, MPNet <s>...</s>), so without a
#: tokenizer.json only these load; BERT's classes also return ``token_type_ids``; Marian's load as a
#: ``MarianTokenizer`` (marian.py), not a ``Tokenizer``.
TOKENIZER_CLASSES: dict[str, LegacyVocab] = {
    "GPT2Tokenizer": LegacyVocab.GPT2_BPE,
    "GPT2TokenizerFast": LegacyVocab.GPT2_BPE,
    "WhisperTokenizer": LegacyVocab.GPT2_BPE,  # GPT-2's byte-level BPE files + Whisper's added tokens
    "WhisperTokenizerFast": LegacyVocab.GPT2_BPE,
    "BertTokenizer": LegacyVocab.BERT_WORDPIECE,
    "BertTokenizerFast": LegacyVocab.BERT_WORDPIECE,
    "MarianTokenizer": LegacyVocab.MARIAN_SPM,
}

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


def legacy_vocab_of(config: Mapping[str, Any]) -> LegacyVocab | None:
    """The legacy vocabulary the config's ``tokenizer_class`` means, or None (no class, or one not in
    :data:`TOKENIZER_CLASSES`)."""
    return TOKENIZER_CLASSES.get(str(config.get("tokenizer_class")))


# ---------------------------------------------------------------------- reading
def resolve_tokenizer_path(path: str | os.PathLike[str]) -> Path:
    """A local path as given (a directory or a file in one), or the local Hugging Face cache snapshot of a model
    id ("gpt2", "org/name": no path separators beyond one slash, no .json/.txt suffix)."""
    resolved = Path(path).expanduser()
    name = str(resolved)
    if not resolved.exists() and is_repo_id(name) and not name.endswith((".json", ".txt")):
        return cached_snapshot(name)
    return resolved


def read_tokenizer_file(path: Path) -> TokenizerParts:
    """A lone ``tokenizer.json``; special-token roles are inferred from well-known token strings."""
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: looked for {str(path)!r}; expected a tokenizer.json "
            "written by Tokenizer.save_pretrained or tokenizers.Tokenizer.save"
        )
    backend = load_backend(path)
    roles, additional = infer_special_tokens(backend)
    return TokenizerParts(backend, roles, additional)


def read_tokenizer_dir(tokenizer_file: Path, directory: Path) -> TokenizerParts:
    """``tokenizer_file`` with the roles and settings of the config files in ``directory`` (the config wins over
    special_tokens_map.json); with neither file, roles are inferred as in :func:`read_tokenizer_file`."""
    backend = load_backend(tokenizer_file)
    config = read_json(directory / CONFIG_FILE)
    token_map = read_json(directory / SPECIAL_TOKENS_MAP_FILE)
    roles, additional = configured_special_tokens(config, token_map)
    if not roles and not additional:
        roles, additional = infer_special_tokens(backend)
    return TokenizerParts(
        backend,
        {role: token_content(token) for role, token in roles.items()},
        [token_content(t) for t in additional],
        config_settings(config),
    )


def load_backend(path: Path) -> BackendTokenizer:
    """The pipeline of a ``tokenizer.json``, with any padding/truncation it carries switched off (the Tokenizer
    applies its own, per call)."""
    backend = BackendTokenizer.from_file(str(path))
    backend.no_padding()
    backend.no_truncation()
    return backend


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when there is no such file."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 JSON ({err}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def config_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor settings a ``tokenizer_config.json`` may carry."""
    settings: dict[str, Any] = {}
    if "model_max_length" in config:
        settings["model_max_length"] = int(config["model_max_length"])
    if "padding_side" in config:
        settings["padding_side"] = config["padding_side"]
    if "model_input_names" in config:
        settings["model_input_names"] = config["model_input_names"]
    elif legacy_vocab_of(config) is LegacyVocab.BERT_WORDPIECE:
        settings["model_input_names"] = list(BERT_INPUT_NAMES)
    return settings


def configured_special_tokens(first: Mapping[str, Any], second: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
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


def token_content(value: Any) -> str | None:
    """A special token as written by Hugging Face: a str, None, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}; expected a str or {{'content': str}}")


def added_token(value: Any, special: bool) -> AddedToken:
    """An ``AddedToken`` from a str or a Hugging Face AddedToken dict, keeping the dict's flags
    (lstrip/rstrip change which spaces the token swallows, hence the ids)."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    content = token_content(value)
    flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip") if k in value}
    return AddedToken(content, special=special, normalized=bool(value.get("normalized", not special)), **flags)


def infer_special_tokens(backend: BackendTokenizer) -> tuple[dict[str, str], list[str]]:
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


# ---------------------------------------------------------------------- writing
def write_tokenizer_dir(
    directory: Path,
    backend: BackendTokenizer,
    special_tokens: Mapping[str, str],
    additional_special_tokens: Sequence[str],
    settings: Mapping[str, Any],
) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``directory``
    (created if needed), each atomically, so that ``transformers.AutoTokenizer`` loads them as a
    ``PreTrainedTokenizerFast``; return the paths written. ``settings``: model_max_length, padding_side,
    model_input_names."""
    directory.mkdir(parents=True, exist_ok=True)
    token_map: dict[str, Any] = dict(special_tokens)
    if additional_special_tokens:
        token_map["additional_special_tokens"] = list(additional_special_tokens)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **token_map,
        "model_max_length": settings["model_max_length"],
        "padding_side": settings["padding_side"],
        "truncation_side": "right",
        "model_input_names": list(settings["model_input_names"]),
        # decode must stay lossless: never "clean up" spaces before punctuation
        "clean_up_tokenization_spaces": False,
    }
    files = {
        TOKENIZER_FILE: backend.to_str(pretty=True),
        CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        SPECIAL_TOKENS_MAP_FILE: json.dumps(token_map, indent=2, ensure_ascii=False) + "\n",
    }
    written = []
    for name, text in files.items():
        atomic_write_text(directory / name, text)
        written.append(str(directory / name))
    return written
