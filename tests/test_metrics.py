"""Tests for lmforge.training.metrics: hand-computed values (arithmetic in the comments), edge cases, a
brute-force confusion-matrix reference for precision/recall/F1, and sklearn / seqeval oracles (test extra)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import seqeval.metrics  # test-only oracle (test extra)
import sklearn.metrics  # test-only oracle (test extra)
import torch

from lmforge.training.metrics import (
    EvalPrediction,
    accuracy,
    classification_metrics,
    entity_f1,
    entity_spans,
    exact_match,
    normalize_answer,
    perplexity,
    precision_recall_f1,
    squad_f1,
    squad_metrics,
    token_classification_metrics,
)


def close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want), (got, want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), (k, got, want)


# ---- accuracy ------------------------------------------------------------------------------------
def test_accuracy_ignores_minus_100():
    # the last position is ignored (label -100, whatever its prediction); of the 4 scored, 1 and 2 match: 2/4
    assert accuracy([1, 0, 2, 2, 5], [1, 1, 2, 0, -100]) == 0.5


def test_accuracy_accepts_tensors_numpy_and_2d():
    preds = torch.tensor([[1, 0], [2, 2]])
    labels = np.array([[1, 1], [2, -100]])
    assert accuracy(preds, labels) == pytest.approx(2 / 3)  # scored (1,1) (0,1) (2,2): 2 of 3 right


@pytest.mark.parametrize(
    "preds, labels, match", [([], [], "empty"), ([1, 2], [-100, -100], "-100"), ([1, 2], [1], "differ in size")]
)
def test_accuracy_rejects_nothing_to_score(preds, labels, match):
    with pytest.raises(ValueError, match=match):
        accuracy(preds, labels)


# ---- precision / recall / F1 -----------------------------------------------------------------------
PREDS = [0, 1, 1, 2, 2, 2, 2]
LABELS = [0, 1, 2, 2, 1, 0, 2]
# class 0: TP 1 (pos 0), predicted 1, true 2 (pos 0, 5)           -> P 1,   R 1/2, F1 2*1/(1+2)  = 2/3
# class 1: TP 1 (pos 1), predicted 2 (pos 1, 2), true 2 (pos 1, 4) -> P 1/2, R 1/2, F1 2*1/(2+2)  = 1/2
# class 2: TP 2 (pos 3, 6), predicted 4 (3-6), true 3 (pos 2, 3, 6) -> P 1/2, R 2/3, F1 2*2/(4+3) = 4/7
# supports 2, 2, 3 (of 7)


def test_prf_macro():
    close(
        precision_recall_f1(PREDS, LABELS, average="macro"),
        {
            "precision": (1 + 1 / 2 + 1 / 2) / 3,
            "recall": (1 / 2 + 1 / 2 + 2 / 3) / 3,
            "f1": (2 / 3 + 1 / 2 + 4 / 7) / 3,
        },
    )  # = 2/3, 5/9, 73/126


def test_prf_weighted():
    close(
        precision_recall_f1(PREDS, LABELS, average="weighted"),
        {
            "precision": (2 * 1 + 2 * 1 / 2 + 3 * 1 / 2) / 7,
            "recall": (2 * 1 / 2 + 2 * 1 / 2 + 3 * 2 / 3) / 7,
            "f1": (2 * 2 / 3 + 2 * 1 / 2 + 3 * 4 / 7) / 7,
        },
    )  # = 9/14, 4/7, 85/147


def test_prf_micro_equals_accuracy():
    # pooled: TP 1+1+2 = 4, predicted 7, true 7 -> 4/7 each, which is the accuracy
    close(precision_recall_f1(PREDS, LABELS, average="micro"), {"precision": 4 / 7, "recall": 4 / 7, "f1": 4 / 7})
    assert accuracy(PREDS, LABELS) == pytest.approx(4 / 7)


def test_prf_binary_and_pos_label():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # class 1: TP 2 (pos 0, 4), FP 1 (pos 1), FN 1 (pos 3) -> P 2/3, R 2/3, F1 2/3
    close(precision_recall_f1(preds, labels), {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    # class 0: TP 1 (pos 2), predicted 2 (pos 2, 3), true 2 (pos 1, 2) -> 1/2 each
    close(precision_recall_f1(preds, labels, pos_label=0), {"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # string labels work too: "pos" is class 1 above
    close(
        precision_recall_f1(
            ["pos" if p else "neg" for p in preds], ["pos" if y else "neg" for y in labels], pos_label="pos"
        ),
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3},
    )


def test_prf_zero_division_is_zero():
    # class 1 is never predicted: precision 0/0 -> 0.0, recall 0/2 = 0, F1 0/(0+2) = 0
    close(precision_recall_f1([0, 0], [1, 1]), {"precision": 0.0, "recall": 0.0, "f1": 0.0})
    # class 2 is only predicted, never true: its recall is 0/0 -> 0.0; macro over {0, 1, 2}:
    # class 0: P 1/1, R 1/1, F1 1; class 1: P 1/1, R 1/2, F1 2/3; class 2: P 0/1, R 0/0 -> 0, F1 0
    close(
        precision_recall_f1([0, 1, 2], [0, 1, 1], average="macro"),
        {"precision": 2 / 3, "recall": 1 / 2, "f1": (1 + 2 / 3) / 3},
    )


def test_prf_ignores_minus_100():
    # the -100 positions (with the wrong predictions 1 and 0 there) are dropped: left 1,0 vs 1,0 -> perfect
    close(precision_recall_f1([1, 1, 0, 0], [1, -100, 0, -100]), {"precision": 1.0, "recall": 1.0, "f1": 1.0})


def test_prf_rejects_bad_input():
    with pytest.raises(ValueError, match="binary"):
        precision_recall_f1([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="pos_label=1"):
        precision_recall_f1(["neg", "pos"], ["pos", "pos"])
    with pytest.raises(ValueError, match="average"):
        precision_recall_f1([0, 1], [0, 1], average="samples")
    with pytest.raises(ValueError, match="empty"):
        precision_recall_f1([], [], average="macro")
    with pytest.raises(ValueError, match="-100"):
        precision_recall_f1([0], [-100], average="macro")


def reference_prf(preds: np.ndarray, labels: np.ndarray, average: str, pos_label: int = 1) -> dict[str, float]:
    """Brute force from a confusion matrix over the classes present in labels or predictions."""
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    classes = sorted(set(preds.tolist()) | set(labels.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)  # rows: true class, columns: predicted
    for y, p in zip(labels.tolist(), preds.tolist()):
        cm[index[y], index[p]] += 1
    tp, pred_count, true_count = np.diag(cm), cm.sum(0), cm.sum(1)

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    per_p = [div(tp[i], pred_count[i]) for i in range(len(classes))]
    per_r = [div(tp[i], true_count[i]) for i in range(len(classes))]
    per_f = [div(2 * p * r, p + r) for p, r in zip(per_p, per_r)]
    if average == "binary":
        if pos_label not in index:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        i = index[pos_label]
        return {"precision": per_p[i], "recall": per_r[i], "f1": per_f[i]}
    if average == "micro":
        p, r = div(tp.sum(), pred_count.sum()), div(tp.sum(), true_count.sum())
        return {"precision": p, "recall": r, "f1": div(2 * p * r, p + r)}
    w = true_count / true_count.sum() if average == "weighted" else np.ones(len(classes)) / len(classes)
    return {"precision": float(np.dot(per_p, w)), "recall": float(np.dot(per_r, w)), "f1": float(np.dot(per_f, w))}


def random_cases(n_cases: int = 60):
    rng = np.random.default_rng(0)
    for _ in range(n_cases):
        n_classes = int(rng.integers(2, 6))
        n = int(rng.integers(1, 40))
        labels = rng.integers(0, n_classes, n)
        preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, n_classes, n))  # better than chance
        labels[rng.random(n) < 0.15] = -100
        if (labels == -100).all():
            labels[0] = 0
        yield n_classes, preds, labels


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", "binary"])
def test_prf_matches_confusion_matrix_reference(average):
    checked = 0
    for _, preds, labels in random_cases():
        present = set(preds[labels != -100].tolist()) | set(labels[labels != -100].tolist())
        if average == "binary" and len(present) > 2:
            continue
        for pos_label in [0, 1] if average == "binary" else [1]:
            if average == "binary" and len(present) == 2 and pos_label not in present:
                with pytest.raises(ValueError, match="pos_label"):
                    precision_recall_f1(preds, labels, average=average, pos_label=pos_label)
                continue
            got = precision_recall_f1(preds, labels, average=average, pos_label=pos_label)
            want = reference_prf(preds, labels, average, pos_label)
            for k in want:
                assert got[k] == pytest.approx(want[k], abs=1e-12), (average, preds, labels, k)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", "binary"])
def test_prf_matches_sklearn(average):
    for _, preds, labels in random_cases():
        keep = labels != -100
        present = set(preds[keep].tolist()) | set(labels[keep].tolist())
        if average == "binary" and (len(present) > 2 or (len(present) == 2 and 1 not in present)):
            continue
        p, r, f, _ = sklearn.metrics.precision_recall_fscore_support(
            labels[keep], preds[keep], average=average, pos_label=1, zero_division=0
        )
        got = precision_recall_f1(preds, labels, average=average)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f), abs=1e-12)
        assert accuracy(preds, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels[keep], preds[keep]))


# ---- entities ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
        (["O", "I-PER", "I-PER", "O"], {("PER", 1, 3)}),  # I- without B- starts an entity (conlleval)
        (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 3)}),  # type change: a new entity
        (["B-PER", "B-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 3)}),  # B- after B- of the same type
        (["I-PER", "B-PER"], {("PER", 0, 1), ("PER", 1, 2)}),  # IOB1: B- separates adjacent entities
        (["B-MISC-X", "I-MISC-X"], {("MISC-X", 0, 2)}),  # the type is everything after the first '-'
        (["S-PER", "B-LOC", "I-LOC", "E-LOC", "E-LOC"], {("PER", 0, 1), ("LOC", 1, 4), ("LOC", 4, 5)}),  # IOBES
        (["B-X", "E-X", "I-X"], {("X", 0, 2), ("X", 2, 3)}),  # I- after E- starts anew
        (["O", "O"], set()),
        ([], set()),
    ],
)
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


@pytest.mark.parametrize("tag", ["PER", "X-PER", "o"])
def test_entity_spans_rejects_unknown_tags(tag):
    with pytest.raises(ValueError, match="tag"):
        entity_spans(["O", tag])


def conlleval_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Reference: conlleval's end-of-chunk / start-of-chunk tests, written out rule by rule."""

    def split(tag: str) -> tuple[str, str]:
        return ("O", "") if tag == "O" else tuple(tag.split("-", 1))  # type: ignore[return-value]

    def ends(prev: str, prev_type: str, tag: str, etype: str) -> bool:
        return (
            (prev == "B" and tag in "BSO")
            or (prev == "I" and tag in "BSO")
            or prev in "ES"
            or (prev != "O" and prev_type != etype)
        )

    def starts(prev: str, prev_type: str, tag: str, etype: str) -> bool:
        return tag in "BS" or (prev in "ESO" and tag in "EI") or (tag != "O" and prev_type != etype)

    spans, start, prev, prev_type = set(), None, "O", ""
    for i, t in enumerate(tags + ["O"]):
        tag, etype = split(t)
        if start is not None and ends(prev, prev_type, tag, etype):
            spans.add((prev_type, start, i))
            start = None
        if starts(prev, prev_type, tag, etype):
            start = i
        prev, prev_type = tag, etype
    return spans


