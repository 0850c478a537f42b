"""What evaluation gathers: each batch's logits (or, with predict_with_generate, generated ids) and labels as
numpy arrays (one tensor, or a tuple for models with several outputs), joined over the batches for `compute_metrics`
and `Trainer.predict`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from lmforge.constants import IGNORE_INDEX


@dataclass
class PredictionOutput:
    """What `Trainer.predict` returns: every example's logits (in order), its labels, and metrics."""

    predictions: np.ndarray | tuple[np.ndarray, ...]
    label_ids: np.ndarray | tuple[np.ndarray, ...] | None
    metrics: dict[str, float]


def model_outputs(out: Any) -> Any:
    """Logits of one batch: a tensor, or a tuple for several outputs (QA's start and end; pretraining's
    masked-LM and next-sentence logits)."""
    if getattr(out, "start_logits", None) is not None:
        return (out.start_logits, out.end_logits)
    if getattr(out, "seq_relationship_logits", None) is not None:
        return (out.prediction_logits, out.seq_relationship_logits)
    return out.logits


def batch_labels(batch: dict[str, Tensor]) -> Any:
    """The labels of one batch, shaped like `model_outputs`: a tensor, or a tuple (QA's start and end
    positions; pretraining's masked-LM labels and next-sentence labels)."""
    if "start_positions" in batch:
        return (batch["start_positions"], batch["end_positions"])
    if "next_sentence_label" in batch:
        return (batch.get("labels"), batch["next_sentence_label"])
    return batch.get("labels")


def to_numpy(x: Any) -> Any:
    """Tensors (or tuples of them) as float32 / int64 numpy arrays on the CPU."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, (tuple, list)):
        return tuple(to_numpy(t) for t in x)
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


def concat_batches(parts: list[Any], pad_value: int = IGNORE_INDEX) -> Any:
    """Join per-batch arrays along the batch axis, padding ragged sequence dims with `pad_value` (IGNORE_INDEX
    for logits and labels; the pad id for generated ids, which metrics decode)."""
    if isinstance(parts[0], tuple):
        return tuple(concat_batches([p[i] for p in parts], pad_value) for i in range(len(parts[0])))
    if parts[0].ndim == 1 or all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return np.concatenate(parts)
    longest = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        width = [(0, 0), (0, longest - p.shape[1])] + [(0, 0)] * (p.ndim - 2)
        padded.append(np.pad(p, width, constant_values=pad_value))
    return np.concatenate(padded)
