"""Pretraining a GPT from a recipe: tokenizer -> token files -> model -> Trainer -> a sample.

A recipe is a dict (YAML in `lmforge/configs/`) with sections `data`, `out`, `tokenizer`, `model`
(GPTConfig fields), `training` (TrainingArguments fields) and `sample` (generation options).
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmforge.utils import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_FILE = "recipe.json"  # the effective recipe, saved in the run's folder so --resume can reuse it
SECTIONS = {"description", "data", "out", "val_fraction", "tokenizer", "model", "training", "sample"}


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, but `1e-3` is a float (YAML 1.1 wants `1.0e-3`; nobody writes that)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.[\d_]*|\.[\d_]+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def saved_recipe(out: str | Path) -> dict[str, Any] | None:
    """The recipe a run in `out` was started with (written there as recipe.json), or None."""
    path = Path(out) / RECIPE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A bundled recipe by name (e.g. 'shakespeare') or a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file, and not one of the bundled recipes "
                                f"{available_recipes()}")
    recipe = _yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of sections {sorted(SECTIONS)}")
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"recipe {path}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}")
    return recipe


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings (value parsed as YAML) applied to a copy of the recipe."""
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. training.learning_rate=1e-3")
        node = recipe
        *parents, leaf = key.split(".")
        if parents and parents[0] not in SECTIONS or not parents and leaf not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section; known: {sorted(SECTIONS)}")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])} is {node!r}, not a section of keys")
        node[leaf] = _yaml(raw)
    return recipe


def unigram_loss(train_path: Path, val_path: Path, dtype: str, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation split under the train split's token frequencies
    (add-one smoothed): the baseline a language model must beat."""
    train = np.memmap(train_path, dtype=dtype, mode="r")
    val = np.memmap(val_path, dtype=dtype, mode="r")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val)].mean())


def pretrain(recipe: dict[str, Any], resume: bool = False, device: str | None = None) -> dict[str, Any]:
    """Run a pretraining recipe end to end; returns the final metrics and the output directory."""
    from lmforge.config import GPTConfig
    from lmforge.data import (RandomBlockDataset, SequentialBlockDataset, iter_documents, prepare_corpus,
                              resolve_sources)
    from lmforge.models.gpt import GPTForCausalLM
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.args import TrainingArguments
    from lmforge.training.trainer import Trainer
    from lmforge.utils import set_seed

    sources = recipe.get("data") or ["shakespeare"]
    sources = [sources] if isinstance(sources, str) else list(sources)
    resolve_sources(sources)  # a missing file fails here, before any work
    out = Path(recipe.get("out") or "runs/lmforge")
    training = dict(recipe.get("training") or {})
    training["output_dir"] = str(out)
    if device:
        training["device"] = device
    args = TrainingArguments.from_dict(training)
    if args.max_steps <= 0:
        raise ValueError("a pretraining recipe needs training.max_steps (the number of optimizer steps; its "
                         "training blocks are drawn at random, so there are no epochs)")
    trainer_probe = Trainer.__new__(Trainer)
    trainer_probe.output_dir = out
    if not resume and Trainer.checkpoints(trainer_probe):
        raise ValueError(f"{out} already holds a training run ({Trainer.checkpoints(trainer_probe)[-1].name}); "
                         "pass --resume to continue it, or --out NEW_DIR for a new run")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECIPE_FILE, json.dumps(recipe, indent=2, ensure_ascii=False) + "\n")
    set_seed(args.seed)

    tok_opts = dict(recipe.get("tokenizer") or {})
    if (out / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(out)  # the run's own tokenizer (resume, or a re-run)
    elif tok_opts.get("path"):
        tokenizer = Tokenizer.from_pretrained(tok_opts["path"])
    else:
        vocab = int(tok_opts.get("vocab_size", 8192))
        print(f"lmforge: training a byte-level BPE tokenizer (vocab {vocab}) on {', '.join(map(str, sources))}")
        tokenizer = Tokenizer.train_bpe(iterator=iter_documents(sources), vocab_size=vocab,
                                        min_frequency=int(tok_opts.get("min_frequency", 2)))
    model_opts = dict(recipe.get("model") or {})
    config = GPTConfig(**{**model_opts, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                          "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id})
    tokenizer.model_max_length = config.n_positions  # so truncation=True fits the model's context
    tokenizer.save_pretrained(out)

    meta = prepare_corpus(sources, tokenizer, out / "data", val_fraction=float(recipe.get("val_fraction", 0.05)),
                          seed=args.seed)
    model = GPTForCausalLM(config)
    block = config.n_positions
    n_samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    train_ds = RandomBlockDataset(meta.train_path, block_size=block, num_samples=n_samples, seed=args.seed)
    eval_ds = SequentialBlockDataset(meta.val_path, block_size=block)
    print(f"lmforge: {model.num_parameters() / 1e6:.2f}M parameters, context {block}, "
          f"{meta.train_tokens:,} training / {meta.val_tokens:,} validation tokens -> {out}")
    trainer = Trainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds, tokenizer=tokenizer)
    result = trainer.train(resume_from_checkpoint=resume)
    baseline = unigram_loss(meta.train_path, meta.val_path, meta.dtype, len(tokenizer))
    metrics = {**result.metrics, "unigram_baseline_loss": baseline, "step": result.global_step,
               "output_dir": str(out)}
    if "eval_loss" in metrics:
        print(f"lmforge: validation loss {metrics['eval_loss']:.3f} (perplexity {math.exp(metrics['eval_loss']):.1f}); "
              f"unigram baseline {baseline:.3f} (perplexity {math.exp(baseline):.1f})")
    trainer.log({"unigram_baseline_loss": baseline})

    sample = recipe.get("sample")
    if sample:
        from lmforge.generation import stream

        opts = dict(sample)
        prompt = opts.pop("prompt", "\n")
        model.eval()
        print(f"lmforge: sample from {out}:\n{prompt}", end="", flush=True)
        for piece in stream(model, tokenizer, prompt, **opts):
            print(piece, end="", flush=True)
        print()
    return metrics
