"""One-call GPU check of the Trainer (issue: Trainer): fp16 with a GradScaler, bf16 autocast, resume
on CUDA, gradient checkpointing memory, and fine-tuning speed against transformers' Trainer.

    PYTHONPATH=. python bench/gpu_check_trainer.py --out gpu_trainer.json

Needs a CUDA device and `transformers` (the peer). Prints a line per check and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge import BertConfig, BertForSequenceClassification, GPTConfig, GPTForCausalLM
from lmforge.training import Trainer, TrainingArguments


def lm_data(n: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(32, 128, (1,), generator=g))
        rows.append(
            {
                "input_ids": (torch.arange(length) * 7 % vocab)
                .roll(int(torch.randint(0, 50, (1,), generator=g)))
                .tolist()
            }
        )
    return rows


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=60,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
        logging_steps=10,
        save_strategy="steps",
        save_steps=30,
        device="cuda",
        disable_tqdm=True,
        report_to="jsonl",
        seed=0,
    )
    return TrainingArguments(**{**base, **kw})


def gpt(seed: int = 0) -> GPTForCausalLM:
    torch.manual_seed(seed)
    return GPTForCausalLM(GPTConfig(vocab_size=512, n_positions=128, n_layer=4, n_head=4, n_embd=256))


def precision_runs(tmp: Path) -> dict:
    """fp16 (GradScaler) and bf16: the loss falls, the scaler state is in the checkpoint, a resumed run
    ends where an uninterrupted one does (max weight difference reported)."""
    data = lm_data(2000, 512, 0)
    out = {}
    for name, kw in (("fp32", {}), ("bf16", {"bf16": True}), ("fp16", {"fp16": True})):
        t = Trainer(gpt(), args(tmp / name, **kw), data)
        start = time.perf_counter()
        t.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        opt = torch.load(tmp / name / "checkpoint-60" / "optimizer.pt", weights_only=True)
        resumed = Trainer(gpt(seed=5), args(tmp / name, **kw), data)
        resumed.train(resume_from_checkpoint=str(tmp / name / "checkpoint-30"))
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(t.model.state_dict().values(), resumed.model.state_dict().values())
        )
        skipped = [h for h in t.state.log_history if "skipped_step" in h]
        out[name] = {
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "seconds": round(seconds, 2),
            "scaler_scale": opt["scaler"].get("scale") if opt["scaler"] else None,
            "resume_max_abs_diff": diff,
            "skipped_steps": len(skipped),
        }
        print(name, out[name], flush=True)
    return out


def checkpointing_memory(tmp: Path) -> dict:
    """Peak CUDA memory of 5 steps without and with gradient checkpointing (a larger GPT)."""
    res = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = GPTForCausalLM(GPTConfig(vocab_size=8192, n_positions=1024, n_layer=12, n_head=12, n_embd=768))
        data = [{"input_ids": list(range(1, 1024))} for _ in range(64)]
        torch.cuda.reset_peak_memory_stats()
        t = Trainer(
            model,
            args(
                tmp / f"gc{flag}",
                max_steps=5,
                per_device_train_batch_size=8,
                save_strategy="no",
                bf16=True,
                gradient_checkpointing=flag,
            ),
            data,
        )
        start = time.perf_counter()
        t.train()
        res["with" if flag else "without"] = {
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "seconds": round(time.perf_counter() - start, 2),
        }
        del model, t
        torch.cuda.empty_cache()
    print("gradient checkpointing", res, flush=True)
    return res


def finetune_speed(tmp: Path) -> dict:
    """MiniLM-shaped classifier (6 x 384, random weights), 2,000 examples of 16-120 tokens, 1 epoch,
    batch 32, bf16: lmforge's Trainer vs transformers' Trainer, same weights and examples."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    )
    ours = BertForSequenceClassification(config)
    ours.save_pretrained(tmp / "minilm")
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(2000):
        n = int(torch.randint(16, 120, (1,), generator=g))
        rows.append(
            {
                "input_ids": [101] + torch.randint(1000, 30000, (n,), generator=g).tolist() + [102],
                "label": int(torch.randint(0, 2, (1,), generator=g)),
            }
        )
    res = {}
    t = Trainer(
        ours,
        TrainingArguments(
            output_dir=str(tmp / "ft-ours"),
            num_train_epochs=1,
            per_device_train_batch_size=32,
            learning_rate=5e-5,
            bf16=True,
            save_strategy="no",
            eval_strategy="no",
            device="cuda",
            disable_tqdm=True,
            report_to="none",
        ),
        rows,
    )
    start = time.perf_counter()
    t.train()
    torch.cuda.synchronize()
    res["lmforge_seconds"] = round(time.perf_counter() - start, 3)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp / "minilm")
    hf_args = transformers.TrainingArguments(
        output_dir=str(tmp / "ft-hf"),
        num_train_epochs=1,
        per_device_train_batch_size=32,
        learning_rate=5e-5,
        bf16=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
    )

    def collator(items: list[dict]) -> dict:  # pad like lmforge's collator: ids 0, mask 0
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.zeros(len(items), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, it in enumerate(items):
            ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[i, : len(it["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["labels"] for it in items])}

    hf_rows = [{"input_ids": r["input_ids"], "labels": r["label"]} for r in rows]
    trainer = transformers.Trainer(model=hf, args=hf_args, train_dataset=hf_rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    res["transformers_seconds"] = round(time.perf_counter() - start, 3)
    res["speedup"] = round(res["transformers_seconds"] / res["lmforge_seconds"], 2)
    print("fine-tune speed", res, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_trainer.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (
            ("precision", precision_runs),
            ("finetune_speed", finetune_speed),
            ("gradient_checkpointing", checkpointing_memory),
        ):
            try:
                result[name] = fn(Path(tmp))
            except Exception as err:  # noqa: BLE001 - report every part, even after one fails
                result[name] = {"error": f"{type(err).__name__}: {err}"}
                print(name, "FAILED", err, flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items()}, default=str)[:3000])


if __name__ == "__main__":
    main()
