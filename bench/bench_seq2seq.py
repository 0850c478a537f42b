"""Encoder-decoder speed: lmforge vs transformers' MarianMTModel (sdpa) on the same weights, fp32.

A seeded random MarianMTModel of an OPUS-MT-like shape (6+6 layers, d_model 512, 8 heads, FFN 2048, vocab 8000)
is saved with save_pretrained and loaded by lmforge's AutoModelForSeq2SeqLM (every tensor checked). Two parts:

- train: forward with labels + backward + AdamW step + zero_grad on random (source, target) pairs, B=16,
  source 48 and target 48 tokens; alternating rounds (ABBA), median tokens/s (source + target tokens). Goal >= 1.2x.
- decode: greedy and beam-4 generation at batch 1 and 8, a source of 32 random tokens, exactly 64 new tokens
  (min_new_tokens = max_new_tokens on both sides); calls alternate within each repeat, medians are reported and the
  outputs must be identical token for token. Goal >= 2x.

Ratios are transformers time / lmforge time (> 1: lmforge is faster).

    python bench/bench_seq2seq.py            # full run (a few minutes on 2 quiet cores)
    python bench/bench_seq2seq.py --quick    # smoke check (< 1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (  # noqa: E402
    LoadMonitor,
    Samples,
    build_seq2seq_pair,
    measure_peak,
    print_json,
    print_table,
    start_run,
    wait_for_quiet,
)

TRAIN_GOAL, DECODE_GOAL = 1.2, 2.0


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The same AdamW for both models, with lmforge's param-group rule (no decay for biases, norms, embeddings)."""
    from lmforge.training.optim import param_groups

    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step on a (source, target) batch: the decoder input is the labels shifted right (both sides)."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().item()


def bench_train(ours, hf, config, args: argparse.Namespace, g: torch.Generator) -> dict:
    """Alternating training rounds; returns tokens/s per model, the ratio and the first/second-step losses."""
    B, S, T, V = args.batch, args.source, args.target, config.vocab_size
    n = max(args.warmup + args.repeats * args.steps, 2)
    batches = [
        {
            "input_ids": torch.randint(1, V - 1, (B, S), generator=g),  # no pad (V - 1) or EOS (0) inside
            "attention_mask": torch.ones(B, S, dtype=torch.long),
            "labels": torch.randint(1, V - 1, (B, T), generator=g),
        }
        for _ in range(n)
    ]
    models = {
        "lmforge": (ours, make_optimizer(ours, args.lr, args.weight_decay)),
        "hf": (hf, make_optimizer(hf, args.lr, args.weight_decay)),
    }
    for m, _ in models.values():
        m.train()
    losses = {name: [train_step(m, o, batches[0]), train_step(m, o, batches[1])] for name, (m, o) in models.items()}
    d1 = abs(losses["lmforge"][0] - losses["hf"][0])
    d2 = abs(losses["lmforge"][1] - losses["hf"][1])
    print(f"first-step loss  lmforge {losses['lmforge'][0]:.7f}  hf {losses['hf'][0]:.7f}  |diff| {d1:.2e}")
    print(f"second-step loss lmforge {losses['lmforge'][1]:.7f}  hf {losses['hf'][1]:.7f}  |diff| {d2:.2e}")
    if d1 > 1e-4:  # fp32 sums in a different order: ~1e-6 expected
        print(f"WARNING: first-step losses differ by {d1:.2e} (> 1e-4)")
    for i in range(args.warmup):
        for m, o in models.values():
            train_step(m, o, batches[i])
    tps = {name: Samples() for name in models}
    step_s = {name: Samples() for name in models}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # ABBA: neither always goes first
        for name in order:
            m, o = models[name]
            t0 = time.perf_counter()
            for s in range(args.steps):
                ts = time.perf_counter()
                train_step(m, o, batches[args.warmup + r * args.steps + s])
                step_s[name].add(time.perf_counter() - ts)
            tps[name].add(B * (S + T) * args.steps / (time.perf_counter() - t0))
    res = {
        name: {
            "tokens_per_s": round(tps[name].median, 1),
            "step_ms": round(1e3 * step_s[name].median, 1),
            "tokens_per_s_rounds": [round(v, 1) for v in tps[name].values],
        }
        for name in models
    }
    res["ratio"] = round(tps["lmforge"].median / tps["hf"].median, 3)
    res["loss_diff_first_second"] = [d1, d2]
    res["rows"] = [
        [name, f"{tps[name].median:,.0f}", tps[name].spread, f"{1e3 * step_s[name].median:.1f}"] for name in models
    ] + [["ratio lmforge/hf", f"{res['ratio']:.2f}x", "", ""]]
    return res


