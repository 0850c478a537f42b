"""Checkpoints in Hugging Face's layout: resolve a path, map parameter names, load and save.

A model directory holds `config.json`, `model.safetensors` (Hugging Face parameter names; or shards
listed in `model.safetensors.index.json`) and the tokenizer files. A model id ("gpt2", "org/name") is
found offline in the local Hugging Face cache; nothing here ever uses the network. Conversion between lmforge's module names and Hugging Face's is one declarative
key map per family, checked for count and shape in both directions.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lmforge.utils import atomic_write_bytes, atomic_write_text

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # Hugging Face's shard names, numbered from 1
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


@dataclass(frozen=True)
class KeyRule:
    """lmforge name <-> Hugging Face name; `{i}` stands for a layer number. `transpose`: GPT-2's
    Conv1D stores (in, out) where nn.Linear stores (out, in). `parts`: the values of `{part}` in the
    Hugging Face name; one lmforge tensor is those tensors concatenated along dim 0 (BERT's separate
    query, key and value are lmforge's fused `qkv`)."""

    ours: str
    theirs: str
    transpose: bool = False
    parts: tuple[str, ...] = ()

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

# GPT2ForSequenceClassification: the same trunk under "transformer.", and a bias-free linear "score" head.
GPT2_CLS_KEYS: list[KeyRule] = [r for r in GPT2_KEYS if r.ours.startswith("transformer.")] + [
    KeyRule("score.weight", "score.weight"),
]

# Non-parameter entries found in some Hugging Face GPT-2 files (old causal-mask buffers).
GPT2_IGNORED = re.compile(r".*\.attn\.(bias|masked_bias)$")


def bert_trunk_keys(prefix: str) -> list[KeyRule]:
    """BERT's trunk under `prefix` on both sides ("bert." in head models, "" in a bare BertModel)."""
    pairs = [  # (lmforge, Hugging Face) module names, each with .weight and .bias
        ("embeddings.ln", "embeddings.LayerNorm"),
        ("layers.{i}.attn.proj", "encoder.layer.{i}.attention.output.dense"),
        ("layers.{i}.ln_1", "encoder.layer.{i}.attention.output.LayerNorm"),
        ("layers.{i}.mlp.fc", "encoder.layer.{i}.intermediate.dense"),
        ("layers.{i}.mlp.proj", "encoder.layer.{i}.output.dense"),
        ("layers.{i}.ln_2", "encoder.layer.{i}.output.LayerNorm"),
        ("pooler", "pooler.dense"),
    ]
    embeddings = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    return ([KeyRule(f"{prefix}embeddings.{e}.weight", f"{prefix}embeddings.{e}.weight") for e in embeddings]
            + [KeyRule(f"{prefix}layers.{{i}}.attn.qkv.{p}", f"{prefix}encoder.layer.{{i}}.attention.self.{{part}}.{p}",
                       parts=("query", "key", "value")) for p in ("weight", "bias")]
            + [KeyRule(f"{prefix}{ours}.{p}", f"{prefix}{theirs}.{p}") for ours, theirs in pairs
               for p in ("weight", "bias")])


def _bert_head(ours: str, theirs: str) -> list[KeyRule]:
    return [KeyRule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


BERT_MLM_HEAD_KEYS: list[KeyRule] = [
    *_bert_head("lm_head.dense", "cls.predictions.transform.dense"),
    *_bert_head("lm_head.ln", "cls.predictions.transform.LayerNorm"),
    KeyRule("lm_head.decoder.weight", "cls.predictions.decoder.weight"),  # tied to the word embedding
    KeyRule("lm_head.decoder.bias", "cls.predictions.bias"),
]
BERT_HEADS = ("cls.", "classifier.", "qa_outputs.")  # Hugging Face name prefixes of BERT's task heads
# Buffers some Hugging Face BERT files hold (position ids; no parameters).
BERT_IGNORED = re.compile(r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$")
# Older names, renamed on load: TF-era LayerNorm gamma/beta; the decoder bias, a tie of cls.predictions.bias.
BERT_ALIASES = ((r"^(.*)LayerNorm\.gamma$", r"\1LayerNorm.weight"), (r"^(.*)LayerNorm\.beta$", r"\1LayerNorm.bias"),
                (r"^cls\.predictions\.decoder\.bias$", "cls.predictions.bias"))


@dataclass(frozen=True)
class Family:
    """How one model class maps to Hugging Face files. `task_head`: our names of a task head that a
    checkpoint may lack or have in another size (e.g. a causal-LM checkpoint loaded into a classifier):
    it is freshly initialised, with a warning. `other_heads`: Hugging Face names (or name prefixes) of
    other tasks' heads that are left out, with a warning (the trunk is what the two models share).
    `prefix`: the trunk's Hugging Face prefix; a base-model file without it is read as the trunk, and
    when `base` (the model is the bare trunk) a head model's file has it stripped. `tied`: our names
    of outputs that are the input embedding under `tie_word_embeddings` (not saved, not required).
    `aliases`: (regex, replacement) renames of older Hugging Face names, applied on load."""

    rules: list[KeyRule]
    ignored: re.Pattern[str]
    task_head: tuple[str, ...] = ()
    other_heads: tuple[str, ...] = ()
    prefix: str = "transformer."
    base: bool = False
    tied: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()


def _convert(state: dict[str, Tensor], rules: list[KeyRule], to_hf: bool) -> tuple[dict[str, Tensor], list[str]]:
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
                    out.update(zip(targets, (t.clone() for t in tensor.chunk(len(targets), dim=0))))
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
        if len(found) < len(rule.parts):
            absent = [p for k, p in enumerate(rule.parts) if k not in found]
            unmatched.extend(f"{n} (its {'/'.join(absent)} part(s) are absent)" for n in names)
            continue
        tensors = [found[k][1] for k in range(len(rule.parts))]
        if len({t.shape for t in tensors}) > 1:
            raise ValueError(f"{names} have shapes {[tuple(t.shape) for t in tensors]}; they must agree to form "
                             f"{target}. The checkpoint is damaged or not a BERT-style checkpoint")
        out[target] = torch.cat(tensors, dim=0)
    return out, unmatched


def _family(model: nn.Module) -> Family:
    from lmforge.models import bert
    from lmforge.models.gpt import GPTForCausalLM, GPTForSequenceClassification

    if isinstance(model, GPTForCausalLM):
        return Family(GPT2_KEYS, GPT2_IGNORED, other_heads=("score.weight",), tied=("lm_head.weight",))
    if isinstance(model, GPTForSequenceClassification):
        return Family(GPT2_CLS_KEYS, GPT2_IGNORED, task_head=("score.weight",), other_heads=("lm_head.weight",))
    if isinstance(model, bert.BertModel):
        return Family(bert_trunk_keys(""), BERT_IGNORED, task_head=("pooler.weight", "pooler.bias"),
                      other_heads=BERT_HEADS, prefix="bert.", base=True, aliases=BERT_ALIASES)
    pooler, classifier = ("bert.pooler.weight", "bert.pooler.bias"), ("classifier.weight", "classifier.bias")
    mlm = tuple(r.ours for r in BERT_MLM_HEAD_KEYS if r.ours != "lm_head.decoder.weight")
    heads = {  # class: (head rules, task_head (our names), other tasks' heads (Hugging Face prefixes))
        bert.BertForMaskedLM: (BERT_MLM_HEAD_KEYS, mlm, ("cls.seq_relationship.", "classifier.", "qa_outputs.")),
        bert.BertForPreTraining: (BERT_MLM_HEAD_KEYS + _bert_head("nsp", "cls.seq_relationship"),
                                  pooler + mlm + ("nsp.weight", "nsp.bias"), ("classifier.", "qa_outputs.")),
        bert.BertForSequenceClassification: (_bert_head("classifier", "classifier"), pooler + classifier,
                                             ("cls.", "qa_outputs.")),
        bert.BertForTokenClassification: (_bert_head("classifier", "classifier"), classifier,
                                          ("cls.", "qa_outputs.")),
        bert.BertForQuestionAnswering: (_bert_head("qa_outputs", "qa_outputs"),
                                        ("qa_outputs.weight", "qa_outputs.bias"),
                                        ("cls.", "classifier.")),
    }
    for cls, (head_rules, task_head, others) in heads.items():
        if isinstance(model, cls):
            rules = bert_trunk_keys("bert.")
            if model.bert.pooler is None:  # token-level heads have no pooler: a checkpoint's is left out
                rules = [r for r in rules if not r.ours.startswith("bert.pooler.")]
                others += ("bert.pooler.",)
            tied = ("lm_head.decoder.weight",) if isinstance(model, bert._MaskedLMMixin) else ()
            return Family(rules + head_rules, BERT_IGNORED, task_head=task_head, other_heads=others, prefix="bert.",
                          tied=tied, aliases=BERT_ALIASES)
    raise TypeError(f"no Hugging Face key map for {type(model).__name__}")


def _is_adapter_key(name: str) -> bool:
    """LoRA's low-rank matrices (lmforge.nn.lora): not part of the base model's checkpoint."""
    return name.endswith((".lora_A", ".lora_B"))


def to_hf_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's parameters (or `state`, e.g. gathered from shards) under Hugging Face names (tied
    output weights left out, as HF does)."""
    family = _family(model)
    state = dict(model.state_dict() if state is None else state)
    state = {k: v for k, v in state.items() if not _is_adapter_key(k)}  # LoRA adapters: saved on their own
    if getattr(model.config, "tie_word_embeddings", False):
        for name in family.tied:
            state.pop(name, None)
    converted, unmatched = _convert(state, family.rules, to_hf=True)
    if unmatched:
        raise RuntimeError(f"key map has no rule for {unmatched[:5]} (lmforge bug: add a KeyRule)")
    return converted


def _apply_aliases(hf_state: dict[str, Tensor], aliases: tuple[tuple[str, str], ...],
                   source: str) -> dict[str, Tensor]:
    """Rename older Hugging Face names; an alias of a tensor that is also present must equal it."""
    out: dict[str, Tensor] = {}
    renamed: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        new = name
        for pattern, replacement in aliases:
            new = re.sub(pattern, replacement, new)
        (renamed if new != name else out)[new] = tensor
    for name, tensor in renamed.items():
        if name in out and not torch.equal(out[name], tensor):
            raise ValueError(f"{source} holds {name} twice (under an older name too) with different values; "
                             "the checkpoint is inconsistent")
        out.setdefault(name, tensor)
    return out


def _normalise_prefix(hf_state: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """Base-model files have no trunk prefix; a bare trunk model reads a head model's trunk."""
    prefix = family.prefix
    if family.base:
        if any(k.startswith(prefix) for k in hf_state):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in hf_state.items()}
        return hf_state
    if hf_state and not any(k.startswith(prefix) for k in hf_state):
        return {(prefix + k): v for k, v in hf_state.items()}
    return hf_state


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-named tensors into `model`, checking names, count and shapes.

    The trunk must match exactly. A task head the checkpoint lacks or sizes differently is freshly
    initialised (weights normal with std initializer_range, biases zero) and another task's head is left
    out, each with a warning.
    """
    family = _family(model)
    hf_state = _apply_aliases(hf_state, family.aliases, source) if family.aliases else hf_state
    hf_state = {k: v for k, v in hf_state.items() if not family.ignored.match(k)}
    hf_state = _normalise_prefix(hf_state, family)
    left_out = [k for k in hf_state if any(k.startswith(h) for h in family.other_heads)]
    hf_state = {k: v for k, v in hf_state.items() if k not in left_out}
    ours, unexpected = _convert(hf_state, family.rules, to_hf=False)
    expected = {k: v for k, v in model.state_dict().items() if not _is_adapter_key(k)}  # adapters load separately
    tied = family.tied if getattr(model.config, "tie_word_embeddings", False) else ()
    for name in tied:
        ours.pop(name, None)  # the output layer is the embedding
    fresh = [k for k in family.task_head if k not in ours or ours[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in ours and k not in fresh and k not in tied]
    extra = [k for k in ours if k not in expected]
    if missing or unexpected or extra:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {(unexpected + extra)[:5]}. "
                         "Check that config.json belongs to these weights.")
    for name, tensor in ours.items():
        if name not in fresh and tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[name].shape)}; config.json and the weights disagree")
    model_name = type(model).__name__
    if left_out:
        warnings.warn(f"{source} holds {left_out[:6]}{' ...' if len(left_out) > 6 else ''}, the head of another "
                      f"task, which {model_name} does not use; only the shared trunk was loaded", stacklevel=3)
    std = model.config.initializer_range
    layer_norm = {h for h in fresh if isinstance(model.get_submodule(h.rsplit(".", 1)[0]), nn.LayerNorm)}
    for head in fresh:
        found = f"has {head} of shape {tuple(ours[head].shape)}" if head in ours else f"has no {head}"
        init = ("ones" if head in layer_norm and head.endswith(".weight")
                else "zeros" if head.endswith(".bias") else f"normal, std {std}")
        warnings.warn(f"{source} {found}: {model_name}'s head {head} of shape {tuple(expected[head].shape)} is "
                      f"freshly initialised ({init}); train it before use", stacklevel=3)
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


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file with an error that names the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({e}); re-save or re-copy the "
                         "checkpoint") from None


def _present(path: Path) -> bool:
    """Whether `path` is a readable file; a symlink into a missing Hugging Face cache blob is an error,
    not "absent", so that an incomplete download is reported as such instead of as some other file."""
    if path.is_file():
        return True
    if path.is_symlink():
        raise FileNotFoundError(f"{path} is a link to {os.readlink(path)}, which does not exist: the Hugging Face "
                                "cache is incomplete (interrupted download or a deleted blob); download the model "
                                "again, or copy a complete model folder and pass its path")
    return False


def _read_pickle(path: Path) -> dict[str, Tensor]:
    """A pytorch_model*.bin loaded with weights_only=True: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that would run code
        raise ValueError(f"refused to load {path}: it is not a plain tensor file ({type(e).__name__}). "
                         "Convert it to model.safetensors from a trusted environment.") from None


def read_sharded(index_path: Path, reader: Callable[[Path], dict[str, Tensor]]) -> dict[str, Tensor]:
    """All shards listed in a Hugging Face `*.index.json` ({"metadata": ..., "weight_map": {tensor: shard}})
    merged into one state dict, each shard read by `reader` (so a damaged shard is named)."""
    directory = index_path.parent
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ValueError(f"{index_path} has no usable weight_map (tensor name -> shard file name); it is not a "
                         "sharded-checkpoint index. Re-download or re-save the checkpoint")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts]
    if outside:
        raise ValueError(f"{index_path} names shard files outside its folder ({outside[:3]}); refusing to read "
                         "them. Shards must be file names next to the index")
    missing = [s for s in shards if not _present(directory / s)]
    if missing:
        raise FileNotFoundError(f"{index_path.name} lists shard(s) {missing} that are not in {directory}: the "
                                "checkpoint is incomplete. Download or copy the missing file(s) next to the index")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(reader(directory / shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise ValueError(f"{index_path} maps {absent[:5]} to shards that do not contain them; the index and the "
                         "shards come from different saves. Re-download or re-save the checkpoint")
    return state


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """The directory's weights as one state dict, and the file they came from (the index when sharded).

    Looked for in transformers' order: model.safetensors, model.safetensors.index.json (+ shards),
    pytorch_model.bin, pytorch_model.bin.index.json (+ shards); pickles load with weights_only=True
    (never executes code).
    """
    directory = Path(directory)
    st = directory / WEIGHTS_NAME
    if _present(st):
        return read_safetensors(st), st
    st_index = directory / WEIGHTS_INDEX_NAME
    if _present(st_index):
        return read_sharded(st_index, read_safetensors), st_index
    legacy = directory / LEGACY_WEIGHTS_NAME
    if _present(legacy):
        return _read_pickle(legacy), legacy
    legacy_index = directory / LEGACY_WEIGHTS_INDEX_NAME
    if _present(legacy_index):
        return read_sharded(legacy_index, _read_pickle), legacy_index
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}, nor a sharded "
                            f"{WEIGHTS_INDEX_NAME} / {LEGACY_WEIGHTS_INDEX_NAME}; a model directory is written "
                            "by save_pretrained / `lmforge pretrain`")


