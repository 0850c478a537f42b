"""MarianTokenizer against transformers' MarianTokenizer on the same directory: two small SentencePiece models
trained here on the bundled English / Spanish verses, and a vocab.json built the way Marian's are (both models'
pieces in one table, with </s>, <unk> first and <pad> last)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch

import lmforge
from lmforge import AutoTokenizer
from lmforge.data import load_translation_pairs
from lmforge.tokenizer import MarianTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
# the reference warns about its punctuation normaliser (sacremoses), which its tokenize never calls
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

SOURCE = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "",
    "你好, world 😀!",
    "Ωmega and the </s> end <pad>x",
    ">>es<< And the evening",
    ">>fr<< an unknown code",
    "  extra   spaces  here ",
]
TARGET = ["En el principio crió Dios los cielos y la tierra.", "Y dijo Dios: Sea la luz.", "", "¿Qué? 你好", "fin"]


def _train_spm(lines: list[str], path: Path) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path.with_suffix("")),
        vocab_size=200,
        eos_id=0,
        eos_piece="</s>",
        unk_id=1,
        unk_piece="<unk>",
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.with_suffix(".model").rename(path)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("marian")
    train, _ = load_translation_pairs("en", "es")
    _train_spm([en for en, _ in train[:300]], directory / "source.spm")
    _train_spm([es for _, es in train[:300]], directory / "target.spm")
    vocab: dict[str, int] = {}
    for name in ("source.spm", "target.spm"):
        model = sentencepiece.SentencePieceProcessor(model_file=str(directory / name))
        for i in range(model.get_piece_size()):
            vocab.setdefault(model.id_to_piece(i), len(vocab))
    vocab[">>es<<"] = len(vocab)  # a target-language code, as multilingual Marian vocabularies have
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def pair(marian_dir: Path) -> tuple[MarianTokenizer, object]:
    ours = AutoTokenizer.from_pretrained(marian_dir)
    assert isinstance(ours, MarianTokenizer)
    return ours, transformers.MarianTokenizer.from_pretrained(str(marian_dir))


def test_ids_match_transformers(pair) -> None:
    ours, ref = pair
    for text in SOURCE:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.tokenize(text) == ref.tokenize(text), text
    for text in TARGET:
        assert ours(text_target=text)["input_ids"] == ref(text_target=text)["input_ids"], text
    assert ours("")["input_ids"] == [ours.eos_token_id]
    assert ours.unk_token_id in ours("你好")["input_ids"]  # characters the models never saw
    assert ours.encode(SOURCE[0]) + [ours.eos_token_id] == ours.encode(SOURCE[0], add_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding": True},
        {"padding": "max_length", "max_length": 40},
        {"padding": True, "truncation": True, "max_length": 6},
        {"truncation": True, "max_length": 1},
        {"padding": True, "return_tensors": "pt"},
        {"padding": True, "add_special_tokens": False},
    ],
)
def test_batches_match_transformers(pair, kwargs) -> None:
    ours, ref = pair
    got = ours(SOURCE[:5], text_target=TARGET, **kwargs)
    want = ref(SOURCE[:5], text_target=TARGET, **kwargs)
    assert sorted(got) == sorted(want) == ["attention_mask", "input_ids", "labels"]
    for key in got:
        if kwargs.get("return_tensors") == "pt":
            assert isinstance(got[key], torch.Tensor) and got[key].dtype == torch.long
            assert torch.equal(got[key], want[key]), key
        else:
            assert got[key] == want[key], key
    alone, want_alone = ours(text_target=TARGET, **kwargs), ref(text_target=TARGET, **kwargs)
    assert sorted(alone) == sorted(want_alone)
    for key in alone:
        assert (torch.equal if torch.is_tensor(alone[key]) else list.__eq__)(alone[key], want_alone[key]), key


def test_left_padding_and_single_text(pair) -> None:
    ours, ref = pair
    ours.padding_side = ref.padding_side = "left"
    try:
        assert ours(SOURCE[:3], padding=True) == dict(ref(SOURCE[:3], padding=True))
    finally:
        ours.padding_side = ref.padding_side = "right"
    assert ours(SOURCE[0], return_tensors="pt")["input_ids"].shape == (1, len(ref(SOURCE[0])["input_ids"]))


def test_decode_matches_transformers(pair) -> None:
    ours, ref = pair
    batch = ours(SOURCE, padding=True)["input_ids"]
    targets = ours(text_target=TARGET, padding=True)["input_ids"]
    odd = [5, ours.unk_token_id, ours.eos_token_id, 6, ours.pad_token_id, 7]  # specials between pieces
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.batch_decode(torch.tensor(targets), skip_special_tokens=skip) == ref.batch_decode(
            targets, skip_special_tokens=skip
        )
        assert ours.decode(odd, skip_special_tokens=skip) == ref.decode(odd, skip_special_tokens=skip)
        assert ours.decode([], skip_special_tokens=skip) == ref.decode([], skip_special_tokens=skip) == ""
    assert ours.decode(ours(SOURCE[0])["input_ids"], skip_special_tokens=True) == SOURCE[0]
    with pytest.raises(ValueError, match="-100"):
        ours.decode([-100])


def test_vocabulary_and_special_tokens(pair) -> None:
    ours, ref = pair
    assert len(ours) == ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    assert (ours.eos_token, ours.unk_token, ours.pad_token) == ("</s>", "<unk>", "<pad>")
    assert (ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        ref.eos_token_id,
        ref.unk_token_id,
        ref.pad_token_id,
    )
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    ids = ours(SOURCE[0])["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_ids(["▁the", "no-such-piece"]) == ref.convert_tokens_to_ids(["▁the", "no-such-piece"])


def test_save_pretrained_round_trip(pair, tmp_path: Path) -> None:
    ours, _ = pair
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == sorted(
        ["source.spm", "target.spm", "vocab.json", "tokenizer_config.json"]
    )
    again = lmforge.AutoTokenizer.from_pretrained(tmp_path / "saved")
    theirs = transformers.MarianTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again, lmforge.MarianTokenizer) and again.model_max_length == 512
    for text in SOURCE:
        assert again(text, text_target=text) == ours(text, text_target=text)
        assert again(text)["input_ids"] == theirs(text)["input_ids"]
    assert pickle.loads(pickle.dumps(again))(SOURCE[:2]) == again(SOURCE[:2])  # DataLoader workers pickle it


def test_missing_files_are_named(marian_dir: Path, tmp_path: Path) -> None:
    for missing in ("source.spm", "target.spm", "vocab.json"):
        broken = tmp_path / missing
        shutil.copytree(marian_dir, broken)
        (broken / missing).unlink()
        (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "MarianTokenizer"}', encoding="utf-8")
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
            AutoTokenizer.from_pretrained(broken)
        with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
            MarianTokenizer.from_pretrained(broken)


def test_bad_arguments(pair) -> None:
    ours, _ = pair
    with pytest.raises(ValueError, match="text_target"):
        ours()
    with pytest.raises(ValueError, match="max_length"):
        ours(SOURCE[:2], padding="max_length")
    with pytest.raises(ValueError, match="return_tensors"):
        ours(SOURCE[:2], return_tensors="tf")
    with pytest.raises(ValueError, match="padding=True"):
        ours(SOURCE[:2], return_tensors="pt")
    with pytest.raises(ValueError, match="no room"):
        ours(SOURCE[:2], truncation=True, max_length=0)
    assert not isinstance(ours, Tokenizer)  # a class of its own: two SentencePiece models, not one backend


def test_tokenizer_class_points_to_marian(marian_dir: Path) -> None:
    with pytest.raises(ValueError, match="MarianTokenizer"):
        Tokenizer.from_pretrained(marian_dir)
