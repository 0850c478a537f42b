"""The OpenAI-compatible HTTP server: a FastAPI app over one `Scheduler` that owns the model.

    POST /v1/completions, /v1/chat/completions   causal LMs (continuous batching), encoder-decoders (greedy batched)
    POST /v1/responses                           the same models through OpenAI's Responses API (text, stateless)
    POST /v1/embeddings                          encoder models: mean-pooled, normalised (as `lmforge embed`)
    POST /v1/audio/transcriptions, translations  speech models (Whisper, lmforge's CTC): an uploaded file -> text
    POST /v1/pipelines/{task}                    any lmforge pipeline: {"inputs": ..., options} -> its own JSON
    POST /tokenize, /detokenize                  text or chat messages -> token ids, and back (vLLM's routes)
    GET  /v1/models[/{name}], /health, /metrics, /   model list (or card), readiness (503 while loading), Prometheus,
                                                 playground

Every error a client can cause is OpenAI's JSON shape with OpenAI's status; nothing a client sends reaches it as
a traceback. `create_app(ServerConfig(...))` builds the app; `lmforge serve` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib.util
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serving.chat import DEFAULT_CHAT_STOP, ChatTemplate, read_chat_template
from lmforge.serving.json_mode import JSONConstraint, SchemaError, SchemaMachine
from lmforge.serving.responses import ResponseBuilder, responses_usage
from lmforge.serving.scheduler import Piece, QueueFull, SamplingParams, Scheduler, token_logprobs
from lmforge.serving.scheduler import Request as Generation
from lmforge.serving.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    parse,
)
from lmforge.serving.seq2seq import Seq2SeqRunner

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # reachable without the API key
ROUTES = {
    "/health",
    "/",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
}
TEMPLATES = ("/v1/pipelines/{task}", "/v1/models/{name}", "/v1/responses/{id}")  # the routes with a part in the path


def _route_label(path: str, status: int) -> str:
    """The `route` label of a request in /metrics: the route, or "other" for any path that is not one (e.g. a
    client probing with a wrong key), so that the label's values stay few."""
    if status == 404:
        return "other"
    if path in ROUTES:
        return path
    return next((t for t in TEMPLATES if path.startswith(t.split("{")[0]) and len(path) > len(t.split("{")[0])),
                "other")  # fmt: skip


@dataclass
class ServerConfig:
    """What `lmforge serve` was told; see its --help."""

    model: str
    served_model_name: str | None = None
    api_key: str | None = None
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 25 << 20  # an audio upload's body (/v1/audio/*): OpenAI's limit for audio files
    stream_interval: int = 1  # steps whose tokens are handed to the event loop together (see Scheduler)
    enforce_eager: bool = False  # the model's modules every step, not the compiled step (see serving.step)
    cors_origins: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str | None = None  # e.g. "bfloat16"
    quantize: str | None = None  # "int8": int8 Linear layers (CPU)

    @property
    def precision(self) -> dict[str, str]:
        """The from_pretrained / pipeline options for the weights' precision."""
        return {k: v for k, v in (("dtype", self.dtype), ("quantize", self.quantize)) if v is not None}

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name or str(self.model)


