"""Tests for lmforge.tokenizer: byte-level BPE training, the HF-shaped __call__/decode API,
save/load, and compatibility with transformers' PreTrainedTokenizerFast (the oracle)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from lmforge.constants import NO_LENGTH_LIMIT
from lmforge.textio import TextFileError
from lmforge.tokenizer import BatchEncoding, Tokenizer

EOS, PAD = "<|endoftext|>", "<|pad|>"
POEM = "床前明月光，疑是地上霜。"
MIXED = "Hello, 世界! Transformers 模型 are fun 😀🎉 — 训练 tokenizer\tnow.\n"

# A small corpus with English, Chinese, emoji and odd whitespace; every line ends with "\n" so
# training on the file's lines equals training on this list.
CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.\n",
    "A tokenizer turns text into integers, and decoding turns them back.\n",
    f"{POEM}举头望明月，低头思故乡。\n",
    MIXED,
    "    indented code line\twith a tab\n",
    "a windows line ending\r\n",
    "\n",
    "Numbers 12345 and symbols #$%&*() mix with words.\n",
    "中文和English混合的句子，还有表情😀😂👍。\n",
]
CORPUS = [line for i in range(40) for line in CORPUS_LINES[i % 3 :] + CORPUS_LINES[: i % 3]]


def gpt2_byte_symbols() -> dict[str, int]:
    """GPT-2's byte <-> printable-symbol table (symbol -> byte), rebuilt from its definition:
    printable Latin-1 bytes map to themselves, the rest to code points 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


BYTE_OF_SYMBOL = gpt2_byte_symbols()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=CORPUS, vocab_size=600, min_frequency=2)


def fresh(tok: Tokenizer) -> Tokenizer:
    """An independent copy (own backend), for tests that change settings or the vocabulary."""
    return Tokenizer(
        BackendTokenizer.from_str(tok.backend.to_str()),
        tok.special_tokens_map,
        model_max_length=tok.model_max_length,
        padding_side=tok.padding_side,
    )


# ---------------------------------------------------------------------------- training
def test_train_bpe_vocab_and_special_tokens(tok: Tokenizer) -> None:
    vocab = tok.get_vocab()
    assert 256 + 2 < tok.vocab_size <= 600
    assert len(tok) == tok.vocab_size == len(vocab) == tok.backend.get_vocab_size()
    assert sorted(vocab.values()) == list(range(tok.vocab_size))
    assert set(BYTE_OF_SYMBOL) <= set(vocab)  # all 256 byte symbols: nothing is ever unknown
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (EOS, EOS, PAD)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (
        vocab[EOS],
        vocab[EOS],
        vocab[PAD],
    )
    assert tok.unk_token is None and tok.unk_token_id is None
    assert tok.all_special_tokens == [EOS, PAD]
    assert tok.all_special_ids == [vocab[EOS], vocab[PAD]]
    assert tok.padding_side == "right" and tok.model_max_length == NO_LENGTH_LIMIT
    # a merged (multi-byte) token exists, so training actually learned something
    assert any(len(t) > 1 for t in vocab if t not in (EOS, PAD))
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox") // 2


def test_train_bpe_custom_special_tokens() -> None:
    t = Tokenizer.train_bpe(iterator=CORPUS, vocab_size=300, special_tokens=("<s>", "<p>", "<x>"))
    assert (t.eos_token, t.bos_token, t.pad_token) == ("<s>", "<s>", "<p>")
    assert t.all_special_tokens == ["<s>", "<p>", "<x>"]
    assert t.all_special_ids == [0, 1, 2]


def _write_corpus(path, opener) -> None:
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        f.write("".join(CORPUS))


def test_train_from_txt_xz_gz_matches_iterator(tok: Tokenizer, tmp_path) -> None:
    reference = tok.backend.to_str()
    paths = {
        "txt": tmp_path / "corpus.txt",
        "xz": tmp_path / "corpus.txt.xz",
        "gz": tmp_path / "corpus.txt.gz",
    }
    _write_corpus(paths["txt"], open)
    _write_corpus(paths["xz"], lzma.open)
    _write_corpus(paths["gz"], gzip.open)
    assert paths["xz"].read_bytes()[:6] == b"\xfd7zXZ\x00"  # really compressed
    for kind, path in paths.items():
        trained = Tokenizer.train_bpe(files=[str(path)], vocab_size=600, min_frequency=2)
        assert trained.get_vocab() == tok.get_vocab(), kind
        assert trained.backend.to_str() == reference, kind  # same merges too
    # a single path (str or PathLike) works as well as a list
    single = Tokenizer.train_bpe(files=paths["xz"], vocab_size=600, min_frequency=2)
    assert single.get_vocab() == tok.get_vocab()


