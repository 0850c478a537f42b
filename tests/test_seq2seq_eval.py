"""Evaluation that generates (issue 12, item 4), as transformers' Seq2SeqTrainer: with predict_with_generate the
Trainer hands model.generate ids (padded with the pad id) to compute_metrics and still reports the forward pass's
eval_loss; encoder-decoders get DataCollatorForSeq2Seq by default; the new arguments are validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import MarianMTModel
from lmforge.constants import IGNORE_INDEX
from lmforge.data import DataCollatorForSeq2Seq
from lmforge.models.seq2seq import MarianConfig
from lmforge.training import EvalPrediction, Trainer, TrainingArguments
from lmforge.training.textgen import bleu

SIZES = dict(vocab_size=61, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
             dropout=0.0, attention_dropout=0.0, pad_token_id=60, decoder_start_token_id=60,
             eos_token_id=0)  # fmt: skip
PAD, EOS = 60, 0
MAX_LENGTH = 9  # the decoder start + up to 8 new tokens


def copy_examples(n: int, offset: int = 0) -> list[dict[str, list[int]]]:
    """A copy task whose sources (and so targets) differ in length within a batch."""
    rows = []
    for i in range(offset, offset + n):
        ids = [(i * 7 + 3 * j) % 50 + 3 for j in range(2 + i % 4)] + [EOS]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def arguments(tmp_path: Path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, per_device_eval_batch_size=3,
                learning_rate=1e-2, logging_steps=10, eval_strategy="no", save_steps=None, save_total_limit=None,
                report_to="none", disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> MarianMTModel:
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(**SIZES))
    trainer = Trainer(model, arguments(tmp_path_factory.mktemp("train")), copy_examples(32))
    trainer.train()
    return model.eval()


def expected_generation(model: MarianMTModel, data: list[dict[str, list[int]]], num_beams: int) -> torch.Tensor:
    """model.generate on each eval batch of 3 (sources only), padded with the pad id to one width."""
    collate = DataCollatorForSeq2Seq(model=model)
    parts = []
    for start in range(0, len(data), 3):
        batch = collate([{"input_ids": ex["input_ids"]} for ex in data[start : start + 3]])
        with torch.no_grad():
            parts.append(model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        max_new_tokens=MAX_LENGTH - 1, num_beams=num_beams))  # fmt: skip
    width = max(p.size(1) for p in parts)
    return torch.cat([F.pad(p, (0, width - p.size(1)), value=PAD) for p in parts])


def decode(ids: Any) -> list[str]:
    """Ids -> space-joined text, without the decoder start, padding, -100 and what follows EOS."""
    texts = []
    for row in ids.tolist():
        words = []
        for t in row:
            if t == EOS:
                break
            if t not in (PAD, IGNORE_INDEX):
                words.append(str(t))
        texts.append(" ".join(words))
    return texts


@pytest.mark.parametrize("beams", [None, 2])
def test_predict_with_generate(trained: MarianMTModel, tmp_path: Path, beams: int | None) -> None:
    data = copy_examples(8, offset=100)  # 3 eval batches (3, 3, 2) of ragged lengths
    seen: list[EvalPrediction] = []

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        seen.append(p)
        return {"bleu": bleu(decode(p.predictions), decode(p.label_ids))}

    args = arguments(tmp_path, predict_with_generate=True, generation_max_length=MAX_LENGTH,
                     generation_num_beams=beams)  # fmt: skip
    trainer = Trainer(trained, args, eval_dataset=data, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    want = expected_generation(trained, data, num_beams=beams or 1)
    got = torch.from_numpy(seen[0].predictions)
    assert torch.equal(got, want)  # the same generate calls on the same sources: identical ids
    assert (want[:, 1:] != PAD).any() and decode(want) != decode(expected_generation(trained, data, 3 - (beams or 1)))
    labels = seen[0].label_ids
    assert labels.shape[0] == len(data) and all(row[: len(ex["labels"])].tolist() == ex["labels"]
                                                 for row, ex in zip(labels, data))  # fmt: skip
    hyps, refs = decode(seen[0].predictions), [" ".join(map(str, ex["labels"][:-1])) for ex in data]
    assert metrics["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    # the loss comes from the same forward pass as without generation
    plain = Trainer(trained, arguments(tmp_path), eval_dataset=data).evaluate()
    assert metrics["eval_loss"] == plain["eval_loss"]
    # predict() hands back the same ids
    assert torch.equal(torch.from_numpy(trainer.predict(data).predictions), want)


def test_generation_sees_no_labels(trained: MarianMTModel, tmp_path: Path) -> None:
    """The same sources with other targets generate the same ids: the labels never reach generate."""
    data = copy_examples(6, offset=200)
    other = [{"input_ids": ex["input_ids"], "labels": [5, 6, 7, EOS]} for ex in data]
    args = arguments(tmp_path, predict_with_generate=True, generation_max_length=MAX_LENGTH)
    first, second = (Trainer(trained, args).predict(d).predictions for d in (data, other))
    assert (first == second).all()


def test_default_collator_for_encoder_decoders(tmp_path: Path) -> None:
    model = MarianMTModel(MarianConfig(**SIZES))
    trainer = Trainer(model, arguments(tmp_path, max_steps=2), copy_examples(8))
    assert isinstance(trainer.data_collator, DataCollatorForSeq2Seq)
    batch = trainer.data_collator(copy_examples(3))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
    assert (batch["decoder_input_ids"][:, 0] == SIZES["decoder_start_token_id"]).all()
    trainer.train()  # the default collator's batches train


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"predict_with_generate": "yes"}, "predict_with_generate must be true or false"),
        ({"generation_max_length": 1}, "generation_max_length must be an integer >= 2"),
        ({"generation_max_length": 8.0}, "generation_max_length must be an integer >= 2"),
        ({"generation_max_length": True}, "generation_max_length must be an integer >= 2"),
        ({"generation_num_beams": 0}, "generation_num_beams must be a positive integer or None"),
        ({"generation_num_beams": 1.5}, "generation_num_beams must be a positive integer or None"),
    ],
)
def test_generation_arguments_validated(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainingArguments(**kw)


def test_predict_with_generate_needs_generate(tmp_path: Path) -> None:
    class NoGenerate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.linear(input_ids.float())

    with pytest.raises(ValueError, match="needs a model with generate"):
        Trainer(NoGenerate(), arguments(tmp_path, predict_with_generate=True))
