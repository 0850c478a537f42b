"""Training checkpoints: `output_dir/checkpoint-<step>/` folders from which a run resumes exactly.

A checkpoint is the model directory (Hugging Face layout, LoRA adapters next to the weights) plus
`optimizer.pt` (optimizer, scheduler and gradient-scaler states), one `rng_state*.pt` per process and
`trainer_state.json` (step, data position, log history). It is written under a temporary name and
renamed (`files.atomic_directory`), so a crash never leaves half a checkpoint; `trainer_state.json`
marks a complete one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.files import atomic_directory, recover_directory
from lmforge.hub import load_hf_state_dict, read_weights, save_pretrained
from lmforge.nn import lora

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class TrainerState:
    """What a checkpoint needs besides tensors; saved as trainer_state.json."""

    global_step: int = 0
    max_steps: int = 0
    samples_seen: int = 0  # data position: the next training example is sample number `samples_seen`
    tokens_seen: int = 0
    epoch: float = 0.0
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    evals_without_improvement: int = 0
    world_size: int = 1
    log_history: list[dict[str, Any]] = field(default_factory=list)


# ---- finding, cleaning and rotating ---------------------------------------------------------------
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return [p for _, p in sorted(found)]


def clean_unfinished_saves(output_dir: Path) -> None:
    """Remove saves a crash cut short (temporary folders), and finish re-saves cut short between their renames."""
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in output_dir.glob(".old-checkpoint-*"):
        recover_directory(output_dir / old.name[len(".old-") :].rsplit("-", 1)[0])


def rotate_checkpoints(output_dir: Path, limit: int | None, best: str | None) -> None:
    """Keep the newest `limit` checkpoints (all when None); the best one is never deleted."""
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    keep = set(found[-limit:]) | {found[-1]} | ({Path(best)} if best else set())
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


# ---- random number generators ----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as tensors and plain values
    (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNGs to a state from `rng_state` (after a round trip through torch.save/load)."""
    version, internal, gauss = state["python"]  # random.setstate needs tuples; a round trip may give lists
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(path: Path, rank: int) -> Path:
    return path / (RNG_NAME if rank == 0 else f"rng_state_{rank}.pt")


# ---- writing ---------------------------------------------------------------------------------------
def save_model_dir(model: nn.Module, directory: Path, tokenizer: Any, state_dict: dict[str, Tensor] | None) -> None:
    """The model (and tokenizer) in Hugging Face layout, plus its LoRA adapters if it has any."""
    save_pretrained(model, directory, tokenizer=tokenizer, state_dict=state_dict)
    if lora.has_lora(model):
        lora.save_adapters(model, directory)


def write_checkpoint(
    final: Path,
    model: nn.Module,
    tokenizer: Any,
    state_dict: dict[str, Tensor] | None,
    training: dict[str, Any],
    all_rng: list[dict[str, Any]],
    state: TrainerState,
    args: dict[str, Any],
) -> None:
    """Write checkpoint folder `final` atomically: the model directory, `training` (optimizer, scheduler
    and scaler states), every process's RNG state (`all_rng[rank]`) and the trainer state with `args`."""
    with atomic_directory(final) as tmp:
        save_model_dir(model, tmp, tokenizer, state_dict)
        torch.save(training, tmp / OPTIMIZER_NAME)
        for rank, rng in enumerate(all_rng):
            torch.save(rng, rng_file(tmp, rank))
        saved = {**state.__dict__, "args": args}
        (tmp / STATE_NAME).write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")


# ---- reading ---------------------------------------------------------------------------------------
def read_trainer_state(path: Path, world_size: int) -> TrainerState:
    """The TrainerState saved in checkpoint `path`, for a run of `world_size` processes; warns when the
    checkpoint was written by another number of processes (random streams cannot continue identically)."""
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {STATE_NAME}); "
            "pass a checkpoint-<step> folder written by the Trainer"
        )
    saved = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    saved.pop("args", None)
    saved_world = saved.get("world_size", 1)
    if saved_world != world_size:
        warnings.warn(
            f"{path} was written by {saved_world} process(es) and this run has {world_size}: the "
            "weights, optimizer and data position continue exactly, but random streams such as dropout "
            "masks cannot continue identically",
            stacklevel=4,
        )
    return TrainerState(**{**saved, "world_size": world_size})


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load the weights (and LoRA adapters, when the model has LoRA layers and the folder holds them) of
    model directory or checkpoint `path` into `model`."""
    weights, source = read_weights(path)
    load_hf_state_dict(model, weights, str(source))
    if lora.has_lora(model) and (path / ADAPTER_WEIGHTS).is_file():
        lora.load_adapters(model, path)


def read_training_state(path: Path, device: torch.device) -> dict[str, Any]:
    """optimizer.pt of checkpoint `path`: {"optimizer", "scheduler", "scaler"} states (tensors on `device`)."""
    return torch.load(path / OPTIMIZER_NAME, map_location=device, weights_only=True)


def read_rng(path: Path, rank: int) -> dict[str, Any] | None:
    """Process `rank`'s saved RNG state, or None when the checkpoint has none for it."""
    file = rng_file(path, rank)
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None