def test_train_from_several_files_mixing_compressed(tmp_path) -> None:
    half = len(CORPUS) // 2
    a, b = tmp_path / "a.txt", tmp_path / "b.xz"
    a.write_text("".join(CORPUS[:half]), encoding="utf-8")
    with lzma.open(b, "wt", encoding="utf-8") as f:
        f.write("".join(CORPUS[half:]))
    from_files = Tokenizer.train_bpe(files=[a, b], vocab_size=400)
    from_iter = Tokenizer.train_bpe(iterator=iter(CORPUS), vocab_size=400)
    assert from_files.get_vocab() == from_iter.get_vocab()


def test_train_reads_files_like_every_other_reader(tok: Tokenizer, tmp_path) -> None:
    """Training files go through lmforge.textio: .bz2 too, a UTF-8 byte-order mark dropped, and a binary or
    non-UTF-8 file refused with its one error type, naming the file."""
    compressed = tmp_path / "corpus.txt.bz2"
    with bz2.open(compressed, "wt", encoding="utf-8", newline="") as f:
        f.write("".join(CORPUS))
    assert Tokenizer.train_bpe(files=compressed, vocab_size=600).backend.to_str() == tok.backend.to_str()
    # with min_frequency=1 a kept mark would show up as merges of its three bytes
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes(b"\xef\xbb\xbfhello world\n")
    from_file = Tokenizer.train_bpe(files=with_bom, vocab_size=400, min_frequency=1)
    without_mark = Tokenizer.train_bpe(iterator=["hello world\n"], vocab_size=400, min_frequency=1)
    assert from_file.get_vocab() == without_mark.get_vocab()
    binary, latin1 = tmp_path / "data.bin", tmp_path / "latin1.txt"
    binary.write_bytes(b"\x00\x01\x02 not text")
    latin1.write_bytes("café\n".encode("latin-1"))
    for path in (binary, latin1):
        with pytest.raises(TextFileError, match=path.name):
            Tokenizer.train_bpe(files=[path], vocab_size=300)


def test_train_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of files=.* or iterator=.*got both"):
        Tokenizer.train_bpe(files=["x"], iterator=["x"])
    with pytest.raises(ValueError, match="got neither"):
        Tokenizer.train_bpe()
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train_bpe(files=[missing])
    with pytest.raises(ValueError, match=r"wrap it in a list"):
        Tokenizer.train_bpe(iterator="just one string")
    with pytest.raises(ValueError, match="files is empty"):
        Tokenizer.train_bpe(files=[])
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 258"):
        Tokenizer.train_bpe(iterator=CORPUS, vocab_size=100)


