"""TrainingArguments: the settings of one training run, checked when created.

The names are Hugging Face's, so familiar scripts read the same; the defaults are Hugging Face's
fine-tuning defaults (AdamW 5e-5, linear decay, 3 epochs). Pretraining recipes set their own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_GENERATION_MAX_LENGTH = 128  # generation_max_length=None: room for a long sentence, incl. the start token
SCHEDULERS = ("cosine", "linear", "constant")
STRATEGIES = ("no", "steps", "epoch")
REPORTERS = ("jsonl", "tensorboard")


@dataclass
class TrainingArguments:
    """What users reach for. Unknown or contradictory values raise ValueError naming the fix.

    Length: `max_steps` optimizer steps when > 0, else `num_train_epochs` passes over the data.
    Evaluation, saving: `*_strategy` "steps" (every `*_steps`; None = only at the end), "epoch" or "no".
    A run with an eval_dataset is evaluated at the end unless eval_strategy is "no"; the model is
    always saved to output_dir at the end.
    Generation (encoder-decoders, as transformers' Seq2SeqTrainingArguments): with `predict_with_generate`,
    evaluation and prediction hand `model.generate` ids (`generation_num_beams` beams, at most
    `generation_max_length` tokens counting the decoder start; None = 128) to `compute_metrics`.
    """

    output_dir: str = "runs/lmforge"
    num_train_epochs: float = 3.0
    max_steps: int = -1  # optimizer steps; > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int | float = 0  # steps, or (as in transformers 5) a float in (0, 1): a share of the run
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float | None = 1.0
    label_smoothing_factor: float = 0.0  # eps: targets (1 - eps) on the label + eps spread over all classes
    predict_with_generate: bool = False  # evaluate/predict: predictions = model.generate ids, not logits
    generation_max_length: int | None = None  # decoded length incl. the decoder start; None = 128
    generation_num_beams: int | None = None  # beams for predict_with_generate; None = 1 (greedy)
    logging_steps: int = 10
    eval_strategy: str = "steps"
    eval_steps: int | None = None  # None = evaluate only at the end
    eval_max_batches: int | None = None  # cap on evaluation batches (None = the whole eval set)
    save_strategy: str = "steps"
    save_steps: int | None = 500  # None = save a checkpoint only at the end
    save_total_limit: int | None = 2  # checkpoints kept; the latest and the best always stay
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None  # default "loss" (eval_loss) when needed
    greater_is_better: bool | None = None  # default: False for *loss metrics, True otherwise
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    early_stopping_threshold: float = 0.0  # the improvement that counts
    seed: int = 42
    bf16: bool = False  # bfloat16 autocast (CPU and GPU)
    fp16: bool = False  # float16 autocast with a GradScaler (GPU only)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    device: str = "auto"
    dataloader_num_workers: int = 0
    group_by_length: bool = False  # batch examples of similar length together (less padding, faster epochs)
    length_column_name: str = "length"  # an example's length for group_by_length (else len(input_ids))
    report_to: str | list[str] = "auto"  # "auto" = jsonl, plus tensorboard when installed; "none"
    logging_dir: str | None = None  # TensorBoard event files; default <output_dir>/runs
    disable_tqdm: bool = False
    peak_flops: float | None = None  # for MFU; None = measure a matmul peak at start

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()
        self._check_combinations()

    def _check_types(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise ValueError(
                f"TrainingArguments.max_steps must be an integer (-1 = use num_train_epochs), got {self.max_steps!r}"
            )
        for name in (
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "eval_max_batches",
            "early_stopping_patience",
            "generation_num_beams",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"TrainingArguments.{name} must be a positive integer or None, got {value!r}")
        for name in (
            "num_train_epochs",
            "learning_rate",
            "min_lr_ratio",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "warmup_ratio",
            "max_grad_norm",
            "peak_flops",
            "early_stopping_threshold",
            "label_smoothing_factor",
        ):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
            ):
                raise ValueError(
                    f"TrainingArguments.{name} must be a number, got {value!r}"
                    + (" (in YAML write 1.0e-3, not 1e-3)" if isinstance(value, str) else "")
                )
        for name in (
            "bf16",
            "fp16",
            "gradient_checkpointing",
            "fsdp",
            "load_best_model_at_end",
            "disable_tqdm",
            "group_by_length",
            "predict_with_generate",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainingArguments.{name} must be true or false, got {getattr(self, name)!r}")

    def _check_values(self) -> None:
        if self.max_steps <= 0 and self.max_steps != -1:
            raise ValueError(f"max_steps must be > 0, or -1 to train for num_train_epochs; got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 (or set max_steps), got {self.num_train_epochs}")
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
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                raise ValueError(f"{name} must be one of {STRATEGIES}, got {getattr(self, name)!r}")
        w = self.warmup_steps
        fraction = isinstance(w, float) and 0.0 < w < 1.0
        if (
            isinstance(w, bool)
            or not (isinstance(w, int) and w >= 0 or fraction or w == 0)
            or not 0.0 <= self.warmup_ratio < 1.0
        ):
            raise ValueError(
                f"warmup_steps must be an integer >= 0 or a fraction in (0, 1), got {w!r}; warmup_ratio "
                f"must be in [0, 1), got {self.warmup_ratio!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        length = self.generation_max_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
            raise ValueError(
                "TrainingArguments.generation_max_length must be an integer >= 2 (the decoder start token and at "
                f"least one new token) or None (= {DEFAULT_GENERATION_MAX_LENGTH}), got {length!r}"
            )
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 or None (measure it), got {self.peak_flops}")
        if self.early_stopping_threshold < 0:
            raise ValueError(f"early_stopping_threshold must be >= 0, got {self.early_stopping_threshold}")
        if not isinstance(self.dataloader_num_workers, int) or self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be an integer >= 0, got {self.dataloader_num_workers!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:1, mps or auto"
                ) from None
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = set(reports) - {*REPORTERS, "auto", "none", "all"}
        if unknown:
            raise ValueError(
                f"report_to: unknown destination(s) {sorted(unknown)}; use 'jsonl', 'tensorboard', "
                "'auto' (jsonl + tensorboard when installed) or 'none'"
            )

    def _check_combinations(self) -> None:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.bf16 and self.fp16:
            raise ValueError("choose one of bf16=True and fp16=True, not both")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError(
                    "load_best_model_at_end needs evaluations: set eval_strategy to 'steps' (with "
                    "eval_steps) or 'epoch'"
                )
            if self.save_strategy != self.eval_strategy:
                raise ValueError(
                    f"load_best_model_at_end needs a checkpoint at every evaluation: save_strategy "
                    f"({self.save_strategy!r}) must equal eval_strategy ({self.eval_strategy!r})"
                )
            if self.eval_strategy == "steps" and (
                self.eval_steps is None or self.save_steps is None or self.save_steps % self.eval_steps
            ):
                raise ValueError(
                    f"load_best_model_at_end with step strategies needs save_steps to be a multiple of "
                    f"eval_steps (got save_steps={self.save_steps}, eval_steps={self.eval_steps})"
                )
        if self.early_stopping_patience is not None:
            if self.eval_strategy == "no" or (self.eval_strategy == "steps" and self.eval_steps is None):
                raise ValueError(
                    "early_stopping_patience needs evaluations during training: set eval_strategy="
                    "'epoch', or eval_strategy='steps' with eval_steps"
                )

    # ---- derived values ----------------------------------------------------------------------
    @property
    def best_metric_name(self) -> str:
        """The evaluation key that ranks checkpoints, with its eval_ prefix (default eval_loss)."""
        name = self.metric_for_best_model or "loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.best_metric_name.endswith("loss")

    @property
    def reporters(self) -> set[str]:
        """Where metrics go: 'jsonl' and/or 'tensorboard' ('auto' adds tensorboard only when installed)."""
        wanted = {self.report_to} if isinstance(self.report_to, str) else set(self.report_to)
        if "none" in wanted:
            return set()
        found = wanted & set(REPORTERS)
        if wanted & {"auto", "all"}:
            found |= {"jsonl"} | ({"tensorboard"} if importlib.util.find_spec("tensorboard") else set())
        return found

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps`: an integer warmup_steps as is, a share (warmup_steps in
        (0, 1), or warmup_ratio) rounded up, as transformers does."""
        if isinstance(self.warmup_steps, float) and 0.0 < self.warmup_steps < 1.0:
            return math.ceil(self.warmup_steps * total_steps)
        return int(self.warmup_steps) or math.ceil(self.warmup_ratio * total_steps)

    @property
    def warmup(self) -> int:
        """Warmup steps of a run of max_steps (see warmup_for when the length comes from epochs)."""
        return self.warmup_for(max(self.max_steps, 0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingArguments:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; see TrainingArguments for the list")
        return cls(**d)
