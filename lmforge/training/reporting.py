"""What a training run tells the world: the callback hooks, metrics.jsonl, the step figures (tokens/s,
MFU), a PNG of the log history and TensorBoard scalars.

matplotlib (a heavy import, needed once at the end of training) and tensorboard (optional) are imported
only when used.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.files import atomic_write_bytes, atomic_write_text


class TrainerCallback:
    """Override any of these hooks; each gets the `Trainer` (typed Any here: the Trainer imports this module)
    and (where there is one) a metrics dict. Set `trainer.should_stop = True` from a hook to end training
    after the current step."""

    def on_train_begin(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any) -> None: ...
    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
    def on_save(self, trainer: Any, checkpoint: Path) -> None: ...
    def on_train_end(self, trainer: Any) -> None: ...


def model_flops_utilization(
    flops_per_token: float, tokens_per_second: float, peak_flops: float, world_size: int = 1
) -> float:
    """MFU: the share of the hardware's peak FLOP/s (`peak_flops` per process, `world_size` processes) that
    training `tokens_per_second` tokens at `flops_per_token` (6N + 12·L·C·T for a GPT) amounts to."""
    return flops_per_token * tokens_per_second / (peak_flops * world_size)


class MetricsLog:
    """metrics.jsonl: one JSON object per log entry (with its `step`), appended as training goes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def trim(self, step: int) -> None:
        """After a resume, drop the lines an interrupted run wrote past `step` (its checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))


# Evaluation entries that are not quality metrics: timings, which would only clutter the metric panel.
_EVAL_SKIP_SUFFIXES = ("_runtime", "_per_second")


def _number(value: Any) -> float | None:
    """value as a float if it is a real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "ndim") and value.ndim == 0 and hasattr(value, "item"):
            return _number(value.item())  # a 0-d numpy array or torch tensor
        return None
    return float(value)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the entries that have it as a finite number and have a step."""
    steps, values = [], []
    for entry in history:
        step, value = _number(entry.get("step")), _number(entry.get(key))
        if step is not None and value is not None and math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def plot_history(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Draw the log history (Trainer.state.log_history) against `step` into the PNG file `path`.

    Panels, each drawn only when it has data: training loss with eval_loss; learning rate; every other
    eval_* metric (accuracy, f1, ...); eval_perplexity on its own panel (its range would flatten the
    0-1 metrics), log-scaled when it spans more than a factor of 10. Entries without a step, and
    non-numeric or non-finite values, are skipped; eval_*_runtime / eval_*_per_second timings too.

    Returns the path written, or None when nothing is plotted: an empty history (or one with nothing
    numeric to plot) writes no file and prints nothing; missing matplotlib prints one line saying how to
    install it. The file is replaced atomically, so a viewer never sees half an image. Uses matplotlib's
    object API with the Agg canvas: no window, no display needed, pyplot's global backend untouched.
    """
    history = [e for e in log_history if isinstance(e, dict)]
    keys = sorted({k for e in history for k in e if k.startswith("eval_")})
    loss, eval_loss, lr = _series(history, "loss"), _series(history, "eval_loss"), _series(history, "learning_rate")
    ppl = _series(history, "eval_perplexity")
    others = [
        (k, _series(history, k))
        for k in keys
        if k not in ("eval_loss", "eval_perplexity") and not k.endswith(_EVAL_SKIP_SUFFIXES)
    ]
    others = [(k, s) for k, s in others if s[0]]
    panels: list[tuple[str, list[tuple[str, tuple[list[float], list[float]]]]]] = []
    if loss[0] or eval_loss[0]:
        panels.append(("loss", [(n, s) for n, s in (("train loss", loss), ("eval_loss", eval_loss)) if s[0]]))
    if lr[0]:
        panels.append(("learning rate", [("learning_rate", lr)]))
    if others:
        panels.append(("eval metrics", others))
    if ppl[0]:
        panels.append(("eval perplexity", [("eval_perplexity", ppl)]))
    if not panels:
        return None
    try:  # lazy: matplotlib takes a second to import and is needed once, at the end of training
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("lmforge: plot_history needs matplotlib; install it with `pip install matplotlib`")
        return None

    heights = [1.0 if title == "learning rate" else 2.0 for title, _ in panels]
    fig = Figure(figsize=(8, 1.2 + 1.6 * sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    try:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, (title, lines) in zip(axes, panels):
            for name, (steps, values) in lines:
                evaluation = name.startswith("eval_")
                # evaluations are few points: markers keep a single one visible
                ax.plot(
                    steps,
                    values,
                    label=name,
                    marker="o" if evaluation else None,
                    markersize=4,
                    linewidth=1.2 if evaluation else 1.0,
                )
            ax.set_ylabel(title)
            ax.grid(True, alpha=0.3)
            if title == "eval perplexity" and max(lines[0][1][1]) > 10 * min(lines[0][1][1]) > 0:
                ax.set_yscale("log")  # perplexity falls by orders of magnitude early in pretraining
            if title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            if len(lines) > 1 or title == "eval metrics":
                ax.legend(fontsize="small")
        axes[-1].set_xlabel("step")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        fig.clear()  # no pyplot: nothing global holds the figure once it is cleared and dropped
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _is_main_process() -> bool:
    """True unless this is a torch.distributed process of rank other than 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardCallback(TrainerCallback):
    """Writes every numeric log entry as a TensorBoard scalar at its step (rank 0 only).

    Tags group the entries in TensorBoard: eval_* keys become "eval/<name>" (eval_loss -> eval/loss),
    the others "train/<name>" (loss -> train/loss, learning_rate -> train/learning_rate). logging_dir=None
    uses <trainer output_dir>/runs. The event file is created at the first log, flushed after each log
    (so a live TensorBoard shows it promptly) and closed at the end of training; logging again after
    that opens a new event file in the same folder. Needs `pip install tensorboard`.
    """

    def __init__(self, logging_dir: str | os.PathLike | None = None) -> None:
        try:  # tensorboard is optional (the "full" extra)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoardCallback needs the tensorboard package: pip install tensorboard") from e
        self._writer_class = SummaryWriter
        self.logging_dir = Path(logging_dir) if logging_dir is not None else None
        self.writer: Any = None

    def _get_writer(self, trainer: Any) -> Any:
        if self.writer is None:
            if self.logging_dir is None:
                self.logging_dir = Path(trainer.output_dir) / "runs"
            self.writer = self._writer_class(log_dir=str(self.logging_dir))
        return self.writer

    def on_log(self, trainer: Any, logs: dict[str, Any]) -> None:
        if not _is_main_process():
            return
        step = _number(logs.get("step"))
        if step is None:
            step = float(trainer.state.global_step)
        scalars = {k: v for k, v in ((k, _number(v)) for k, v in logs.items() if k != "step") if v is not None}
        if not scalars:
            return
        writer = self._get_writer(trainer)
        for key, value in scalars.items():
            tag = f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"
            writer.add_scalar(tag, value, global_step=int(step))
        writer.flush()

    def on_train_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
