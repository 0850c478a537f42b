"""Values every layer agrees on, defined once.

`IGNORE_INDEX` marks a label that no loss or metric counts (padding, prompt tokens, the positions
MLM leaves unmasked), as in PyTorch's ``cross_entropy(ignore_index=-100)`` and Hugging Face.
`NO_LENGTH_LIMIT` is the "no known maximum length" of a tokenizer (transformers' ``int(1e30)``).
`context_length` reads a model config's longest input under any family's key name.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
NO_LENGTH_LIMIT = int(1e30)

# the floating-point dtypes users may name (CLI --dtype, from_pretrained(dtype=...)) -> torch's names
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# config keys that hold the number of positions a model takes, by family (first present wins)
_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "max_target_positions")


def context_length(config: Any, default: int | None = None) -> int | None:
    """The longest sequence `config`'s model takes (GPT's `n_positions`, BERT's
    `max_position_embeddings`, ...), or `default` when the config states none."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if value:
            return int(value)
    return default
