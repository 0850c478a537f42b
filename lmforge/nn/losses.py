"""Every training loss, in one place: what the model heads return as `.loss`, what the Trainer counts
and re-weights, and what evaluation sums.

Token losses (causal LM, masked LM, token classification) are cross-entropies over the positions whose
label is not `IGNORE_INDEX`, averaged over the scored positions or divided by `num_items_in_batch`
(the scored positions of a whole accumulation window: exact gradient accumulation over unevenly padded
batches). Sequence losses follow Hugging Face's `problem_type`s. Labels that score nothing give 0, never NaN.

Per-example losses (for sample weights) are each example's SUM over the items it scores (tokens for
token losses, 1 for a sequence), so that with all weights 1 their total equals the mean loss times
`count_loss_items`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.constants import IGNORE_INDEX

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


# ---- token losses ------------------------------------------------------------------------------------
def token_loss_sum(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed float32 cross-entropy of logits (..., V) against labels (...), IGNORE_INDEX skipped.

    `label_smoothing` = eps scores each position as (1 - eps) * its NLL + eps * the mean NLL over all V
    classes (PyTorch's and transformers' `label_smoothing_factor` definition)."""
    V = logits.size(-1)
    return F.cross_entropy(
        logits.reshape(-1, V).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def _mean(loss_sum: Tensor, targets: Tensor, num_items_in_batch: int | Tensor | None) -> Tensor:
    """loss_sum over the scored targets (at least 1: all ignored gives 0), or over num_items_in_batch."""
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / num_items_in_batch


def shifted_targets(labels: Tensor, length: int) -> Tensor:
    """The causal-LM target of each of `length` positions: position t predicts labels[:, t + 1].

    labels (B, T) (usually the input ids: the last position gets IGNORE_INDEX) or (B, T + 1) (a block
    of context + 1 tokens, so that all T positions are scored) -> (B, T)."""
    target = labels[:, 1:]  # (B, L - 1)
    if target.size(1) < length:  # pad the target rather than copying the (large) logits
        return F.pad(target, (0, length - target.size(1)), value=IGNORE_INDEX)
    if target.size(1) > length:
        raise ValueError(
            f"labels have {labels.size(1)} positions for {length} logits; expected {length} or {length + 1}"
        )
    return target


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy; the shift happens here. logits (B, T, V); labels (B, T) or (B, T + 1)
    (see `shifted_targets`)."""
    target = shifted_targets(labels, logits.size(1))  # (B, T)
    return _mean(token_loss_sum(logits, target), target, num_items_in_batch)


def causal_lm_items(labels: Tensor) -> Tensor:
    """How many positions causal-LM `labels` (B, L) score (the shift drops the first label of each row)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def masked_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Cross-entropy at the positions whose label is not IGNORE_INDEX, no shift (BERT predicts the token
    at the position itself). logits (..., V), labels (...)."""
    return _mean(token_loss_sum(logits, labels), labels, num_items_in_batch)


def masked_lm_items(labels: Tensor) -> Tensor:
    """How many positions masked-LM (or token-classification) `labels` score."""
    return (labels != IGNORE_INDEX).sum()


def token_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of per-token classes: logits (B, T, N) against labels (B, T), IGNORE_INDEX skipped
    (NaN when nothing is scored, as PyTorch and transformers give)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


# ---- sequence losses -------------------------------------------------------------------------------
def problem_type_of(logits: Tensor, labels: Tensor, problem_type: str | None) -> str:
    """`problem_type`, or inferred as transformers does: one output -> "regression"; integer labels ->
    "single_label_classification"; otherwise (float multi-hot labels) "multi_label_classification"."""
    if problem_type is None:
        if logits.size(-1) == 1:
            return "regression"
        return (
            "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"
        )
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"unknown problem_type {problem_type!r}; use 'regression', 'single_label_classification' "
            "or 'multi_label_classification'"
        )
    return problem_type


def sequence_classification_loss(logits: Tensor, labels: Tensor, problem_type: str | None) -> Tensor:
    """Hugging Face's loss for sequence classifiers. logits (B, N); labels (B,) class ids (cross-entropy,
    IGNORE_INDEX skipped), (B,) or (B, N) floats for regression (MSE), (B, N) multi-hot floats for
    multi-label (BCE with logits)."""
    problem_type = problem_type_of(logits, labels, problem_type)
    num_labels = logits.size(-1)
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def next_sentence_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """BERT's next-sentence prediction: logits (B, 2) against labels (B,) (0 = B follows A, 1 = random)."""
    return F.cross_entropy(logits.view(-1, 2), labels.view(-1))


