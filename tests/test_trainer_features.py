"""Tests of the Trainer's user-facing promises, from the outside: the Hugging Face-shaped script, datasets
as lists / `datasets.Dataset` / text, exact gradient accumulation over unevenly padded examples, sample
weights, evaluation and prediction, best-model tracking and early stopping, non-finite losses, edge-case
datasets, gradient checkpointing, LoRA, DDP (torchrun, gloo on CPU) and crash safety of checkpoint saves.

Every comparison is numeric (weights, logged losses, files on disk); equivalent runs are worked out so
that the arithmetic, not just the shape of the output, is checked.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets  # a dataset type users pass (test extra)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.config import BertConfig, GPTConfig
from lmforge.models.bert import BertForSequenceClassification, BertForTokenClassification
from lmforge.models.gpt import GPTForCausalLM, GPTForSequenceClassification
from lmforge.nn.lora import LoRAConfig, apply_lora, load_adapters
from lmforge.training import Trainer, TrainerCallback, TrainingArguments
from lmforge.training.metrics import classification_metrics
from lmforge.utils import set_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 40
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- builders
def gpt_lm(seed: int = 0, dropout: float = 0.0) -> GPTForCausalLM:
    set_seed(seed)
    return GPTForCausalLM(GPTConfig(vocab_size=VOCAB, n_positions=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def gpt_classifier(seed: int = 0, num_labels: int = 3, pad_token_id: int = 0) -> GPTForSequenceClassification:
    set_seed(seed)
    return GPTForSequenceClassification(
        GPTConfig(
            vocab_size=VOCAB,
            n_positions=32,
            n_layer=2,
            n_head=2,
            n_embd=32,
            pad_token_id=pad_token_id,
            num_labels=num_labels,
        )
    )


def bert_config(vocab_size: int = VOCAB, num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


def bert_classifier(seed: int = 0, num_labels: int = 2, vocab_size: int = VOCAB) -> BertForSequenceClassification:
    set_seed(seed)
    return BertForSequenceClassification(bert_config(vocab_size, num_labels))


def bert_tagger(seed: int = 0, num_labels: int = 3) -> BertForTokenClassification:
    set_seed(seed)
    return BertForTokenClassification(bert_config(VOCAB, num_labels))


def targs(out: Path, **overrides: Any) -> TrainingArguments:
    """Small, fast, deterministic settings; no checkpoint unless a test asks for one."""
    opts: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        eval_steps=None,
        save_strategy="no",
        save_steps=None,
        save_total_limit=None,
        seed=0,
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="jsonl",
    )
    opts.update(overrides)
    return TrainingArguments(**opts)


# adam_epsilon=1 and no clipping make the first AdamW update about lr * gradient, so a gradient
# scaled by a wrong count shows up in the weights (Adam alone would normalise a constant factor away)
SGD_LIKE = dict(learning_rate=0.5, adam_epsilon=1.0, max_grad_norm=None, weight_decay=0.0)


def lengths(n: int, seed: int, lo: int = 3, hi: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def lm_examples(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[dict[str, Any]]:
    """Token sequences of random lengths (ids 1..VOCAB-1; 0 is padding)."""
    rng = random.Random(seed + 1000)
    return [{"input_ids": [rng.randint(1, VOCAB - 1) for _ in range(k)]} for k in lengths(n, seed, lo, hi)]


def cls_examples(n: int, seed: int = 0, num_labels: int = 2, lo: int = 3, hi: int = 20) -> list[dict[str, Any]]:
    rng = random.Random(seed + 2000)
    return [{**ex, "label": rng.randrange(num_labels)} for ex in lm_examples(n, seed, lo, hi)]


def tagged_examples(n: int, seed: int = 0, num_labels: int = 3, lo: int = 3, hi: int = 20) -> list[dict[str, Any]]:
    """Token classification: one label per token, about a quarter of them -100 (not scored)."""
    rng = random.Random(seed + 3000)
    out = []
    for ex in lm_examples(n, seed, lo, hi):
        labels = [rng.randrange(num_labels) if rng.random() > 0.25 else -100 for _ in ex["input_ids"]]
        labels[0] = rng.randrange(num_labels)  # every example scores at least one token
        out.append({**ex, "labels": labels})
    return out


class Recording(torch.utils.data.Dataset):
    """A list of examples that records which indices the Trainer fetched, in order."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items, self.fetched = list(items), []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.fetched.append(int(i))
        return self.items[i]


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.global_step == self.step:
            raise RuntimeError("simulated crash")


class Snapshots(TrainerCallback):
    """The model's weights at the end of every step (after that step's evaluation and checkpoint)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, trainer: Trainer) -> None:
        self.weights[trainer.state.global_step] = clone_state(trainer.model)

    def on_step_end(self, trainer: Trainer) -> None:
        self.weights[trainer.state.global_step] = clone_state(trainer.model)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _no_constants(name: str) -> Any:
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def metric_lines(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line, parse_constant=_no_constants)
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def train_logs(trainer: Trainer) -> list[dict[str, Any]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def example_loss_sum(model: nn.Module, example: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(summed loss, scored items) of one example run alone, unpadded: the oracle for normalisation."""
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits
    if isinstance(model, GPTForCausalLM):
        target = ids[0, 1:]
        return F.cross_entropy(logits[0, :-1].float(), target, reduction="sum"), len(target)
    if logits.dim() == 3:  # token classification
        labels = torch.tensor(example["labels"])
        return F.cross_entropy(logits[0].float(), labels, ignore_index=-100, reduction="sum"), int(
            (labels != -100).sum()
        )
    return F.cross_entropy(logits.float(), torch.tensor([example["label"]]), reduction="sum"), 1