class Metrics:
    """The Prometheus series /metrics exposes (a registry of the app's own, so apps do not share counters)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.requests = Counter("lmforge_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "lmforge_request_duration_seconds", "Time from request to the end of the response", buckets=latency,
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("lmforge_queue_length", "Requests waiting for a place in the batch", registry=r)
        self.running = Gauge("lmforge_running_sequences", "Sequences being decoded", registry=r)
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds", "Arrival to first token", buckets=latency, registry=r
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds", "Time between a sequence's tokens", buckets=latency, registry=r
        )
        self.batch_size = Histogram(
            "lmforge_batch_size", "Sequences per decoding step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )  # fmt: skip


class Mailbox:
    """Hands events from the scheduler thread to event loops once per scheduler step.

    A step of 16 streams makes 16 pieces. Handed over one by one (`call_soon_threadsafe` each), they woke the
    event loop up to 16 times per step, and each wake-up took the GIL and a core from the model's threads in
    the middle of its step: ~6,500 preemptions a second at 16 streams. Posted here and flushed after the step
    (`Scheduler.after_step`), they cost one wake-up: ~1,400 preemptions a second, and +7% tokens/s.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[Inbox, Any]] = []

    def post(self, inbox: Inbox, event: Any) -> None:
        """Queue `event` for `inbox`; it is put there, on the inbox's event loop, at the next `flush`."""
        with self._lock:
            self._items.append((inbox, event))

    def flush(self) -> None:
        """Hand everything posted so far to its loop: one `call_soon_threadsafe` per loop, order kept."""
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Inbox, Any]]] = {}
        for inbox, event in items:
            by_loop.setdefault(inbox.loop, []).append((inbox, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass


def _deliver(batch: list[tuple[Inbox, Any]]) -> None:
    for inbox, event in batch:
        inbox.put(event)


class Inbox:
    """One request's events on its event loop: `put` there (by `Mailbox`), awaited with `get`. What
    asyncio.Queue does for this one producer and one consumer, without its task counting and putter
    bookkeeping: the event loop handles every streamed token here, and its time per token is time the model's
    threads share the cores with (at 16 streams ~60 us of the loop's CPU per token, all told)."""

    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future | None = None  # the consumer's, while it waits

    def put(self, event: Any) -> None:
        self.items.append(event)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():  # (done: the waiting task was cancelled)
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self) -> Any:
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.items.popleft()


class Engine:
    """The loaded model, tokenizer, chat template and scheduler, and what they can serve."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = "loading"  # then "causal-lm", "seq2seq-lm", "speech" or "encoder"
        self.template: ChatTemplate | None = None
        self.scheduler: Scheduler | None = None
        self.seq2seq: Seq2SeqRunner | None = None  # an encoder-decoder's queue and batches
        self._json: JSONConstraint | None = None  # JSON mode's token sets, once asked for
        self._schemas: OrderedDict[str, JSONConstraint] = OrderedDict()  # structured outputs' (recent schemas)
        self._json_lock = threading.Lock()  # (first requests at once build them once)
        self.mailbox = Mailbox()  # the scheduler's events, on their way to the event loop
        self.pipelines: dict[str, Any] = {}
        self.created = int(time.time())
        # completion ids: a random prefix for this process and a counter (uuid4 reads os.urandom per request,
        # a system call that lets go of the GIL in the middle of the event loop's work)
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(6)

    def new_id(self, kind: str, sep: str = "-") -> str:
        """A fresh id, e.g. "cmpl-" + 24 hex digits (OpenAI's Responses API: "resp_", "msg_")."""
        return f"{kind}{sep}{self._id_prefix}{next(self._ids):012x}"

    def load(self) -> None:
        """Load the model (on a background thread: /health answers 503 meanwhile)."""
        try:
            self._load()
            self.ready.set()
            log.info(json.dumps({"event": "ready", "model": self.config.name, "kind": self.kind}))
        except Exception as error:  # reported by /health and every route; the server stays up to say so
            self.load_error = f"{type(error).__name__}: {error}"
            log.error(json.dumps({"event": "load_failed", "error": self.load_error}))

    def _load(self) -> None:
        from lmforge.auto import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, model_type_of
        from lmforge.hub.resolve import resolve_model_dir
        from lmforge.models import registry

        path = self.config.model
        directory = resolve_model_dir(path)
        model_type = model_type_of(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if _serves(registry, "causal-lm", model_type):
            self.kind, self.model = "causal-lm", AutoModelForCausalLM.from_pretrained(path, **self.config.precision)
        elif _serves(registry, "seq2seq-lm", model_type):
            self.kind, self.model = "seq2seq-lm", AutoModelForSeq2SeqLM.from_pretrained(path, **self.config.precision)
        elif _serves(registry, "speech-seq2seq", model_type) or _serves(registry, "speech-ctc", model_type):
            self.kind = "speech"  # /v1/audio/transcriptions: the speech pipeline loads the model
        else:
            self.kind = "encoder"  # embeddings and pipelines load what they need
        if self.model is not None:
            self.model.to(self.config.device).eval()
            tok = self.tokenizer
            self.template = ChatTemplate(
                read_chat_template(directory), getattr(tok, "bos_token", None), getattr(tok, "eos_token", None)
            )
        self.scheduler = Scheduler(
            self.model,
            self.tokenizer,
            self.config.max_num_seqs,
            self.config.max_batch_tokens,
            self.config.max_queue,
            self.metrics,
            self.config.stream_interval,
            eager=self.config.enforce_eager,
        )
        self.scheduler.after_step = self.mailbox.flush
        if self.kind == "seq2seq-lm":
            self.seq2seq = Seq2SeqRunner(self.model, self.tokenizer, self.scheduler, self.config.max_num_seqs,
                                         self.config.max_queue)  # fmt: skip
        self.scheduler.start()

    def json_constraint(self, schema: dict[str, Any] | None = None, param: str = "response_format") -> JSONConstraint:
        """The token sets of JSON mode, or of a JSON schema's structured output, for this model (the vocabulary's
        trie made at the first request that asks for either; the last 32 schemas' kept)."""
        if self.kind != "causal-lm":
            raise APIError(400, f"JSON output is offered for causal LMs; '{self.config.name}' is {self.describe()}",
                           param=param)  # fmt: skip
        with self._json_lock:
            if self._json is None:
                table = getattr(self.tokenizer, "token_bytes", None)
                data = table(True) if callable(table) else None
                if data is None:
                    raise APIError(400, "JSON output needs a byte-level BPE tokenizer (GPT-2's), whose tokens are "
                                   "bytes; this model's tokenizer is not one", param=param)  # fmt: skip
                try:
                    vocab = self.model.config.vocab_size  # the logits' size (the tokenizer may have other ids)
                    self._json = JSONConstraint(data[:vocab], vocab)
                except ValueError as error:
                    raise APIError(400, str(error), param=param) from None
            if schema is None:
                return self._json
            key = json.dumps(schema, sort_keys=True)
            constraint = self._schemas.get(key)
            if constraint is None:
                try:
                    constraint = self._json.following(SchemaMachine(schema))
                except (SchemaError, RecursionError) as error:
                    why = "nested too deeply" if isinstance(error, RecursionError) else str(error)
                    raise APIError(400, f"the JSON schema cannot be followed: {why}", param=param) from None
                self._schemas[key] = constraint
                if len(self._schemas) > 32:
                    self._schemas.popitem(last=False)
            self._schemas.move_to_end(key)
            return constraint

    def describe(self) -> str:
        """What the served model is, and where to send its requests (for errors that name a wrong route)."""
        if self.kind == "speech":
            return "a speech recognition model (send audio to /v1/audio/transcriptions)"
        if self.kind == "encoder":
            return "an encoder model (use /v1/embeddings or /v1/pipelines/{task})"
        return {"causal-lm": "a causal LM", "seq2seq-lm": "an encoder-decoder"}.get(self.kind, f"a {self.kind} model")

    def check_ready(self) -> None:
        if self.load_error:
            raise APIError(500, f"the model failed to load: {self.load_error}", type="server_error")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           type="server_error", code="model_loading")  # fmt: skip

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.name:
            raise APIError(
                404, f"The model '{name}' does not exist; this server serves '{self.config.name}'",
                param="model", code="model_not_found",
            )  # fmt: skip

    @property
    def context(self) -> int:
        from lmforge.constants import context_length

        return context_length(self.model.config)


def _serves(registry: Any, task: str, model_type: str) -> bool:
    try:
        registry.model_class(task, model_type, "lmforge serve")
        return True
    except ValueError:
        return False


def _json_default(value: Any) -> Any:
    """Pipelines return tensors and numpy values in places; JSON gets plain numbers and lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# ---------------------------------------------------------------------------------------------- the gate
BODY_SEND = "lmforge.body_send"  # where Gate leaves, in the ASGI scope, the `send` a streamed body's chunks may use
REQUEST_ID = "lmforge.request_id"  # and the request's id (the `x-request-id` header of its answer)
_GIVEN_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")  # a client's own X-Request-Id, kept if it looks like one


class Gate:
    """Pure ASGI middleware in front of every route: the API key, the body size limit, the request id, the access
    log and the request metrics. (Pure ASGI, so streamed responses and client disconnects pass through untouched.)

    Every answer carries an `x-request-id` header (as OpenAI's API does; the `openai` client shows it as
    `_request_id`): the client's own `X-Request-Id` if it sent a plausible one (a proxy's, to follow a request
    across services), else a fresh one. The access log line and any error logged for the request name it."""

    def __init__(self, app: Any, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.key = ("Bearer " + config.api_key).encode() if config.api_key else None
        self._ids = itertools.count()  # fresh ids: a random prefix and a counter (no system call per request)
        self._id_prefix = "req_" + secrets.token_hex(6)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, path = time.perf_counter(), [0], scope["path"]
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"")
        rid = given.decode() if _GIVEN_ID.fullmatch(given) else f"{self._id_prefix}{next(self._ids):012x}"
        scope[REQUEST_ID] = rid

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        async def refuse(error: APIError) -> None:
            body = json.dumps(error.body()).encode()
            await send_logged({"type": "http.response.start", "status": error.status,
                               "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send_logged({"type": "http.response.body", "body": body})

        received = [0]
        upload = path.startswith("/v1/audio/")
        limit = self.config.max_upload_bytes if upload else self.config.max_body_bytes
        too_large = _too_large(limit, "--max-upload-bytes" if upload else "--max-body-bytes")

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise _BodyTooLarge
            return message

        try:
            if self.key and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
                if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                    await refuse(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key"))  # fmt: skip
                    return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await refuse(too_large)
                return
            try:
                # for a streamed body (EventStream), whose status and headers go through send_logged
                scope[BODY_SEND] = send
                await self.app(scope, receive_limited, send_logged)
            except _BodyTooLarge:
                if not status[0]:
                    await refuse(too_large)
            except Exception:  # a bug: the traceback stays in the server's log, the client gets a 500 naming the id
                log.exception("internal error on %s (request %s)", path, rid)
                if not status[0]:  # (after the answer has started, nothing more can be said: it ends there)
                    await refuse(APIError(500, "internal server error: the server's log has the details under "
                                          f"request id {rid}", type="server_error"))  # fmt: skip
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(_route_label(path, status[0]), str(status[0])).inc()
            self.metrics.request_seconds.observe(seconds)
            client = scope.get("client")
            log.info(json.dumps({
                "time": round(time.time(), 3), "client": client[0] if client else None, "method": scope["method"],
                "path": path, "status": status[0], "ms": round(1e3 * seconds, 1), "request_id": rid,
            }))  # fmt: skip


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int, option: str) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes ({option})",
                    code="request_too_large")  # fmt: skip


# ---------------------------------------------------------------------------------------------- the app
def create_app(config: ServerConfig, load_in_background: bool = True) -> FastAPI:
    """The FastAPI app serving `config.model`. The model loads when the app starts (in the background unless
    told otherwise; /health answers 503 until it is ready)."""
    metrics = Metrics()
    engine = Engine(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads on a thread of its own, which then ends: a thread that has run PyTorch's parallel
        # kernels keeps an OpenMP thread team, and with a second team alive (the scheduler's) every kernel of
        # the scheduler ran ~2.5x slower on a 2-core machine (a 16-row decode step 1.6 -> 4.2 ms).
        loader = threading.Thread(target=engine.load, name="lmforge-load", daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
        yield
        if engine.scheduler is not None:
            await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(Gate, config=config, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else error.detail
        return _error_response(APIError(error.status_code, str(message), code="not_found"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.load_error:
            return JSONResponse({"status": "error", "message": engine.load_error}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = STATIC / "playground.html"
        if not page.is_file():
            return JSONResponse({"message": "lmforge server; the API is under /v1"})
        return FileResponse(page, media_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        card = {"id": config.name, "object": "model", "created": engine.created, "owned_by": "lmforge"}
        if engine.model is not None:
            card["max_model_len"] = engine.context  # vLLM's name: the context, prompt + output tokens
        return card

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")  # OpenAI's "retrieve model" (names may hold a "/")
    async def one_model(name: str) -> JSONResponse:
        engine.check_model(name)
        return JSONResponse(model_card())

    async def generation_request(request: Request, schema: type) -> tuple[Any, JSONConstraint | None]:
        """The body of a completions / chat / responses request, parsed and checked (model, readiness, options),
        and JSON output's constraint where it asks for JSON mode, a schema or a function call."""
        body = parse(schema, await _json(request))
        engine.check_model(body.model)
        engine.check_ready()
        body.check_options()
        constraint = None
        if _wants_json(body):  # the vocabulary's trie (~80 ms for 4,096 tokens) and a schema's machine are made
            constraint = await asyncio.to_thread(_constraint, engine, body)  # once each, off the event loop
        return body, constraint

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, _ = await generation_request(request, CompletionRequest)  # (completions never ask for JSON output)
        prompts = _completion_prompts(engine, body)
        params = _sampling(engine, body, body.max_tokens, prompts, body.stop_list(), body.logprobs)
        echo = await _echo(engine, body, prompts) if body.echo else None
        return await _respond(request, engine, prompts, params, body, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, constraint = await generation_request(request, ChatRequest)
        prompts = [_encode(engine, _chat_text(engine, body.messages), "messages")]
        stop = _chat_stop(engine, body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(engine, body, max_tokens, prompts, stop, top, constraint=constraint)
        return await _respond(request, engine, prompts, params, body, chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body, constraint = await generation_request(request, ResponsesRequest)
        prompts = [_response_prompt(engine, body)]
        params = _sampling(engine, body, body.max_output_tokens, prompts, _chat_stop(engine, body), body.logprobs,
                           names=("input", "max_output_tokens"), constraint=constraint)  # fmt: skip
        return await _respond_responses(request, engine, prompts, params, body)

    @app.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def stored_response(rest: str) -> Response:  # retrieve, delete, cancel, input_items: nothing is stored
        raise APIError(404, f"no stored response '{rest.split('/')[0]}': this server stores no responses (every "
                       "answer is reported with store: false); send the whole conversation in 'input'",
                       code="not_found")  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = parse(TokenizeRequest, await _json(request))
        engine.check_model(body.model)
        engine.check_ready()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either 'prompt' (a string) or 'messages' (a chat), not both or neither",
                           param="prompt")  # fmt: skip
        text = body.prompt if body.prompt is not None else _chat_text(engine, body.messages or [])
        special = _adds_special_tokens(engine) if body.add_special_tokens is None else body.add_special_tokens
        ids = engine.tokenizer.encode(text, add_special_tokens=special)
        answer: dict[str, Any] = {"count": len(ids), "tokens": ids}
        if engine.model is not None:
            answer["max_model_len"] = engine.context
        return JSONResponse(answer)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """vLLM's route: what a client needs to tokenize as the server does (lm-evaluation-harness's `remote`
        tokenizer reads it, then sends text to /tokenize and /detokenize)."""
        engine.check_ready()
        tok = engine.tokenizer
        special = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        answer: dict[str, Any] = {"tokenizer_class": type(tok).__name__, **special, "vocab_size": len(tok)}
        if engine.model is not None:
            answer["model_max_length"] = engine.context
        if engine.template is not None:  # the template the chat route renders (the model's own, or the default)
            answer["chat_template"] = engine.template.source
        return JSONResponse(answer)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = parse(DetokenizeRequest, await _json(request))
        engine.check_model(body.model)
        engine.check_ready()
        _check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = parse(EmbeddingRequest, await _json(request))
        engine.check_model(body.model)
        engine.check_ready()
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t.strip() for t in texts):
            raise APIError(400, "'input' must be a non-empty string or a list of non-empty strings", param="input")
        if engine.kind != "encoder":
            raise APIError(400, f"'{config.name}' is a {engine.kind} model; embeddings need an encoder model "
                           "(e.g. serve all-MiniLM-L6-v2 or a BERT directory)", param="model")  # fmt: skip
        pipe = await _pipeline(engine, "sentence-embeddings")
        vectors = await _job(engine, lambda: pipe(texts))
        size = torch.as_tensor(vectors[0]).numel()
        if body.dimensions is not None and body.dimensions != size:  # (not cut: the model was not trained for it)
            raise APIError(400, f"dimensions={body.dimensions}: this model's embeddings have {size} dimensions and "
                           f"cannot be shortened; leave dimensions out or send {size}", param="dimensions")  # fmt: skip
        tokens = sum(len(engine.tokenizer.encode(t)) for t in texts)
        data = []
        for i, vector in enumerate(vectors):
            values = torch.as_tensor(vector, dtype=torch.float32).flatten()
            if body.encoding_format == "base64":
                embedding: Any = base64.b64encode(values.numpy().astype("<f4").tobytes()).decode()
            else:
                embedding = values.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": config.name, "usage": usage})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _transcribe(engine, request, "transcribe")

    @app.post("/v1/audio/translations")  # Whisper's translation into English
    async def translations(request: Request) -> Response:
        return await _transcribe(engine, request, "translate")

    @app.post("/v1/pipelines/{task}")
    async def pipelines(task: str, request: Request) -> Response:
        from lmforge.pipelines import available_tasks

        data = await _json(request)
        engine.check_ready()
        if task not in available_tasks() and not task.startswith("translation_"):
            raise APIError(404, f"unknown pipeline task {task!r}; available: {', '.join(available_tasks())}",
                           param="task", code="not_found")  # fmt: skip
        if not isinstance(data, dict) or "inputs" not in data:
            raise APIError(400, 'the body must be a JSON object {"inputs": ..., other options of the pipeline}',
                           param="inputs")  # fmt: skip
        options = {k: v for k, v in data.items() if k not in ("inputs", "model")}
        engine.check_model(data.get("model"))
        if task == "automatic-speech-recognition" and _names_files(data["inputs"]):
            raise APIError(400, "the server does not read files from its own disk: upload the audio to "
                           "/v1/audio/transcriptions (multipart, as OpenAI's API) or send its samples, "
                           '{"inputs": {"raw": [...], "sampling_rate": Hz}}', param="inputs")  # fmt: skip
        pipe = await _pipeline(engine, task)
        result = await _job(engine, lambda: pipe(data["inputs"], **options))
        return Response(json.dumps(result, default=_json_default, ensure_ascii=False),
                        media_type="application/json")  # fmt: skip

    return app


def _names_files(inputs: Any) -> bool:
    """Whether a speech pipeline's inputs hold a string (which it would read as a path on the server's disk)."""
    return isinstance(inputs, str) or (isinstance(inputs, list) and any(isinstance(i, str) for i in inputs))


TRANSCRIPTION_FORMATS = ("json", "text")  # OpenAI's verbose_json, srt and vtt need timestamps


async def _transcribe(engine: Engine, request: Request, task: str) -> Response:
    """OpenAI's /v1/audio/transcriptions (task "transcribe") and /v1/audio/translations ("translate"): a
    multipart form with the audio in `file` (WAV, FLAC, OGG, MP3) and `model`, `language`, `response_format`
    (json or text), `temperature` (0: greedy decoding, the only one offered), `prompt` (refused if not empty)."""
    engine.check_ready()
    if engine.kind != "speech":
        raise APIError(400, f"'{engine.config.name}' is {engine.describe()}; transcription needs a speech "
                       "recognition model (Whisper, or a recognizer from `lmforge speech train`)",
                       param="model")  # fmt: skip
    if importlib.util.find_spec("python_multipart") is None:  # starlette's form parser
        raise APIError(500, "this server cannot read uploads: install python-multipart (pip install 'lmforge[serve]') "
                       "and restart it", type="server_error")  # fmt: skip
    try:
        form = await request.form()
    except Exception as error:  # not multipart, or a malformed one
        raise APIError(
            400, f"send the audio as multipart/form-data with a 'file' field ({error})", param="file"
        ) from None
    try:
        engine.check_model(_form_text(form, "model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "'file' is required: the audio file, as a multipart file field", param="file",
                           code="missing_required_parameter")  # fmt: skip
        response_format = _form_text(form, "response_format") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise APIError(400, f"response_format {response_format!r} is not supported (it needs timestamps); use "
                           f"{' or '.join(TRANSCRIPTION_FORMATS)}", param="response_format")  # fmt: skip
        temperature = _form_text(form, "temperature") or "0"
        try:
            greedy = float(temperature) == 0
        except ValueError:
            greedy = False
        if not greedy:
            raise APIError(
                400, f"temperature {temperature!r}: only 0 (greedy decoding) is offered", param="temperature"
            )
        if _form_text(form, "prompt"):
            raise APIError(400, "prompt is not supported for transcription; leave it out", param="prompt")
        options: dict[str, Any] = {"task": "translate"} if task == "translate" else {}
        language = _form_text(form, "language")
        if language:
            options["language"] = language
        data, name = await upload.read(), f"the uploaded file {upload.filename or 'file'!r}"
    finally:
        await form.close()
    from lmforge.speech import SAMPLING_RATE, decode_audio

    pipe = await _pipeline(engine, "automatic-speech-recognition")

    def run() -> Any:  # (a file that is not audio: decode_audio's ValueError, so a 400)
        return pipe({"raw": decode_audio(data, name), "sampling_rate": SAMPLING_RATE}, **options)

    text = (await _job(engine, run))["text"]
    if response_format == "text":
        return Response(text, media_type="text/plain; charset=utf-8")
    return JSONResponse({"text": text})


def _form_text(form: Any, name: str) -> str | None:
    """A multipart form's text field (None when absent; a file sent there is a 400)."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"'{name}' must be a text field, not a file", param=name)
    return value


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error}); send a JSON object") from None


async def _job(engine: Engine, fn: Callable[[], Any]) -> Any:
    """fn() on the scheduler thread; a ValueError/TypeError from it is the client's (400)."""
    future = engine.scheduler.run_job(fn)
    try:
        return await asyncio.wrap_future(future)
    except (ValueError, TypeError, KeyError) as error:
        raise APIError(400, str(error).strip("'\"")) from None


async def _pipeline(engine: Engine, task: str) -> Any:
    """The pipeline for `task` on the served model directory (built once, on the scheduler thread)."""
    if task not in engine.pipelines:
        from lmforge.pipelines import pipeline

        def build() -> Any:
            generative = task in ("text-generation", "text2text-generation", "translation", "summarization")
            if engine.model is not None and (generative or task.startswith("translation_")):
                return pipeline(task, model=engine.model, tokenizer=engine.tokenizer)  # the served model itself
            return pipeline(task, model=engine.config.model, **engine.config.precision)

        engine.pipelines[task] = await _job(engine, build)
    return engine.pipelines[task]


def _chat_text(engine: Engine, messages: list[Any]) -> str:
    """Chat messages rendered by the model's chat template (or lmforge's default), ready to encode. An
    encoder-decoder without a template of its own (a translator, a summariser: trained on plain sources, not on
    "User: ... Assistant:" turns) reads the last user message as its source."""
    if engine.template is None:
        raise APIError(400, f"'{engine.config.name}' is {engine.describe()}; chat needs a causal LM or an "
                       "encoder-decoder", param="messages")  # fmt: skip
    if engine.kind == "seq2seq-lm" and engine.template.is_default:
        said = [m for m in messages if m.role == "user"]
        if not said:
            raise APIError(400, "an encoder-decoder reads the last user message as its source: send one",
                           param="messages")  # fmt: skip
        return said[-1].text()
    rendered = []
    for m in messages:  # what a model's own template may read, as transformers passes it
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        item.update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                       ("name", m.name)) if v})  # fmt: skip
        if m.tool_calls and not item["content"] and engine.template.is_default:  # the default shows calls as text
            item["content"] = "\n".join(_call_text(call) for call in m.tool_calls)
        rendered.append(item)
    try:
        return engine.template.render(rendered)
    except Exception as error:  # the model's own template refused these messages (raise_exception)
        raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None


