"""LoRA: low-rank adapters for fine-tuning a frozen model (Hu et al., 2021, arXiv:2106.09685).

A chosen `nn.Linear` with frozen weight W (out, in) is replaced by `LoRALinear`, which adds a trainable
low-rank update:

    y = x W^T + b + (dropout(x) A^T B^T) * (alpha / r)        A: (r, in), B: (out, r), B = 0 at the start

Only A and B (and any `modules_to_save`, e.g. a fresh task head) are trained, so an adapter is a small
file next to an unchanged base checkpoint. `merge_lora` folds B A * scale into W for inference with no
extra cost; `merge_and_unload` turns the model back into a plain one that `save_pretrained` writes as an
ordinary Hugging Face checkpoint.

`LoRALinear` keeps the wrapped layer's `weight` and `bias` Parameters under the same names, so the base
model's state-dict keys do not change; the adapters add `<layer>.lora_A` and `<layer>.lora_B`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import Tensor, nn

from lmforge.files import atomic_write_bytes, atomic_write_text
from lmforge.hub import ADAPTER_SUFFIXES, read_safetensors
from lmforge.nn.cpu_linear import autograd_linear
from lmforge.nn.layers import dropout as _dropout

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
LORA_FORMAT = "lmforge-lora"  # written to adapter_config.json, so a foreign file is told apart
# The attention projections (fused W^Q W^K W^V and W^O) of every lmforge block; `mlp.proj` is not one.
DEFAULT_TARGET_MODULES = ("attn.qkv", "attn.proj")


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    """A regex string must match the whole module name; a list entry matches the name itself or a
    dotted suffix of it ("attn.proj" matches "transformer.h.0.attn.proj", not "mlp.proj")."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


@dataclass
class LoRAConfig:
    """Which layers get adapters and how large they are; saved as `adapter_config.json`.

    r: rank of the update B A. alpha: the update is scaled by alpha / r (so changing r does not
    change the effective learning rate much). dropout: applied to the adapter's input only.
    target_modules: a list of module-name suffixes (matched at a dot boundary) or one regex string
    (matched against the whole name); only `nn.Linear` modules are wrapped. modules_to_save: suffixes
    of modules trained fully alongside the adapters and saved with them (e.g. a new task head:
    "classifier", "score", "qa_outputs").
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regex: {e}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
                raise ValueError(
                    f"target_modules must be a regex string or a non-empty list of module-name "
                    f"suffixes, got {self.target_modules!r}"
                )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save)
        if not all(isinstance(p, str) and p for p in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {self.modules_to_save!r}")

    @property
    def scale(self) -> float:
        """alpha / r, the factor on B A x."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"format": LORA_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Inverse of `to_dict`; refuses other formats (e.g. a peft adapter_config.json) by name."""
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != LORA_FORMAT:
            what = f"peft_type={data['peft_type']!r} (a peft adapter)" if "peft_type" in data else f"format={fmt!r}"
            raise ValueError(f"not an lmforge LoRA config: {what}; lmforge reads adapters written by save_adapters")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown LoRA config keys {unknown}; expected {sorted(names)}")
        return cls(**data)


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a trainable low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / r.

    `weight` and `bias` are the wrapped layer's own Parameters (frozen here), so tying and
    state-dict names are unchanged. B starts at zero: a fresh adapter changes no output. When
    `merged`, W holds W + B A * scale and forward skips the low-rank path.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r)
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scale = self.alpha / r
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises its weights (Kaiming uniform), B zero: B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """B A * scale, (out, in), in float32 for accuracy, the update that `merge` adds to W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = autograd_linear(x, self.weight, self.bias)  # the frozen base product (oneDNN where faster)
        if self.merged:
            return y
        h = F.linear(_dropout(x, self.dropout, self.training), self.lora_A)  # (..., r)
        return y + F.linear(h, self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W += B A * scale (does nothing if already merged)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= B A * scale (does nothing if not merged). Exact up to float rounding."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's (merged) weight and bias Parameters."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, merged={self.merged}"
        )


# ---- applying adapters to a model -------------------------------------------------------------


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    """Whether `model` holds LoRA layers."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _require_lora(model: nn.Module, what: str) -> None:
    if not has_lora(model):
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call apply_lora(model, config) first")


