"""Small builders shared by several test files (import as `from helpers import ...`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
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
        # its output read as it comes: a pipe nobody drains fills (64 KiB of access log lines) and then blocks
        # the server's logging, and so the server
        self._output: list[str] = []
        self._reader = threading.Thread(target=lambda: self._output.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        if ready:
            self.wait_ready()

    def output(self) -> str:
        """What the server has written so far (all of it once it has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(TIMEOUT)
        return "".join(self._output)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.output()}")
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
        return self.output()


# ---------------------------------------------------------------------------------------------- a tiny Whisper
WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|zh|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
WHISPER_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("Ġ", "s"), ("o", "n"), ("e", "r")]


def save_tiny_whisper(directory: Path, seed: int = 0, multilingual: bool = True, spread: float = 0.5) -> Path:
    """A seeded random transformers Whisper (width 32, 2 + 2 layers, 3000 input frames), its tokenizer (byte-level
    BPE: 256 bytes + a few merges, then Whisper's special tokens, as transformers' WhisperTokenizer saves them),
    preprocessor_config.json and a generation_config.json in openai/whisper-*'s shape (language and task ids,
    forced_decoder_ids, suppress_tokens), in `directory`. `spread`: noise added to the weights so that decoding
    depends on the audio. English-only (multilingual=False): no language or task tokens, as whisper-tiny.en."""
    import json

    from tokenizers import pre_tokenizers
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in WHISPER_MERGES:
        vocab[a + b] = len(vocab)
    specials = WHISPER_SPECIALS if multilingual else [t for t in WHISPER_SPECIALS if t[2:-2] not in ("en", "zh", "de")]
    vocab[specials[0]] = len(vocab)  # <|endoftext|> closes vocab.json, as in Whisper's
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in WHISPER_MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    tok = WhisperTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), additional_special_tokens=specials[1:]
    )
    tok.save_pretrained(directory)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    eos, start, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=48,
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=start,
        begin_suppress_tokens=[220, eos],
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "model.encoder.embed_positions.weight":  # the fixed sinusoids stay as they are
                p.add_(spread * torch.randn_like(p))
    model.save_pretrained(directory)
    generation = {
        "decoder_start_token_id": start,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "begin_suppress_tokens": [220, eos],
        "suppress_tokens": [1, 2, 3, 4, 5, 60, 61, ids["<|startoflm|>"], ids["<|startofprev|>"]],
        "no_timestamps_token_id": no_ts,
        "max_length": 48,
        "is_multilingual": multilingual,
    }
    if multilingual:
        generation["lang_to_id"] = {t: ids[t] for t in ("<|en|>", "<|zh|>", "<|de|>")}
        generation["task_to_id"] = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
        generation["forced_decoder_ids"] = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        generation["forced_decoder_ids"] = [[1, no_ts]]
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    WhisperFeatureExtractor().save_pretrained(directory)
    return directory
