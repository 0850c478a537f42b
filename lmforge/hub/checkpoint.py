"""Save and load a model directory (config.json + weights in Hugging Face's names) for any model class
that declares its `KeyMap` as the class attribute `hf_key_map`; the hub knows no model family."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.constants import DTYPES
from lmforge.hub.keymap import KeyMap
from lmforge.hub.resolve import resolve_model_dir
from lmforge.hub.weights import read_weights, write_weights

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")  # LoRA's low-rank matrices: saved on their own, not in the model file


def key_map(model: nn.Module) -> KeyMap:
    """The Hugging Face name map that `model`'s class declares."""
    declared = getattr(type(model), "hf_key_map", None)
    if not isinstance(declared, KeyMap):
        raise TypeError(f"{type(model).__name__} declares no Hugging Face key map (class attribute hf_key_map)")
    return declared


def to_hf_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's parameters (or `state`, e.g. gathered from shards) under Hugging Face names (tied
    output weights and LoRA adapters left out)."""
    keys = key_map(model)
    state = dict(model.state_dict() if state is None else state)
    state = {k: v for k, v in state.items() if not k.endswith(ADAPTER_SUFFIXES)}
    if getattr(model.config, "tie_word_embeddings", False):
        for name in keys.tied:
            state.pop(name, None)
    return keys.to_hf(state)


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-named tensors into `model`, checking names, count and shapes.

    The trunk must match exactly. A task head the checkpoint lacks or sizes differently is freshly
    initialised (weights normal with std initializer_range, biases zero) and another task's head is left
    out, each with a warning.
    """
    keys = key_map(model)
    ours, left_out, unexpected = keys.from_hf(hf_state, source)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(ADAPTER_SUFFIXES)}
    tied = keys.tied if getattr(model.config, "tie_word_embeddings", False) else ()
    for name in tied:
        ours.pop(name, None)  # the output layer is the embedding
    fresh = [k for k in keys.task_head if k not in ours or ours[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in ours and k not in fresh and k not in tied]
    extra = [k for k in ours if k not in expected]
    if missing or unexpected or extra:
        raise ValueError(
            f"{source} does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {(unexpected + extra)[:5]}. "
            "Check that config.json belongs to these weights."
        )
    for name, tensor in ours.items():
        if name not in fresh and tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(expected[name].shape)}; config.json and the weights disagree"
            )
    model_name = type(model).__name__
    if left_out:
        warnings.warn(
            f"{source} holds {left_out[:6]}{' ...' if len(left_out) > 6 else ''}, the head of another "
            f"task, which {model_name} does not use; only the shared trunk was loaded",
            stacklevel=3,
        )
    std = getattr(model.config, "initializer_range", 0.02)  # for fresh heads; 0.02 is transformers' default
    layer_norm = {h for h in fresh if isinstance(model.get_submodule(h.rsplit(".", 1)[0]), nn.LayerNorm)}
    for head in fresh:
        found = f"has {head} of shape {tuple(ours[head].shape)}" if head in ours else f"has no {head}"
        init = (
            "ones"
            if head in layer_norm and head.endswith(".weight")
            else "zeros"
            if head.endswith(".bias")
            else f"normal, std {std}"
        )
        warnings.warn(
            f"{source} {found}: {model_name}'s head {head} of shape {tuple(expected[head].shape)} is "
            f"freshly initialised ({init}); train it before use",
            stacklevel=3,
        )
    with torch.no_grad():
        for name, tensor in ours.items():
            if name not in fresh:
                expected[name].copy_(tensor)
        for head in fresh:
            if head in layer_norm and head.endswith(".weight"):
                nn.init.ones_(expected[head])
            elif head.endswith(".bias"):
                nn.init.zeros_(expected[head])
            else:
                nn.init.normal_(expected[head], mean=0.0, std=std)


def load_pretrained(
    cls: type,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **config_overrides: Any,
) -> Any:
    """Build `cls` from a directory's (or cached model id's) config.json and fill it from its weights.

    dtype: None or "auto" keeps the dtype recorded in config.json (float32 when none is); a torch
    dtype or its name converts."""
    directory = resolve_model_dir(path, revision=revision, cache_dir=cache_dir)
    config = cls.config_class.from_pretrained(directory)
    for key in config_overrides:
        if not hasattr(config, key):
            raise TypeError(f"{cls.__name__}.from_pretrained got an unknown option {key!r}")
    if config_overrides:  # e.g. num_labels=3: the label map follows, and the whole config is checked again
        config = config.updated(**config_overrides)
    model = cls(config)
    state, source = read_weights(directory)
    load_hf_state_dict(model, state, str(source))
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    if dtype is None or dtype == "auto":  # the dtype the checkpoint was saved in, as transformers 5 does
        dtype = _saved_dtype(config)
    elif isinstance(dtype, str):
        dtype = torch_dtype(dtype, "dtype argument")
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def torch_dtype(name: str, where: str) -> torch.dtype:
    """A floating-point torch dtype from its name or short name ("bfloat16", "bf16", "fp32", ...)."""
    value = getattr(torch, DTYPES.get(name.lower(), name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{where}: {name!r} is not a floating-point torch dtype (e.g. float32, bfloat16)")
    return value


def _saved_dtype(config: Any) -> torch.dtype | None:
    """`torch_dtype` / `dtype` recorded in config.json (None when absent: float32)."""
    extra = getattr(config, "extra", {})
    name = extra.get("dtype") or extra.get("torch_dtype")
    return torch_dtype(name, "config.json dtype") if isinstance(name, str) else None


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """config.json + model.safetensors (+ tokenizer files), each file written atomically.

    With `max_shard_size` (bytes, or "500MB" / "1GiB") weights larger than that are split into
    Hugging Face's model-00001-of-0000N.safetensors + model.safetensors.index.json; weight files of an
    earlier save into the same folder that this save does not use are removed.
    `state_dict` replaces the model's own tensors (e.g. a sharded model's gathered weights).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.extra.update(dtype=dtype, torch_dtype=dtype)  # loaders restore it (transformers 5: "dtype")
    cls = type(model)  # config.json's "architectures" names the class that was saved
    model.config.save(directory, architecture=(getattr(cls, "hf_architecture", cls.__name__), cls.__name__))
    state = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model, state_dict).items()}
    write_weights(directory, state, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
