"""Which lmforge class serves which checkpoint, filled by each family's own file.

A family decorates its model classes with `@register(task)`; the class's `config_class.model_types`
(config.json's `model_type` values) and its names (`hf_architecture`, the class name: config.json's
`architectures`) are recorded. The Auto classes and `lmforge convert` look classes up here; importing
`lmforge.models` imports every family, so the tables are full.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

# task (e.g. "causal-lm", "masked-lm", "question-answering") -> model_type -> model class; a family
# that brings a new task (e.g. "seq2seq-lm") creates its table by registering a class for it
_MODELS: defaultdict[str, dict[str, type]] = defaultdict(dict)
_CONFIGS: dict[str, type] = {}  # model_type -> config class
_ARCHITECTURES: dict[str, type] = {}  # Hugging Face or lmforge class name -> model class

M = TypeVar("M", bound=type)


def register(task: str) -> Callable[[M], M]:
    """Class decorator: the class serves `task` for every model_type its config class reads."""

    def add(cls: M) -> M:
        for model_type in cls.config_class.model_types:
            _MODELS[task][model_type] = cls
            _CONFIGS[model_type] = cls.config_class
        _ARCHITECTURES[cls.hf_architecture] = cls
        _ARCHITECTURES[cls.__name__] = cls
        return cls

    return add


def _unsupported(model_type: str, what: str, table: dict[str, type]) -> ValueError:
    return ValueError(f"model_type {model_type!r} is not supported by {what}; lmforge supports {sorted(table)}")


def model_class(task: str, model_type: str, what: str) -> type:
    """The class for `task` and config.json's `model_type`; `what` (e.g. "AutoModel") names the caller
    in the error."""
    table = _MODELS.get(task, {})
    if model_type not in table:
        raise _unsupported(model_type, what, table)
    return table[model_type]


def config_class(model_type: str, what: str) -> type:
    """The config class that reads config.json's `model_type`."""
    if model_type not in _CONFIGS:
        raise _unsupported(model_type, what, _CONFIGS)
    return _CONFIGS[model_type]


def architecture_class(name: str) -> type | None:
    """The class named by config.json's `architectures` entry (Hugging Face's or lmforge's name), if any."""
    return _ARCHITECTURES.get(name)