def _call_text(call: dict[str, Any]) -> str:
    """An earlier function call as the default chat template shows it: name(arguments)."""
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    arguments = function.get("arguments", "")
    return f"{function.get('name', '')}({arguments if isinstance(arguments, str) else json.dumps(arguments)})"


def _chat_stop(engine: Engine, body: Any) -> list[str]:
    """A chat's stop strings: the request's, and with lmforge's default template the start of a next turn."""
    return body.stop_list() + (DEFAULT_CHAT_STOP if engine.template.is_default else [])


def _adds_special_tokens(engine: Engine) -> bool:
    """Whether a prompt is encoded with the tokenizer's special tokens: a causal LM continues the text as it is;
    an encoder-decoder reads its source with them (e.g. Marian's </s>), as its pipelines do."""
    return engine.kind == "seq2seq-lm"


def _check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    """A 400 naming `param` unless every id is in [0, vocab)."""
    if any(not 0 <= i < vocab for i in ids):
        raise APIError(400, f"'{param}' must be token ids in [0, {vocab})", param=param)


def _encode(engine: Engine, text: str, param: str) -> list[int]:
    """A prompt's ids, as the model reads them (`_adds_special_tokens`)."""
    ids = engine.tokenizer.encode(text, add_special_tokens=_adds_special_tokens(engine))
    if not ids:
        raise APIError(400, f"'{param}' is empty: send some text", param=param)
    return ids


