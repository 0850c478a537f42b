"""Fine-tuning a pretrained model for a task, end to end: data file -> features -> Trainer -> metrics.

    finetune("classification", model="path/to/bert", train="reviews.tsv", out="runs/reviews")
    finetune("causal-lm", model="runs/shakespeare", train="pairs.jsonl", prefix="translate: ")

Tasks (one function each below, all sharing `finetune`):
- classification: txt/csv/tsv/jsonl with text (+ text_pair) and label -> accuracy, F1
- token-classification: CoNLL-style BIO file -> entity F1, token accuracy
- question-answering: SQuAD JSON -> exact match, F1 (long contexts split with a stride)
- causal-lm: the GPT way of adapting to a task: a task prefix in front of the input, the loss only on
  the target part -> loss and perplexity on targets; with `metric="bleu"` (translation) or "rouge"
  (summarisation) also greedy outputs for the evaluation examples, scored. Data: jsonl/csv/tsv with
  input/output fields (or prompt/completion, source/target, document/summary).
`train="sentiment"` uses the bundled English sentiment sentences (binary, |score| >= 1), a seeded
`eval_fraction` held out; `train="sentiment-zh"` the bundled Chinese reviews with their fixed test split;
`train="bible-en-es"` / `"bible-es-en"` the bundled verse pairs, whole books held out for evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.auto import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from lmforge.constants import IGNORE_INDEX, context_length
from lmforge.data import (
    DEFAULT_TEST_BOOKS,
    load_classification,
    load_conll,
    load_sentiment,
    load_squad,
    load_translation_pairs,
    load_zh_sentiment,
    prepare_qa_features,
    tokenize_and_align,
)
from lmforge.data.classification import MissingFieldError, read_records
from lmforge.data.qa_spans import QAChunk, decode_answers
from lmforge.files import atomic_write_text
from lmforge.nn.lora import LoRAConfig, apply_lora, merge_and_unload, trainable_parameters
from lmforge.training.args import TrainingArguments
from lmforge.training.metrics import classification_metrics, squad_metrics, token_classification_metrics
from lmforge.training.textgen import GENERATION_METRICS, generate_targets, score_generations
from lmforge.training.trainer import Trainer
from lmforge.utils import set_seed

TASKS = {
    "classification": "classification",
    "text-classification": "classification",
    "sentiment-analysis": "classification",
    "token-classification": "token-classification",
    "ner": "token-classification",
    "question-answering": "question-answering",
    "qa": "question-answering",
    "causal-lm": "causal-lm",
    "prefix": "causal-lm",
    "text-generation": "causal-lm",
}
IO_FIELDS = (("input", "output"), ("prompt", "completion"), ("source", "target"), ("document", "summary"))
#: `train=` names of the bundled translation pairs: (source, target) languages
BUNDLED_PAIRS = {"bible-en-es": ("en", "es"), "bible-es-en": ("es", "en")}
#: `train=` names of the bundled sentiment sets (classification)
BUNDLED_SENTIMENT = ("sentiment", "sentiment-zh")


@dataclass
class TaskData:
    """What a task hands the Trainer."""

    model: Any
    tokenizer: Any
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    compute_metrics: Callable | None = None
    evaluate_extra: Callable[[Any], dict[str, float]] | None = None  # task metrics computed after training
    info: dict[str, Any] = field(default_factory=dict)


def finetune(
    task: str,
    model: str | Path,
    train: str | Path,
    eval: str | Path | None = None,
    out: str | Path = "runs/finetune",
    eval_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_length: int | None = None,
    prefix: str = "",
    separator: str = "\n",
    lora: bool = False,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    doc_stride: int = 128,
    training: dict[str, Any] | None = None,
    seed: int = 42,
    device: str | None = None,
    resume: bool = False,
    metric: str | None = None,
    max_eval_generate: int = 200,
) -> dict[str, Any]:
    """Fine-tune `model` (a directory or cached id) on `train` for `task`; returns the evaluation metrics.

    Without `eval`, a seeded `eval_fraction` of the training file is held out. `training` holds
    TrainingArguments fields (learning_rate, num_train_epochs, ...). `lora=True` trains low-rank
    adapters on the attention projections (and the task head) instead of all weights.
    causal-lm only: `metric` "bleu" or "rouge" generates (greedily) the outputs of up to
    `max_eval_generate` evaluation examples after training and reports eval_bleu or
    eval_rouge1/2/L (0-100); the texts go to `out`/eval_generations.jsonl."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(set(TASKS))}")
    task = TASKS[task]
    if metric is not None:
        if metric not in GENERATION_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {GENERATION_METRICS} (or none)")
        if task != "causal-lm":
            raise ValueError(f"metric={metric!r} scores generated text: it needs task 'causal-lm', not {task!r}")
        if isinstance(max_eval_generate, bool) or not isinstance(max_eval_generate, int) or max_eval_generate < 1:
            raise ValueError(f"max_eval_generate must be a positive integer, got {max_eval_generate!r}")
    out = Path(out)
    opts = {
        "learning_rate": 1e-4 if lora else 5e-5,
        "num_train_epochs": 3.0,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "warmup_ratio": 0.1,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "logging_steps": 10,
        "seed": seed,
        "group_by_length": True,  # batches of similar length: less padding, faster epochs on a CPU
        **(training or {}),
        "output_dir": str(out),
    }
    if device:
        opts["device"] = device
    args = TrainingArguments.from_dict(opts)
    builder = {
        "classification": _classification,
        "token-classification": _token_classification,
        "question-answering": _question_answering,
        "causal-lm": _causal_lm,
    }[task]
    set_seed(seed)  # the new task head is drawn while loading: the same seed gives the same run
    data = builder(
        model=model,
        train=train,
        eval=eval,
        eval_fraction=eval_fraction,
        max_length=max_length,
        prefix=prefix,
        separator=separator,
        text_field=text_field,
        label_field=label_field,
        text_pair_field=text_pair_field,
        doc_stride=doc_stride,
        seed=seed,
        max_train_examples=max_train_examples,
        metric=metric,
        max_eval_generate=max_eval_generate,
    )
    net = data.model
    if lora:
        heads = [name for name in ("classifier", "score", "qa_outputs") if hasattr(net, name)]
        apply_lora(net, LoRAConfig(r=lora_r, alpha=lora_alpha, modules_to_save=heads))
        trainable, total = trainable_parameters(net)
        print(
            f"lmforge: LoRA r={lora_r}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
        )
    print(f"lmforge: {task}: {len(data.train):,} training / {len(data.eval or []):,} evaluation examples -> {out}")
    trainer = Trainer(
        net,
        args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        tokenizer=data.tokenizer,
        compute_metrics=data.compute_metrics,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if data.evaluate_extra is not None:
        metrics.update(data.evaluate_extra(trainer))
    if lora:  # the adapters are in out/ too; also write a plain merged model users can load anywhere
        merged = merge_and_unload(net)
        merged.save_pretrained(out / "merged")
        data.tokenizer.save_pretrained(out / "merged")
    metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}
    report = {
        "task": task,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval or []),
        "steps": result.global_step,
        **data.info,
        **metrics,
    }
    atomic_write_text(out / "eval_results.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


# ---------------------------------------------------------------------------------- shared helpers
def _split(examples: list[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded hold-out split (the evaluation part is at least one example)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}; or pass an eval file")
    if len(examples) < 2:
        raise ValueError(
            f"only {len(examples)} example(s): need at least 2 to hold one out for evaluation, or pass an eval file"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _limit(examples: list[Any], n: int | None) -> list[Any]:
    return examples if n is None else examples[:n]


def _tokenizer_and_length(model: str | Path, max_length: int | None, default: int, config: Any) -> tuple[Any, int]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    limit = context_length(config, default)
    return tokenizer, min(max_length or default, limit)


def _load_examples(
    train: str | Path,
    eval: str | Path | None,
    eval_fraction: float,
    seed: int,
    reader: Callable[[str | Path], list[Any]],
    max_train: int | None,
) -> tuple[list[Any], list[Any]]:
    if eval is None:
        train_ex, eval_ex = _split(reader(train), eval_fraction, seed)
    else:
        train_ex, eval_ex = reader(train), reader(eval)
    return _limit(train_ex, max_train), eval_ex


# ---------------------------------------------------------------------------------- the tasks
def _classification(
    model: str | Path,
    train: str | Path,
    eval: str | Path | None,
    eval_fraction: float,
    max_length: int | None,
    text_field: str,
    label_field: str,
    text_pair_field: str | None,
    seed: int,
    max_train_examples: int | None,
    **_: Any,
) -> TaskData:
    if str(train) in BUNDLED_SENTIMENT and not Path(train).exists():
        if str(train) == "sentiment-zh":  # the bundled Chinese reviews carry a fixed test split
            train_ex, label2id = load_zh_sentiment("train")
            eval_ex, _ = load_zh_sentiment("test")
        else:  # the bundled English sentences: one seeded split into train / eval
            examples, label2id = load_sentiment(seed=seed)
            train_ex, eval_ex = _split(examples, eval_fraction, seed)
        if eval is not None:
            eval_ex, _ = load_classification(eval, text_field, label_field, text_pair_field, label2id)
    else:
        train_ex, label2id = load_classification(train, text_field, label_field, text_pair_field)
        if eval is None:
            train_ex, eval_ex = _split(train_ex, eval_fraction, seed)
        else:
            eval_ex, _ = load_classification(eval, text_field, label_field, text_pair_field, label2id)
    train_ex = _limit(train_ex, max_train_examples)
    id2label = {i: name for name, i in label2id.items()}
    config = AutoConfig.from_pretrained(model)
    tokenizer, length = _tokenizer_and_length(model, max_length, 128, config)
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=len(label2id), id2label=id2label, label2id=label2id
    )
    if getattr(net.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id  # GPT classifiers find the last real token by it

    def encode(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        texts = [ex["text"] for ex in examples]
        pairs = [ex["text_pair"] for ex in examples] if text_pair_field else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=length)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": ex["label"]} for i, ex in enumerate(examples)]

    return TaskData(
        net,
        tokenizer,
        encode(train_ex),
        encode(eval_ex),
        classification_metrics,
        info={"labels": id2label, "max_length": length},
    )


def _token_classification(
    model: str | Path,
    train: str | Path,
    eval: str | Path | None,
    eval_fraction: float,
    max_length: int | None,
    seed: int,
    max_train_examples: int | None,
    **_: Any,
) -> TaskData:
    train_ex, eval_ex = _load_examples(train, eval, eval_fraction, seed, load_conll, max_train_examples)
    tags = sorted({t for ex in train_ex + eval_ex for t in ex["tags"]}, key=lambda t: (t != "O", t[2:], t))
    label2id = {t: i for i, t in enumerate(tags)}
    id2label = {i: t for t, i in label2id.items()}
    config = AutoConfig.from_pretrained(model)
    tokenizer, length = _tokenizer_and_length(model, max_length, 128, config)
    net = AutoModelForTokenClassification.from_pretrained(
        model, num_labels=len(tags), id2label=id2label, label2id=label2id
    )
    return TaskData(
        net,
        tokenizer,
        tokenize_and_align(train_ex, tokenizer, label2id, length),
        tokenize_and_align(eval_ex, tokenizer, label2id, length),
        token_classification_metrics(id2label),
        info={"labels": id2label, "max_length": length},
    )


def _question_answering(
    model: str | Path,
    train: str | Path,
    eval: str | Path | None,
    eval_fraction: float,
    max_length: int | None,
    doc_stride: int,
    seed: int,
    max_train_examples: int | None,
    **_: Any,
) -> TaskData:
    train_ex, eval_ex = _load_examples(train, eval, eval_fraction, seed, load_squad, max_train_examples)
    config = AutoConfig.from_pretrained(model)
    tokenizer, length = _tokenizer_and_length(model, max_length, 384, config)
    stride = min(doc_stride, length // 2)
    net = AutoModelForQuestionAnswering.from_pretrained(model, num_labels=2)
    keys = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")

    def trainable(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: f[k] for k in keys if k in f} for f in features]

    eval_features = prepare_qa_features(eval_ex, tokenizer, length, stride)

    def answer_metrics(trainer: Any) -> dict[str, float]:
        """Best span across each question's chunks (or no answer) -> exact match and F1."""
        start, end = trainer.predict(trainable(eval_features)).predictions
        answers = predict_answers(
            eval_ex, eval_features, start, end, allow_impossible=any(ex["is_impossible"] for ex in train_ex + eval_ex)
        )
        refs = [ex["answers"]["text"] or [""] for ex in eval_ex]
        scores = squad_metrics([answers[ex["id"]] for ex in eval_ex], refs)
        return {f"eval_{k}": v for k, v in scores.items()}

    return TaskData(
        net,
        tokenizer,
        trainable(prepare_qa_features(train_ex, tokenizer, length, stride)),
        trainable(eval_features),
        None,
        answer_metrics,
        info={"max_length": length, "doc_stride": stride},
    )


def predict_answers(
    examples: list[dict[str, Any]],
    features: list[dict[str, Any]],
    start_logits: Any,
    end_logits: Any,
    allow_impossible: bool = False,
) -> dict[str, str]:
    """Each example's answer by `lmforge.data.qa_spans` (the question-answering pipeline's decoder): the best
    span over all its chunks; "" when `allow_impossible` and the no-answer score beats every span."""
    chunks: dict[Any, list[QAChunk]] = {ex["id"]: [] for ex in examples}
    for feature, s, e in zip(features, start_logits, end_logits):
        chunks[feature["example_id"]].append(QAChunk(feature["offset_mapping"], s, e))
    answers = {}
    for ex in examples:
        best = decode_answers(chunks[ex["id"]], handle_impossible_answer=allow_impossible)
        answers[ex["id"]] = ex["context"][best[0][1] : best[0][2]] if best else ""
    return answers


def _causal_lm(
    model: str | Path,
    train: str | Path,
    eval: str | Path | None,
    eval_fraction: float,
    max_length: int | None,
    prefix: str,
    separator: str,
    seed: int,
    max_train_examples: int | None,
    metric: str | None = None,
    max_eval_generate: int = 200,
    **_: Any,
) -> TaskData:
    info: dict[str, Any] = {"prefix": prefix, "separator": separator}
    if str(train) in BUNDLED_PAIRS and not Path(train).exists():  # held-out books are the evaluation set
        train_ex, eval_ex = load_translation_pairs(*BUNDLED_PAIRS[str(train)])
        random.Random(seed).shuffle(train_ex)  # so that max_train_examples takes verses from every book
        train_ex = _limit(train_ex, max_train_examples)
        if eval is not None:
            eval_ex = read_pairs(eval)
        else:
            info["held_out_books"] = list(DEFAULT_TEST_BOOKS)
    else:
        train_ex, eval_ex = _load_examples(train, eval, eval_fraction, seed, read_pairs, max_train_examples)
    config = AutoConfig.from_pretrained(model)
    tokenizer, length = _tokenizer_and_length(model, max_length, 1024, config)
    net = AutoModelForCausalLM.from_pretrained(model)
    info["max_length"] = length

    def encode(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [prefix_example(tokenizer, f"{prefix}{src}{separator}", tgt, length) for src, tgt in pairs]

    extra = None
    if metric is not None:
        info["metric"] = metric
        extra = _generation_metrics(
            tokenizer,
            eval_ex,
            prefix,
            separator,
            metric,
            max_eval_generate,
            stop_at_newline=not any("\n" in tgt for _, tgt in train_ex),
        )
    return TaskData(net, tokenizer, encode(train_ex), encode(eval_ex), evaluate_extra=extra, info=info)


def _generation_metrics(
    tokenizer: Any,
    eval_ex: list[tuple[str, str]],
    prefix: str,
    separator: str,
    metric: str,
    max_examples: int,
    stop_at_newline: bool,
) -> Callable[[Any], dict[str, float]]:
    """After training: greedy outputs for up to `max_examples` evaluation pairs (evenly spaced over
    the set, so every held-out book counts), scored by `metric`, written to eval_generations.jsonl.

    Outputs may run to the longest reference's length + 16 tokens; they stop at EOS, and at a
    newline when no training target holds one (a model that has not learnt EOS yet goes on)."""

    def run(trainer: Any) -> dict[str, float]:
        n = min(max_examples, len(eval_ex))
        if n == 0:
            return {}
        chosen = [eval_ex[i * len(eval_ex) // n] for i in range(n)]
        refs = [tgt for _, tgt in chosen]
        most = max(len(ids) for ids in tokenizer.encode_batch_fast(refs)) + 16
        preds = generate_targets(
            trainer.model,
            tokenizer,
            [f"{prefix}{src}{separator}" for src, _ in chosen],
            max_new_tokens=most,
            batch_size=trainer.args.per_device_eval_batch_size,
            stop="\n" if stop_at_newline else None,
        )
        lines = [
            json.dumps({"input": src, "reference": tgt, "prediction": pred}, ensure_ascii=False)
            for (src, tgt), pred in zip(chosen, preds)
        ]
        atomic_write_text(Path(trainer.output_dir) / "eval_generations.jsonl", "\n".join(lines) + "\n")
        scores = score_generations(metric, preds, refs)
        return {"eval_generated": n, **{f"eval_{k}": v for k, v in scores.items()}}

    return run


def prefix_example(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + target + EOS; labels score only the target and EOS (-100 on the prompt).
    Too long: the prompt loses tokens from its start, then the target from its end."""
    p = tokenizer.encode(prompt)
    t = tokenizer.encode(target) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    t = t[: max_length - 1]
    p = p[max(0, len(p) - (max_length - len(t))) :]
    return {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t}


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(input, output) pairs from jsonl/csv/tsv with fields input/output, prompt/completion,
    source/target or document/summary (the first pair a file has)."""
    path = Path(path)
    if path.name.lower().removesuffix(".xz").removesuffix(".gz").endswith(".txt"):
        raise ValueError(f"{path}: input/output pairs need named fields; use .jsonl, .csv or .tsv")
    for src, tgt in IO_FIELDS:
        try:
            rows = [row for _, row in read_records(path, [src, tgt])]
        except MissingFieldError:  # not these field names: try the next pair
            continue
        return [(str(r[src]), str(r[tgt])) for r in rows]
    raise ValueError(
        f"{path}: no input/output fields; give each record one of the field pairs "
        f"{', '.join('/'.join(p) for p in IO_FIELDS)}"
    )
