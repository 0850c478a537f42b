"""Evaluation metrics for fine-tuning and pipelines, with no sklearn / seqeval / evaluate dependency.

    classification  accuracy, precision_recall_f1 (binary / macro / micro / weighted)
    NER             entity_spans (BIO = IOB2, IOB1 and IOBES, conlleval's chunk rules), entity_f1
    extractive QA   normalize_answer, exact_match, squad_f1, squad_metrics (SQuAD v1.1 rules, v2 no-answers)
    language models perplexity
    Trainer         EvalPrediction, classification_metrics, token_classification_metrics

Conventions: label -100 marks positions that are not scored (as in the models' losses) and is dropped
together with the prediction at that position; a ratio whose denominator is 0 is 0.0 (sklearn's
zero_division=0), never NaN or a warning; empty input raises ValueError.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.constants import IGNORE_INDEX

AVERAGES = ("binary", "macro", "micro", "weighted")


# ---- classification ---------------------------------------------------------------------------
def _as_array(x: Any, name: str) -> np.ndarray:
    """A flat numpy array from a list, numpy array or torch tensor (token-level 2-D inputs are flattened)."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name}: expected a rectangular array of labels, got ragged or mixed input")
    return arr.reshape(-1)


def _scored(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels at the positions whose label is not -100."""
    p, y = _as_array(preds, "preds"), _as_array(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in size: {p.size} vs {y.size}")
    if y.size == 0:
        raise ValueError("no predictions to score: preds and labels are empty")
    keep = y != IGNORE_INDEX
    if not keep.any():
        raise ValueError("no position to score: every label is -100 (ignored)")
    return p[keep], y[keep]


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den elementwise, with 0.0 where den == 0 (the zero-division convention)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to their label, over positions whose label is not -100."""
    p, y = _scored(preds, labels)
    return float(np.mean(p == y))


def precision_recall_f1(preds: Any, labels: Any, average: str = "binary", pos_label: Any = 1) -> dict[str, float]:
    """{"precision", "recall", "f1"} of single-label predictions, as sklearn's precision_recall_fscore_support.

    average: "binary" scores class `pos_label` only (more than two classes, or two without pos_label,
    raise ValueError); "macro" is the unweighted mean of per-class scores; "weighted" weights them by
    the class's count among the labels; "micro" pools all counts (equal to accuracy for single-label
    data). The classes are those in labels or predictions (after dropping -100 positions). Per-class
    F1 is 2·TP / (2·TP + FP + FN); any 0/0 is 0.0.
    """
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}; use one of {AVERAGES}")
    p, y = _scored(preds, labels)
    classes = np.union1d(p, y)
    if average == "binary":
        if len(classes) > 2:
            raise ValueError(
                f"average='binary' needs at most 2 classes, found {len(classes)} "
                f"({classes.tolist()[:10]}); use average='macro', 'micro' or 'weighted'"
            )
        if len(classes) == 2 and pos_label not in classes.tolist():  # e.g. labels "neg"/"pos", pos_label 1
            raise ValueError(f"pos_label={pos_label!r} is not one of the classes {classes.tolist()}")
        classes = np.asarray([pos_label])
    tp = np.array([np.sum((p == c) & (y == c)) for c in classes], dtype=np.float64)
    n_pred = np.array([np.sum(p == c) for c in classes], dtype=np.float64)
    n_true = np.array([np.sum(y == c) for c in classes], dtype=np.float64)
    if average == "micro":
        tp, n_pred, n_true = tp.sum(keepdims=True), n_pred.sum(keepdims=True), n_true.sum(keepdims=True)
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_true)
    f1 = _ratio(2 * tp, n_pred + n_true)  # = 2PR / (P + R) whenever that is defined
    weights = n_true / n_true.sum() if average == "weighted" else np.full(len(tp), 1.0 / len(tp))
    return {"precision": float(precision @ weights), "recall": float(recall @ weights), "f1": float(f1 @ weights)}


# ---- named entities -----------------------------------------------------------------------------
def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare 'B' / 'I' has the empty type."""
    if tag == "O":
        return "O", ""
    prefix, _, etype = tag.partition("-")
    if prefix not in ("B", "I", "E", "S"):
        raise ValueError(f"tag {tag!r} is not O or <B|I|E|S>-<type> (BIO / IOB2 / IOBES tags)")
    return prefix, etype


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tagged sentence as (type, start, end) with `end` exclusive: tags[start:end].

    Chunk boundaries follow conlleval: an entity starts at B- (or S-), and also at an I- (or E-) whose
    type differs from the previous tag's or that follows O, E- or S- -- so an I- without a preceding B-
    of the same type starts a new entity (which also reads IOB1 correctly). It ends before the next
    B-/S-/O or type change, and after E-/S-. BIO (= IOB2) and IOBES tags can be mixed freely.
    """
    spans: set[tuple[str, int, int]] = set()
    start, etype, prev = -1, "", "O"  # start = -1: not inside an entity
    for i, tag in enumerate(tags):
        prefix, t = _split_tag(tag)
        if start >= 0 and (prefix in ("B", "S", "O") or t != etype or prev in ("E", "S")):
            spans.add((etype, start, i))
            start = -1
        if prefix != "O" and start < 0:
            start, etype = i, t
        prev = prefix
    if start >= 0:
        spans.add((etype, start, len(tags)))
    return spans