def _completion_prompts(engine: Engine, body: CompletionRequest) -> list[list[int]]:
    """The prompt(s) as token ids: a string, a list of strings, a token list or a list of token lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [_encode(engine, prompt, "prompt")]
    if not prompt:
        raise APIError(400, "'prompt' is empty: send a string or a list of strings", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [_encode(engine, p, "prompt") for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = len(engine.tokenizer)
    for ids in prompts:
        if not ids:
            raise APIError(400, "'prompt' has an empty entry", param="prompt")
        _check_token_ids(ids, vocab, "prompt")
    return prompts


def _wants_json(body: Any) -> bool:
    """Whether a chat or Responses request asks for JSON output: JSON mode, a schema or a function call."""
    return getattr(body, "json_object", False) or getattr(body, "json_schema", None) is not None


def _constraint(engine: Engine, body: Any) -> JSONConstraint:
    """The token sets of the JSON output a chat or Responses request asks for (`_wants_json`)."""
    param = "text.format" if isinstance(body, ResponsesRequest) else "response_format"
    if getattr(body, "forced_tool", None) is not None:
        param = "tools"
    return engine.json_constraint(body.json_schema, param)


def _sampling(
    engine: Engine,
    body: Any,
    max_tokens: int | None,
    prompts: list[list[int]],
    stop: list[str],
    logprobs: int | None,
    names: tuple[str, str] = ("prompt", "max_tokens"),
    constraint: JSONConstraint | None = None,
) -> SamplingParams:
    """The request's SamplingParams, after checking the prompt and max_tokens fit the model's context (errors
    name the request's fields for them: `names`, the prompt's and max_tokens'); `constraint`: JSON output's."""
    prompt_param, max_param = names
    if engine.model is None:
        raise APIError(400, f"'{engine.config.name}' is {engine.describe()}: it does not generate text from a "
                       "prompt", param="model")  # fmt: skip
    ctx = engine.context
    longest = max(len(p) for p in prompts)
    if engine.kind == "causal-lm":
        if longest >= ctx:
            raise APIError(400, f"the prompt has {longest} tokens but the model's context is {ctx} tokens; "
                           "shorten the prompt", param=prompt_param, code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = ctx - longest
        elif longest + max_tokens > ctx:
            raise APIError(
                400, f"the prompt ({longest} tokens) plus {max_param} ({max_tokens}) is {longest + max_tokens} "
                f"tokens, more than the model's context of {ctx} tokens; lower {max_param} to {ctx - longest} "
                "or shorten the prompt", param=max_param, code="context_length_exceeded",
            )  # fmt: skip
    else:  # an encoder-decoder: the prompt is the source, the output has its own positions
        if longest > ctx:
            raise APIError(400, f"the prompt has {longest} tokens but the model reads at most {ctx}",
                           param=prompt_param, code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = ctx - 1
        elif max_tokens > ctx - 1:
            raise APIError(400, f"{max_param} ({max_tokens}) is more than the {ctx - 1} tokens the model's "
                           "decoder can write", param=max_param, code="context_length_exceeded")  # fmt: skip
    vocab = engine.model.config.vocab_size
    stop_ids = body.stop_token_ids or []
    _check_token_ids(stop_ids, vocab, "stop_token_ids")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})",
                       param="min_tokens")  # fmt: skip
    rows, limit = len(prompts) * body.n, engine.config.max_num_seqs
    if engine.kind == "causal-lm" and rows > limit:  # decoded together: they must fit the batch at once
        raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is {rows} sequences, more than the server's "
                       f"--max-num-seqs={limit}; send fewer prompts per request or a smaller n",
                       param="n" if len(prompts) == 1 else "prompt")  # fmt: skip
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        stop=stop, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logprobs=logprobs, logit_bias=body.bias(vocab),
        min_tokens=body.min_tokens, stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, constraint=constraint,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- responses
class _Choices:
    """Pieces gathered into OpenAI's choices (non-streamed answers)."""

    def __init__(self, count: int) -> None:
        self.text = [""] * count
        self.tokens: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count

    def add(self, piece: Piece) -> None:
        self.text[piece.index] += piece.text
        self.tokens[piece.index] += piece.logprobs or []
        self.finish[piece.index] = piece.finish_reason or self.finish[piece.index]


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def _completion_logprobs(tokenizer: Any, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_token_text(tokenizer, e["id"]) for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["top"] is None else {_token_text(tokenizer, i): lp for i, lp in e["top"]} for e in entries
        ],  # (None: a prompt's first token, which nothing predicts)
        "text_offset": offsets,
    }


