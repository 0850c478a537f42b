"""Text-to-text tasks the GPT way: the bundled translation pairs split by whole books, BLEU (checked
against sacrebleu), ROUGE (checked against rouge-score), batched greedy generation of targets, and
`finetune("causal-lm", metric=...)` end to end on a tiny GPT saved in the test."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import sacrebleu  # test-only oracle (test extra)
import torch
from helpers import GREEDY_MARGIN, greedy_margin, save_tiny_gpt
from rouge_score import rouge_scorer  # test-only oracle (test extra)

from lmforge import GPTForCausalLM, Tokenizer
from lmforge.data import (
    DEFAULT_TEST_BOOKS,
    bible_books,
    bible_corpus_file,
    bible_training_documents,
    load_translation_pairs,
    read_documents,
)
from lmforge.generation import generate
from lmforge.training.finetune import finetune, read_pairs
from lmforge.training.textgen import bleu, generate_targets, rouge, rouge_scores, rouge_tokenize, score_generations

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("the cat sat on the mat.", "el gato se sentó en la alfombra."),
    ("a dog ran in the park.", "un perro corrió en el parque."),
    ("the bird sang a song.", "el pájaro cantó una canción."),
    ("the sun is warm today.", "el sol está cálido hoy."),
    ("we walk to the river.", "caminamos al río."),
    ("the king rode a horse.", "el rey montó un caballo."),
]
QUICK = {"num_train_epochs": 1, "disable_tqdm": True, "peak_flops": 1e12, "device": "cpu", "report_to": "jsonl"}


@pytest.fixture(scope="module")
def bible() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    return load_translation_pairs()


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT and a byte-level BPE trained on the test pairs, saved in Hugging Face's layout."""
    texts = [t for pair in PAIRS for t in pair] * 3
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt"), texts)


# ------------------------------------------------------------------------------ data
def test_translation_pairs_hold_out_whole_books(bible: tuple[list, list]) -> None:
    import lzma

    from lmforge.data.bundled import CORPORA_DIR

    train, test = bible
    rows = [
        line.split("\t")
        for line in lzma.decompress((CORPORA_DIR / "en_es_bible_pairs.tsv.xz").read_bytes()).decode().splitlines()[1:]
    ]
    held = [(en, es) for ref, en, es in rows if ref.split(".")[0] in DEFAULT_TEST_BOOKS]
    kept = [(en, es) for ref, en, es in rows if ref.split(".")[0] not in DEFAULT_TEST_BOOKS]
    assert test == held and train == kept  # every verse of a test book in test, none in train
    assert len(train) + len(test) == 30_908 and len(test) == 228
    assert {ref.split(".")[0] for ref, *_ in rows} >= set(DEFAULT_TEST_BOOKS)
    assert not set(train) & set(test)
    assert test[0][0].startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1

    es_en_train, es_en_test = load_translation_pairs("es", "en", test_books=["Jonah"])
    assert len(es_en_test) == 47 and es_en_test[0] == tuple(reversed(held[85]))  # Jonah 1:1, Spanish first
    assert len(es_en_train) == 30_908 - 47


def test_translation_pairs_name_known_books_on_errors() -> None:
    books = bible_books()
    assert books[0] == "Gen" and books[-1] == "Rev" and len(books) == 66 and "Phlm" in books
    with pytest.raises(ValueError, match="unknown book.*'Philemon'.*Gen, Exod"):
        load_translation_pairs(test_books=["Ruth", "Philemon"])
    with pytest.raises(ValueError, match="source language 'fr'"):
        load_translation_pairs("fr", "es")
    with pytest.raises(ValueError, match="both 'en'"):
        load_translation_pairs("en", "en")


