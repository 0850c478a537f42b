"""Speech speed: lmforge vs transformers on Whisper's two costs, same inputs and weights, fp32.

- features: log-Mel features of a batch of 30-s clips (default 8), lmforge.speech.WhisperFeatureExtractor vs
  transformers' WhisperFeatureExtractor (return_tensors="pt"); calls alternate, medians; the features must agree
  within 1e-5.
- transcription: a whisper-tiny-shaped model (4+4 layers, d_model 384, 6 heads, vocab 51865) with seeded random
  weights, saved by transformers and loaded by lmforge (every tensor checked); 30-s inputs, greedy, the language
  detected from the audio as a plain `generate(features)` does (`--language en` gives it instead: no detection step),
  batch 1 and 8, exactly N new tokens (min_new_tokens = max_new_tokens on both sides, as random weights would
  otherwise stop anywhere); calls alternate, medians; the tokens must be identical. Goal >= 2x. lmforge encodes the
  audio once for detection and decoding, transformers twice.

Ratios are transformers time / lmforge time (> 1: lmforge is faster).

    python bench/bench_speech.py            # full run (a few minutes on 2 quiet cores)
    python bench/bench_speech.py --quick    # smoke check (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    LoadMonitor,
    Samples,
    measure_peak,
    print_json,
    print_table,
    quiet_hf,
    start_run,
    wait_for_quiet,
)

DECODE_GOAL = 2.0
SR = 16000
# whisper-tiny's token ids (multilingual vocabulary)
EOS, START, EN, TRANSLATE, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50259, 50358, 50359, 50363
GENERATION_CONFIG = {
    "decoder_start_token_id": START,
    "bos_token_id": EOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
    "begin_suppress_tokens": [220, EOS],
    "suppress_tokens": [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93],
    # whisper's 99 language tokens follow <|startoftranscript|>; their names do not matter to the timing
    "lang_to_id": {"<|en|>": EN, **{f"<|l{i}|>": EN + i for i in range(1, 99)}},
    "task_to_id": {"translate": TRANSLATE, "transcribe": TRANSCRIBE},
    "no_timestamps_token_id": NO_TIMESTAMPS,
    "is_multilingual": True,
    "forced_decoder_ids": [[1, None], [2, TRANSCRIBE]],
    "max_length": 448,
}


def audio_batch(batch: int, seconds: float, g: np.random.Generator) -> list[np.ndarray]:
    """Clips of noise under chirps, each different (what the features and the model see)."""
    t = np.arange(int(seconds * SR)) / SR
    return [
        (0.3 * np.sin(2 * np.pi * (100 + 50 * i) * t * (1 + 0.2 * t)) + 0.05 * g.standard_normal(len(t))).astype(
            np.float32
        )
        for i in range(batch)
    ]


def build_whisper_pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lmforge WhisperForConditionalGeneration, transformers' (sdpa)) with the same seeded random weights."""
    quiet_hf()
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from lmforge import AutoModelForSpeechSeq2Seq
    from lmforge.hub import to_hf_state_dict

    torch.manual_seed(seed)
    config = WhisperConfig(  # whisper-tiny's shape (transformers' defaults) with its multilingual token ids
        vocab_size=51865,
        pad_token_id=EOS,
        bos_token_id=EOS,
        eos_token_id=EOS,
        decoder_start_token_id=START,
        begin_suppress_tokens=[220, EOS],
    )
    hf = WhisperForConditionalGeneration(config)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as d:
        hf.save_pretrained(d)
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump(GENERATION_CONFIG, f)
        hf = WhisperForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa").eval()
        ours = AutoModelForSpeechSeq2Seq.from_pretrained(d)
    hf_state = hf.state_dict()
    for name, t in to_hf_state_dict(ours).items():
        if name not in hf_state or not torch.equal(t, hf_state[name]):
            raise RuntimeError(f"weight {name} differs between lmforge and transformers after save/load")
    return ours, hf


def alternate(runners: dict, inputs: list, repeats: int, warmup: int) -> tuple[dict[str, Samples], list[dict]]:
    """Call each runner on each input in turn (ABBA order); times per runner and the outputs of each repeat."""
    for i in range(warmup):
        for fn in runners.values():
            fn(inputs[i % len(inputs)])
    times = {name: Samples() for name in runners}
    outputs = []
    for r in range(repeats):
        x = inputs[(warmup + r) % len(inputs)]
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        outs = {}
        for name in order:
            t0 = time.perf_counter()
            outs[name] = runners[name](x)
            times[name].add(time.perf_counter() - t0)
        outputs.append(outs)
    return times, outputs


def bench_features(args: argparse.Namespace, g: np.random.Generator) -> dict:
    from transformers import WhisperFeatureExtractor as HFExtractor

    from lmforge.speech import WhisperFeatureExtractor

    ours, hf = WhisperFeatureExtractor(), HFExtractor()
    runners = {
        "lmforge": lambda clips: ours(clips, sampling_rate=SR)["input_features"],
        "hf": lambda clips: hf(clips, sampling_rate=SR, return_tensors="pt").input_features,
    }
    inputs = [audio_batch(args.feature_batch, 30.0, g) for _ in range(2)]
    times, outputs = alternate(runners, inputs, args.repeats, args.warmup)
    diff = max(float((o["lmforge"] - o["hf"]).abs().max()) for o in outputs)
    res = {name: {"clips_per_s": round(args.feature_batch / times[name].median, 2)} for name in runners}
    for name in runners:
        res[name]["s_per_call"] = [round(v, 4) for v in times[name].values]
    res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
    res["max_abs_diff"] = diff
    res["rows"] = [[name, f"{res[name]['clips_per_s']:.1f}", times[name].spread] for name in runners] + [
        ["ratio lmforge/hf", f"{res['ratio']:.2f}x", f"max |diff| {diff:.1e}"]
    ]
    return res


