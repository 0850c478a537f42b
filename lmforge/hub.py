"""Checkpoints in Hugging Face's layout: resolve a path, map parameter names, load and save.

A model directory holds `config.json`, `model.safetensors` (Hugging Face parameter names) and the
tokenizer files. Conversion between lmforge's module names and Hugging Face's is one declarative
key map per family, checked for count and shape in both directions.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lmforge.utils import atomic_write_bytes

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"


@dataclass(frozen=True)
class KeyRule:
    """lmforge name <-> Hugging Face name; `{i}` stands for a layer number. `transpose`: GPT-2's
    Conv1D stores (in, out) where nn.Linear stores (out, in)."""

    ours: str
    theirs: str
    transpose: bool = False

    def _regex(self, pattern: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")

    def match(self, name: str, ours: bool) -> str | None:
        """The name on the other side, or None if `name` is not covered by this rule."""
        m = self._regex(self.ours if ours else self.theirs).match(name)
        if m is None:
            return None
        target = self.theirs if ours else self.ours
        return target.replace("{i}", m.group(1)) if m.groups() else target


GPT2_KEYS: list[KeyRule] = [
    KeyRule("transformer.wte.weight", "transformer.wte.weight"),
    KeyRule("transformer.wpe.weight", "transformer.wpe.weight"),
    KeyRule("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight"),
    KeyRule("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias"),
    KeyRule("transformer.h.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True),
    KeyRule("transformer.h.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
    KeyRule("transformer.h.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", transpose=True),
    KeyRule("transformer.h.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    KeyRule("transformer.h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight"),
    KeyRule("transformer.h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias"),
    KeyRule("transformer.h.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", transpose=True),
    KeyRule("transformer.h.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    KeyRule("transformer.h.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", transpose=True),
    KeyRule("transformer.h.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    KeyRule("transformer.ln_f.weight", "transformer.ln_f.weight"),
    KeyRule("transformer.ln_f.bias", "transformer.ln_f.bias"),
    KeyRule("lm_head.weight", "lm_head.weight"),
]

# Non-parameter entries found in some Hugging Face GPT-2 files (old causal-mask buffers).
GPT2_IGNORED = re.compile(r".*\.attn\.(bias|masked_bias)$")


def _convert(state: dict[str, Tensor], rules: list[KeyRule], to_hf: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Rename (and transpose) every tensor; returns (converted, names no rule covers)."""
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for name, tensor in state.items():
        for rule in rules:
            target = rule.match(name, ours=to_hf)
            if target is not None:
                out[target] = tensor.t().contiguous() if rule.transpose else tensor
                break
        else:
            unmatched.append(name)
    return out, unmatched


def _family(model: nn.Module) -> tuple[list[KeyRule], re.Pattern[str]]:
    from lmforge.models.gpt import GPTForCausalLM

    if isinstance(model, GPTForCausalLM):
        return GPT2_KEYS, GPT2_IGNORED
    raise TypeError(f"no Hugging Face key map for {type(model).__name__}")


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters under Hugging Face names (tied output weights left out, as HF does)."""
    rules, _ = _family(model)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    converted, unmatched = _convert(state, rules, to_hf=True)
    if unmatched:
        raise RuntimeError(f"key map has no rule for {unmatched[:5]} (lmforge bug: add a KeyRule)")
    return converted


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-named tensors into `model`, checking names, count and shapes."""
    rules, ignored = _family(model)
    hf_state = {k: v for k, v in hf_state.items() if not ignored.match(k)}
    # Base-model files (GPT2Model) have no "transformer." prefix.
    if hf_state and not any(k.startswith("transformer.") for k in hf_state):
        hf_state = {("transformer." + k): v for k, v in hf_state.items()}
    ours, unexpected = _convert(hf_state, rules, to_hf=False)
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        ours.pop("lm_head.weight", None)  # the output layer is the embedding
    missing = [k for k in expected if k not in ours and not (tied and k == "lm_head.weight")]
    extra = [k for k in ours if k not in expected]
    if missing or unexpected or extra:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {(unexpected + extra)[:5]}. "
                         "Check that config.json belongs to these weights.")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[name].shape)}; config.json and the weights disagree")
    with torch.no_grad():
        for name, tensor in ours.items():
            expected[name].copy_(tensor)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file with an error that names the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({e}); re-save or re-copy the "
                         "checkpoint") from None


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """model.safetensors, else pytorch_model.bin loaded with weights_only=True (never executes code)."""
    st = directory / WEIGHTS_NAME
    if st.is_file():
        return read_safetensors(st), st
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True), legacy
        except Exception as e:  # weights_only refuses anything that would run code
            raise ValueError(f"refused to load {legacy}: it is not a plain tensor file ({type(e).__name__}). "
                             "Convert it to model.safetensors from a trusted environment.") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}; "
                            "a model directory is written by save_pretrained / `lmforge pretrain`")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local model directory holding config.json (the Hugging Face cache comes with the hub issue)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; pass the folder written by "
                                "save_pretrained or `lmforge pretrain --out`")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; it is not a model directory "
                                "(expected config.json + model.safetensors)")
    return directory


def load_pretrained(cls: type, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, **config_overrides: Any) -> Any:
    """Build `cls` from a directory's config.json and fill it from its weights."""
    directory = resolve_model_dir(path)
    config = cls.config_class.from_pretrained(directory)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"{cls.__name__}.from_pretrained got an unknown option {key!r}")
        setattr(config, key, value)
    model = cls(config)
    state, source = read_weights(directory)
    load_hf_state_dict(model, state, str(source))
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """config.json + model.safetensors (+ tokenizer files), each file written atomically."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model).items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
