"""Tests for lmforge.data.mlm: BERT masking statistics and rules (MLMCollator), next-sentence
pairs (nsp_pairs), and one batch through a tiny BertForPreTraining."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmforge import BertConfig, BertForPreTraining
from lmforge.data import MLMCollator, nsp_pairs
from lmforge.tokenizer import Tokenizer

LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles and by opposing end them.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_wordpiece(iterator=LINES * 20, vocab_size=120, min_frequency=2)


def random_examples(tok: Tokenizer, n: int, max_len: int, seed: int) -> list[dict]:
    """``n`` examples [CLS] x... [SEP] y... [SEP] of random non-special ids and random lengths."""
    rng = random.Random(seed)
    specials = set(tok.all_special_ids)
    normal = [i for i in range(len(tok)) if i not in specials]
    examples = []
    for _ in range(n):
        la, lb = rng.randint(1, max_len // 2 - 2), rng.randint(1, max_len // 2 - 2)
        a = [rng.choice(normal) for _ in range(la)]
        b = [rng.choice(normal) for _ in range(lb)]
        examples.append(
            {
                "input_ids": [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id],
                "token_type_ids": [0] * (la + 2) + [1] * (lb + 1),
            }
        )
    return examples


def test_shapes_and_padding(tok):
    examples = [{"input_ids": [2, 10, 11, 3]}, {"input_ids": [2, 12, 3], "token_type_ids": [0, 0, 0]}]
    batch = MLMCollator(tok, seed=0, pad_to_multiple_of=8)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for value in batch.values():
        assert value.shape == (2, 8) and value.dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert (batch["input_ids"][0, 4:] == tok.pad_token_id).all()
    assert (batch["input_ids"][1, 3:] == tok.pad_token_id).all()
    assert (batch["token_type_ids"] == 0).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    no_multiple = MLMCollator(tok, seed=0)(examples)
    assert no_multiple["input_ids"].shape == (2, 4)


def test_masking_statistics(tok):
    examples = random_examples(tok, n=400, max_len=200, seed=0)
    batch = MLMCollator(tok, seed=1)(examples)
    special_ids = torch.tensor(sorted(set(tok.all_special_ids)))
    padded = torch.full_like(batch["input_ids"], tok.pad_token_id)
    for i, example in enumerate(examples):
        padded[i, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
    special = torch.isin(padded, special_ids)
    real = (batch["attention_mask"] == 1) & ~special
    assert int(real.sum()) >= 10_000

    chosen = batch["labels"] != -100
    # never a special token or padding; labels are the original ids exactly where chosen
    assert not (chosen & ~real).any()
    assert torch.equal(batch["labels"][chosen], padded[chosen])
    assert (batch["labels"][~chosen] == -100).all()
    # unchosen tokens are untouched
    assert torch.equal(batch["input_ids"][~chosen], padded[~chosen])

    fraction = chosen.sum().item() / real.sum().item()
    assert abs(fraction - 0.15) <= 0.01, fraction
    out, orig = batch["input_ids"][chosen], padded[chosen]
    n = len(out)
    masked = (out == tok.mask_token_id).sum().item() / n
    unchanged = (out == orig).sum().item() / n
    replaced = ((out != orig) & (out != tok.mask_token_id)).sum().item() / n
    assert abs(masked - 0.8) <= 0.02, masked
    assert abs(replaced - 0.1) <= 0.02, replaced
    assert abs(unchanged - 0.1) <= 0.02, unchanged
    # random replacements are never special tokens
    assert not torch.isin(out[(out != orig) & (out != tok.mask_token_id)], special_ids).any()


def test_seeded_collator_is_reproducible(tok):
    examples = random_examples(tok, n=8, max_len=40, seed=3)
    first = [MLMCollator(tok, seed=7)(examples) for _ in range(2)]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    collate = MLMCollator(tok, seed=7)
    a, b = collate(examples), collate(examples)  # the generator advances between batches
    assert not torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["labels"], first[0]["labels"])


def word_groups(tok: Tokenizer, ids: list[int]) -> list[list[int]]:
    """Positions of each word (a piece plus its following ## pieces), specials excluded."""
    tokens = tok.convert_ids_to_tokens(ids)
    special = set(tok.all_special_ids)
    groups: list[list[int]] = []
    for pos, (token_id, token) in enumerate(zip(ids, tokens)):
        if token_id in special:
            continue
        if token.startswith("##") and groups and groups[-1][-1] == pos - 1:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    return groups


def test_whole_word_masking_never_splits_a_word(tok):
    texts = [random.Random(i).choice(LINES) for i in range(300)]
    examples = [{"input_ids": tok(t)["input_ids"]} for t in texts]
    assert any(len(g) > 1 for e in examples[:5] for g in word_groups(tok, e["input_ids"]))
    batch = MLMCollator(tok, whole_word=True, seed=0)(examples)
    chosen_words = total_words = multi_piece_chosen = 0
    for i, example in enumerate(examples):
        row = batch["labels"][i]
        for group in word_groups(tok, example["input_ids"]):
            flags = {bool(row[p] != -100) for p in group}
            assert len(flags) == 1, f"word at {group} split: labels {row[group].tolist()}"
            total_words += 1
            chosen_words += flags.pop()
            multi_piece_chosen += len(group) > 1 and bool(row[group[0]] != -100)
        special = torch.isin(torch.tensor(example["input_ids"]), torch.tensor(tok.all_special_ids))
        assert (row[: len(example["input_ids"])][special] == -100).all()
    assert multi_piece_chosen > 0
    assert abs(chosen_words / total_words - 0.15) < 0.03


def test_next_sentence_label_passes_through_and_must_be_all_or_none(tok):
    examples = [
        {"input_ids": [2, 10, 3], "next_sentence_label": 1},
        {"input_ids": [2, 11, 3], "next_sentence_label": 0},
    ]
    batch = MLMCollator(tok, seed=0)(examples)
    assert batch["next_sentence_label"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="next_sentence_label"):
        MLMCollator(tok, seed=0)([examples[0], {"input_ids": [2, 11, 3]}])


def test_collator_errors(tok):
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(tok, mlm_probability=0.0)
    with pytest.raises(ValueError, match="empty list"):
        MLMCollator(tok)([])
    with pytest.raises(ValueError, match="token_type_ids"):
        MLMCollator(tok)([{"input_ids": [2, 10, 3], "token_type_ids": [0]}])
    no_mask = Tokenizer.train_wordpiece(iterator=LINES * 5, vocab_size=80)
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="mask_token"):
        MLMCollator(no_mask)


