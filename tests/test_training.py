"""Tests for lmforge.training: TrainingArguments, optimizer groups and schedule, the Trainer
(metrics, determinism, accumulation, checkpoints, exact resume, crash safety) and pretrain()."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import DOCS
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from lmforge.config import GPTConfig
from lmforge.data import RandomBlockDataset, SequentialBlockDataset, prepare_corpus
from lmforge.models.gpt import GPTForCausalLM
from lmforge.tokenizer import Tokenizer
from lmforge.training import Trainer, TrainerCallback, TrainingArguments
from lmforge.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from lmforge.training.pretrain import apply_overrides, load_recipe, pretrain, unigram_loss
from lmforge.utils import set_seed

BLOCK = 32
CHECKPOINT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "optimizer.pt",
    "rng_state.pt",
    "trainer_state.json",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BPE tokenizer (vocab 300), the corpus file, and its prepared token files."""
    root = tmp_path_factory.mktemp("corpus")
    text_file = root / "corpus.txt"
    text_file.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    tok = Tokenizer.train_bpe(iterator=DOCS, vocab_size=300)
    meta = prepare_corpus(text_file, tok, root / "data", val_fraction=0.2, seed=0, show_progress=False)
    tok.save_pretrained(root / "tokenizer")
    return {"tok": tok, "meta": meta, "file": text_file, "root": root}


def tiny_model(vocab_size: int, seed: int = 0, dropout: float = 0.0, n_layer: int = 2) -> GPTForCausalLM:
    set_seed(seed)
    return GPTForCausalLM(
        GPTConfig(vocab_size=vocab_size, n_positions=BLOCK, n_layer=n_layer, n_head=2, n_embd=32, dropout=dropout)
    )


def tiny_args(out: Path, **overrides: Any) -> TrainingArguments:
    opts: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        eval_steps=None,
        eval_max_batches=2,
        save_steps=None,
        save_total_limit=None,
        seed=0,
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
    )
    opts.update(overrides)
    return TrainingArguments(**opts)


def train_set(corpus: dict[str, Any], seed: int = 0, n: int = 400) -> RandomBlockDataset:
    return RandomBlockDataset(corpus["meta"].train_path, block_size=BLOCK, num_samples=n, seed=seed)


def val_set(corpus: dict[str, Any]) -> SequentialBlockDataset:
    return SequentialBlockDataset(corpus["meta"].val_path, block_size=BLOCK)


def _no_constants(name: str) -> Any:
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def metric_lines(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line, parse_constant=_no_constants)
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class Recording(Dataset):
    """Wraps a dataset and records every index fetched, in order."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.fetched = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(i))
        return self.inner[i]


class CrashAt(TrainerCallback):
    """Raises at the end of step `step`, like a crash after the checkpoints written so far."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.global_step == self.step:
            raise RuntimeError("simulated crash")


# ---------------------------------------------------------------------------- TrainingArguments
def test_default_arguments_are_valid_and_round_trip() -> None:
    args = TrainingArguments()
    # Hugging Face's fine-tuning defaults: 3 epochs (max_steps -1), AdamW 5e-5, linear decay, no warmup
    assert (args.max_steps, args.num_train_epochs, args.learning_rate) == (-1, 3.0, 5e-5)
    assert (args.lr_scheduler_type, args.weight_decay, args.adam_beta2, args.warmup) == ("linear", 0.0, 0.999, 0)
    assert TrainingArguments.from_dict(args.to_dict()) == args
    assert TrainingArguments(max_steps=200, warmup_ratio=0.1).warmup == 20
    assert TrainingArguments(max_steps=200, warmup_steps=7).warmup == 7
    assert TrainingArguments(max_steps=200, warmup_steps=0.25).warmup == 50  # transformers 5: a float is a share


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("max_steps", 2.5),
        ("per_device_train_batch_size", -1),
        ("per_device_eval_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("logging_steps", 0),
        ("eval_steps", 0),
        ("save_steps", -5),
        ("save_total_limit", 0),
        ("eval_max_batches", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("learning_rate", "1e-3"),
        ("learning_rate", float("nan")),
        ("lr_scheduler_type", "step"),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("warmup_steps", True),
        ("warmup_ratio", 1.0),
        ("min_lr_ratio", 1.5),
        ("max_grad_norm", 0.0),
        ("weight_decay", -0.1),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.1),
        ("adam_epsilon", 0.0),
        ("report_to", ["wandb"]),
        ("device", "gpu"),
        ("dataloader_num_workers", -1),
        ("peak_flops", 0.0),
        ("num_train_epochs", 0),
        ("eval_strategy", "sometimes"),
        ("save_strategy", "always"),
        ("early_stopping_patience", 0),
        ("fp16", "yes"),
        ("max_steps", -2),
    ],
)
def test_invalid_argument_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TrainingArguments(**{field: value})