def test_pretraining_text_leaves_out_the_test_books(tmp_path: Path, bible: tuple[list, list]) -> None:
    train, test = bible
    docs = list(bible_training_documents())
    assert len(docs) == 2 * 1175  # English and Spanish of every chapter outside the 5 test books
    assert docs[0].splitlines()[0] == "In the beginning God created the heaven and the earth."
    assert docs[1].splitlines()[0] == "EN el principio crió Dios los cielos y la tierra."
    lines = {line for doc in docs for line in doc.splitlines()}
    assert not any(en in lines or es in lines for en, es in test)
    assert sum(len(doc.splitlines()) for doc in docs) == 2 * len(train)
    path = bible_corpus_file(tmp_path)
    assert path.name.startswith("bible-en-es-train-") and read_documents(str(path)) == docs
    mtime = path.stat().st_mtime_ns
    assert bible_corpus_file(tmp_path) == path and path.stat().st_mtime_ns == mtime  # written once


def test_recipe_is_bundled() -> None:
    from lmforge.training.pretrain import load_recipe

    recipe = load_recipe("bible-en-es")
    assert recipe["data"] == ["bible-en-es-train"] and recipe["out"] == "runs/bible-en-es"
    assert recipe["training"]["max_steps"] > 0 and recipe["model"]["n_positions"] >= 128


# ------------------------------------------------------------------------------ metrics
def test_bleu_is_sacrebleu() -> None:
    hyps = ["the cat is on the mat", "there is a dog in the park today", "hello world"]
    refs = ["the cat sat on the mat", "a dog runs in the park today", "hello there world"]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    alt = ["a cat is on the mat", "there is a dog in a park today", "hello world"]
    two = bleu(hyps, [[r, a] for r, a in zip(refs, alt)])
    assert two == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs, alt]).score, abs=1e-9) and two > bleu(hyps, refs)
    assert bleu(refs, refs) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        bleu(hyps[:2], refs)


def test_bleu_without_sacrebleu_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match="pip install sacrebleu"):
        bleu(["a b"], ["a b"])


