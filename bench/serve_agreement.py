"""Greedy agreement: `lmforge serve` under concurrent load against `model.generate` offline, on a trained model.

Starts `lmforge serve MODEL` on 127.0.0.1 (a free port), sends N greedy completions at once, and compares each
answer with `model.generate` run alone on the same prompt. A causal LM gets prompts of different lengths cut from
the bundled Shakespeare corpus (so they share decoding steps with rows of other lengths); an encoder-decoder gets
English verses from the bundled English-Spanish pairs (the server answers the ones waiting together with one
batched, padded `generate`). Batched rows use other matmul shapes and an attention mask, so a token may differ
where the best two logits are closer than float rounding; the script prints how many answers are identical and,
for the others, where they part (and, for a causal LM, by what logit margin).

    python bench/serve_agreement.py                        # runs/shakespeare, 32 requests of 48 tokens
    python bench/serve_agreement.py --model DIR --requests 64 --max-tokens 64
    python bench/serve_agreement.py --model runs/translate-en-es       # an encoder-decoder
"""

from __future__ import annotations

import argparse
import lzma
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import lmforge_server  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "shakespeare")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    from lmforge.auto import AutoModelForCausalLM, AutoTokenizer, model_type_of
    from lmforge.constants import context_length
    from lmforge.data import bundled_path
    from lmforge.models import registry

    try:
        registry.model_class("causal-lm", model_type_of(a.model), "serve_agreement")
    except ValueError:
        encoder_decoder(a)
        return
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

    bodies = [{"prompt": ids, "max_tokens": a.max_tokens, "temperature": 0, "logprobs": 0} for ids in prompts]
    answers = ask_all(a.model, bodies)

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


def encoder_decoder(a: argparse.Namespace) -> None:
    """The same for an encoder-decoder: the last English verses of the bundled pairs as sources, texts compared."""
    from lmforge.auto import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(a.model).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    corpus = ROOT / "lmforge" / "data" / "corpora" / "en_es_bible_pairs.tsv.xz"
    lines = lzma.open(corpus, "rt", encoding="utf-8").read().splitlines()
    sources = [line.split("\t")[0] for line in lines[-a.requests :]]
    answers = ask_all(a.model, [{"prompt": text, "max_tokens": a.max_tokens, "temperature": 0} for text in sources])
    same, notes = 0, []
    with torch.inference_mode():
        for text, answer in zip(sources, answers):
            ids = torch.tensor([tok.encode(text, add_special_tokens=True)])
            ref = tok.decode(model.generate(ids, max_new_tokens=a.max_tokens)[0], skip_special_tokens=True)
            got = answer["choices"][0]["text"]
            if got == ref:
                same += 1
                continue
            k = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
            notes.append(f"source of {ids.size(1)} tokens: texts part at character {k}")
    print(f"model {a.model}: {same}/{len(sources)} greedy answers identical to model.generate run alone")
    for note in notes:
        print("  ", note)


def ask_all(model_dir: Path, bodies: list[dict]) -> list[dict]:
    """Serve model_dir on 127.0.0.1 and send every completion body at once; the answers, in order."""
    with lmforge_server(model_dir) as url:

        def ask(body: dict) -> dict:
            return httpx.post(url + "/v1/completions", json=body, timeout=300).json()

        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(ask, bodies))


if __name__ == "__main__":
    main()
