"""Greedy generation throughput with the KV cache: lmforge (fp32 and int8) vs Hugging Face GPT2LMHeadModel
(sdpa, fp32) vs CTranslate2 (fp32 and int8, when installed: pip install -e .[bench]).

Same weights (save_pretrained -> GPT2LMHeadModel.from_pretrained; CTranslate2's own TransformersConverter
on that same directory), same random prompts of 32 tokens, 128 new tokens, no early stop (eos_token_id None
in the config; min_new_tokens for HF, min_length for CTranslate2). Calls alternate between the engines
within each repeat (the order rotates); medians are reported. fp32 tokens must be identical across lmforge,
HF and CTranslate2; the int8 engines' agreement with fp32 is reported (quantization changes some tokens).
The run also prints a matmul (GFLOP/s) and a memory-read (GB/s) probe of this machine.

    python bench/bench_generate.py            # full run (~1-2 min on 2 cores)
    python bench/bench_generate.py --quick    # smoke check (< 30 s)
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (
    LoadMonitor,
    Samples,
    bandwidth_probe,
    build_pair,
    matmul_probe,
    print_json,
    print_table,
    start_run,  # noqa: E402
    wait_for_quiet,
)

from lmforge.nn.inference import apply, decode_layout  # noqa: E402


def decode_gemm_floor_ms(model: torch.nn.Module, batch: int, seconds: float = 0.5) -> float:
    """Best-case ms for just the matmuls of one decode step (every Linear of the model applied to
    `batch` rows, lm_head included), with the model's own weights and lmforge's own kernel choice
    (`nn.inference.apply`: oneDNN's packed matmul where it applies): reading ~55 MB of fp32 weights
    bounds a batch-1 step from below whatever the rest of the code does."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}

    def step() -> None:
        for m in linears:
            apply(m, xs[m.in_features])

    with torch.inference_mode():
        step()
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
    return 1e3 * best


FP32_ENGINES = ("lmforge", "hf", "ct2-fp32")
RATIOS = [
    ("lmforge", "hf"),
    ("lmforge", "ct2-fp32"),
    ("lmforge-int8", "ct2-int8"),
    ("lmforge-int8", "hf"),
    ("lmforge-int8", "lmforge"),
]
GOALS = [("lmforge", "ct2-fp32", 1.0), ("lmforge-int8", "ct2-int8", 1.3), ("lmforge-int8", "hf", 3.0)]


def ctranslate2_runners(
    model: torch.nn.Module, vocab_size: int, workdir: str, threads: int, new_tokens: int
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """CTranslate2 fp32 and int8 generators converted by its own TransformersConverter from `model`'s saved
    directory; each runner takes and returns token ids like `generate` (prompt + new tokens)."""
    from ctranslate2.converters import TransformersConverter
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(workdir)
    # CTranslate2 speaks token strings: a word-level vocabulary "t0".."tN" stands for the ids
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", unk_token="t0").save_pretrained(
        workdir
    )
    for kind in ("float32", "int8"):
        TransformersConverter(workdir).convert(os.path.join(workdir, f"ct2-{kind}"), quantization=kind, force=True)
    # CTranslate2 runs in a process of its own: in this one, its OpenMP runtime (a second libgomp) slowed
    # lmforge's calls that followed by ~40% (measured), which no user running one engine would see.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=ctranslate2_worker, args=(child, workdir, threads, new_tokens), daemon=True)
    worker.start()
    if parent.recv() != "ready":
        raise RuntimeError("the CTranslate2 worker did not start")

    def runner(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(ids: torch.Tensor) -> torch.Tensor:
            parent.send((kind, ids.tolist()))
            return torch.cat([ids, torch.tensor(parent.recv())], dim=1)

        return run

    return {"ct2-fp32": runner("float32"), "ct2-int8": runner("int8")}


def ctranslate2_worker(conn: Any, workdir: str, threads: int, new_tokens: int) -> None:
    """The CTranslate2 process: loads both generators, then answers (kind, prompt ids) with the new ids."""
    import ctranslate2

    gens = {
        kind: ctranslate2.Generator(
            os.path.join(workdir, f"ct2-{kind}"), device="cpu", compute_type=kind, intra_threads=threads
        )
        for kind in ("float32", "int8")
    }
    conn.send("ready")
    while True:
        try:
            kind, rows = conn.recv()
        except EOFError:  # the benchmark is over
            return
        prompts = [[f"t{i}" for i in row] for row in rows]
        res = gens[kind].generate_batch(
            prompts, max_length=new_tokens, min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False
        )
        conn.send([r.sequences_ids[0] for r in res])


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
    p.add_argument(
        "--engines",
        nargs="+",
        default=None,
        help="engines to run (default: all available): lmforge hf lmforge-int8 ct2-fp32 ct2-int8",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = min(args.steps, 32), 2, 1
        args.wait_quiet = args.wait_quiet or 0
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    info = start_run(args.threads)
    ours, hf, config = build_pair(args.seed)
    decode_layout(ours)  # the weight layout from_pretrained gives (lmforge.nn.inference)
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
    ours_int8 = copy.deepcopy(ours).quantize("int8")
    runners["lmforge-int8"] = lambda ids: ours_int8.generate(ids, max_new_tokens=N)
    workdir = tempfile.TemporaryDirectory(prefix="lmforge-bench-ct2-")
    try:
        runners.update(ctranslate2_runners(ours, config.vocab_size, workdir.name, args.threads, N))
    except ImportError:
        print("# ctranslate2 is not installed (pip install -e .[bench]): its columns are left out")
    if args.engines:
        unknown = set(args.engines) - set(runners)
        if unknown:
            raise SystemExit(f"unknown or unavailable engines {sorted(unknown)}; available: {sorted(runners)}")
        runners = {k: v for k, v in runners.items() if k in args.engines or k in ("lmforge", "hf")}
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    probes = {"matmul_gflops": round(matmul_probe(1024, 0.5) / 1e9, 1), "read_gb_per_s": round(bandwidth_probe(), 1)}
    print(f"# probes: fp32 matmul {probes['matmul_gflops']} GFLOP/s, memory read {probes['read_gb_per_s']} GB/s")
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
        mismatches: list[tuple] = []
        agreement: dict[str, list[float]] = {}
        for r in range(args.repeats):
            ids = prompts[args.warmup + r]
            names = list(runners)
            order = names[r % len(names) :] + names[: r % len(names)]  # each engine takes each place in turn
            outs = {}
            for name in order:
                time.sleep(0.3)  # untimed: the previous engine's OpenMP workers stop spin-waiting (~200 ms)
                t0 = time.perf_counter()
                outs[name] = runners[name](ids)
                times[name].add(time.perf_counter() - t0)
            for name in [n for n in runners if n in FP32_ENGINES and n != "lmforge"]:
                a, b = outs["lmforge"], outs[name]
                if a.shape != b.shape or not torch.equal(a, b):
                    where = (a != b).nonzero()[0].tolist() if a.shape == b.shape else "shape"
                    mismatches.append((name, r, tuple(a.shape), tuple(b.shape), where))
            for name in [n for n in runners if n not in FP32_ENGINES]:
                same = (outs[name][:, -N:] == outs["lmforge"][:, -N:]).float().mean()
                agreement.setdefault(name, []).append(float(same))
        identical = not mismatches
        all_identical &= identical
        res = {"identical_tokens": identical, "mismatches": [str(m) for m in mismatches]}
        for name, values in agreement.items():
            res[f"{name}_token_agreement_with_fp32"] = round(sum(values) / len(values), 4)
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
        for mine, peer in RATIOS:
            if mine in runners and peer in runners:
                ratio = times[peer].median / times[mine].median
                res[f"ratio_{mine}_vs_{peer}"] = round(ratio, 3)
                rows.append([f"ratio {mine}/{peer}", B, f"{ratio:.2f}x", "", ""])
        res["ratio"] = res["ratio_lmforge_vs_hf"]
        res["best_ratio"] = round(min(times["hf"].values) / min(times["lmforge"].values), 3)
        res["gemm_floor_ms_per_step"] = round(decode_gemm_floor_ms(ours, B, 0.2 if args.quick else 0.5), 3)
        rows.append(["lmforge fp32 tokens", B, "identical" if identical else "DIFFER", "", ""])
        results[f"batch_{B}"] = res
    load = mon.stop()

    print()
    print(
        f"greedy generation, prompt {args.prompt} + {N} new tokens, KV cache, {args.threads} threads, "
        f"{args.repeats} alternating repeats (medians; ms/step = call time / new tokens, prefill included)"
    )
    print_table(["model", "batch", "new tokens/s", "ms/step", "ms/step range"], rows)
    for B in args.batch:
        res = results[f"batch_{B}"]
        same = "identical" if res["identical_tokens"] else "DIFFER: " + str(res["mismatches"])
        print(f"batch {B}: fp32 engines' tokens {same}")
        for name in runners:
            if f"{name}_token_agreement_with_fp32" in res:
                print(
                    f"batch {B}: {name} greedy tokens equal to fp32's: {res[f'{name}_token_agreement_with_fp32']:.1%}"
                )
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
    for B in args.batch:
        r = results[f"batch_{B}"]
        for mine, peer, want in GOALS:
            key = f"ratio_{mine}_vs_{peer}"
            if key in r:
                ok = r[key] >= want
                met[f"batch_{B}_{mine}_vs_{peer}"] = ok
                print(f"goal batch {B}: {mine} >= {want:g}x {peer}: {'MET' if ok else 'NOT met'} ({r[key]:.2f}x)")
    summary = {
        "bench": "generate",
        "probes": probes,
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
        print("ERROR: the fp32 engines generated different tokens", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
