"""Shared helpers for the lmforge-vs-Hugging Face benchmarks (bench_train.py, bench_generate.py, bench_seq2seq.py).

Both models get the SAME weights: lmforge's model is saved with `save_pretrained` (Hugging Face
GPT-2 layout) and loaded with `transformers.GPT2LMHeadModel.from_pretrained(dir, attn_implementation="sdpa")`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The benchmark config from the issue: 6 layers, 6 heads, width 384, context 256, vocab 8192.
BENCH_CONFIG = dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=8192, dropout=0.0, eos_token_id=None)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. after some parallel work)
        pass


def quiet_hf() -> None:
    """Silence Hugging Face's progress bars and informational warnings (they are not timed anyway)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older/newer transformers
        pass


def build_pair(seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(lmforge GPTForCausalLM, HF GPT2LMHeadModel with the same weights, lmforge config)."""
    quiet_hf()
    from transformers import GPT2LMHeadModel

    from lmforge.config import GPTConfig
    from lmforge.models.gpt import GPTForCausalLM

    torch.manual_seed(seed)
    config = GPTConfig(**{**BENCH_CONFIG, **overrides})
    ours = GPTForCausalLM(config)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as d:
        ours.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    if getattr(hf.config, "_attn_implementation", "sdpa") != "sdpa":
        raise RuntimeError(f"HF model uses {hf.config._attn_implementation!r} attention, expected sdpa")
    # Same weights, checked tensor by tensor (HF stores Conv1D weights transposed).
    from lmforge.hub import to_hf_state_dict

    hf_state = hf.state_dict()
    for name, t in to_hf_state_dict(ours).items():
        if not torch.equal(t, hf_state[name]):
            raise RuntimeError(f"weight {name} differs between lmforge and HF after save/load")
    return ours, hf, config


# The seq2seq benchmark shape: a 6+6-layer Marian (d_model 512, 8 heads, FFN 2048, vocab 8000), OPUS-MT-like.
MARIAN_BENCH_CONFIG = dict(
    vocab_size=8000,
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    max_position_embeddings=512,
    activation_function="swish",
    scale_embedding=True,
    pad_token_id=7999,
    decoder_start_token_id=7999,
    eos_token_id=0,
    forced_eos_token_id=0,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def build_seq2seq_pair(seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(lmforge model from AutoModelForSeq2SeqLM, transformers MarianMTModel, transformers config): a seeded
    random MarianMTModel (sdpa) saved with save_pretrained and loaded by lmforge, every tensor checked."""
    quiet_hf()
    from transformers import MarianConfig, MarianMTModel

    from lmforge import AutoModelForSeq2SeqLM
    from lmforge.hub import to_hf_state_dict

    torch.manual_seed(seed)
    config = MarianConfig(**{**MARIAN_BENCH_CONFIG, **overrides})
    hf = MarianMTModel(config)
    with torch.no_grad():  # transformers initialises it to zeros; make it count (as a trained model's does)
        hf.final_logits_bias.normal_(std=0.1)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as d:
        hf.save_pretrained(d)
        hf = MarianMTModel.from_pretrained(d, attn_implementation="sdpa")
        ours = AutoModelForSeq2SeqLM.from_pretrained(d)
    hf_state = hf.state_dict()
    for name, t in to_hf_state_dict(ours).items():
        if name not in hf_state or not torch.equal(t, hf_state[name]):
            raise RuntimeError(f"weight {name} differs between lmforge and transformers after save/load")
    return ours, hf, config


# ---- peak FLOP/s ---------------------------------------------------------------------------
def matmul_probe(n: int = 2048, seconds: float = 1.0, trials: int = 3) -> float:
    """Our own cross-check of the fp32 matmul peak: best of `trials` windows of an n x n x n matmul
    written into a preallocated output (no allocation in the loop)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(trials):
        reps, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=c)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed > seconds / trials:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def bandwidth_probe(megabytes: int = 256, trials: int = 5) -> float:
    """GB/s of reading a buffer much larger than the caches (a sum over it): what weight streaming can reach."""
    buf = torch.ones(megabytes * (1 << 20) // 4)
    buf.sum()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def measure_peak(quick: bool = False) -> dict[str, float]:
    """fp32 matmul peak from lmforge.utils.matmul_peak_flops (best of 3) and our own probe
    (2048^3 and 3072^3 into a preallocated output, best windows)."""
    from lmforge.utils import matmul_peak_flops

    lm = max(matmul_peak_flops("cpu", torch.float32, seconds=0.1 if quick else 0.3) for _ in range(1 if quick else 3))
    probe = matmul_probe(2048, seconds=0.3 if quick else 1.5, trials=1 if quick else 3)
    if not quick:
        probe = max(probe, matmul_probe(3072, seconds=1.0, trials=2))
    return {"lmforge_matmul_peak": lm, "probe_matmul_peak": probe, "peak": max(lm, probe)}


def linear_gemm_seconds(tokens: int, linears: dict[tuple[int, int], int], seconds_each: float = 0.2) -> float:
    """Best-case seconds for the matmuls of forward + backward of nn.Linear layers, in the layouts
    autograd uses: y = x W^T, dx = dy W, dW = dy^T x. `linears` maps (in, out) -> how many layers.
    Each distinct product is timed on its own (best of several), then summed: a floor for the
    GEMM part of one training step."""
    total = 0.0
    for (k, n), count in linears.items():
        x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        for fn in (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x):
            fn()
            best, end = float("inf"), time.perf_counter() + seconds_each
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            total += count * best
    return total


def wait_for_quiet(max_seconds: float, idle_fraction: float = 0.85, window: float = 2.0, needed: int = 2) -> float:
    """Wait (at most max_seconds) until the CPUs were >= idle_fraction idle for `needed` consecutive
    `window`-second windows; the machine is shared. Returns the seconds waited."""
    if max_seconds <= 0:
        return 0.0
    start, ok = time.perf_counter(), 0
    while time.perf_counter() - start < max_seconds:
        b0, t0 = _proc_stat_busy()
        time.sleep(window)
        b1, t1 = _proc_stat_busy()
        idle = 1.0 - (b1 - b0) / max(t1 - t0, 1.0)
        ok = ok + 1 if idle >= idle_fraction else 0
        if ok >= needed:
            break
    waited = time.perf_counter() - start
    print(f"# waited {waited:.0f} s for a quiet machine ({'quiet' if ok >= needed else 'still busy, going ahead'})")
    return waited


# ---- load on the machine while we measure --------------------------------------------------
def _proc_stat_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)  # idle + iowait
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def _self_jiffies() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return float(fields[11]) + float(fields[12])  # utime + stime (incl. all threads)


class LoadMonitor:
    """How much of the machine other processes used between start() and stop().

    other_cpus = CPUs' worth of busy time not spent by this process (0 = quiet, 1 = one core taken).
    """

    def __init__(self) -> None:
        self.start_loadavg = os.getloadavg()
        self._b0, self._t0 = _proc_stat_busy()
        self._s0 = _self_jiffies()
        self._w0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        b1, t1 = _proc_stat_busy()
        s1 = _self_jiffies()
        ncpu = os.cpu_count() or 1
        total = max(t1 - self._t0, 1.0)
        busy, mine = b1 - self._b0, s1 - self._s0
        return {
            "loadavg_start": round(self.start_loadavg[0], 2),
            "loadavg_end": round(os.getloadavg()[0], 2),
            "machine_busy_cpus": round(ncpu * busy / total, 2),
            "this_process_cpus": round(ncpu * mine / total, 2),
            "other_cpus": round(max(0.0, ncpu * (busy - mine) / total), 2),
            "cpus": ncpu,
        }


# ---- timing / reporting --------------------------------------------------------------------
@dataclass
class Samples:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> str:
        if not self.values:
            return "-"
        return f"{min(self.values):.4g}..{max(self.values):.4g}"


def start_run(threads: int) -> dict[str, Any]:
    """Set the thread count and print the one-line machine header every benchmark starts with."""
    set_threads(threads)
    info = machine_info(threads)
    print(
        f"# {info['cpu']} | {info['cpus']} CPUs | torch {info['torch']} ({info['isa']}) | "
        f"transformers {info['transformers']} | threads {threads} | lmforge {info['lmforge_commit']}"
    )
    return info


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except Exception:
        pass
    commit = "?"
    try:  # read-only git queries: which library code was measured
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = (
            subprocess.run(
                ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "?"
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "lmforge"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if dirty:
            commit += "+uncommitted lmforge changes"
    except Exception:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "lmforge_commit": commit,
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def print_json(summary: dict[str, Any]) -> None:
    print("JSON " + json.dumps(summary, sort_keys=False, default=float))


@contextmanager
def lmforge_server(model_dir: Path, root: Path | None = None, timeout: float = 180.0) -> Iterator[str]:
    """`python -m lmforge serve model_dir` on 127.0.0.1 at a free port, from the lmforge tree at `root` (default:
    the one importable here), ready (GET /health == 200); yields its URL and stops it afterwards."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"PYTHONPATH": str(root)} if root is not None else {})}
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port)],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"lmforge serve {model_dir} exited with status {server.returncode}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"lmforge serve {model_dir} was not ready in {timeout:.0f} s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
