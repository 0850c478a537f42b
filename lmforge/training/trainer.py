"""Trainer: one training loop for pretraining and fine-tuning.

    examples --(DataCollator: pad, label -> labels)--> micro-batches (sampling.py: the data order)
    --(accumulation; loss normalised by the window's token/example count; DDP/FSDP across processes)-->
    AdamW + schedule + clipping --> evaluation (loss, compute_metrics on what predictions.py gathers, best
    model, early stopping)
    --> metrics.jsonl / TensorBoard / PNG (reporting.py) --> checkpoint-<step>/ folders (checkpoint.py)
    from which a run resumes exactly

Datasets are anything with `len()` and `[i]` returning a dict: torch Datasets, lists of dicts,
Hugging Face `datasets.Dataset`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmforge.constants import IGNORE_INDEX, NO_LENGTH_LIMIT, context_length
from lmforge.data.collate import DataCollator, DataCollatorForSeq2Seq
from lmforge.files import atomic_write_text
from lmforge.nn.losses import count_loss_items, smoothed_loss_sum, weighted_loss
from lmforge.training import checkpoint as ckpt
from lmforge.training import distributed as D
from lmforge.training.args import DEFAULT_GENERATION_MAX_LENGTH, TrainingArguments
from lmforge.training.checkpoint import TrainerState
from lmforge.training.metrics import EvalPrediction
from lmforge.training.optim import build_optimizer, build_scheduler
from lmforge.training.predictions import PredictionOutput, batch_labels, concat_batches, model_outputs, to_numpy
from lmforge.training.reporting import (
    MetricsLog,
    TensorBoardCallback,
    TrainerCallback,
    model_flops_utilization,
    plot_history,
)
from lmforge.training.sampling import PlanSampler, SamplingPlan, build_plan, example_lengths, shuffles
from lmforge.utils import matmul_peak_flops, resolve_device, set_seed

__all__ = ["Trainer", "TrainOutput", "PredictionOutput", "TrainerCallback", "TrainerState", "EvalPrediction"]

MAX_BAD_STEPS = 3  # consecutive non-finite losses before the run stops


@dataclass
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class Trainer:
    """Trains `model` on `train_dataset`; items are dicts the model accepts as keywords, with `labels`
    (or `label`), optionally `weight` (a per-example loss weight); text items need `tokenizer`."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Callable | None = None,
        tokenizer: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        callbacks: Sequence[TrainerCallback] | None = None,
        processing_class: Any = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.args = args = args or TrainingArguments()
        self.device = D.process_device(resolve_device(args.device))
        self.world = D.setup(self.device)
        if args.fp16 and self.device.type != "cuda":
            raise ValueError(
                f"fp16=True needs a CUDA GPU (float16 with a GradScaler); this run is on "
                f"{self.device.type}: use bf16=True instead"
            )
        if args.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(
                    f"{type(model).__name__} has no gradient_checkpointing_enable(); set gradient_checkpointing=False"
                )
            model.gradient_checkpointing_enable()
        self.model = model.to(self.device)  # the user's model (unwrapped)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        self._lengths: list[int] | None = None  # example lengths for group_by_length, read once
        if args.predict_with_generate and not callable(getattr(model, "generate", None)):
            raise ValueError(
                f"predict_with_generate=True needs a model with generate(); {type(model).__name__} has none"
            )
        self.data_collator = data_collator or self._default_collator()
        self.compute_metrics = compute_metrics
        # (logits, labels) of one evaluation batch -> what to keep of it (e.g. argmax, or sums): saves memory
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.callbacks = list(callbacks or [])
        if "tensorboard" in args.reporters and self.world.is_main:
            self.callbacks.append(TensorBoardCallback(args.logging_dir or str(Path(args.output_dir) / "runs")))
        self.state = TrainerState(world_size=self.world.size)
        self.output_dir = Path(args.output_dir)
        self.should_stop = False
        self._interrupts = 0  # Ctrl-C presses during train()
        self._wrapped = D.wrap(self.model, self.world, self.device, args.fsdp)
        self.optimizer = build_optimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args, max(args.max_steps, 1))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.fp16)
        self._peak_flops: float | None = args.peak_flops
        self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl")
        self._bad_steps = 0

    def _default_collator(self) -> Callable:
        """Pads examples and keeps only what the model's forward accepts (plus labels and weights); an
        encoder-decoder gets DataCollatorForSeq2Seq (sources and targets padded apart, decoder inputs built)."""
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return DataCollatorForSeq2Seq(self.tokenizer, model=self.model)
        params = inspect.signature(self.model.forward).parameters
        keep = {
            name
            for name, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        }
        causal = bool(getattr(self.model, "shifts_labels", False))
        config = getattr(self.model, "config", None)
        context = context_length(config)
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if tokenizer_limit is None or tokenizer_limit >= NO_LENGTH_LIMIT:
            limit = context
        else:
            limit = min(tokenizer_limit, context or tokenizer_limit)
        return DataCollator(
            self.tokenizer,
            causal_lm=causal,
            keep=keep,
            max_length=limit,
            pad_token_id=getattr(config, "pad_token_id", None),
        )

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> TrainOutput:
        """Train to the end (max_steps or num_train_epochs); `resume_from_checkpoint=True` continues the
        latest complete checkpoint in output_dir (a path picks one)."""
        args, world = self.args, self.world
        ds = self.train_dataset
        if ds is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        if len(ds) == 0:
            raise ValueError("the training dataset is empty: give it at least one example")
        plan = self._plan(len(ds))
        self.state.max_steps = plan.steps
        self.scheduler = build_scheduler(self.optimizer, args, plan.steps)
        if world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_unfinished_saves(self.output_dir)
        D.barrier(world)
        if self._peak_flops is None:  # measured before seeding: its random matrices must not shift the RNG streams
            self._peak_flops = matmul_peak_flops(self.device, torch.bfloat16 if args.bf16 else torch.float32)
        set_seed(args.seed + world.rank)
        if resume_from_checkpoint:
            path = self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                self._print(f"lmforge: no checkpoint in {self.output_dir} yet; starting a new run")
            else:
                self._load_checkpoint(path)
                self._print(f"lmforge: resumed from {path} at step {self.state.global_step}")
                step = self.state.global_step
                if step < plan.steps and plan.window(step)[0] != self.state.samples_seen:
                    plan = self._rebase(plan, path, len(ds))
                self.state.max_steps = plan.steps
        if world.is_main:
            self.metrics_log.trim(self.state.global_step)
        for cb in self.callbacks:
            cb.on_train_begin(self)

        loader = DataLoader(
            ds,
            batch_sampler=PlanSampler(plan, self.state.global_step),
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self._loader_generator(),
        )
        batches = iter(loader)
        progress = self._progress(plan.steps)
        self._wrapped.train()
        window_start, window_tokens, running = time.perf_counter(), 0, []
        evaluated_at = saved_at = -1
        sigint = self._defer_sigint()
        try:
            while self.state.global_step < plan.steps and not self.should_stop:
                step = self.state.global_step
                micro = [next(batches) for _ in plan.micro_batches(step)]
                loss, tokens, grad_norm = self._optimizer_step(micro)
                start, end = plan.window(step)
                old_epoch = self.state.samples_seen // len(ds)
                self.state.global_step += 1
                self.state.samples_seen = end
                self.state.tokens_seen += tokens
                self.state.epoch = end / len(ds)
                epoch_ended = end // len(ds) > old_epoch
                window_tokens += tokens
                if math.isfinite(loss):
                    running.append(loss)
                step = self.state.global_step
                last = step == plan.steps
                if step % args.logging_steps == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    logs = self._train_logs(running, grad_norm, window_tokens, elapsed, micro)
                    progress.set_postfix(
                        loss=f"{logs.get('loss', math.nan):.3f}",
                        lr=f"{logs['learning_rate']:.1e}",
                        tok_s=f"{logs['tokens_per_second']:.0f}",
                    )
                    self.log(logs)
                    window_start, window_tokens, running = time.perf_counter(), 0, []
                if self._due(args.eval_strategy, args.eval_steps, step, epoch_ended) and self.eval_dataset is not None:
                    self._evaluate_and_track()
                    evaluated_at = step
                if self._due(args.save_strategy, args.save_steps, step, epoch_ended):
                    self.save_checkpoint()
                    saved_at = step
                window_start = time.perf_counter() if evaluated_at == step or saved_at == step else window_start
                progress.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if self._stop_requested():  # Ctrl-C during this step: save now, between steps
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.close()
            if self._interrupts > 1:  # stopped at once, mid-step: a checkpoint now would not resume exactly
                raise
            path = self.save_checkpoint()
            raise KeyboardInterrupt(
                f"interrupted at step {self.state.global_step}; saved {path}, "
                "continue with resume_from_checkpoint=True (CLI: --resume)"
            ) from None
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
        progress.close()
        step = self.state.global_step
        metrics: dict[str, float] = {}
        if self.eval_dataset is not None and args.eval_strategy != "no":
            if evaluated_at == step:  # evaluated at the last step already: report that evaluation
                last_eval = next((h for h in reversed(self.state.log_history) if "eval_loss" in h), {})
                metrics = {k: v for k, v in last_eval.items() if k.startswith("eval_")}
            else:
                metrics = self._evaluate_and_track()
        if args.save_strategy != "no" and saved_at != step:
            self.save_checkpoint()
        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            self._load_weights(Path(self.state.best_model_checkpoint))
            self._print(
                f"lmforge: loaded the best model ({args.best_metric_name} = {self.state.best_metric:.4g}) "
                f"from {self.state.best_model_checkpoint}"
            )
        self.save_model()
        if world.is_main:
            plot_history(self.state.log_history, self.output_dir / "training_curves.png")
        for cb in self.callbacks:
            cb.on_train_end(self)
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]  # logged window means
        return TrainOutput(step, sum(losses) / len(losses) if losses else float("nan"), metrics)

    def _plan(self, n: int, base_step: int = 0, base_sample: int = 0) -> SamplingPlan:
        shuffle, lengths = shuffles(self.train_dataset), None
        if self.args.group_by_length and shuffle:
            if self._lengths is None:  # read once per run
                self._lengths = example_lengths(self.train_dataset, self.args.length_column_name)
            lengths = self._lengths
        return build_plan(self.args, self.world, n, shuffle, lengths, base_step, base_sample)

    def _loader_generator(self) -> torch.Generator:
        """A DataLoader's own generator: starting its iterator then leaves the global RNG (dropout) untouched,
        so a resumed run draws the same dropout masks as an uninterrupted one."""
        return torch.Generator().manual_seed(self.args.seed)

    def _rebase(self, plan: SamplingPlan, path: Path, n: int) -> SamplingPlan:
        """The checkpoint was written with another global batch (batch size, accumulation or number of
        processes): continue from its data position with this run's batch, and say so."""
        step, seen = self.state.global_step, self.state.samples_seen
        new = self._plan(n, base_step=step, base_sample=seen)
        warnings.warn(
            f"{path} was trained with a global batch of {seen // max(step, 1)} examples per step and this "
            f"run uses {new.G}: training continues from example {seen} of the data stream with the new "
            f"batch ({new.steps} steps in all instead of {plan.steps})",
            stacklevel=3,
        )
        saved = self.scheduler.state_dict()
        self.scheduler = build_scheduler(self.optimizer, self.args, new.steps)
        self.scheduler.load_state_dict(saved)
        self.state.max_steps = new.steps
        return new

    def _defer_sigint(self) -> Any:
        """From here on, Ctrl-C (SIGINT) lets the running step finish, then the loop saves a checkpoint and
        stops: a step cut between the weight update and the step count could not be resumed exactly. A second
        Ctrl-C stops at once, without a checkpoint. Returns the previous handler to restore (None where
        signals cannot be caught: outside the main thread)."""
        self._interrupts = 0
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum: int, frame: Any) -> None:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            self._print("\nlmforge: interrupted; saving a checkpoint after this step (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, on_sigint)
        return previous if previous is not None else signal.default_int_handler

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed during the step just done (in any process, so that all save together)."""
        if not self.world.distributed:
            return self._interrupts > 0
        return D.all_reduce_sum([float(self._interrupts)], self.device, self.world)[0] > 0

    @staticmethod
    def _due(strategy: str, every: int | None, step: int, epoch_ended: bool) -> bool:
        if strategy == "epoch":
            return epoch_ended
        return strategy == "steps" and every is not None and step % every == 0

    def _optimizer_step(self, micro: list[dict[str, Tensor]]) -> tuple[float, int, float]:
        """One optimizer step over the micro-batches of an accumulation window.

        Each micro-batch contributes (its summed loss) / (the window's item count over all processes),
        items being scored tokens for language models, examples for classifiers; so batch 8 x 1 and
        batch 2 x 4 (or 2 processes x batch 4) give the same gradient over unevenly padded examples."""
        model, args, world = self.model, self.args, self.world
        # counted on the CPU batches, before the copy: no device synchronisation for bookkeeping
        counts = [count_loss_items(model, b) for b in micro]
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
        total_items, tokens = D.all_reduce_sum([sum(counts), tokens], self.device, world)
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro]
        scale = world.size / max(total_items, 1.0)  # DDP averages gradients over processes: undo that
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        amp = torch.bfloat16 if args.bf16 else torch.float16
        for i, (batch, count) in enumerate(zip(micro, counts)):
            weight = batch.pop("weight", None)
            sync = i == len(micro) - 1 or not world.distributed
            no_sync = not sync and hasattr(self._wrapped, "no_sync")
            ctx = self._wrapped.no_sync() if no_sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=amp, enabled=args.bf16 or args.fp16):
                    if weight is not None:
                        if args.label_smoothing_factor:
                            raise ValueError("label_smoothing_factor does not combine with sample weights yet")
                        summed = weighted_loss(model, batch, weight, self._wrapped)
                    elif count and args.label_smoothing_factor:
                        summed = smoothed_loss_sum(model, batch, args.label_smoothing_factor, self._wrapped)
                    elif count:
                        summed = self._wrapped(**batch).loss.float() * count
                    else:  # nothing scored here (mean loss 0/0): a zero that still runs backward (DDP's sync)
                        summed = _zero_loss(self._wrapped(**batch))
                self.scaler.scale(summed * scale).backward()
            loss_sum += summed.detach().double()
        self.scaler.unscale_(self.optimizer)
        # max_norm=inf measures the norm without clipping (and keeps NaN out of metrics.jsonl)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded (DTensor) norm
        local_loss, grad_norm = torch.stack([loss_sum, norm.double()]).tolist()  # one synchronisation per step
        (loss_total,) = D.all_reduce_sum([local_loss], self.device, world)
        loss_value = loss_total / max(total_items, 1.0)
        if math.isfinite(loss_value) and (math.isfinite(grad_norm) or args.fp16):
            self.scaler.step(self.optimizer)  # with fp16 the scaler skips steps whose gradients overflowed
            self._bad_steps = 0
        else:
            self._skip_bad_step(loss_value, grad_norm)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, int(tokens), grad_norm

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        self._bad_steps += 1
        step = self.state.global_step + 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        self._print(f"lmforge: non-finite {what} at step {step}; the update was skipped")
        self.log({"skipped_step": step, "nonfinite": what}, step=step)
        if self._bad_steps >= MAX_BAD_STEPS:
            last = self.latest_checkpoint()
            raise FloatingPointError(
                f"{MAX_BAD_STEPS} steps in a row had a non-finite {what.split()[0]} (at step {step}); stopping. The "
                f"weights were not updated by those steps; the last good checkpoint is "
                f"{last if last else '(none saved yet)'}. Lower the learning rate, set max_grad_norm, use bf16 "
                "instead of fp16, or check the data for empty or broken examples"
            )

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean loss per scored item over the evaluation set (perplexity for language models) and
        whatever `compute_metrics` returns, each prefixed `eval_`."""
        out = self._predict_loop(
            eval_dataset if eval_dataset is not None else self.eval_dataset,
            metric_key_prefix,
            keep_predictions=self.compute_metrics is not None,
        )
        self.log(out.metrics)
        for cb in self.callbacks:
            cb.on_evaluate(self, out.metrics)
        return out.metrics

    def predict(self, test_dataset: Any, metric_key_prefix: str = "test") -> PredictionOutput:
        """Logits for every example of `test_dataset` (in order), its labels, and metrics when it has labels."""
        return self._predict_loop(test_dataset, metric_key_prefix, keep_predictions=True)

    @torch.no_grad()
    def _predict_loop(self, ds: Any, prefix: str, keep_predictions: bool) -> PredictionOutput:
        if ds is None:
            raise ValueError(f"{'evaluate' if prefix == 'eval' else 'predict'}() needs a dataset")
        if len(ds) == 0:
            raise ValueError("the evaluation dataset is empty: give it at least one example")
        model, args = self.model, self.args
        was_training = model.training
        model.eval()
        loader = DataLoader(
            ds,
            batch_size=args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            generator=self._loader_generator(),
        )
        loss_sum, items, seen, started, token_loss = 0.0, 0, 0, time.perf_counter(), True
        preds: list[Any] = []
        labels: list[Any] = []
        # FSDP shards must run on every process; DDP evaluation runs on rank 0 with the plain model
        run = self._wrapped if self.args.fsdp and self.world.distributed else model
        if self.world.is_main or (self.args.fsdp and self.world.distributed):
            for i, batch in enumerate(loader):
                if args.eval_max_batches and i >= args.eval_max_batches:
                    break
                batch = {k: v.to(self.device) for k, v in batch.items()}
                batch.pop("weight", None)
                with torch.autocast(
                    self.device.type,
                    dtype=torch.bfloat16 if args.bf16 else torch.float16,
                    enabled=args.bf16 or args.fp16,
                ):
                    out = run(**batch)
                seen += len(next(iter(batch.values())))
                token_loss = token_loss and "next_sentence_label" not in batch  # MLM + NSP: no perplexity
                if getattr(out, "loss", None) is not None:
                    n = count_loss_items(model, batch)
                    loss_sum += float(out.loss) * n
                    items += n
                if keep_predictions and args.predict_with_generate:
                    preds.append(to_numpy(self._generate(model, batch)))
                    labels.append(to_numpy(batch_labels(batch)))
                elif keep_predictions:
                    logits, labels_now = model_outputs(out), batch_labels(batch)
                    if self.preprocess_logits_for_metrics is not None:
                        logits = self.preprocess_logits_for_metrics(logits, labels_now)
                    preds.append(to_numpy(logits))
                    labels.append(to_numpy(labels_now))
        model.train(was_training)
        metrics: dict[str, float] = {}
        if items:
            metrics[f"{prefix}_loss"] = loss_sum / items
            if getattr(model, "num_loss_items", None) is not None and token_loss:  # a language model's mean token loss
                metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 50.0))
        # generated ids are padded with the pad id (metrics decode them); logits with IGNORE_INDEX
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad = pad_id if args.predict_with_generate and pad_id is not None else IGNORE_INDEX
        predictions = concat_batches(preds, pad) if preds else None
        label_ids = concat_batches(labels) if labels and labels[0] is not None else None
        if self.compute_metrics is not None and predictions is not None and self.world.is_main:
            extra = self.compute_metrics(EvalPrediction(predictions, label_ids))
            metrics.update({(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): float(v) for k, v in extra.items()})
        runtime = time.perf_counter() - started
        metrics.update({f"{prefix}_runtime": runtime, f"{prefix}_samples_per_second": seen / max(runtime, 1e-9)})
        metrics = D.broadcast_object(metrics, self.world)
        return PredictionOutput(predictions, label_ids, metrics)

    def _generate(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """predict_with_generate: the model's generate on the batch's source ids and mask only (labels and
        decoder inputs never reach it) -> (B, 1 + n) ids, as transformers' Seq2SeqTrainer."""
        args = self.args
        max_length = args.generation_max_length or DEFAULT_GENERATION_MAX_LENGTH
        return model.generate(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            max_new_tokens=max_length - 1,  # the length counts the decoder start token
            num_beams=args.generation_num_beams or 1,
        )

    def _evaluate_and_track(self) -> dict[str, float]:
        """Evaluate, then update the best metric and the early-stopping count."""
        metrics = self.evaluate()
        args = self.args
        if not (args.load_best_model_at_end or args.early_stopping_patience or args.metric_for_best_model):
            return metrics
        name = args.best_metric_name
        if name not in metrics:
            raise ValueError(
                f"metric_for_best_model={args.metric_for_best_model!r} is not among the evaluation "
                f"metrics {sorted(k for k in metrics if not k.endswith(('_runtime', '_per_second')))}; "
                "choose one of those, or pass compute_metrics= that returns it"
            )
        value, best = metrics[name], self.state.best_metric
        better = best is None or (
            value > best + args.early_stopping_threshold
            if args.higher_is_better
            else value < best - args.early_stopping_threshold
        )
        if better:
            self.state.best_metric = value
            self.state.best_model_checkpoint = str(self.output_dir / f"checkpoint-{self.state.global_step}")
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
            patience = args.early_stopping_patience
            if patience and self.state.evals_without_improvement >= patience:
                self._print(
                    f"lmforge: early stopping at step {self.state.global_step}: {name} has not improved on "
                    f"{best:.4g} for {patience} evaluations"
                )
                self.should_stop = True
        return metrics

    # ---- logging -----------------------------------------------------------------------------
    def _print(self, message: str) -> None:
        if self.world.is_main:
            print(message, flush=True)

    def _progress(self, total: int) -> Any:
        return tqdm(
            total=total,
            initial=self.state.global_step,
            desc="train",
            unit="step",
            disable=self.args.disable_tqdm or not self.world.is_main,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )  # logs stay short when not a terminal

    def _train_logs(
        self, losses: list[float], grad_norm: float, tokens: int, elapsed: float, micro: list[dict[str, Tensor]]
    ) -> dict[str, Any]:
        logs: dict[str, Any] = {
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_second": tokens / max(elapsed, 1e-9),
            "epoch": round(self.state.epoch, 4),
        }
        flops = getattr(self.model, "flops_per_token", None)
        if flops is not None and self._peak_flops:
            seq_len = micro[0]["input_ids"].shape[-1]
            logs["mfu"] = model_flops_utilization(
                flops(seq_len), logs["tokens_per_second"], self._peak_flops, self.world.size
            )
        return {k: v for k, v in logs.items() if not (isinstance(v, float) and not math.isfinite(v))}

    def log(self, logs: dict[str, Any], step: int | None = None) -> None:
        """Record metrics at `step` (default: the current one): trainer state, metrics.jsonl (rank 0), callbacks."""
        rounded = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in logs.items()}  # 7 digits
        entry = {"step": self.state.global_step if step is None else step, **rounded}
        self.state.log_history.append(entry)
        if "jsonl" in self.args.reporters and self.world.is_main:
            self.metrics_log.append(entry)
        for cb in self.callbacks:
            cb.on_log(self, entry)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_model(self, directory: str | os.PathLike | None = None) -> Path:
        """The model (and tokenizer) in Hugging Face layout, ready for from_pretrained; LoRA models save
        their adapters (adapter_model.safetensors) next to the base weights."""
        directory = Path(directory or self.output_dir)
        full = D.full_state_dict(self._wrapped, self.world, self.args.fsdp)
        if self.world.is_main:
            ckpt.save_model_dir(self.model, directory, self.tokenizer, full)
            atomic_write_text(directory / "training_args.json", json.dumps(self.args.to_dict(), indent=2) + "\n")
        D.barrier(self.world)
        return directory

    def save_checkpoint(self) -> Path:
        """checkpoint-<step>/: model + optimizer + scheduler + scaler + RNG + data position, written
        atomically by rank 0 (every process's RNG state included)."""
        final = self.output_dir / f"checkpoint-{self.state.global_step}"
        all_rng = D.gather_objects(ckpt.rng_state(), self.world)
        optim_state = D.full_optimizer_state(self._wrapped, self.optimizer, self.world, self.args.fsdp)
        full = D.full_state_dict(self._wrapped, self.world, self.args.fsdp)
        if self.world.is_main:
            training = {
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            ckpt.write_checkpoint(
                final, self.model, self.tokenizer, full, training, all_rng, self.state, self.args.to_dict()
            )
            ckpt.rotate_checkpoints(self.output_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        D.barrier(self.world)
        for cb in self.callbacks:
            cb.on_save(self, final)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in output_dir, oldest first."""
        return ckpt.list_checkpoints(self.output_dir)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _load_weights(self, path: Path) -> None:
        if self.args.fsdp and self.world.distributed:
            raise NotImplementedError(
                "loading a checkpoint into an FSDP-sharded model is not supported yet: resume "
                "or load the best model with DDP (fsdp=False), or load the saved model "
                "directory with from_pretrained"
            )
        ckpt.load_model_weights(self.model, path)

    def _load_checkpoint(self, path: Path) -> None:
        path = Path(path)
        state = ckpt.read_trainer_state(path, self.world.size)
        self._load_weights(path)
        opt = ckpt.read_training_state(path, self.device)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if "scaler" in opt and self.scaler.is_enabled():
            self.scaler.load_state_dict(opt["scaler"])
        rng = ckpt.read_rng(path, self.world.rank)
        if rng is not None:
            ckpt.restore_rng(rng)
        self.state = state


def _zero_loss(out: Any) -> Tensor:
    """0, attached to the graph through the output's first logits."""
    for name in ("logits", "prediction_logits", "start_logits"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float().sum() * 0.0
    raise ValueError("the model output has no logits to build a zero loss from")