def entity_f1(pred_tag_seqs: Sequence[Sequence[str]], true_tag_seqs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro {"precision", "recall", "f1"} over entities of all sentences, as conlleval computes them.

    An entity counts as correct only when its type, start and end all match (exact span match);
    chunks are read with conlleval's rules (see entity_spans), which is seqeval's default mode, not
    its strict mode. With no predicted (or no true) entities precision (or recall) is 0.0.
    """
    if len(pred_tag_seqs) != len(true_tag_seqs):
        raise ValueError(f"{len(pred_tag_seqs)} predicted sentences but {len(true_tag_seqs)} true ones")
    if len(true_tag_seqs) == 0:
        raise ValueError("no sentences to score")
    n_pred = n_true = n_correct = 0
    for i, (pred, true) in enumerate(zip(pred_tag_seqs, true_tag_seqs)):
        if isinstance(pred, str) or isinstance(true, str):
            raise ValueError("pass sentences as lists of tags, e.g. [['B-PER', 'I-PER', 'O']], not strings")
        if len(pred) != len(true):
            raise ValueError(f"sentence {i}: {len(pred)} predicted tags but {len(true)} true tags")
        p, t = entity_spans(pred), entity_spans(true)
        n_pred, n_true, n_correct = n_pred + len(p), n_true + len(t), n_correct + len(p & t)
    return {
        "precision": float(_ratio(n_correct, n_pred)),
        "recall": float(_ratio(n_correct, n_true)),
        "f1": float(_ratio(2 * n_correct, n_pred + n_true)),
    }


# ---- extractive question answering ------------------------------------------------------------
# Characters read one per token: CJK ideographs (with extensions and compatibility forms) and Japanese
# kana -- scripts written without spaces. Hangul is written with spaces and keeps word tokens.
_CJK = (
    "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002ebef\U00030000-\U0003134f"
)
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SPACE_NEAR_CJK_RE = re.compile(f"\\s*([{_CJK}])\\s*")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalisation: lower-case, drop ASCII punctuation, the articles a/an/the and
    extra whitespace.

    Text with CJK characters also loses all Unicode punctuation (，。「」…) and any whitespace next to a CJK
    character, since Chinese and Japanese do not separate words with spaces. Text without CJK is
    normalised exactly as the official script does, so English scores stay comparable.
    """
    s = s.lower()
    cjk = _CJK_RE.search(s) is not None
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCT and not (cjk and unicodedata.category(ch).startswith("P")))
    s = " ".join(_ARTICLES_RE.sub(" ", s).split())
    return _SPACE_NEAR_CJK_RE.sub(r"\1", s) if cjk else s


def _answer_tokens(s: str) -> list[str]:
    """Tokens of a normalised answer: each CJK character alone, other text split on whitespace.

    For text without CJK this is SQuAD's whitespace split; for Chinese, token F1 is character F1."""
    return _TOKEN_RE.findall(normalize_answer(s))


def _ground_truths(ground_truths: str | Iterable[str] | Mapping[str, Any]) -> list[str]:
    """A list of reference answers; none (SQuAD v2 unanswerable) becomes [''] so only '' matches."""
    if isinstance(ground_truths, Mapping):  # a Hugging Face answers dict {"text": [...], "answer_start": [...]}
        ground_truths = ground_truths["text"]
    answers = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    return answers or [""]


