"""TrainingArguments: the settings of one training run, checked when created."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class TrainingArguments:
    """What users reach for, with Hugging Face's names. Unknown or contradictory values raise ValueError."""

    output_dir: str = "runs/lmforge"
    max_steps: int = 1000  # optimizer steps
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    eval_steps: int | None = 200  # None = evaluate only at the end
    eval_max_batches: int | None = 50  # cap on validation batches per evaluation (None = whole split)
    save_steps: int | None = 500  # None = save only at the end
    save_total_limit: int | None = 2  # checkpoints kept (the latest always stays)
    seed: int = 1337
    bf16: bool = False
    device: str = "auto"
    dataloader_num_workers: int = 0
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    disable_tqdm: bool = False
    peak_flops: float | None = None  # for MFU; None = measure a matmul peak at start

    def __post_init__(self) -> None:
        positive = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_steps", "save_total_limit", "eval_max_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"TrainingArguments.{name} must be a positive integer or None, got {value!r}")
        for name in ("learning_rate", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "warmup_ratio", "max_grad_norm", "peak_flops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise ValueError(f"TrainingArguments.{name} must be a number, got {value!r}"
                                 + (" (in YAML write 1.0e-3, not 1e-3)" if isinstance(value, str) else ""))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 or None (measure it), got {self.peak_flops}")
        if not isinstance(self.dataloader_num_workers, int) or self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be an integer >= 0, got {self.dataloader_num_workers!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:1, mps "
                                 "or auto") from None
        unknown = set(self.report_to) - {"jsonl", "none"}
        if unknown:
            raise ValueError(f"report_to: unknown destination(s) {sorted(unknown)}; use 'jsonl' or 'none'")

    @property
    def warmup(self) -> int:
        return self.warmup_steps or int(self.warmup_ratio * self.max_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingArguments":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; see TrainingArguments for the list")
        return cls(**d)