def test_warmup_steps_and_ratio_together_are_rejected() -> None:
    with pytest.raises(ValueError, match="warmup_steps.*warmup_ratio"):
        TrainingArguments(warmup_steps=10, warmup_ratio=0.1)


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="learning_rte"):
        TrainingArguments.from_dict({"learning_rte": 1e-3, "max_steps": 5})
    assert TrainingArguments.from_dict({"max_steps": 5}).max_steps == 5


# ---------------------------------------------------------------------------- optimizer and schedule
def test_param_groups_decay_only_linear_weights() -> None:
    model = tiny_model(300)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decay_ids = [id(p) for p in decay["params"]]
    no_decay_ids = [id(p) for p in no_decay["params"]]
    # each parameter exactly once
    all_ids = decay_ids + no_decay_ids
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters()}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head}
    assert len(linear_weights) == 4 * 2  # qkv, attention proj, fc, mlp proj per layer
    assert set(decay_ids) == linear_weights
    must_not_decay = [
        model.transformer.wte.weight,
        model.lm_head.weight,
        model.transformer.wpe.weight,
        model.transformer.ln_f.weight,
        model.transformer.ln_f.bias,
        model.transformer.h[0].ln_1.weight,
        model.transformer.h[1].mlp.fc.bias,
    ]
    for p in must_not_decay:
        assert id(p) in no_decay_ids
    args = TrainingArguments(learning_rate=2e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6)
    opt = build_optimizer(model, args)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)


def test_lr_factor_warmup_then_cosine_linear_constant() -> None:
    def args(kind: str, **kw: Any) -> TrainingArguments:
        return TrainingArguments(max_steps=14, warmup_steps=4, min_lr_ratio=0.1, lr_scheduler_type=kind, **kw)

    for kind in ("cosine", "linear", "constant"):  # linear warmup from 0, as transformers: 0, 1/4, 2/4, 3/4
        assert [lr_factor(s, args(kind)) for s in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    cos = args("cosine")
    # after warmup, progress = (step - 4) / 10
    assert lr_factor(4, cos) == pytest.approx(1.0)
    assert lr_factor(6, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))  # 0.91406
    assert lr_factor(9, cos) == pytest.approx(0.55)
    assert lr_factor(14, cos) == pytest.approx(0.1)
    assert lr_factor(100, cos) == pytest.approx(0.1)  # stays at the floor
    lin = args("linear")
    assert [lr_factor(s, lin) for s in (4, 6, 9, 14, 20)] == pytest.approx([1.0, 0.82, 0.55, 0.1, 0.1])
    const = args("constant")
    assert [lr_factor(s, const) for s in (4, 9, 14)] == pytest.approx([1.0, 1.0, 1.0])
    ratio = TrainingArguments(max_steps=20, warmup_ratio=0.25, lr_scheduler_type="constant")  # 5 warmup steps
    assert [lr_factor(s, ratio) for s in (0, 4, 5)] == pytest.approx([0.0, 0.8, 1.0])
    # the scheduler applies the factor to the peak learning rate, step by step
    model = nn.Linear(2, 2)
    a = args("cosine", learning_rate=0.5)
    opt = build_optimizer(model, a)
    sched = build_scheduler(opt, a)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, a) for s in range(15)])


