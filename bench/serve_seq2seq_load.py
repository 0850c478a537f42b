"""Encoder-decoder serving under load: `lmforge serve` of a Marian-shaped model, greedy completions at 1 and 16 at once.

Builds (once, in --work) a random encoder-decoder of Marian's shape (6 + 6 layers x 512, 8 heads, feed-forward
2048) with a translation BPE of 8,000 pieces trained on the bundled English-Spanish verse pairs, serves it with
`lmforge serve` on 127.0.0.1 (a free port) from each lmforge tree given (--root, repeatable: e.g. a worktree of an
older commit beside this one, alternating), and sends greedy completions of English verses (32 new tokens; random
weights write to the limit) one at a time and 16 at once. Prints completion tokens/s per tree and level.

    python bench/serve_seq2seq_load.py                                      # this tree
    git worktree add /tmp/old 63c0c50
    python bench/serve_seq2seq_load.py --root /tmp/old --root . --rounds 2  # before / after, alternating
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import os
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import lmforge_server  # noqa: E402


def build(work: Path) -> Path:
    """The model directory and its prompts (made once)."""
    from lmforge.models.seq2seq import Seq2SeqConfig, Seq2SeqForConditionalGeneration
    from lmforge.tokenizer import Tokenizer

    model_dir = work / "marian-shaped"
    if (model_dir / "prompts.json").is_file():
        return model_dir
    corpus = ROOT / "lmforge" / "data" / "corpora" / "en_es_bible_pairs.tsv.xz"
    rows = [line.split("\t") for line in lzma.open(corpus, "rt", encoding="utf-8").read().splitlines()]
    pairs = [(r[0], r[1]) for r in rows if len(r) >= 2][:4000]
    tok = Tokenizer.train_translation_bpe(pairs, vocab_size=8000)
    torch.manual_seed(0)
    config = Seq2SeqConfig(vocab_size=len(tok), d_model=512, encoder_layers=6, decoder_layers=6,
                           encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                           decoder_ffn_dim=2048, max_position_embeddings=128, dropout=0.0)  # fmt: skip
    Seq2SeqForConditionalGeneration(config).eval().save_pretrained(model_dir, tokenizer=tok)
    (model_dir / "prompts.json").write_text(json.dumps([en for en, _ in pairs[100:400]]), encoding="utf-8")
    return model_dir


async def level(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> float:
    """Completion tokens/s of `requests` greedy completions, `concurrency` in flight at a time."""
    todo = list(range(requests))
    tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            nonlocal tokens
            while todo:
                k = todo.pop()
                body = {"prompt": prompts[k % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - start)


def measure(root: Path, model_dir: Path, prompts: list[str], max_tokens: int) -> dict[int, float]:
    """Serve the model from the lmforge tree at `root` and measure both levels."""
    with lmforge_server(model_dir, root) as url:
        asyncio.run(level(url, prompts, 1, 2, 8))  # warm up
        return {c: asyncio.run(level(url, prompts, c, n, max_tokens)) for c, n in ((1, 8), (16, 32))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, action="append", help="an lmforge tree to serve from (default: this one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmforge-serve-seq2seq"))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()
    model_dir = build(a.work)
    prompts = json.loads((model_dir / "prompts.json").read_text(encoding="utf-8"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}; {model_dir}")
    for r in range(a.rounds):
        for root in a.root or [ROOT]:
            got = measure(root.resolve(), model_dir, prompts, a.max_tokens)
            print(f"round {r + 1} {root}: c=1 {got[1]:.0f} tok/s, c=16 {got[16]:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
