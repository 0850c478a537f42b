"""Tests for lmforge.data: bundled corpora, reading and validation, preparation, block datasets."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import (
    BUNDLED,
    CorpusError,
    CorpusMeta,
    RandomBlockDataset,
    SequentialBlockDataset,
    bundled_path,
    choose_token_dtype,
    iter_documents,
    prepare_corpus,
    read_documents,
    resolve_sources,
)
from lmforge.data import prepare as prepare_module
from lmforge.data.hashing import counter_uniform
from lmforge.tokenizer import Tokenizer

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.\nA second line of the same document.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "Numbers 12345 and symbols #@! also appear; tabs\tand  double  spaces too.",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
] * 8


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small real byte-level BPE tokenizer trained on the in-test corpus."""
    return Tokenizer.train_bpe(iterator=TINY_CORPUS, vocab_size=400)


class CountingTokenizer:
    """Wraps a tokenizer, counts encode calls and can pretend to have a larger vocabulary."""

    def __init__(self, inner: Tokenizer, fake_len: int | None = None) -> None:
        self.inner, self.fake_len, self.encode_calls = inner, fake_len, 0

    def encode_batch_fast(self, texts: list[str]) -> list[list[int]]:
        self.encode_calls += 1
        return self.inner.encode_batch_fast(texts)

    @property
    def eos_token_id(self) -> int:
        return self.inner.eos_token_id

    def __len__(self) -> int:
        return self.fake_len or len(self.inner)

    def save_pretrained(self, directory: str) -> list[str]:
        return self.inner.save_pretrained(directory)


def write_docs_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def make_docs(n: int) -> list[str]:
    return [f"Document number {i}.\nIt has a second line about item {i * 7 % 13}." for i in range(n)]


def expected_split_ids(tok: Tokenizer, docs: list[str], seed: int, val_fraction: float) -> dict[str, list[int]]:
    """Ids each split must hold under the hashed document split: each doc's ids then EOS."""
    ids = tok.encode_batch_fast(docs)
    out: dict[str, list[int]] = {"train": [], "val": []}
    for i, doc_ids in enumerate(ids):
        split = "val" if counter_uniform(seed, i) < val_fraction else "train"
        out[split] += doc_ids + [tok.eos_token_id]
    return out


def read_split(meta: CorpusMeta, split: str) -> list[int]:
    return np.fromfile(meta.path(split), dtype=meta.dtype).tolist()


# ---------------------------------------------------------------- bundled corpora


def test_bundled_corpora_exist_and_hold_their_texts() -> None:
    assert set(BUNDLED) == {"shakespeare", "zh_poems", "sanguo"}
    corpora = Path(bundled_path("shakespeare")).parent
    assert (corpora / "NOTICE.md").is_file()
    notice = (corpora / "NOTICE.md").read_text(encoding="utf-8")
    assert "Open Knowledge Foundation" in notice and "CC-BY-2.5" in notice and "fortunes-zh" in notice
    for corpus in BUNDLED.values():
        assert corpus.path.suffix == ".xz"
        assert lzma.decompress(corpus.path.read_bytes()).decode("utf-8")  # valid xz + UTF-8

    shakespeare = read_documents("shakespeare")
    assert len(shakespeare) == 1  # one document: blank lines there are layout, not boundaries
    assert "ROMEO" in shakespeare[0] and "HAMLET" in shakespeare[0]
    assert len(shakespeare[0]) > 5_000_000

    poems = read_documents("zh_poems")
    assert len(poems) > 400
    assert any("床前明月光" in p for p in poems)
    assert not any(p.startswith("\n") or p.endswith("\n") or "\n\n" in p for p in poems)

    sanguo = read_documents("sanguo")
    assert len(sanguo) == 120  # chapters
    assert sanguo[0].startswith("第一回")
    assert any("刘备" in c for c in sanguo) and any("曹操" in c for c in sanguo)


def test_bundled_names_accept_file_stems() -> None:
    assert bundled_path("en_shakespeare") == bundled_path("shakespeare")
    assert bundled_path("zh_sanguo") == bundled_path("sanguo") == bundled_path("zh_sanguo.txt")
    assert read_documents(["zh_poems"]) == read_documents("zh_poems")
    with pytest.raises(CorpusError, match="not a bundled corpus.*shakespeare, zh_poems, sanguo"):
        bundled_path("hamlet")


