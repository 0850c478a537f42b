"""Weight files in Hugging Face's layout: read model.safetensors, sharded safetensors (+ index) and
weights-only pytorch_model*.bin pickles; write model.safetensors or shards + index, each file atomically."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from lmforge.files import atomic_write_bytes, atomic_write_text
from lmforge.hub.resolve import file_present

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # Hugging Face's shard names, numbered from 1
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file with an error that names the file when it is damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is truncated or not a safetensors file ({e}); re-save or re-copy the checkpoint"
        ) from None


def _read_pickle(path: Path) -> dict[str, Tensor]:
    """A pytorch_model*.bin loaded with weights_only=True: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that would run code
        raise ValueError(
            f"refused to load {path}: it is not a plain tensor file ({type(e).__name__}). "
            "Convert it to model.safetensors from a trusted environment."
        ) from None


def read_sharded(index_path: Path, reader: Callable[[Path], dict[str, Tensor]]) -> dict[str, Tensor]:
    """All shards listed in a Hugging Face `*.index.json` ({"metadata": ..., "weight_map": {tensor: shard}})
    merged into one state dict, each shard read by `reader` (so a damaged shard is named)."""
    directory = index_path.parent
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise ValueError(
            f"{index_path} has no usable weight_map (tensor name -> shard file name); it is not a "
            "sharded-checkpoint index. Re-download or re-save the checkpoint"
        )
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts]
    if outside:
        raise ValueError(
            f"{index_path} names shard files outside its folder ({outside[:3]}); refusing to read "
            "them. Shards must be file names next to the index"
        )
    missing = [s for s in shards if not file_present(directory / s)]
    if missing:
        raise FileNotFoundError(
            f"{index_path.name} lists shard(s) {missing} that are not in {directory}: the "
            "checkpoint is incomplete. Download or copy the missing file(s) next to the index"
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(reader(directory / shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise ValueError(
            f"{index_path} maps {absent[:5]} to shards that do not contain them; the index and the "
            "shards come from different saves. Re-download or re-save the checkpoint"
        )
    return state


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """The directory's weights as one state dict, and the file they came from (the index when sharded).

    Looked for in transformers' order: model.safetensors, model.safetensors.index.json (+ shards),
    pytorch_model.bin, pytorch_model.bin.index.json (+ shards); pickles load with weights_only=True
    (never executes code).
    """
    directory = Path(directory)
    candidates = (  # (file, reader of a single file, sharded?)
        (WEIGHTS_NAME, read_safetensors, False),
        (WEIGHTS_INDEX_NAME, read_safetensors, True),
        (LEGACY_WEIGHTS_NAME, _read_pickle, False),
        (LEGACY_WEIGHTS_INDEX_NAME, _read_pickle, True),
    )
    for name, reader, sharded in candidates:
        path = directory / name
        if file_present(path):
            return (read_sharded(path, reader) if sharded else reader(path)), path
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}, nor a sharded "
        f"{WEIGHTS_INDEX_NAME} / {LEGACY_WEIGHTS_INDEX_NAME}; a model directory is written "
        "by save_pretrained / `lmforge pretrain`"
    )


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string as transformers takes it: "500MB", "2GB" (powers of 10), "1GiB"
    (powers of 2); a lower-case "b" ("5Gb") means bits."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG])(i?)([Bb])\s*", size, flags=re.IGNORECASE)
        if m:
            digits, prefix, binary, unit = m.groups()
            scale = (2**10 if binary else 10**3) ** ("KMG".index(prefix.upper()) + 1)
            value = int(digits) * scale
            if value > 0:
                return value // 8 if unit == "b" and not binary else value
    raise ValueError(
        f"max_shard_size={size!r} is not a size; give bytes as a positive int or a string such as "
        "'500MB', '2GB' or '1GiB'"
    )


def _split_shards(state: dict[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Tensors in order, a new shard whenever the next would overflow `limit` (transformers' rule:
    a tensor larger than the limit gets a shard of its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(directory: Path, state: dict[str, Tensor], max_shard_size: int | str | None = None) -> None:
    """Write `state` (CPU, contiguous, Hugging Face names) as model.safetensors or, when it is larger than
    `max_shard_size`, as model-00001-of-0000N.safetensors + model.safetensors.index.json. Weight files of an
    earlier save into the same folder that this save does not use are removed afterwards, so that no loader
    picks up stale weights (a single model.safetensors would win over a new index)."""
    shards = [state] if max_shard_size is None else _split_shards(state, parse_size(max_shard_size))
    if len(shards) == 1:
        atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        written = {WEIGHTS_NAME}
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = SHARD_NAME.format(i, len(shards))
            atomic_write_bytes(directory / name, save(shard, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
        index = {
            "metadata": {
                "total_parameters": sum(t.numel() for t in state.values()),
                "total_size": sum(t.numel() * t.element_size() for t in state.values()),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        atomic_write_text(directory / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written = {WEIGHTS_INDEX_NAME, *weight_map.values()}
    # the index before its shards: at every moment the files a loader would pick are consistent
    old_shards = sorted(p.name for p in directory.iterdir() if _SHARD_RE.match(p.name))
    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *old_shards):
        if name not in written:
            (directory / name).unlink(missing_ok=True)
