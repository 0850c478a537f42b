"""Training throughput: lmforge GPTForCausalLM vs Hugging Face GPT2LMHeadModel (sdpa), same weights.

Each step is forward (loss on input_ids = labels) + backward + torch.optim.AdamW step + zero_grad,
on the same random (batch, context) batches for both models. Rounds alternate lmforge / HF (ABBA
order) so both see the same machine load; medians over rounds are reported. MFU uses the fp32
matmul peak measured in the same run: lmforge.utils.matmul_peak_flops and our own probe, before the
rounds, between them and after them; the largest value is the peak (a probe that ran while another
process took a core reads low, which would flatter MFU).

    python bench/bench_train.py            # full run (~1.5 min on 2 quiet cores)
    python bench/bench_train.py --quick    # smoke check (< 30 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (
    LoadMonitor,
    Samples,
    build_pair,
    linear_gemm_seconds,
    matmul_probe,
    measure_peak,
    print_json,
    print_table,
    start_run,  # noqa: E402
    wait_for_quiet,
)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """The same AdamW for both models: lmforge's param-group rule (no decay for biases, norms and
    embeddings), which applies unchanged to HF's modules (Conv1D weights are 2-D, so they decay)."""
    from lmforge.training.optim import param_groups

    kw = {"fused": True} if args.fused else {}
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().item()


