"""bench/bench_serve.py: the workload, the SSE client (against an aiohttp server on 127.0.0.1), the statistics,
and one bounded --quick run against a real `lmforge serve` subprocess on 127.0.0.1 (a tiny model, 2 levels of 4
requests of at most 8 tokens)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import save_tiny_gpt

from lmforge import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["To be, or not to be, that is the question.", "Now is the winter of our discontent."] * 20


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "bench_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT (context 64) with a byte-level BPE, saved in Hugging Face's layout."""
    return save_tiny_gpt(tmp_path_factory.mktemp("tiny-gpt"), TEXTS, vocab_size=300)


# ------------------------------------------------------------------------------ workload
def test_workload_is_seeded_and_fits_the_context(bench: ModuleType, model_dir: Path) -> None:
    first = bench.make_workload(model_dir, 12, seed=3, min_tokens=4, max_tokens=128)
    again = bench.make_workload(model_dir, 12, seed=3, min_tokens=4, max_tokens=128)
    other = bench.make_workload(model_dir, 12, seed=4, min_tokens=4, max_tokens=128)
    assert first == again and first != other
    tok = Tokenizer.from_pretrained(model_dir)
    for req in first:
        assert req.prompt and req.prompt_tokens == len(tok.encode(req.prompt))
        assert 4 <= req.max_tokens <= 32  # capped at context / 2 = 32
        assert req.prompt_tokens + req.max_tokens <= 64
    assert len({r.prompt for r in first}) > 1 and len({r.max_tokens for r in first}) > 1
    assert len({r.seed for r in first}) == 12


def test_sampling_view_links_the_files_and_turns_sampling_on(
    bench: ModuleType, model_dir: Path, tmp_path: Path
) -> None:
    view = bench.sampling_model_dir(model_dir, tmp_path)
    assert view.name == model_dir.name
    assert json.loads((view / "generation_config.json").read_text())["do_sample"] is True
    assert (view / "model.safetensors").resolve() == (model_dir / "model.safetensors").resolve()
    assert not (model_dir / "generation_config.json").exists()  # the original directory is untouched


# ------------------------------------------------------------------------------ client
def sse(*chunks: object) -> bytes:
    """A server-sent-events body: each chunk as a `data:` line (dicts as JSON)."""
    return b"".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks)