# ---------------------------------------------------------------- reading documents


def test_txt_documents_split_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n\nfirst line\nsecond line\n\n  \n\t\nthird\n  indented\n\n\nlast", encoding="utf-8")
    assert read_documents(path) == ["first line\nsecond line", "third\n  indented", "last"]


def test_txt_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode("utf-8"))
    assert read_documents(path) == ["one\r\ntwo", "three"]


def test_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "alpha\n\nwith blank line", "id": 1}, {"text": "beta"}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_documents(path) == ["alpha\n\nwith blank line", "beta"]  # empty texts skipped


def test_compressed_files_read_like_plain(tmp_path: Path) -> None:
    text = "uno\ndos\n\ntres 三\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "p.txt.xz").write_bytes(lzma.compress(text.encode()))
    jsonl = '{"text": "uno"}\n{"text": "tres 三"}\n'
    (tmp_path / "q.jsonl.xz").write_bytes(lzma.compress(jsonl.encode()))
    expected = ["uno\ndos", "tres 三"]
    for name in ["p.txt", "p.txt.gz", "p.txt.xz"]:
        assert read_documents(tmp_path / name) == expected
    assert read_documents(tmp_path / "q.jsonl.xz") == ["uno", "tres 三"]


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"from c"))
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    assert [f.path.name for f in resolve_sources(tmp_path)] == ["a.jsonl", "z.txt", "c.txt.gz"]
    assert read_documents(tmp_path) == ["from a", "from b/z", "from c"]
    # a list of sources reads in the given order
    assert read_documents([tmp_path / "c.txt.gz", tmp_path / "a.jsonl"]) == ["from c", "from a"]


def test_iter_documents_streams(tmp_path: Path) -> None:
    write_docs_txt(tmp_path / "x.txt", make_docs(5))
    it = iter_documents(tmp_path / "x.txt")
    assert next(it) == make_docs(1)[0]


# ---------------------------------------------------------------- validation errors


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file or folder.*bundled corpus name"):
        read_documents(missing)


@pytest.mark.parametrize("content", [b"", b"   \n\n\t \n"])
def test_error_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=r"empty\.txt: the file is empty \(only whitespace\)"):
        read_documents(path)


def test_error_non_utf8_names_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("hello\nwörld\n".encode("latin-1"))  # "ö" = 0xF6 at byte 7
    with pytest.raises(CorpusError) as info:
        read_documents(path)
    message = str(info.value)
    assert "latin1.txt" in message and "not valid UTF-8 at byte offset 7" in message
    assert "line 2" in message and "Re-encode the file to UTF-8" in message


def test_error_non_utf8_offset_beyond_first_chunk(tmp_path: Path) -> None:
    path = tmp_path / "late.txt"
    path.write_bytes(b"x" * 10_000 + b"\n" + b"ab\xff")  # bad byte at 10_003
    with pytest.raises(CorpusError, match="byte offset 10003"):
        read_documents(path)


def test_error_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_bytes(b"PK\x03\x04\x00\x00binary stuff")
    with pytest.raises(CorpusError, match=r"model\.txt: contains NUL bytes.*binary file"):
        read_documents(path)


def test_error_jsonl_line_without_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"content": "wrong key"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: no \"text\" field \(found keys \['content'\]\)"):
        read_documents(path)


def test_error_jsonl_invalid_json_and_non_string(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken\.jsonl, line 2: not valid JSON"):
        read_documents(path)
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 1: \"text\" must be a string, got int"):
        read_documents(path)


def test_error_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(CorpusError, match="folder holds no text files"):
        read_documents(tmp_path)


def test_error_unsupported_extension_and_bad_compression(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"data\.csv: unsupported file type.*Rename a plain-text file to \.txt"):
        read_documents(tmp_path / "data.csv")
    (tmp_path / "fake.txt.xz").write_bytes(b"this is not xz data")
    with pytest.raises(CorpusError, match=r"fake\.txt\.xz: cannot decompress"):
        read_documents(tmp_path / "fake.txt.xz")


# ---------------------------------------------------------------- preparation


