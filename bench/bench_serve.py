"""Serving under load: `lmforge serve` against `transformers serve`, both OpenAI-compatible HTTP servers.

Each server is started here as a subprocess on 127.0.0.1 (a free port, the same model directory, the same
thread count through OMP_NUM_THREADS / MKL_NUM_THREADS, Hugging Face offline), waited for (GET /health,
bounded), sent one warm-up request, then loaded level by level: at concurrency C, `max(128, 4C)` streaming
POST /v1/completions requests (`stream_options.include_usage`) go out through C client workers, the next
request leaving as soon as one finishes (closed loop; aiohttp on uvloop, a client light enough to leave the
shared cores to the server). All servers are up at once (idle, they use no CPU) and take turns: each level
runs 3 times per server (--repeat), the servers alternating within each round, so the drift of a shared
machine hits them alike; a run during which other processes took more than 0.25 CPUs (--max-outside) is run
again, and the run with the median output tokens/s is reported. The requests are the same for every server:
prompts cut from the bundled Shakespeare corpus at seeded random places and lengths, `max_tokens` drawn from
16..128 (capped so that prompt + output fit the model's context), temperature 0.8 and a seed per request.
Nothing forces the output length: the tokens counted are the ones each server reports in its usage chunk.

Per level: request throughput (req/s), output tokens/s, time to first token (TTFT) and inter-token latency
(ITL, the gaps between streamed chunks) at p50 and p99, failed requests, and the CPUs used by the server
(its process and any children), by this client process (they share the machine) and by anything else
("outside"). The peer, `transformers serve MODEL_DIR`, runs twice by default: with `--continuous-batching`
(its batching mode, paged attention) and in its default mode (one `generate()` at a time); `--peer-mode` picks one.
lmforge also runs a second time as `lmforge serve --quantize int8` (same directory; `--no-int8` leaves it out),
and the goals are reported for both.
transformers applies a request's temperature only when the model's generation config samples, so both
servers get a view of the model directory whose generation_config.json says do_sample=true (symlinks, the
original is untouched). Servers are stopped with SIGTERM (then SIGKILL after a grace period).

    python bench/bench_serve.py                       # runs/shakespeare, levels 1,4,16,64, both servers
    python bench/bench_serve.py --quick --no-peer     # smoke run (< 1 min)
    python bench/bench_serve.py --model DIR --levels 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import LoadMonitor, print_json, print_table, start_run, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_SCALING = 5.0  # lmforge output tokens/s at concurrency 16 >= 5x concurrency 1
GOAL_PEER_RATIO = 2.0  # lmforge >= 2x the peer's throughput at concurrency 16


# ---- the workload --------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    """One completion request of the workload: the same object is sent to every server."""

    index: int
    prompt: str
    prompt_tokens: int  # as counted by the model directory's tokenizer
    max_tokens: int
    seed: int


def shakespeare_text() -> str:
    """The bundled Shakespeare corpus (the text the default model was trained on)."""
    from lmforge.data.bundled import bundled_path

    return lzma.decompress(bundled_path("shakespeare").read_bytes()).decode("utf-8")


def model_context(model_dir: Path) -> int:
    """The model's context length from its config.json (n_positions, max_position_embeddings or n_ctx)."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return 1024


