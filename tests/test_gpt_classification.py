"""GPTForSequenceClassification against transformers' GPT2ForSequenceClassification (test-only oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2ForSequenceClassification as HFClassifier

from lmforge import (
    AutoConfig,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    GPTConfig,
    GPTForCausalLM,
    GPTForSequenceClassification,
)

V, PAD = 50, 49


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16, pad_token_id=PAD, num_labels=3)
    return GPTConfig(**{**kw, **overrides})


def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights far from the init, so that outputs are clear-cut."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 7, 4 and 1 real tokens (never PAD), padded on `side`."""
    torch.manual_seed(1)
    ids = torch.full((3, 7), PAD)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate((7, 4, 1)):
        cols = slice(0, n) if side == "right" else slice(7 - n, 7)
        ids[row, cols] = torch.randint(0, PAD, (n,))
        mask[row, cols] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens numbered from 0 in each row: lmforge's default under left padding. transformers' plain
    forward numbers the padding too (only its generate() does this), so the comparisons pass them to both."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def hf_logits(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hf, info = HFClassifier.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return hf.eval()(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_both_ways(tmp_path: Path, side: str) -> None:
    ids, mask = batch(side)
    # lmforge -> transformers
    ours = spread(GPTForSequenceClassification(tiny_config()))
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, hf_logits(tmp_path / "ours", ids, mask), atol=1e-5, rtol=0)
    # transformers -> lmforge
    torch.manual_seed(2)
    hf = spread(
        HFClassifier(
            HFGPT2Config(
                vocab_size=V,
                n_positions=16,
                n_embd=16,
                n_layer=2,
                n_head=2,
                num_labels=4,
                pad_token_id=PAD,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        ),
        seed=3,
    )
    hf.save_pretrained(tmp_path / "hf")
    loaded = GPTForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert loaded.num_labels == 4 and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits,  # lmforge's default positions
            hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits,
            atol=1e-5,
            rtol=0,
        )


def test_pooling_is_the_last_real_token_and_needs_a_pad_token_for_batches(tmp_path: Path) -> None:
    model = spread(GPTForSequenceClassification(tiny_config()))
    ids, _ = batch("left")
    assert model.last_token_index(ids).tolist() == [6, 6, 6]
    ids, _ = batch("right")
    assert model.last_token_index(ids).tolist() == [6, 3, 0]
    assert model.last_token_index(torch.full((1, 5), PAD)).tolist() == [0]  # all padding: transformers' 0
    # no pad token: one row uses its last position (as transformers does), a batch is an error
    model = spread(GPTForSequenceClassification(tiny_config(pad_token_id=None)))
    model.save_pretrained(tmp_path)
    one = ids[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(one).logits, hf_logits(tmp_path, one, torch.ones_like(one)), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="needs config.pad_token_id"):
            model(ids)


@pytest.mark.parametrize(
    "num_labels,problem_type,labels",
    [
        (1, None, torch.tensor([0.5, -1.0, 2.0])),
        (3, "regression", torch.randn(3, 3)),
        (3, None, torch.tensor([2, 0, -100])),
        (3, None, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])),
    ],
)
def test_loss_matches_transformers(
    tmp_path: Path, num_labels: int, problem_type: str | None, labels: torch.Tensor
) -> None:
    ids, mask = batch("right")
    model = spread(GPTForSequenceClassification(tiny_config(num_labels=num_labels, problem_type=problem_type)))
    model.save_pretrained(tmp_path)
    hf = HFClassifier.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels).loss
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert model.config.problem_type == problem_type  # inferred per call, the config is left alone


def test_classifier_from_a_causal_lm_checkpoint_gets_a_fresh_head(tmp_path: Path) -> None:
    lm = spread(GPTForCausalLM(tiny_config(n_embd=64, n_head=4)))
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"has no score\.weight.*score\.weight of shape \(3, 64\).*freshly"):
        clf = GPTForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.config.num_labels == 3 and clf.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    head = clf.score.weight
    assert head.shape == (3, 64) and 0.014 < head.std().item() < 0.026 and head.abs().mean() > 0
    for name, tensor in lm.transformer.state_dict().items():
        assert torch.equal(clf.transformer.state_dict()[name], tensor), name
    # the other way: the causal LM ignores the classifier's head, with a warning
    clf.save_pretrained(tmp_path / "clf")
    with pytest.warns(UserWarning, match=r"\['score\.weight'\].*GPTForCausalLM does not use"):
        back = GPTForCausalLM.from_pretrained(tmp_path / "clf")
    assert torch.equal(back.transformer.wte.weight, lm.transformer.wte.weight)


def test_a_head_of_another_size_is_replaced_with_a_warning(tmp_path: Path) -> None:
    clf = spread(GPTForSequenceClassification(tiny_config(num_labels=2)))
    clf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"score\.weight of shape \(2, 16\).*score\.weight of shape \(5, 16\)"):
        wider = GPTForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert wider.score.weight.shape == (5, 16) and wider.config.id2label[4] == "LABEL_4"
    assert wider.score.weight.std() < 0.05  # freshly drawn, not the spread-out checkpoint weights
    assert torch.equal(wider.transformer.h[1].mlp.fc.weight, clf.transformer.h[1].mlp.fc.weight)
    # the same size loads as it is, silently
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = GPTForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert torch.equal(same.score.weight, clf.score.weight)
    # the trunk is still checked strictly
    with pytest.raises(ValueError, match="n_embd|shape|does not match"):
        GPTForSequenceClassification.from_pretrained(tmp_path, n_layer=3)


def test_label_maps_round_trip_through_config_json(tmp_path: Path) -> None:
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = tiny_config(num_labels=None, id2label=labels, problem_type="single_label_classification")
    assert config.num_labels == 3 and config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    GPTForSequenceClassification(config).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"} and "num_labels" not in d
    assert d["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert d["problem_type"] == "single_label_classification"
    loaded = GPTConfig.from_pretrained(tmp_path)
    assert loaded.id2label == labels and loaded.num_labels == 3 and loaded == config
    hf = HFGPT2Config.from_pretrained(tmp_path)
    assert hf.id2label == labels and hf.label2id == config.label2id and hf.num_labels == 3
    assert hf.problem_type == "single_label_classification"
    # a new label map given at load time brings its inverse and its size
    with pytest.warns(UserWarning, match="freshly"):
        two = GPTForSequenceClassification.from_pretrained(tmp_path, id2label={0: "no", 1: "yes"})
    assert two.config.label2id == {"no": 0, "yes": 1} and two.num_labels == 2
    with pytest.raises(ValueError, match="num_labels=2 but id2label has 3 entries"):
        GPTConfig(num_labels=2, id2label=labels)


def test_auto_model_for_sequence_classification(tmp_path: Path) -> None:
    GPTForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="freshly"):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert isinstance(model, GPTForSequenceClassification) and model.num_labels == 4
    assert GPT2ForSequenceClassification is GPTForSequenceClassification
    config = AutoConfig.from_pretrained(tmp_path, num_labels=4)
    assert config.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert isinstance(AutoModelForSequenceClassification.from_config(config), GPTForSequenceClassification)
    with pytest.raises(TypeError, match="unknown option 'num_lables'"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_lables=4)