def mean_loss(
    model: nn.Module, examples: Sequence[dict[str, Any]], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Σ w_i · loss_i / Σ items_i: the Trainer's loss over an accumulation window."""
    total, items = torch.zeros(()), 0
    for i, ex in enumerate(examples):
        s, n = example_loss_sum(model, ex)
        total = total + s * (1.0 if weights is None else weights[i])
        items += n
    return total / items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- 1. the HF-shaped script
def test_hugging_face_shaped_script_runs_as_written(tmp_path: Path) -> None:
    """The familiar script (TrainingArguments + Trainer(model=, args=, train_dataset=, eval_dataset=) +
    train()) works on a list of dicts of uneven lengths with a `label` field: 3 epochs of 40 examples in
    batches of 16 are ceil(120 / 16) = 8 steps, and the model, metrics, curves and TensorBoard events
    are written where a user looks for them."""
    out, logs = tmp_path / "results", tmp_path / "logs"
    train_dataset = cls_examples(40, seed=1)
    eval_dataset = cls_examples(12, seed=2)
    model = bert_classifier()
    training_args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        logging_dir=str(logs),
        peak_flops=1e12,
        disable_tqdm=True,
    )  # (only to keep the test fast and quiet)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    result = trainer.train()

    assert result.global_step == trainer.state.global_step == math.ceil(3 * 40 / 16) == 8
    assert trainer.state.epoch == 3.0 and trainer.state.samples_seen == 120
    assert trainer.state.tokens_seen == 3 * sum(len(ex["input_ids"]) for ex in train_dataset)
    assert {"config.json", "model.safetensors", "metrics.jsonl", "training_curves.png", "training_args.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = metric_lines(out)
    assert [ln["step"] for ln in lines if "loss" in ln] == [8]  # logging_steps=10 > 8: the last step is logged
    assert [ln["step"] for ln in lines if "eval_loss" in ln] == [8]  # evaluated at the end
    assert math.isfinite(result.metrics["eval_loss"])
    events = list(logs.rglob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    logged_loss = next(ln["loss"] for ln in lines if "loss" in ln)
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("train/loss")] == [(8, logged_loss)]
    assert [e.step for e in board.Scalars("eval/loss")] == [8]
    loaded = BertForSequenceClassification.from_pretrained(out)
    assert_states_close(clone_state(loaded), clone_state(trainer.model), atol=0)


# ---------------------------------------------------------------------------- 2. HF datasets and text
def test_hugging_face_datasets_and_text_examples(tmp_path: Path) -> None:
    """A `datasets.Dataset` works as train and eval set (same result as the same list of dicts), and
    examples holding raw text are tokenized by the collator with the Trainer's tokenizer."""
    rows = cls_examples(12, seed=3)
    columns = {"input_ids": [r["input_ids"] for r in rows], "label": [r["label"] for r in rows]}
    hf = datasets.Dataset.from_dict(columns)

    from_list, from_hf = bert_classifier(), bert_classifier()
    Trainer(from_list, targs(tmp_path / "list", max_steps=3), rows).train()
    trainer = Trainer(from_hf, targs(tmp_path / "hf", max_steps=3), hf, hf)
    trainer.train()
    assert_states_close(clone_state(from_hf), clone_state(from_list), atol=0)
    assert trainer.predict(hf).predictions.shape == (12, 2)

    tok = wordpiece()
    tok.model_max_length = 32  # the model's context (a freshly trained tokenizer knows none: see the next test)
    text_rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS[:10])]
    model = bert_classifier(vocab_size=len(tok))
    text_trainer = Trainer(model, targs(tmp_path / "text", max_steps=2), text_rows[:8], text_rows, tokenizer=tok)
    text_trainer.train()  # one epoch of the 8 texts
    assert text_trainer.state.tokens_seen == sum(len(tok(r["text"])["input_ids"]) for r in text_rows[:8])
    # the same texts, tokenized beforehand, give the same logits: the collator encoded them
    encoded = [{**{k: list(v) for k, v in tok(r["text"]).items()}, "label": r["label"]} for r in text_rows]
    from_text = text_trainer.predict(text_rows).predictions
    from_ids = text_trainer.predict(encoded).predictions
    np.testing.assert_allclose(from_text, from_ids, rtol=0, atol=1e-6)
    # a text column of a datasets.Dataset goes the same way
    hf_text = datasets.Dataset.from_dict(
        {"text": [r["text"] for r in text_rows], "label": [r["label"] for r in text_rows]}
    )
    np.testing.assert_allclose(text_trainer.predict(hf_text).predictions, from_ids, rtol=0, atol=1e-6)
    assert (tmp_path / "text" / "tokenizer.json").is_file()  # the tokenizer is saved with the model


TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "good movie and great fun",
    "bad film with an awful plot",
    "the bird sang a song",
] * 4


def wordpiece() -> Any:
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.train_wordpiece(iterator=TEXTS, vocab_size=60, min_frequency=1)


def test_text_examples_with_a_freshly_trained_tokenizer(tmp_path: Path) -> None:
    """Text examples train with a tokenizer straight from Tokenizer.train_wordpiece (whose
    model_max_length is 'unknown'): the collator must not ask for truncation to an unknown length."""
    tok = wordpiece()
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS[:4])]
    trainer = Trainer(bert_classifier(vocab_size=len(tok)), targs(tmp_path, max_steps=1), rows, tokenizer=tok)
    trainer.train()  # one step of batch 4: every text once
    assert trainer.state.tokens_seen == sum(len(tok(r["text"])["input_ids"]) for r in rows)


def test_columns_the_model_does_not_take_are_dropped(tmp_path: Path) -> None:
    """A tokenized GLUE-style dataset keeps its 'sentence' and 'idx' columns next to input_ids and label:
    the default collator keeps only what the model's forward takes (its docstring's promise), as a
    familiar Hugging Face script expects."""
    rows = cls_examples(8, seed=30)
    hf = datasets.Dataset.from_dict(
        {
            "sentence": [f"text {i}" for i in range(8)],
            "idx": list(range(8)),
            "input_ids": [r["input_ids"] for r in rows],
            "label": [r["label"] for r in rows],
        }
    )
    trainer = Trainer(bert_classifier(), targs(tmp_path, max_steps=1), hf)
    trainer.train()
    assert trainer.state.global_step == 1