def _saved_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the modules trained fully (outermost matches only); every pattern must match."""
    names = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
    for pattern in config.modules_to_save:
        if not any(_matches(n, [pattern]) for n in names):
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f"modules_to_save entry {pattern!r} matches no module of {type(model).__name__} "
                f"(its top-level modules: {children})"
            )
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (tied parameters have several)."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def _find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the nn.Linear modules to wrap; errors if a pattern finds nothing."""
    linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]  # not the root itself
    targets = [n for n in linears if _matches(n, config.target_modules)]
    if isinstance(config.target_modules, str):  # a regex: must match something
        unmatched = [] if targets else [config.target_modules]
    else:  # every suffix must match something (catches typos)
        unmatched = [p for p in config.target_modules if not any(_matches(n, [p]) for n in targets)]
    if unmatched:
        shown = linears[:12]
        more = f" ... ({len(linears)} in all)" if len(linears) > len(shown) else ""
        raise ValueError(
            f"LoRA target_modules {unmatched} match no nn.Linear of {type(model).__name__}; "
            f"its Linear modules are {shown}{more}. Use dotted suffixes (e.g. 'attn.qkv') or a regex "
            "matching the whole name"
        )
    return targets


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Wrap every targeted nn.Linear of `model` in a `LoRALinear` (in place) and freeze all other
    parameters except those of `config.modules_to_save`; returns `model`.

    Refuses a model that already has LoRA layers (no double wrapping) and a target whose weight is
    tied to another module (e.g. GPT's lm_head = wte: merging would change the embedding too).
    """
    config = config or LoRAConfig()
    if has_lora(model):
        names = [n for n, _ in _lora_layers(model)][:4]
        raise ValueError(
            f"{type(model).__name__} already has LoRA layers ({names} ...); apply_lora twice would "
            "wrap them twice. Load new adapters with load_adapters, or call merge_and_unload first"
        )
    targets = _find_targets(model, config)
    saved = _saved_modules(model, config)
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(
            f"{overlap[:4]} are both LoRA targets and inside modules_to_save {saved}; a module is "
            "either adapted or trained fully, not both"
        )
    owners = _parameter_names(model)
    for name in targets:
        weight = model.get_submodule(name).weight
        tied = [o for o in owners[id(weight)] if o != f"{name}.weight"]
        if tied:
            raise ValueError(
                f"{name}.weight is tied to {tied[0]}; a LoRA update on it would also change "
                f"{tied[0]} once merged. Leave {name!r} out of target_modules"
            )
    # remember who was trainable, so that merge_and_unload gives back the model as it was
    model._lora_trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lora_config = config
    return model


def _lora_config(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None:  # LoRALinear layers put in by hand: infer what can be inferred
        layers = _lora_layers(model)
        first = layers[0][1]
        config = LoRAConfig(r=first.r, alpha=first.alpha, dropout=first.dropout, target_modules=[n for n, _ in layers])
    return config


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied tensor is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- merging -------------------------------------------------------------------------------------


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A * scale): same outputs, no extra compute.
    Idempotent; `unmerge_lora` undoes it."""
    _require_lora(model, "merge_lora")
    for _, layer in _lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight (W -= B A * scale)."""
    _require_lora(model, "unmerge_lora")
    for _, layer in _lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and replace every LoRALinear with a plain nn.Linear (in place); returns `model`,
    now without any LoRA parts: `save_pretrained` writes it as an ordinary Hugging Face checkpoint.
    `requires_grad` is restored to what it was before `apply_lora`."""
    _require_lora(model, "merge_and_unload")
    for name, layer in _lora_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())
    before = getattr(model, "_lora_trainable_before", None)
    for n, p in model.named_parameters():
        p.requires_grad_(before is None or n in before)
    for attr in ("lora_config", "_lora_trainable_before"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ---- adapter files -------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter consists of, under the model's own names: every `lora_A` / `lora_B` and
    the full state of `modules_to_save`. The base weights are not included."""
    _require_lora(model, "lora_state_dict")
    saved = _saved_modules(model, _lora_config(model))
    state = model.state_dict()
    return {k: v for k, v in state.items() if k.endswith(ADAPTER_SUFFIXES) or any(k.startswith(s + ".") for s in saved)}


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `adapter_model.safetensors` (see `lora_state_dict`) and `adapter_config.json` into
    `directory`, each atomically (a crash leaves the old file or the new one, never half of one)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state_dict(model).items()}
    config = _lora_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # weights first: the config, which a loader reads first, never announces weights not yet written
    atomic_write_bytes(directory / ADAPTER_WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig saved in `directory/adapter_config.json`."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not an adapter directory written by save_adapters")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return LoRAConfig.from_dict(data)


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters written by `save_adapters` into `model` (in place); returns `model`.

    A model without LoRA layers gets them first, from the saved config. Every adapter tensor must be
    present with the model's shape; a merged model is unmerged for the copy and merged again.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: the adapter directory {directory} is incomplete")
    saved = read_safetensors(weights_path)
    if not has_lora(model):
        apply_lora(model, config)
    else:
        scales = {(layer.r, layer.alpha) for _, layer in _lora_layers(model)}
        if scales != {(config.r, float(config.alpha))}:
            raise ValueError(
                f"the model's LoRA layers have (r, alpha) {sorted(scales)}, the adapter in {directory} "
                f"was trained with ({config.r}, {config.alpha:g}); apply the saved config instead "
                "(load into a model without LoRA layers)"
            )
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the model's adapters: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. The adapter was saved for another model or "
            f"another LoRA config (saved: target_modules={config.target_modules!r}, "
            f"modules_to_save={config.modules_to_save!r})"
        )
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}; the adapter was saved for a model of another size "
                f"or another rank (saved r={config.r})"
            )
    layers = [layer for _, layer in _lora_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    with torch.no_grad():
        for layer in merged:
            layer.unmerge()
        for name, tensor in saved.items():
            expected[name].copy_(tensor)  # state_dict tensors share storage with the parameters
        for layer in merged:
            layer.merge()
    return model
