"""Training: TrainingArguments, the Trainer (accumulation, mixed precision, DDP/FSDP, checkpoints),
optimizer and schedule, metrics and reporting."""
from lmforge.training.args import TrainingArguments
from lmforge.training.trainer import (EvalPrediction, PredictionOutput, Trainer, TrainerCallback, TrainerState,
                                      TrainOutput)

__all__ = ["TrainingArguments", "Trainer", "TrainerCallback", "TrainerState", "TrainOutput", "EvalPrediction",
           "PredictionOutput"]
