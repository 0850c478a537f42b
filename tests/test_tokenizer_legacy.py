"""Tests for loading GPT-2's legacy tokenizer files (vocab.json + merges.txt, no tokenizer.json)
with Tokenizer.from_pretrained, against transformers' GPT2TokenizerFast / AutoTokenizer on the
same directory (the oracle).

The legacy files are made the way such checkpoints were: a byte-level BPE trained with lmforge,
written out by the ``tokenizers`` model's own ``save(folder)`` (vocab.json + merges.txt with
GPT-2's '#version' header)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import transformers  # test-only oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.constants import NO_LENGTH_LIMIT
from lmforge.tokenizer import Tokenizer

EOS, PAD = "<|endoftext|>", "<|pad|>"
POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.\n",
    "A tokenizer turns text into integers, and decoding turns them back.\n",
    f"{POEM}\n",
    "Hello, 世界! Transformers 模型 are fun 😀🎉 — 训练 tokenizer\tnow.\n",
    "    indented code line\twith a tab\n",
    "a windows line ending\r\n",
    "\n\n\n",
    "Numbers 12345 and symbols #$%&*() mix with words; don't we'll I'm.\n",
    "中文和English混合的句子，还有表情😀😂👍。\n",
]
CORPUS = CORPUS_LINES * 30

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    POEM,
    "Hello, 世界! Transformers 模型 are fun 😀🎉 — 训练 tokenizer\tnow.\n",
    "emoji 👨‍👩‍👧 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 𝄞 clef",
    "runs of spaces:    four,        eight, and newlines\n\n\n\nthen\r\n\r\ncrlf",
    "   leading and trailing   ",
    "\n\n",
    " ",
    "",
    f"first doc{EOS}second doc",
    f"{EOS}{EOS} spaced {EOS} out {EOS}",
    f"{PAD} not special without a config {PAD}",
    "don't we'll I'm they've 123456789 3.14 #$%&*()",
    "中文和English混合的句子，还有表情😀😂👍。",
    "a , b . c ' d n't",  # decoding must not "clean up" these spaces
]
CHAT = "<|user|> hi<|assistant|> hello<|user|>"

_mixed = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=6),
        st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=4),
        st.sampled_from([" ", "   ", "\n", "\n\n", "\r\n", "\t", EOS, PAD, " " + EOS, "Hello"]),
    ),
    max_size=10,
).map("".join)


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def write_legacy(directory: Path, trained: Tokenizer, **json_files: dict) -> Path:
    """Write ``trained``'s vocab.json + merges.txt (and ``name=content`` JSON files, e.g.
    tokenizer_config=...) into ``directory``: a GPT-2-style directory without tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    trained.backend.model.save(str(directory))
    for name, content in json_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    assert "tokenizer.json" not in _names(directory)
    return directory


def hf_from_files(directory: Path):
    """transformers' GPT-2 tokenizer built from the two files directly (the keyword names
    changed in transformers 5: vocab_file/merges_file there build an empty vocabulary)."""
    vocab, merges = str(directory / "vocab.json"), str(directory / "merges.txt")
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    return transformers.GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)


def added_tokens(tokenizer) -> list[tuple]:
    """(id, content, special, lstrip, rstrip, single_word) of a backend's added tokens."""
    backend = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    return [
        (i, t.content, t.special, t.lstrip, t.rstrip, t.single_word)
        for i, t in sorted(backend.get_added_tokens_decoder().items())
    ]


def assert_same_as_hf(ours: Tokenizer, hf, texts: list[str] = TEXTS) -> None:
    """Same vocabulary, added tokens, ids, offsets and decoded text as the transformers one."""
    assert len(hf) == len(ours) and hf.get_vocab() == ours.get_vocab()
    assert added_tokens(hf) == added_tokens(ours)
    theirs = hf(texts, return_offsets_mapping=True)
    mine = ours(texts, return_offsets_mapping=True)
    assert mine["input_ids"] == theirs["input_ids"]
    assert mine["offset_mapping"] == [list(map(tuple, row)) for row in theirs["offset_mapping"]]
    for ids in mine["input_ids"]:
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == ours.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == ours.decode(
            ids, skip_special_tokens=True
        )
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, role) == getattr(hf, role), role
        assert getattr(ours, role + "_id") == getattr(hf, role + "_id"), role


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=CORPUS, vocab_size=500, min_frequency=2)


