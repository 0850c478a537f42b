"""OpenAI's request bodies (pydantic) and error shape, as the server validates and answers them.

Requests accept OpenAI's fields plus extras (`top_k`, `repetition_penalty`; vLLM's `min_tokens`, `stop_token_ids`,
`ignore_eos`); unknown fields are ignored,
as OpenAI-compatible servers do, so clients that send e.g. `user` keep working. OpenAI fields that would change the
answer in a way this server cannot (tool calls, JSON output, fill-in-the-middle, best_of) are refused rather than
ignored. A bad value is an `APIError` with OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error the client gets as OpenAI's JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The options completions and chat share."""

    model: str | None = None  # None: the served model
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_k: int = Field(0, ge=0)  # lmforge's extra: 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0)  # lmforge's extra (transformers' meaning): 1 = off
    logit_bias: dict[str, float] | None = None  # token id (a string in OpenAI's JSON) -> added to its logit
    min_tokens: int = Field(0, ge=0)  # vLLM's extras: no end before this many tokens,
    stop_token_ids: list[int] | None = None  # tokens that end the answer as EOS does,
    ignore_eos: bool = False  # the model's EOS does not end it

    def bias(self, vocab: int) -> dict[int, float]:
        """`logit_bias` checked, as {token id: bias}: ids in [0, vocab), biases in [-100, 100] (OpenAI's range)."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            digits = key.strip()
            token = int(digits) if digits.isascii() and digits.isdigit() else -1
            if not 0 <= token < vocab:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}",
                               param="logit_bias", code="invalid_value")  # fmt: skip
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {token}",
                               param="logit_bias", code="invalid_value")  # fmt: skip
            out[token] = out.get(token, 0.0) + value
        return out

    def check_options(self) -> None:
        """A 400 for options that contradict each other."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if len(stop) > 4:
            raise APIError(400, f"at most 4 stop strings, got {len(stop)}", param="stop")
        return stop


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_options(self) -> None:
        """A 400 for contradicting options and for the OpenAI options this server does not implement (rather than
        answering without them)."""
        super().check_options()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                           param="max_tokens")  # fmt: skip
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported; leave it out", param="suffix")
        if self.best_of is not None and self.best_of > 1:
            raise APIError(400, "best_of is not supported; ask for n choices and pick among them", param="best_of")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls, as the server answered them
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def text(self) -> str:
        """The message as one string (text parts joined); other part types are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"only text content is supported, got a {part.type!r} part", param="messages")
        return "".join(part.text or "" for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # OpenAI's older names for tools and tool_choice
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    @property
    def json_object(self) -> bool:
        """JSON mode: response_format {"type": "json_object"}."""
        return (self.response_format or {}).get("type") == "json_object"

    @cached_property
    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer follows: a called function's parameters (`forced_tool`), or response_format
        {"type": "json_schema", "json_schema": {"schema"}} (structured output)."""
        tool = self.forced_tool
        if tool is not None:
            return tool[1]
        if (self.response_format or {}).get("type") != "json_schema":
            return None
        form = (self.response_format or {}).get("json_schema")
        return _schema_of(form, "response_format.json_schema", "response_format")

    @cached_property
    def forced_tool(self) -> tuple[str, dict[str, Any]] | None:
        """The function the answer calls: tool_choice {"type": "function", "function": {"name"}}, or "required"
        with one function in `tools`; (its name, its parameters' schema), or None (no call asked for)."""
        choice = self.tool_choice
        if not self.tools or choice in (None, "none", "auto"):
            return None
        functions = {}
        for i, tool in enumerate(self.tools):
            function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise APIError(400, f"tools[{i}] is not a function tool ({{'type': 'function', 'function': "
                               "{'name': ..., 'parameters': {...}}}); only function tools are supported",
                               param="tools")  # fmt: skip
            functions[function["name"]] = function
        if choice == "required":
            if len(functions) != 1:
                raise APIError(400, f"tool_choice 'required' with {len(functions)} functions: the model has no "
                               "tool-call format to choose one; name the one to call in tool_choice "
                               "({'type': 'function', 'function': {'name': ...}})", param="tool_choice")  # fmt: skip
            name = next(iter(functions))
        else:
            name = ((choice.get("function") or {}).get("name") if isinstance(choice, dict) else None) or ""
            if name not in functions:
                raise APIError(400, f"tool_choice names no function in tools: {name!r} (tools: "
                               f"{', '.join(map(repr, functions))})", param="tool_choice")  # fmt: skip
        parameters = functions[name].get("parameters")
        if parameters is None:  # a function without arguments
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(parameters, dict):
            raise APIError(400, f"the parameters of {name!r} must be a JSON schema object", param="tools")
        return name, parameters

    def check_options(self) -> None:
        """A 400 for contradicting options and for the OpenAI options this server does not implement (rather than
        answering without them): a choice between calling tools and answering (tool_choice "auto"), and output
        formats other than text, JSON mode and JSON schemas."""
        super().check_options()
        if self.top_logprobs and not self.logprobs:  # (0 asks for nothing: let it pass)
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.functions and self.function_call != "none":
            raise APIError(400, "'functions' is not supported (OpenAI's older name for tools): send 'tools' with "
                           "tool_choice naming the function to call", param="functions")  # fmt: skip
        if self.tools and self.tool_choice in (None, "auto"):
            raise APIError(400, "tool_choice 'auto' is not supported: the model has no tool-call format to choose "
                           "between calling a function and answering; name the function to call in tool_choice "
                           "({'type': 'function', 'function': {'name': ...}}), or send tool_choice 'none'",
                           param="tool_choice")  # fmt: skip
        if self.forced_tool is not None and (self.response_format or {}).get("type", "text") != "text":
            raise APIError(400, "a tool call's arguments follow the function's parameters: leave out "
                           "response_format when tool_choice names a function", param="response_format")  # fmt: skip
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"response_format {kind!r} is not supported; send {{'type': 'json_schema', "
                           "'json_schema': {'name': ..., 'schema': {...}}}, {'type': 'json_object'} or "
                           "{'type': 'text'}", param="response_format")  # fmt: skip
        self.json_schema  # noqa: B018 (a 400 now for a json_schema without a schema)
        if self.audio or any(m != "text" for m in self.modalities or []):
            raise APIError(400, "only text output is supported; leave out 'audio' and send modalities ['text']",
                           param="modalities" if self.modalities else "audio")  # fmt: skip
        if self.reasoning_effort:
            raise APIError(400, "reasoning_effort is not supported: the model has no reasoning mode; leave it out",
                           param="reasoning_effort")  # fmt: skip
        if self.web_search_options is not None:
            raise APIError(400, "web search is not supported; leave out web_search_options",
                           param="web_search_options")  # fmt: skip