# ---------------------------------------------------------------------------------- the Hugging Face cache
def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by its own rules: $HF_HUB_CACHE (or the older
    $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


_ID_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")


def is_repo_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub model id ("gpt2", "org/name"), by the Hub's own rules."""
    parts = name.split("/")
    return (len(parts) in (1, 2) and all(_ID_PART.fullmatch(p) for p in parts)
            and "--" not in name and ".." not in name)


def _snapshot_names(snapshots: Path) -> list[str]:
    return sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []


def cached_snapshot(repo_id: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """The snapshot folder of a model in the local Hugging Face cache; never touches the network.

    `revision`: a branch or tag recorded under `refs/` (default "main") or a commit hash. With no
    revision and no `refs/main`, the only snapshot is used; several are ambiguous and an error.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    get = (f"download them where a network exists with `huggingface-cli download {repo_id}` (or "
           f"huggingface_hub.snapshot_download({repo_id!r})) into this cache, or copy the model folder "
           "here and pass its path")
    if not repo.is_dir():
        raise FileNotFoundError(f"{repo_id!r} is not a local directory and is not in the Hugging Face cache "
                                f"(looked in {repo}; the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else "
                                f"~/.cache/huggingface/hub). lmforge never downloads: {get}")
    snapshots = repo / "snapshots"
    names = _snapshot_names(snapshots)
    if not names:
        raise FileNotFoundError(f"{repo} is in the Hugging Face cache but holds no snapshot (nothing in "
                                f"{snapshots}): the download was interrupted or cleaned up. To get the files, {get}")
    if revision is not None and (not revision or Path(revision).is_absolute() or ".." in Path(revision).parts):
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit name")
    wanted = revision or "main"
    ref = repo / "refs" / wanted
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise FileNotFoundError(f"{ref} points at commit {commit!r}, but {snapshots / commit} does not exist "
                                f"(snapshots there: {names}): the cache is incomplete. To get the files, {get}")
    if (snapshots / wanted).is_dir():
        return snapshots / wanted
    if revision is None:
        if len(names) == 1:
            return snapshots / names[0]
        raise FileNotFoundError(f"{repo} has several snapshots {names} and no refs/main to choose between them; "
                                "pass revision=<one of them> (or a branch name recorded under refs/)")
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
        if (repo / "refs").is_dir() else []
    raise FileNotFoundError(f"revision {revision!r} of {repo_id!r} is not in the Hugging Face cache at {repo} "
                            f"(branches/tags under refs/: {refs}; snapshots: {names}). Pass one of those, or "
                            f"download it where a network exists with `huggingface-cli download {repo_id} "
                            f"--revision {revision}`")


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding config.json for a local directory or, offline, a model id ("gpt2",
    "org/name") in the local Hugging Face cache. A local path that exists always wins."""
    directory = Path(name_or_path).expanduser()
    if directory.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face cache ids, but {directory} is a local "
                             "path; drop revision= or pass the model id")
    elif is_repo_id(str(name_or_path)):
        directory = cached_snapshot(str(name_or_path), revision, cache_dir)
    else:
        raise FileNotFoundError(f"model directory {directory} does not exist; pass the folder written by "
                                "save_pretrained or `lmforge pretrain --out`, or a Hugging Face model id "
                                "(\"gpt2\", \"org/name\") that is in the local cache")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is a file, not a model directory; pass the folder that holds "
                                "config.json and the weights")
    if not _present(directory / "config.json"):
        raise FileNotFoundError(f"{directory} has no config.json; it is not a model directory "
                                "(expected config.json + model.safetensors)")
    return directory