@pytest.fixture(scope="module")
def bare_dir(trained: Tokenizer, tmp_path_factory) -> Path:
    """Only vocab.json + merges.txt, as in the original gpt2 checkpoint's slow files."""
    return write_legacy(tmp_path_factory.mktemp("gpt2_bare"), trained)


@pytest.fixture(scope="module")
def bare(bare_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(bare_dir)


# ---------------------------------------------------------------------------- the files
def test_written_files_look_like_gpt2s(trained: Tokenizer, bare_dir: Path) -> None:
    assert _names(bare_dir) == ["merges.txt", "vocab.json"]
    lines = (bare_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"  # GPT-2's header
    assert lines[-1] == "" and all(len(line.split(" ")) == 2 for line in lines[1:-1])
    assert len(lines) - 2 == len(json.loads(trained.backend.to_str())["model"]["merges"]) > 100
    vocab = json.loads((bare_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == trained.backend.get_vocab(with_added_tokens=False)
    assert sorted(vocab.values()) == list(range(500))


# ---------------------------------------------------------------------------- oracle agreement
def test_bare_dir_matches_gpt2_tokenizer_fast(bare: Tokenizer, bare_dir: Path) -> None:
    for hf in (hf_from_files(bare_dir), transformers.GPT2TokenizerFast.from_pretrained(bare_dir)):
        assert len(hf) == 500  # really loaded the files (not an empty vocabulary)
        assert_same_as_hf(bare, hf)
    assert [bare.decode(bare.encode(text)) for text in TEXTS] == TEXTS


def test_bare_dir_special_tokens_follow_gpt2(bare: Tokenizer, trained: Tokenizer) -> None:
    assert (bare.bos_token, bare.eos_token, bare.unk_token) == (EOS, EOS, EOS)
    assert bare.pad_token is None and bare.pad_token_id is None
    assert bare.eos_token_id == trained.eos_token_id == 0
    assert bare.all_special_tokens == [EOS] and bare.all_special_ids == [0]
    assert bare.model_max_length == NO_LENGTH_LIMIT and bare.padding_side == "right"
    # <|endoftext|> in the text is one token; without a config <|pad|> is ordinary text
    ids = bare.encode(f"a{EOS}b{PAD}")
    assert ids.count(0) == 1 and 1 not in ids
    assert bare.decode(ids, skip_special_tokens=True) == f"ab{PAD}"
    with pytest.raises(ValueError, match="no pad token"):
        bare(["a", "bb"], padding=True)


@pytest.fixture(scope="module")
def hf_bare(bare_dir: Path):
    return hf_from_files(bare_dir)


@settings(max_examples=150, deadline=None)
@given(_mixed)
def test_random_text_matches_and_roundtrips(bare: Tokenizer, hf_bare, text: str) -> None:
    ids = bare.encode(text)
    assert ids == hf_bare(text)["input_ids"]
    assert bare.decode(ids) == text


def test_auto_tokenizer_with_config_special_map_and_added_tokens(trained: Tokenizer, tmp_path) -> None:
    directory = write_legacy(
        tmp_path / "gpt2_full",
        trained,
        tokenizer_config={
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 64,
            "padding_side": "left",
            "add_prefix_space": False,
            "additional_special_tokens": ["<|user|>"],
        },
        special_tokens_map={"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD},
        added_tokens={"<|user|>": 500, "<|assistant|>": 501},
    )
    ours = Tokenizer.from_pretrained(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(auto).__name__.startswith("GPT2Tokenizer")
    texts = [*TEXTS, CHAT, "x <|assistant|>y"]
    assert_same_as_hf(ours, auto, texts)
    assert ours.pad_token_id == 1 and ours.additional_special_tokens == ["<|user|>"]
    assert ours.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [500, 501]
    special = dict(added_tokens(ours)[i][1:3] for i in range(len(added_tokens(ours))))
    assert special == {EOS: True, PAD: True, "<|user|>": True, "<|assistant|>": False}
    assert (
        (ours.model_max_length, ours.padding_side)
        == (64, "left")
        == (
            auto.model_max_length,
            auto.padding_side,
        )
    )
    batch = ["short", POEM]
    assert ours(batch, padding=True)["input_ids"] == auto(batch, padding=True)["input_ids"]
    cut = dict(truncation=True, max_length=5, padding="max_length")
    assert ours(batch, **cut)["input_ids"] == auto(batch, **cut)["input_ids"]


def test_additional_special_token_only_in_special_tokens_map(trained: Tokenizer, tmp_path) -> None:
    """transformers 5 leaves an added_tokens.json token that only special_tokens_map.json calls
    special unflagged in its backend (so its decode(skip_special_tokens=True) keeps it, although
    it lists the token in all_special_tokens). Ids agree; we treat the token as special."""
    directory = write_legacy(
        tmp_path / "gpt2_map_only",
        trained,
        special_tokens_map={"additional_special_tokens": ["<|user|>"]},
        added_tokens={"<|user|>": 500, "<|assistant|>": 501},
    )
    ours = Tokenizer.from_pretrained(directory)
    hf = transformers.GPT2TokenizerFast.from_pretrained(directory)
    assert ours(TEXTS + [CHAT])["input_ids"] == hf(TEXTS + [CHAT])["input_ids"]
    assert ours.all_special_tokens == hf.all_special_tokens == [EOS, "<|user|>"]
    assert ours.decode(ours.encode(CHAT), skip_special_tokens=True) == " hi<|assistant|> hello"


def test_special_tokens_map_overrides_config_like_transformers(trained: Tokenizer, tmp_path) -> None:
    directory = write_legacy(
        tmp_path / "gpt2_conflict",
        trained,
        tokenizer_config={"tokenizer_class": "GPT2Tokenizer", "pad_token": EOS, "unk_token": None},
        special_tokens_map={"pad_token": PAD},
    )
    ours = Tokenizer.from_pretrained(directory)
    assert (ours.pad_token, ours.unk_token) == (PAD, None)
    assert_same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(directory))


def test_config_added_tokens_decoder_with_lstrip(trained: Tokenizer, tmp_path) -> None:
    """A transformers 4 slow save: added tokens with their flags in tokenizer_config.json
    (added_tokens.json is then ignored, by both)."""
    mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}  # fmt: skip
    directory = write_legacy(
        tmp_path / "gpt2_decoder",
        trained,
        tokenizer_config={
            "tokenizer_class": "GPT2Tokenizer",
            "added_tokens_decoder": {"0": {**mask, "content": EOS, "lstrip": False}, "500": mask},
            "eos_token": {"__type": "AddedToken", **mask, "content": EOS, "lstrip": False},
            "mask_token": "<mask>",
        },
        added_tokens={"<ignored>": 500},
        special_tokens_map={"pad_token": PAD},  # ignored too
    )
    ours = Tokenizer.from_pretrained(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert_same_as_hf(ours, auto, [*TEXTS, "fill   <mask> in", "a<mask>b <mask>"])
    assert ours.mask_token_id == 500 and ours.eos_token == EOS and ours.pad_token is None
    # lstrip: the spaces before <mask> belong to it
    assert ours.encode("fill   <mask>") == ours.encode("fill") + [500]


def test_add_prefix_space(trained: Tokenizer, tmp_path) -> None:
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True}
    directory = write_legacy(tmp_path / "gpt2_prefix", trained, tokenizer_config=config)
    ours = Tokenizer.from_pretrained(directory)
    assert_same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(directory))
    assert ours.encode("Hello world") == trained.encode(" Hello world")
    assert Tokenizer.from_pretrained(write_legacy(tmp_path / "plain", trained)).encode("Hello world") == trained.encode(
        "Hello world"
    )


def test_add_bos_and_eos_token(trained: Tokenizer, tmp_path) -> None:
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_eos_token": True}
    directory = write_legacy(tmp_path / "gpt2_bos", trained, tokenizer_config=config)
    ours = Tokenizer.from_pretrained(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert_same_as_hf(ours, auto)
    assert ours("hi")["input_ids"] == [0, *ours.encode("hi"), 0]
    assert ours("hi", "yo")["input_ids"] == auto("hi", "yo")["input_ids"]
    assert ours("hi", add_special_tokens=False)["input_ids"] == ours.encode("hi")


def test_vocab_without_endoftext_appends_it(tmp_path) -> None:
    no_special = Tokenizer.train_bpe(iterator=CORPUS, vocab_size=400, special_tokens=())
    directory = write_legacy(tmp_path / "gpt2_nospecial", no_special)
    ours = Tokenizer.from_pretrained(directory)
    assert len(ours) == 401 and ours.eos_token_id == ours.unk_token_id == 400
    assert ours.encode(f"a{EOS}") == no_special.encode("a") + [400]
    assert_same_as_hf(ours, hf_from_files(directory))


def test_path_of_vocab_json_loads_its_directory(bare: Tokenizer, bare_dir: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        loaded = Tokenizer.from_pretrained(bare_dir / name)
        assert loaded.encode_batch_fast(TEXTS) == bare.encode_batch_fast(TEXTS)


# ---------------------------------------------------------------------------- tokenizer.json
def test_same_ids_as_the_tokenizer_json_version(trained: Tokenizer, tmp_path) -> None:
    # with the pad token declared, the legacy files describe exactly the trained tokenizer
    directory = write_legacy(tmp_path / "gpt2_pad", trained, special_tokens_map={"pad_token": PAD})
    legacy = Tokenizer.from_pretrained(directory)
    assert legacy.get_vocab() == trained.get_vocab()
    model = json.loads(legacy.backend.to_str())["model"]
    assert model == json.loads(trained.backend.to_str())["model"]  # vocab and merges
    assert legacy(TEXTS, return_offsets_mapping=True) == trained(TEXTS, return_offsets_mapping=True)
    assert legacy.encode_batch_fast(TEXTS) == trained.encode_batch_fast(TEXTS)
    assert [legacy.decode(legacy.encode(t)) for t in TEXTS] == TEXTS
    assert (legacy.pad_token_id, legacy.eos_token_id) == (trained.pad_token_id, 0)


def test_tokenizer_json_takes_precedence(trained: Tokenizer, tmp_path) -> None:
    trained.save_pretrained(tmp_path)
    smaller = Tokenizer.train_bpe(iterator=CORPUS, vocab_size=300)
    smaller.backend.model.save(str(tmp_path))  # different vocab.json + merges.txt next to it
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= set(_names(tmp_path))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == trained.get_vocab() and loaded.pad_token == PAD
    assert loaded.encode(POEM) == trained.encode(POEM) != smaller.encode(POEM)


def test_save_pretrained_roundtrip(bare: Tokenizer, tmp_path) -> None:
    written = bare.save_pretrained(tmp_path / "saved")
    assert "tokenizer.json" in [Path(p).name for p in written]
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert again.special_tokens_map == bare.special_tokens_map
    assert again(TEXTS, return_offsets_mapping=True) == bare(TEXTS, return_offsets_mapping=True)
    assert again.backend.to_str() == bare.backend.to_str()
    assert_same_as_hf(again, transformers.AutoTokenizer.from_pretrained(tmp_path / "saved"))


# ---------------------------------------------------------------------------- errors
def test_missing_files(trained: Tokenizer, tmp_path) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_pretrained(empty)
    message = str(err.value)
    assert "empty_dir" in message and "no tokenizer.json" in message
    assert "expected tokenizer.json" in message and "vocab.json + merges.txt" in message
    assert "vocab.txt" in message  # BERT's WordPiece vocabulary is accepted too

    only_vocab = write_legacy(tmp_path / "only_vocab", trained)
    (only_vocab / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"only_vocab.*has vocab.json but no merges.txt"):
        Tokenizer.from_pretrained(only_vocab)
    (only_vocab / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (only_vocab / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges.txt but no vocab.json \(files there: m"):
        Tokenizer.from_pretrained(only_vocab)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*tokenizer.json.*vocab.json \+ merges"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def _broken(tmp_path: Path, trained: Tokenizer, name: str, **files: str | bytes) -> Path:
    directory = write_legacy(tmp_path / name, trained)
    for filename, content in files.items():
        path = directory / ".".join(filename.rsplit("_", 1))
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return directory


def test_malformed_vocab_json(trained: Tokenizer, tmp_path) -> None:
    vocab = trained.backend.get_vocab(with_added_tokens=False)
    cases = {
        "not_json": ("{'a': 1", r"vocab.json' is not valid UTF-8 JSON"),
        "a_list": (json.dumps(list(vocab)), r"vocab.json' holds a JSON list"),
        "str_id": (json.dumps({**vocab, "<x>": "7"}), r"vocab.json' gives token '<x>' the id '7'"),
        "dup_id": (json.dumps({**vocab, "<x>": 3}), r"vocab.json' .*id 3 is used twice"),
        "gap": (json.dumps({**vocab, "<x>": 900}), r"vocab.json' .*id 500 is unused"),
        # GPT-1 style (</w> word ends, no byte symbols): not byte-level BPE
        "gpt1": (
            json.dumps({"a": 0, "b</w>": 1, "ab</w>": 2}),
            r"vocab.json' lacks 255 of the 256 byte-level symbols",
        ),
    }
    for name, (content, pattern) in cases.items():
        directory = _broken(tmp_path, trained, name, vocab_json=content)
        with pytest.raises(ValueError, match=pattern):
            Tokenizer.from_pretrained(directory)


def test_malformed_merges_txt(trained: Tokenizer, tmp_path) -> None:
    cases = {
        "three_parts": ("#version: 0.2\nĠ t\nh e r\n", r"merges.txt' line 3: 'h e r' is not a"),
        "unknown": ("#version: 0.2\nĠ t\nq 世\n", r"merges.txt' line 3: .*needs '世'.*vocab.json"),
        "not_utf8": (b"#version: 0.2\n\xff\xfe t\n", r"merges.txt' is not UTF-8"),
    }
    for name, (content, pattern) in cases.items():
        directory = _broken(tmp_path, trained, name, merges_txt=content)
        with pytest.raises(ValueError, match=pattern):
            Tokenizer.from_pretrained(directory)
    # blank lines and CRLF line ends are harmless; no header is fine too
    ok = _broken(tmp_path, trained, "crlf", merges_txt="Ġ t\r\n\r\nh e\r\n")
    assert Tokenizer.from_pretrained(ok).encode(" the") == [
        trained.convert_tokens_to_ids("Ġt"),
        trained.convert_tokens_to_ids("he"),
    ]


def test_inconsistent_side_files(trained: Tokenizer, tmp_path) -> None:
    wrong_id = _broken(tmp_path, trained, "wrong_id", added_tokens_json='{"<|user|>": 7}')
    with pytest.raises(ValueError, match=r"added_tokens.json' gives token '<\|user\|>' id 7.*500"):
        Tokenizer.from_pretrained(wrong_id)
    bad_entry = _broken(tmp_path, trained, "bad_entry", added_tokens_json='{"<|user|>": "x"}')
    with pytest.raises(ValueError, match=r"added_tokens.json': cannot read entry 'x'"):
        Tokenizer.from_pretrained(bad_entry)
    bad_config = _broken(tmp_path, trained, "bad_config", tokenizer_config_json="{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config.json' is not valid UTF-8 JSON"):
        Tokenizer.from_pretrained(bad_config)
    roberta = _broken(tmp_path, trained, "roberta", tokenizer_config_json='{"tokenizer_class": "RobertaTokenizer"}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json' names .*'RobertaTokenizer'"):
        Tokenizer.from_pretrained(roberta)
