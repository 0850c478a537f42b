"""`pipeline(task, model=...)`: build the pipeline for a task from a model object or a local model.

    from lmforge import pipeline
    classify = pipeline("text-classification", model="runs/sentiment")     # a directory or a cached model id
    classify(["great film", "dull"])

A path or model id is loaded offline with the task's Auto class (the tokenizer from the same directory
unless `tokenizer=` is given); nothing is ever downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.pipelines.base import Pipeline

# task -> (module:class of the pipeline, the Auto class that loads its model, default options)
TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "text-generation": ("text_generation:TextGenerationPipeline", "AutoModelForCausalLM", {}),
    "text-classification": ("text_classification:TextClassificationPipeline", "AutoModelForSequenceClassification",
                            {}),
    "fill-mask": ("fill_mask:FillMaskPipeline", "AutoModelForMaskedLM", {}),
    "token-classification": ("token_classification:TokenClassificationPipeline", "AutoModelForTokenClassification",
                             {}),
    "question-answering": ("question_answering:QuestionAnsweringPipeline", "AutoModelForQuestionAnswering", {}),
    "feature-extraction": ("feature_extraction:FeatureExtractionPipeline", "AutoModel", {}),
    "sentence-embeddings": ("feature_extraction:FeatureExtractionPipeline", "AutoModel",
                            {"pooling": "mean", "normalize": True}),
    # no fixed Auto class: the pipeline picks one from the checkpoint (NLI classifier, causal LM or encoder)
    "zero-shot-classification": ("zero_shot:ZeroShotClassificationPipeline", "", {}),
}
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def available_tasks() -> list[str]:
    """Every task name `pipeline` accepts (aliases included)."""
    return sorted(TASKS) + sorted(ALIASES)


def _pipeline_class(target: str) -> type[Pipeline]:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(f"lmforge.pipelines.{module}"), name)


def _sentence_transformers_defaults(directory: Path) -> dict[str, Any]:
    """Pooling, normalization and length from a sentence-transformers folder (modules.json & co), if any."""
    options: dict[str, Any] = {}
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        config = json.loads((directory / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return options
    if isinstance(config.get("max_seq_length"), int):
        options["max_length"] = config["max_seq_length"]
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
    options["normalize"] = "Normalize" in types
    if "Pooling" in types:
        try:
            pooling = json.loads((directory / types["Pooling"] / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pooling = {}
        if pooling.get("pooling_mode_cls_token"):
            options["pooling"] = "cls"
        elif pooling.get("pooling_mode_mean_tokens"):
            options["pooling"] = "mean"
    return options


def pipeline(task: str, model: Any = None, tokenizer: Any = None, device: int | str | torch.device | None = None,
             batch_size: int = 8, model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Pipeline:
    """The pipeline for `task`, ready to call.

    Args:
        task: one of `available_tasks()`: text-generation, text-classification (sentiment-analysis),
            fill-mask, token-classification (ner), question-answering, feature-extraction,
            sentence-embeddings, zero-shot-classification.
        model: a lmforge model object, or a local directory / model id of the local Hugging Face cache,
            loaded with the task's Auto class (`model_kwargs` go to its `from_pretrained`, e.g. dtype).
        tokenizer: a Tokenizer or a path; by default the model's own directory (a model object needs one).
        device: None (leave the model where it is), -1 / "cpu", 0 / "cuda:0", a torch.device.
        batch_size: rows per forward pass; inputs are sorted by length first, results come back in order.
        **kwargs: the pipeline's options, the defaults of every call (e.g. `aggregation_strategy="simple"`).
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, one of {available_tasks()}; got {type(task).__name__}")
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; lmforge's pipelines are: {', '.join(available_tasks())}")
    target, auto_name, defaults = TASKS[name]
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=...: a lmforge model object, or a local model directory "
                         "or the id of a model in the local Hugging Face cache (lmforge never downloads)")
    options = dict(defaults)
    name_or_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if isinstance(model, (str, os.PathLike)):
        from lmforge import auto
        from lmforge.hub import resolve_model_dir

        directory = resolve_model_dir(model)
        if name == "sentence-embeddings":
            options.update(_sentence_transformers_defaults(directory))
        if not auto_name:  # the pipeline chooses the Auto class (and default options) from the checkpoint
            auto_name, chosen = _pipeline_class(target).checkpoint_choice(directory)  # type: ignore[attr-defined]
            options.update(chosen)
        try:
            loaded = getattr(auto, auto_name).from_pretrained(directory, **(model_kwargs or {}))
        except ValueError as err:
            if "not supported by" in str(err):
                raise ValueError(f"the {name} pipeline cannot use {str(model)!r}: {err}") from None
            raise
        if tokenizer is None:
            try:
                tokenizer = auto.AutoTokenizer.from_pretrained(directory)
            except FileNotFoundError as err:
                raise ValueError(f"no tokenizer found with the model {str(model)!r} ({err}); pass tokenizer=... "
                                 "(a Tokenizer or its directory)") from None
        model = loaded
    elif model_kwargs:
        raise ValueError("model_kwargs only apply when model is a path or model id to load")
    if tokenizer is None:
        raise ValueError(f"pipeline({task!r}) with a model object needs tokenizer=... (a lmforge Tokenizer or the "
                         "directory holding tokenizer.json)")
    if isinstance(tokenizer, (str, os.PathLike)):
        from lmforge.auto import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    options.update(kwargs)
    pipe = _pipeline_class(target)(model, tokenizer, device=device, batch_size=batch_size, **options)
    pipe.task = name
    pipe.name_or_path = name_or_path  # the folder or model id it was loaded from (None: a model object)
    return pipe