# ---------------------------------------------------------------------------- round trip
_cjk = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
_emoji = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
_space = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0"])
_emoji_seq = st.lists(st.one_of(_emoji, st.sampled_from(["\u200d", "\ufe0f", "\U0001f3fd", "👨‍👩‍👧"])), max_size=8).map(
    "".join
)
_mixed_pieces = st.lists(
    st.one_of(
        st.text(_cjk, max_size=6),
        _emoji_seq,
        _space,
        st.text(st.characters(codec="ascii"), max_size=6),
        st.sampled_from(["，", "。", "！", "Hello", " world", "中文", POEM]),
    ),
    max_size=12,
).map("".join)
_padded = st.builds(
    lambda lead, mid, trail: lead + mid + trail,
    st.text(" \t\n", max_size=5),
    st.one_of(st.text(max_size=20), st.text(_cjk, max_size=10)),
    st.text(" \t\n", max_size=5),
)
ANY_TEXT = st.one_of(
    st.text(),
    st.text(_cjk),
    _emoji_seq,
    st.text(" \t\n\r\u3000ab中", max_size=30),
    _padded,
    _mixed_pieces,
)


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_decode_encode_roundtrip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == ids
    assert tok.encode_batch_fast([text, text + "x"])[0] == ids


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT)
def test_offsets_are_the_character_span_of_each_tokens_bytes(tok: Tokenizer, text: str) -> None:
    """Offsets are character indices. A token's span is the smallest run of characters that
    contains all its bytes, so byte-level tokens that split one multi-byte character share
    that character's span; spans never go backwards and leave no gaps."""
    enc = tok(text, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    byte_pos, rebuilt, prev_end = 0, "", 0
    for token, (start, end) in zip(tokens, enc["offset_mapping"], strict=True):
        n_bytes = len(token)  # one symbol per byte for byte-level tokens
        assert all(c in BYTE_OF_SYMBOL for c in token)
        assert (start, end) == (char_of_byte[byte_pos], char_of_byte[byte_pos + n_bytes - 1] + 1)
        assert start <= prev_end  # contiguous: no gap before this token
        rebuilt += text[max(start, prev_end) : end]
        prev_end = max(prev_end, end)
        byte_pos += n_bytes
    assert byte_pos == len(text.encode("utf-8"))
    assert rebuilt == text


# ---------------------------------------------------------------------------- Chinese and offsets
@pytest.mark.parametrize("text", [POEM, MIXED, "我爱自然语言处理 and PyTorch 🔥!", "龘靐齉"])
def test_chinese_text_has_no_unknowns_and_roundtrips(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    tokens = tok.convert_ids_to_tokens(ids)
    assert None not in tokens and tok.convert_tokens_to_ids(tokens) == ids
    assert tok.decode(ids) == text
    assert tok.batch_decode([ids, ids[:0]]) == [text, ""]


def test_seen_chinese_is_compressed(tok: Tokenizer) -> None:
    # trained on the poem: fewer tokens than its 36 UTF-8 bytes
    assert len(tok.encode(POEM)) < len(POEM.encode("utf-8")) // 2


@pytest.mark.parametrize("text", ["The quick brown fox  jumps\tover\n the dog. ", POEM, POEM + " and the fox"])
def test_offsets_join_back_to_text(tok: Tokenizer, text: str) -> None:
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert "".join(text[s:e] for s, e in offsets) == text
    for (_, prev_end), (start, _) in zip(offsets[:-1], offsets[1:], strict=True):
        assert start == prev_end


def test_offsets_of_a_split_multibyte_character(tok: Tokenizer) -> None:
    # U+1D11E (4 UTF-8 bytes) never occurs in the corpus: one token per byte, and every one of
    # them points at the whole character
    text = "a𝄞b"
    enc = tok(text, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == 6
    assert enc["offset_mapping"] == [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 3)]
    assert tok.decode(enc["input_ids"][1:5]) == "𝄞"
    assert "\ufffd" in tok.decode(enc["input_ids"][1:3])  # half a character is not text


# ------------------------------------------------------------------ special tokens in text
def test_skipped_special_tokens_follow_changes_to_them(tok: Tokenizer) -> None:
    """decode(skip_special_tokens=True) skips the special tokens as they are now, after a decode has run:
    a vocabulary token given a role, or listed as an additional special token, is skipped from then on."""
    t = fresh(tok)
    ids = t.encode("first doc second doc")
    word = t.convert_ids_to_tokens(ids[1])
    assert t.decode(ids, skip_special_tokens=True) == "first doc second doc"
    t.sep_token = word  # already in the vocabulary: only its role changes
    assert ids[1] in t.all_special_ids
    assert t.decode(ids, skip_special_tokens=True) == t.decode([i for i in ids if i != ids[1]])
    t.sep_token = None
    assert t.decode(ids, skip_special_tokens=True) == "first doc second doc"
    t.additional_special_tokens.append(word)
    assert t.convert_ids_to_tokens(ids, skip_special_tokens=True) == [
        t.convert_ids_to_tokens(i) for i in ids if i != ids[1]
    ]


def test_a_decoder_decodes_as_decode_does(tok: Tokenizer) -> None:
    """`decoder()` (what streamed text uses, twice per token) gives `decode`'s text for every window of a
    sequence with special tokens (one of them a vocabulary word given a role), skipped or kept, and `decode`'s
    error for an id out of range."""
    t = fresh(tok)
    ids = t.encode("first 你好, 🙂 doc") + [t.all_special_ids[0]] + t.encode(" second doc")
    t.sep_token = t.convert_ids_to_tokens(ids[-1])  # " doc": skipped from now on
    for skip in (True, False):
        decode = t.decoder(skip_special_tokens=skip)
        for start in range(len(ids)):
            for end in range(start, len(ids) + 1):
                assert decode(ids[start:end]) == t.decode(ids[start:end], skip_special_tokens=skip)
        for bad in (-100, t.vocab_size):
            with pytest.raises(ValueError, match=rf"token id {bad} is out of range"):
                decode(ids[:2] + [bad])
    assert t.decoder(skip_special_tokens=True)(ids[-2:]) != t.decoder()(ids[-2:])


def test_token_bytes_decode_as_decode_does_for_byte_level_bpe_only(tok: Tokenizer) -> None:
    """`token_bytes` (what a stream decodes one token at a time): for byte-level BPE, the bytes of any id sequence
    read as UTF-8 (U+FFFD for a broken character) are `decode`'s text, special tokens skipped or kept, also for an
    added non-ASCII token and after a word is made special; a WordPiece tokenizer has none (streams decode over a
    window there)."""
    import random

    t = fresh(tok)
    t.backend.add_tokens(["你好世界"])
    t.sep_token = t.convert_ids_to_tokens(t.encode(" doc")[-1])  # a vocabulary word skipped from now on
    rng = random.Random(0)
    for skip in (True, False):
        table = t.token_bytes(skip_special_tokens=skip)
        assert table is not None and len(table) == t.vocab_size
        assert t.token_bytes(skip_special_tokens=skip) is table  # made once
        assert table[t.vocab_size - 1] == "你好世界".encode()
        for _ in range(300):
            ids = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(1, 12))]
            text = b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
            assert text == t.decode(ids, skip_special_tokens=skip), ids
    word = t.sep_token_id
    assert t.token_bytes(True)[word] == b"" and t.token_bytes(False)[word] == t.decode([word]).encode()
    t.sep_token = None  # a word again: the table is made again
    assert t.token_bytes(True)[word] == t.decode([word]).encode() != b""
    wordpiece = Tokenizer.train_wordpiece(iterator=["some words to learn", "and some more"], vocab_size=60)
    assert wordpiece.token_bytes() is None