def synthetic_documents(n_docs: int, n_sentences: int) -> list[list[list[int]]]:
    """Documents whose token ids name them: document d, sentence s holds ids 1000*d + 10*s + k,
    so each id tells its document and position."""
    rng = random.Random(0)
    return [
        [[1000 * d + 10 * s + k for k in range(rng.randint(3, 6))] for s in range(n_sentences)]
        for d in range(1, n_docs + 1)
    ]


def split_pair(tok: Tokenizer, example: dict) -> tuple[list[int], list[int]]:
    ids, types = example["input_ids"], example["token_type_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    first_sep = ids.index(tok.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    return ids[1:first_sep], ids[first_sep + 1 : -1]


def test_nsp_pairs_labels_balance_and_sources(tok):
    documents = synthetic_documents(n_docs=100, n_sentences=48)
    pairs = nsp_pairs(documents, max_length=32, seed=0, tokenizer=tok)
    assert len(pairs) >= 1000
    labels = [p["next_sentence_label"] for p in pairs]
    assert abs(sum(labels) / len(labels) - 0.5) <= 0.05
    for pair in pairs:
        assert len(pair["input_ids"]) <= 32
        a, b = split_pair(tok, pair)
        assert a and b
        doc_a, doc_b = {t // 1000 for t in a}, {t // 1000 for t in b}
        assert len(doc_a) == 1 and len(doc_b) == 1
        if pair["next_sentence_label"] == 1:
            assert doc_a != doc_b, "a random 'not next' segment came from the same document"
        else:
            assert doc_a == doc_b
            # B starts with the sentence right after A's last one
            assert b[0] % 10 == 0 and (b[0] % 1000) // 10 == (a[-1] % 1000) // 10 + 1


def test_nsp_pairs_truncate_long_sentences(tok):
    documents = [[list(range(1000 * d, 1000 * d + 50)) for _ in range(3)] for d in (1, 2, 3)]
    pairs = nsp_pairs(documents, max_length=20, seed=1, tokenizer=tok)
    assert pairs and all(len(p["input_ids"]) == 20 for p in pairs)
    for pair in pairs:
        a, b = split_pair(tok, pair)
        assert a[-1] % 1000 == 49 and b[0] % 1000 == 0  # A keeps its end, B its start


def test_nsp_is_seeded(tok):
    documents = synthetic_documents(n_docs=5, n_sentences=10)
    assert nsp_pairs(documents, 24, 3, tok) == nsp_pairs(documents, 24, 3, tok)


def test_single_document_corpus_raises(tok):
    documents = synthetic_documents(n_docs=1, n_sentences=20)
    with pytest.raises(ValueError, match="at least two documents.*disable NSP"):
        nsp_pairs(documents, max_length=32, seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="at least two documents"):
        nsp_pairs(documents + [[[]]], max_length=32, seed=0, tokenizer=tok)  # empty doc: no text


def test_batch_runs_through_bert_for_pretraining(tok):
    torch.manual_seed(0)
    documents = [[tok.encode(line) for line in LINES[i:] + LINES[:i]] for i in range(len(LINES))]
    pairs = nsp_pairs(documents, max_length=48, seed=0, tokenizer=tok)
    batch = MLMCollator(tok, seed=0, pad_to_multiple_of=8)(pairs[:16])
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    model = BertForPreTraining(config)
    out = model(**batch)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