def test_choose_token_dtype() -> None:
    assert choose_token_dtype(400) == np.uint16
    assert choose_token_dtype(50257) == np.uint16
    assert choose_token_dtype(65535) == np.uint16
    assert choose_token_dtype(65536) == np.uint32
    assert choose_token_dtype(151_000) == np.uint32
    with pytest.raises(ValueError):
        choose_token_dtype(0)


def test_prepare_writes_every_document_once(tmp_path: Path, tok: Tokenizer) -> None:
    docs = make_docs(60)
    src = write_docs_txt(tmp_path / "corpus.txt", docs)
    counting = CountingTokenizer(tok)
    meta = prepare_corpus(src, counting, tmp_path / "out", val_fraction=0.2, seed=3, show_progress=False, batch_docs=7)
    assert counting.encode_calls == 9  # ceil(60 / 7) batches: never the whole corpus at once

    assert meta.split_by == "documents" and meta.dtype == "uint16" and meta.vocab_size == len(tok)
    expected = expected_split_ids(tok, docs, seed=3, val_fraction=0.2)
    assert read_split(meta, "train") == expected["train"]
    assert read_split(meta, "val") == expected["val"]
    assert 0 < meta.val_docs < meta.train_docs and meta.train_docs + meta.val_docs == 60
    assert meta.train_tokens == len(expected["train"]) and meta.val_tokens == len(expected["val"])

    # decoding train + val gives back every document exactly once
    decoded: list[str] = []
    for split in ("train", "val"):
        text = tok.decode(read_split(meta, split))
        decoded += text.split("<|endoftext|>")[:-1]
    assert sorted(decoded) == sorted(docs)

    saved = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert saved["train_tokens"] == meta.train_tokens and saved["seed"] == 3
    assert saved["sources"][0]["path"] == str(src.resolve())
    assert saved["sources"][0]["size"] == src.stat().st_size and "mtime_ns" in saved["sources"][0]
    assert CorpusMeta.load(tmp_path / "out") == meta
    assert sorted(os.listdir(tmp_path / "out")) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]  # no temp files


def test_prepare_is_deterministic_and_seed_dependent(tmp_path: Path, tok: Tokenizer) -> None:
    src = write_docs_txt(tmp_path / "c.txt", make_docs(80))
    a = prepare_corpus(src, tok, tmp_path / "a", seed=1, val_fraction=0.25, show_progress=False, batch_docs=5)
    b = prepare_corpus(src, tok, tmp_path / "b", seed=1, val_fraction=0.25, show_progress=False, batch_docs=64)
    c = prepare_corpus(src, tok, tmp_path / "c", seed=2, val_fraction=0.25, show_progress=False)
    for split in ("train", "val"):
        assert a.path(split).read_bytes() == b.path(split).read_bytes()
    assert a.val_path.read_bytes() != c.val_path.read_bytes()


def test_prepare_reuses_cache_and_retokenizes_on_change(tmp_path: Path, tok: Tokenizer) -> None:
    src = write_docs_txt(tmp_path / "c.txt", make_docs(30))
    counting = CountingTokenizer(tok)
    first = prepare_corpus(src, counting, tmp_path / "out", show_progress=False)
    calls = counting.encode_calls
    assert calls > 0

    again = prepare_corpus(src, counting, tmp_path / "out", show_progress=False)
    assert again == first and counting.encode_calls == calls  # reused, nothing encoded

    prepare_corpus(src, counting, tmp_path / "out", val_fraction=0.3, show_progress=False)
    assert counting.encode_calls > calls  # other val_fraction: rebuilt
    calls = counting.encode_calls

    write_docs_txt(src, make_docs(31))  # source changed
    changed = prepare_corpus(src, counting, tmp_path / "out", val_fraction=0.3, show_progress=False)
    assert counting.encode_calls > calls and changed.train_docs + changed.val_docs == 31
    calls = counting.encode_calls

    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    prepare_corpus(src, counting, tmp_path / "out", val_fraction=0.3, show_progress=False)
    assert counting.encode_calls > calls
    calls = counting.encode_calls

    other_tok = Tokenizer.train_bpe(iterator=TINY_CORPUS, vocab_size=300)
    other = prepare_corpus(src, other_tok, tmp_path / "out", val_fraction=0.3, show_progress=False)
    assert other.tokenizer_fingerprint != changed.tokenizer_fingerprint and other.vocab_size == 300

    (tmp_path / "out" / "train.bin").write_bytes(b"")  # damaged token file: rebuilt, not trusted
    repaired = prepare_corpus(src, other_tok, tmp_path / "out", val_fraction=0.3, show_progress=False)
    assert repaired.train_path.stat().st_size == repaired.train_tokens * 2 > 0