def exact_match(prediction: str, ground_truths: str | Iterable[str] | Mapping[str, Any]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    No reference answers (an unanswerable question) match only an empty prediction."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gt) for gt in _ground_truths(ground_truths)))


def _token_f1(prediction: str, ground_truth: str) -> float:
    pred, true = _answer_tokens(prediction), _answer_tokens(ground_truth)
    if not pred or not true:  # SQuAD v2: an empty answer is right only against an empty answer
        return float(pred == true)
    common = sum((Counter(pred) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: str | Iterable[str] | Mapping[str, Any]) -> float:
    """Token-overlap F1 (bag of normalised tokens) against the best-matching reference answer.

    Tokens are whitespace-separated words, and single characters in CJK text (character F1 for Chinese).
    An empty prediction scores 1.0 against an empty reference (unanswerable) and 0.0 otherwise."""
    return max(_token_f1(prediction, gt) for gt in _ground_truths(ground_truths))


def squad_metrics(
    predictions: Sequence[str] | Mapping[Any, str], references: Sequence[Any] | Mapping[Any, Any]
) -> dict[str, float]:
    """{"exact_match", "f1"} in percent, averaged over questions.

    Pass two sequences in the same order, or two mappings keyed by question id (with the same ids).
    A reference is an answer string, a list of them, or a Hugging Face answers dict {"text": [...]};
    an empty list marks an unanswerable question, which only the empty prediction "" gets right."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise ValueError("pass predictions and references both as sequences or both as id -> answer mappings")
    if isinstance(predictions, Mapping):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        if missing or extra:
            raise ValueError(
                f"ids differ: {len(missing)} references without prediction (e.g. "
                f"{sorted(map(str, missing))[:3]}), {len(extra)} predictions without reference "
                f"(e.g. {sorted(map(str, extra))[:3]})"
            )
        pairs = [(predictions[k], references[k]) for k in references]
    else:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        pairs = list(zip(predictions, references))
    if not pairs:
        raise ValueError("no questions to score")
    em = sum(exact_match(p, r) for p, r in pairs)
    f1 = sum(squad_f1(p, r) for p, r in pairs)
    return {"exact_match": 100.0 * em / len(pairs), "f1": 100.0 * f1 / len(pairs)}


# ---- language modelling -------------------------------------------------------------------------
def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy per token, in nats); inf when that overflows a float."""
    try:
        return math.exp(float(mean_loss))
    except OverflowError:
        return math.inf


# ---- Trainer compute_metrics --------------------------------------------------------------------
@dataclass
class EvalPrediction:
    """What a Trainer passes to compute_metrics: model outputs and labels of the whole evaluation set.

    Unpacks like Hugging Face's: `logits, labels = eval_pred`."""

    predictions: Any  # numpy logits, (N, C) or (N, T, C); a tuple of arrays uses its first
    label_ids: Any  # numpy labels, (N,) or (N, T); -100 = not scored

    def __iter__(self) -> Iterator[Any]:
        return iter((self.predictions, self.label_ids))

    def __getitem__(self, i: int) -> Any:
        return (self.predictions, self.label_ids)[i]

    def __len__(self) -> int:
        return 2


def _unpack(eval_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = eval_pred
    if isinstance(logits, (tuple, list)):  # models returning several outputs: the logits come first
        logits = logits[0]
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(logits), np.asarray(labels)


def classification_metrics(eval_pred: EvalPrediction | tuple[Any, Any]) -> dict[str, float]:
    """compute_metrics for sequence classification: {"accuracy", "f1_macro"}, plus "f1", "precision" and
    "recall" of class 1 when the logits have two classes.

    Predictions are the argmax of the last axis; logits of shape (N,) or (N, 1) are one binary logit
    (class 1 when > 0). Labels -100 are ignored."""
    logits, labels = _unpack(eval_pred)
    if logits.ndim == 1 or logits.shape[-1] == 1:
        preds, n_classes = (logits.reshape(len(logits), -1)[:, 0] > 0).astype(np.int64), 2
    else:
        preds, n_classes = logits.argmax(-1), logits.shape[-1]
    out = {"accuracy": accuracy(preds, labels), "f1_macro": precision_recall_f1(preds, labels, average="macro")["f1"]}
    if n_classes == 2:
        out.update(precision_recall_f1(preds, labels, average="binary", pos_label=1))
    return out


def token_classification_metrics(
    id2label: Mapping[Any, str] | Sequence[str],
) -> Callable[[EvalPrediction | tuple[Any, Any]], dict[str, float]]:
    """A compute_metrics for token classification (NER): entity {"precision", "recall", "f1"} (see
    entity_f1) and token "accuracy".

    Each token's prediction is the argmax of its logits; positions labelled -100 (special tokens,
    padding, word pieces after the first) are dropped before the ids become tags through `id2label`
    (a config's map, whose JSON string keys are accepted, or a list of tags)."""
    names = dict(enumerate(id2label)) if not isinstance(id2label, Mapping) else {int(k): v for k, v in id2label.items()}

    def tag(i: int) -> str:
        try:
            return names[i]
        except KeyError:
            raise ValueError(f"label id {i} is not in id2label (ids {sorted(names)[:20]})") from None

    def compute_metrics(eval_pred: EvalPrediction | tuple[Any, Any]) -> dict[str, float]:
        logits, labels = _unpack(eval_pred)
        preds = logits.argmax(-1)
        if preds.shape != labels.shape:
            raise ValueError(
                f"logits {logits.shape} do not match labels {labels.shape}: expected (N, T, C) logits for (N, T) labels"
            )
        preds, labels = preds.reshape(-1, labels.shape[-1]), labels.reshape(-1, labels.shape[-1])
        pred_tags, true_tags = [], []
        for p, y in zip(preds, labels):
            keep = y != IGNORE_INDEX
            pred_tags.append([tag(int(i)) for i in p[keep]])
            true_tags.append([tag(int(i)) for i in y[keep]])
        return {**entity_f1(pred_tags, true_tags), "accuracy": accuracy(preds, labels)}

    return compute_metrics