def bench_decode(ours, hf, config, args: argparse.Namespace, g: torch.Generator) -> dict:
    """Greedy and beam decoding at each batch size, calls alternating; returns times, ratios and token equality."""
    ours.eval()
    hf.eval()
    N = args.new_tokens
    results = {}
    for beams in args.beams:
        opts = dict(max_new_tokens=N, min_new_tokens=N, num_beams=beams, do_sample=False)
        runners = {
            "lmforge": lambda ids, mask: ours.generate(ids, attention_mask=mask, **opts),
            "hf": lambda ids, mask: hf.generate(ids, attention_mask=mask, **opts),
        }
        for B in args.decode_batch:
            sources = [
                torch.randint(1, config.vocab_size - 1, (B, args.decode_source), generator=g)
                for _ in range(args.decode_warmup + args.decode_repeats)
            ]
            with torch.inference_mode():
                for i in range(args.decode_warmup):
                    for fn in runners.values():
                        fn(sources[i], torch.ones_like(sources[i]))
                times = {name: Samples() for name in runners}
                mismatches = []
                for r in range(args.decode_repeats):
                    ids = sources[args.decode_warmup + r]
                    order = list(runners) if r % 2 == 0 else list(runners)[::-1]
                    outs = {}
                    for name in order:
                        t0 = time.perf_counter()
                        outs[name] = runners[name](ids, torch.ones_like(ids))
                        times[name].add(time.perf_counter() - t0)
                    a, b = outs["lmforge"], outs["hf"]
                    if a.shape != b.shape or not torch.equal(a, b):
                        where = (a != b).nonzero()[0].tolist() if a.shape == b.shape else "shape"
                        mismatches.append(f"repeat {r}: {tuple(a.shape)} vs {tuple(b.shape)} at {where}")
            res = {"identical_tokens": not mismatches, "mismatches": mismatches}
            for name in runners:
                t = times[name].median
                res[name] = {
                    "new_tokens_per_s": round(B * N / t, 1),
                    "ms_per_step": round(1e3 * t / N, 3),
                    "s_per_call": [round(v, 4) for v in times[name].values],
                }
            res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
            results[f"{'greedy' if beams == 1 else f'beam{beams}'}_batch_{B}"] = res
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=["train", "decode"], default=["train", "decode"])
    p.add_argument("--batch", type=int, default=16, help="training batch (source/target pairs)")
    p.add_argument("--source", type=int, default=48, help="training source length")
    p.add_argument("--target", type=int, default=48, help="training target length")
    p.add_argument("--repeats", type=int, default=5, help="alternating training rounds")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per model per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per model")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="num_beams values (1 = greedy)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    p.add_argument("--decode-source", type=int, default=32, help="decoding source length")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per call (min = max)")
    p.add_argument("--decode-repeats", type=int, default=5, help="alternating calls per setting")
    p.add_argument("--decode-warmup", type=int, default=1, help="untimed calls per model and setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke check (< 1 min): tiny batches, 2 rounds, 8 tokens")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for idle CPUs before timing (default 120; 0 with --quick)",
    )
    p.add_argument("--no-check", action="store_true", help="do not fail when the generated tokens differ")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.steps, args.warmup = 2, 2, 1, 0
        args.new_tokens, args.decode_repeats, args.decode_warmup = 8, 2, 0
        args.wait_quiet = args.wait_quiet or 0
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    info = start_run(args.threads)
    ours, hf, config = build_seq2seq_pair(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    peak = measure_peak(quick=True)
    print(f"# fp32 matmul peak {peak['peak'] / 1e9:.1f} GFLOP/s")
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    mon = LoadMonitor()
    train = bench_train(ours, hf, config, args, g) if "train" in args.only else None
    decode = bench_decode(ours, hf, config, args, g) if "decode" in args.only else {}
    load = mon.stop()

    met = {}
    if train:
        print()
        print(
            f"training, B={args.batch} source {args.source} + target {args.target} tokens, fp32, {args.threads} "
            f"threads, AdamW, {args.repeats} rounds x {args.steps} steps (medians; tokens = source + target)"
        )
        print_table(["model", "tokens/s", "range", "step ms"], train.pop("rows"))
        met["train"] = train["ratio"] >= TRAIN_GOAL
    if decode:
        print()
        print(
            f"decoding, source {args.decode_source} + {args.new_tokens} new tokens, fp32, {args.threads} threads, "
            f"{args.decode_repeats} alternating repeats (medians; ms/step = call time / new tokens, encoder included)"
        )
        rows = []
        for key, res in decode.items():
            for name in ("lmforge", "hf"):
                rows.append([key, name, f"{res[name]['new_tokens_per_s']:,.0f}", f"{res[name]['ms_per_step']:.2f}"])
            rows.append([key, "ratio", f"{res['ratio']:.2f}x", "identical" if res["identical_tokens"] else "DIFFER"])
            met[key] = res["ratio"] >= DECODE_GOAL and res["identical_tokens"]
        print_table(["setting", "model", "new tokens/s", "ms/step"], rows)
        for key, res in decode.items():
            if res["mismatches"]:
                print(f"{key}: tokens DIFFER: {res['mismatches']}")
    print(
        f"load during the run: other processes used {load['other_cpus']:.2f} of {load['cpus']} CPUs; this process "
        f"{load['this_process_cpus']:.2f}; loadavg {load['loadavg_start']} -> {load['loadavg_end']}"
    )
    if train:
        print(f"goal train >= {TRAIN_GOAL:g}x: {'MET' if met['train'] else 'NOT met'} ({train['ratio']:.2f}x)")
    for key, res in decode.items():
        same = "identical" if res["identical_tokens"] else "tokens differ"
        print(
            f"goal {key} >= {DECODE_GOAL:g}x, identical: {'MET' if met[key] else 'NOT met'} "
            f"({res['ratio']:.2f}x, {same})"
        )
    summary = {
        "bench": "seq2seq",
        "config": {k: v for k, v in config.to_dict().items() if k in ("d_model", "encoder_layers", "vocab_size")},
        "threads": args.threads,
        "train": train,
        "decode": decode,
        "goals_met": met,
        "peak": peak,
        "load": load,
        "machine": info,
    }
    print_json(summary)
    if any(not r["identical_tokens"] for r in decode.values()) and not args.no_check:
        print("ERROR: lmforge and transformers generated different tokens", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