class InputPart(_Body):
    """A part of a Responses API message: text in (`input_text`) or an earlier answer's text (`output_text`)."""

    type: str
    text: str | None = None


class InputItem(_Body):
    """An item of a Responses API `input` list: a message (`type` "message", or left out)."""

    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None

    def message(self, at: int) -> ChatMessage:
        """The item as a chat message; items other than text messages are a 400 naming `input[at]`."""
        where = f"input[{at}]"
        if self.type != "message":
            raise APIError(400, f"{where} is a {self.type!r} item; only messages are supported (no tool calls or "
                           "stored items)", param=where)  # fmt: skip
        if self.role not in ("user", "assistant", "system", "developer"):
            raise APIError(400, f"{where} has role {self.role!r}; use user, assistant, system or developer",
                           param=where)  # fmt: skip
        if isinstance(self.content, list):
            for part in self.content:
                if part.type not in ("input_text", "output_text") or part.text is None:
                    raise APIError(400, f"{where}: only text content is supported, got a {part.type!r} part",
                                   param=where)  # fmt: skip
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        return ChatMessage(role=self.role, content=text)


class ResponsesRequest(_Sampling):
    """OpenAI's Responses API (POST /v1/responses), text in and out, one answer, nothing stored: `input` (a
    string, or messages), `instructions` (a system message before them), `max_output_tokens`, `temperature`,
    `top_p`, `stream`, `top_logprobs` and `include` ["message.output_text.logprobs"], `truncation`, `metadata`;
    the sampling extras of completions and chat are accepted too."""

    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    parallel_tool_calls: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool = False

    @property
    def logprobs(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs asked for)."""
        if "message.output_text.logprobs" in (self.include or []) or self.top_logprobs:
            return self.top_logprobs or 0
        return None

    @property
    def json_object(self) -> bool:
        """JSON mode: text.format {"type": "json_object"}."""
        return ((self.text or {}).get("format") or {}).get("type") == "json_object"

    @cached_property
    def json_schema(self) -> dict[str, Any] | None:
        """Structured output: the schema of text.format {"type": "json_schema", "name", "schema"}."""
        form = (self.text or {}).get("format") or {}
        return _schema_of(form, "text.format", "text.format") if form.get("type") == "json_schema" else None

    def check_options(self) -> None:
        """A 400 for what this server cannot honour: stored state (`previous_response_id`, `conversation`,
        `background`), prompt templates, tool calls, output formats other than text, reasoning, n > 1."""
        super().check_options()
        stored = {"previous_response_id": self.previous_response_id, "conversation": self.conversation}
        for name, value in stored.items():
            if value:
                raise APIError(400, f"{name} is not supported: this server stores no responses; send the whole "
                               "conversation in 'input'", param=name)  # fmt: skip
        if self.background:
            raise APIError(400, "background responses are not supported (nothing is stored); send stream: true "
                           "to read the answer as it is written", param="background")  # fmt: skip
        if self.prompt:
            raise APIError(400, "prompt templates are not supported; send the text in 'input'", param="prompt")
        if self.tools and self.tool_choice != "none":
            raise APIError(400, "tool calling is not supported: the model has no tool-call format; leave out "
                           "'tools' or send tool_choice='none'", param="tools")  # fmt: skip
        kind = ((self.text or {}).get("format") or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"text.format {kind!r} is not supported; send {{'format': {{'type': 'json_schema', "
                           "'name': ..., 'schema': {...}}}}, {'format': {'type': 'json_object'}} or {'format': "
                           "{'type': 'text'}}", param="text.format")  # fmt: skip
        self.json_schema  # noqa: B018 (a 400 now for a json_schema without a schema)
        if (self.reasoning or {}).get("effort") or (self.reasoning or {}).get("summary"):
            raise APIError(400, "reasoning is not supported: the model has no reasoning mode; leave it out",
                           param="reasoning")  # fmt: skip
        if self.n != 1:
            raise APIError(400, "a response has one answer; ask /v1/chat/completions for n choices", param="n")

    def messages(self) -> list[ChatMessage]:
        """`instructions` and `input` as chat messages (what the chat template renders)."""
        if not self.input:
            raise APIError(400, "'input' is empty: send a string or a list of messages", param="input")
        if isinstance(self.input, str):
            items = [ChatMessage(role="user", content=self.input)]
        else:
            items = [item.message(i) for i, item in enumerate(self.input)]
        head = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return head + items


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a prompt, or chat messages as the chat route renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: as the server encodes prompts (an encoder-decoder adds them)


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)  # OpenAI's shortened embeddings: only the model's own size here


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming the field and what it must be."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        problem = first["msg"]
        if first["type"] == "missing":
            raise APIError(400, f"'{param}' is required", param=param, code="missing_required_parameter") from None
        given = first.get("input")
        shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
        raise APIError(400, f"invalid '{param}': {problem} (got {shown})", param=param, code="invalid_value") from None


def _schema_of(form: Any, where: str, param: str) -> dict[str, Any]:
    """The `schema` of a json_schema output format (OpenAI's: {"name", "schema", "strict", "description"})."""
    schema = form.get("schema") if isinstance(form, dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, f"{where} needs 'schema': a JSON schema object (e.g. {{'type': 'object', "
                       "'properties': {...}})", param=param)  # fmt: skip
    return schema
