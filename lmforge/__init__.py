"""lmforge: a compact, readable PyTorch toolkit for pretrained Transformer language models.

Importing the package is cheap: heavy modules are loaded on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, so `import lmforge` stays fast)
_EXPORTS = {
    "GPTConfig": "lmforge.config",
    "GPTForCausalLM": "lmforge.models.gpt",
    "GPTModel": "lmforge.models.gpt",
    "CausalLMOutput": "lmforge.models.gpt",
    "Tokenizer": "lmforge.tokenizer",
    "GenerationConfig": "lmforge.generation",
    "sample_next_token": "lmforge.generation",
    "TrainingArguments": "lmforge.training.args",
    "Trainer": "lmforge.training.trainer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
