"""`pipeline(task, model=...)`: build the pipeline for a task from a model object or a local model.

    from lmforge import pipeline
    classify = pipeline("text-classification", model="runs/sentiment")     # a directory or a cached model id
    classify(["great film", "dull"])

A path or model id is loaded offline with the task's Auto class (the tokenizer from the same directory
unless `tokenizer=` is given); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lmforge import auto
from lmforge.auto import AutoTokenizer, model_type_of
from lmforge.hub import resolve_model_dir
from lmforge.models import registry
from lmforge.models.base import resolve_dtype
from lmforge.pipelines.base import Pipeline
from lmforge.pipelines.feature_extraction import FeatureExtractionPipeline, sentence_transformers_options
from lmforge.pipelines.fill_mask import FillMaskPipeline
from lmforge.pipelines.question_answering import QuestionAnsweringPipeline
from lmforge.pipelines.speech_recognition import AutomaticSpeechRecognitionPipeline, CTCSpeechRecognitionPipeline
from lmforge.pipelines.text2text import (
    SummarizationPipeline,
    Text2TextGenerationPipeline,
    TranslationPipeline,
    translation_languages,
)
from lmforge.pipelines.text_classification import TextClassificationPipeline
from lmforge.pipelines.text_generation import TextGenerationPipeline
from lmforge.pipelines.token_classification import TokenClassificationPipeline
from lmforge.pipelines.zero_shot import ZeroShotClassificationPipeline, checkpoint_choice

# task -> (the pipeline class, the Auto class that loads its model, default options)
TASKS: dict[str, tuple[type[Pipeline], type[Any] | None, dict[str, Any]]] = {
    "text-generation": (TextGenerationPipeline, auto.AutoModelForCausalLM, {}),
    "text-classification": (TextClassificationPipeline, auto.AutoModelForSequenceClassification, {}),
    "fill-mask": (FillMaskPipeline, auto.AutoModelForMaskedLM, {}),
    "token-classification": (TokenClassificationPipeline, auto.AutoModelForTokenClassification, {}),
    "question-answering": (QuestionAnsweringPipeline, auto.AutoModelForQuestionAnswering, {}),
    "feature-extraction": (FeatureExtractionPipeline, auto.AutoModel, {}),
    "sentence-embeddings": (FeatureExtractionPipeline, auto.AutoModel, {"pooling": "mean", "normalize": True}),
    "text2text-generation": (Text2TextGenerationPipeline, auto.AutoModelForSeq2SeqLM, {}),
    "translation": (TranslationPipeline, auto.AutoModelForSeq2SeqLM, {}),  # also translation_XX_to_YY
    "summarization": (SummarizationPipeline, auto.AutoModelForSeq2SeqLM, {}),
    "automatic-speech-recognition": (AutomaticSpeechRecognitionPipeline, auto.AutoModelForSpeechSeq2Seq, {}),
    # no fixed Auto class: `checkpoint_choice` picks one from the checkpoint (NLI classifier, causal LM or encoder)
    "zero-shot-classification": (ZeroShotClassificationPipeline, None, {}),
}
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def available_tasks() -> list[str]:
    """Every task name `pipeline` accepts (aliases included)."""
    return sorted(TASKS) + sorted(ALIASES)


def _load(
    name: str,
    model: str | os.PathLike,
    auto_class: type[Any] | None,
    model_kwargs: dict[str, Any],
    options: dict[str, Any],
) -> Any:
    """The model of a directory or cached model id for task `name`, loaded offline; `options` gains the
    defaults the checkpoint implies (sentence-transformers pooling, the zero-shot scoring mode)."""
    directory = resolve_model_dir(model)
    if name == "sentence-embeddings":
        options.update(sentence_transformers_options(directory))
    if name == "automatic-speech-recognition" and _is_ctc(model_type_of(directory)):
        auto_class = auto.AutoModelForCTC
    if auto_class is None:
        auto_class, chosen = checkpoint_choice(directory)
        options.update(chosen)
    try:  # the checkpoint's model_type must have a class for this task
        registry.model_class(auto_class.task, model_type_of(directory), auto_class.__name__)
    except ValueError as err:
        raise ValueError(f"the {name} pipeline cannot use {os.fspath(model)!r}: {err}") from None
    return auto_class.from_pretrained(directory, **model_kwargs)


def _is_ctc(model_type: str) -> bool:
    """Whether config.json's `model_type` is a CTC speech recognizer (no tokenizer; its own pipeline class)."""
    try:
        registry.model_class(auto.AutoModelForCTC.task, model_type, "AutoModelForCTC")
    except ValueError:
        return False
    return True