def run_one(bench: ModuleType, answer: tuple[int, bytes]) -> tuple[object, dict]:
    """Send one request through the bench's client to a real aiohttp server on 127.0.0.1 (a free port) that
    answers `answer`; returns (result, the JSON body it received plus its path)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: dict = {}

    async def handle(request: web.Request) -> web.Response:
        seen.update(await request.json())
        seen["_path"] = request.path
        status, body = answer
        return web.Response(status=status, body=body, content_type="text/event-stream")

    async def go() -> object:
        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        async with TestServer(app, host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            req = bench.BenchRequest(0, "ROMEO:", 2, 5, 7)
            result, _ = await bench.run_level(base, "tiny", [req], 1, temperature=0.8, request_timeout=30.0)
            return result[0]

    return asyncio.run(go()), seen


def test_client_counts_text_chunks_and_usage(bench: ModuleType) -> None:
    body = sse(
        {"object": "text_completion", "choices": [{"index": 0, "text": "Ay", "finish_reason": None}]},
        {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": None}]},
        {"object": "text_completion", "choices": [{"index": 0, "text": ", sir", "finish_reason": "length"}]},
        {"object": "text_completion", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}},
        "[DONE]",
    )
    result, sent = run_one(bench, (200, body))
    assert sent["_path"] == "/v1/completions" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 5 and sent["seed"] == 7
    assert result.ok and not result.error and result.saw_done
    assert result.text == "Ay, sir" and len(result.chunk_times) == 2  # the empty chunk is not a token arrival
    assert result.output_tokens == 5 and result.prompt_tokens == 2  # the usage count wins over the chunk count
    assert result.first_token is not None and result.sent <= result.first_token <= result.done


def test_client_without_usage_or_done_counts_chunks(bench: ModuleType) -> None:
    body = sse(*({"choices": [{"index": 0, "text": w}]} for w in ["a", "b", "c"]))  # transformers sends no [DONE]
    result, _ = run_one(bench, (200, body))
    assert result.ok and not result.saw_done and result.completion_tokens is None and result.output_tokens == 3


@pytest.mark.parametrize(
    ("response", "message"),
    [
        ((429, json.dumps({"error": {"message": "queue full", "type": "rate_limit"}}).encode()), "HTTP 429"),
        ((200, sse({"choices": [{"text": "x"}]}, {"error": {"message": "boom"}})), "boom"),
        ((200, sse("[DONE]")), "without text or usage"),
        ((200, b"data: {not json\n\n"), "JSONDecodeError"),
    ],
)
def test_client_failures_are_counted_not_raised(bench: ModuleType, response: tuple[int, bytes], message: str) -> None:
    result, _ = run_one(bench, response)
    assert not result.ok and message in result.error


# ------------------------------------------------------------------------------ statistics
def test_percentile_and_summary(bench: ModuleType) -> None:
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert bench.percentile([], 50) != bench.percentile([], 50)  # NaN
    good = bench.RequestResult(0, ok=True, sent=0.0, first_token=0.1, done=0.4, chunk_times=[0.1, 0.2, 0.4])
    good.completion_tokens, good.prompt_tokens = 3, 5
    bad = bench.RequestResult(1, ok=False, error="HTTP 503: b'busy'")
    row = bench.summarize([good, bad], wall=2.0, concurrency=2)
    assert (row["requests"], row["completed"], row["failed"], row["errors"]) == (2, 1, 1, ["HTTP 503: b'busy'"])
    assert row["req_per_s"] == 0.5 and row["output_tok_per_s"] == 1.5 and row["prompt_tokens_reported"] == 5
    assert row["ttft_ms_p50"] == 100.0 and row["itl_ms_p50"] == 150.0  # gaps of 100 and 200 ms


def test_goals_need_the_levels_they_judge(bench: ModuleType) -> None:
    def run(name: str, **tok_s: float) -> dict:
        levels = [
            {"concurrency": int(c[1:]), "output_tok_per_s": v, "failed": 0, "failed_all_runs": 0, "runs": 3}
            for c, v in tok_s.items()  # keys like c1, c16
        ]
        return {"server": name, "levels": levels}

    ours = run("lmforge", c1=10.0, c16=60.0, c64=70.0)
    met = bench.goals(ours, [run("transformers-cb", c16=20.0), run("transformers-sequential", c16=25.0)])
    assert [m for _, m, _ in met] == [True, True, True] and "2.40x" in met[2][2] and "sequential" in met[2][2]
    unmet = bench.goals(run("lmforge", c1=10.0, c16=40.0), [run("transformers-cb", c16=30.0)])
    assert [m for _, m, _ in unmet] == [False, None, False]
    ours["levels"][2]["failed_all_runs"] = 1  # one failure in any run fails the goal
    assert bench.goals(ours, [])[1][1] is False and bench.goals(ours, [])[2][1] is None


def test_median_level_keeps_the_middle_run_and_all_failures(bench: ModuleType) -> None:
    tries = [
        {"output_tok_per_s": v, "failed": f, "errors": e, "wall_s": w}
        for v, f, e, w in [(30.0, 0, [], 1.0), (10.0, 2, ["HTTP 503"], 3.0), (20.0, 0, [], 2.0)]
    ]
    row = bench.median_level(tries)
    assert row["output_tok_per_s"] == 20.0 and row["wall_s"] == 2.0 and row["failed"] == 0
    assert row["failed_all_runs"] == 2 and row["errors"] == ["HTTP 503"] and row["runs"] == 3
    assert row["output_tok_per_s_runs"] == [30.0, 10.0, 20.0]
    assert bench._with_spread(20.0, [30.0, 10.0, 20.0]) == "20.0 (10..30)"
    assert bench._with_spread(20.0, [20.0]) == "20.0"
    tries[0]["disturbed"] = True  # a run under outside load is kept out of the median when others exist
    row = bench.median_level(tries)
    assert row["output_tok_per_s"] == 10.0 and row["disturbed_runs"] == 1 and row["runs"] == 3
    assert bench.median_level([tries[0]])["output_tok_per_s"] == 30.0  # ... and used when nothing better came


def test_a_servers_cpu_time_includes_its_child_processes(bench: ModuleType) -> None:
    """transformers serve (5.25) decodes in a child process: the server's CPU time is its whole process tree's,
    not the idle parent's (which made every peer run look disturbed by outside load)."""
    import math
    import os
    import signal
    import subprocess
    import time

    busy = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"
    parent = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)  # its own process group
    try:
        deadline = time.monotonic() + 30
        while bench._process_cpu_seconds(parent.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
        own = bench._own_cpu_seconds(parent.pid)
        total = bench._process_cpu_seconds(parent.pid)
        assert total >= 0.6 and own < 0.5 * total  # the busy child's 0.6 s counted, the parent barely busy
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
    assert math.isnan(bench._process_cpu_seconds(parent.pid))  # gone


# ------------------------------------------------------------------------------ a real run
@pytest.fixture
def restore_threads() -> Iterator[None]:
    """start_run sets this process's torch threads; put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_against_lmforge_serve(
    bench: ModuleType, model_dir: Path, restore_threads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--quick", "--no-peer", "--model", str(model_dir), "--levels", "1,2", "--requests", "4"]
    argv += ["--max-tokens", "8", "--threads", "1", "--ready-timeout", "120", "--request-timeout", "60"]
    summary = bench.main(argv + ["--stream-interval", "2", "--eager"])
    out = capsys.readouterr().out
    run = summary["runs"]["lmforge"]
    assert run["exit_code"] is not None  # stopped
    grouped = summary["runs"]["lmforge-si2"]  # the same server with --stream-interval 2, side by side
    assert grouped["argv"][-4:-2] == ["--stream-interval", "2"] and "--stream-interval" not in run["argv"]
    assert [lv["completed"] for lv in grouped["levels"]] == [4, 4] and grouped["levels"][1]["done_marker"] == 4
    eager = summary["runs"]["lmforge-eager"]  # and with --enforce-eager
    assert eager["argv"][-3] == "--enforce-eager" and "--enforce-eager" not in run["argv"]
    assert [lv["completed"] for lv in eager["levels"]] == [4, 4]
    assert eager["levels"][0]["output_tokens"] == run["levels"][0]["output_tokens"]  # one stream: the same logits
    workloads = [bench.make_workload(model_dir, 4, seed=c, min_tokens=8, max_tokens=8) for c in (1, 2)]
    for level, concurrency, workload in zip(run["levels"], [1, 2], workloads):
        assert level["concurrency"] == concurrency and level["requests"] == 4
        assert level["failed_all_runs"] == 0 and level["completed"] == 4 and level["runs"] == 1, level["errors"]
        assert 4 <= level["output_tokens"] <= 4 * 8  # at least one token each, never past max_tokens
        assert level["prompt_tokens_reported"] == sum(r.prompt_tokens for r in workload)
        assert level["done_marker"] == 4  # every stream ended with data: [DONE]
        assert level["ttft_ms_p50"] > 0 and level["req_per_s"] > 0 and level["output_tok_per_s"] > 0
    assert "| c=1 " in out and "out tok/s" in out and "## goals" in out and "not measured" in out
    assert json.loads(out.split("JSON ", 1)[1].splitlines()[0])["runs"]["lmforge"]["levels"][0]["failed"] == 0
