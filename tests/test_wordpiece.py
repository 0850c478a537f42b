"""Tests for Tokenizer.train_wordpiece: a BERT-style WordPiece tokenizer trained on a small mixed
English + Chinese corpus; transformers (test-only oracle) loads the saved directory."""

from __future__ import annotations

import random

import pytest
import transformers  # test-only oracle

from lmforge.tokenizer import Tokenizer

ENGLISH = [
    "To be, or not to be, that is the Question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die, to sleep;",
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "Now is the winter of our discontent",
    "Made glorious summer by this sun of York.",
]
CHINESE = [
    "床前明月光，疑是地上霜。",
    "举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。",
    "欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。",
]


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` lines mixing the English and Chinese verses (some lines hold both)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            lines.append(rng.choice(ENGLISH))
        elif kind == 1:
            lines.append(rng.choice(CHINESE))
        else:
            lines.append(f"{rng.choice(ENGLISH)} {rng.choice(CHINESE)}")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_wordpiece(iterator=corpus(), vocab_size=300, min_frequency=2)


def tokens(tok: Tokenizer, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text))


def test_special_tokens_roles_and_ids(tok):
    assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert "token_type_ids" in tok.model_input_names
    vocab = tok.get_vocab()
    assert any(t.startswith("##") for t in vocab), "no continuation pieces were learned"


def test_each_chinese_character_is_its_own_token(tok):
    text = "床前明月光"
    assert tokens(tok, text) == list(text)
    # glued to English: still split one character per token
    assert tokens(tok, "to be床前")[-2:] == ["床", "前"]


def test_unseen_character_becomes_unk_in_place(tok):
    assert tokens(tok, "床前龘月") == ["床", "前", "[UNK]", "月"]
    assert tokens(tok, "the ☃ sun") == ["the", "[UNK]", "sun"]


def test_lowercase_and_accents(tok):
    assert tokens(tok, "THE QUESTION") == tokens(tok, "the question")
    assert tokens(tok, "thé") == tokens(tok, "the")  # accents follow lowercase


def test_single_and_pair_templates(tok):
    single = tok("to be or not")
    ids = single["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert set(single["token_type_ids"]) == {0}

    enc = tok("to be or not", "床前明月光")
    ids, types = enc["input_ids"], enc["token_type_ids"]
    n_a, n_b = len(tok.encode("to be or not")), len(tok.encode("床前明月光"))
    assert len(ids) == n_a + n_b + 3
    assert ids[0] == tok.cls_token_id
    assert ids[n_a + 1] == tok.sep_token_id and ids[-1] == tok.sep_token_id
    assert types == [0] * (n_a + 2) + [1] * (n_b + 1)


def test_decode_joins_pieces(tok):
    text = "shall i compare thee to a summer's day?"
    assert tok.decode(tok.encode(text)) == "shall i compare thee to a summer ' s day?"


def test_save_and_reload_gives_same_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    for text in corpus(20, seed=1) + ["床前龘月 UNSEEN words ☃"]:
        assert again(text) == tok(text)
    assert again("to be", "明月")["token_type_ids"] == tok("to be", "明月")["token_type_ids"]
    assert again.mask_token_id == tok.mask_token_id


def test_transformers_loads_the_saved_directory(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for hf in (
        transformers.AutoTokenizer.from_pretrained(str(tmp_path)),
        transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path)),
    ):
        for text in corpus(20, seed=2) + ["床前龘月 UNSEEN words ☃"]:
            ours = tok(text)
            theirs = hf(text)
            assert theirs["input_ids"] == ours["input_ids"]
            assert theirs["token_type_ids"] == ours["token_type_ids"]
        pair_ours, pair_hf = tok("to be", "明月光"), hf("to be", "明月光")
        assert pair_hf["input_ids"] == pair_ours["input_ids"]
        assert pair_hf["token_type_ids"] == pair_ours["token_type_ids"]
        assert hf.mask_token == "[MASK]" and hf.pad_token_id == tok.pad_token_id


def test_lowercase_false_keeps_case():
    cased = Tokenizer.train_wordpiece(iterator=corpus(), vocab_size=300, min_frequency=2, lowercase=False)
    vocab = cased.get_vocab()
    assert "Question" in vocab or "Q" in vocab
    assert tokens(cased, "The") != tokens(cased, "the")
    assert "".join(t.removeprefix("##") for t in tokens(cased, "Question")) == "Question"


def test_trains_from_files(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    from_file = Tokenizer.train_wordpiece(files=path, vocab_size=300, min_frequency=2)
    # the lines of a file train exactly what an iterator over them trains, piece for piece and id for id
    with_endings = [line + "\n" for line in corpus()]
    assert from_file.get_vocab() == Tokenizer.train_wordpiece(iterator=with_endings, vocab_size=300).get_vocab()
    assert tokens(from_file, "床前龘月") == ["床", "前", "[UNK]", "月"]
    assert from_file.cls_token_id == 2 and "##s" in from_file.get_vocab()


def test_too_few_special_tokens_is_refused():
    with pytest.raises(ValueError, match="pad, unk, cls, sep, mask"):
        Tokenizer.train_wordpiece(iterator=corpus(), special_tokens=("[PAD]", "[UNK]"))


TRAIN_AND_PRINT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_wordpiece import corpus
from lmforge.tokenizer import Tokenizer
print(json.dumps(Tokenizer.train_wordpiece(iterator=corpus(), vocab_size=300, min_frequency=2).get_vocab()))
"""


def test_training_twice_learns_the_same_vocabulary():
    """tokenizers' own WordPieceTrainer numbers its ## symbols in hash-map order, which changes from one process to
    the next, and ranks merges of equal counts by those numbers: on this corpus two runs learn different pieces.
    Ours are the same in every process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    runs = [
        subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT, here], capture_output=True, text=True, check=True)
        for _ in range(3)
    ]
    vocabs = [json.loads(run.stdout) for run in runs]
    assert len(vocabs[0]) == 262 and vocabs[0] == vocabs[1] == vocabs[2]


def test_the_vocabulary_is_the_one_tokenizers_learns_where_no_tie_decides():
    """Where equally frequent merges do not compete (distinct counts), tokenizers' WordPieceTrainer is
    deterministic: the same pieces at the same ids, the same encodings, as ours."""
    from tokenizers import AddedToken, models, trainers

    from lmforge.tokenizer.backends import bert_wordpiece_backend

    lines = ["aaaa bbb cc d abab", "bab cdcd aab"] * 3 + ["ab ab ab ab dc"] * 2  # each merge count distinct
    ours = Tokenizer.train_wordpiece(iterator=lines, vocab_size=40, min_frequency=2)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = bert_wordpiece_backend(
        models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"),
        lowercase=True,
        strip_accents=None,
        handle_chinese_chars=True,
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=40,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    theirs = backend.get_vocab()
    assert set(ours.get_vocab()) == set(theirs)
    assert {t for t in theirs if t.startswith("##")} >= {"##a", "##b", "##c", "##d"}
    for text in lines + ["abcd dcba"]:
        assert ours.convert_ids_to_tokens(ours.encode(text)) == backend.encode(text, add_special_tokens=False).tokens


def test_private_use_characters_are_dropped_and_never_confused_with_inner_characters():
    """Training marks a word's inner characters with private-use symbols of planes 15-16. BERT's normalizer drops
    private-use characters from the text (training and encoding alike), so none can pass for such a symbol; a
    pipeline that kept them is refused."""
    from tokenizers import models, normalizers

    from lmforge.tokenizer.backends import bert_wordpiece_backend
    from lmforge.tokenizer.train import _wordpiece_vocab

    odd = ["odd\U000f0041 text \ue000", "odd text"] * 3
    tok = Tokenizer.train_wordpiece(iterator=odd, vocab_size=40, min_frequency=2)
    plain = Tokenizer.train_wordpiece(iterator=["odd text", "odd text"] * 3, vocab_size=40, min_frequency=2)
    assert tok.get_vocab() == plain.get_vocab() and "odd" in tok.get_vocab()
    assert tokens(tok, "odd\U000f0041 text") == ["odd", "text"]
    keeps = bert_wordpiece_backend(models.WordPiece(), lowercase=True, strip_accents=None, handle_chinese_chars=True)
    keeps.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match=r"private use planes 15-16 \(U\+F0041\).*remove such characters"):
        _wordpiece_vocab(keeps, odd, 40, 2, ["[PAD]", "[UNK]"], False)


def test_a_special_token_spelled_like_a_frequent_word_keeps_the_ids_contiguous():
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bos")
    tok = Tokenizer.train_wordpiece(iterator=["bos bos the bos", "bos the"] * 5, vocab_size=60, special_tokens=specials)
    vocab = tok.get_vocab()
    assert vocab["bos"] == 5 and sorted(vocab.values()) == list(range(len(vocab)))
    assert tokens(tok, "bos the") == ["bos", "the"]
