"""question-answering: the span of the context that best answers the question (extractive QA).

    {"question": q, "context": c}  or  question=q, context=c
        -> {"score", "start", "end", "answer"}        (start/end: character offsets; answer == c[start:end])
    top_k=3 -> a list of the 3 best, best first;  a list of inputs -> a list of those

A context too long for the model is cut into overlapping chunks (`doc_stride` tokens of overlap, by
`lmforge.data.prepare_qa_features`); the spans are scored and chosen by `lmforge.data.qa_spans` (the decoder
that `lmforge finetune qa` evaluates with): P(start) * P(end) in each chunk, at most `max_answer_len` tokens,
the best of all chunks; with `handle_impossible_answer` the no-answer ([CLS]) competes and wins as "" at 0..0.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.data import prepare_qa_features
from lmforge.data.qa_spans import MAX_ANSWER_LEN, QAChunk, decode_answers
from lmforge.models.bert import BertForQuestionAnswering
from lmforge.pipelines.base import Feature, Pipeline, check_model_kind


class QuestionAnsweringPipeline(Pipeline):
    """Answer questions from a context with BertForQuestionAnswering.

    Options: `top_k` (1), `max_answer_len` (15 tokens), `max_seq_len` (tokens per chunk; default
    min(384, the model's length)), `doc_stride` (overlap of chunks; default min(128, half the room the
    question leaves)), `handle_impossible_answer` (False), `align_to_words` (True: a span that starts or
    ends inside a word grows to the whole word).
    """

    task = "question-answering"
    single_types = (dict,)

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["BertForQuestionAnswering"],
            lambda m: isinstance(m, BertForQuestionAnswering),
            "load it with AutoModelForQuestionAnswering.from_pretrained(path)",
        )

    def _input_kinds(self) -> str:
        return 'a {"question": ..., "context": ...} dict (or question=..., context=...)'

    def __call__(
        self,
        inputs: Any = None,
        *,
        question: str | list[str] | None = None,
        context: str | list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Answer one {"question", "context"} dict, a list or iterator of them, or `question=`/`context=`
        (two str, two lists of the same length, or one question for a list of contexts)."""
        if question is not None or context is not None:
            if inputs is not None:
                raise TypeError(
                    "question-answering: pass the inputs either as dicts or as question=/context=, not both"
                )
            if question is None or context is None:
                raise ValueError("question-answering needs both question=... and context=...")
            inputs = self._pair_up(question, context)
        elif inputs is None:
            raise TypeError(
                "question-answering needs inputs: {'question': ..., 'context': ...} or question=..., context=..."
            )
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _pair_up(question: Any, context: Any) -> Any:
        if isinstance(question, str) and isinstance(context, str):
            return {"question": question, "context": context}
        if isinstance(context, (list, tuple)):
            questions = [question] * len(context) if isinstance(question, str) else question
            if not isinstance(questions, (list, tuple)) or len(questions) != len(context):
                raise ValueError(
                    "question-answering: question= and context= must be two str, two lists of the same "
                    "length, or one question str for a list of contexts"
                )
            return [{"question": q, "context": c} for q, c in zip(questions, context)]
        raise ValueError(
            "question-answering: question= and context= must be two str, two lists of the same length, "
            "or one question str for a list of contexts"
        )

    def _options(
        self,
        top_k: int = 1,
        max_answer_len: int = MAX_ANSWER_LEN,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool = True,
    ) -> dict[str, Any]:
        for name, value in (("top_k", top_k), ("max_answer_len", max_answer_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if doc_stride is not None and (
            isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 0
        ):
            raise ValueError(f"doc_stride must be an integer >= 0, got {doc_stride!r}")
        limit = self.model_max_length()
        return {
            "top_k": top_k,
            "max_answer_len": max_answer_len,
            "max_seq_len": self._limit(max_seq_len) if max_seq_len is not None else min(384, limit),
            "doc_stride": doc_stride,
            "handle_impossible_answer": bool(handle_impossible_answer),
            "align_to_words": bool(align_to_words),
        }

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        n_special = self.tokenizer.backend.num_special_tokens_to_add(True)
        features = []
        for k, item in enumerate(items):
            index = start + k
            if not isinstance(item, dict):
                raise TypeError(
                    f'{self.task}: input {index} is a {type(item).__name__}; pass {{"question": ..., "context": ...}}'
                )
            if "question" not in item or "context" not in item:
                raise ValueError(
                    f"{self.task}: input {index} has keys {sorted(item)}; it needs 'question' and 'context'"
                )
            question = self._check_text(item["question"], index, what="question of input")
            context = self._check_text(item["context"], index, what="context of input")
            room = opts["max_seq_len"] - n_special - len(self.tokenizer.encode(question.lstrip()))
            if room < 1:
                raise ValueError(
                    f"{self.task}: the question of input {index} leaves no room for the context in "
                    f"{opts['max_seq_len']} tokens; shorten the question or raise max_seq_len"
                )
            stride = opts["doc_stride"] if opts["doc_stride"] is not None else min(128, room // 2)
            if stride >= room:
                raise ValueError(
                    f"{self.task}: doc_stride={stride} must be smaller than the {room} context tokens "
                    f"a chunk of input {index} holds; lower doc_stride or raise max_seq_len"
                )
            chunks = prepare_qa_features(
                [{"question": question, "context": context, "id": index}],
                self.tokenizer,
                max_length=opts["max_seq_len"],
                doc_stride=stride,
            )
            rows = [
                {
                    key: chunk[key]
                    for key in ("input_ids", "token_type_ids")
                    if key == "input_ids" or key in self._forward_params
                }
                for chunk in chunks
            ]
            features.append(Feature(rows, {"context": context, "offsets": [c["offset_mapping"] for c in chunks]}))
        return features

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = self._collate(rows)
        out = self.model(**self._model_inputs(batch))
        starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()  # (B, T) each
        return [(s[: len(r["input_ids"])], e[: len(r["input_ids"])]) for s, e, r in zip(starts, ends, rows)]

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        cls_id = self.tokenizer.cls_token_id
        chunks = [
            QAChunk(
                offsets,
                start_logits,
                end_logits,
                null_index=row["input_ids"].index(cls_id) if cls_id in row["input_ids"] else None,
                word_ids=self._word_ids(row["input_ids"], offsets) if opts["align_to_words"] else None,
            )
            for row, offsets, (start_logits, end_logits) in zip(feature.rows, feature.meta["offsets"], outputs)
        ]
        spans = decode_answers(chunks, opts["top_k"], opts["max_answer_len"], opts["handle_impossible_answer"])
        context = feature.meta["context"]
        answers = [{"score": score, "start": s, "end": e, "answer": context[s:e]} for score, s, e in spans]
        return answers[0] if opts["top_k"] == 1 else answers

    def _word_ids(self, input_ids: list[int], offsets: list[Any]) -> list[int | None] | None:
        """The word of each context token (None elsewhere): WordPiece marks a word's later pieces with '##'.
        None for a tokenizer without such a mark (spans then stay as the tokens give them)."""
        prefix = getattr(self.tokenizer.backend.model, "continuing_subword_prefix", None)
        if not prefix:
            return None
        words: list[int | None] = []
        word = -1
        for token, span in zip(self.tokenizer.convert_ids_to_tokens(input_ids), offsets):
            if span is not None and not (token.startswith(prefix) and words and words[-1] is not None):
                word += 1
            words.append(word if span is not None else None)
        return words
