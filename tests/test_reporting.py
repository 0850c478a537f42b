"""Tests for lmforge.training.reporting: the PNG of a log history and the TensorBoard callback."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.training import Trainer, TrainerCallback, TrainingArguments
from lmforge.training.reporting import TensorBoardCallback, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRAIN = [
    {
        "step": s,
        "loss": 3.0 - 0.1 * s,
        "learning_rate": 1e-4 * min(1.0, s / 5),
        "grad_norm": 0.5,
        "tokens_per_second": 1234.0,
    }
    for s in range(1, 21)
]
EVAL = [
    {
        "step": s,
        "eval_loss": 2.9 - 0.1 * s,
        "eval_perplexity": 18.0 - s,
        "eval_accuracy": 0.5 + 0.02 * s,
        "eval_f1": 0.4 + 0.02 * s,
    }
    for s in (5, 10, 15, 20)
]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000  # axes, lines and labels: far more than an empty image
    assert [p.name for p in path.parent.iterdir() if p.name != path.name] == []  # no temporary file left


@pytest.mark.parametrize(
    "history",
    [TRAIN + EVAL, TRAIN, EVAL, sorted(TRAIN + EVAL, key=lambda e: e["step"])],
    ids=["train+eval", "train only", "eval only", "interleaved"],
)
def test_plot_history_writes_png(tmp_path, history):
    path = tmp_path / "plots" / "history.png"  # the folder is created
    assert plot_history(history, path) == path
    assert_png(path)


def test_plot_history_replaces_and_tolerates_odd_entries(tmp_path):
    path = tmp_path / "history.png"
    path.write_bytes(b"old")
    odd = [
        {"loss": 1.0},
        {"step": 3, "loss": float("nan")},
        {"step": 4, "loss": "n/a"},
        {"step": 5, "loss": True},
        {"step": 6, "eval_runtime": 1.5, "eval_note": "x"},
    ]
    assert plot_history(TRAIN + odd, str(path)) == path  # a str path; the old file is replaced
    assert_png(path)


@pytest.mark.parametrize(
    "history", [[], [{"step": 1, "note": "x"}], [{"loss": 1.0}]], ids=["empty", "nothing numeric", "no step"]
)
def test_plot_history_nothing_to_plot_writes_nothing(tmp_path, history, capsys):
    path = tmp_path / "history.png"
    assert plot_history(history, path) is None
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_plot_history_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of any of these now raises ImportError
    assert plot_history(TRAIN, tmp_path / "history.png") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install matplotlib" in out
    assert list(tmp_path.iterdir()) == []


def test_plot_history_leaves_pyplot_alone(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_history(TRAIN + EVAL, tmp_path / "h.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot  # no pyplot import, no backend switch


# ---- TensorBoard --------------------------------------------------------------------------------
def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def fake_trainer(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(global_step=0), output_dir=str(tmp_path / "out"))


def test_tensorboard_writes_scalars(tmp_path):
    trainer, logdir = fake_trainer(tmp_path), tmp_path / "tb"
    cb = TensorBoardCallback(logdir)
    assert isinstance(cb, TrainerCallback)
    cb.on_log(
        trainer,
        {"step": 10, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5, "note": "text", "flag": True, "none": None},
    )
    cb.on_log(trainer, {"step": 20, "loss": 2.25, "learning_rate": 5e-5, "grad_norm": 0.25})
    cb.on_log(trainer, {"step": 20, "eval_loss": 2.125, "eval_accuracy": 0.75})
    trainer.state.global_step = 30
    cb.on_log(trainer, {"loss": 2.0})  # no step in the entry: the trainer's global step
    cb.on_train_end(trainer)
    assert cb.writer is None
    scalars = read_scalars(logdir)
    assert set(scalars) == {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/accuracy"}
    assert scalars["train/loss"] == [(10, 2.5), (20, 2.25), (30, 2.0)]  # exact in float32
    assert [s for s, _ in scalars["train/learning_rate"]] == [10, 20]
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([1e-4, 5e-5], rel=1e-6)
    assert scalars["train/grad_norm"] == [(10, 0.5), (20, 0.25)]
    assert scalars["eval/loss"] == [(20, 2.125)] and scalars["eval/accuracy"] == [(20, 0.75)]
    assert not (tmp_path / "out").exists()  # an explicit logging_dir: nothing under output_dir


def test_tensorboard_default_dir_and_real_trainer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=["none"], peak_flops=1.0)
    trainer = Trainer(torch.nn.Linear(2, 2), args, callbacks=[TensorBoardCallback()])
    trainer.state.global_step = 7
    trainer.log({"loss": 1.5, "learning_rate": 2e-4})  # the Trainer adds the step and calls on_log
    trainer.callbacks[0].on_train_end(trainer)
    scalars = read_scalars(tmp_path / "run" / "runs")
    assert scalars["train/loss"] == [(7, 1.5)]


def test_tensorboard_reopens_after_train_end(tmp_path):
    trainer, cb = fake_trainer(tmp_path), TensorBoardCallback(tmp_path / "tb")
    cb.on_log(trainer, {"step": 1, "loss": 1.0})
    cb.on_train_end(trainer)
    cb.on_log(trainer, {"step": 2, "eval_loss": 0.5})  # e.g. trainer.evaluate() after training
    cb.on_train_end(trainer)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 1.0)] and scalars["eval/loss"] == [(2, 0.5)]


def test_tensorboard_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    cb = TensorBoardCallback(tmp_path / "tb")
    cb.on_log(fake_trainer(tmp_path), {"step": 1, "loss": 1.0})
    cb.on_train_end(fake_trainer(tmp_path))
    assert not (tmp_path / "tb").exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    cb.on_log(fake_trainer(tmp_path), {"step": 2, "loss": 0.5})
    cb.on_train_end(fake_trainer(tmp_path))
    assert read_scalars(tmp_path / "tb")["train/loss"] == [(2, 0.5)]


def test_tensorboard_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardCallback(tmp_path / "tb")