def test_prepare_single_document_splits_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    doc = "\n".join(f"line {i} of one long document" for i in range(200))
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"text": doc}) + "\n", encoding="utf-8")
    meta = prepare_corpus(src, tok, tmp_path / "out", val_fraction=0.1, show_progress=False)
    ids = tok.encode_batch_fast([doc])[0] + [tok.eos_token_id]
    assert meta.split_by == "tokens"
    assert meta.val_tokens == round(len(ids) * 0.1) and meta.train_tokens + meta.val_tokens == len(ids)
    assert read_split(meta, "train") + read_split(meta, "val") == ids
    assert (meta.train_docs, meta.val_docs) == (0, 1)  # a document counts where its EOS lies


def test_prepare_without_val(tmp_path: Path, tok: Tokenizer) -> None:
    docs = make_docs(10)
    meta = prepare_corpus(
        write_docs_txt(tmp_path / "c.txt", docs),
        tok,
        tmp_path / "out",
        val_fraction=0.0,
        show_progress=False,
    )
    assert meta.val_tokens == 0 and meta.val_path.stat().st_size == 0
    assert read_split(meta, "train") == expected_split_ids(tok, docs, 0, 0.0)["train"]
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(tmp_path / "c.txt", tok, tmp_path / "out", val_fraction=1.0)


def test_prepare_long_documents_encode_in_pieces_exactly(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_module, "_PIECE_CHARS", 60)
    doc = "\n".join(f"Line {i}:  some words,\tspaces  and 数字 {i}" for i in range(100)) + "\n\n  end"
    pieces = prepare_module._split_long_text(doc, 60)
    assert len(pieces) > 20 and "".join(pieces) == doc
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": doc[::-1]}) + "\n", encoding="utf-8")
    meta = prepare_corpus(src, tok, tmp_path / "out", val_fraction=0.0, show_progress=True)
    whole = tok.encode_batch_fast([doc, doc[::-1]])
    assert read_split(meta, "train") == whole[0] + [tok.eos_token_id] + whole[1] + [tok.eos_token_id]


def test_prepare_uint32_for_large_vocab(tmp_path: Path, tok: Tokenizer) -> None:
    big = CountingTokenizer(tok, fake_len=70_000)
    docs = make_docs(12)
    meta = prepare_corpus(
        write_docs_txt(tmp_path / "c.txt", docs),
        big,
        tmp_path / "out",
        val_fraction=0.0,
        show_progress=False,
    )
    assert meta.dtype == "uint32" and meta.vocab_size == 70_000
    assert meta.train_path.stat().st_size == 4 * meta.train_tokens
    assert np.fromfile(meta.train_path, dtype=np.uint32).tolist() == expected_split_ids(tok, docs, 0, 0.0)["train"]


def test_prepare_bundled_and_mixed_sources(tmp_path: Path, tok: Tokenizer) -> None:
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"text": "one more poem"}\n', encoding="utf-8")
    meta = prepare_corpus(["zh_poems", extra], tok, tmp_path / "out", show_progress=False)
    docs = read_documents(["zh_poems", extra])
    assert meta.train_docs + meta.val_docs == len(docs)
    assert [Path(s["path"]).name for s in meta.sources] == ["zh_poems.txt.xz", "extra.jsonl"]
    total = read_split(meta, "train") + read_split(meta, "val")
    assert total.count(tok.eos_token_id) == len(docs)


