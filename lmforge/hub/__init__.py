"""Checkpoints in Hugging Face's layout, for any model family; the hub never imports a model.

A model directory holds `config.json`, `model.safetensors` (Hugging Face parameter names; or shards
listed in `model.safetensors.index.json`) and the tokenizer files. A model id ("gpt2", "org/name") is
found offline in the local Hugging Face cache; nothing here ever uses the network.

    resolve.py     a path or a cached model id -> the model directory
    weights.py     weight files: safetensors, shards + index, weights-only pickles; atomic writes
    keymap.py      KeyRule / KeyMap: the declarative name maps each family writes in its own file
    checkpoint.py  save / load a model directory with the map the model class declares
"""

from lmforge.hub.checkpoint import (
    ADAPTER_SUFFIXES,
    key_map,
    load_hf_state_dict,
    load_pretrained,
    save_pretrained,
    to_hf_state_dict,
    torch_dtype,
)
from lmforge.hub.keymap import KeyMap, KeyRule
from lmforge.hub.resolve import cached_snapshot, hf_cache_dir, is_repo_id, read_config_dict, resolve_model_dir
from lmforge.hub.weights import (
    LEGACY_WEIGHTS_INDEX_NAME,
    LEGACY_WEIGHTS_NAME,
    SHARD_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    parse_size,
    read_safetensors,
    read_sharded,
    read_weights,
)

__all__ = [
    "torch_dtype",
    "ADAPTER_SUFFIXES",
    "KeyMap",
    "KeyRule",
    "LEGACY_WEIGHTS_INDEX_NAME",
    "LEGACY_WEIGHTS_NAME",
    "SHARD_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "cached_snapshot",
    "hf_cache_dir",
    "is_repo_id",
    "key_map",
    "load_hf_state_dict",
    "load_pretrained",
    "parse_size",
    "read_config_dict",
    "read_safetensors",
    "read_sharded",
    "read_weights",
    "resolve_model_dir",
    "save_pretrained",
    "to_hf_state_dict",
]
