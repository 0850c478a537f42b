"""Training: TrainingArguments, the Trainer, optimizer and schedule."""
from lmforge.training.args import TrainingArguments
from lmforge.training.trainer import Trainer, TrainerCallback, TrainerState, TrainOutput

__all__ = ["TrainingArguments", "Trainer", "TrainerCallback", "TrainerState", "TrainOutput"]
