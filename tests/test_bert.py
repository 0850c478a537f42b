"""BERT against transformers' BERT (test-only oracle): every head, both directions through checkpoints,
padding, the masked-LM loss, key-map details (fused qkv, legacy names, base-model files) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import BertConfig as HFBertConfig

from lmforge import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from lmforge.hub import KeyRule, load_hf_state_dict, to_hf_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 40, 7
SIZES = dict(
    vocab_size=V,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = [
    BertModel,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertForQuestionAnswering,
]


def tiny_config(cls: type | None = None, **overrides) -> BertConfig:
    labels = 2 if cls is BertForQuestionAnswering else 3  # question answering: start and end
    return BertConfig(**{**SIZES, **NO_DROPOUT, "num_labels": labels, **overrides})


def hf_config(cls: type | None = None, **overrides) -> HFBertConfig:
    labels = 2 if cls is BertForQuestionAnswering else 3
    return HFBertConfig(**{**SIZES, **NO_DROPOUT, "num_labels": labels, **overrides})


def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights far from the init (LayerNorms included), so that outputs are clear-cut."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    """Three right-padded rows of 7, 5 and 2 real tokens (id 0 = [PAD]), two segments each."""
    torch.manual_seed(1)
    ids = torch.randint(1, V, (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for row, n in enumerate((7, 5, 2)):
        mask[row, :n] = 1
    ids = ids * mask
    token_type_ids = (torch.arange(T) >= 3).long().expand(3, T) * mask
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids)


def labels_for(cls: type) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    mlm = torch.full((3, T), -100)
    mlm[0, 1], mlm[0, 5], mlm[1, 2], mlm[2, 0] = 3, 7, 11, 30
    return {
        BertModel: {},
        BertForMaskedLM: dict(labels=mlm),
        BertForPreTraining: dict(labels=mlm, next_sentence_label=torch.tensor([0, 1, 1])),
        BertForSequenceClassification: dict(labels=torch.tensor([2, 0, 1])),
        BertForTokenClassification: dict(
            labels=torch.randint(0, 3, (3, T)).masked_fill(batch()["attention_mask"] == 0, -100)
        ),
        BertForQuestionAnswering: dict(
            start_positions=torch.tensor([1, 3, 0]),  # 50: outside, clamped + ignored
            end_positions=torch.tensor([4, 50, 1]),
        ),
    }[cls]


def outputs(model: torch.nn.Module, cls: type, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """The outputs to compare, by name, from lmforge's or transformers' model."""
    with torch.no_grad():
        out = model(**batch(), **(labels_for(cls) if with_labels else {}))
    names = {
        BertModel: ("last_hidden_state", "pooler_output"),
        BertForPreTraining: ("loss", "prediction_logits", "seq_relationship_logits"),
        BertForQuestionAnswering: ("loss", "start_logits", "end_logits"),
    }.get(cls, ("loss", "logits"))
    return {n: getattr(out, n) for n in names if not (n == "loss" and not with_labels)}


def hf_load(cls: type, path: Path) -> torch.nn.Module:
    hf, info = getattr(transformers, cls.__name__).from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_lmforge_checkpoint_loads_in_transformers_with_identical_outputs(tmp_path: Path, cls: type) -> None:
    ours = spread(cls(tiny_config(cls)))
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == [cls.__name__]
    hf = hf_load(cls, tmp_path)
    expected, got = outputs(hf, cls), outputs(ours, cls)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_transformers_checkpoint_loads_in_lmforge_with_identical_outputs(tmp_path: Path, cls: type) -> None:
    torch.manual_seed(3)
    hf = spread(getattr(transformers, cls.__name__)(hf_config(cls)), seed=4)
    hf.save_pretrained(tmp_path)
    ours = cls.from_pretrained(tmp_path)
    assert isinstance(ours, cls) and not ours.training
    expected, got = outputs(hf, cls), outputs(ours, cls)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("regression", torch.tensor([[0.5], [-1.0], [2.0]])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])),
    ],
)
def test_sequence_classification_problem_types_match_transformers(
    tmp_path: Path, problem_type: str, labels: torch.Tensor
) -> None:
    num_labels = labels.size(1)
    ours = spread(BertForSequenceClassification(tiny_config(num_labels=num_labels)))
    ours.save_pretrained(tmp_path)
    hf = hf_load(BertForSequenceClassification, tmp_path)
    labels = labels.squeeze(1) if num_labels == 1 else labels
    with torch.no_grad():
        got = ours(**batch(), labels=labels)
        expected = hf(**batch(), labels=labels)
    assert hf.config.problem_type == problem_type  # inferred the same way on both sides
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_match_transformers(tmp_path: Path) -> None:
    ours = spread(BertModel(tiny_config()))
    ours.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = ours(**batch(), output_hidden_states=True, output_attentions=True)
        expected = hf(**batch(), output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == 3 and len(got.attentions) == 2
    for a, b in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert got.attentions[0][2, :, :, 2:].abs().max() == 0  # no weight on padding


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM, BertForTokenClassification], ids=lambda c: c.__name__)
def test_padding_never_changes_a_sentences_outputs(cls: type) -> None:
    model = spread(cls(tiny_config()))
    inputs = batch()
    with torch.no_grad():
        padded = model(**inputs)
        for row, n in enumerate(inputs["attention_mask"].sum(-1).tolist()):
            alone = model(**{k: v[row : row + 1, :n] for k, v in inputs.items()})
            if cls is BertModel:
                torch.testing.assert_close(
                    alone.last_hidden_state[0], padded.last_hidden_state[row, :n], atol=1e-5, rtol=0
                )
                torch.testing.assert_close(alone.pooler_output[0], padded.pooler_output[row], atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(alone.logits[0], padded.logits[row, :n], atol=1e-5, rtol=0)


def test_masked_lm_loss_by_hand_and_only_scored_positions_in_training() -> None:
    model = spread(BertForMaskedLM(tiny_config()))
    labels = labels_for(BertForMaskedLM)["labels"]
    with torch.no_grad():
        full = model(**batch())
        assert full.loss is None and full.logits.shape == (3, T, V)
        scored = labels != -100  # 4 positions
        by_hand = torch.stack(
            [-F.log_softmax(full.logits[b, t], -1)[labels[b, t]] for b, t in scored.nonzero().tolist()]
        ).mean()
        evaluated = model(**batch(), labels=labels)
        torch.testing.assert_close(evaluated.loss, by_hand, atol=1e-6, rtol=0)
        assert evaluated.logits.shape == (3, T, V)
        model.train()  # no dropout in this config: training differs only in what is projected
        trained = model(**batch(), labels=labels)
        assert trained.logits.shape == (4, V)
        torch.testing.assert_close(trained.logits, full.logits[scored], atol=1e-6, rtol=0)
        torch.testing.assert_close(trained.loss, by_hand, atol=1e-6, rtol=0)
        assert model(**batch(), labels=torch.full((3, T), -100)).loss.item() == 0.0  # nothing scored: 0, not NaN
        model.eval()
        assert model(**batch(), labels=torch.full((3, T), -100)).loss.item() == 0.0
    assert BertForMaskedLM.num_loss_items(labels) == 4


def test_decoder_is_tied_to_the_word_embedding_and_not_saved(tmp_path: Path) -> None:
    model = BertForMaskedLM(tiny_config())
    assert model.lm_head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "cls.predictions.decoder.weight" not in names and "cls.predictions.bias" in names
    assert "bert.encoder.layer.1.attention.self.value.weight" in names and not any("qkv" in n for n in names)
    loaded = BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    untied = BertForMaskedLM(tiny_config(tie_word_embeddings=False))
    assert "cls.predictions.decoder.weight" in to_hf_state_dict(untied)


def test_fused_rule_concatenates_on_load_and_splits_on_save() -> None:
    rule = KeyRule(
        "layers.{i}.attn.qkv.weight", "encoder.layer.{i}.attention.self.{part}.weight", parts=("query", "key", "value")
    )
    assert rule.to_hf("layers.3.attn.qkv.weight") == [
        f"encoder.layer.3.attention.self.{p}.weight" for p in ("query", "key", "value")
    ]
    assert rule.from_hf("encoder.layer.3.attention.self.key.weight") == ("layers.3.attn.qkv.weight", 1)
    assert rule.from_hf("encoder.layer.3.attention.self.other.weight") is None
    assert rule.match("encoder.layer.3.attention.self.value.weight", ours=False) == "layers.3.attn.qkv.weight"
    model = BertModel(tiny_config())
    hf = to_hf_state_dict(model)
    qkv = model.layers[0].attn.qkv.weight
    torch.testing.assert_close(hf["encoder.layer.0.attention.self.key.weight"], qkv[16:32])
    other = BertModel(tiny_config())
    load_hf_state_dict(other, hf)
    assert torch.equal(other.layers[0].attn.qkv.weight, qkv) and torch.equal(
        other.layers[1].attn.qkv.bias, model.layers[1].attn.qkv.bias
    )


def test_legacy_gamma_beta_and_decoder_bias_names_load(tmp_path: Path) -> None:
    hf = spread(transformers.BertForMaskedLM(hf_config()))
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    legacy["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()  # older files hold both
    legacy["bert.embeddings.position_ids"] = torch.arange(16)[None]  # and a buffer
    assert "bert.embeddings.LayerNorm.gamma" in legacy
    save_file(legacy, str(tmp_path / "model.safetensors"))
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    torch.testing.assert_close(
        outputs(ours, BertForMaskedLM)["logits"], outputs(hf, BertForMaskedLM)["logits"], atol=1e-5, rtol=0
    )
    legacy["cls.predictions.decoder.bias"] = legacy["cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match="different values"):
        load_hf_state_dict(BertForMaskedLM(tiny_config()), legacy)


def test_base_bert_checkpoint_loads_into_bert_model_and_heads(tmp_path: Path) -> None:
    hf = spread(transformers.BertModel(hf_config()))  # e.g. a sentence-transformers encoder: no "bert." prefix
    hf.save_pretrained(tmp_path)
    assert not any(k.startswith("bert.") for k in load_file(str(tmp_path / "model.safetensors")))
    ours = AutoModel.from_pretrained(tmp_path)
    assert isinstance(ours, BertModel)
    for name, tensor in outputs(hf, BertModel).items():
        torch.testing.assert_close(outputs(ours, BertModel)[name], tensor, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="freshly initialised"):  # the trunk loads; the head is new
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert isinstance(classifier, BertForSequenceClassification) and classifier.num_labels == 5
    assert torch.equal(classifier.bert.pooler.weight, ours.pooler.weight)  # the checkpoint's pooler is kept
    assert classifier.classifier.bias.abs().max() == 0
    with pytest.warns(UserWarning, match="freshly initialised"):
        mlm = BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(mlm.lm_head.ln.weight, torch.ones(16))  # a fresh LayerNorm is 1 / 0


def test_head_checkpoint_loads_into_bert_model_without_its_heads(tmp_path: Path) -> None:
    hf = spread(transformers.BertForPreTraining(hf_config()))
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="another task"):
        ours = BertModel.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = hf.bert(**batch())
    torch.testing.assert_close(outputs(ours, BertModel)["pooler_output"], expected.pooler_output, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="another task"):  # the pooler and cls heads are left out
        tokens = BertForTokenClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(tokens.bert(**batch()).last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)


def test_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    state = to_hf_state_dict(BertForMaskedLM(tiny_config()))
    missing = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"missing \['bert.layers.1.attn.qkv.bias'\].*its key part"):
        load_hf_state_dict(BertForMaskedLM(tiny_config()), missing)
    with pytest.raises(ValueError, match=r"unexpected \[.bert.layers.9.mlp.proj.bias"):
        load_hf_state_dict(
            BertForMaskedLM(tiny_config()), {**state, "bert.encoder.layer.9.output.dense.bias": torch.zeros(16)}
        )
    with pytest.raises(ValueError, match=r"bert.layers.0.mlp.fc.weight has shape \(32, 16\).*\(64, 16\)"):
        load_hf_state_dict(BertForMaskedLM(tiny_config(intermediate_size=64)), state)
    bad = dict(state)
    bad["bert.encoder.layer.0.attention.self.value.weight"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match="must agree"):
        load_hf_state_dict(BertForMaskedLM(tiny_config()), bad)
    with pytest.raises(ValueError, match="missing"):  # fewer layers in the checkpoint than the config
        load_hf_state_dict(BertForMaskedLM(tiny_config(num_hidden_layers=3)), state)


def test_config_reads_transformers_config_json_and_auto_classes_dispatch(tmp_path: Path) -> None:
    hf_config(num_labels=2, id2label={0: "neg", 1: "pos"}).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, BertConfig) and config.num_labels == 2 and config.id2label == {0: "neg", 1: "pos"}
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12 and config.hidden_size == 16
    assert BertConfig.from_dict(config.to_dict()) == config
    assert config.updated(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    with pytest.raises(TypeError, match="BertConfig has no option"):
        config.updated(n_embd=3)
    for key, value in (("position_embedding_type", "relative_key"), ("is_decoder", True)):
        with pytest.raises(ValueError, match=key):
            BertConfig.from_dict({**config.to_dict(), key: value})
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)
    defaults = BertConfig()
    assert (
        defaults.vocab_size,
        defaults.hidden_size,
        defaults.num_hidden_layers,
        defaults.intermediate_size,
        defaults.max_position_embeddings,
        defaults.pad_token_id,
    ) == (30522, 768, 12, 3072, 512, 0)
    for auto, cls in (
        (AutoModel, BertModel),
        (AutoModelForMaskedLM, BertForMaskedLM),
        (AutoModelForSequenceClassification, BertForSequenceClassification),
        (AutoModelForTokenClassification, BertForTokenClassification),
        (AutoModelForQuestionAnswering, BertForQuestionAnswering),
    ):
        assert type(auto.from_config(tiny_config(cls))) is cls
    with pytest.raises(ValueError, match="num_labels=2"):
        BertForQuestionAnswering(tiny_config(num_labels=3))


def test_question_answering_loss_ignores_positions_outside_the_input() -> None:
    model = spread(BertForQuestionAnswering(tiny_config(BertForQuestionAnswering)))
    with torch.no_grad():
        out = model(**batch(), start_positions=torch.tensor([[1], [3], [0]]), end_positions=torch.tensor([4, 50, 1]))
    start = F.cross_entropy(out.start_logits, torch.tensor([1, 3, 0]))
    end = F.cross_entropy(out.end_logits[[0, 2]], torch.tensor([4, 1]))  # row 1's end (50) is ignored
    torch.testing.assert_close(out.loss, (start + end) / 2, atol=1e-6, rtol=0)
