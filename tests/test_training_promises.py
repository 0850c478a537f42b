"""What the README and docs promise about training, checked: Ctrl-C saves a checkpoint that resumes
exactly; bf16 training on a CPU; the MFU figure; the learning-rate schedules (= transformers')."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,  # test-only oracle
    get_linear_schedule_with_warmup,
)

from lmforge.config import GPTConfig
from lmforge.models.gpt import GPTForCausalLM
from lmforge.training import Trainer, TrainerCallback, TrainingArguments
from lmforge.training.optim import build_optimizer, build_scheduler
from lmforge.training.reporting import model_flops_utilization
from lmforge.utils import set_seed

REPO = Path(__file__).resolve().parent.parent
V, CTX = 64, 16


def tiny_gpt(dropout: float = 0.0) -> GPTForCausalLM:
    set_seed(0)
    return GPTForCausalLM(GPTConfig(vocab_size=V, n_positions=CTX, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def pattern_data(n: int = 64) -> list[dict[str, Any]]:
    """Rows of a repeating 8-token cycle at random offsets: a language a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 8, (n,), generator=g).tolist()
    return [{"input_ids": [(s + i) % 8 for i in range(CTX)]} for s in starts]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


# ---- Ctrl-C -----------------------------------------------------------------------------------------
# The same script runs the interrupted run, its resumption and the uninterrupted reference, each in its own
# process with one thread, so the three do the same arithmetic (bit-identical on one CPU). Dropout is on,
# so the RNG state must come back too.
RUN = textwrap.dedent("""
    import sys, time
    import torch
    from lmforge.config import GPTConfig
    from lmforge.models.gpt import GPTForCausalLM
    from lmforge.training import Trainer, TrainerCallback, TrainingArguments
    from lmforge.utils import set_seed

    out, mode, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    set_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (16,), generator=g).tolist()} for _ in range(64)]

    class Announce(TrainerCallback):
        def on_step_end(self, trainer):
            print(f"STEP {trainer.state.global_step}", flush=True)
            time.sleep(pause)  # time for the test's Ctrl-C to land between steps

    args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                             warmup_steps=3, logging_steps=1, save_strategy="no", seed=0, device="cpu",
                             disable_tqdm=True, peak_flops=1e12, report_to="jsonl")
    Trainer(model, args, train_dataset=data, callbacks=[Announce()]).train(resume_from_checkpoint=mode == "resume")
    print("DONE", flush=True)
""")


def _run(
    script: Path, out: Path, mode: str, pause: float = 0.0, interrupt_after: int | None = None, timeout: float = 240.0
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), mode, str(pause)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(timeout, proc.kill)  # bounded in time whatever happens
    watchdog.start()
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if interrupt_after is not None and line.strip() == f"STEP {interrupt_after}":
                proc.send_signal(signal.SIGINT)
                interrupt_after = None
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        proc.wait()
    finally:
        watchdog.cancel()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), stderr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is a POSIX feature")
def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_identically(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(RUN, encoding="utf-8")
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"

    first = _run(script, interrupted, "fresh", pause=0.5, interrupt_after=4)
    assert first.returncode != 0 and "DONE" not in first.stdout, first.stderr[-2000:]
    assert "KeyboardInterrupt" in first.stderr and "interrupted at step" in first.stderr, first.stderr[-2000:]
    saved = sorted(interrupted.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file() and (saved[0] / "optimizer.pt").is_file()
    step = int(saved[0].name.split("-")[1])
    assert 4 <= step < 12  # the step that was running when Ctrl-C came finished first; the run did not

    resumed = _run(script, interrupted, "resume")
    assert resumed.returncode == 0 and "DONE" in resumed.stdout, resumed.stderr[-2000:]
    steps_run = [line for line in resumed.stdout.splitlines() if line.startswith("STEP ")]
    assert steps_run[0] == f"STEP {step + 1}" and steps_run[-1] == "STEP 12"  # it continued where it stopped
    straight = _run(script, reference, "fresh")
    assert straight.returncode == 0, straight.stderr[-2000:]

    got, want = weights(interrupted), weights(reference)
    assert got.keys() == want.keys()
    for name in want:  # same arithmetic in the same process set-up: exactly equal
        assert torch.equal(got[name], want[name]), name


# ---- bf16 on a CPU ----------------------------------------------------------------------------------------
class DtypeWatch(TrainerCallback):
    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_step_end(self, trainer: Trainer) -> None:
        self.dtypes |= {p.dtype for p in trainer.model.parameters()}


def bf16_args(out: Path, **overrides: Any) -> TrainingArguments:
    opts: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        save_steps=10,
        bf16=True,
        seed=0,
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="jsonl",
    )
    opts.update(overrides)
    return TrainingArguments(**opts)


def test_bf16_training_on_cpu_learns_keeps_fp32_weights_and_resumes(tmp_path: Path) -> None:
    watch = DtypeWatch()
    model = tiny_gpt()
    trainer = Trainer(model, bf16_args(tmp_path / "a"), train_dataset=pattern_data(), callbacks=[watch])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]  # the 8-token cycle is learnt: ln(64) = 4.16 falls well below half
    assert watch.dtypes == {torch.float32}  # autocast computes in bf16; the weights (AdamW's master copy) stay fp32
    final = weights(tmp_path / "a")
    assert {t.dtype for t in final.values()} == {torch.float32}
    assert (tmp_path / "a" / "checkpoint-10" / "optimizer.pt").is_file()

    # a run resumed from the step-10 checkpoint ends where the uninterrupted one did (same process, same ops)
    resumed = Trainer(tiny_gpt(), bf16_args(tmp_path / "a"), train_dataset=pattern_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    again = {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}
    for name, tensor in model.state_dict().items():
        assert torch.equal(again[name], tensor), name


# ---- MFU ---------------------------------------------------------------------------------------------------
def hand_flops_per_token(vocab: int, width: int, layers: int, context: int) -> int:
    """6N + 12·L·C·T (docs/architecture.md), with N counted by hand for a GPT-2 block: per layer two
    LayerNorms (2C each), qkv (C·3C + 3C), the attention output (C·C + C), the MLP (C·4C + 4C, 4C·C + C);
    the final LayerNorm (2C); the token embedding (V·C, tied with the LM head); position embeddings not counted."""
    C = width
    n = layers * (2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)) + 2 * C
    n += vocab * C
    return 6 * n + 12 * layers * C * context