def test_special_token_strings_in_text(tok: Tokenizer) -> None:
    text = f"first doc{EOS}second doc{PAD}"
    ids = tok.encode(text)
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.pad_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "first docsecond doc"
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == tok.convert_ids_to_tokens(
        [i for i in ids if i not in tok.all_special_ids]
    )
    # byte-level BPE adds no special tokens (like GPT-2), whatever add_special_tokens says
    assert tok.encode("doc", add_special_tokens=True) == tok.encode("doc")
    assert tok("doc", add_special_tokens=True)["input_ids"] == tok.encode("doc")


# ---------------------------------------------------------------------------- __call__
BATCH = ["hi", "The quick brown fox", POEM]


def test_call_single_string_gives_flat_lists(tok: Tokenizer) -> None:
    enc = tok("The quick brown fox")
    assert isinstance(enc, BatchEncoding) and list(enc) == ["input_ids", "attention_mask"]
    assert enc["input_ids"] == tok.encode("The quick brown fox")
    assert enc.input_ids is enc["input_ids"]  # attribute access
    assert enc.attention_mask == [1] * len(enc.input_ids)
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = enc.nope
    assert list(tok("x", return_attention_mask=False)) == ["input_ids"]


def test_call_batch_without_padding_is_ragged(tok: Tokenizer) -> None:
    enc = tok(BATCH)
    assert enc["input_ids"] == [tok.encode(t) for t in BATCH]
    assert [len(m) for m in enc["attention_mask"]] == [len(i) for i in enc["input_ids"]]
    assert tok(tuple(BATCH))["input_ids"] == enc["input_ids"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_longest(tok: Tokenizer, side: str) -> None:
    t = fresh(tok)
    t.padding_side = side
    ids = [t.encode(x) for x in BATCH]
    longest = max(map(len, ids))
    enc = t(BATCH, padding=True)
    assert t(BATCH, padding="longest") == enc
    pad = t.pad_token_id
    for row, mask, raw in zip(enc["input_ids"], enc["attention_mask"], ids, strict=True):
        n_pad = longest - len(raw)
        assert len(row) == len(mask) == longest
        if side == "right":
            assert row == raw + [pad] * n_pad and mask == [1] * len(raw) + [0] * n_pad
        else:
            assert row == [pad] * n_pad + raw and mask == [0] * n_pad + [1] * len(raw)
    assert t.batch_decode(enc["input_ids"], skip_special_tokens=True) == BATCH


def test_padding_max_length_and_offsets_of_padding(tok: Tokenizer) -> None:
    enc = tok(["ab", "hi"], padding="max_length", max_length=6, return_offsets_mapping=True)
    n = len(tok.encode("ab"))
    assert [len(r) for r in enc["input_ids"]] == [6, 6]
    assert enc["input_ids"][0][n:] == [tok.pad_token_id] * (6 - n)
    assert enc["offset_mapping"][0][n:] == [(0, 0)] * (6 - n)
    assert enc["attention_mask"][0] == [1] * n + [0] * (6 - n)
    # padding does not shorten: a longer text stays longer without truncation
    long = tok(["a much longer sentence than six tokens surely"], padding="max_length", max_length=6)
    assert len(long["input_ids"][0]) > 6


def test_left_padding_with_tensors(tok: Tokenizer) -> None:
    t = fresh(tok)
    t.padding_side = "left"
    enc = t(["hi", "The quick brown fox"], padding=True, return_tensors="pt")
    n_hi = len(t.encode("hi"))
    T = enc["input_ids"].shape[1]
    assert enc["attention_mask"][0].tolist() == [0] * (T - n_hi) + [1] * n_hi
    assert enc["input_ids"][0, -n_hi:].tolist() == t.encode("hi")
    assert (enc["input_ids"][0, : T - n_hi] == t.pad_token_id).all()


def test_truncation(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    full = tok.encode(text)
    assert len(full) > 4
    enc = tok(text, truncation=True, max_length=4, return_offsets_mapping=True)
    assert enc["input_ids"] == full[:4] and enc["attention_mask"] == [1] * 4
    assert enc["offset_mapping"][-1][1] < len(text)
    # shorter texts are untouched; truncation + padding to max_length gives a rectangle
    batch = tok(["hi", text], truncation=True, padding="max_length", max_length=4, return_tensors="np")
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][1].tolist() == full[:4]
    # truncation=True without max_length uses model_max_length
    t = fresh(tok)
    t.model_max_length = 3
    assert t(text, truncation=True)["input_ids"] == full[:3]
    assert len(t(text)["input_ids"]) == len(full)  # only when asked


def test_text_pair_concatenates_and_truncates_longest_first(tok: Tokenizer) -> None:
    a, b = "The quick brown fox jumps", "hi"
    enc = tok(a, b)
    assert enc["input_ids"] == tok.encode(a) + tok.encode(b)
    cut = tok(a, b, truncation=True, max_length=4)
    assert cut["input_ids"] == tok.encode(a)[: 4 - len(tok.encode(b))] + tok.encode(b)
    only_second = tok(a, b + " and more words", truncation="only_second", max_length=len(tok.encode(a)) + 1)
    assert only_second["input_ids"] == tok.encode(a) + tok.encode(b)[:1]
    with pytest.raises(
        ValueError,
        match=r"cannot truncate to max_length=2 with truncation='only_first'.*larger max_length",
    ):
        tok(a, b + " and more words", truncation="only_first", max_length=2)
    with pytest.raises(ValueError, match="both be str or both be lists"):
        tok(a, [b])
    with pytest.raises(ValueError, match="text has 1 items but text_pair has 2"):
        tok([a], [b, b])


def test_offsets_match_the_backend_for_trimming_post_processors(tok: Tokenizer) -> None:
    # a loaded tokenizer.json may use ByteLevel(trim_offsets=True) (RoBERTa-style): offsets must
    # be the backend's own, processed once
    backend = BackendTokenizer.from_str(tok.backend.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    t = Tokenizer(backend, tok.special_tokens_map)
    text = "The quick  brown fox"
    assert t(text, return_offsets_mapping=True)["offset_mapping"] == backend.encode(text).offsets
    cut = t(text, truncation=True, max_length=3, return_offsets_mapping=True)["offset_mapping"]
    assert cut == backend.encode(text).offsets[:3]


def test_pickle_roundtrip(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(MIXED) == tok.encode(MIXED) and clone.special_tokens_map == tok.special_tokens_map
    assert (
        clone(BATCH, truncation=True, max_length=3)["input_ids"]
        == tok(BATCH, truncation=True, max_length=3)["input_ids"]
    )


def test_return_tensors_pt_and_np(tok: Tokenizer) -> None:
    pt = tok(BATCH, padding=True, return_tensors="pt", return_offsets_mapping=True)
    T = max(len(tok.encode(x)) for x in BATCH)
    assert pt["input_ids"].dtype == torch.long and pt["input_ids"].shape == (3, T)
    assert pt["attention_mask"].dtype == torch.long and pt["attention_mask"].shape == (3, T)
    assert pt["offset_mapping"].shape == (3, T, 2)
    assert pt["input_ids"].tolist() == tok(BATCH, padding=True)["input_ids"]
    assert pt.to("cpu") is pt and pt.input_ids.device.type == "cpu"
    npy = tok(BATCH, padding=True, return_tensors="np")
    assert npy["input_ids"].dtype == np.int64 and npy["input_ids"].shape == (3, T)
    assert (npy["input_ids"] == pt["input_ids"].numpy()).all()
    # a single string keeps a batch dimension of 1 when tensors are requested
    one = tok("The quick brown fox", return_tensors="pt")
    assert one["input_ids"].shape == (1, len(tok.encode("The quick brown fox")))
    assert tok("The quick brown fox", return_tensors="np")["attention_mask"].shape == one["input_ids"].shape
    # equal lengths need no padding
    same = tok(["ab", "ab"], return_tensors="pt")
    assert same["input_ids"].shape == (2, len(tok.encode("ab")))


def test_call_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"different lengths.*pass padding=True"):
        tok(BATCH, return_tensors="pt")
    no_pad = Tokenizer(tok.backend, {"eos_token": EOS})
    assert no_pad.pad_token is None and no_pad.pad_token_id is None
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        no_pad(BATCH, padding=True)
    assert no_pad(BATCH)["input_ids"] == tok(BATCH)["input_ids"]  # fine without padding
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        tok(BATCH, padding="max_length")
    with pytest.raises(ValueError, match="padding must be"):
        tok(BATCH, padding="shortest")
    with pytest.raises(ValueError, match="truncation must be"):
        tok(BATCH, truncation="sometimes")
    with pytest.raises(ValueError, match="return_tensors must be None, 'pt' or 'np'"):
        tok(BATCH, return_tensors="tf")
    with pytest.raises(ValueError, match="truncation=True needs a length: pass max_length"):
        tok(BATCH, truncation=True)
    with pytest.raises(TypeError, match="text must be a str or a list of str, got int"):
        tok(3)
    with pytest.raises(TypeError, match="encode takes one str"):
        tok.encode(["a"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        tok.encode_batch_fast("abc")


def test_padding_side_validation(tok: Tokenizer) -> None:
    t = fresh(tok)
    t.padding_side = "left"
    assert t.padding_side == "left"
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        t.padding_side = "middle"
    with pytest.raises(ValueError, match="padding_side must be"):
        Tokenizer(tok.backend, tok.special_tokens_map, padding_side="up")


def test_setting_a_new_special_token_adds_it(tok: Tokenizer) -> None:
    t = fresh(tok)
    n = len(t)
    t.pad_token = t.eos_token  # already in the vocabulary: no growth
    assert t.pad_token_id == t.eos_token_id and len(t) == n
    t.mask_token = "<|mask|>"
    assert len(t) == n + 1 and t.mask_token_id == n
    assert t.encode("a<|mask|>") == t.encode("a") + [n]
    with pytest.raises(ValueError, match="unknown special-token role 'foo_token'"):
        Tokenizer(tok.backend, {"foo_token": EOS})
    with pytest.raises(ValueError, match=r"'<nope>' is not in the vocabulary"):
        Tokenizer(tok.backend, {"pad_token": "<nope>"})


# ---------------------------------------------------------------------------- encode / decode
def test_encode_batch_fast_matches_encode(tok: Tokenizer) -> None:
    texts = CORPUS_LINES + ["", " ", "😀" * 3]
    assert tok.encode_batch_fast(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch_fast([]) == []


def test_decode_accepts_lists_tensors_and_arrays(tok: Tokenizer) -> None:
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert tok.decode(torch.tensor(ids)) == MIXED
    assert tok.decode(np.array(ids, dtype=np.int32)) == MIXED
    assert tok.decode([np.int64(i) for i in ids]) == MIXED
    assert tok.decode(tok.eos_token_id) == EOS and tok.decode(torch.tensor(tok.eos_token_id)) == EOS
    batch = tok([MIXED, POEM], padding=True, return_tensors="pt")["input_ids"]
    assert tok.batch_decode(batch, skip_special_tokens=True) == [MIXED, POEM]
    assert tok.batch_decode(batch.numpy(), skip_special_tokens=True) == [MIXED, POEM]
    assert tok.batch_decode(batch)[1].startswith(POEM) and tok.batch_decode(batch)[1].endswith(PAD)
    # no clean-up of tokenization spaces: spaces before punctuation survive
    spaced = "a , b . c ' d n't"
    assert tok.decode(tok.encode(spaced)) == spaced


def test_decode_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="2-D .*use batch_decode"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="nested lists; use batch_decode"):
        tok.decode([[1, 2]])
    with pytest.raises(ValueError, match=r"token id -100 is out of range \[0, \d+\).*-100"):
        tok.decode([5, -100])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="batch_decode takes a 2-D"):
        tok.batch_decode(torch.tensor([1, 2]))


def test_vocab_conversions(tok: Tokenizer) -> None:
    vocab = tok.get_vocab()
    ids = tok.encode("The quick brown fox")
    tokens = tok.convert_ids_to_tokens(ids)
    assert [vocab[t] for t in tokens] == ids
    assert tok.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    assert tok.convert_tokens_to_ids(PAD) == tok.pad_token_id
    assert tok.convert_tokens_to_ids("definitely-not-a-token") is None  # no unk for byte-level


# ---------------------------------------------------------------------------- save / load
ROUNDTRIP_TEXTS = [
    "The quick brown fox",
    POEM,
    MIXED,
    "  leading and trailing  ",
    "emoji 👨‍👩‍👧 ok",
]


@pytest.fixture(scope="module")
def saved_dir(tok: Tokenizer, tmp_path_factory) -> str:
    t = fresh(tok)
    t.model_max_length = 128
    t.padding_side = "left"
    directory = tmp_path_factory.mktemp("tok") / "nested" / "dir"
    written = t.save_pretrained(directory)
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert written == [str(directory / n) for n in names]
    assert sorted(os.listdir(directory)) == sorted(names)  # no temp files left behind
    return str(directory)


def test_save_pretrained_files(saved_dir: str) -> None:
    config = json.loads(open(os.path.join(saved_dir, "tokenizer_config.json"), encoding="utf-8").read())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["bos_token"], config["pad_token"]) == (EOS, EOS, PAD)
    assert config["model_max_length"] == 128 and config["padding_side"] == "left"
    assert config["clean_up_tokenization_spaces"] is False
    token_map = json.loads(open(os.path.join(saved_dir, "special_tokens_map.json"), encoding="utf-8").read())
    assert token_map == {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    backend = BackendTokenizer.from_file(os.path.join(saved_dir, "tokenizer.json"))
    assert backend.padding is None and backend.truncation is None


def test_save_overwrites_atomically(tok: Tokenizer, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("garbage", encoding="utf-8")
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text("utf-8"))["eos_token"] == EOS
    assert sorted(os.listdir(tmp_path)) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_from_pretrained_roundtrip(tok: Tokenizer, saved_dir: str) -> None:
    loaded = Tokenizer.from_pretrained(saved_dir)
    assert loaded.get_vocab() == tok.get_vocab()
    for text in ROUNDTRIP_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token, loaded.unk_token) == (
        EOS,
        EOS,
        PAD,
        None,
    )
    assert loaded.padding_side == "left" and loaded.model_max_length == 128
    assert loaded.all_special_ids == tok.all_special_ids
    # a path to the tokenizer.json itself also picks up the config next to it
    by_file = Tokenizer.from_pretrained(os.path.join(saved_dir, "tokenizer.json"))
    assert by_file.padding_side == "left" and by_file.encode(MIXED) == tok.encode(MIXED)


def test_from_file_infers_special_tokens(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.backend.save(str(path))
    loaded = Tokenizer.from_file(path)
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == (EOS, EOS, PAD)
    assert loaded.encode(POEM) == tok.encode(POEM)
    assert loaded.padding_side == "right" and loaded.model_max_length == NO_LENGTH_LIMIT
    # without any config next to it, from_pretrained infers the same roles
    assert Tokenizer.from_pretrained(tmp_path).special_tokens_map == loaded.special_tokens_map


def test_loading_errors(tmp_path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*expected a directory containing tokenizer.json"):
        Tokenizer.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in directory .*empty"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"looked for .*nope.json.*expected a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- transformers oracle
@pytest.fixture(scope="module")
def hf_fast(saved_dir: str):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(saved_dir)


def test_transformers_loads_and_agrees(tok: Tokenizer, saved_dir: str, hf_fast) -> None:
    ours = Tokenizer.from_pretrained(saved_dir)
    assert hf_fast.padding_side == "left" and hf_fast.model_max_length == 128
    assert (hf_fast.eos_token, hf_fast.pad_token, hf_fast.pad_token_id) == (
        EOS,
        PAD,
        ours.pad_token_id,
    )
    assert len(hf_fast) == len(ours)
    for side in ("left", "right"):
        ours.padding_side = hf_fast.padding_side = side
        mine = ours(ROUNDTRIP_TEXTS, padding=True, return_offsets_mapping=True)
        theirs = hf_fast(ROUNDTRIP_TEXTS, padding=True, return_offsets_mapping=True)
        assert mine["input_ids"] == theirs["input_ids"], side
        assert mine["attention_mask"] == theirs["attention_mask"], side
        assert [list(map(tuple, r)) for r in theirs["offset_mapping"]] == mine["offset_mapping"], side
        for row in mine["input_ids"]:
            assert hf_fast.decode(row) == ours.decode(row)
            assert hf_fast.decode(row, skip_special_tokens=True) == ours.decode(row, skip_special_tokens=True)
    spaced = "a , b . c ' d n't"
    assert hf_fast.decode(ours.encode(spaced)) == spaced
    pair_args = dict(truncation=True, max_length=6, padding=True)
    theirs = hf_fast(ROUNDTRIP_TEXTS, ROUNDTRIP_TEXTS[::-1], **pair_args)
    mine = ours(ROUNDTRIP_TEXTS, ROUNDTRIP_TEXTS[::-1], **pair_args)
    assert mine["input_ids"] == theirs["input_ids"] and mine["attention_mask"] == theirs["attention_mask"]
    truncated = hf_fast(ROUNDTRIP_TEXTS, truncation=True, max_length=5, padding="max_length")
    assert (
        ours(ROUNDTRIP_TEXTS, truncation=True, max_length=5, padding="max_length")["input_ids"]
        == truncated["input_ids"]
    )


def test_transformers_auto_tokenizer(saved_dir: str) -> None:
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(saved_dir)
    ours = Tokenizer.from_pretrained(saved_dir)
    assert auto(ROUNDTRIP_TEXTS, padding=True)["input_ids"] == ours(ROUNDTRIP_TEXTS, padding=True)["input_ids"]
    assert auto.batch_decode(ours(ROUNDTRIP_TEXTS)["input_ids"]) == ROUNDTRIP_TEXTS


# ---------------------------------------------------------------------------- import hygiene
def test_import_is_light() -> None:
    # torch comes in through lmforge.hub (model ids are resolved there); transformers never does
    code = "import sys, lmforge.tokenizer; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