def question_answering_loss(
    start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor
) -> Tensor:
    """Mean of the start and end cross-entropies; logits (B, T), positions (B,). Positions outside the
    input are clamped to T and ignored, as transformers does."""
    T = start_logits.size(1)
    start = start_positions.reshape(-1).clamp(0, T)
    end = end_positions.reshape(-1).clamp(0, T)
    return (F.cross_entropy(start_logits, start, ignore_index=T) + F.cross_entropy(end_logits, end, ignore_index=T)) / 2


# ---- counting and per-example losses (the Trainer's accumulation and sample weights) --------------------
def count_loss_items(model: nn.Module, batch: dict[str, Tensor]) -> int:
    """How many items the model's (mean) loss averages over in `batch`: scored tokens for models that say
    so (`num_loss_items`) or for per-token labels, else one per example."""
    labels = batch.get("labels")
    if labels is None:
        return len(next(iter(batch.values())))
    count = getattr(model, "num_loss_items", None)
    if count is not None:
        return int(count(labels))
    ids = batch.get("input_ids")
    if ids is not None and labels.dim() == 2 and not labels.is_floating_point() and labels.shape == ids.shape:
        return int(masked_lm_items(labels))  # token classification
    return len(labels)


def smoothed_loss_sum(
    model: nn.Module, batch: dict[str, Tensor], label_smoothing: float, forward: Callable[..., Any]
) -> Tensor:
    """Summed label-smoothed cross-entropy of a batch (to be divided by the window's item count, as the
    models' mean losses are multiplied back by it). Token labels are shifted for causal LMs and used as they
    are otherwise (masked LM, encoder-decoders, per-token or per-example classes). The forward pass keeps
    `labels`, so an encoder-decoder builds its decoder inputs from them as usual."""
    output = forward(**batch)
    logits, labels = output.logits, batch["labels"]
    if logits is None or labels.is_floating_point() or logits.dim() != labels.dim() + 1:
        raise ValueError(
            "label_smoothing_factor needs class labels (integer ids, one per logit row); this model's "
            "labels are regression or multi-label targets: set label_smoothing_factor=0"
        )
    if getattr(model, "shifts_labels", False):  # causal LM: position t predicts label t + 1
        labels = shifted_targets(labels, logits.size(1))  # (B, T)
    return token_loss_sum(logits, labels, label_smoothing)


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
        per_token = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T)
        return per_token.sum(dim=1)
    problem = problem_type_of(logits, labels, getattr(getattr(model, "config", None), "problem_type", None))
    if problem == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float().view_as(logits.squeeze(-1)), reduction="none")
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(dim=-1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B,)


def weighted_loss(model: nn.Module, batch: dict[str, Tensor], weight: Tensor, forward: Callable[..., Any]) -> Tensor:
    """Σ_i weight_i · loss_i over the batch (a sum, to be divided by the window's item count); `forward`
    runs the model (the Trainer passes its DDP/FSDP wrapper)."""
    if weight.dim() != 1 or len(weight) != len(batch["input_ids"]):
        raise ValueError(f"'weight' must hold one number per example, got shape {tuple(weight.shape)}")
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
        raise ValueError("sample weights must be finite and >= 0")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    output = forward(**inputs)
    return (example_losses(model, output, labels) * weight.to(output.logits.device).float()).sum()