def test_mfu_matches_the_formula_computed_by_hand(tmp_path: Path) -> None:
    model = tiny_gpt()
    hand = hand_flops_per_token(V, 32, 2, CTX)
    assert model.flops_per_token(CTX) == hand
    assert model.flops_per_token(8) == hand - 12 * 2 * 32 * (CTX - 8)  # the attention term follows the length
    # 2 processes at 1 TFLOP/s peak each, 5,000 tokens/s: MFU = flops/token · tokens/s / (2 · 1e12)
    assert model_flops_utilization(hand, 5000.0, 1e12, world_size=2) == pytest.approx(hand * 5000.0 / 2e12, rel=1e-12)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        device="cpu",
        disable_tqdm=True,
        peak_flops=2.5e11,
        report_to="jsonl",
    )
    trainer = Trainer(model, args, train_dataset=pattern_data(12))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "mfu" in h]
    assert len(logged) == 3
    for h in logged:  # both figures are logged to 7 significant digits
        assert h["mfu"] == pytest.approx(hand * h["tokens_per_second"] / 2.5e11, rel=1e-5)


# ---- learning-rate schedules --------------------------------------------------------------------------------
ORACLES = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": get_constant_schedule_with_warmup,
}


def _lrs(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[float]:
    """The learning rate each optimizer step uses, steps 0 .. steps - 1 (then one past the end)."""
    seen = []
    for _ in range(steps + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("kind", sorted(ORACLES))
@pytest.mark.parametrize("warmup", [0, 1, 4, 0.1, 0.25])
def test_schedules_match_transformers_at_every_step(kind: str, warmup: int | float) -> None:
    total, lr = 37, 3e-3
    args = TrainingArguments(max_steps=total, learning_rate=lr, warmup_steps=warmup, lr_scheduler_type=kind)
    # transformers' TrainingArguments.get_warmup_steps: an integer as is, a share of the run rounded up
    warmup_steps = warmup if isinstance(warmup, int) else math.ceil(total * warmup)
    assert args.warmup == warmup_steps

    ours_opt = build_optimizer(nn.Linear(2, 2), args)
    theirs_opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=lr)
    extra = {} if kind == "constant" else {"num_training_steps": total}
    theirs = _lrs(theirs_opt, ORACLES[kind](theirs_opt, num_warmup_steps=warmup_steps, **extra), total)
    ours = _lrs(ours_opt, build_scheduler(ours_opt, args), total)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)  # the same formula: equal but for the last bit
    if warmup_steps:
        assert ours[0] == 0.0 and ours[1] == pytest.approx(lr / warmup_steps)  # the first update has lr 0


def test_warmup_ratio_is_rounded_up_like_transformers() -> None:
    args = TrainingArguments(max_steps=37, warmup_ratio=0.1)
    assert args.warmup == math.ceil(3.7) == 4


def test_the_first_warmup_step_leaves_the_weights_unchanged(tmp_path: Path) -> None:
    """With warmup the first update runs at lr 0 (transformers' schedule): AdamW only gathers its moments."""
    model = tiny_gpt()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        warmup_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        save_strategy="no",
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="none",
    )
    Trainer(model, args, train_dataset=pattern_data(4)).train()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