def model_linears(config) -> dict[tuple[int, int], int]:
    """(in, out) -> count of the GPT's Linear layers (the 4 per block and the lm_head)."""
    C, F, V = config.n_embd, config.ffn_dim, config.vocab_size
    out: dict[tuple[int, int], int] = {}
    for shape in [(C, 3 * C), (C, C), (C, F), (F, C)] * config.n_layer + [(C, V)]:
        out[shape] = out.get(shape, 0) + 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    p.add_argument("--context", type=int, default=256, help="sequence length T (<= 256)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (lmforge, HF)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--fused", action="store_true", help="use AdamW(fused=True) for both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for idle CPUs before timing (default 120; 0 with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke check (< 30 s): batch 2, no extra warm-up, 2 rounds x 1 step"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 0
        args.batch = args.batch or 2
        args.wait_quiet = args.wait_quiet or 0
    args.batch = args.batch or 8
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    info = start_run(args.threads)
    ours, hf, config = build_pair(args.seed)
    ours.train()
    hf.train()
    B, T = args.batch, args.context
    g = torch.Generator().manual_seed(args.seed + 1)
    n_batches = args.warmup + args.repeats * args.steps
    batches = [torch.randint(0, config.vocab_size, (B, T), generator=g) for _ in range(max(n_batches, 2))]

    opt_ours, opt_hf = make_optimizer(ours, args), make_optimizer(hf, args)
    models = {"lmforge": (ours, opt_ours), "hf": (hf, opt_hf)}

    # ---- correctness: same weights + same batch -> same loss; same optimizer -> same 2nd loss
    losses = {name: [train_step(m, o, batches[0]), train_step(m, o, batches[1])] for name, (m, o) in models.items()}
    d1 = abs(losses["lmforge"][0] - losses["hf"][0])
    d2 = abs(losses["lmforge"][1] - losses["hf"][1])
    print(f"first-step loss  lmforge {losses['lmforge'][0]:.7f}  hf {losses['hf'][0]:.7f}  |diff| {d1:.2e}")
    print(
        f"second-step loss lmforge {losses['lmforge'][1]:.7f}  hf {losses['hf'][1]:.7f}  |diff| {d2:.2e} "
        "(after one identical AdamW step)"
    )
    if d1 > 1e-5:
        print(f"WARNING: first-step losses differ by {d1:.2e} (> 1e-5)")

    # ---- (the loss-check steps above warmed both up) wait for quiet, warm up, probe the peak
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    for i in range(args.warmup):
        for m, o in models.values():
            train_step(m, o, batches[i])
    peak = measure_peak(args.quick)
    probes = [peak["probe_matmul_peak"]]

    # ---- alternating timed rounds, a short peak probe between rounds
    flops_per_token = ours.flops_per_token(T)
    tps = {name: Samples() for name in models}
    step_s = {name: Samples() for name in models}
    mon = LoadMonitor()
    t_start = time.perf_counter()
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # ABBA: neither always goes first
        for name in order:
            m, o = models[name]
            t0 = time.perf_counter()
            for s in range(args.steps):
                ts = time.perf_counter()
                train_step(m, o, batches[args.warmup + r * args.steps + s])
                step_s[name].add(time.perf_counter() - ts)
            tps[name].add(B * T * args.steps / (time.perf_counter() - t0))
        probes.append(matmul_probe(2048, seconds=0.3, trials=1))
    load = mon.stop()
    elapsed = time.perf_counter() - t_start
    peak_after = measure_peak(True)
    probes.append(peak_after["probe_matmul_peak"])
    peak_flops = max(peak["peak"], peak_after["peak"], *probes)
    # same-conditions peak: the probes taken between the rounds (the host's speed can drift even when
    # no other process is visible in this VM)
    peak_rounds = statistics.median(probes[1:])
    linears = model_linears(config)
    gemm_flops_step = sum(3 * 2 * B * T * k * n * c for (k, n), c in linears.items())  # fwd + 2 bwd
    gemm_s = linear_gemm_seconds(B * T, linears, seconds_each=0.05 if args.quick else 0.2)
    peak_next_to_gemm = max(peak_after["probe_matmul_peak"], matmul_probe(2048, seconds=0.3, trials=1))
    gemm = gemm_flops_step / gemm_s

    rows, summary_models = [], {}
    for name in models:
        med = tps[name].median
        mfu = flops_per_token * med / peak_flops
        mfu_same = flops_per_token * med / peak_rounds
        best = B * T / min(step_s[name].values)
        summary_models[name] = {
            "tokens_per_s": round(med, 1),
            "step_ms": round(1e3 * step_s[name].median, 1),
            "mfu": round(mfu, 4),
            "mfu_vs_round_probes": round(mfu_same, 4),
            "best_step_tokens_per_s": round(best, 1),
            "best_step_mfu": round(flops_per_token * best / peak_flops, 4),
            "tokens_per_s_rounds": [round(v, 1) for v in tps[name].values],
        }
        rows.append(
            [
                name,
                f"{med:,.0f}",
                tps[name].spread,
                f"{1e3 * step_s[name].median:.1f}",
                f"{flops_per_token * med / 1e9:.1f}",
                f"{100 * mfu:.1f}%",
                f"{100 * mfu_same:.1f}%",
                f"{best:,.0f}",
                f"{100 * flops_per_token * best / peak_flops:.1f}%",
            ]
        )
    ratio = tps["lmforge"].median / tps["hf"].median
    best_ratio = summary_models["lmforge"]["best_step_tokens_per_s"] / summary_models["hf"]["best_step_tokens_per_s"]
    gemm_flops_per_token = gemm_flops_step / (B * T)
    # if everything but the Linear GEMMs took no time (each GEMM at its own best speed):
    mfu_ceiling = flops_per_token * B * T / gemm_s / peak_flops
    print()
    print(
        f"training, B={B} T={T}, fp32, {args.threads} threads, AdamW{'(fused)' if args.fused else ''}, "
        f"{args.repeats} rounds x {args.steps} steps (medians)"
    )
    print_table(
        [
            "model",
            "tokens/s",
            "range (rounds)",
            "ms/step",
            "GFLOP/s",
            "MFU",
            "MFU vs round probes",
            "best step tok/s",
            "best MFU",
        ],
        rows,
    )
    print(f"ratio lmforge/hf tokens/s: {ratio:.3f}x (median of rounds); {best_ratio:.3f}x (fastest single step)")
    print(
        f"flops/token = 6N + 12*L*C*T = {flops_per_token:,.0f} (N = {ours.num_parameters(True):,}: all parameters "
        f"but the position table, tied wte counted once)"
    )
    print(
        f"fp32 matmul peak: lmforge.utils.matmul_peak_flops {peak['lmforge_matmul_peak'] / 1e9:.1f} GFLOP/s, "
        f"own probe (2048^3/3072^3) {peak['probe_matmul_peak'] / 1e9:.1f}; probes between rounds "
        f"{', '.join(f'{v / 1e9:.0f}' for v in probes[1:])}; peak used = max = {peak_flops / 1e9:.1f} GFLOP/s "
        f"(median of the between-round probes: {peak_rounds / 1e9:.1f})"
    )
    lm_ms = summary_models["lmforge"]["step_ms"]
    if gemm > peak_flops:
        print(
            "WARNING: the model's GEMMs ran faster than every peak probe: the probes read low (host speed "
            "drifted); MFU figures are overstated in this run"
        )
    print(
        f"GEMM floor: the Linear matmuls of one step (fwd + 2 bwd, M={B * T}, each timed alone, best case) take "
        f"{1e3 * gemm_s:.0f} ms = {gemm / 1e9:.0f} GFLOP/s ({100 * gemm / peak_flops:.0f}% of the peak, "
        f"{100 * gemm / peak_next_to_gemm:.0f}% of the {peak_next_to_gemm / 1e9:.0f} GFLOP/s probed next to it); "
        f"they are "
        f"{gemm_flops_per_token / flops_per_token:.0%} of flops/token, so MFU <= ~{100 * mfu_ceiling:.0f}% even if "
        f"attention, norms, GELU, loss and AdamW were free. lmforge spends {lm_ms - 1e3 * gemm_s:.0f} ms/step "
        f"beyond that floor; MFU 85% needs a step of {flops_per_token * B * T / (0.85 * peak_flops) * 1e3:.0f} ms "
        f"at the {peak_flops / 1e9:.0f} GFLOP/s peak"
    )
    print(
        f"load during timed rounds ({elapsed:.0f} s): other processes used {load['other_cpus']:.2f} of "
        f"{load['cpus']} CPUs; this process {load['this_process_cpus']:.2f}; loadavg {load['loadavg_start']} -> "
        f"{load['loadavg_end']}"
    )
    lm_mfu = summary_models["lmforge"]["mfu"]
    print(
        f"targets: ratio >= 1.1x: {'MET' if ratio >= 1.1 else 'NOT met'} ({ratio:.3f}x); "
        f"lmforge MFU >= 85% of peak: {'MET' if lm_mfu >= 0.85 else 'NOT met'} ({100 * lm_mfu:.1f}%)"
    )
    summary = {
        "bench": "train",
        "batch": B,
        "context": T,
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "fused_adamw": args.fused,
        "flops_per_token": flops_per_token,
        "peak_flops": round(peak_flops),
        "lmforge_matmul_peak": round(peak["lmforge_matmul_peak"]),
        "probe_matmul_peak": round(peak["probe_matmul_peak"]),
        "probes": [round(v) for v in probes],
        "gemm_floor_ms": round(1e3 * gemm_s, 1),
        "gemm_floor_flops": round(gemm),
        "peak_next_to_gemm": round(peak_next_to_gemm),
        "peak_round_probes_median": round(peak_rounds),
        "mfu_ceiling_gemm_only": round(mfu_ceiling, 4),
        "first_loss": losses["lmforge"][0],
        "first_loss_hf": losses["hf"][0],
        "first_loss_diff": d1,
        "second_loss_diff": d2,
        **summary_models,
        "ratio": round(ratio, 4),
        "best_step_ratio": round(best_ratio, 4),
        "target_ratio_met": ratio >= 1.1,
        "target_mfu_met": lm_mfu >= 0.85,
        "load": load,
        "machine": info,
    }
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
