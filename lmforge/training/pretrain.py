"""Pretraining from a recipe: tokenizer -> data -> model -> Trainer -> metrics and a sample.

A recipe is a dict (YAML in `lmforge/configs/`) with sections `data`, `out`, `tokenizer`, `model`
(`type: gpt | bert` and GPTConfig / BertConfig fields), `mlm` (BERT: probability, whole_word, nsp,
max_length), `training` (TrainingArguments fields) and `sample` (GPT: generation options and a
prompt; BERT: `text` with a [MASK] to fill).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmforge.config import BertConfig, GPTConfig
from lmforge.constants import IGNORE_INDEX
from lmforge.data import (
    MLMCollator,
    RandomBlockDataset,
    SequentialBlockDataset,
    iter_documents,
    nsp_pairs,
    prepare_corpus,
    resolve_sources,
)
from lmforge.data.mlm import split_segments
from lmforge.files import atomic_write_text
from lmforge.generation import stream
from lmforge.models.bert import BertForMaskedLM, BertForPreTraining
from lmforge.models.gpt import GPTForCausalLM
from lmforge.nn.losses import masked_lm_items, token_loss_sum
from lmforge.tokenizer import Tokenizer
from lmforge.training import seq2seq_recipe
from lmforge.training.args import TrainingArguments
from lmforge.training.checkpoint import list_checkpoints
from lmforge.training.trainer import Trainer
from lmforge.utils import set_seed

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_FILE = "recipe.json"  # the effective recipe, saved in the run's folder so --resume can reuse it
SECTIONS = {
    "description", "data", "out", "val_fraction", "tokenizer", "model", "mlm", "training", "sample",
    "task", "lengths", "evaluate",  # seq2seq recipes (training/seq2seq_recipe.py)
}  # fmt: skip


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, but `1e-3` is a float (YAML 1.1 wants `1.0e-3`; nobody writes that)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.[\d_]*|\.[\d_]+)$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


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
        raise FileNotFoundError(
            f"no recipe {name_or_path!r}: not a file, and not one of the bundled recipes {available_recipes()}"
        )
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
                raise ValueError(f"override {item!r}: {'.'.join(parents[: i + 1])} is {node!r}, not a section of keys")
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
    """Run a pretraining recipe end to end; returns the final metrics and the output directory.

    `model.type` picks the family: "gpt" (default; causal LM on random blocks of the token stream),
    "bert" (masked LM + next-sentence prediction on sentence pairs from the documents) or "seq2seq" (the
    encoder-decoder on source/target pairs, scored by generation: `training/seq2seq_recipe.py`)."""
    model_opts = dict(recipe.get("model") or {})
    family = model_opts.pop("type", "gpt")
    if family not in ("gpt", "bert", "seq2seq"):
        raise ValueError(f"model.type must be 'gpt', 'bert' or 'seq2seq', got {family!r}")
    sources = recipe.get("data") or ["shakespeare"]
    sources = [sources] if isinstance(sources, str) else list(sources)
    if family != "seq2seq":
        resolve_sources(sources)  # a missing file fails here, before any work
    out = Path(recipe.get("out") or "runs/lmforge")
    training = dict(recipe.get("training") or {})
    training["output_dir"] = str(out)
    if device:
        training["device"] = device
    args = TrainingArguments.from_dict(training)
    if args.max_steps <= 0:
        raise ValueError("a pretraining recipe needs training.max_steps (the number of optimizer steps)")
    existing = list_checkpoints(out)
    if not resume and existing:
        raise ValueError(
            f"{out} already holds a training run ({existing[-1].name}); "
            "pass --resume to continue it, or --out NEW_DIR for a new run"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECIPE_FILE, json.dumps(recipe, indent=2, ensure_ascii=False) + "\n")
    set_seed(args.seed)

    if family == "seq2seq":
        run = seq2seq_recipe.setup(recipe, model_opts, out, args, resume)
        tokenizer = run["tokenizer"]
    else:
        tokenizer = _tokenizer(recipe, out, sources, family)
        setup = _bert_setup if family == "bert" else _gpt_setup
        run = setup(recipe, model_opts, tokenizer, sources, out, args)
    tokenizer.save_pretrained(out)
    print(f"lmforge: {run['model'].num_parameters() / 1e6:.2f}M parameters; {run['about']} -> {out}")
    trainer = Trainer(
        run["model"],
        args,
        train_dataset=run["train"],
        eval_dataset=run["eval"],
        tokenizer=tokenizer,
        data_collator=run.get("collator"),
        compute_metrics=run.get("compute_metrics"),
        preprocess_logits_for_metrics=run.get("preprocess"),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {**result.metrics, "step": result.global_step, "output_dir": str(out)}
    metrics.update(run["report"](metrics, trainer))
    sample = recipe.get("sample")
    if sample:
        run["model"].eval()
        run["sample"](dict(sample))
    return {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}


def _tokenizer(recipe: dict[str, Any], out: Path, sources: list[str], family: str) -> Any:
    """The run's own tokenizer (resume), a given one (tokenizer.path), or one trained on the data:
    byte-level BPE for GPT, WordPiece for BERT."""
    opts = dict(recipe.get("tokenizer") or {})
    if (out / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(out)
    if opts.get("path"):
        return Tokenizer.from_pretrained(opts["path"])
    vocab = int(opts.get("vocab_size", 8192))
    kind = "WordPiece" if family == "bert" else "byte-level BPE"
    print(f"lmforge: training a {kind} tokenizer (vocab {vocab}) on {', '.join(map(str, sources))}")
    if family == "bert":
        return Tokenizer.train_wordpiece(
            iterator=iter_documents(sources),
            vocab_size=vocab,
            min_frequency=int(opts.get("min_frequency", 2)),
            lowercase=bool(opts.get("lowercase", True)),
        )
    return Tokenizer.train_bpe(
        iterator=iter_documents(sources), vocab_size=vocab, min_frequency=int(opts.get("min_frequency", 2))
    )


def _gpt_setup(
    recipe: dict[str, Any], model_opts: dict[str, Any], tokenizer: Any, sources: list[str], out: Path, args: Any
) -> dict[str, Any]:
    """GPT: the corpus as one token stream; training items are random blocks of context + 1 tokens."""
    config = GPTConfig(
        **{
            **model_opts,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    tokenizer.model_max_length = config.n_positions  # so truncation=True fits the model's context
    meta = prepare_corpus(
        sources, tokenizer, out / "data", val_fraction=float(recipe.get("val_fraction", 0.05)), seed=args.seed
    )
    model = GPTForCausalLM(config)
    block = config.n_positions
    n_samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps

    def report(metrics: dict[str, Any], trainer: Any) -> dict[str, Any]:
        baseline = unigram_loss(meta.train_path, meta.val_path, meta.dtype, len(tokenizer))
        if "eval_loss" in metrics:
            print(
                f"lmforge: validation loss {metrics['eval_loss']:.3f} (perplexity "
                f"{math.exp(metrics['eval_loss']):.1f}); unigram baseline {baseline:.3f} "
                f"(perplexity {math.exp(baseline):.1f})"
            )
        trainer.log({"unigram_baseline_loss": baseline})
        return {"unigram_baseline_loss": baseline}

    def sample(opts: dict[str, Any]) -> None:
        prompt = opts.pop("prompt", "\n")
        print(f"lmforge: sample from {out}:\n{prompt}", end="", flush=True)
        for piece in stream(model, tokenizer, prompt, **opts):
            print(piece, end="", flush=True)
        print()

    return {
        "model": model,
        "train": RandomBlockDataset(meta.train_path, block_size=block, num_samples=n_samples, seed=args.seed),
        "eval": SequentialBlockDataset(meta.val_path, block_size=block),
        "report": report,
        "sample": sample,
        "about": f"context {block}, {meta.train_tokens:,} training / {meta.val_tokens:,} validation tokens",
    }


_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s*")


def split_sentences(block: str) -> list[str]:
    """Lines, cut after sentence-final punctuation (English and Chinese)."""
    return [s.strip() for line in block.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def bert_documents(sources: list[str], tokenizer: Any, min_tokens: int = 512) -> list[list[list[int]]]:
    """Documents -> sentences -> token ids, for next-sentence pairs. A document is a blank-line
    separated block; consecutive short blocks (a play's speeches) are joined until a document holds
    `min_tokens`, so that it yields several segments, and so pairs."""
    blocks = [b for doc in iter_documents(sources) for b in re.split(r"\n\s*\n", doc) if b.strip()]
    sentences = [split_sentences(b) for b in blocks]
    flat = tokenizer.encode_batch_fast([s for doc in sentences for s in doc])
    documents: list[list[list[int]]] = []
    current: list[list[int]] = []
    size, i = 0, 0
    for doc in sentences:
        current += [ids for ids in flat[i : i + len(doc)] if ids]
        size += sum(len(ids) for ids in flat[i : i + len(doc)])
        i += len(doc)
        if size >= min_tokens:
            documents.append(current)
            current, size = [], 0
    if current:
        documents.append(current)
    return documents


def _bert_setup(
    recipe: dict[str, Any], model_opts: dict[str, Any], tokenizer: Any, sources: list[str], out: Path, args: Any
) -> dict[str, Any]:
    """BERT: documents -> [CLS] A [SEP] B [SEP] pairs (NSP) or packed segments (MLM only), masked by
    MLMCollator; the evaluation pairs are masked once (seeded), so every evaluation scores the same
    positions. Metrics: masked-token perplexity and next-sentence accuracy."""
    mlm = dict(recipe.get("mlm") or {})
    nsp = bool(mlm.get("nsp", True))
    max_length = int(mlm.get("max_length", 128))
    config = BertConfig(
        **{
            "max_position_embeddings": max_length,
            **model_opts,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    tokenizer.model_max_length = max_length
    documents = bert_documents(sources, tokenizer, min_tokens=4 * max_length)
    order = list(range(len(documents)))
    random.Random(args.seed).shuffle(order)
    n_eval = max(2, round(float(recipe.get("val_fraction", 0.05)) * len(documents)))
    if len(documents) - n_eval < 2:
        raise ValueError(
            f"the corpus has {len(documents)} documents (blank-line separated blocks); BERT "
            "pretraining needs a few more to hold some out for evaluation"
        )
    train_docs = [documents[i] for i in order[n_eval:]]
    eval_docs = [documents[i] for i in order[:n_eval]]

    def examples(docs: list[list[list[int]]], seed: int) -> list[dict[str, Any]]:
        if nsp:
            return nsp_pairs(docs, max_length, seed, tokenizer)
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id  # MLM only: sentences packed to the length
        segments = [seg for doc in docs for seg in split_segments(doc, max_length - 2)]
        return [{"input_ids": [cls, *seg[: max_length - 2], sep]} for seg in segments]

    collator = MLMCollator(
        tokenizer,
        mlm_probability=float(mlm.get("probability", 0.15)),
        whole_word=bool(mlm.get("whole_word", False)),
        seed=args.seed,
    )
    fixed = MLMCollator(
        tokenizer, mlm_probability=collator.mlm_probability, whole_word=collator.whole_word, seed=args.seed + 1
    )
    eval_set = [
        {k: v[0].tolist() if v.dim() == 2 else int(v[0]) for k, v in fixed([ex]).items()}
        for ex in examples(eval_docs, args.seed + 1)
    ]
    train_set = examples(train_docs, args.seed)
    model = (BertForPreTraining if nsp else BertForMaskedLM)(config)

    def preprocess(logits: Any, labels: Any) -> torch.Tensor:
        """Per batch: [masked-LM loss sum, masked tokens, NSP correct, NSP pairs] (not the (B, T, V) logits)."""
        mlm_logits, nsp_logits = logits if isinstance(logits, tuple) else (logits, None)
        mlm_labels, nsp_labels = labels if isinstance(labels, tuple) else (labels, None)
        loss = token_loss_sum(mlm_logits, mlm_labels)
        n = masked_lm_items(mlm_labels)
        correct = (nsp_logits.argmax(-1) == nsp_labels).sum() if nsp_logits is not None else torch.tensor(0)
        pairs = len(nsp_labels) if nsp_labels is not None else 0
        return torch.tensor([[float(loss), float(n), float(correct), float(pairs)]])

    def compute_metrics(pred: Any) -> dict[str, float]:
        loss, n, correct, pairs = pred.predictions.sum(axis=0)
        metrics = {"masked_lm_loss": loss / max(n, 1), "masked_lm_perplexity": math.exp(min(loss / max(n, 1), 50))}
        if pairs:
            metrics["nsp_accuracy"] = correct / pairs
        return metrics

    def report(metrics: dict[str, Any], trainer: Any) -> dict[str, Any]:
        baseline = masked_unigram_loss(train_set, eval_set, len(tokenizer))
        if "eval_masked_lm_loss" in metrics:
            nsp_part = (
                f", next-sentence accuracy {metrics['eval_nsp_accuracy']:.1%} (chance 50%)"
                if "eval_nsp_accuracy" in metrics
                else ""
            )
            print(
                f"lmforge: masked-token loss {metrics['eval_masked_lm_loss']:.3f} (perplexity "
                f"{metrics['eval_masked_lm_perplexity']:.1f}); unigram baseline {baseline:.3f} (perplexity "
                f"{math.exp(baseline):.1f}){nsp_part}"
            )
        trainer.log({"unigram_baseline_masked_loss": baseline})
        return {"unigram_baseline_masked_loss": baseline}

    def sample(opts: dict[str, Any]) -> None:
        for text in [opts["text"]] if isinstance(opts.get("text"), str) else opts.get("text", []):
            print(f"lmforge: fill-mask: {text}")
            for token, score in fill_mask(model, tokenizer, text, top_k=int(opts.get("top_k", 5))):
                print(f"    {token!r:>16}  {score:.3f}")

    about = (
        f"{'masked LM + next sentence' if nsp else 'masked LM'}, length {max_length}, {len(train_set):,} "
        f"training / {len(eval_set):,} evaluation {'pairs' if nsp else 'segments'} from {len(documents):,} "
        "documents"
    )
    return {
        "model": model,
        "train": train_set,
        "eval": eval_set,
        "collator": collator,
        "report": report,
        "sample": sample,
        "compute_metrics": compute_metrics,
        "preprocess": preprocess,
        "about": about,
    }


def masked_unigram_loss(train: list[dict[str, Any]], evaluation: list[dict[str, Any]], vocab_size: int) -> float:
    """Cross-entropy (nats) of the evaluation set's masked tokens under the training tokens' frequencies
    (add-one smoothed): what a model that ignores the context scores, the baseline MLM must beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for example in train:
        np.add.at(counts, np.asarray(example["input_ids"], dtype=np.int64), 1.0)
    logp = np.log(counts / counts.sum())
    labels = np.concatenate([np.asarray(ex["labels"], dtype=np.int64) for ex in evaluation])
    labels = labels[labels != IGNORE_INDEX]
    return float(-logp[labels].mean()) if len(labels) else float("nan")


def fill_mask(model: Any, tokenizer: Any, text: str, top_k: int = 5) -> list[tuple[str, float]]:
    """The `top_k` tokens (and probabilities) for the first [MASK] in `text`."""
    enc = tokenizer(text, return_tensors="pt")
    where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()
    if not len(where):
        raise ValueError(f"no {tokenizer.mask_token} in {text!r}; put one where a word should be predicted")
    with torch.inference_mode():
        out = model(**{k: v.to(model.device) for k, v in enc.items()})
    logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
    probs = logits[0, int(where[0])].float().softmax(-1)
    top = probs.topk(top_k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
