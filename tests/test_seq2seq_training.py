"""Training encoder-decoders (issue 12, item 4): the seq2seq collator against transformers'
DataCollatorForSeq2Seq, label smoothing against transformers' LabelSmoother and by hand, the Trainer with
label_smoothing_factor on a tiny Marian-shaped model, and the joint source-target BPE on the Bible pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.trainer_pt_utils import LabelSmoother

from lmforge import MarianMTModel
from lmforge.config import GPTConfig
from lmforge.constants import IGNORE_INDEX
from lmforge.data import DataCollatorForSeq2Seq, load_translation_pairs
from lmforge.models.gpt import GPTForCausalLM
from lmforge.models.seq2seq import MarianConfig, Seq2SeqConfig
from lmforge.nn.losses import smoothed_loss_sum, token_loss_sum
from lmforge.tokenizer import Tokenizer
from lmforge.training import Trainer, TrainingArguments

SIZES = dict(vocab_size=61, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
             dropout=0.0, attention_dropout=0.0, pad_token_id=60, decoder_start_token_id=60,
             eos_token_id=0)  # fmt: skip
# sums of the same float32 log-probabilities in a different order (F.cross_entropy vs gather + sum)
ATOL = 1e-5


def examples() -> list[dict[str, list[int]]]:
    """Source and target lengths that differ within and across examples."""
    return [
        {"input_ids": [5, 6, 7, 0], "attention_mask": [1, 1, 1, 1], "labels": [9, 10, 0]},
        {"input_ids": [8, 0], "attention_mask": [1, 1], "labels": [11, 12, 13, 14, 0]},
        {"input_ids": [3, 4, 5, 6, 7, 0], "attention_mask": [1, 1, 1, 1, 1, 1], "labels": [15, 0]},
    ]


@pytest.fixture(scope="module")
def bible_tokenizer() -> Tokenizer:
    train, _ = load_translation_pairs()
    return Tokenizer.train_translation_bpe(train[:3000], vocab_size=1000)


# ---- the collator ------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiple", [None, 4])
def test_collator_matches_transformers(bible_tokenizer: Tokenizer, tmp_path: Path, multiple: int | None) -> None:
    bible_tokenizer.save_pretrained(tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    hf_model = transformers.MarianMTModel(transformers.MarianConfig(**{**SIZES, "pad_token_id": 0,
                                                                       "decoder_start_token_id": 0}))  # fmt: skip
    # our config's defaults are the ids the joint tokenizer gives: pad = decoder start = 0
    ours = DataCollatorForSeq2Seq(bible_tokenizer, model=Seq2SeqConfig(), pad_to_multiple_of=multiple)
    theirs = transformers.DataCollatorForSeq2Seq(hf_tok, model=hf_model, pad_to_multiple_of=multiple)
    got, want = ours(examples()), theirs(examples())
    assert set(got) == set(want) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert (got["labels"] == IGNORE_INDEX).any()  # padding is never scored
    # without model=: no decoder inputs (the model shifts the labels itself); a missing mask is made of ones
    plain = DataCollatorForSeq2Seq(pad_token_id=0)([{k: v for k, v in ex.items() if k != "attention_mask"}
                                                    for ex in examples()])  # fmt: skip
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(plain["attention_mask"], ours(examples())["attention_mask"][:, : plain["input_ids"].size(1)])


def test_collator_errors() -> None:
    with pytest.raises(ValueError, match="pad id"):
        DataCollatorForSeq2Seq()
    with pytest.raises(ValueError, match="tokenize both sides"):
        DataCollatorForSeq2Seq(pad_token_id=0)([{"text": "hi", "labels": [1]}])


# ---- label smoothing ---------------------------------------------------------------------------------
def test_label_smoothing_matches_transformers_and_hand() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX
    eps, n = 0.1, int((labels != IGNORE_INDEX).sum())
    ours = token_loss_sum(logits, labels, eps) / n
    theirs = LabelSmoother(epsilon=eps)({"logits": logits}, labels)
    logp = logits.log_softmax(-1)[labels != IGNORE_INDEX]  # (n, V)
    target = labels[labels != IGNORE_INDEX]
    hand = ((1 - eps) * -logp.gather(1, target[:, None]).squeeze(1) + eps * -logp.mean(-1)).mean()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, hand, atol=ATOL, rtol=0)
    assert token_loss_sum(logits, labels, 0.0) == F.cross_entropy(  # eps = 0 is the plain loss
        logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def test_label_smoothing_shifts_for_causal_lm() -> None:
    """One smoothing for every head: a causal LM's labels are shifted first (LabelSmoother(shift_labels=True))."""
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=40, n_positions=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    ids = torch.randint(0, 40, (2, 9))
    labels = ids.clone()
    labels[1, 6:] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        ours = smoothed_loss_sum(model, batch, 0.1, model) / int((labels[:, 1:] != IGNORE_INDEX).sum())
        theirs = LabelSmoother(epsilon=0.1)(model(input_ids=ids), labels, shift_labels=True)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("value", [-0.1, 1.0, math.nan])
def test_label_smoothing_factor_validated(value: float) -> None:
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        TrainingArguments(label_smoothing_factor=value)


def tiny_marian() -> MarianMTModel:
    torch.manual_seed(0)
    return MarianMTModel(MarianConfig(**SIZES))


def test_trainer_label_smoothing(tmp_path: Path) -> None:
    data = [
        {"input_ids": [(i * 7 + j) % 50 + 3 for j in range(3 + i % 4)] + [0],
         "labels": [(i * 5 + 2 * j) % 50 + 3 for j in range(2 + i % 3)] + [0]}
        for i in range(16)
    ]  # fmt: skip
    model = tiny_marian()
    collate = DataCollatorForSeq2Seq(model=model)
    # transformers' Trainer with a LabelSmoother: labels popped, the collator's decoder inputs, mean over tokens
    batch = collate(data)
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = float(LabelSmoother(epsilon=0.2)(model(**batch), labels))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_steps=None,
                             save_total_limit=None, report_to="none", disable_tqdm=True,
                             label_smoothing_factor=0.2)  # fmt: skip
    trainer = Trainer(model, args, data, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(expected, abs=ATOL)  # the first step scores the initial weights
    assert losses[-1] < 0.8 * losses[0]  # it learns (smoothing keeps the loss well above 0)
    # the same run's first step without smoothing scores the unsmoothed loss: smoothing is what changed it
    plain = tiny_marian()
    with torch.no_grad():
        assert float(plain(**collate(data)).loss) != pytest.approx(expected, abs=1e-3)


# ---- the joint tokenizer -----------------------------------------------------------------------------
def test_translation_bpe_on_bible_pairs(bible_tokenizer: Tokenizer) -> None:
    config = Seq2SeqConfig()
    assert bible_tokenizer.pad_token_id == config.pad_token_id == config.decoder_start_token_id == 0
    assert bible_tokenizer.eos_token_id == config.eos_token_id == 1
    _, test = load_translation_pairs()
    for english, spanish in test[:50]:
        for text in (english, spanish):
            assert bible_tokenizer.decode(bible_tokenizer.encode(text)) == text
            ids = bible_tokenizer(text)["input_ids"]
            assert ids[-1] == 1 and bible_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "ñ" in bible_tokenizer.decode(bible_tokenizer.encode("año"))
    # one vocabulary for both sides: frequent words of each language are single tokens
    assert len(bible_tokenizer.encode(" the")) == 1 and len(bible_tokenizer.encode(" que")) == 1