@dataclass
class Echo:
    """A prompt as `echo: true` gives it back: its text, and its tokens' logprobs when logprobs are asked for."""

    text: str
    logprobs: dict[str, list[Any]] | None  # OpenAI's completions logprobs; the first token has none


async def _echo(engine: Engine, body: CompletionRequest, prompts: list[list[int]]) -> list[Echo]:
    """Each prompt's echo: the text as sent (token ids decoded) and, with `logprobs`, every prompt token's
    log-probability given the tokens before it, from one forward of the model over the prompt (on the scheduler
    thread, between steps), as vLLM answers `echo` with `logprobs` (e.g. for lm-evaluation-harness)."""
    if body.logprobs is not None and engine.kind != "causal-lm":
        raise APIError(400, "echo with logprobs scores the prompt, which only a causal LM predicts; an "
                       "encoder-decoder reads its source: leave out echo or logprobs", param="echo")  # fmt: skip
    prompt = body.prompt
    if isinstance(prompt, str):
        texts = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    else:  # token ids
        texts = [engine.tokenizer.decode(ids) for ids in prompts]
    if body.logprobs is None:
        return [Echo(t, None) for t in texts]
    top, model = body.logprobs, engine.model

    def score() -> list[list[dict[str, Any]]]:
        out = []
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids], device=model.device)
                logits = model(x).logits[0, :-1]  # (L-1, V): what each position predicts for the next token
                out.append([token_logprobs(row, token, top) for row, token in zip(logits, ids[1:])])
        return out

    entries = await _job(engine, score)
    echoes = []
    for text, ids, scored in zip(texts, prompts, entries):
        logprobs = _completion_logprobs(engine.tokenizer, [{"id": ids[0], "logprob": None, "top": None}, *scored])
        echoes.append(Echo(text, logprobs))
    return echoes


