"""Declarative maps between lmforge's parameter names and Hugging Face's.

A family writes its map once, in its own file (`hf_key_map` on the model class), out of `KeyRule`s:
a rename per tensor, with `{i}` for a layer number, an optional transpose and optional fused parts.
`KeyMap` adds what a checkpoint may hold besides the trunk (ignored buffers, task heads, older names,
tied copies, a trunk prefix) and converts whole state dicts in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KeyRule:
    """lmforge name <-> Hugging Face name; `{i}` stands for a layer number. `transpose`: GPT-2's
    Conv1D stores (in, out) where nn.Linear stores (out, in). `parts`: the values of `{part}` in the
    Hugging Face name; one lmforge tensor is those tensors concatenated along dim 0 (BERT's separate
    query, key and value are lmforge's fused `qkv`). `absent`: parts that Hugging Face files do not hold because
    they are zero by construction (Whisper has no key bias: a bias on the keys adds the same amount to every score of
    a query, which softmax ignores); they are left out on save and read as zeros on load."""

    ours: str
    theirs: str
    transpose: bool = False
    parts: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()

    def _regex(self, pattern: str) -> re.Pattern[str]:
        regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
        regex = regex.replace(r"\{part\}", "(?P<part>" + "|".join(map(re.escape, self.parts)) + ")")
        return re.compile("^" + regex + "$")

    def to_hf(self, name: str) -> list[str] | None:
        """The Hugging Face name(s) of lmforge tensor `name` (one per part), or None if not covered."""
        m = self._regex(self.ours).match(name)
        if m is None:
            return None
        target = self.theirs.replace("{i}", m.group("i")) if "i" in m.groupdict() else self.theirs
        return [target.replace("{part}", part) for part in self.parts] if self.parts else [target]

    def match(self, name: str, ours: bool) -> str | None:
        """The name on the other side, or None if `name` is not covered by this rule (a fused
        tensor's Hugging Face names are joined with " + ")."""
        if ours:
            names = self.to_hf(name)
            return None if names is None else " + ".join(names)
        hit = self.from_hf(name)
        return None if hit is None else hit[0]

    def from_hf(self, name: str) -> tuple[str, int] | None:
        """(lmforge name, index of the part) for Hugging Face tensor `name`, or None if not covered."""
        m = self._regex(self.theirs).match(name)
        if m is None:
            return None
        groups = m.groupdict()
        target = self.ours.replace("{i}", groups["i"]) if "i" in groups else self.ours
        return target, self.parts.index(groups["part"]) if self.parts else 0


def convert(state: dict[str, Tensor], rules: list[KeyRule], to_hf: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Rename (transpose; split or concatenate fused parts) every tensor; returns (converted, names no
    rule covers, and the parts of fused tensors whose other parts are absent)."""
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    fused: dict[str, tuple[KeyRule, dict[int, tuple[str, Tensor]]]] = {}  # our name -> parts found
    for name, tensor in state.items():
        for rule in rules:
            if to_hf:
                targets = rule.to_hf(name)
                if targets is None:
                    continue
                tensor = tensor.t().contiguous() if rule.transpose else tensor
                if len(targets) == 1:
                    out[targets[0]] = tensor
                else:  # separate tensors that do not share storage (safetensors refuses shared ones)
                    pieces = zip(rule.parts, targets, tensor.chunk(len(targets), dim=0))
                    out.update((target, t.clone()) for part, target, t in pieces if part not in rule.absent)
                break
            hit = rule.from_hf(name)
            if hit is None:
                continue
            target, part = hit
            tensor = tensor.t().contiguous() if rule.transpose else tensor
            if rule.parts:
                fused.setdefault(target, (rule, {}))[1][part] = (name, tensor)
            else:
                out[target] = tensor
            break
        else:
            unmatched.append(name)
    for target, (rule, found) in fused.items():
        names = [found[k][0] for k in sorted(found)]
        for k, part in enumerate(rule.parts):  # zero by construction, not stored
            if part in rule.absent and k not in found and found:
                found[k] = (f"{part} (absent: zeros)", torch.zeros_like(next(iter(found.values()))[1]))
        if len(found) < len(rule.parts):
            absent = [p for k, p in enumerate(rule.parts) if k not in found]
            unmatched.extend(f"{n} (its {'/'.join(absent)} part(s) are absent)" for n in names)
            continue
        tensors = [found[k][1] for k in range(len(rule.parts))]
        if len({t.shape for t in tensors}) > 1:
            raise ValueError(
                f"{names} have shapes {[tuple(t.shape) for t in tensors]}; they must agree to form "
                f"{target}. The checkpoint is damaged or not a BERT-style checkpoint"
            )
        out[target] = torch.cat(tensors, dim=0)
    return out, unmatched


@dataclass(frozen=True)
class KeyMap:
    """How one model class maps to Hugging Face files (a family declares it as `hf_key_map` on the class).

    `rules`: the tensors of this model. `ignored`: Hugging Face names that are not parameters (old
    buffers), dropped on load. `task_head`: our names of a task head that a checkpoint may lack or have in
    another size (e.g. a causal-LM checkpoint loaded into a classifier): it is freshly initialised, with a
    warning. `other_heads`: Hugging Face names (or name prefixes) of other tasks' heads that are left out,
    with a warning (the trunk is what the two models share). `prefix`: the trunk's Hugging Face prefix; a
    base-model file without it is read as the trunk, and when `base` (the model is the bare trunk) a head
    model's file has it stripped. `tied`: our names of outputs that are the input embedding under
    `tie_word_embeddings` (not saved, not required). `aliases`: (regex, replacement) renames of older
    Hugging Face names, applied on load."""

    rules: list[KeyRule]
    ignored: re.Pattern[str]
    task_head: tuple[str, ...] = ()
    other_heads: tuple[str, ...] = ()
    prefix: str = "transformer."
    base: bool = False
    tied: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()

    def to_hf(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` (lmforge names) under Hugging Face names; a tensor no rule covers is an lmforge bug."""
        converted, unmatched = convert(state, self.rules, to_hf=True)
        if unmatched:
            raise RuntimeError(f"key map has no rule for {unmatched[:5]} (lmforge bug: add a KeyRule)")
        return converted

    def from_hf(self, hf_state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
        """(tensors under lmforge names, Hugging Face names of other tasks' heads that were left out, names
        no rule covers) for a Hugging Face state dict read from `source`."""
        hf_state = self._apply_aliases(hf_state, source) if self.aliases else hf_state
        hf_state = self._normalise_prefix({k: v for k, v in hf_state.items() if not self.ignored.match(k)})
        left_out = [k for k in hf_state if any(k.startswith(h) for h in self.other_heads)]
        hf_state = {k: v for k, v in hf_state.items() if k not in left_out}
        ours, unexpected = convert(hf_state, self.rules, to_hf=False)
        return ours, left_out, unexpected

    def _apply_aliases(self, hf_state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
        """Rename older Hugging Face names; an alias of a tensor that is also present must equal it."""
        out: dict[str, Tensor] = {}
        renamed: dict[str, Tensor] = {}
        for name, tensor in hf_state.items():
            new = name
            for pattern, replacement in self.aliases:
                new = re.sub(pattern, replacement, new)
            (renamed if new != name else out)[new] = tensor
        for name, tensor in renamed.items():
            if name in out and not torch.equal(out[name], tensor):
                raise ValueError(
                    f"{source} holds {name} twice (under an older name too) with different values; "
                    "the checkpoint is inconsistent"
                )
            out.setdefault(name, tensor)
        return out

    def _normalise_prefix(self, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Base-model files have no trunk prefix; a bare trunk model reads a head model's trunk."""
        prefix = self.prefix
        if self.base:
            if any(k.startswith(prefix) for k in hf_state):
                return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in hf_state.items()}
            return hf_state
        if hf_state and not any(k.startswith(prefix) for k in hf_state):
            return {(prefix + k): v for k, v in hf_state.items()}
        return hf_state