def test_rouge_is_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [
        ("The cat sat on the mat.", "the cat was sitting on the mat"),
        ("A quick brown fox jumps over the lazy dog", "the quick brown dog jumps on the log."),
        ("police killed the gunman", "the gunman was shot down by police"),
        ("Completely different words here", "nothing in common"),
        ("", "an empty prediction"),
        ("The 3 kings, 2 queens & 1 jack!", "three kings; 2 queens and 1 Jack"),
        ("el niño comió pan", "El niño comía pan."),  # non-ASCII letters split tokens, as in rouge-score
        ("a a a b b", "a b a b a b"),
        ("to be or not to be", "to be, or not to be: that is the question"),
    ]
    for pred, ref in pairs:
        expected = scorer.score(ref, pred)
        mine = rouge_scores(pred, ref)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert mine[key] == pytest.approx(expected[key].fmeasure, abs=1e-6), (pred, ref, key)
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    mean = rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in pairs) / len(pairs)
        assert mean[key] == pytest.approx(want, abs=1e-6)
    assert rouge_tokenize("El niño, 2 Kings!") == ["el", "ni", "o", "2", "kings"]
    assert score_generations("rouge", ["a b"], ["a b"]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        score_generations("meteor", ["a"], ["a"])


class CharTokenizer:
    """rouge-score's tokenizer interface, counting each CJK ideograph (and each ASCII word) as a token."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]", text.lower())


def test_chinese_rouge_counts_characters_as_rouge_score_with_a_character_tokenizer() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTokenizer())
    pairs = [
        ("用于处理图像的命令行工具", "图像处理命令行工具"),
        ("GNU 文本编辑器（文档）", "可扩展的 GNU 文本编辑器"),
        ("Python 3 的 XML 解析库", "用于 python3 的 XML 库"),
        ("完全不同", "毫无关系"),
    ]
    for pred, ref in pairs:
        expected = scorer.score(ref, pred)
        mine = rouge_scores(pred, ref, cjk_chars=True)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert mine[key] == pytest.approx(expected[key].fmeasure, abs=1e-6), (pred, ref, key)
    assert rouge_tokenize("GNU 文本编辑器", cjk_chars=True) == ["gnu", "文", "本", "编", "辑", "器"]
    assert rouge(["图像工具"], ["图像处理工具"])["rouge1"] == 0.0  # the default tokeniser drops Chinese entirely
    assert rouge(["图像工具"], ["图像处理工具"], cjk_chars=True)["rouge1"] == pytest.approx(100 * 2 * 4 / 10)


# ------------------------------------------------------------------------------ generation
def test_generate_targets_matches_greedy_generate_and_stops(tiny_gpt: Path) -> None:
    model = GPTForCausalLM.from_pretrained(tiny_gpt).eval()
    tok = Tokenizer.from_pretrained(tiny_gpt)
    prompts = ["translate: the cat sat on the mat. =>", "translate: we walk =>", "el rey", "a dog ran in the park."]

    def alone(prompt: str, stop: list[str]) -> str:
        ids = torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, max_new_tokens=12, stop=stop, tokenizer=tok)[0, ids.size(1) :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        text = tok.decode(out, skip_special_tokens=True)
        return min((text[: text.find(s)] for s in stop if s in text), default=text, key=len).strip()

    # batches pad the prompts (float sums in another order than alone): the same texts because no greedy step is a
    # near tie (checked here, see helpers.GREEDY_MARGIN)
    rows = [
        generate(model, torch.tensor([tok.encode(p)]), max_new_tokens=12, eos_token_id=None)[0].tolist()
        for p in prompts
    ]
    assert greedy_margin(model, rows, [len(tok.encode(p)) for p in prompts]) > GREEDY_MARGIN
    for stop in ([], ["."], ["e", " "]):
        batched = generate_targets(model, tok, prompts, max_new_tokens=12, batch_size=3, stop=stop)
        assert batched == [alone(p, stop) for p in prompts], stop
        assert all(s not in text for s in stop for text in batched)
    free = generate_targets(model, tok, prompts, max_new_tokens=12, stop=None)
    assert any(" " in text for text in free)  # the stop string really cut something above
    assert generate_targets(model, tok, prompts, max_new_tokens=12, batch_size=1, stop=None) == free


def test_generate_targets_never_runs_past_the_context(tiny_gpt: Path) -> None:
    model = GPTForCausalLM.from_pretrained(tiny_gpt).eval()
    tok = Tokenizer.from_pretrained(tiny_gpt)
    long_prompt = " ".join(src for src, _ in PAIRS) * 3  # more tokens than the context of 64
    assert len(tok.encode(long_prompt)) > 64
    lengths: list[int] = []  # prompt + new tokens of every batch: the KV cache generate() allocates
    allocate = model.allocate_cache
    model.allocate_cache = lambda batch, length: lengths.append(length) or allocate(batch, length)  # type: ignore
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generate() warns when asked to run past the context
        texts = generate_targets(
            model, tok, [long_prompt, "the cat", long_prompt[:90]], max_new_tokens=200, batch_size=8, stop=None
        )
    assert len(texts) == 3 and lengths and max(lengths) <= 64
    assert len(lengths) >= 2  # the long prompt's batch is split from the short ones that may fill the context


# ------------------------------------------------------------------------------ finetune end to end
def test_finetune_translation_reports_bleu(tiny_gpt: Path, tmp_path: Path) -> None:
    rows = [{"source": s, "target": t} for s, t in PAIRS] * 3
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    report = finetune(
        "causal-lm",
        tiny_gpt,
        tmp_path / "pairs.jsonl",
        out=tmp_path / "mt",
        prefix="translate English to Spanish: ",
        separator=" => ",
        eval_fraction=0.25,
        metric="bleu",
        max_eval_generate=3,
        training=QUICK,
    )
    assert report["metric"] == "bleu" and report["eval_generated"] == 3 and math.isfinite(report["eval_perplexity"])
    saved = json.loads((tmp_path / "mt" / "eval_results.json").read_text(encoding="utf-8"))
    assert saved["eval_bleu"] == report["eval_bleu"]
    generated = [
        json.loads(line)
        for line in (tmp_path / "mt" / "eval_generations.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(generated) == 3 and all(set(g) == {"input", "reference", "prediction"} for g in generated)
    assert all((g["input"], g["reference"]) in PAIRS for g in generated)
    # the reported BLEU is sacrebleu's corpus BLEU of the texts written out
    expected = sacrebleu.corpus_bleu([g["prediction"] for g in generated], [[g["reference"] for g in generated]])
    assert report["eval_bleu"] == pytest.approx(expected.score, abs=1e-9)


def test_finetune_summaries_report_rouge(tiny_gpt: Path, tmp_path: Path) -> None:
    docs = [{"document": f"{s} {t} {s}", "summary": s} for s, t in PAIRS] * 2
    path = tmp_path / "summaries.jsonl"
    path.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    assert read_pairs(path)[0] == (docs[0]["document"], docs[0]["summary"])
    report = finetune(
        "causal-lm",
        tiny_gpt,
        path,
        out=tmp_path / "sum",
        prefix="summarize: ",
        eval_fraction=0.25,
        metric="rouge",
        training=QUICK,
    )
    assert report["eval_generated"] == report["eval_examples"] == 3
    # the reported ROUGE is rouge-score's mean F-measure (x 100) of the texts written out
    generated = [
        json.loads(line)
        for line in (tmp_path / "sum" / "eval_generations.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(g["reference"], g["prediction"]) for g in generated]
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(s[key].fmeasure for s in scores) / len(scores)
        assert report[f"eval_{key}"] == pytest.approx(expected, abs=1e-9)
    assert "eval_bleu" not in report


def test_finetune_on_the_bundled_pairs_evaluates_on_held_out_books(
    tiny_gpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge.training.finetune as finetune_module  # it calls generate_targets by the name it imported

    calls: list[list[str]] = []
    monkeypatch.setattr(
        finetune_module,
        "generate_targets",
        lambda model, tok, prompts, **kw: calls.append(prompts) or ["Y" for _ in prompts],
    )
    report = finetune(
        "causal-lm",
        tiny_gpt,
        "bible-en-es",
        out=tmp_path / "bible",
        prefix="en-es: ",
        max_train_examples=8,
        max_length=32,
        metric="bleu",
        max_eval_generate=5,
        training={**QUICK, "eval_strategy": "no", "save_strategy": "no"},
    )
    assert report["train_examples"] == 8 and report["eval_examples"] == 228
    assert report["held_out_books"] == list(DEFAULT_TEST_BOOKS) and report["eval_generated"] == 5
    assert len(calls[0]) == 5 and calls[0][0].startswith("en-es: Now it came to pass in the days")  # Ruth 1:1
    assert calls[0][-1].startswith("en-es: ") and math.isfinite(report["eval_bleu"])


def test_finetune_metric_errors(tiny_gpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown metric 'bleurt'"):
        finetune("causal-lm", tiny_gpt, "bible-en-es", out=tmp_path / "x", metric="bleurt")
    with pytest.raises(ValueError, match="needs task 'causal-lm'"):
        finetune("classification", tiny_gpt, "sentiment", out=tmp_path / "x", metric="bleu")
    with pytest.raises(ValueError, match="max_eval_generate must be a positive integer"):
        finetune("causal-lm", tiny_gpt, "bible-en-es", out=tmp_path / "x", metric="rouge", max_eval_generate=0)


def test_pretraining_corpus_name_and_cli_flags() -> None:
    """`bible-en-es-train` is a corpus name for `lmforge pretrain` (the bible-en-es recipe): both
    languages of the training books, none of the held-out books; `lmforge finetune` has --metric."""
    import subprocess
    import sys

    from lmforge.data import iter_documents, resolve_sources
    from lmforge.training.pretrain import load_recipe

    assert load_recipe("bible-en-es")["data"] == ["bible-en-es-train"]
    (source,) = resolve_sources(["bible-en-es-train"])
    text = source.path.read_text(encoding="utf-8")
    assert "In the beginning God created" in text and "EN el principio crió Dios" in text
    _, test_pairs = load_translation_pairs()
    assert all(src not in text for src, _ in test_pairs[:20])
    assert sum(1 for _ in iter_documents(["bible-en-es-train"])) > 1000  # one document per chapter and language
    helptext = subprocess.run(
        [sys.executable, "-m", "lmforge", "finetune", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--metric" in helptext and "bible-en-es" in helptext