def bench_transcribe(ours, hf, args: argparse.Namespace, g: np.random.Generator) -> dict:
    from lmforge.speech import WhisperFeatureExtractor

    extract = WhisperFeatureExtractor()
    N = args.new_tokens
    opts = dict(language=args.language, max_new_tokens=N, min_new_tokens=N)
    runners = {"lmforge": lambda x: ours.generate(x, **opts), "hf": lambda x: hf.generate(x, **opts)}
    results = {}
    for B in args.decode_batch:
        inputs = [extract(audio_batch(B, 30.0, g), sampling_rate=SR)["input_features"] for _ in range(2)]
        with torch.inference_mode():
            times, outputs = alternate(runners, inputs, args.repeats, args.warmup)
        mismatches = []
        for r, o in enumerate(outputs):
            a, b = o["lmforge"], o["hf"]
            if a.shape != b.shape or not torch.equal(a, b):
                mismatches.append(f"repeat {r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        res = {"identical_tokens": not mismatches, "mismatches": mismatches}
        for name in runners:
            t = times[name].median
            res[name] = {
                "s_per_call": round(t, 4),
                "new_tokens_per_s": round(B * N / t, 1),
                "s_per_call_all": [round(v, 4) for v in times[name].values],
            }
        res["ratio"] = round(times["hf"].median / times["lmforge"].median, 3)
        results[f"greedy_batch_{B}"] = res
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=["features", "transcribe"], default=["features", "transcribe"])
    p.add_argument("--feature-batch", type=int, default=8, help="30-s clips per feature call")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8], help="transcription batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per 30-s window (min = max)")
    p.add_argument("--language", default=None, help="e.g. en: given, no detection step (default: detected)")
    p.add_argument("--repeats", type=int, default=5, help="alternating calls per setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model and setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke check (< 1 min): batches 2, 2 repeats, 4 tokens")
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
        args.feature_batch, args.decode_batch, args.new_tokens = 2, [1, 2], 4
        args.repeats, args.warmup = 2, 0
        args.wait_quiet = args.wait_quiet or 0
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet

    info = start_run(args.threads)
    g = np.random.default_rng(args.seed)
    ours, hf = build_whisper_pair(args.seed) if "transcribe" in args.only else (None, None)
    peak = measure_peak(quick=True)
    print(f"# fp32 matmul peak {peak['peak'] / 1e9:.1f} GFLOP/s")
    wait_for_quiet(args.wait_quiet)
    print(f"# load at start: loadavg {os.getloadavg()[0]:.2f}")
    mon = LoadMonitor()
    features = bench_features(args, g) if "features" in args.only else None
    transcribe = bench_transcribe(ours, hf, args, g) if "transcribe" in args.only else {}
    load = mon.stop()

    met = {}
    if features:
        print()
        print(f"log-Mel features, {args.feature_batch} clips x 30 s, {args.threads} threads, {args.repeats} repeats")
        print_table(["extractor", "clips/s", "range"], features.pop("rows"))
        met["features"] = features["ratio"] > 1.0 and features["max_abs_diff"] <= 1e-5
    if transcribe:
        print()
        print(
            f"transcription, whisper-tiny shape, random weights, 30-s input, greedy, {args.new_tokens} new tokens, "
            f"language {args.language or 'detected'}, "
            f"{args.threads} threads, {args.repeats} alternating repeats (medians; encoder included)"
        )
        rows = []
        for key, res in transcribe.items():
            for name in ("lmforge", "hf"):
                rows.append([key, name, f"{res[name]['s_per_call']:.3f}", f"{res[name]['new_tokens_per_s']:,.1f}"])
            rows.append([key, "ratio", f"{res['ratio']:.2f}x", "identical" if res["identical_tokens"] else "DIFFER"])
            met[key] = res["ratio"] >= DECODE_GOAL and res["identical_tokens"]
        print_table(["setting", "model", "s/call", "new tokens/s"], rows)
    print(
        f"load during the run: other processes used {load['other_cpus']:.2f} of {load['cpus']} CPUs; this process "
        f"{load['this_process_cpus']:.2f}; loadavg {load['loadavg_start']} -> {load['loadavg_end']}"
    )
    if features:
        print(
            f"goal features faster, within 1e-5: {'MET' if met['features'] else 'NOT met'} "
            f"({features['ratio']:.2f}x, max |diff| {features['max_abs_diff']:.1e})"
        )
    for key, res in transcribe.items():
        same = "identical" if res["identical_tokens"] else "tokens differ"
        verdict = "MET" if met[key] else "NOT met"
        print(f"goal {key} >= {DECODE_GOAL:g}x, identical: {verdict} ({res['ratio']:.2f}x, {same})")
    summary = {
        "bench": "speech",
        "threads": args.threads,
        "language": args.language,
        "new_tokens": args.new_tokens,
        "features": features,
        "transcribe": transcribe,
        "goals_met": met,
        "peak": peak,
        "load": load,
        "machine": info,
    }
    print_json(summary)
    if any(not r["identical_tokens"] for r in transcribe.values()) and not args.no_check:
        print("ERROR: lmforge and transformers generated different tokens", file=sys.stderr)
        sys.exit(1)
    if features and features["max_abs_diff"] > 1e-5 and not args.no_check:
        print("ERROR: lmforge's and transformers' features differ by more than 1e-5", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
