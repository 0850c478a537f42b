"""The translation and summarisation recipes (issue 12, items 5 and 6), shrunk to seconds: `lmforge train
translate-en-es` / `summarize-en` with a tiny model run end to end from the command line, and what they report
is what sacrebleu / rouge-score compute on the files they write; the saved model translates from the CLI and the
pipeline with the same output as the recipe's own test generations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge import pipeline
from lmforge.data import load_translation_pairs
from lmforge.data.bundled import lead_1, load_summaries
from lmforge.training.seq2seq_recipe import load_pairs

TINY = ["--set", "model.d_model=32", "--set", "model.encoder_layers=1", "--set", "model.decoder_layers=1",
        "--set", "model.encoder_ffn_dim=64", "--set", "model.decoder_ffn_dim=64",
        "--set", "model.encoder_attention_heads=2", "--set", "model.decoder_attention_heads=2",
        "--set", "tokenizer.vocab_size=400", "--set", "training.warmup_steps=5", "--set", "training.logging_steps=5",
        "--set", "training.eval_steps=10", "--set", "training.save_steps=10", "--set", "training.learning_rate=3e-3",
        "--set", "training.per_device_train_batch_size=16", "--set", "evaluate.validation_examples=16",
        "--set", "evaluate.test_examples=24", "--set", "evaluate.max_new_tokens=24",
        "--set", "training.generation_max_length=25", "--set", "evaluate.num_beams=[1,2]"]  # fmt: skip


def train(recipe: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", "train", recipe, "--out", str(out), "--max-steps", "20",
                           "--no-sample", *TINY, *extra], capture_output=True, text=True, timeout=600)  # fmt: skip


def generations(out: Path, name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / f"test_generations-{name}.jsonl").read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("translate") / "run"
    done = train("translate-en-es", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_translation_recipe_reports_sacrebleu_on_held_out_books(translation_run: Path) -> None:
    out = translation_run
    results = json.loads((out / "test_results.json").read_text("utf-8"))
    _, test = load_translation_pairs("en", "es")  # the held-out books: Ruth, Jonah, Titus, Philemon, Jude
    for name in ("greedy", "beam2"):
        rows = generations(out, name)
        assert [(r["source"], r["reference"]) for r in rows] == test[:24]
        expected = sacrebleu.corpus_bleu([r["output"] for r in rows], [[r["reference"] for r in rows]]).score
        assert results["scores"][f"{name}_bleu"] == pytest.approx(expected, abs=1e-9)
    assert results["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    config = json.loads((out / "config.json").read_text("utf-8"))
    assert (config["source_lang"], config["target_lang"], config["model_type"]) == ("en", "es", "lmforge-seq2seq")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text("utf-8").splitlines()]
    assert [e["step"] for e in logs if "eval_bleu" in e] == [10, 20]  # validation BLEU during training
    assert any("test_greedy_bleu" in e for e in logs)


def test_translation_recipe_model_serves_cli_and_pipeline(translation_run: Path) -> None:
    first = generations(translation_run, "greedy")[0]
    pipe = pipeline("translation_en_to_es", model=translation_run)
    assert pipe(first["source"], max_new_tokens=24)[0]["translation_text"] == first["output"]
    done = subprocess.run([sys.executable, "-m", "lmforge", "translate", str(translation_run), first["source"],
                           "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines() == [first["output"]]


def test_a_second_run_needs_resume(translation_run: Path) -> None:
    done = train("translate-en-es", translation_run)
    assert done.returncode == 2 and "pass --resume to continue it" in done.stderr


def test_summarization_recipe_reports_rouge_next_to_lead_1(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = train("summarize-en", out, "--set", "lengths.source=64")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "test_results.json").read_text("utf-8"))
    test = load_summaries("test")[:24]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])

    def mean_f(predictions: list[str], references: list[str]) -> dict[str, float]:
        scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
        return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}

    references = [x["summary"] for x in test]
    lead = mean_f([lead_1(x["document"]) for x in test], references)
    rows = generations(out, "greedy")
    assert [r["source"] for r in rows] == [x["document"] for x in test]
    model = mean_f([r["output"] for r in rows], references)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert results["scores"][f"lead1_{k}"] == pytest.approx(lead[k], abs=1e-9)
        assert results["scores"][f"greedy_{k}"] == pytest.approx(model[k], abs=1e-9)
    assert "lead-1 baseline: rouge1" in done.stdout


def test_pairs_from_a_file_and_bad_data(tmp_path: Path) -> None:
    rows = [{"source": f"text {i}", "target": f"texto {i}"} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = load_pairs(str(path), seed=0, validation_size=5)
    assert (len(pairs["train"]), len(pairs["validation"]), len(pairs["test"])) == (20, 5, 5)
    assert sorted(pairs["train"] + pairs["validation"] + pairs["test"]) == sorted(
        (r["source"], r["target"]) for r in rows
    )
    with pytest.raises(ValueError, match="has 30 pairs; the recipe holds out evaluate.validation_examples=20"):
        load_pairs(str(path), seed=0, validation_size=20)
    with pytest.raises(FileNotFoundError, match="not one of the bundled pair sets bible-en-es"):
        load_pairs("no-such-pairs", seed=0, validation_size=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"en": "a", "es": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match="no input/output fields; give each record one of the field pairs input/output"
    ):
        load_pairs(str(bad), seed=0, validation_size=0)
