"""One-call GPU check: attention on CUDA, bf16 training speed and MFU against Hugging Face,
torch.compile, generation speed, and the Trainer end to end with bf16 and resume.

    PYTHONPATH=. python bench/gpu_check.py --out results.json

Needs a CUDA device and `transformers` (the peer). Prints one table per part and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge import GPTConfig, GPTForCausalLM
from lmforge.nn import AttentionMask, MultiHeadAttention
from lmforge.utils import matmul_peak_flops

DEV = torch.device("cuda")
BENCH = dict(vocab_size=8192, n_positions=256, n_layer=6, n_head=6, n_embd=384)


def sync() -> None:
    torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_attention() -> dict:
    torch.manual_seed(0)
    mha = MultiHeadAttention(256, 8).to(DEV).eval()
    x = torch.randn(4, 128, 256, device=DEV)
    pad = torch.ones(4, 128, dtype=torch.long, device=DEV)
    pad[0, :17] = 0  # left padding: fully masked query rows under causality
    pad[1, 100:] = 0  # right padding
    out = {}
    with torch.no_grad():
        for causal in (True, False):
            for name, mask in (("pad", pad), ("nopad", None)):
                m = AttentionMask.build(mask, 128, 128, causal)
                fast, _ = mha(x, m)
                ref, _ = mha(x, m, output_attentions=True)
                out[f"fp32 causal={causal} {name} max_abs"] = float((fast - ref).abs().max())
                out[f"fp32 causal={causal} {name} nan"] = bool(fast.isnan().any())
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    low, _ = mha(x, m)
                out[f"bf16 causal={causal} {name} rel_err"] = rel(low.float(), ref)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(8, 8, 256, 64, device=DEV, dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        out["flash bf16 causal runs, rel_err vs math"] = rel(
            flash.float(), F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
        )
    return out


def timed_steps(step, n: int) -> float:
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_speed(batch: int, steps: int) -> dict:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPTForCausalLM(GPTConfig(**BENCH)).to(DEV)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(DEV)
    hf.config.loss_type = "ForCausalLM"
    x = torch.randint(0, BENCH["vocab_size"], (batch, BENCH["n_positions"]), device=DEV)
    peak = matmul_peak_flops(DEV, torch.bfloat16, seconds=1.0)
    fpt = ours.flops_per_token(BENCH["n_positions"])
    results = {"bf16_matmul_peak_tflops": peak / 1e12, "batch": batch}

    def make_step(model, compiled=False):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = torch.compile(model) if compiled else model

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        results["first_loss_lmforge"] = float(ours(input_ids=x, labels=x).loss)
        results["first_loss_hf"] = float(hf(input_ids=x, labels=x).loss)
    for name, model, compiled in (("lmforge", ours, False), ("hf", hf, False), ("lmforge_compiled", ours, True)):
        t0 = time.perf_counter()
        step = make_step(model, compiled)
        try:
            dt = timed_steps(step, steps)
        except Exception as e:  # report, don't hide: compile may be unavailable
            results[f"{name}_error"] = repr(e)[:300]
            continue
        tps = batch * BENCH["n_positions"] / dt
        results[f"{name}_tokens_per_s"] = tps
        results[f"{name}_mfu"] = fpt * tps / peak
        results[f"{name}_setup_s"] = time.perf_counter() - t0 - dt * (steps + 3)
    results["ratio_lmforge_over_hf"] = results["lmforge_tokens_per_s"] / results["hf_tokens_per_s"]
    return results


def gen_speed() -> dict:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPTForCausalLM(GPTConfig(**BENCH)).to(DEV).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").to(DEV).eval()
    out = {}
    for batch in (1, 8):
        x = torch.randint(0, BENCH["vocab_size"], (batch, 32), device=DEV)
        mask = torch.ones_like(x)

        def a(x: torch.Tensor = x) -> torch.Tensor:
            return ours.generate(x, max_new_tokens=128)

        def b(x: torch.Tensor = x, mask: torch.Tensor = mask) -> torch.Tensor:
            return hf.generate(
                x, attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0
            )

        ta, tb = timed_steps(a, 5), timed_steps(b, 5)
        out[f"b{batch}_identical_tokens"] = bool(torch.equal(a(), b()))
        out[f"b{batch}_lmforge_tok_s"] = batch * 128 / ta
        out[f"b{batch}_hf_tok_s"] = batch * 128 / tb
        out[f"b{batch}_ratio"] = tb / ta
    return out


def trainer_e2e(tmp: Path) -> dict:
    from lmforge.training.pretrain import load_recipe, pretrain

    recipe = load_recipe("shakespeare")
    recipe["out"] = str(tmp / "run")
    recipe["training"].update(
        max_steps=300,
        bf16=True,
        eval_steps=100,
        save_steps=100,
        logging_steps=50,
        per_device_train_batch_size=64,
        disable_tqdm=True,
    )
    t = time.perf_counter()
    first = pretrain(recipe, device="cuda")
    elapsed = time.perf_counter() - t
    recipe["training"]["max_steps"] = 400
    resumed = pretrain(recipe, resume=True, device="cuda")
    state = json.loads((tmp / "run" / "checkpoint-400" / "trainer_state.json").read_text())
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tokens_per_second"] for x in lines if "tokens_per_second" in x]
    return {
        "eval_loss_300": first.get("eval_loss"),
        "unigram": first.get("unigram_baseline_loss"),
        "eval_loss_400_resumed": resumed.get("eval_loss"),
        "resumed_step": state["global_step"],
        "wall_s_300_steps": elapsed,
        "median_tokens_per_s": statistics.median(tps),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    for name, fn in (
        ("attention", check_attention),
        ("train", lambda: train_speed(a.batch, a.steps)),
        ("generate", gen_speed),
    ):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:
            report[name] = {"error": repr(e)[:500]}
        print(f"== {name} ({time.perf_counter() - t:.1f}s)")
        print(json.dumps(report[name], indent=1))
        Path(a.out).write_text(json.dumps(report, indent=1))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        try:
            report["trainer"] = trainer_e2e(Path(d))
        except Exception as e:
            report["trainer"] = {"error": repr(e)[:500]}
        print(f"== trainer ({time.perf_counter() - t:.1f}s)")
        print(json.dumps(report["trainer"], indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