def pipeline(
    task: str,
    model: Any = None,
    tokenizer: Any = None,
    device: int | str | torch.device | None = None,
    batch_size: int = 8,
    model_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    **kwargs: Any,
) -> Pipeline:
    """The pipeline for `task`, ready to call.

    Args:
        task: one of `available_tasks()`: text-generation, text-classification (sentiment-analysis),
            fill-mask, token-classification (ner), question-answering, feature-extraction,
            sentence-embeddings, zero-shot-classification, text2text-generation, translation (or
            translation_XX_to_YY, checked against the model's language pair), summarization,
            automatic-speech-recognition (audio files or arrays -> {"text": ...}; the feature extractor comes from
            the model's preprocessor_config.json unless `feature_extractor=` is given).
        model: a lmforge model object, or a local directory / model id of the local Hugging Face cache,
            loaded with the task's Auto class (`model_kwargs` go to its `from_pretrained`, e.g. dtype).
        tokenizer: a Tokenizer or a path; by default the model's own directory (a model object needs one).
        device: None (leave the model where it is), -1 / "cpu", 0 / "cuda:0", a torch.device.
        dtype: the model's weights in another dtype, e.g. "bfloat16" / "bf16" (GPUs, CPUs with native bf16).
        quantize: "int8" for int8 Linear layers (CPU inference: smaller and faster; `lmforge.nn.quantize`).
        batch_size: rows per forward pass; inputs are sorted by length first, results come back in order.
        **kwargs: the pipeline's options, the defaults of every call (e.g. `aggregation_strategy="simple"`).
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, one of {available_tasks()}; got {type(task).__name__}")
    name = ALIASES.get(task, task)
    if name.startswith("translation_"):
        translation_languages(name)  # a malformed translation_XX_to_YY name fails here
        options_task = {"task": name}
        name = "translation"
    else:
        options_task = {"task": name} if name in ("translation", "summarization", "text2text-generation") else {}
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; lmforge's pipelines are: {', '.join(available_tasks())}")
    pipeline_class, auto_class, defaults = TASKS[name]
    if model is None:
        raise ValueError(
            f"pipeline({task!r}) needs model=...: a lmforge model object, or a local model directory "
            "or the id of a model in the local Hugging Face cache (lmforge never downloads)"
        )
    options = dict(defaults)
    name_or_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    precision = {k: v for k, v in (("dtype", dtype), ("quantize", quantize)) if v is not None}
    ctc = name == "automatic-speech-recognition" and (
        _is_ctc(model_type_of(resolve_model_dir(model)))
        if isinstance(model, (str, os.PathLike))
        else hasattr(model, "ctc_head")
    )
    if ctc:
        pipeline_class = CTCSpeechRecognitionPipeline
    if isinstance(model, (str, os.PathLike)):
        loaded = _load(name, model, auto_class, {**(model_kwargs or {}), **precision}, options)
        if tokenizer is None and not ctc:
            try:
                tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model))
            except FileNotFoundError as err:
                raise ValueError(
                    f"no tokenizer found with the model {str(model)!r} ({err}); pass tokenizer=... "
                    "(a Tokenizer or its directory)"
                ) from None
        model = loaded
        if name == "automatic-speech-recognition" and kwargs.get("feature_extractor") is None:
            directory = resolve_model_dir(name_or_path)
            if (directory / "preprocessor_config.json").is_file():
                kwargs["feature_extractor"] = directory
    elif model_kwargs:
        raise ValueError("model_kwargs only apply when model is a path or model id to load")
    else:  # a model object: converted in place, as from_pretrained would have
        if dtype is not None:
            model.to(resolve_dtype(dtype))
        if quantize is not None:
            model.quantize(quantize)
    if tokenizer is None and not ctc:
        raise ValueError(
            f"pipeline({task!r}) with a model object needs tokenizer=... (a lmforge Tokenizer or the "
            "directory holding tokenizer.json)"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    options.update(kwargs)
    pipe = pipeline_class(model, tokenizer, device=device, batch_size=batch_size, **options_task, **options)
    pipe.task = options_task.get("task", name)
    pipe.name_or_path = name_or_path  # the folder or model id it was loaded from (None: a model object)
    return pipe
