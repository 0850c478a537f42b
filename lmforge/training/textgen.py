"""Generation metrics for text-to-text tasks done the GPT way (translation, summarisation).

    generate_targets(model, tokenizer, prompts)  greedy outputs of a causal LM, batched, cut at a stop string / EOS
    bleu(hypotheses, references)                 corpus BLEU, 0-100, computed by sacrebleu (optional dependency)
    rouge(predictions, references)               mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measures, 0-100
    score_generations(metric, preds, refs)       {"bleu": ...} or {"rouge1", "rouge2", "rougeL"}

Both metrics are on the 0-100 scale, as sacrebleu reports BLEU and as `squad_metrics` reports QA scores.
ROUGE is implemented here and follows Google's `rouge-score` package with its defaults
(`use_stemmer=False`): text is lowercased and split on anything that is not an ASCII letter or digit,
so it suits English; letters outside a-z (á, ñ, 中) act as separators.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from lmforge.constants import context_length
from lmforge.data.batching import fit_to_context, length_sorted_batches
from lmforge.generation import generate

GENERATION_METRICS = ("bleu", "rouge")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_ALNUM_OR_CJK = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# ---------------------------------------------------------------------------------- BLEU
def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of `hypotheses` against `references`, by sacrebleu's `corpus_bleu`
    with its defaults (13a tokenisation, exponential smoothing), so the number is comparable
    with published sacrebleu scores. `references[i]` is one string, or a list of alternatives
    (every hypothesis then needs the same number of them)."""
    hypotheses, streams = list(hypotheses), _reference_streams(hypotheses, references)
    try:  # sacrebleu is optional (the "full" extra)
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU is computed by sacrebleu, which is not installed: pip install sacrebleu") from None
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def _reference_streams(hypotheses: Sequence[str], references: Sequence[Any]) -> list[list[str]]:
    """Per-hypothesis references -> sacrebleu's layout: one list per reference "stream"."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("bleu takes lists of strings (one hypothesis and its reference(s) per example), got a str")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; give one each")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    counts = {len(r) for r in refs}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("every hypothesis needs the same number (>= 1) of references")
    return [[r[k] for r in refs] for k in range(counts.pop())]


# ---------------------------------------------------------------------------------- ROUGE
def rouge_tokenize(text: str, cjk_chars: bool = False) -> list[str]:
    """rouge-score's default tokens: lowercase, runs of [a-z0-9] (everything else separates). With
    `cjk_chars`, each Chinese/Japanese/Korean ideograph is a token too (Chinese ROUGE is counted in
    characters; rouge-score's default tokeniser would drop them all)."""
    if cjk_chars:
        return _ALNUM_OR_CJK.findall(text.lower())
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    """F1 of `overlap` matches among `n_pred` predicted and `n_ref` reference units (0 when none)."""
    precision = overlap / max(n_pred, 1)
    recall = overlap / max(n_ref, 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one DP row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j - 1], above)
            diagonal = above
    return row[-1]


def rouge_scores(prediction: str, reference: str, cjk_chars: bool = False) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 (n-gram overlap) and ROUGE-L (longest common subsequence) F-measures,
    0-1, of one prediction against one reference: the same numbers as rouge-score's
    `RougeScorer(["rouge1", "rouge2", "rougeL"]).score(reference, prediction)[k].fmeasure`."""
    pred, ref = rouge_tokenize(prediction, cjk_chars), rouge_tokenize(reference, cjk_chars)
    scores = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        scores[f"rouge{n}"] = _f_measure(sum((p & r).values()), sum(p.values()), sum(r.values()))
    scores["rougeL"] = _f_measure(_lcs_length(pred, ref), len(pred), len(ref)) if pred and ref else 0.0
    return scores


def rouge(predictions: Sequence[str], references: Sequence[str], cjk_chars: bool = False) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measure over the pairs, on the 0-100 scale (as Hugging
    Face's summarisation examples report it): {"rouge1", "rouge2", "rougeL"}. `cjk_chars=True` for
    Chinese: every ideograph counts as a token (see `rouge_tokenize`)."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("rouge takes lists of strings (one prediction and one reference per example), got a str")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; give one each")
    if not predictions:
        raise ValueError("no predictions to score")
    totals = Counter()
    for prediction, reference in zip(predictions, references):
        totals.update(rouge_scores(prediction, reference, cjk_chars))
    return {k: 100.0 * totals[k] / len(predictions) for k in ("rouge1", "rouge2", "rougeL")}


def score_generations(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`metric` ("bleu" or "rouge") of generated texts: {"bleu"} or {"rouge1", "rouge2", "rougeL"}."""
    if metric == "bleu":
        return {"bleu": bleu(predictions, references)}
    if metric == "rouge":
        return rouge(predictions, references)
    raise ValueError(f"unknown metric {metric!r}; choose one of {GENERATION_METRICS}")


# ---------------------------------------------------------------------------------- generation
def generate_targets(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    stop: str | Sequence[str] | None = "\n",
) -> list[str]:
    """The greedy continuation of each prompt, as text: cut before the first stop string and at
    EOS, stripped of surrounding whitespace. Prompts are encoded like `prefix_example` encodes
    them for training (no special tokens).

    Never past the model's context: a prompt longer than the context minus min(max_new_tokens,
    context / 2) keeps its last tokens (training cuts prompts from the start too), and each row
    generates at most what still fits. Rows are sorted by length and left-padded in batches,
    which decode exactly as each row would alone."""
    if isinstance(prompts, str):
        raise TypeError("generate_targets takes a list of prompts, got one str; wrap it in a list")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    ctx = context_length(model.config)
    keep = ctx - min(max_new_tokens, ctx // 2)  # longest prompt kept
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {i} ({prompt!r}) gives no tokens; give it some text")
        ids = ids[-keep:]
        rows.append((ids, min(max_new_tokens, ctx - len(ids))))
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = next(
        (
            p
            for p in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None), tokenizer.eos_token_id)
            if p is not None
        ),
        0,
    )
    outputs: list[str] = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        lengths, budgets = [len(ids) for ids, _ in rows], [new for _, new in rows]
        for batch in fit_to_context(length_sorted_batches(lengths, batch_size), lengths, budgets, ctx):
            longest = max(len(rows[i][0]) for i in batch)
            most_new = max(rows[i][1] for i in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for r, i in enumerate(batch):
                ids = rows[i][0]
                input_ids[r, longest - len(ids) :] = torch.tensor(ids)
                mask[r, longest - len(ids) :] = 1
            out = generate(
                model,
                input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=most_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                stop=stops,
                tokenizer=tokenizer if stops else None,
            )
            for r, i in enumerate(batch):
                tokens = out[r, longest : longest + rows[i][1]].tolist()
                cut = next((t for t, token in enumerate(tokens) if token in eos_ids), len(tokens))
                text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                cut_text = min((text.find(s) for s in stops if s in text), default=-1)
                outputs[i] = (text if cut_text < 0 else text[:cut_text]).strip()
    finally:
        model.train(was_training)
    return outputs
