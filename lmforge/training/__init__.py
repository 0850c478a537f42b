"""Training: TrainingArguments, the Trainer (loop; sampling plan, checkpoints and reporting in their own
modules), optimizer and schedule, metrics; the recipes `pretrain` and `finetune` sit above it."""

from lmforge.training.args import TrainingArguments
from lmforge.training.checkpoint import TrainerState
from lmforge.training.metrics import EvalPrediction
from lmforge.training.predictions import PredictionOutput
from lmforge.training.reporting import TensorBoardCallback, TrainerCallback
from lmforge.training.trainer import Trainer, TrainOutput

__all__ = [
    "TrainingArguments",
    "Trainer",
    "TrainerCallback",
    "TrainerState",
    "TrainOutput",
    "EvalPrediction",
    "PredictionOutput",
    "TensorBoardCallback",
]