def make_workload(
    model_dir: Path,
    count: int,
    seed: int = 0,
    min_tokens: int = 16,
    max_tokens: int = 128,
    min_prompt: int = 8,
    max_prompt: int = 256,
) -> list[BenchRequest]:
    """`count` seeded requests: a prompt of a random number of tokens cut from the Shakespeare corpus at a random
    line, and `max_tokens` drawn uniformly; prompt + max_tokens stays within the model's context, so no server
    has to truncate or refuse. Prompt lengths are measured with the model directory's own tokenizer."""
    from lmforge import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = model_context(model_dir)
    hi_out = max(1, min(max_tokens, context // 2))
    lo_out = min(min_tokens, hi_out)
    lines = shakespeare_text().splitlines(keepends=True)
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        out = rng.randint(lo_out, hi_out)
        budget = max(1, min(max_prompt, context - out - 2))  # 2 tokens of slack for re-tokenisation at the edge
        want = rng.randint(min(min_prompt, budget), budget)
        start = rng.randrange(len(lines) - 200)
        window = "".join(lines[start : start + 200])
        ids = tokenizer.encode(window)[:want]
        prompt = tokenizer.decode(ids)
        while ids and len(tokenizer.encode(prompt)) > want:  # decode -> encode may merge differently at the cut
            ids = ids[:-1]
            prompt = tokenizer.decode(ids)
        requests.append(BenchRequest(i, prompt, len(tokenizer.encode(prompt)), out, seed * 100_003 + i))
    return requests


def sampling_model_dir(model_dir: Path, out_dir: Path) -> Path:
    """A view of `model_dir` (symlinks to its files, same basename) whose generation_config.json says
    do_sample=true. transformers serve applies a request's temperature only when the model's generation config
    samples (otherwise it decodes greedily and warns that temperature is ignored); with this view both servers
    sample at the requested temperature. Nothing in `model_dir` changes."""
    view = out_dir / model_dir.name
    view.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "generation_config.json" and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["do_sample"] = True
    (view / "generation_config.json").write_text(json.dumps(config, indent=2))
    return view


# ---- the client ----------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What one streamed request did, with times in seconds from the start of its level."""

    index: int
    ok: bool = False
    error: str = ""
    status: int = 0
    sent: float = 0.0
    first_token: float | None = None  # arrival of the first chunk carrying text
    done: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of the chunks carrying text
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the usage chunk
    saw_done: bool = False  # "data: [DONE]" arrived (transformers serve does not send it)

    @property
    def output_tokens(self) -> int:
        """Tokens produced: the server's usage count, else the number of text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


def completion_body(req: BenchRequest, model: str, temperature: float) -> dict[str, Any]:
    """The JSON body of a streaming /v1/completions request (OpenAI's schema)."""
    return {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": temperature,
        "seed": req.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_completion(
    session: Any, base_url: str, body: dict[str, Any], result: RequestResult, origin: float, headers: dict[str, str]
) -> RequestResult:
    """Send one streaming completion through an `aiohttp.ClientSession` and record the arrival time of every
    text chunk and the usage chunk. Failure = a non-200 status, an error chunk, a transport error or a stream
    with neither text nor usage."""
    result.sent = time.perf_counter() - origin
    try:
        async with session.post(f"{base_url}/v1/completions", json=body, headers=headers) as response:
            result.status = response.status
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:300]!r}"
                return result
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.saw_done = True
                    break
                now = time.perf_counter() - origin
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
                    return result
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        if result.first_token is None:
                            result.first_token = now
                        result.chunk_times.append(now)
                        result.text += text
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
        result.ok = result.completion_tokens is not None or bool(result.chunk_times)
        if not result.ok:
            result.error = "stream ended without text or usage"
    except Exception as exc:  # transport errors, timeouts, bad JSON: a failed request, not a crashed benchmark
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.done = time.perf_counter() - origin
    return result


async def run_level(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    concurrency: int,
    temperature: float = 0.8,
    api_key: str | None = None,
    request_timeout: float = 300.0,
) -> tuple[list[RequestResult], float]:
    """Send `requests` through `concurrency` workers (each sends its next request when the previous one ends).
    Returns the results in request order and the wall time from the first send to the last byte.

    The client shares the 2 cores with the server it measures, so it is kept light: aiohttp on uvloop uses about
    half the CPU of httpx on asyncio's default loop for the same stream (0.13-0.16 against 0.27-0.32 CPUs at 16
    streams, measured 2026-12-03), and every CPU it takes is one the server's threads wait for."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    results: dict[int, RequestResult] = {}
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=request_timeout, connect=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        origin = time.perf_counter()

        async def worker() -> None:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = RequestResult(req.index)
                results[req.index] = result
                await stream_completion(
                    session, base_url, completion_body(req, model, temperature), result, origin, headers
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - origin
    return [results[r.index] for r in requests], wall


def run_async(coroutine: Any) -> Any:
    """Run a coroutine to completion on uvloop where it is installed (the bench and test extras bring it), else
    asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# ---- statistics ----------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall: float, concurrency: int) -> dict[str, Any]:
    """One level's figures (vLLM's benchmark names): request throughput, output tokens/s, TTFT and ITL p50/p99
    in ms (ITL = gaps between successive text chunks of a request), failed requests."""
    ok = [r for r in results if r.ok]
    ttft = [1e3 * (r.first_token - r.sent) for r in ok if r.first_token is not None]
    itl = [1e3 * (b - a) for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3) if wall > 0 else float("nan"),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / wall, 2) if wall > 0 else float("nan"),
        "prompt_tokens_reported": sum(r.prompt_tokens or 0 for r in ok),
        "ttft_ms_p50": round(percentile(ttft, 50), 1),
        "ttft_ms_p99": round(percentile(ttft, 99), 1),
        "itl_ms_p50": round(percentile(itl, 50), 2),
        "itl_ms_p99": round(percentile(itl, 99), 2),
        "done_marker": sum(r.saw_done for r in ok),
    }


