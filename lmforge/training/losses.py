"""Per-example losses, for sample weights (a per-example `weight` that scales that example's loss:
the simplest answer to biased or unbalanced data is to re-weight it).

Each example's loss is the SUM over the items it scores (tokens for language models and token
classification, 1 for sequence classification), so that with all weights 1 the weighted loss of a
batch equals the model's own loss times its item count.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def count_loss_items(model: nn.Module, batch: dict[str, Tensor]) -> int:
    """How many items the model's (mean) loss averages over in `batch`: scored tokens for models
    that say so (`num_loss_items`) or for per-token labels, else one per example."""
    labels = batch.get("labels")
    if labels is None:
        return len(next(iter(batch.values())))
    count = getattr(model, "num_loss_items", None)
    if count is not None:
        return int(count(labels))
    ids = batch.get("input_ids")
    if ids is not None and labels.dim() == 2 and not labels.is_floating_point() and labels.shape == ids.shape:
        return int((labels != IGNORE_INDEX).sum())  # token classification
    return len(labels)


def example_losses(model: nn.Module, output: Any, labels: Tensor) -> Tensor:
    """(B,) summed loss of each example, from a forward pass run WITHOUT labels (full logits)."""
    logits = output.logits
    if logits is None:
        raise ValueError("sample weights need a model output with logits")
    if getattr(model, "shifts_labels", False):  # causal LM: position t predicts label t + 1
        if labels.size(1) == logits.size(1):
            logits = logits[:, :-1]
        labels = labels[:, 1:]
    if logits.dim() == 3:  # per-token classes: (B, T, V) against (B, T)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                    reduction="none")  # (B, T)
        return per_token.sum(dim=1)
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    if problem is None:
        problem = ("regression" if logits.size(-1) == 1 else
                   "single_label_classification" if not labels.is_floating_point() else "multi_label_classification")
    if problem == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float().view_as(logits.squeeze(-1)), reduction="none")
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(dim=-1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B,)


def weighted_loss(model: nn.Module, batch: dict[str, Tensor], weight: Tensor, forward: Any) -> Tensor:
    """Σ_i weight_i · loss_i over the batch (a sum, to be divided by the window's item count)."""
    if weight.dim() != 1 or len(weight) != len(batch["input_ids"]):
        raise ValueError(f"'weight' must hold one number per example, got shape {tuple(weight.shape)}")
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
        raise ValueError("sample weights must be finite and >= 0")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    output = forward(**inputs)
    return (example_losses(model, output, labels) * weight.to(output.logits.device).float()).sum()
