"""Greedy agreement: `lmforge serve` under concurrent load against `model.generate` offline, on a trained model.

Starts `lmforge serve MODEL` on 127.0.0.1 (a free port), sends N greedy completions at once (prompts of different
lengths cut from the bundled Shakespeare corpus, so they share decoding steps with rows of other lengths), and
compares each answer's tokens with `model.generate` run alone on the same prompt. Batched rows use other matmul
shapes and an attention mask, so a token may differ where the best two logits are closer than float rounding;
the script prints how many answers are identical and, for the others, where they part and by what logit margin.

    python bench/serve_agreement.py                        # runs/shakespeare, 32 requests of 48 tokens
    python bench/serve_agreement.py --model DIR --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import lzma
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "shakespeare")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    from lmforge.auto import AutoModelForCausalLM, AutoTokenizer
    from lmforge.constants import context_length
    from lmforge.data import bundled_path

    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    with lzma.open(bundled_path("shakespeare"), "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    rng = random.Random(0)
    longest = context_length(model.config) - a.max_tokens
    prompts = []
    for _ in range(a.requests):
        start = rng.randrange(len(text) - 2000)
        ids = tok.encode(text[start : start + 2000])[: rng.randint(4, longest)]
        prompts.append(ids)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(a.model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        def ask(ids: list[int]) -> dict:
            body = {"prompt": ids, "max_tokens": a.max_tokens, "temperature": 0, "logprobs": 0}
            return httpx.post(url + "/v1/completions", json=body, timeout=300).json()

        with ThreadPoolExecutor(a.requests) as pool:
            answers = list(pool.map(ask, prompts))
    finally:
        server.terminate()
        server.wait(30)

    eos = model.config.eos_token_id
    same, notes = 0, []
    with torch.inference_mode():
        for ids, answer in zip(prompts, answers):
            choice = answer["choices"][0]
            ref = model.generate(torch.tensor([ids]), max_new_tokens=a.max_tokens)[0, len(ids) :].tolist()
            ref = ref[: answer["usage"]["completion_tokens"]]
            ref_text = tok.decode([t for t in ref if t != eos], skip_special_tokens=True)
            if choice["text"] == ref_text:
                same += 1
                continue
            k = next(i for i, (x, y) in enumerate(zip(choice["text"], ref_text)) if x != y) if ref_text else 0
            logits = model(torch.tensor([ids + ref])).logits[0, len(ids) - 1 :]  # the logits behind each new token
            top2 = logits.topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            notes.append(
                f"prompt of {len(ids)} tokens: texts part at character {k}; smallest greedy margin {margin:.2e}"
            )
    print(f"model {a.model}: {same}/{len(prompts)} greedy answers identical to model.generate run alone")
    for note in notes:
        print("  ", note)


if __name__ == "__main__":
    main()
