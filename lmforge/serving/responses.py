"""OpenAI's Responses API (POST /v1/responses): the response object and the events of its stream.

A response here is one assistant message with one `output_text` part; nothing is stored (`store` is reported
false), so `previous_response_id` is refused and a conversation is sent whole in `input`. Streamed, the events
are OpenAI's, in OpenAI's order, each as `event: <type>` and `data: {...}` with a `sequence_number`:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per piece of text), response.output_text.done, response.content_part.done,
    response.output_item.done, then response.completed (or response.incomplete at max_output_tokens)

An error after the stream started is an `error` event, then `response.failed`. There is no `[DONE]` line: the
last event says the response is over.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lmforge.serving.schemas import APIError, ResponsesRequest

_JSON = json.JSONEncoder(ensure_ascii=False)  # Chinese text as UTF-8, not \\u escapes


class ResponseBuilder:
    """One response's objects: the response at each of its states, its message item, and its stream's events
    (numbered in order)."""

    def __init__(self, response_id: str, message_id: str, model: str, body: ResponsesRequest) -> None:
        self.id, self.message_id, self.model, self.body = response_id, message_id, model, body
        self.created = int(time.time())
        self.sequence = 0

    def message(self, status: str, text: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> dict:
        """The assistant message item: without content while in progress, else one output_text part."""
        content = [] if text is None else [self.part(text, logprobs)]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def part(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def response(
        self,
        status: str,
        output: list[dict] | None = None,
        usage: dict[str, int] | None = None,
        error: APIError | None = None,
    ) -> dict:
        """The response object, OpenAI's fields; status "in_progress", "completed", "incomplete" (the answer
        reached max_output_tokens or the context) or "failed"."""
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "background": False,
            "error": {"code": error.code or "server_error", "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "max_tool_calls": None,
            "model": self.model, "output": output or [], "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": b.temperature, "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
            "tool_choice": "auto",
            "tools": [], "top_logprobs": b.top_logprobs or 0, "top_p": b.top_p, "truncation": b.truncation,
            "usage": usage, "user": b.user, "metadata": b.metadata or {},
        }  # fmt: skip

    def finished(
        self, text: str, logprobs: list[dict[str, Any]] | None, finish_reason: str | None, usage: dict[str, int]
    ) -> dict:
        """The whole response once the answer is written."""
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.response(status, [self.message(status, text, logprobs)], usage)

    def event(self, kind: str, **fields: Any) -> bytes:
        """One server-sent event of the stream: `event: kind` and its JSON with the next sequence number."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: ".encode() + _JSON.encode(data).encode("utf-8") + b"\n\n"

    def opening(self) -> list[bytes]:
        """The events before the first text: the response created and in progress, the message and its part."""
        start = self.response("in_progress")
        where = {"output_index": 0, "item_id": self.message_id, "content_index": 0}
        return [
            self.event("response.created", response=start),
            self.event("response.in_progress", response=start),
            self.event("response.output_item.added", output_index=0, item=self.message("in_progress")),
            self.event("response.content_part.added", **where, part=self.part("")),
        ]

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None) -> bytes:
        return self.event("response.output_text.delta", output_index=0, item_id=self.message_id, content_index=0,
                          delta=text, logprobs=logprobs or [])  # fmt: skip

    def closing(
        self, text: str, logprobs: list[dict[str, Any]] | None, finish_reason: str | None, usage: dict[str, int]
    ) -> list[bytes]:
        """The events after the last text: the text, part and message done, then the response's last state."""
        whole = self.finished(text, logprobs, finish_reason, usage)
        item = whole["output"][0]
        where = {"output_index": 0, "item_id": self.message_id, "content_index": 0}
        return [
            self.event("response.output_text.done", **where, text=text, logprobs=logprobs or []),
            self.event("response.content_part.done", **where, part=item["content"][0]),
            self.event("response.output_item.done", output_index=0, item=item),
            self.event(f"response.{whole['status']}", response=whole),
        ]

    def failure(self, error: APIError) -> list[bytes]:
        """An error after the stream started: an `error` event, then the response failed."""
        return [
            self.event("error", code=error.code or error.type, message=error.message, param=error.param),
            self.event("response.failed", response=self.response("failed", error=error)),
        ]


def responses_usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """The Responses API's usage: input and output tokens (none cached, none spent reasoning)."""
    return {
        "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }  # fmt: skip
