"""The bundled Debian summarisation pairs (lmforge.data.load_summaries) and the lead-1 baseline."""

from __future__ import annotations

import statistics

import pytest
from rouge_score import rouge_scorer  # test-only oracle (test extra)

from lmforge.data import lead_1, load_summaries, summary_split
from lmforge.training.textgen import rouge

SIZES = {
    "en": {"train": 45_016, "validation": 2_384, "test": 2_405},
    "zh": {"train": 765, "validation": 34, "test": 35},
}
# lead-1 on the English test split, measured once with rouge-score (0-100 F-measures)
LEAD_1_ROUGE = {"rouge1": 30.03, "rouge2": 14.51, "rougeL": 26.65}


@pytest.fixture(scope="module")
def splits() -> dict[tuple[str, str], list[dict[str, str]]]:
    return {(lang, split): load_summaries(split, lang) for lang in SIZES for split in SIZES[lang]}


def test_split_sizes_and_fields(splits) -> None:
    for (lang, split), examples in splits.items():
        assert len(examples) == SIZES[lang][split], (lang, split)
        for ex in examples:
            assert set(ex) == {"document", "summary", "source"}
            assert ex["document"].strip() and ex["summary"].strip()
            assert "\n" not in ex["summary"]


def test_no_package_in_two_splits_and_no_repeated_document(splits) -> None:
    for lang in SIZES:
        sources = {split: {ex["source"] for ex in splits[lang, split]} for split in SIZES[lang]}
        assert not sources["train"] & sources["validation"]
        assert not sources["train"] & sources["test"]
        assert not sources["validation"] & sources["test"]
        for split, names in sources.items():
            assert all(summary_split(name) == split for name in names)
        documents = [ex["document"].lower() for split in SIZES[lang] for ex in splits[lang, split]]
        assert len(set(documents)) == len(documents)


def test_deterministic_and_seeded_subsets(splits) -> None:
    assert load_summaries("validation") == splits["en", "validation"]
    a = load_summaries("train", "zh", max_examples=50, seed=3)
    assert a == load_summaries("train", "zh", max_examples=50, seed=3)
    assert a != load_summaries("train", "zh", max_examples=50, seed=4)
    assert len(a) == 50 and all(ex in splits["zh", "train"] for ex in a)
    # the split rule is a fixed hash of the name (sha256), not of the file order or of the process (PYTHONHASHSEED)
    names = ("bash-completion", "flatzebra", "r-cran-triebeard")
    assert [summary_split(name) for name in names] == ["train", "test", "validation"]


def test_chinese_pairs_are_chinese(splits) -> None:
    for ex in splits["zh", "test"]:
        assert any("\u4e00" <= ch <= "\u9fff" for ch in ex["document"] + ex["summary"])


def test_lead_1_on_hand_written_documents() -> None:
    assert lead_1("Fast tunnel daemon. It is small.  Very small!") == "Fast tunnel daemon."
    assert lead_1("Is it fast? Yes.") == "Is it fast?"
    assert lead_1('He said "go." Then left.') == 'He said "go."'
    # "." only ends a sentence before whitespace: versions, domains and file names stay whole
    assert (
        lead_1("Version 1.2 of example.org ships foo.py here. More.") == "Version 1.2 of example.org ships foo.py here."
    )
    # a paragraph end is a sentence end; no end at all gives the whole (stripped) document
    assert lead_1("A library for parsing\nIt is written in C.") == "A library for parsing"
    assert lead_1("  no full stop here ") == "no full stop here"
    # Chinese full-width ends need no space after them; closing brackets/quotes stay with the sentence
    assert lead_1("本软件包扩展了 bash 的补全。这个项目设想为命令生成补全！") == "本软件包扩展了 bash 的补全。"
    assert lead_1("真的吗？是的。") == "真的吗？"
    assert lead_1("他说“好。”然后走了。") == "他说“好。”"
    assert lead_1("（一个测试！）后面") == "（一个测试！）"


def test_lead_1_rouge_on_the_test_split(splits) -> None:
    test = splits["en", "test"]
    predictions = [lead_1(ex["document"]) for ex in test]
    references = [ex["summary"] for ex in test]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    measured = {k: 100 * statistics.fmean(s[k].fmeasure for s in scores) for k in LEAD_1_ROUGE}
    # a small tolerance: the figures are rounded to two decimals
    assert measured == pytest.approx(LEAD_1_ROUGE, abs=0.01)
    # lmforge's rouge is the same computation; only float summation order differs
    assert rouge(predictions, references) == pytest.approx(measured, abs=1e-9)


def test_bad_split_or_language_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="split 'dev'.*train, validation, test"):
        load_summaries("dev")
    with pytest.raises(ValueError, match="language 'de'.*en, zh"):
        load_summaries("train", "de")