def test_entity_spans_match_conlleval_rules():
    rng = np.random.default_rng(2)
    vocab = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"]
    for _ in range(2000):
        tags = [vocab[i] for i in rng.integers(0, len(vocab), rng.integers(0, 10))]
        assert entity_spans(tags) == conlleval_spans(tags), tags


def test_entity_f1_hand_computed():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG"]]
    # true: PER(0,2) LOC(3,4) | ORG(0,1) -> 3;  predicted: PER(0,2) | ORG(0,2) -> 2;  correct: PER(0,2) -> 1
    # P 1/2, R 1/3, F1 2*1/(2+3) = 0.4 (ORG(0,2) against ORG(0,1) is a miss: spans must match exactly)
    close(entity_f1(pred, true), {"precision": 1 / 2, "recall": 1 / 3, "f1": 0.4})
    close(entity_f1(true, true), {"precision": 1.0, "recall": 1.0, "f1": 1.0})


def test_entity_f1_edge_cases():
    close(entity_f1([["O", "O"]], [["O", "O"]]), {"precision": 0.0, "recall": 0.0, "f1": 0.0})  # 0/0 -> 0
    close(entity_f1([["B-A"]], [["O"]]), {"precision": 0.0, "recall": 0.0, "f1": 0.0})
    with pytest.raises(ValueError, match="no sentences"):
        entity_f1([], [])
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="predicted sentences"):
        entity_f1([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="lists of tags"):
        entity_f1(["B-PER"], ["B-PER"])


def test_entity_f1_matches_seqeval():
    rng = np.random.default_rng(1)
    vocab = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    true = [[vocab[i] for i in rng.integers(0, len(vocab), rng.integers(1, 12))] for _ in range(200)]
    pred = [[t if rng.random() < 0.7 else vocab[rng.integers(0, len(vocab))] for t in s] for s in true]
    got = entity_f1(pred, true)
    assert got["precision"] == pytest.approx(seqeval.metrics.precision_score(true, pred))
    assert got["recall"] == pytest.approx(seqeval.metrics.recall_score(true, pred))
    assert got["f1"] == pytest.approx(seqeval.metrics.f1_score(true, pred))


# ---- SQuAD ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, normal",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("Theory of the atom", "theory of atom"),  # articles only as whole words
        ("don't", "dont"),  # punctuation is deleted, not replaced by a space
        ("\u201chello\u201d", "\u201chello\u201d"),  # English text: ASCII punctuation only, as the official script
        ("北京 大学。", "北京大学"),  # CJK: Unicode punctuation and spaces next to CJK characters go
        ("「2018 年」", "2018年"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match():
    assert exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a single reference string
    assert exact_match("北京，", ["北京"]) == 1.0


def test_squad_f1_hand_computed():
    # prediction tokens [big, red, dog] ("the" dropped), reference [red, dog]: 2 common
    # P 2/3, R 2/2 -> F1 2*(2/3)*1 / (2/3 + 1) = 0.8; the best of the references counts
    assert squad_f1("the big red dog", ["cat", "red dog"]) == pytest.approx(0.8)
    # bags of tokens: [x, x, y] vs [x, y, y] share min(2,1) + min(1,2) = 2 -> P 2/3, R 2/3, F1 2/3
    assert squad_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert squad_f1("nothing", ["in common"]) == 0.0


def test_squad_f1_chinese_is_character_f1():
    # prediction characters 北 京 大 学, reference 北 京: 2 common -> P 2/4, R 2/2, F1 2*(1/2)*1/(3/2) = 2/3
    assert squad_f1("北京大学", "北京") == pytest.approx(2 / 3)
    # digits stay one token beside CJK characters: [1949, 年, 10, 月] vs [1949, 年] -> the same 2/3
    assert squad_f1("1949年10月", "1949 年") == pytest.approx(2 / 3)


def test_no_answer():
    # an unanswerable question (no references) is right only for the empty prediction
    assert exact_match("", []) == 1.0 and squad_f1("", []) == 1.0
    assert exact_match("the", []) == 1.0 and squad_f1("...", []) == 1.0  # nothing left after normalising
    assert exact_match("Paris", []) == 0.0 and squad_f1("Paris", []) == 0.0
    assert exact_match("", ["Paris"]) == 0.0 and squad_f1("", ["Paris"]) == 0.0


def test_squad_metrics_percent():
    preds = ["Eiffel Tower", "red", ""]
    refs = [["the Eiffel Tower"], {"text": ["red dog"], "answer_start": [4]}, []]
    # EM: 1, 0, 1 -> 200/3 %;  F1: 1, ([red] vs [red, dog]: P 1, R 1/2 -> 2/3), 1 -> (8/3)/3 = 8/9 -> 88.9 %
    want = {"exact_match": 200 / 3, "f1": 800 / 9}
    for k, v in squad_metrics(preds, refs).items():
        assert v == pytest.approx(want[k])
    by_id = squad_metrics({"q3": "", "q1": "Eiffel Tower", "q2": "red"}, {"q1": refs[0], "q2": refs[1], "q3": refs[2]})
    assert by_id == pytest.approx(want)


def test_squad_metrics_rejects_mismatches():
    with pytest.raises(ValueError, match="ids differ"):
        squad_metrics({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="2 predictions but 1"):
        squad_metrics(["x", "y"], [["x"]])
    with pytest.raises(ValueError, match="no questions"):
        squad_metrics([], [])
    with pytest.raises(ValueError, match="both"):
        squad_metrics(["x"], {"a": ["x"]})


# ---- perplexity -------------------------------------------------------------------------------------
def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(torch.tensor(math.log(7.0))) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(float("nan")))


# ---- Trainer compute_metrics ------------------------------------------------------------------------
def test_eval_prediction_unpacks_like_hf():
    ep = EvalPrediction(predictions=np.zeros((2, 3)), label_ids=np.array([0, 1]))
    logits, labels = ep
    assert logits is ep.predictions and labels is ep.label_ids and ep[1] is ep.label_ids


def test_classification_metrics_multiclass():
    logits = np.array([[2, 1, 0], [0, 3, 1], [0, 1, 4], [5, 0, 0]], dtype=np.float32)  # argmax 0, 1, 2, 0
    labels = np.array([0, 1, 1, -100])
    # scored: preds 0,1,2 vs labels 0,1,1 -> accuracy 2/3
    # class 0: F1 1; class 1: TP 1, predicted 1, true 2 -> 2/(1+2) = 2/3; class 2: TP 0 -> 0; macro 5/9
    out = classification_metrics(EvalPrediction(logits, labels))
    close(out, {"accuracy": 2 / 3, "f1_macro": (1 + 2 / 3 + 0) / 3})


def test_classification_metrics_binary():
    logits = np.array([[0, 1], [1, 0], [0, 2], [3, 0]], dtype=np.float32)  # argmax 1, 0, 1, 0
    labels = np.array([1, 1, 0, 0])
    # accuracy 2/4; class 1: TP 1 (pos 0), predicted 2, true 2 -> P = R = F1 = 1/2; class 0 likewise
    want = {"accuracy": 0.5, "f1_macro": 0.5, "f1": 0.5, "precision": 0.5, "recall": 0.5}
    close(classification_metrics(EvalPrediction(logits, labels)), want)
    close(classification_metrics((logits, labels)), want)  # a plain (logits, labels) tuple
    close(classification_metrics(((logits, np.zeros((4, 8))), labels)), want)  # extra model outputs
    close(classification_metrics((torch.from_numpy(logits), torch.from_numpy(labels))), want)


def test_classification_metrics_single_logit():
    logits, labels = np.array([[0.3], [-1.0], [2.0]]), np.array([1, 0, 0])
    # class 1 where logit > 0: preds 1, 0, 1 -> accuracy 2/3; class 1: TP 1, predicted 2, true 1
    # -> P 1/2, R 1, F1 2/3; class 0: TP 1, predicted 1, true 2 -> F1 2/3; macro 2/3
    close(
        classification_metrics((logits, labels)),
        {"accuracy": 2 / 3, "f1_macro": 2 / 3, "f1": 2 / 3, "precision": 0.5, "recall": 1.0},
    )


ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}


def test_token_classification_metrics_hand_computed():
    labels = np.array([[-100, 1, 2, 0, 3], [-100, 3, 0, -100, -100]])
    preds = np.array([[3, 1, 2, 0, 0], [0, 3, 0, 2, 2]])
    logits = np.eye(4, dtype=np.float32)[preds] + 0.1  # (2, 5, 4), argmax = preds
    # without the -100 positions:
    #   sentence 1: true B-PER I-PER O B-LOC -> PER(0,2) LOC(3,4); predicted B-PER I-PER O O -> PER(0,2)
    #   sentence 2: true B-LOC O -> LOC(0,1); predicted B-LOC O -> LOC(0,1)
    # entities: true 3, predicted 2, correct 2 -> P 1, R 2/3, F1 2*2/(2+3) = 0.8
    # tokens: 3 of 4 right in sentence 1, 2 of 2 in sentence 2 -> 5/6
    want = {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "accuracy": 5 / 6}
    close(token_classification_metrics(ID2LABEL)(EvalPrediction(logits, labels)), want)
    # a config.json label map (string keys) and a plain list of tags give the same
    close(token_classification_metrics({str(k): v for k, v in ID2LABEL.items()})((logits, labels)), want)
    close(token_classification_metrics(["O", "B-PER", "I-PER", "B-LOC"])((logits, labels)), want)


def test_token_classification_metrics_errors():
    compute = token_classification_metrics(ID2LABEL)
    with pytest.raises(ValueError, match="not in id2label"):
        compute((np.eye(5, dtype=np.float32)[[[4, 0]]], np.array([[0, 0]])))
    with pytest.raises(ValueError, match="do not match"):
        compute((np.zeros((2, 4), dtype=np.float32), np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="-100"):
        compute((np.zeros((1, 2, 4), dtype=np.float32), np.full((1, 2), -100)))