# ---- the servers ---------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(threads: int) -> dict[str, str]:
    """The environment both servers get: the same thread count, Hugging Face offline and quiet."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def server_command(kind: str, model_dir: Path, port: int, peer_mode: str = "cb") -> tuple[list[str], str]:
    """(argv, model name to send) for `lmforge serve` or `transformers serve` on 127.0.0.1:port. For lmforge,
    `peer_mode` "int8" serves the same directory with `--quantize int8`, "si<N>" with `--stream-interval N`,
    "eager" with `--enforce-eager`."""
    if kind == "lmforge":
        name = model_dir.name
        argv = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        if peer_mode == "int8":
            argv += ["--quantize", "int8"]
        elif peer_mode.startswith("si"):
            argv += ["--stream-interval", peer_mode[2:]]
        elif peer_mode == "eager":
            argv.append("--enforce-eager")
        return argv + ["--served-model-name", name], name
    if kind == "transformers":
        # The CLI's console script is a two-line wrapper around transformers.cli.transformers.main.
        launcher = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        argv = [sys.executable, "-c", launcher, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--device", "cpu", "--log-level", "error"]
        if peer_mode == "cb":
            argv.append("--continuous-batching")
        return argv, str(model_dir)  # a pinned transformers server only accepts its own model argument as the name
    raise ValueError(f"unknown server {kind!r}")


def _own_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) in seconds, from /proc; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its descendants still running: `transformers serve
    --continuous-batching` (5.25) does its model's work in a child process."""
    seconds = _own_cpu_seconds(pid)
    if math.isnan(seconds):
        return seconds
    children: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.update(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    for child in children:
        more = _process_cpu_seconds(child)
        if not math.isnan(more):  # a child that exited meanwhile is left out
            seconds += more
    return seconds


class Server:
    """A server subprocess: started on a free port, waited for, stopped with SIGTERM then SIGKILL."""

    def __init__(self, kind: str, model_dir: Path, threads: int, peer_mode: str = "cb", log_dir: Path | None = None):
        self.kind = kind
        self.port = free_port()
        self.argv, self.model_name = server_command(kind, model_dir, self.port, peer_mode)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_s = float("nan")
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-"))
        self.log_path = log_dir / f"{kind}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(threads), cwd=str(ROOT)
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output (for error messages)."""
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Poll GET /health until 200 (at most `timeout` seconds); returns the seconds it took."""
        import httpx

        start = time.perf_counter()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.perf_counter() - start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"{self.kind} server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """CPU seconds the server (its process and that process's children) has used so far."""
        return _process_cpu_seconds(self.proc.pid)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def measure_level(
    server: Server, requests: list[BenchRequest], concurrency: int, temperature: float, request_timeout: float
) -> dict[str, Any]:
    """One pass of a level's requests against a running server, with the CPU used by it, us and the rest."""
    monitor = LoadMonitor()
    cpu0, client0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
    results, wall = run_async(
        run_level(
            server.base_url, server.model_name, requests, concurrency, temperature, request_timeout=request_timeout
        )
    )
    row = summarize(results, wall, concurrency)
    elapsed = time.perf_counter() - t0
    row["server_cpus"] = round((server.cpu_seconds() - cpu0) / elapsed, 2)
    row["client_cpus"] = round((time.process_time() - client0) / elapsed, 2)  # this benchmark process
    # CPUs busy with neither the server nor this client: other work on the shared machine.
    row["outside_cpus"] = round(max(0.0, monitor.stop()["other_cpus"] - row["server_cpus"]), 2)
    return row


def median_level(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output tokens/s among the undisturbed runs (all runs if none; the lower middle
    one for an even count), plus every run's tokens/s and the failures summed over all runs."""
    clean = [t for t in tries if not t.get("disturbed")] or tries
    ranked = sorted(clean, key=lambda row: row["output_tok_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["runs"] = len(tries)
    row["disturbed_runs"] = sum(bool(t.get("disturbed")) for t in tries)
    row["output_tok_per_s_runs"] = [t["output_tok_per_s"] for t in tries]
    row["failed_all_runs"] = sum(t["failed"] for t in tries)
    row["errors"] = sorted({e for t in tries for e in t["errors"]})[:3]
    return row


def start_servers(
    plan: list[tuple[str, str, str]],
    model_dir: Path,
    threads: int,
    temperature: float,
    ready_timeout: float,
    request_timeout: float,
) -> dict[str, Server]:
    """Start every (label, kind, peer mode) of `plan`, one after the other, each waited for and sent a warm-up
    request. A peer that fails to come up is reported and left out; lmforge failing raises."""
    servers: dict[str, Server] = {}
    for label, kind, mode in plan:
        server = Server(kind, model_dir, threads, mode or ("cb" if kind == "transformers" else ""))
        try:
            server.ready_s = server.wait_ready(ready_timeout)
            warm = BenchRequest(-1, "ROMEO:\n", 3, 8, 12345)
            results, _ = run_async(
                run_level(server.base_url, server.model_name, [warm], 1, temperature, request_timeout=request_timeout)
            )
            if not results[0].ok:
                raise RuntimeError(f"warm-up request failed: {results[0].error}\n{server.log_tail()}")
        except Exception as exc:
            server.stop()
            if kind == "lmforge":
                raise
            print(f"# {label} could not be measured: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            continue
        servers[label] = server
        print(f"# {label} ready in {server.ready_s:.1f} s on {server.base_url}", flush=True)
    return servers


def bench_interleaved(
    servers: dict[str, Server],
    workloads: dict[int, list[BenchRequest]],
    temperature: float,
    request_timeout: float,
    repeat: int,
    max_outside: float,
    retries: int,
) -> dict[str, list[dict[str, Any]]]:
    """Run every level `repeat` times per server, the servers taking turns within each round (the order rotates
    from round to round), so slow drift of the shared machine hits every server alike; idle servers use no CPU
    (< 0.01 CPUs measured). A run during which other work took more than `max_outside` CPUs is run again, at most
    `retries` times per level and server, and kept out of the median unless nothing better came. Returns the
    reported row of each level per server (`median_level`)."""
    labels = list(servers)
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for concurrency, requests in workloads.items():
        tries: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
        left = {label: retries for label in labels}
        for round_ in range(repeat):
            shift = round_ % len(labels)
            for label in labels[shift:] + labels[:shift]:
                while True:
                    row = measure_level(servers[label], requests, concurrency, temperature, request_timeout)
                    row["disturbed"] = row["outside_cpus"] > max_outside
                    tries[label].append(row)
                    print(
                        f"# {label} c={concurrency} run {round_ + 1}/{repeat}: {row['completed']}/{row['requests']} "
                        f"ok, {row['output_tok_per_s']} out tok/s, TTFT p50 {row['ttft_ms_p50']} ms, "
                        f"{row['wall_s']} s, outside load {row['outside_cpus']} CPUs"
                        + (" (disturbed: again)" if row["disturbed"] and left[label] > 0 else ""),
                        flush=True,
                    )
                    if not row["disturbed"] or left[label] <= 0:
                        break
                    left[label] -= 1
        for label in labels:
            rows[label].append(median_level(tries[label]))
    return rows


def _with_spread(value: float, runs: list[float]) -> str:
    """'705.3' or, over several runs, '705.3 (680.1..790.0)'."""
    return f"{value:.1f}" if len(runs) < 2 else f"{value:.1f} ({min(runs):.0f}..{max(runs):.0f})"


def level_rows(levels: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows, one per concurrency level."""
    return [
        [
            f"c={lv['concurrency']}",
            f"{lv['requests']} x {lv['runs']}"
            + (f" ({lv['disturbed_runs']} disturbed)" if lv["disturbed_runs"] else ""),
            lv["failed_all_runs"],
            f"{lv['wall_s']:.1f}",
            f"{lv['req_per_s']:.2f}",
            _with_spread(lv["output_tok_per_s"], lv["output_tok_per_s_runs"]),
            f"{lv['ttft_ms_p50']:.0f}",
            f"{lv['ttft_ms_p99']:.0f}",
            f"{lv['itl_ms_p50']:.1f}",
            f"{lv['itl_ms_p99']:.1f}",
            f"{lv['server_cpus']:.2f}",
            f"{lv['client_cpus']:.2f}",
            f"{lv['outside_cpus']:.2f}",
        ]
        for lv in levels
    ]


HEADERS = [
    "level",
    "requests x runs",
    "failed (all runs)",
    "wall s",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "server CPUs",
    "client CPUs",
    "outside CPUs",
]


def goals(ours: dict[str, Any], peers: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The three goals of issue 14 as (name, met or None when not measured, figures). The peer goal compares
    with the best peer run at c=16 (the faster of transformers serve's modes that were run)."""
    by_c = {lv["concurrency"]: lv for lv in ours["levels"]}
    out: list[tuple[str, bool | None, str]] = []
    name = f"lmforge out tok/s c=16 >= {GOAL_SCALING:g}x c=1"
    if 1 in by_c and 16 in by_c:
        scale = by_c[16]["output_tok_per_s"] / max(by_c[1]["output_tok_per_s"], 1e-9)
        out.append((name, scale >= GOAL_SCALING, f"{scale:.2f}x"))
    else:
        out.append((name, None, "levels 1 and 16 not both run"))
    if 64 in by_c:
        failed = by_c[64]["failed_all_runs"]
        out.append(("lmforge zero failed at c=64", failed == 0, f"{failed} failed in {by_c[64]['runs']} run(s)"))
    else:
        out.append(("lmforge zero failed at c=64", None, "level 64 not run"))
    name = f"lmforge >= {GOAL_PEER_RATIO:g}x peer out tok/s at c=16"
    at16 = [(lv["output_tok_per_s"], run["server"]) for run in peers for lv in run["levels"] if lv["concurrency"] == 16]
    if 16 in by_c and at16:
        best, label = max(at16)
        ratio = by_c[16]["output_tok_per_s"] / max(best, 1e-9)
        out.append((name, ratio >= GOAL_PEER_RATIO, f"{ratio:.2f}x (best peer: {label}, {best:.1f} tok/s)"))
    else:
        out.append((name, None, "no peer at c=16"))
    return out


def parse_levels(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (positive, in the given order)."""
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive integers, got {text!r}")
    return levels


def _run_all(
    plan: list[tuple[str, str, str]],
    runs: dict[str, dict[str, Any]],
    serve_dir: Path,
    workloads: dict[int, list[BenchRequest]],
    args: argparse.Namespace,
) -> None:
    """Start the servers of `plan`, measure them interleaved into `runs`, stop them all (also on errors)."""
    wait_for_quiet(args.wait_quiet)
    servers: dict[str, Server] = {}
    try:
        servers = start_servers(
            plan, serve_dir, args.threads, args.temperature, args.ready_timeout, args.request_timeout
        )
        monitor, start = LoadMonitor(), time.perf_counter()
        cpu0 = {label: server.cpu_seconds() for label, server in servers.items()}
        rows = bench_interleaved(
            servers,
            workloads,
            args.temperature,
            args.request_timeout,
            args.repeat,
            args.max_outside,
            args.repeat if args.max_outside < float("inf") else 0,
        )
        load = monitor.stop()
        # LoadMonitor counts the servers as "other"; what is left is load from outside this benchmark.
        servers_share = sum(s.cpu_seconds() - cpu0[k] for k, s in servers.items()) / (time.perf_counter() - start)
        load["outside_cpus"] = round(max(0.0, load["other_cpus"] - servers_share), 2)
        for label, server in servers.items():
            runs[label] = {"server": label, "ready_s": round(server.ready_s, 1), "argv": server.argv[-8:]}
            runs[label].update(levels=rows[label], load=load)
    finally:
        for label, server in servers.items():
            code = server.stop()
            if label in runs:
                runs[label]["exit_code"] = code


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the tables, the goals and a JSON line, and returns the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "shakespeare", help="model directory (both servers)")
    p.add_argument("--levels", type=parse_levels, default=None, help="concurrency levels (default 1,4,16,64)")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default max(128, 4 x concurrency): a level runs long enough that the "
        "waves of its closed loop overlap, not mostly a ramp and a tail; until 2026-12-03 max(8, 2 x concurrency))",
    )
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run transformers serve")
    p.add_argument(
        "--peer-mode",
        choices=["cb", "sequential", "both"],
        default=None,
        help="transformers serve with --continuous-batching (cb), its default sequential generate(), or both "
        "(default: both; cb with --quick)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run `lmforge serve --quantize int8` (default: yes, not with --quick)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        metavar="STEPS",
        help="also run `lmforge serve --stream-interval STEPS` (label lmforge-si<STEPS>)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="also run `lmforge serve --enforce-eager` (label lmforge-eager: the model's modules every step, not "
        "the compiled step)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server (OMP_NUM_THREADS)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--min-tokens", type=int, default=16, help="smallest max_tokens drawn")
    p.add_argument("--max-tokens", type=int, default=128, help="largest max_tokens drawn (capped at context / 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=None, help="runs of each level, median reported (default 3; 1 quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1,4, 4 requests each, short outputs")
    p.add_argument(
        "--max-outside",
        type=float,
        default=0.25,
        help="a run during which other processes took more CPUs than this is run again (default 0.25; not --quick)",
    )
    p.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for a quiet machine per server")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds a server may take to come up")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    args = p.parse_args(argv)
    if args.quick:
        levels = args.levels or [1, 4]
        per_level = args.requests or 4
        args.max_tokens = min(args.max_tokens, 24)
        args.min_tokens = min(args.min_tokens, 8)
        args.wait_quiet = 0.0
        peer_mode = args.peer_mode or "cb"
        args.repeat = args.repeat or 1
        args.max_outside = float("inf")  # a smoke run takes what it gets
    else:
        levels = args.levels or [1, 4, 16, 64]
        per_level = args.requests
        peer_mode = args.peer_mode or "both"
        args.repeat = args.repeat or 3
    model_dir = args.model.resolve()
    if not (model_dir / "config.json").is_file():
        sys.exit(f"no model at {model_dir}: train one with `bash scripts/quickstart.sh` or pass --model DIR")

    info = start_run(args.threads)
    workloads: dict[int, list[BenchRequest]] = {}
    for c in levels:  # a level's requests depend on its concurrency, not on which other levels run
        n = per_level or max(128, 4 * c)
        workloads[c] = make_workload(
            model_dir, n, seed=args.seed * 1000 + c, min_tokens=args.min_tokens, max_tokens=args.max_tokens
        )
    all_requests = [r for reqs in workloads.values() for r in reqs]
    print(
        f"# model {model_dir} (context {model_context(model_dir)}) | levels {levels} | "
        f"{len(all_requests)} requests | prompt tokens {min(r.prompt_tokens for r in all_requests)}.."
        f"{max(r.prompt_tokens for r in all_requests)} (sum {sum(r.prompt_tokens for r in all_requests)}) | "
        f"max_tokens {min(r.max_tokens for r in all_requests)}..{max(r.max_tokens for r in all_requests)} "
        f"(sum {sum(r.max_tokens for r in all_requests)}) | temperature {args.temperature} | threads {args.threads}",
        flush=True,
    )
    plan = [("lmforge", "lmforge", "")]
    if args.int8 if args.int8 is not None else not args.quick:
        plan.append(("lmforge-int8", "lmforge", "int8"))
    if args.stream_interval is not None:
        if args.stream_interval < 1:
            sys.exit(f"--stream-interval must be >= 1, got {args.stream_interval}")
        plan.append((f"lmforge-si{args.stream_interval}", "lmforge", f"si{args.stream_interval}"))
    if args.eager:
        plan.append(("lmforge-eager", "lmforge", "eager"))
    if args.peer:
        modes = ["cb", "sequential"] if peer_mode == "both" else [peer_mode]
        plan += [(f"transformers-{m}", "transformers", m) for m in modes]
    runs: dict[str, dict[str, Any]] = {}
    view_root = Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-model-"))
    serve_dir = sampling_model_dir(model_dir, view_root) if args.temperature > 0 else model_dir
    try:
        _run_all(plan, runs, serve_dir, workloads, args)
    finally:
        shutil.rmtree(view_root, ignore_errors=True)

    if runs:
        print(f"\n# load over the measurement (all servers): {next(iter(runs.values()))['load']}")
    for label, run in runs.items():
        print(f"\n## {label}  (ready in {run['ready_s']} s)")
        print_table(HEADERS, level_rows(run["levels"]))
        for lv in run["levels"]:
            if lv["errors"]:
                print(f"#   c={lv['concurrency']} errors: {lv['errors']}")

    variants = [run for label, run in runs.items() if label.startswith("lmforge")]
    peers = [run for label, run in runs.items() if not label.startswith("lmforge")]
    for ours, peer in [(o, p) for o in variants for p in peers]:
        print(f"\n## {ours['server']} / {peer['server']}")
        rows = []
        for ours_lv, peer_lv in zip(ours["levels"], peer["levels"]):
            rows.append(
                [
                    f"c={ours_lv['concurrency']}",
                    f"{ours_lv['req_per_s'] / max(peer_lv['req_per_s'], 1e-9):.2f}x",
                    f"{ours_lv['output_tok_per_s'] / max(peer_lv['output_tok_per_s'], 1e-9):.2f}x",
                    f"{ours_lv['output_tokens']} / {peer_lv['output_tokens']}",
                    f"{ours_lv['prompt_tokens_reported']} / {peer_lv['prompt_tokens_reported']}",
                ]
            )
        print_table(["level", "req/s ratio", "out tok/s ratio", "output tokens", "prompt tokens (usage)"], rows)

    print("\n## goals")
    goal_list = []
    for ours in variants:  # each lmforge variant against the same peers
        for name, met, figure in goals(ours, peers):
            name = name.replace("lmforge", ours["server"], 1)
            verdict = "not measured" if met is None else ("MET" if met else "NOT MET")
            print(f"# {name}: {figure} -> {verdict}")
            goal_list.append((name, met, figure))

    summary = {
        "bench": "serve",
        "machine": info,
        "model": str(model_dir),
        "levels": levels,
        "temperature": args.temperature,
        "quick": args.quick,
        "repeat": args.repeat,
        "runs": runs,
        "goals": [{"goal": n, "met": m, "figure": f} for n, m, f in goal_list],
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