# ---------------------------------------------------------------------------- the Trainer
def test_training_reduces_loss_and_writes_metrics(corpus: dict[str, Any], tmp_path: Path) -> None:
    tok = corpus["tok"]
    out = tmp_path / "run"
    args = tiny_args(out, max_steps=24, eval_steps=12, warmup_steps=2)
    trainer = Trainer(tiny_model(len(tok)), args, train_set(corpus), val_set(corpus), tokenizer=tok)
    result = trainer.train()
    assert result.global_step == 24

    lines = metric_lines(out)
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval_loss" in ln]
    assert [ln["step"] for ln in train] == list(range(1, 25))
    for ln in train:
        assert {"loss", "learning_rate", "tokens_per_second", "mfu"} <= ln.keys()
        assert ln["tokens_per_second"] > 0 and ln["mfu"] > 0
        # the learning rate the scheduler holds after `step` optimizer steps
        assert ln["learning_rate"] == pytest.approx(1e-2 * lr_factor(ln["step"], args), rel=1e-5)
    # a tiny GPT on a small repeated corpus: the loss falls well below its start (about ln(300))
    first, last = np.mean([ln["loss"] for ln in train[:3]]), np.mean([ln["loss"] for ln in train[-3:]])
    assert first > 5.0 and last < first - 1.0
    # as in transformers: the run's mean training loss (here: the mean of the logged per-step losses)
    assert result.training_loss == pytest.approx(np.mean([ln["loss"] for ln in train]), rel=1e-5)
    assert [ln["step"] for ln in evals] == [12, 24]
    for ln in evals:
        assert ln["eval_perplexity"] == pytest.approx(math.exp(ln["eval_loss"]), rel=1e-5)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert result.metrics["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)

    # the final model and tokenizer load back on their own
    loaded = GPTForCausalLM.from_pretrained(out)
    assert_same_weights(loaded, trainer.model)
    tok2 = Tokenizer.from_pretrained(out)
    assert tok2.encode("Shall I compare thee") == tok.encode("Shall I compare thee")
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 24
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_small_learning_rates_are_logged_exactly(corpus: dict[str, Any], tmp_path: Path) -> None:
    tok = corpus["tok"]
    args = tiny_args(tmp_path, max_steps=3, learning_rate=2e-6, warmup_steps=4, lr_scheduler_type="constant")
    Trainer(tiny_model(len(tok)), args, train_set(corpus)).train()
    logged = [ln["learning_rate"] for ln in metric_lines(tmp_path) if "learning_rate" in ln]
    assert logged == pytest.approx([5e-7 * 1, 5e-7 * 2, 5e-7 * 3], rel=1e-5)  # the lr of the next step


def test_same_seed_same_weights_other_seed_differs(corpus: dict[str, Any], tmp_path: Path) -> None:
    vocab = len(corpus["tok"])

    def run(seed: int, name: str) -> GPTForCausalLM:
        model = tiny_model(vocab, seed=seed, dropout=0.1)
        ds = SequentialBlockDataset(corpus["meta"].train_path, block_size=BLOCK)  # shuffled with the seed
        Trainer(model, tiny_args(tmp_path / name, max_steps=4, seed=seed), ds).train()
        return model

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert_same_weights(a, b)
    assert not torch.equal(a.transformer.h[0].attn.qkv.weight, c.transformer.h[0].attn.qkv.weight)


def test_gradient_accumulation_matches_one_big_batch(corpus: dict[str, Any], tmp_path: Path) -> None:
    vocab = len(corpus["tok"])
    initial = tiny_model(vocab, seed=3).state_dict()
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        data = Recording(train_set(corpus))
        model = tiny_model(vocab, seed=3)
        # adam_epsilon=1 and no clipping make the update about lr * gradient, so a wrongly scaled
        # gradient shows (Adam alone would hide a constant factor)
        args = tiny_args(
            tmp_path / f"b{batch}",
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            learning_rate=0.5,
            adam_epsilon=1.0,
            max_grad_norm=None,
            weight_decay=0.0,
        )
        trainer = Trainer(model, args, data)
        trainer.train()
        runs[batch] = (model, data.fetched, trainer.state, metric_lines(tmp_path / f"b{batch}"))
    (big, big_items, big_state, big_logs), (small, small_items, small_state, small_logs) = runs[8], runs[4]
    assert big_items == small_items and len(big_items) == 16  # the same examples in the same order
    assert big_state.samples_seen == small_state.samples_seen == 16
    assert big_state.tokens_seen == small_state.tokens_seen == 16 * BLOCK
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert (big.lm_head.weight - initial["lm_head.weight"]).abs().max() > 1e-4  # the steps did move the weights
    assert [ln["loss"] for ln in big_logs] == pytest.approx([ln["loss"] for ln in small_logs], rel=1e-5)
    # the accumulated gradient is the big batch's gradient (its norm is logged even without clipping)
    assert [ln["grad_norm"] for ln in big_logs] == pytest.approx([ln["grad_norm"] for ln in small_logs], rel=1e-5)


def test_checkpoints_layout_rotation_and_safe_loading(corpus: dict[str, Any], tmp_path: Path) -> None:
    tok = corpus["tok"]
    out = tmp_path / "run"
    saved = []

    class OnSave(TrainerCallback):
        def on_save(self, trainer: Trainer, checkpoint: Path) -> None:
            saved.append(checkpoint.name)

    args = tiny_args(out, max_steps=6, save_steps=2, save_total_limit=2)
    trainer = Trainer(tiny_model(len(tok)), args, train_set(corpus), tokenizer=tok, callbacks=[OnSave()])
    trainer.train()
    assert saved == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # newest kept
    assert trainer.latest_checkpoint() == out / "checkpoint-6"
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for step in (4, 6):
        ckpt = out / f"checkpoint-{step}"
        assert CHECKPOINT_FILES <= {p.name for p in ckpt.iterdir()}
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["samples_seen"] == 4 * step
        # plain tensors and containers only: loadable without unpickling arbitrary code
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert {"optimizer", "scheduler"} <= opt.keys()
        assert opt["scheduler"]["last_epoch"] == step
        rng = torch.load(ckpt / "rng_state.pt", weights_only=True)
        assert isinstance(rng["torch"], torch.Tensor) and "python" in rng
        assert Tokenizer.from_pretrained(ckpt).get_vocab() == tok.get_vocab()
    assert_same_weights(GPTForCausalLM.from_pretrained(out / "checkpoint-6"), trainer.model)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_exact(corpus: dict[str, Any], tmp_path: Path, dropout: float) -> None:
    """8 steps in one go == 4 steps, a crash, and a resume from checkpoint-4 (bit for bit)."""
    vocab = len(corpus["tok"])
    opts = dict(max_steps=8, save_steps=4, eval_steps=3)

    ref_data = Recording(train_set(corpus))
    reference = tiny_model(vocab, dropout=dropout)
    Trainer(reference, tiny_args(tmp_path / "ref", **opts), ref_data, val_set(corpus)).train()

    out = tmp_path / "run"
    crashed = Trainer(
        tiny_model(vocab, dropout=dropout),
        tiny_args(out, **opts),
        Recording(train_set(corpus)),
        val_set(corpus),
        callbacks=[CrashAt(6)],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert Trainer(tiny_model(vocab), tiny_args(out)).latest_checkpoint() == out / "checkpoint-4"

    resumed_data = Recording(train_set(corpus))
    resumed = tiny_model(vocab, seed=99, dropout=dropout)  # other initial weights: the checkpoint must win
    # peak_flops=None: the resumed run measures a matmul peak (random matrices) after the restore
    trainer = Trainer(
        resumed, tiny_args(out, **opts, peak_flops=None if dropout else 1e12), resumed_data, val_set(corpus)
    )
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8
    assert_same_weights(resumed, reference)
    # the resumed run reads only the data after its position, exactly what the reference read there
    assert resumed_data.fetched == ref_data.fetched[4 * 4 :]
    # metrics.jsonl: the crashed run's lines past the checkpoint are replaced, not duplicated
    ref_lines = [(ln["step"], ln.get("loss"), ln.get("eval_loss")) for ln in metric_lines(tmp_path / "ref")]
    run_lines = [(ln["step"], ln.get("loss"), ln.get("eval_loss")) for ln in metric_lines(out)]
    assert run_lines == ref_lines


def test_resume_from_an_explicit_checkpoint_path(corpus: dict[str, Any], tmp_path: Path) -> None:
    vocab = len(corpus["tok"])
    out = tmp_path / "run"
    first = tiny_model(vocab)
    Trainer(first, tiny_args(out, max_steps=4, save_steps=2), train_set(corpus)).train()
    again = Trainer(tiny_model(vocab, seed=5), tiny_args(tmp_path / "other", max_steps=4), train_set(corpus))
    again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert again.state.global_step == 4
    assert_same_weights(again.model, first)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        Trainer(tiny_model(vocab), tiny_args(tmp_path / "x"), train_set(corpus)).train(
            resume_from_checkpoint=str(tmp_path)
        )


def test_incomplete_checkpoints_are_ignored(corpus: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(tiny_model(len(corpus["tok"])), tiny_args(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # newer, but half written: no trainer_state.json
    (tmp_path / "checkpoint-12" / "config.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-20-x1y2").mkdir()
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert trainer.checkpoints() == [tmp_path / "checkpoint-3"]
    assert trainer.latest_checkpoint() == tmp_path / "checkpoint-3"


def test_empty_or_missing_training_data_is_a_clear_error(corpus: dict[str, Any], tmp_path: Path) -> None:
    model = tiny_model(len(corpus["tok"]))
    empty = RandomBlockDataset(corpus["meta"].train_path, block_size=BLOCK, num_samples=0)
    with pytest.raises(ValueError, match="empty"):
        Trainer(model, tiny_args(tmp_path), empty).train()
    with pytest.raises(ValueError, match="train_dataset"):
        Trainer(model, tiny_args(tmp_path)).train()


DRIVER = """
import json, sys, time
import torch
from lmforge.config import GPTConfig
from lmforge.data import RandomBlockDataset, SequentialBlockDataset
from lmforge.models.gpt import GPTForCausalLM
from lmforge.tokenizer import Tokenizer
from lmforge.training import Trainer, TrainerCallback, TrainingArguments
from lmforge.utils import set_seed

opts = json.loads(sys.argv[1])
torch.set_num_threads(1)

class Slow(TrainerCallback):
    def on_step_end(self, trainer):
        time.sleep(opts["sleep"])

tok = Tokenizer.from_pretrained(opts["tokenizer"])
set_seed(0)
model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), n_positions=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
args = TrainingArguments(output_dir=opts["out"], max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, eval_steps=4, eval_max_batches=2, save_steps=2, save_total_limit=2,
                         seed=0, device="cpu", disable_tqdm=True, peak_flops=1e12)
train = RandomBlockDataset(opts["data"] + "/train.bin", block_size=32, num_samples=32, seed=0)
val = SequentialBlockDataset(opts["data"] + "/val.bin", block_size=32)
Trainer(model, args, train, val, tokenizer=tok, callbacks=[Slow()]).train(resume_from_checkpoint=opts["resume"])
"""


def test_killed_run_resumes_to_the_same_weights(corpus: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL a training process after its first checkpoint; resuming it gives the weights of an
    uninterrupted run, and half-written checkpoints are never resumed from."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    root = corpus["root"]

    def launch(out: Path, sleep: float, resume: bool = False) -> subprocess.Popen:
        opts = {
            "tokenizer": str(root / "tokenizer"),
            "data": str(root / "data"),
            "out": str(out),
            "sleep": sleep,
            "resume": resume,
        }
        return subprocess.Popen(
            [sys.executable, str(driver), json.dumps(opts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    ref_out, out = tmp_path / "ref", tmp_path / "run"
    victim = launch(out, sleep=0.3)
    reference = launch(ref_out, sleep=0.0)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    complete = sorted(
        int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )
    assert complete and complete[-1] < 8 and not (out / "model.safetensors").exists()  # killed mid-run

    # what a crash during a save leaves behind, at a later step than any complete checkpoint
    (out / ".tmp-checkpoint-8-abc123").mkdir()
    (out / ".tmp-checkpoint-8-abc123" / "config.json").write_text("{")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "config.json").write_text("{}")

    resumed = launch(out, sleep=0.0, resume=True)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {out / f'checkpoint-{complete[-1]}'} at step {complete[-1]}" in stdout
    ref_stderr = reference.communicate(timeout=300)[1]
    assert reference.returncode == 0, ref_stderr

    final, expected = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    assert not list(out.glob(".tmp-*"))  # leftovers of the killed run are cleaned up


# ---------------------------------------------------------------------------- pretrain()
def tiny_recipe(corpus: dict[str, Any], out: Path, **training: Any) -> dict[str, Any]:
    return {
        "data": [str(corpus["file"])],
        "out": str(out),
        "val_fraction": 0.2,
        "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": BLOCK},
        "training": {
            "max_steps": 24,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 2e-2,
            "warmup_steps": 0,
            "logging_steps": 4,
            "eval_steps": None,
            "save_steps": 8,
            "disable_tqdm": True,
            "peak_flops": 1e12,
            "seed": 0,
            **training,
        },
        "sample": {"prompt": "The", "max_new_tokens": 4, "seed": 0},
    }


def test_pretrain_end_to_end(corpus: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    metrics = pretrain(tiny_recipe(corpus, out), device="cpu")
    assert metrics["step"] == 24 and metrics["output_dir"] == str(out)
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["unigram_baseline_loss"])
    baseline = unigram_loss(out / "data" / "train.bin", out / "data" / "val.bin", "uint16", 300)
    assert metrics["unigram_baseline_loss"] == pytest.approx(baseline)
    assert metrics["eval_loss"] < metrics["unigram_baseline_loss"]  # it learned more than token counts
    lines = metric_lines(out)
    assert [ln["eval_loss"] for ln in lines if "eval_loss" in ln][-1] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert lines[-1]["unigram_baseline_loss"] == pytest.approx(baseline, rel=1e-5)
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "lmforge: sample from" in printed

    model = GPTForCausalLM.from_pretrained(out)
    tok = Tokenizer.from_pretrained(out)
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tok) == 300
    assert tok.model_max_length == BLOCK  # truncation=True cuts to the model's context
    assert len(tok("word " * 100, truncation=True)["input_ids"]) == BLOCK
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]


def test_pretrain_refuses_to_overwrite_a_run_and_resumes_it(corpus: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(corpus, out, max_steps=4, save_steps=2)
    recipe.pop("sample")
    pretrain(recipe, device="cpu")
    with pytest.raises(ValueError, match="--resume"):
        pretrain(recipe, device="cpu")
    recipe["training"]["max_steps"] = 6
    metrics = pretrain(recipe, resume=True, device="cpu")
    assert metrics["step"] == 6
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_unigram_loss_by_hand(tmp_path: Path) -> None:
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    np.array([0, 0, 1], dtype=np.uint16).tofile(train)
    np.array([0, 2], dtype=np.uint16).tofile(val)
    # add-one counts over a vocabulary of 3: [3, 2, 1] of 6
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_loss(train, val, "uint16", 3) == pytest.approx(expected)


def test_load_recipe_bundled_and_errors(tmp_path: Path) -> None:
    recipe = load_recipe("shakespeare")
    assert recipe["data"] == ["shakespeare"]
    assert {"model", "training", "tokenizer"} <= recipe.keys()
    TrainingArguments.from_dict(recipe["training"])  # the bundled recipe's training section is valid
    GPTConfig(**recipe["model"])
    with pytest.raises(FileNotFoundError, match="shakespeare"):  # lists the bundled recipes
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layer: 2}\ntraning: {max_steps: 3}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="traning"):
        load_recipe(str(bad))
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: [a.txt]\nmodel: {n_layer: 2}\n", encoding="utf-8")
    assert load_recipe(str(mine)) == {"data": ["a.txt"], "model": {"n_layer": 2}}


def test_apply_overrides_parses_types() -> None:
    recipe = {"model": {"n_layer": 4}, "training": {"learning_rate": 0.1}, "data": ["shakespeare"]}
    new = apply_overrides(
        recipe,
        [
            "model.n_layer=2",
            "training.learning_rate=1e-3",
            "training.bf16=true",
            "data=[a.txt, b.txt]",
            "training.report_to=[none]",
            "sample.prompt=Hello there",
            "training.eval_steps=null",
            "val_fraction=0.5",
            "training.peak_flops=2.5e12",
        ],
    )
    assert new["model"]["n_layer"] == 2 and isinstance(new["model"]["n_layer"], int)
    assert new["training"]["learning_rate"] == 1e-3 and isinstance(new["training"]["learning_rate"], float)
    assert new["training"]["peak_flops"] == 2.5e12
    assert new["training"]["bf16"] is True
    assert new["data"] == ["a.txt", "b.txt"] and new["training"]["report_to"] == ["none"]
    assert new["sample"] == {"prompt": "Hello there"}
    assert new["training"]["eval_steps"] is None and new["val_fraction"] == 0.5
    assert recipe == {"model": {"n_layer": 4}, "training": {"learning_rate": 0.1}, "data": ["shakespeare"]}
    for bad, message in [
        ("model.n_layer", "section.key=value"),
        ("=3", "section.key=value"),
        ("modle.n_layer=2", "unknown section"),
        ("data.path=x", "data"),
        ("model.n_layer.deep=1", "model.n_layer"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_overrides(recipe, [bad])
