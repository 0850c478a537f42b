"""Atomic writes and their crash recovery, devices, seeding side effects, recipe YAML numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.files import atomic_directory, atomic_write_text, recover_directory
from lmforge.training.pretrain import apply_overrides, load_recipe
from lmforge.utils import matmul_peak_flops, resolve_device


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "新的")
    assert path.read_text(encoding="utf-8") == "新的"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_directory_crash_keeps_the_old_version(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-4"
    with atomic_directory(final) as d:
        (d / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "x").write_text("2")
            raise RuntimeError("crash while writing")
    assert (final / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_recover_directory_after_a_crash_between_renames(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    (final / "x").write_text("1")
    os.replace(final, tmp_path / ".old-checkpoint-4-999")  # the state a kill between the renames leaves
    recover_directory(final)
    assert (final / "x").read_text() == "1"
    assert not list(tmp_path.glob(".old-*"))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_matmul_peak_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    peak = matmul_peak_flops("cpu", seconds=0.05)
    assert peak > 1e8  # any CPU does more than 0.1 GFLOP/s
    assert torch.equal(torch.rand(4), expected)


def test_recipe_numbers_in_either_spelling(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\n  weight_decay: 1.0e-2\n  max_steps: 10\n", encoding="utf-8")
    training = load_recipe(str(path))["training"]
    assert training == {"learning_rate": 0.001, "weight_decay": 0.01, "max_steps": 10}
    over = apply_overrides({}, ["training.learning_rate=3e-4", "model.n_layer=2", "data=[a, b]"])
    assert over == {"training": {"learning_rate": 0.0003}, "model": {"n_layer": 2}, "data": ["a", "b"]}


def test_written_files_and_folders_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_directory(tmp_path / "checkpoint-1") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "checkpoint-1").stat().st_mode & 0o777 == 0o755
