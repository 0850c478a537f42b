"""Encoder-decoder recipes: translation and summarisation trained from scratch, evaluated by generation.

    lmforge train translate-en-es       # the original Transformer, English -> Spanish Bible verses, sacreBLEU
    lmforge train summarize-en          # Debian package description -> its one-line synopsis, ROUGE

A recipe with `model.type: seq2seq` (see `lmforge/configs/translate-en-es.yaml`) runs:
pairs (bundled or a file) -> a joint byte-level BPE over both sides -> the original Transformer
(`Seq2SeqForConditionalGeneration`) -> the Trainer with label smoothing, length-grouped batches and a
validation score computed by greedy generation every `eval_steps` -> the test split translated or
summarised greedily and with beam search, scored with sacreBLEU (signature printed) or ROUGE
(rouge-score conventions) next to the task's baseline, written to `OUT/test_results.json` and
`OUT/test_generations-<decoding>.jsonl`.

Sections of a seq2seq recipe, besides the common ones: `task` (translation | summarization), `data`
(`bible-en-es`, `bible-es-en`, `debian-summaries-en`, `debian-summaries-zh`, or a jsonl/csv/tsv file of
source/target pairs), `lengths` (`source`, `target`: token limits; longer examples are cut), and
`evaluate` (`num_beams`: the decodings of the final test, `batch_size`, `max_new_tokens`,
`validation_examples`: how many held-out pairs the periodic validation score generates for, `test_examples`:
the first N test pairs only, for quick trials; default all).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from lmforge.data import DEFAULT_TEST_BOOKS, load_translation_pairs
from lmforge.data.bundled import lead_1, load_summaries
from lmforge.files import atomic_write_text
from lmforge.models.seq2seq import Seq2SeqConfig, Seq2SeqForConditionalGeneration
from lmforge.pipelines.text2text import SummarizationPipeline, TranslationPipeline
from lmforge.tokenizer import Tokenizer
from lmforge.training.finetune import read_pairs
from lmforge.training.textgen import bleu, rouge

TASKS = ("translation", "summarization")
#: bundled pair sets: name -> (task, source language, target language)
BUNDLED = {
    "bible-en-es": ("translation", "en", "es"),
    "bible-es-en": ("translation", "es", "en"),
    "debian-summaries-en": ("summarization", "en", "en"),
    "debian-summaries-zh": ("summarization", "zh", "zh"),
}
RESULTS_FILE = "test_results.json"


def load_pairs(data: str, seed: int, validation_size: int) -> dict[str, Any]:
    """{"task", "source_lang", "target_lang", "train", "validation", "test"}: lists of (source, target).

    Bible pairs: the held-out books are the test set (`DEFAULT_TEST_BOOKS`), `validation_size` verses of
    the training books (seeded) are held out for validation. Debian summaries: the fixed by-package split,
    validation cut to a seeded `validation_size` of its pairs.
    A file: jsonl/csv/tsv rows with source/target (or input/output, document/summary) fields, `validation_size`
    rows each held out (seeded) for validation and test."""
    if data in BUNDLED:
        task, src, tgt = BUNDLED[data]
        if task == "translation":
            train, test = load_translation_pairs(src, tgt, DEFAULT_TEST_BOOKS)
            train, validation = _hold_out(train, validation_size, seed)
        else:
            rows = {s: load_summaries(s, language=src) for s in ("train", "validation", "test")}
            train, validation, test = ([(r["document"], r["summary"]) for r in rows[s]] for s in rows)
            validation = _hold_out(validation, validation_size, seed)[1]  # a seeded subset of the split
        return {"task": task, "source_lang": src, "target_lang": tgt,
                "train": train, "validation": validation, "test": test}  # fmt: skip
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data {data!r}: not a file, and not one of the bundled pair sets {', '.join(BUNDLED)}")
    pairs = read_pairs(path)
    if len(pairs) < 2 * validation_size + 1:
        raise ValueError(
            f"{path} has {len(pairs)} pairs; the recipe holds out evaluate.validation_examples={validation_size} "
            "for validation and as many for test: give more pairs or lower it"
        )
    rest, test = _hold_out(pairs, validation_size, seed)
    train, validation = _hold_out(rest, validation_size, seed + 1)
    return {"task": None, "source_lang": None, "target_lang": None,
            "train": train, "validation": validation, "test": test}  # fmt: skip


def _hold_out(pairs: list[tuple[str, str]], n: int, seed: int) -> tuple[list, list]:
    """(the rest, n pairs drawn with `seed`), both in the original order."""
    chosen = set(random.Random(seed).sample(range(len(pairs)), min(n, len(pairs) // 2)))
    return [p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen]


def encode_pairs(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_source: int, max_target: int
) -> list[dict[str, list[int]]]:
    """(source, target) texts -> {"input_ids", "labels"}, each ending in </s>, cut to the limits (</s> kept)."""
    eos = tokenizer.eos_token_id
    sources = tokenizer.encode_batch_fast([s for s, _ in pairs])
    targets = tokenizer.encode_batch_fast([t for _, t in pairs])
    return [
        {"input_ids": s[: max_source - 1] + [eos], "labels": t[: max_target - 1] + [eos]}
        for s, t in zip(sources, targets)
    ]


def setup(recipe: dict[str, Any], model_opts: dict[str, Any], out: Path, args: Any, resume: bool) -> dict[str, Any]:
    """What `pretrain` needs to run a seq2seq recipe: tokenizer, model, datasets, metrics, report."""
    data = recipe.get("data") or "bible-en-es"
    if isinstance(data, list) and len(data) == 1:  # --data PATH
        data = data[0]
    if not isinstance(data, str):
        raise ValueError(f"a seq2seq recipe's data is one pair set (a bundled name or a file), got {data!r}")
    evaluate = dict(recipe.get("evaluate") or {})
    validation_size = int(evaluate.get("validation_examples", 200))
    pairs = load_pairs(data, args.seed, validation_size)
    task = recipe.get("task") or pairs["task"]
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (the recipe's `task:`), got {task!r}")
    lengths = dict(recipe.get("lengths") or {})
    max_source, max_target = int(lengths.get("source", 256)), int(lengths.get("target", 256))

    tok_opts = dict(recipe.get("tokenizer") or {})
    if (out / "tokenizer.json").is_file() and resume:
        tokenizer = Tokenizer.from_pretrained(out)
    else:
        vocab = int(tok_opts.get("vocab_size", 8000))
        print(
            f"lmforge: training a joint byte-level BPE (vocab {vocab}) on both sides of {len(pairs['train']):,} pairs"
        )
        tokenizer = Tokenizer.train_translation_bpe(
            pairs["train"], vocab_size=vocab, min_frequency=int(tok_opts.get("min_frequency", 2))
        )
    positions = max(max_source, max_target, int(evaluate.get("max_new_tokens", max_target)) + 1)
    extra = {"source_lang": pairs["source_lang"], "target_lang": pairs["target_lang"]} if task == "translation" else {}
    config = Seq2SeqConfig(
        **{
            "max_position_embeddings": positions,
            **model_opts,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id,
            "extra": {k: v for k, v in extra.items() if v},
        }
    )
    tokenizer.model_max_length = config.max_position_embeddings
    model = Seq2SeqForConditionalGeneration(config)
    train = encode_pairs(tokenizer, pairs["train"], max_source, max_target)
    validation = encode_pairs(tokenizer, pairs["validation"], max_source, max_target)
    validation_refs = [t for _, t in pairs["validation"]]

    def compute_metrics(pred: Any) -> dict[str, float]:
        """Validation score of the generated ids (greedy, or generation_num_beams) against the references."""
        hypotheses = [t.strip() for t in tokenizer.batch_decode(pred.predictions, skip_special_tokens=True)]
        return score(task, hypotheses, validation_refs[: len(hypotheses)], pairs["target_lang"])

    def report(metrics: dict[str, Any], trainer: Any) -> dict[str, Any]:
        results = test_set_results(model, tokenizer, task, pairs, evaluate, out)
        for name, value in results["scores"].items():
            trainer.log({f"test_{name}": value})
        return {"test": results["scores"]}

    def sample(opts: dict[str, Any]) -> None:
        texts = opts.get("text") or [pairs["test"][0][0]]
        pipe = _pipeline(task, model, tokenizer, batch_size=8)
        for text in [texts] if isinstance(texts, str) else texts:
            print(f"lmforge: {text}\n    -> {pipe(text, num_beams=int(opts.get('num_beams', 4)))[0][pipe.result_key]}")

    sizes = " / ".join(f"{len(pairs[s]):,}" for s in ("train", "validation", "test"))
    about = f"{task} from {data}: {sizes} train / validation / test pairs; vocab {len(tokenizer):,}"
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": train,
        "eval": validation,
        "compute_metrics": compute_metrics,
        "report": report,
        "sample": sample,
        "about": about,
    }


def score(task: str, hypotheses: list[str], references: list[str], language: str | None = None) -> dict[str, float]:
    """{"bleu"} (sacreBLEU, 13a, on detokenised text) for translation, {"rouge1", "rouge2", "rougeL"} otherwise
    (rouge-score's tokens; for Chinese, `language="zh"`, each character is a token)."""
    if task == "translation":
        return {"bleu": bleu(hypotheses, references)}
    return rouge(hypotheses, references, cjk_chars=language == "zh")


def sacrebleu_signature(hypotheses: list[str], references: list[str]) -> str:
    """sacreBLEU's signature of the score `bleu` computes (nrefs, case, tokeniser, smoothing, version)."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    metric.corpus_score(hypotheses, [references])
    return str(metric.get_signature())


def _pipeline(task: str, model: Any, tokenizer: Tokenizer, batch_size: int) -> Any:
    cls = TranslationPipeline if task == "translation" else SummarizationPipeline
    return cls(model, tokenizer, batch_size=batch_size)


def test_set_results(
    model: Any, tokenizer: Tokenizer, task: str, pairs: dict[str, Any], evaluate: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Generate for the whole test split with each decoding of `evaluate.num_beams` (default greedy and
    beam 4), score it, write test_generations-*.jsonl and test_results.json, print a summary."""
    model.eval()
    pipe = _pipeline(task, model, tokenizer, batch_size=int(evaluate.get("batch_size", 32)))
    test = pairs["test"][: evaluate.get("test_examples") or None]  # all unless a shrunk run asks for fewer
    sources = [s for s, _ in test]
    references = [t for _, t in test]
    beams = evaluate.get("num_beams", [1, 4])
    results: dict[str, Any] = {"task": task, "test_pairs": len(sources), "scores": {}, "seconds": {}}
    if task != "translation":
        lead = score(task, [lead_1(s) for s in sources], references, pairs["target_lang"])
        results["scores"].update({f"lead1_{k}": v for k, v in lead.items()})
    for n in [beams] if isinstance(beams, int) else beams:
        name = "greedy" if n == 1 else f"beam{n}"
        start = time.perf_counter()
        outputs = pipe(sources, num_beams=int(n), max_new_tokens=int(evaluate.get("max_new_tokens", 256)),
                       truncation=True)  # fmt: skip
        results["seconds"][name] = round(time.perf_counter() - start, 1)
        hypotheses = [o[0][pipe.result_key] for o in outputs]
        scores = score(task, hypotheses, references, pairs["target_lang"])
        if task == "translation":
            results["sacrebleu_signature"] = sacrebleu_signature(hypotheses, references)
        results["scores"].update({f"{name}_{k}": v for k, v in scores.items()})
        lines = [
            json.dumps({"source": s, "reference": r, "output": h}, ensure_ascii=False)
            for s, r, h in zip(sources, references, hypotheses)
        ]
        atomic_write_text(out / f"test_generations-{name}.jsonl", "\n".join(lines) + "\n")
        shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
        print(f"lmforge: test {name}: {shown} ({len(sources)} pairs, {results['seconds'][name]} s)")
    if task == "translation":
        print(f"lmforge: sacreBLEU signature {results['sacrebleu_signature']}")
    else:
        print("lmforge: lead-1 baseline: " + ", ".join(f"{k} {lead[k]:.2f}" for k in lead))
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
