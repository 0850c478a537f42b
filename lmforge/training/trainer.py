"""Trainer: the training loop shared by pretraining and fine-tuning.

    batches --(gradient accumulation, loss normalised by token count)--> AdamW + schedule + clipping
            --> periodic evaluation, JSONL metrics, progress bar --> atomic checkpoints, exact resume
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lmforge.training.args import TrainingArguments
from lmforge.training.optim import build_optimizer, build_scheduler
from lmforge.utils import (atomic_directory, atomic_write_text, matmul_peak_flops, recover_directory, resolve_device,
                           set_seed)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"


class TrainerCallback:
    """Override any of these hooks; each gets the trainer and (where there is one) a metrics dict."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_log(self, trainer: "Trainer", logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...
    def on_save(self, trainer: "Trainer", checkpoint: Path) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


@dataclass
class TrainerState:
    """What a checkpoint needs besides tensors; saved as trainer_state.json."""

    global_step: int = 0
    samples_seen: int = 0  # data position: the next training example is item `samples_seen`
    tokens_seen: int = 0
    best_metric: float | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class _FromIndex(Sampler[int]):
    """Items start, start+1, ... (over epochs, optionally shuffled per epoch with a seeded permutation).

    Resuming starts at the saved data position without touching the items before it."""

    def __init__(self, n: int, start: int, shuffle: bool, seed: int) -> None:
        self.n, self.start, self.shuffle, self.seed = n, start, shuffle, seed

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                     if self.shuffle else range(self.n))
            for i in range(offset, self.n):
                yield order[i]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # an endless stream; the trainer stops at max_steps
        return 2**62