# ---------------------------------------------------------------- block datasets


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 2M-token (4 MB) uint16 file whose token at position p is p % 65521."""
    path = tmp_path_factory.mktemp("tokens") / "train.bin"
    data = (np.arange(2_000_000, dtype=np.int64) % 65521).astype(np.uint16)
    data.tofile(path)
    return path, data


def test_random_blocks_are_deterministic_and_well_formed(
    token_file: tuple[Path, np.ndarray],
) -> None:
    path, data = token_file
    ds = RandomBlockDataset(path, block_size=32, num_samples=1000, seed=7)
    again = RandomBlockDataset(path, block_size=32, num_samples=1000, seed=7)
    assert len(ds) == 1000
    for i in [0, 1, 500, 999]:
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (32,)
        assert item["labels"].shape == (33,)
        assert torch.equal(item["labels"][:-1], item["input_ids"])
        start = ds.offset(i)
        assert 0 <= start <= len(data) - 33
        assert item["labels"].tolist() == data[start : start + 33].tolist()
        assert torch.equal(ds[i]["labels"], again[i]["labels"])  # same on every call
    other_seed = RandomBlockDataset(path, block_size=32, num_samples=1000, seed=8)
    assert [ds.offset(i) for i in range(10)] != [other_seed.offset(i) for i in range(10)]
    with pytest.raises(IndexError):
        ds[1000]


def test_random_block_offsets_spread_over_corpus(token_file: tuple[Path, np.ndarray]) -> None:
    path, data = token_file
    ds = RandomBlockDataset(path, block_size=128, num_samples=5000, seed=0)
    offsets = np.array([ds.offset(i) for i in range(5000)])
    assert offsets.min() >= 0 and offsets.max() < len(data) - 128
    counts = np.bincount(offsets * 10 // (len(data) - 128), minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # ~500 per tenth of the corpus
    assert len(set(offsets.tolist())) > 4990


def test_random_blocks_in_dataloader_workers(token_file: tuple[Path, np.ndarray]) -> None:
    path, _ = token_file
    ds = RandomBlockDataset(path, block_size=16, num_samples=64, seed=1)
    ds[0]  # opens the memmap; pickling must still work
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5]["labels"], ds[5]["labels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = list(loader)
    assert batches[0]["input_ids"].shape == (8, 16) and batches[0]["labels"].shape == (8, 17)
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.stack([ds[i]["labels"] for i in range(64)]))


def test_sequential_blocks_cover_split_in_order(token_file: tuple[Path, np.ndarray]) -> None:
    path, data = token_file
    ds = SequentialBlockDataset(path, block_size=1000)
    assert len(ds) == (len(data) - 1) // 1000
    inputs = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    assert inputs.tolist() == data[: len(ds) * 1000].tolist()
    for i in range(len(ds) - 1):
        assert ds[i]["labels"][-1] == ds[i + 1]["input_ids"][0]
    assert len(SequentialBlockDataset(path, block_size=1000, max_blocks=5)) == 5


def test_block_datasets_read_dtype_from_meta(tmp_path: Path, tok: Tokenizer) -> None:
    big = CountingTokenizer(tok, fake_len=70_000)
    meta = prepare_corpus(
        write_docs_txt(tmp_path / "c.txt", make_docs(40)),
        big,
        tmp_path / "out",
        val_fraction=0.0,
        show_progress=False,
    )
    ds = SequentialBlockDataset(meta.train_path, block_size=8)
    assert ds.dtype == np.uint32
    assert torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist() == read_split(meta, "train")[: len(ds) * 8]


def test_error_too_few_tokens_for_a_block(tmp_path: Path) -> None:
    path = tmp_path / "val.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(CorpusError) as info:
        SequentialBlockDataset(path, block_size=128)
    message = str(info.value)
    assert "val split" in message and "val.bin" in message and "has 100 tokens" in message
    assert "block_size + 1 = 129" in message and "smaller block_size" in message and "more data" in message
    with pytest.raises(CorpusError, match="has 100 tokens"):
        RandomBlockDataset(path, block_size=100, num_samples=10, seed=0)
    assert len(RandomBlockDataset(path, block_size=99, num_samples=10, seed=0)) == 10  # exactly enough


def test_memory_stays_flat_over_many_items(token_file: tuple[Path, np.ndarray]) -> None:
    path, _ = token_file  # 4 MB file
    ds = RandomBlockDataset(path, block_size=256, num_samples=20_000, seed=0)
    ds[0]
    tracemalloc.start()
    try:
        for i in range(20_000):
            ds[i]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # a few blocks' worth, never the file (4 MB) or a growing cache


def test_import_is_light() -> None:
    code = (
        "import sys, lmforge.data\n"
        "from lmforge.data import read_documents, CorpusError, BUNDLED\n"
        "assert 'torch' not in sys.modules, 'lmforge.data imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