def load_pretrained(cls: type, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, **config_overrides: Any) -> Any:
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
    if config.tie_word_embeddings and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    if dtype is None or dtype == "auto":  # the dtype the checkpoint was saved in, as transformers 5 does
        dtype = _saved_dtype(config)
    elif isinstance(dtype, str):
        dtype = _torch_dtype(dtype, "dtype argument")
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def _torch_dtype(name: str, where: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{where}: {name!r} is not a floating-point torch dtype (e.g. float32, bfloat16)")
    return value


def _saved_dtype(config: Any) -> torch.dtype | None:
    """`torch_dtype` / `dtype` recorded in config.json (None when absent: float32)."""
    extra = getattr(config, "extra", {})
    name = extra.get("dtype") or extra.get("torch_dtype")
    return _torch_dtype(name, "config.json dtype") if isinstance(name, str) else None


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
            scale = (2 ** 10 if binary else 10 ** 3) ** ("KMG".index(prefix.upper()) + 1)
            value = int(digits) * scale
            if value > 0:
                return value // 8 if unit == "b" and not binary else value
    raise ValueError(f"max_shard_size={size!r} is not a size; give bytes as a positive int or a string such as "
                     "'500MB', '2GB' or '1GiB'")


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


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
                    max_shard_size: int | str | None = None, state_dict: dict[str, Tensor] | None = None) -> Path:
    """config.json + model.safetensors (+ tokenizer files), each file written atomically.

    With `max_shard_size` (bytes, or "500MB" / "1GiB") weights larger than that are split into
    Hugging Face's model-00001-of-0000N.safetensors + model.safetensors.index.json. Weight files of an
    earlier save into the same folder that this save does not use are removed afterwards, so that no
    loader picks up stale weights (a single model.safetensors would win over a new index).
    `state_dict` replaces the model's own tensors (e.g. a sharded model's gathered weights).
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.extra.update(dtype=dtype, torch_dtype=dtype)  # loaders restore it (transformers 5: "dtype")
    cls = type(model)  # config.json's "architectures" names the class that was saved
    model.config.save(directory, architecture=(getattr(cls, "hf_architecture", cls.__name__), cls.__name__))
    state = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model, state_dict).items()}
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
        index = {"metadata": {"total_parameters": sum(t.numel() for t in state.values()),
                              "total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(directory / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written = {WEIGHTS_INDEX_NAME, *weight_map.values()}
    # the index before its shards: at every moment the files a loader would pick are consistent
    old_shards = sorted(p.name for p in directory.iterdir() if _SHARD_RE.match(p.name))
    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *old_shards):
        if name not in written:
            (directory / name).unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