def test_padding_without_a_tokenizer_uses_the_models_pad_id(tmp_path: Path) -> None:
    """A GPT classifier whose pad token is not 0, given pre-tokenized examples and no tokenizer: the
    logits of an example do not depend on the batch it is padded in."""
    pad = VOCAB - 1
    data = [
        {"input_ids": [t if t != pad else 1 for t in ex["input_ids"]], "label": ex["label"]}
        for ex in cls_examples(6, seed=31, num_labels=3)
    ]
    model = gpt_classifier(seed=15, pad_token_id=pad).eval()
    alone = Trainer(model, targs(tmp_path / "a", per_device_eval_batch_size=1)).predict(data).predictions
    batched = Trainer(model, targs(tmp_path / "b", per_device_eval_batch_size=6)).predict(data).predictions
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- 3. exact accumulation
@pytest.mark.parametrize("kind", ["causal_lm", "token_classification"])
def test_accumulation_is_exact_over_uneven_padding(kind: str, tmp_path: Path) -> None:
    """batch 8 x 1, batch 4 x 2 and batch 2 x 4 train the same examples to the same weights, over
    examples of random lengths 3..20 (each micro-batch padded differently): every micro-batch adds its
    summed loss over the window's scored-item count (tokens; -100 labels and padding are not items).
    The logged loss of the first step is that mean, computed here one unpadded example at a time."""
    data = lm_examples(16, seed=4) if kind == "causal_lm" else tagged_examples(16, seed=4)
    make = gpt_lm if kind == "causal_lm" else bert_tagger
    initial = make(seed=1)
    runs = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        model, rec = make(seed=1), Recording(data)
        trainer = Trainer(
            model,
            targs(
                tmp_path / f"{batch}x{accum}",
                max_steps=2,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum,
                **SGD_LIKE,
            ),
            rec,
        )
        trainer.train()
        runs[batch] = (clone_state(model), rec.fetched, trainer.state, train_logs(trainer))
    ref_weights, ref_fetched, ref_state, ref_logs = runs[8]
    assert max_change(ref_weights, clone_state(initial)) > 1e-3  # the steps did move the weights
    assert sorted(ref_fetched) == list(range(16))  # 2 steps of 8 = one epoch
    assert ref_state.tokens_seen == sum(len(ex["input_ids"]) for ex in data)  # real tokens, not padding
    for batch in (4, 2):
        weights, fetched, state, logs = runs[batch]
        assert fetched == ref_fetched  # the same examples in the same order
        assert state.tokens_seen == ref_state.tokens_seen
        assert_states_close(weights, ref_weights, atol=1e-5)
        assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in ref_logs], rel=1e-6)
        assert [h["grad_norm"] for h in logs] == pytest.approx([h["grad_norm"] for h in ref_logs], rel=1e-5)
    with torch.no_grad():
        expected = float(mean_loss(initial, [data[i] for i in ref_fetched[:8]]))
    assert ref_logs[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_partial_last_window_is_normalised_by_its_own_items(tmp_path: Path) -> None:
    """10 examples in batches of 4 for one epoch: 3 steps, the last of 2 examples. That step's loss and
    gradient are the token mean over those 2 examples alone (not diluted by a full window's size), and
    splitting the same windows into micro-batches of 2 (batch 2 x accumulation 2) changes nothing."""
    data = lm_examples(10, seed=5)
    snaps, rec = Snapshots(), Recording(data)
    model = gpt_lm(seed=2)
    trainer = Trainer(
        model, targs(tmp_path / "a", max_steps=-1, num_train_epochs=1, **SGD_LIKE), rec, callbacks=[snaps]
    )
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.epoch == 1.0
    assert sorted(rec.fetched) == list(range(10))
    last = [data[i] for i in rec.fetched[8:]]
    before = gpt_lm(seed=2)
    before.load_state_dict(snaps.weights[2])
    loss = mean_loss(before, last)
    loss.backward()
    norm = float(torch.sqrt(sum((p.grad**2).sum() for p in before.parameters() if p.grad is not None)))
    logs = train_logs(trainer)
    assert logs[-1]["step"] == 3
    assert logs[-1]["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert logs[-1]["grad_norm"] == pytest.approx(norm, rel=1e-5)

    split = gpt_lm(seed=2)
    Trainer(
        split,
        targs(
            tmp_path / "b",
            max_steps=-1,
            num_train_epochs=1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            **SGD_LIKE,
        ),
        data,
    ).train()
    assert_states_close(clone_state(split), clone_state(model), atol=1e-5)


# ---------------------------------------------------------------------------- 4. sample weights
def with_weights(examples: Sequence[dict[str, Any]], weights: Sequence[float]) -> list[dict[str, Any]]:
    return [{**ex, "weight": float(w)} for ex, w in zip(examples, weights)]


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm", "token_classification"])
def test_unit_sample_weights_change_nothing(kind: str, tmp_path: Path) -> None:
    """A `weight` field of 1.0 on every example trains exactly like no weight field at all (the
    weighted path sums per-example losses instead of using the model's mean loss)."""
    make, data = {
        "sequence_classification": (bert_classifier, cls_examples(8, seed=6)),
        "causal_lm": (gpt_lm, lm_examples(8, seed=6)),
        "token_classification": (bert_tagger, tagged_examples(8, seed=6)),
    }[kind]
    plain, weighted = make(seed=3), make(seed=3)
    a = Trainer(
        plain, targs(tmp_path / "plain", per_device_train_batch_size=2, gradient_accumulation_steps=2, **SGD_LIKE), data
    )
    a.train()
    b = Trainer(
        weighted,
        targs(tmp_path / "weighted", per_device_train_batch_size=2, gradient_accumulation_steps=2, **SGD_LIKE),
        with_weights(data, [1.0] * 8),
    )
    b.train()
    assert max_change(clone_state(plain), clone_state(make(seed=3))) > 1e-3
    assert_states_close(clone_state(weighted), clone_state(plain), atol=1e-6)
    assert [h["loss"] for h in train_logs(b)] == pytest.approx([h["loss"] for h in train_logs(a)], rel=1e-6)


def test_sample_weights_scale_each_examples_loss(tmp_path: Path) -> None:
    """The weighted loss of a window is Σ w_i·loss_i / (number of examples in the window), so for a
    classifier trained on one window holding the whole dataset:
      - weight 2 on an example == that example twice, every weight (n + 1) / n;
      - weight 0 on an example == the example removed, every weight (n - 1) / n;
    and the logged loss is that weighted sum, computed by hand."""
    data = cls_examples(6, seed=7)
    n, j = len(data), 2

    def run(name: str, examples: list[dict[str, Any]], batch: int, accum: int = 1) -> tuple[dict, Trainer]:
        model = bert_classifier(seed=4)
        trainer = Trainer(
            model,
            targs(
                tmp_path / name,
                max_steps=1,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum,
                **SGD_LIKE,
            ),
            examples,
        )
        trainer.train()
        return clone_state(model), trainer

    doubled, doubled_trainer = run("w2", with_weights(data, [2.0 if i == j else 1.0 for i in range(n)]), 3, 2)
    duplicated, _ = run("dup", with_weights(data + [data[j]], [(n + 1) / n] * (n + 1)), 7)
    assert max_change(doubled, clone_state(bert_classifier(seed=4))) > 1e-3
    assert_states_close(doubled, duplicated, atol=1e-6)
    with torch.no_grad():
        expected = float(mean_loss(bert_classifier(seed=4), data, [2.0 if i == j else 1.0 for i in range(n)]))
    assert train_logs(doubled_trainer)[0]["loss"] == pytest.approx(expected, rel=1e-6)

    zeroed, _ = run("w0", with_weights(data, [0.0 if i == j else 1.0 for i in range(n)]), 3, 2)
    removed, _ = run("removed", with_weights(data[:j] + data[j + 1 :], [(n - 1) / n] * (n - 1)), 5)
    assert_states_close(zeroed, removed, atol=1e-6)
    unweighted_rest, _ = run("rest", data[:j] + data[j + 1 :], 5)
    assert max_change(zeroed, unweighted_rest) > 1e-5  # the normaliser is the window's count, weights or not


def test_invalid_sample_weights_are_refused(tmp_path: Path) -> None:
    """Negative or non-finite weights are a clear error, not a silent sign flip."""
    for bad in (-1.0, float("nan")):
        data = with_weights(cls_examples(4, seed=8), [1.0, bad, 1.0, 1.0])
        with pytest.raises(ValueError, match="weights must be finite and >= 0"):
            Trainer(bert_classifier(), targs(tmp_path, max_steps=1), data).train()


# ---------------------------------------------------------------------------- 5. evaluate / predict
def test_compute_metrics_evaluate_and_predict_agree(tmp_path: Path) -> None:
    """evaluate() reports eval_loss (the mean over examples) and compute_metrics' keys prefixed eval_;
    predict() returns every example's logits in dataset order, shape (N, num_labels), whatever the
    batching, and eval_accuracy is the accuracy of those predictions."""
    train, held_out = cls_examples(16, seed=9, num_labels=3), cls_examples(11, seed=10, num_labels=3)
    model = bert_classifier(seed=5, num_labels=3)
    trainer = Trainer(
        model,
        targs(tmp_path, max_steps=3, per_device_eval_batch_size=4),
        train,
        held_out,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    out = trainer.predict(held_out)
    labels = np.array([ex["label"] for ex in held_out])
    assert out.predictions.shape == (11, 3)
    np.testing.assert_array_equal(out.label_ids, labels)
    model.eval()
    with torch.no_grad():
        one_by_one = np.concatenate(
            [model(input_ids=torch.tensor([ex["input_ids"]])).logits.numpy() for ex in held_out]
        )
        expected_loss = float(mean_loss(model, held_out))
    np.testing.assert_allclose(out.predictions, one_by_one, rtol=0, atol=1e-5)
    accuracy = float((out.predictions.argmax(-1) == labels).mean())
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert out.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert {"eval_f1_macro", "eval_runtime", "eval_samples_per_second"} <= metrics.keys()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert trainer.state.log_history[-1]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)  # logged too


def test_token_classification_predictions_are_padded_with_minus_100(tmp_path: Path) -> None:
    """Token-level predictions of batches of different lengths are joined into one (N, T_max, C) array,
    each batch's extra positions filled with -100 (as are the labels), real positions untouched."""
    lens = [3, 5, 4, 9, 2, 3, 4]  # batches of 3: longest 5, 9, 4
    rng = random.Random(11)
    data = [
        {
            "input_ids": [rng.randint(1, VOCAB - 1) for _ in range(k)],
            "labels": [rng.choice([0, 1, 2, -100]) for _ in range(k)],
        }
        for k in lens
    ]
    model = bert_tagger(seed=6).eval()
    trainer = Trainer(model, targs(tmp_path, per_device_eval_batch_size=3))
    out = trainer.predict(data)
    assert out.predictions.shape == (7, 9, 3) and out.label_ids.shape == (7, 9)
    batch_len = [5, 5, 5, 9, 9, 9, 4]
    with torch.no_grad():
        for i, (ex, k) in enumerate(zip(data, lens)):
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].numpy()
            np.testing.assert_allclose(out.predictions[i, :k], alone, rtol=0, atol=1e-5)
            assert np.isfinite(out.predictions[i, k : batch_len[i]]).all()  # in-batch padding: real logits
            assert (out.predictions[i, batch_len[i] :] == -100).all()  # padding across batches
            np.testing.assert_array_equal(out.label_ids[i, :k], ex["labels"])
            assert (out.label_ids[i, k:] == -100).all()


# ---------------------------------------------------------------------------- 6. best model
class Scripted:
    """compute_metrics returning a fixed sequence of accuracies, one per evaluation."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values, self.calls = list(values), 0

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"accuracy": value}


def test_load_best_model_at_end_keeps_and_restores_the_best_checkpoint(tmp_path: Path) -> None:
    """With metric_for_best_model="accuracy" and save_total_limit=1, rotation never deletes the best
    checkpoint (nor the latest); at the end the model holds the best checkpoint's weights, and that is
    the model saved to output_dir."""
    out = tmp_path / "run"
    seen_on_disk: dict[int, list[str]] = {}

    class ListCheckpoints(TrainerCallback):
        def on_save(self, trainer: Trainer, checkpoint: Path) -> None:
            seen_on_disk[trainer.state.global_step] = sorted(p.name for p in out.glob("checkpoint-*"))

    snaps = Snapshots()
    metric = Scripted([0.5, 0.9, 0.6, 0.4])
    args = targs(
        out,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
    )
    trainer = Trainer(
        bert_classifier(seed=7),
        args,
        cls_examples(16, seed=12),
        cls_examples(4, seed=13),
        compute_metrics=metric,
        callbacks=[ListCheckpoints(), snaps],
    )
    trainer.train()
    assert metric.calls == 4  # the last step's evaluation is not repeated at the end
    assert seen_on_disk == {
        1: ["checkpoint-1"],
        2: ["checkpoint-2"],
        3: ["checkpoint-2", "checkpoint-3"],
        4: ["checkpoint-2", "checkpoint-4"],
    }
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert trainer.state.best_metric == pytest.approx(0.9)
    assert max_change(snaps.weights[2], snaps.weights[4]) > 1e-4  # the best is not simply the last
    best = clone_state(BertForSequenceClassification.from_pretrained(out / "checkpoint-2"))
    assert_states_close(best, snaps.weights[2], atol=0)
    assert_states_close(clone_state(trainer.model), best, atol=0)
    assert_states_close(clone_state(BertForSequenceClassification.from_pretrained(out)), best, atol=0)


# ---------------------------------------------------------------------------- 7. early stopping, bad arguments
@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_after_patience_evaluations(patience: int, tmp_path: Path) -> None:
    """A metric that only gets worse stops the run after `patience` evaluations without improvement,
    long before max_steps; the stopped model is still saved."""
    metric = Scripted([0.9 - 0.1 * i for i in range(10)])
    args = targs(
        tmp_path, max_steps=10, eval_steps=1, early_stopping_patience=patience, metric_for_best_model="accuracy"
    )
    trainer = Trainer(
        bert_classifier(), args, cls_examples(16, seed=14), cls_examples(4, seed=15), compute_metrics=metric
    )
    result = trainer.train()
    assert result.global_step == trainer.state.global_step == 1 + patience
    assert metric.calls == 1 + patience
    assert trainer.state.best_metric == pytest.approx(0.9)
    assert (tmp_path / "model.safetensors").is_file()


def test_unknown_best_metric_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    """metric_for_best_model naming a metric the evaluation does not produce raises ValueError naming
    it and the metrics that exist, instead of silently disabling best-model tracking."""
    args = targs(tmp_path, max_steps=3, eval_steps=1, early_stopping_patience=1, metric_for_best_model="f1")
    trainer = Trainer(bert_classifier(), args, cls_examples(8, seed=16), cls_examples(4, seed=17))
    with pytest.raises(ValueError, match=r"'f1'.*eval_loss"):
        trainer.train()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(load_best_model_at_end=True, eval_strategy="no"), "load_best_model_at_end needs evaluations"),
        (dict(load_best_model_at_end=True, eval_steps=2, save_steps=3), "multiple of eval_steps"),
        (dict(load_best_model_at_end=True, eval_steps=2, save_strategy="no"), "save_strategy"),
        (dict(early_stopping_patience=2, eval_strategy="no"), "early_stopping_patience needs evaluations"),
        (dict(early_stopping_patience=2, eval_strategy="steps", eval_steps=None), "early_stopping_patience"),
        (dict(bf16=True, fp16=True), "bf16.*fp16"),
    ],
)
def test_contradictory_arguments_are_refused(options: dict[str, Any], message: str, tmp_path: Path) -> None:
    """Settings that cannot all hold raise ValueError when TrainingArguments is created."""
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **options)


def test_fp16_on_cpu_points_to_bf16(tmp_path: Path) -> None:
    """fp16 needs a CUDA GPU; on CPU the Trainer refuses it and suggests bf16."""
    with pytest.raises(ValueError, match="bf16"):
        Trainer(bert_classifier(), targs(tmp_path, fp16=True), cls_examples(4))


# ---------------------------------------------------------------------------- 8. non-finite losses
class PoisonSteps(TrainerCallback):
    """Makes the model's loss NaN during the given optimizer steps (1-based), through a forward hook."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.active, self.handle = steps, False, None

    def on_train_begin(self, trainer: Trainer) -> None:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self.active and output.loss is not None:
                output.loss = output.loss * float("nan")
            return output

        self.handle = trainer.model.register_forward_hook(hook)
        self.active = 1 in self.steps

    def on_step_end(self, trainer: Trainer) -> None:
        self.active = trainer.state.global_step + 1 in self.steps


def test_one_nan_step_is_skipped_and_reported(tmp_path: Path) -> None:
    """A step whose loss is NaN does not touch the weights (nor poison AdamW's moments: the next steps
    train normally); it is reported in log_history and metrics.jsonl as a skipped step, and metrics.jsonl
    stays valid JSON (no NaN)."""
    snaps = Snapshots()
    model = gpt_classifier(seed=8)
    # logging every 2 steps: step 3 shares its logging window with step 4 (see the next test for a
    # NaN step alone in its window)
    data = Recording(cls_examples(24, seed=18, num_labels=3))
    trainer = Trainer(model, targs(tmp_path, max_steps=6, logging_steps=2), data, callbacks=[snaps, PoisonSteps({3})])
    trainer.train()
    assert trainer.state.global_step == 6
    assert_states_close(snaps.weights[3], snaps.weights[2], atol=0)  # the NaN step changed nothing
    for step in (1, 2, 4, 5, 6):
        assert max_change(snaps.weights[step], snaps.weights[step - 1]) > 1e-5, step
    assert all(torch.isfinite(v).all() for v in snaps.weights[6].values())
    skipped = [h for h in trainer.state.log_history if "skipped_step" in h]
    assert [h["skipped_step"] for h in skipped] == [3]
    lines = metric_lines(tmp_path)  # parse_constant refuses NaN / Infinity
    assert [ln["skipped_step"] for ln in lines if "skipped_step" in ln] == [3]
    losses = {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}
    assert sorted(losses) == [2, 4, 6] and all(math.isfinite(v) for v in losses.values())
    # the window of steps 3-4 reports step 4's loss alone (the NaN is left out, not averaged in)
    at_step_3 = gpt_classifier()
    at_step_3.load_state_dict(snaps.weights[3])
    with torch.no_grad():
        step_4_loss = float(mean_loss(at_step_3, [data.items[i] for i in data.fetched[12:16]]))
    assert losses[4] == pytest.approx(step_4_loss, rel=1e-5)


def test_nan_step_alone_in_its_logging_window_is_skipped(tmp_path: Path) -> None:
    """With logging_steps=1 (or any window holding only skipped steps) a NaN step is still just skipped."""
    snaps = Snapshots()
    trainer = Trainer(
        gpt_classifier(seed=8),
        targs(tmp_path, max_steps=4, logging_steps=1),
        cls_examples(16, seed=18, num_labels=3),
        callbacks=[snaps, PoisonSteps({3})],
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert_states_close(snaps.weights[3], snaps.weights[2], atol=0)
    assert [ln["step"] for ln in metric_lines(tmp_path) if "loss" in ln] == [1, 2, 4]


def test_skipped_step_is_logged_at_its_own_step(tmp_path: Path) -> None:
    """The log entry of a skipped step carries that step's number (TensorBoard plots it there, and
    metrics.jsonl trimming on resume keeps or drops it with that step), not the previous step's."""
    trainer = Trainer(
        gpt_classifier(seed=8),
        targs(tmp_path, max_steps=4, logging_steps=2),
        cls_examples(16, seed=18, num_labels=3),
        callbacks=[PoisonSteps({3})],
    )
    trainer.train()
    skipped = [h for h in trainer.state.log_history if "skipped_step" in h]
    assert [(h["step"], h["skipped_step"]) for h in skipped] == [(3, 3)]


def test_three_nan_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    """Three non-finite steps in a row raise FloatingPointError naming the last checkpoint, which is
    complete, loads, and holds the finite weights of its step."""
    snaps = Snapshots()
    model = gpt_classifier(seed=8)
    args = targs(tmp_path, max_steps=10, save_strategy="steps", save_steps=4, logging_steps=4)
    trainer = Trainer(model, args, cls_examples(20, seed=19, num_labels=3), callbacks=[snaps, PoisonSteps({5, 6, 7})])
    with pytest.raises(FloatingPointError, match=r"3 steps in a row.*checkpoint-4"):
        trainer.train()
    assert trainer.state.global_step == 6  # the third bad step (7) raised inside its update
    ckpt = tmp_path / "checkpoint-4"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    saved = clone_state(GPTForSequenceClassification.from_pretrained(ckpt))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert_states_close(saved, snaps.weights[4], atol=0)
    assert_states_close(clone_state(model), snaps.weights[4], atol=0)  # nothing NaN reached the weights
    resumed = Trainer(gpt_classifier(seed=99), targs(tmp_path, max_steps=5), cls_examples(20, seed=19, num_labels=3))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 5 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


# ---------------------------------------------------------------------------- 9. edge-case datasets
def test_empty_and_tiny_datasets(tmp_path: Path) -> None:
    """An empty dataset is a ValueError; fewer examples than one batch still make one step per epoch."""
    with pytest.raises(ValueError, match="empty"):
        Trainer(gpt_lm(), targs(tmp_path / "empty"), []).train()
    with pytest.raises(ValueError, match="empty"):
        Trainer(gpt_lm(), targs(tmp_path / "empty")).evaluate([])
    data = lm_examples(3, seed=20)
    model = gpt_lm(seed=9)
    trainer = Trainer(
        model, targs(tmp_path / "tiny", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=8), data
    )
    result = trainer.train()
    assert result.global_step == 1 and trainer.state.samples_seen == 3 and trainer.state.epoch == 1.0
    with torch.no_grad():
        assert train_logs(trainer)[0]["loss"] == pytest.approx(float(mean_loss(gpt_lm(seed=9), data)), rel=1e-6)


def test_causal_lm_labels_all_ignored_give_zero_loss(tmp_path: Path) -> None:
    """A window whose labels are all -100 scores nothing: loss 0 (finite, not a skipped step), and the
    weights stay finite (and unchanged: a zero gradient moves nothing without weight decay)."""
    data = [{"input_ids": ex["input_ids"], "labels": [-100] * len(ex["input_ids"])} for ex in lm_examples(4, seed=21)]
    model = gpt_lm(seed=10)
    trainer = Trainer(model, targs(tmp_path, max_steps=2), data)
    trainer.train()
    assert [h["loss"] for h in train_logs(trainer)] == [0.0, 0.0]
    assert not [h for h in trainer.state.log_history if "skipped_step" in h]
    assert_states_close(clone_state(model), clone_state(gpt_lm(seed=10)), atol=0)


def test_micro_batch_without_scored_labels_does_not_spoil_the_window(tmp_path: Path) -> None:
    """Token classification where some micro-batches of the window have only -100 labels: the window's
    loss is that of the scored examples (finite, not a skipped step), and the step equals a step on the
    scored examples alone (same item count)."""
    scored = tagged_examples(2, seed=22)
    unscored = [
        {"input_ids": ex["input_ids"], "labels": [-100] * len(ex["input_ids"])} for ex in lm_examples(2, seed=23)
    ]
    model = bert_tagger(seed=11)
    # micro-batches of one example: whatever the order, two of the four score nothing
    trainer = Trainer(
        model,
        targs(
            tmp_path / "mixed", max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=4, **SGD_LIKE
        ),
        scored + unscored,
    )
    trainer.train()
    assert not [h for h in trainer.state.log_history if "skipped_step" in h]
    with torch.no_grad():
        expected = float(mean_loss(bert_tagger(seed=11), scored))
    assert train_logs(trainer)[0]["loss"] == pytest.approx(expected, rel=1e-6)
    alone = bert_tagger(seed=11)
    Trainer(
        alone,
        targs(
            tmp_path / "alone", max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2, **SGD_LIKE
        ),
        scored,
    ).train()
    assert max_change(clone_state(alone), clone_state(bert_tagger(seed=11))) > 1e-3
    assert_states_close(clone_state(model), clone_state(alone), atol=1e-6)


# ---------------------------------------------------------------------------- 10. gradient checkpointing
def test_gradient_checkpointing_gives_the_same_weights(tmp_path: Path) -> None:
    """gradient_checkpointing=True recomputes activations in backward: same weights after 2 steps."""
    data = lm_examples(8, seed=24)
    plain, ckpt = gpt_lm(seed=12), gpt_lm(seed=12)
    Trainer(plain, targs(tmp_path / "a"), data).train()
    Trainer(ckpt, targs(tmp_path / "b", gradient_checkpointing=True), data).train()
    assert ckpt.transformer.gradient_checkpointing and not plain.transformer.gradient_checkpointing
    assert max_change(clone_state(plain), clone_state(gpt_lm(seed=12))) > 1e-3
    assert_states_close(clone_state(ckpt), clone_state(plain), atol=1e-6)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        Trainer(nn.Linear(2, 2), targs(tmp_path / "c", gradient_checkpointing=True))


# ---------------------------------------------------------------------------- 11. LoRA
def lora_classifier(seed: int = 13) -> GPTForSequenceClassification:
    model = gpt_classifier(seed=seed)
    set_seed(seed + 1)  # the adapters' own initialisation
    return apply_lora(model, LoRAConfig(r=4, modules_to_save=["score"]))


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B")) or name.startswith("score.")


def test_lora_training_leaves_the_base_untouched_and_saves_adapters(tmp_path: Path) -> None:
    """Training a LoRA model updates only the adapters and modules_to_save: every base weight is
    bit-identical afterwards; output_dir holds adapter_model.safetensors + adapter_config.json, and
    base weights + those adapters reload into the trained model's exact outputs."""
    model = lora_classifier()
    before = clone_state(model)
    data = cls_examples(12, seed=25, num_labels=3)
    Trainer(model, targs(tmp_path, max_steps=3), data).train()
    after = clone_state(model)
    base = [k for k in before if not is_adapter(k)]
    assert base and all(torch.equal(before[k], after[k]) for k in base)
    assert all(
        max_change({k: before[k]}, {k: after[k]}) > 0 for k in before if k.endswith(".lora_B") or k.startswith("score.")
    )  # lora_B starts at 0: it moved
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    adapters = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert adapters and all(is_adapter(k) for k in adapters)
    reloaded = GPTForSequenceClassification.from_pretrained(tmp_path)
    load_adapters(reloaded, tmp_path)
    ids = torch.tensor([data[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6
        )


def test_lora_resume_restores_the_adapters_exactly(tmp_path: Path) -> None:
    """4 steps in one go == 2 steps, a checkpoint, a crash at step 3, and a resume (bit for bit): the
    checkpoint carries the adapters and their optimizer state."""
    data = cls_examples(16, seed=26, num_labels=3)
    reference = lora_classifier()
    Trainer(reference, targs(tmp_path / "ref", max_steps=4), data).train()

    out = tmp_path / "run"
    opts = dict(max_steps=4, save_strategy="steps", save_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(lora_classifier(), targs(out, **opts), data, callbacks=[CrashAt(3)]).train()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = lora_classifier(seed=77)  # other adapter (and base) values: the checkpoint must win
    trainer = Trainer(resumed, targs(out, **opts), data)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert_states_close(clone_state(resumed), clone_state(reference), atol=0)


# ---------------------------------------------------------------------------- 12. DDP (torchrun)
DDP_SCRIPT = """
import atexit, json, sys
import torch
import torch.distributed as dist

# registered first, so it runs after lmforge's own exit handler: the process group must be gone by then
atexit.register(lambda: print("process group left at exit:", not dist.is_initialized(), flush=True))
from lmforge.config import GPTConfig
from lmforge.models.gpt import GPTForCausalLM
from lmforge.training import Trainer, TrainingArguments
from lmforge.utils import set_seed

opts = json.loads(open(sys.argv[1], encoding="utf-8").read())
torch.set_num_threads(1)
set_seed(opts["seed"])
model = GPTForCausalLM(GPTConfig(**opts["config"]))
trainer = Trainer(model, TrainingArguments(**opts["args"]), opts["data"])
trainer.train()
print("world size", trainer.world.size, "rank", trainer.world.rank, flush=True)
"""

GPT_SIZES = dict(vocab_size=VOCAB, n_positions=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def ddp_args(out: Path, **overrides: Any) -> dict[str, Any]:
    opts = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        eval_steps=None,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=None,
        seed=0,
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="jsonl",
        **SGD_LIKE,
    )
    opts.update(overrides)
    return opts


def torchrun_two(script: Path, config: Path) -> subprocess.CompletedProcess:
    """DDP_SCRIPT under torchrun with 2 CPU processes (gloo), in a clean distributed environment."""
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        str(config),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.count("process group left at exit: True") == 2, proc.stdout  # lmforge leaves it, both ranks
    return proc


def test_ddp_two_processes_match_one_process_and_resume_on_one(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo), batch 2 x accumulation 2 each, trains the same global batches
    as one process with batch 4 x accumulation 2, to the same weights (the window's token count is summed
    over processes, so uneven padding across processes is exact too). Rank 0 alone writes: one complete
    checkpoint per save step, no stray temporary folders, one metrics.jsonl line per logging step. A
    checkpoint of the 2-process run resumes in one process, with a warning naming the world sizes, to
    the weights of the 2-process run."""
    data = lm_examples(24, seed=27)
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({"seed": 14, "config": GPT_SIZES, "data": data, "args": ddp_args(out)}))
    script = tmp_path / "ddp_train.py"
    proc = torchrun_two(script, config)
    assert "world size 2 rank 0" in proc.stdout and "world size 2 rank 1" in proc.stdout

    set_seed(14)
    single = GPTForCausalLM(GPTConfig(**GPT_SIZES))
    one = Trainer(
        single,
        TrainingArguments(**ddp_args(tmp_path / "single", per_device_train_batch_size=4, save_strategy="no")),
        data,
    )
    one.train()
    ddp_weights = clone_state(GPTForCausalLM.from_pretrained(out))
    assert (
        max_change(ddp_weights, clone_state(GPTForCausalLM.from_pretrained(tmp_path / "ddp" / "checkpoint-1"))) > 1e-3
    )
    assert_states_close(ddp_weights, clone_state(single), atol=1e-5)

    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    for step in (1, 2, 3):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert (state["global_step"], state["world_size"], state["samples_seen"]) == (step, 2, 8 * step)
        assert (out / f"checkpoint-{step}" / "rng_state_1.pt").is_file()  # every process's RNG state
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    lines = metric_lines(out)
    assert [ln["step"] for ln in lines] == [1, 2, 3]
    assert [ln["loss"] for ln in lines] == pytest.approx([h["loss"] for h in train_logs(one)], rel=1e-6)
    # tokens are counted over both processes
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["tokens_seen"] == one.state.tokens_seen

    # one process keeps the global batch of 8 with batch 4 x accumulation 2
    resumed = Trainer(
        gpt_lm(seed=99),
        TrainingArguments(**ddp_args(tmp_path / "resumed", per_device_train_batch_size=4, save_strategy="no")),
        data,
    )
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) and this run has 1"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 3 and resumed.state.world_size == 1
    assert_states_close(clone_state(resumed.model), ddp_weights, atol=1e-5)


def test_fsdp_two_processes_match_one_process(tmp_path: Path) -> None:
    """fsdp=True under torchrun (2 CPU processes, gloo; parameters, gradients and optimizer state sharded
    with fully_shard) trains to the weights of one process with the same global batch, saves complete
    checkpoints (gathered weights and optimizer state) and a final model in Hugging Face's layout."""
    data = lm_examples(24, seed=27)
    out = tmp_path / "fsdp"
    config = tmp_path / "fsdp.json"
    config.write_text(
        json.dumps({"seed": 14, "config": GPT_SIZES, "data": data, "args": ddp_args(out, fsdp=True, save_steps=3)})
    )
    script = tmp_path / "fsdp_train.py"
    torchrun_two(script, config)
    set_seed(14)
    single = GPTForCausalLM(GPTConfig(**GPT_SIZES))
    Trainer(
        single,
        TrainingArguments(**ddp_args(tmp_path / "single", per_device_train_batch_size=4, save_strategy="no")),
        data,
    ).train()
    assert_states_close(clone_state(GPTForCausalLM.from_pretrained(out)), clone_state(single), atol=1e-5)
    ckpt = out / "checkpoint-3"
    assert_states_close(clone_state(GPTForCausalLM.from_pretrained(ckpt)), clone_state(single), atol=1e-5)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert len(optimizer["state"]) > 0


def test_dropped_tail_warning_counts_the_dropped_examples(tmp_path: Path) -> None:
    """With 2 processes and a last window of 1 example (fewer than the processes), that example is
    dropped with a warning saying how many examples were dropped."""
    from lmforge.training.distributed import World

    trainer = Trainer(
        gpt_lm(),
        targs(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2, gradient_accumulation_steps=2),
    )
    trainer.world = World(rank=0, size=2)  # what torchrun with 2 processes gives; the plan needs nothing else
    with pytest.warns(UserWarning, match="the last 1 examples"):
        plan = trainer._plan(17)  # global batch 2 x 2 x 2 = 8: windows of 8, 8 and 1
    assert plan.total == 16 and plan.steps == 2


def test_resume_with_another_global_batch_continues_from_the_saved_position(tmp_path: Path) -> None:
    """Resuming with a different global batch (per-device batch x accumulation x processes: e.g. the
    same script on 1 process after 2) continues the data stream from the saved sample position with the
    new batch, and says so; no example is trained twice or skipped."""
    data = lm_examples(16, seed=28)
    out = tmp_path / "run"
    Trainer(gpt_lm(), targs(out, max_steps=4, save_strategy="steps", save_steps=2), data).train()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["samples_seen"] == 8
    other = Trainer(gpt_lm(), targs(out, max_steps=4, per_device_train_batch_size=2), data)
    with pytest.warns(UserWarning, match=r"global batch of 4 examples per step and this run uses 2"):
        other.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    # max_steps=4 counts optimizer steps: steps 3 and 4 now take 2 examples each, samples 8..11
    assert other.state.global_step == 4 and other.state.samples_seen == 12


# ---------------------------------------------------------------------------- 13. SIGKILL inside a save
KILL_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
from lmforge.config import GPTConfig
from lmforge.models.gpt import GPTForCausalLM
from lmforge.training import Trainer, TrainingArguments
from lmforge.utils import set_seed

opts = json.loads(open(sys.argv[1], encoding="utf-8").read())
torch.set_num_threads(1)
if opts["stall_at"]:
    real_save = torch.save

    def stalling_save(obj, f, *args, **kwargs):
        path = Path(str(f))
        # the optimizer file of checkpoint-<stall_at>, written into its temporary folder after the weights
        if path.name == "optimizer.pt" and path.parent.name.startswith(".tmp-checkpoint-%d-" % opts["stall_at"]):
            path.write_bytes(b"PK half a file")
            Path(opts["marker"]).write_text(str(path.parent), encoding="utf-8")
            time.sleep(300)  # killed here
        return real_save(obj, f, *args, **kwargs)

    torch.save = stalling_save
set_seed(0)
model = GPTForCausalLM(GPTConfig(**opts["config"]))
args = TrainingArguments(**opts["args"])
Trainer(model, args, opts["data"]).train(resume_from_checkpoint=opts["resume"])
"""


def kill_run_args(out: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=None,
        seed=0,
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="jsonl",
    )


def test_sigkill_inside_a_checkpoint_save_resumes_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A process SIGKILLed while writing checkpoint-4 (weights written, optimizer file half written)
    leaves only a temporary folder, never a checkpoint-4 that looks complete; resuming picks
    checkpoint-2, cleans the leftovers, and ends with weights bit-identical to an uninterrupted run (with
    dropout: the RNG streams continue too) and the same metrics.jsonl lines, none duplicated."""
    script = tmp_path / "kill_train.py"
    script.write_text(KILL_SCRIPT, encoding="utf-8")
    data = lm_examples(24, seed=29)
    config = {**GPT_SIZES, "dropout": 0.1}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    ref_out, out, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "stalled"
    opts = {
        "config": config,
        "data": data,
        "stall_at": 4,
        "resume": False,
        "marker": str(marker),
        "args": kill_run_args(out),
    }
    (tmp_path / "victim.json").write_text(json.dumps(opts), encoding="utf-8")
    victim = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "victim.json")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # meanwhile, the uninterrupted reference run, here (same thread count, same seeds)
        set_seed(0)
        reference = GPTForCausalLM(GPTConfig(**config))
        Trainer(reference, TrainingArguments(**kill_run_args(ref_out)), data).train()

        deadline = time.monotonic() + 150
        while not marker.is_file():
            if victim.poll() is not None:
                pytest.fail(f"the victim ended before stalling:\n{victim.communicate()[1]}")
            assert time.monotonic() < deadline, "the victim never reached the save of checkpoint-4"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    partial = Path(marker.read_text(encoding="utf-8"))
    assert partial.parent == out and partial.is_dir()  # the kill landed inside the save of checkpoint-4
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").read_bytes() == b"PK half a file"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # no half checkpoint-4
    assert not (out / "model.safetensors").exists()
    assert [ln["step"] for ln in metric_lines(out)] == [1, 2, 3, 4]  # step 4 was logged before its save

    capsys.readouterr()
    set_seed(99)
    resumed = GPTForCausalLM(GPTConfig(**config))  # other weights: the checkpoint must win
    trainer = Trainer(resumed, TrainingArguments(**kill_run_args(out)), data)
    trainer.train(resume_from_checkpoint=True)
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert_states_close(clone_state(resumed), clone_state(reference), atol=0)
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # leftovers cleaned
    opt = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)  # the re-saved file is whole
    assert opt["scheduler"]["last_epoch"] == 4
    a = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(ref_out / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda lines: [(ln["step"], ln.get("loss")) for ln in lines]  # noqa: E731 (timings differ)
    assert strip(metric_lines(out)) == strip(metric_lines(ref_out))
    assert [ln["step"] for ln in metric_lines(out)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- group_by_length
class PaddingMeter:
    """Wraps the default collator and records each micro-batch's example lengths."""

    def __init__(self, trainer: Trainer) -> None:
        self.inner, self.batches = trainer.data_collator, []
        trainer.data_collator = self

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.batches.append([len(it["input_ids"]) for it in items])
        return self.inner(items)

    def padded_share(self) -> float:
        cells = sum(len(b) * max(b) for b in self.batches)
        return 1 - sum(map(sum, self.batches)) / cells


def test_group_by_length_batches_similar_lengths_and_sees_every_example(tmp_path: Path) -> None:
    """group_by_length: every example once per epoch, far less padding, the longest batch first, the
    same order for the same seed, and the trained weights equal whatever the grouping does not change."""
    data = [{**ex, "id": i} for i, ex in enumerate(cls_examples(400, seed=5, lo=2, hi=30))]
    kept = {"input_ids", "label"}
    runs = {}
    for grouped in (False, True):
        trainer = Trainer(
            bert_classifier(seed=3),
            targs(
                tmp_path / str(grouped),
                max_steps=-1,
                num_train_epochs=2,
                per_device_train_batch_size=8,
                group_by_length=grouped,
            ),
            [{k: v for k, v in ex.items() if k in kept} for ex in data],
        )
        meter = PaddingMeter(trainer)
        trainer.train()
        runs[grouped] = meter
    plain, grouped = runs[False], runs[True]
    assert len(grouped.batches) == len(plain.batches) == 100  # 2 epochs x 400 / 8
    assert sorted(sum(grouped.batches[:50], [])) == sorted(len(ex["input_ids"]) for ex in data)  # epoch 1: all
    assert grouped.padded_share() < 0.25 * plain.padded_share(), (grouped.padded_share(), plain.padded_share())
    assert max(grouped.batches[0]) == 30 and max(grouped.batches[50]) == 30  # the longest batch leads each epoch
    # the order is a function of the seed: a second run sees exactly the same batches
    again = Trainer(
        bert_classifier(seed=3),
        targs(
            tmp_path / "again", max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8, group_by_length=True
        ),
        [{k: v for k, v in ex.items() if k in kept} for ex in data],
    )
    meter = PaddingMeter(again)
    again.train()
    assert meter.batches == grouped.batches


def test_group_by_length_reads_a_length_column_or_says_what_is_missing(tmp_path: Path) -> None:
    data = [{"text": "a b c", "label": 0}, {"text": "a", "label": 1}]
    with pytest.raises(ValueError, match="group_by_length needs each example's length: example 0 has neither 'length'"):
        Trainer(bert_classifier(), targs(tmp_path / "x", group_by_length=True), data).train()
    with pytest.raises(ValueError, match="group_by_length must be true or false"):
        targs(tmp_path / "y", group_by_length="yes")
