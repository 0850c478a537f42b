"""Small builders shared by several test files (import as `from helpers import ...`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import torch
from transformers import GPT2Config, GPT2LMHeadModel  # test-only oracle

# A few lines of English text, repeated: enough for a tiny BPE tokenizer and a tiny corpus.
DOCS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long.",
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "All the world's a stage, and all the men and women merely players; they have exits.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 6


def hf_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny random Hugging Face GPT-2 (no dropout), weights spread so outputs are clear-cut."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


# Float rounding (another batch layout, the KV cache, transformers' kernels, another CPU or thread count) moves the
# logits of the tests' tiny models (|logit| < ~10) by a few 1e-6 (measured: at most 5e-6 between an AVX-512 run and
# a one-thread run on MKL's compatible path without SIMD kernels), within the 1e-5 their parity tests allow. Greedy
# decodings computed differently can only disagree at a step where the best two logits are closer than that, so
# tests compare such tokens exactly only after checking that every step's choice is clear by this margin, 10x the
# parity tolerance (a property of the seeded model and prompt, the same on every machine).
GREEDY_MARGIN = 1e-4


def greedy_margin(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """The smallest gap between the best and the second-best logit over the greedy steps that wrote `rows`
    (prompt + new tokens, no padding), each row scored alone in one full forward. `processor(ids, logits)`
    (ids (1, t), logits (1, V)) is applied first where the decoding changed the logits (a repetition penalty)."""
    gaps = []
    with torch.no_grad():
        for row, n in zip(rows, prompt_lengths):
            ids = torch.as_tensor(list(row))[None]  # (1, T)
            logits = model(ids).logits[0, n - 1 : -1].float()  # (T - n, V): the logits that chose each new token
            if processor is not None:
                logits = torch.cat([processor(ids[:, : n + t], logits[t][None]) for t in range(len(logits))])
            if len(logits):
                top2 = logits.topk(2, dim=-1).values  # (T - n, 2)
                gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    return min(gaps)


def save_tiny_gpt(
    directory: Path, texts: Sequence[str], vocab_size: int = 400, n_positions: int = 64, n_layer: int = 1
) -> Path:
    """A seeded random GPT (2 heads, width 32) and a byte-level BPE trained on `texts`, saved in Hugging Face's
    layout in `directory`; returns it."""
    from lmforge import GPTConfig, GPTForCausalLM, Tokenizer

    tok = Tokenizer.train_bpe(iterator=list(texts), vocab_size=vocab_size)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_layer=n_layer,
        n_head=2,
        n_embd=32,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPTForCausalLM(config).save_pretrained(directory, tokenizer=tok)
    return directory


# ---------------------------------------------------------------------------------------------- a real server
TIMEOUT = 60.0  # seconds any one wait on a server may take


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lmforge serve DIR` on 127.0.0.1 at a free port, ready (GET /health == 200) or failed."""

    def __init__(self, model: Path, *args: str, ready: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready in time")

    def stop(self) -> str:
        """SIGTERM, then kill if it has not exited; returns its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read()