def _joined(first: dict[str, list[Any]], then: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two completions logprobs, one after the other."""
    return {key: first[key] + then[key] for key in first}


def _chat_logprobs(tokenizer: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e["id"], e["logprob"]), "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
                        for e in entries]}  # fmt: skip


def _start(engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int) -> tuple[Generation, Inbox]:
    """Start the generation (the scheduler's continuous batching for a causal LM, the encoder-decoder's queue
    otherwise; nothing to generate for max_tokens 0, the echo's); its pieces arrive in the returned inbox, then
    None. A full queue is a 429."""
    events = Inbox(asyncio.get_running_loop())

    def emit(event: Any) -> None:  # called on the scheduler thread; handed to the loop after its step
        engine.mailbox.post(events, event)

    generation = Generation(prompts, params, n, emit)
    engine.metrics.prompt_tokens.inc(generation.prompt_tokens)
    if params.max_tokens == 0:  # the prompt echoed, nothing generated
        for i in range(generation.size):
            events.put(Piece(i, "", [], [] if params.logprobs is not None else None, "length"))
        events.put(None)
        return generation, events
    try:
        if engine.kind == "causal-lm":
            engine.scheduler.submit(generation)
        else:
            engine.seq2seq.submit(generation)
    except QueueFull as error:
        raise APIError(429, str(error), type="rate_limit_exceeded", code="rate_limit_exceeded") from None
    return generation, events


async def _gather(request: Request, generation: Generation, events: Inbox) -> _Choices | None:
    """A whole (not streamed) answer's pieces, or None if the client went away before it was written."""
    choices = _Choices(generation.size)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive, generation.cancel))
    try:
        while (event := await events.get()) is not None:  # a client that leaves: cancelled, then None
            if isinstance(event, BaseException):
                raise _as_api_error(event)
            choices.add(event)
    finally:
        watcher.cancel()
    return None if generation.cancelled else choices