def default_collate(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack equally long examples (dicts of tensors or lists) into a batch."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


class Trainer:
    """Trains `model` on `train_dataset` (items are dicts the model accepts as keywords, with `labels`)."""

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | None = None, data_collator: Any = None, tokenizer: Any = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.model = model.to(self.device)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate = data_collator or default_collate
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.output_dir = Path(args.output_dir)
        self.optimizer = build_optimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        self._peak_flops: float | None = args.peak_flops
        self._metrics_path = self.output_dir / "metrics.jsonl"

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        args = self.args
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        if len(self.train_dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".tmp-checkpoint-*"):  # a save cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.output_dir.glob(".old-checkpoint-*"):  # a re-save cut short between its renames
            recover_directory(self.output_dir / old.name[len(".old-"):].rsplit("-", 1)[0])
        if self._peak_flops is None:  # measured before seeding: its random matrices must not shift the RNG streams
            self._peak_flops = matmul_peak_flops(self.device, torch.bfloat16 if args.bf16 else torch.float32)
        set_seed(args.seed)
        if resume_from_checkpoint:
            path = (self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint))
            if path is None:
                print(f"lmforge: no checkpoint in {self.output_dir} yet; starting a new run")
            else:
                self._load_checkpoint(path)
                print(f"lmforge: resumed from {path} at step {self.state.global_step}")
        self._trim_metrics(self.state.global_step)
        for cb in self.callbacks:
            cb.on_train_begin(self)

        batches = self._train_batches()
        progress = self._progress()
        self.model.train()
        window_start, window_tokens, running = time.perf_counter(), 0, []
        try:
            while self.state.global_step < args.max_steps:
                micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
                loss, tokens, grad_norm = self._optimizer_step(micro)
                self.state.global_step += 1
                self.state.samples_seen += sum(len(b["input_ids"]) for b in micro)
                self.state.tokens_seen += tokens
                window_tokens += tokens
                running.append(loss)
                step = self.state.global_step
                if step % args.logging_steps == 0 or step == args.max_steps:
                    elapsed = time.perf_counter() - window_start
                    logs = self._train_logs(running, grad_norm, window_tokens, elapsed, micro)
                    progress.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['learning_rate']:.1e}",
                                         tok_s=f"{logs['tokens_per_second']:.0f}", mfu=f"{logs.get('mfu', 0):.0%}")
                    self.log(logs)
                    window_start, window_tokens, running = time.perf_counter(), 0, []
                if self.eval_dataset is not None and args.eval_steps and step % args.eval_steps == 0:
                    self.evaluate()
                    window_start = time.perf_counter()  # evaluation time is not training time
                if args.save_steps and step % args.save_steps == 0:
                    self.save_checkpoint()
                    window_start = time.perf_counter()
                progress.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self)
        except KeyboardInterrupt:
            progress.close()
            path = self.save_checkpoint()
            raise KeyboardInterrupt(f"interrupted at step {self.state.global_step}; saved {path}, "
                                    "continue with resume_from_checkpoint=True (CLI: --resume)") from None
        progress.close()
        metrics: dict[str, float] = {}
        if self.eval_dataset is not None and not (args.eval_steps and self.state.global_step % args.eval_steps == 0):
            metrics = self.evaluate()
        elif self.eval_dataset is not None:  # evaluated at the last step already: report that evaluation
            last = next((h for h in reversed(self.state.log_history) if "eval_loss" in h), {})
            metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
        if not (args.save_steps and self.state.global_step % args.save_steps == 0):
            self.save_checkpoint()
        self.save_model()
        for cb in self.callbacks:
            cb.on_train_end(self)
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), metrics)

    def _optimizer_step(self, micro: list[dict[str, Tensor]]) -> tuple[float, int, float]:
        """One optimizer step over the micro-batches of an accumulation window.

        The loss of every micro-batch is its summed token loss divided by the token count of the
        whole window, so accumulation gives the same gradient as one big batch."""
        model, args = self.model, self.args
        count = getattr(model, "num_loss_items", None)
        n_items = sum(int(count(b["labels"])) for b in micro) if count else None
        total = torch.zeros((), device=self.device)
        tokens = 0
        for batch in micro:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            tokens += batch["input_ids"].numel()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                if n_items is not None:
                    loss = model(**batch, num_items_in_batch=max(n_items, 1)).loss
                else:
                    loss = model(**batch).loss / len(micro)
            loss.backward()
            total += loss.detach()
        # max_norm=inf measures the norm without clipping (and keeps NaN out of metrics.jsonl)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf))
        loss_value = float(total)
        if math.isfinite(loss_value):
            self.optimizer.step()
        else:
            print(f"lmforge: non-finite loss at step {self.state.global_step + 1}; update skipped")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, grad_norm

    def _train_batches(self) -> Iterator[dict[str, Tensor]]:
        from lmforge.data import RandomBlockDataset

        ds = self.train_dataset
        sampler = _FromIndex(len(ds), self.state.samples_seen,
                             shuffle=not isinstance(ds, RandomBlockDataset), seed=self.args.seed)
        loader = DataLoader(ds, batch_size=self.args.per_device_train_batch_size, sampler=sampler,
                            collate_fn=self.collate, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.device.type == "cuda", generator=self._loader_generator())
        return iter(loader)

    def _loader_generator(self) -> torch.Generator:
        """A DataLoader's own generator: starting its iterator then leaves the global RNG (dropout) untouched,
        so a resumed run draws the same dropout masks as an uninterrupted one."""
        return torch.Generator().manual_seed(self.args.seed)

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset: Dataset | None = None) -> dict[str, float]:
        """Mean loss per scored token over the evaluation set, and its perplexity."""
        ds = eval_dataset or self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset")
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(ds, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.collate,
                            generator=self._loader_generator())
        count = getattr(self.model, "num_loss_items", None)
        loss_sum, items = 0.0, 0
        for i, batch in enumerate(loader):
            if self.args.eval_max_batches and i >= self.args.eval_max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                loss = self.model(**batch).loss
            n = int(count(batch["labels"])) if count else 1
            loss_sum += float(loss) * n
            items += n
        self.model.train(was_training)
        if items == 0:
            raise ValueError("the evaluation dataset is empty")
        eval_loss = loss_sum / items
        metrics = {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}
        self.log(metrics)
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)
        return metrics

    # ---- logging -----------------------------------------------------------------------------
    def _progress(self) -> Any:
        from tqdm.auto import tqdm

        import sys

        return tqdm(total=self.args.max_steps, initial=self.state.global_step, desc="train", unit="step",
                    disable=self.args.disable_tqdm, dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 30.0)  # logs stay short when not a terminal

    def _train_logs(self, losses: list[float], grad_norm: float, tokens: int, elapsed: float,
                    micro: list[dict[str, Tensor]]) -> dict[str, Any]:
        logs: dict[str, Any] = {"loss": sum(losses) / len(losses), "learning_rate": self.scheduler.get_last_lr()[0],
                                "grad_norm": grad_norm, "tokens_per_second": tokens / max(elapsed, 1e-9)}
        flops = getattr(self.model, "flops_per_token", None)
        if flops is not None and self._peak_flops:
            seq_len = micro[0]["input_ids"].shape[-1]
            logs["mfu"] = flops(seq_len) * logs["tokens_per_second"] / self._peak_flops
        return logs

    def log(self, logs: dict[str, Any]) -> None:
        """Record metrics: trainer state, metrics.jsonl and callbacks."""
        entry = {"step": self.state.global_step, **{k: (float(f"{v:.7g}") if isinstance(v, float) else v)
                                                     for k, v in logs.items()}}  # 7 significant digits
        self.state.log_history.append(entry)
        if "jsonl" in self.args.report_to:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self._metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        for cb in self.callbacks:
            cb.on_log(self, entry)

    def _trim_metrics(self, step: int) -> None:
        """After a resume, drop metric lines the interrupted run wrote past the checkpoint."""
        if not self._metrics_path.exists():
            return
        lines = self._metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self._metrics_path, "".join(ln + "\n" for ln in kept))

    # ---- checkpoints -------------------------------------------------------------------------
    def save_model(self, directory: str | os.PathLike | None = None) -> Path:
        """The model (and tokenizer) in Hugging Face layout, ready for from_pretrained."""
        from lmforge.hub import save_pretrained

        directory = Path(directory or self.output_dir)
        save_pretrained(self.model, directory, tokenizer=self.tokenizer)
        atomic_write_text(directory / "training_args.json", json.dumps(self.args.to_dict(), indent=2) + "\n")
        return directory

    def save_checkpoint(self) -> Path:
        """checkpoint-<step>/: model + optimizer + scheduler + RNG + data position, written atomically."""
        final = self.output_dir / f"checkpoint-{self.state.global_step}"
        with atomic_directory(final) as tmp:
            self.save_model(tmp)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / OPTIMIZER_NAME)
            rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / RNG_NAME)
            state = {**self.state.__dict__, "args": self.args.to_dict()}
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        self._rotate_checkpoints()
        for cb in self.callbacks:
            cb.on_save(self, final)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in output_dir, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir()
                 if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if limit is None:
            return
        for old in self.checkpoints()[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        from lmforge.hub import load_hf_state_dict, read_weights

        path = Path(path)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_NAME}); "
                                    "pass a checkpoint-<step> folder written by the Trainer")
        weights, source = read_weights(path)
        load_hf_state_dict(self.model, weights, str(source))
        opt = torch.load(path / OPTIMIZER_NAME, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(path / RNG_NAME, map_location="cpu", weights_only=True)
        random.setstate(_as_python_state(rng["python"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        saved.pop("args", None)
        self.state = TrainerState(**saved)


def _as_python_state(state: Any) -> tuple:
    """random.setstate needs tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
