"""Greedy generation throughput with the KV cache: lmforge vs Hugging Face GPT2LMHeadModel (sdpa).

Same weights (save_pretrained -> GPT2LMHeadModel.from_pretrained), same random prompts of 32
tokens, 128 new tokens, no early stop (eos_token_id None in the config; min_new_tokens for HF).
Calls alternate lmforge / HF within each repeat; medians are reported, and the generated tokens
must be identical.

    python bench/bench_generate.py            # full run (~1-2 min on 2 cores)
    python bench/bench_generate.py --quick    # smoke check (< 30 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (
    LoadMonitor,
    Samples,
    build_pair,
    print_json,
    print_table,
    start_run,  # noqa: E402
    wait_for_quiet,
)


def decode_gemm_floor_ms(model: torch.nn.Module, batch: int, seconds: float = 0.5) -> float:
    """Best-case ms for just the matmuls of one decode step (every Linear of the model applied to
    `batch` rows, lm_head included), with the model's own weights: reading ~55 MB of fp32 weights
    bounds a batch-1 step from below whatever the rest of the code does."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}

    def step() -> None:
        for m in linears:
            F.linear(xs[m.in_features], m.weight, m.bias)

    with torch.inference_mode():
        step()
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to run")
    p.add_argument("--prompt", type=int, default=32, help="prompt length (random tokens)")
    p.add_argument("--steps", type=int, default=128, help="new tokens per call (max_new_tokens)")
    p.add_argument("--repeats", type=int, default=9, help="alternating (lmforge, HF) calls per batch size")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model and batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke check (< 30 s): 32 new tokens, 2 repeats")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for idle CPUs before timing (default 120; 0 with --quick)",
    )
    p.add_argument("--no-check", action="store_true", help="do not fail when the tokens differ")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = min(args.steps, 32), 2, 1
        args.wait_quiet = args.wait_quiet or 0
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    info = start_run(args.threads)
    ours, hf, config = build_pair(args.seed)
    ours.eval()
    hf.eval()
    assert config.eos_token_id is None and hf.generation_config.eos_token_id is None
    g = torch.Generator().manual_seed(args.seed + 2)
    N = args.steps

    def run_ours(ids: torch.Tensor) -> torch.Tensor:
        return ours.generate(ids, max_new_tokens=N)

    def run_hf(ids: torch.Tensor) -> torch.Tensor:
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
        )

    runners = {"lmforge": run_ours, "hf": run_hf}
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    results, rows, all_identical = {}, [], True
    mon = LoadMonitor()
    for B in args.batch:
        prompts = [
            torch.randint(0, config.vocab_size, (B, args.prompt), generator=g)
            for _ in range(args.warmup + args.repeats)
        ]
        for i in range(args.warmup):
            for fn in runners.values():
                fn(prompts[i])
        times = {name: Samples() for name in runners}
        mismatches = []
        for r in range(args.repeats):
            ids = prompts[args.warmup + r]
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            outs = {}
            for name in order:
                t0 = time.perf_counter()
                outs[name] = runners[name](ids)
                times[name].add(time.perf_counter() - t0)
            a, b = outs["lmforge"], outs["hf"]
            if a.shape != b.shape or not torch.equal(a, b):
                where = (a != b).nonzero()[0].tolist() if a.shape == b.shape else "shape"
                mismatches.append((r, tuple(a.shape), tuple(b.shape), where))
        identical = not mismatches
        all_identical &= identical
        res = {"identical_tokens": identical, "mismatches": [str(m) for m in mismatches]}
        for name in runners:
            t = times[name].median
            res[name] = {
                "tokens_per_s": round(B * N / t, 1),
                "ms_per_step": round(1e3 * t / N, 3),
                "s_per_call": [round(v, 4) for v in times[name].values],
            }
            rows.append(
                [
                    f"{name}",
                    B,
                    f"{B * N / t:,.0f}",
                    f"{1e3 * t / N:.2f}",
                    f"{1e3 * min(times[name].values) / N:.2f}..{1e3 * max(times[name].values) / N:.2f}",
                ]
            )
        res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
        res["best_ratio"] = round(min(times["hf"].values) / min(times["lmforge"].values), 3)
        res["gemm_floor_ms_per_step"] = round(decode_gemm_floor_ms(ours, B, 0.2 if args.quick else 0.5), 3)
        rows.append(
            [
                "ratio lmforge/hf",
                B,
                f"{res['ratio']:.2f}x",
                f"best {res['best_ratio']:.2f}x",
                "identical" if identical else "DIFFER",
            ]
        )
        results[f"batch_{B}"] = res
    load = mon.stop()

    print()
    print(
        f"greedy generation, prompt {args.prompt} + {N} new tokens, KV cache, fp32, {args.threads} threads, "
        f"{args.repeats} alternating repeats (medians; ms/step = call time / new tokens, prefill included)"
    )
    print_table(["model", "batch", "new tokens/s", "ms/step", "ms/step range"], rows)
    for B in args.batch:
        res = results[f"batch_{B}"]
        same = "identical" if res["identical_tokens"] else "DIFFER: " + str(res["mismatches"])
        print(f"batch {B}: generated tokens {same}")
    print(
        f"load during the run: other processes used {load['other_cpus']:.2f} of {load['cpus']} CPUs; this process "
        f"{load['this_process_cpus']:.2f}; loadavg {load['loadavg_start']} -> {load['loadavg_end']}"
    )
    targets = {1: 3.0, 8: 2.0}
    for B in args.batch:
        r = results[f"batch_{B}"]
        want = targets.get(B)
        need = f"; the {want:g}x target needs <= {r['hf']['ms_per_step'] / want:.2f} ms/step" if want else ""
        print(
            f"batch {B}: matmul-only floor of a decode step (all Linear layers with the model's weights) "
            f"{r['gemm_floor_ms_per_step']:.2f} ms; lmforge {r['lmforge']['ms_per_step']:.2f} ms/step{need}"
        )
    met = {}
    for B, want in targets.items():
        if f"batch_{B}" in results:
            r = results[f"batch_{B}"]
            met[f"batch_{B}"] = r["ratio"] >= want and r["identical_tokens"]
            print(
                f"target batch {B}: >= {want:g}x HF with identical tokens: {'MET' if met[f'batch_{B}'] else 'NOT met'} "
                f"({r['ratio']:.2f}x, {'identical' if r['identical_tokens'] else 'tokens differ'})"
            )
    summary = {
        "bench": "generate",
        "prompt": args.prompt,
        "new_tokens": N,
        "threads": args.threads,
        "repeats": args.repeats,
        **results,
        "targets_met": met,
        "load": load,
        "machine": info,
    }
    print_json(summary)
    if not all_identical and not args.no_check:
        print("ERROR: lmforge and HF generated different tokens", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