async def _respond(
    request: Request,
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    body: Any,
    chat: bool,
    echo: list[Echo] | None = None,
) -> Response:
    """Run the generation and answer completions (each choice after its prompt's `echo`, if given) or chat,
    streamed or whole."""
    generation, events = _start(engine, prompts, params, body.n)
    rid = engine.new_id("chatcmpl" if chat else "cmpl")
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.config.name}  # fmt: skip
    forced = body.forced_tool if chat else None
    calls = [ToolCall(engine.new_id("call", "_"), forced[0]) for _ in range(generation.size)] if forced else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream(engine, generation, events, head, chat, include_usage, echo, calls)
        return EventStream(chunks, generation.cancel)
    choices = await _gather(request, generation, events)
    if choices is None:  # the client is gone: nobody to answer
        return Response(status_code=499)
    usage = _usage(generation)
    out = []
    for i in range(generation.size):
        if chat:
            message = {"role": "assistant", "content": choices.text[i]}
            if calls:  # the answer is the function's arguments
                message = {"role": "assistant", "content": None, "tool_calls": [calls[i].json(choices.text[i])]}
            choice: dict[str, Any] = {"index": i, "message": message}
            choice["logprobs"] = _chat_logprobs(engine.tokenizer, choices.tokens[i]) if params.logprobs is not None \
                else None  # fmt: skip
        else:
            said = echo[i // body.n] if echo else Echo("", None)
            choice = {"index": i, "text": said.text + choices.text[i], "logprobs": None}
            if params.logprobs is not None:
                logprobs = _completion_logprobs(engine.tokenizer, choices.tokens[i], len(said.text))
                choice["logprobs"] = _joined(said.logprobs, logprobs) if said.logprobs else logprobs
        choice["finish_reason"] = _finish(choices.finish[i], calls)
        out.append(choice)
    return JSONResponse({**head, "choices": out, "usage": usage})


@dataclass
class ToolCall:
    """A chat answer that calls a function (tool_choice naming it): its arguments are the answer's text."""

    id: str  # "call_" + 24 hex digits
    name: str

    def json(self, arguments: str, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI writes it in a message (or, with `index`, in a streamed delta's first piece)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}
        return call if index is None else {"index": index, **call}


def _finish(reason: str | None, calls: list[ToolCall] | None) -> str | None:
    """A choice's finish_reason: "tool_calls" for a function call whose arguments are complete."""
    return "tool_calls" if calls and reason == "stop" else reason


def _response_prompt(engine: Engine, body: ResponsesRequest) -> list[int]:
    """A Responses API request's prompt: `instructions` and `input` through the chat template. With truncation
    "auto", the earliest input messages are dropped (the instructions kept) until the prompt and
    max_output_tokens fit the model's context."""
    messages = body.messages()
    ids = _encode(engine, _chat_text(engine, messages), "input")
    if body.truncation != "auto" or engine.model is None:
        return ids
    ctx, first = engine.context, 1 if body.instructions else 0  # messages[first:] are the input's

    def fits(ids: list[int]) -> bool:
        if engine.kind != "causal-lm":
            return len(ids) <= ctx
        return len(ids) < ctx and (body.max_output_tokens is None or len(ids) + body.max_output_tokens <= ctx)

    while not fits(ids) and len(messages) - first > 1:
        del messages[first]
        ids = _encode(engine, _chat_text(engine, messages), "input")
    return ids


async def _respond_responses(
    request: Request, engine: Engine, prompts: list[list[int]], params: SamplingParams, body: ResponsesRequest
) -> Response:
    """Run the generation and answer as OpenAI's Responses API does, streamed (its events) or whole."""
    generation, events = _start(engine, prompts, params, 1)
    builder = ResponseBuilder(engine.new_id("resp", "_"), engine.new_id("msg", "_"), engine.config.name, body)
    if body.stream:
        return EventStream(_stream_response(engine, generation, events, builder), generation.cancel)
    choices = await _gather(request, generation, events)
    if choices is None:
        return Response(status_code=499)
    logprobs = _chat_logprobs(engine.tokenizer, choices.tokens[0])["content"] if params.logprobs is not None \
        else None  # fmt: skip
    usage = responses_usage(generation.prompt_tokens, generation.completion_tokens)
    return JSONResponse(builder.finished(choices.text[0], logprobs, choices.finish[0], usage))


async def _stream_response(
    engine: Engine, generation: Generation, events: Inbox, builder: ResponseBuilder
) -> AsyncIterator[bytes]:
    """The Responses API's events (`ResponseBuilder`): a delta per piece of text, each with the logprobs of the
    tokens written since the last one (when asked for); events already waiting go out in one write."""
    tok, wanted = engine.tokenizer, generation.params.logprobs is not None
    out = builder.opening()
    text: list[str] = []
    entries: list[dict[str, Any]] = []  # every token's logprobs, for the done events
    pending: list[dict[str, Any]] = []  # those not yet sent with a delta (tokens whose text was held back)
    finish: str | None = None
    finished = False
    try:
        while True:
            if out and events.empty():
                yield b"".join(out)
                out = []
            event = await events.get()
            if event is None:
                break
            if isinstance(event, BaseException):
                out += builder.failure(_as_api_error(event))
                yield b"".join(out)
                finished = True
                return
            piece: Piece = event
            if piece.logprobs:
                new = _chat_logprobs(tok, piece.logprobs)["content"]
                entries += new
                pending += new
            if piece.text:
                out.append(builder.delta(piece.text, pending))
                text.append(piece.text)
                pending = []
            finish = piece.finish_reason or finish
        usage = responses_usage(generation.prompt_tokens, generation.completion_tokens)
        out += builder.closing("".join(text), entries if wanted else None, finish, usage)
        yield b"".join(out)
        finished = True
    finally:
        if not finished:
            generation.cancel()


def _usage(generation: Generation) -> dict[str, int]:
    p, c = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    log.error("generation failed: %r", error)
    return APIError(500, f"generation failed: {type(error).__name__}", type="server_error")


class EventStream(Response):
    """Server-sent events: each chunk `chunks` yields goes out in one ASGI `send` as soon as it is yielded, and
    `on_disconnect()` is called as soon as the client hangs up (the scheduler then drops the generation at its
    next step).

    Starlette's StreamingResponse does the same inside an anyio task group per response (a second task, cancel
    scopes, context lookups); here one plain task waits for the client to leave. That task group was ~13% of the
    event loop's work per request, and every microsecond the loop holds the GIL is one the model's thread waits.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.chunks, self.on_disconnect = chunks, on_disconnect
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive, self.on_disconnect))
        sent = False
        # the body's chunks skip the layers between `Gate` and here (CORS, Starlette's exception handling): they
        # act on the response's start, which goes through them; each layer was a coroutine call per token
        body = scope.get(BODY_SEND, send)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await body({"type": "http.response.body", "body": chunk, "more_body": True})
            await body({"type": "http.response.body", "body": b"", "more_body": False})
            sent = True
        finally:
            watcher.cancel()
            if not sent:  # a send failed (a server that raises on a gone client) or this task was cancelled
                self.on_disconnect()


async def _until_disconnect(receive: Callable, on_disconnect: Callable[[], None]) -> None:
    """Wait (on ASGI `receive`, the request's body already read) until the client hangs up, then call
    `on_disconnect()`. One waiting task per request, instead of polling: the scheduler drops a cancelled
    generation at its next step."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


# `json.dumps(x, ensure_ascii=False)` builds a new JSONEncoder on every call (any non-default option does): 1.2 us
# against 0.17 for a streamed token's text through one encoder kept here, on the event loop's time
_JSON = json.JSONEncoder(ensure_ascii=False)


def _sse(data: Any) -> bytes:
    return b"data: " + _JSON.encode(data).encode("utf-8") + b"\n\n"


def _delta(text: str | None, calls: list[ToolCall] | None) -> dict[str, Any]:
    """A chat chunk's delta for a piece of text: content, or a function call's arguments."""
    if not text:
        return {}
    return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if calls else {"content": text}


def _around_text(
    head: dict, index: int, chat: bool, extra: dict, calls: list[ToolCall] | None = None
) -> tuple[bytes, bytes]:
    """The event of a piece of text for choice `index`, cut where the text goes: the text's JSON string is
    spliced in between, instead of encoding the whole chunk for every token (3 us of the event loop's time)."""
    mark = "\x00"  # written as "\u0000", which nothing else in a chunk contains
    text = {"delta": _delta(mark, calls)} if chat else {"text": mark}
    choice = {"index": index, **text, "logprobs": None, "finish_reason": None}
    before, _, after = _sse({**head, "choices": [choice], **extra}).rpartition(b'"\\u0000"')
    return before, after


async def _stream(
    engine: Engine,
    generation: Generation,
    events: Inbox,
    head: dict,
    chat: bool,
    include_usage: bool,
    echo: list[Echo] | None = None,
    calls: list[ToolCall] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events: the prompts' echoes first (if given), a chunk per piece (a chat's function call: its
    id and name first, then the arguments piece by piece), the usage chunk if asked, then [DONE]. Events already
    waiting go out together, in one write (a request's last piece, its usage and [DONE] arrive in the same step).
    If the client goes away, the generation is cancelled (the scheduler drops it at its next step)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    tok = engine.tokenizer
    extra = {"usage": None} if include_usage else {}
    out: list[bytes] = []  # events ready to send
    around: dict[int, tuple[bytes, bytes]] = {}  # choice index -> a text chunk's bytes before and after its text
    offsets = [0] * generation.size  # each choice's text so far, in characters (completions' text_offset)
    finished = False
    try:
        for i, said in enumerate(echo[i // generation.n] for i in range(generation.size)) if echo else ():
            choice = {"index": i, "text": said.text, "logprobs": said.logprobs, "finish_reason": None}
            out.append(_sse({**head, "choices": [choice], **extra}))
            offsets[i] = len(said.text)
        if chat:
            for i in range(generation.size):
                delta = {"role": "assistant", "content": None, "tool_calls": [calls[i].json("", 0)]} if calls \
                    else {"role": "assistant", "content": ""}  # fmt: skip
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                out.append(_sse({**head, "choices": [choice], **extra}))
        while True:
            if out and events.empty():  # nothing more to add without waiting: send what is ready
                yield b"".join(out)
                out = []
            event = await events.get()
            if event is None:
                break
            if isinstance(event, BaseException):
                out.append(_sse(_as_api_error(event).body()))
                break
            piece: Piece = event
            if not piece.text and piece.finish_reason is None and piece.logprobs is None:
                continue  # text held back (an unfinished character or a possible stop string)
            logprobs = None
            if piece.logprobs is not None and chat:
                logprobs = _chat_logprobs(tok, piece.logprobs)
            elif piece.logprobs is not None:
                logprobs = _completion_logprobs(tok, piece.logprobs, offsets[piece.index])
                offsets[piece.index] += sum(len(t) for t in logprobs["tokens"])
            if piece.text and logprobs is None and piece.finish_reason is None:  # most pieces: text only
                if piece.index not in around:
                    around[piece.index] = _around_text(head, piece.index, chat, extra, calls)
                before, after = around[piece.index]
                out.append(before + _JSON.encode(piece.text).encode("utf-8") + after)
                continue
            if chat:
                choice = {"index": piece.index, "delta": _delta(piece.text, calls), "logprobs": logprobs,
                          "finish_reason": _finish(piece.finish_reason, calls)}  # fmt: skip
            else:
                choice = {"index": piece.index, "text": piece.text, "logprobs": logprobs,
                          "finish_reason": piece.finish_reason}  # fmt: skip
            out.append(_sse({**head, "choices": [choice], **extra}))
        if include_usage:
            out.append(_sse({**head, "choices": [], "usage": _usage(generation)}))
        out.append(b"data: [DONE]\n\n")
        yield b"".join(out)
        finished = True
    finally:
        if not finished:
            generation.cancel()
