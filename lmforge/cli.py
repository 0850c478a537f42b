"""The `lmforge` command: thin subcommands over the Python API.

    lmforge pretrain [RECIPE] [--data PATH ...] [--out DIR] [--max-steps N] [--seed S] [--resume] [--set k=v ...]
    lmforge generate MODEL_DIR PROMPT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] ...
    lmforge tokenizer train SOURCE ... --vocab-size N --out DIR
    lmforge convert SOURCE OUT [--dtype bfloat16]
    lmforge finetune TASK --model DIR --train FILE [--eval FILE] [--out DIR] [--epochs N] [--lora] ...
    lmforge classify | fill-mask | ner | embed MODEL [TEXT ...] [--file F] [--json]   (no TEXT: standard input)
    lmforge transcribe MODEL FILE ... [--language en] [--task transcribe] [--num-beams N] [--json]
    lmforge speech synth [TEXT] --out CORPUS | speech train CORPUS --out DIR | speech eval MODEL MANIFEST
    lmforge qa MODEL --question Q --context TEXT|--context-file F [--top-k K] [--json]
    lmforge index FOLDER --model EMBEDDER --out INDEX_DIR
    lmforge ask INDEX_DIR QUESTION [--reader QA | --generator GPT]
    lmforge serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-num-seqs N] ...
    lmforge attention MODEL TEXT --out map.png [--layers 0 1] [--heads 0] [--average-heads] [--attributions]

A user error prints one line naming the problem and exits with status 2 (`--debug` shows the traceback).
Each subcommand imports what it runs at its start, so `lmforge --help` and a typo answer at once (torch and
the models load only for a command that needs them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.constants import DTYPES, context_length

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    TypeError,
    ImportError,
)  # ImportError: an optional package is missing; the message says what to install


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: 200, or what the model's context leaves after the prompt)",
    )
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is generated (repeatable)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmforge.training.pretrain import apply_overrides, load_recipe, pretrain, saved_recipe

    recipe = None
    if a.resume and a.recipe is None:  # continue a run with the recipe it was started with
        recipe = saved_recipe(a.out or load_recipe("shakespeare").get("out") or "runs/lmforge")
    recipe = recipe or load_recipe(a.recipe or "shakespeare")
    overrides = list(a.set)
    if a.data:
        recipe["data"] = a.data
    if a.out:
        recipe["out"] = a.out
    if a.max_steps is not None:
        overrides.append(f"training.max_steps={a.max_steps}")
    if a.seed is not None:
        overrides.append(f"training.seed={a.seed}")
    if a.no_sample:
        recipe.pop("sample", None)
    recipe = apply_overrides(recipe, overrides)
    metrics = pretrain(recipe, resume=a.resume, device=a.device)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    return 0


def precision(a: argparse.Namespace) -> dict[str, str]:
    """--quantize / --dtype as from_pretrained / pipeline options (only those given)."""
    out = {"quantize": a.quantize} if a.quantize else {}
    if a.dtype:
        out["dtype"] = DTYPES[a.dtype]
    return out


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from lmforge.generation import stream
    from lmforge.hub import resolve_model_dir
    from lmforge.models.gpt import GPTForCausalLM
    from lmforge.tokenizer import Tokenizer
    from lmforge.utils import resolve_device

    model_dir = resolve_model_dir(a.model_dir)  # a folder, or a model id in the local Hugging Face cache
    model = GPTForCausalLM.from_pretrained(
        model_dir, device=resolve_device(a.device), **precision(a)
    )  # bad device: ValueError
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prompt = a.prompt if a.prompt != "-" else sys.stdin.read()
    if a.threads:
        torch.set_num_threads(a.threads)
    sample = a.temperature > 0  # --temperature 0 means greedy decoding
    max_new = a.max_new_tokens
    if max_new is None:  # the default never runs past the context (an explicit value warns if it would)
        max_new = max(0, min(200, context_length(model.config) - len(tokenizer.encode(prompt))))
    opts: dict[str, Any] = dict(
        max_new_tokens=max_new,
        temperature=a.temperature,
        do_sample=sample,
        top_k=(a.top_k or None) if sample else None,
        top_p=a.top_p if sample else None,
        repetition_penalty=a.repetition_penalty,
        stop=a.stop,
        seed=a.seed,
    )
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in stream(model, tokenizer, prompt, **opts):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from lmforge.training.finetune import finetune
    from lmforge.training.pretrain import apply_overrides

    training = apply_overrides({"training": {}}, [f"training.{kv}" for kv in a.set])["training"]
    for flag, key in (
        ("epochs", "num_train_epochs"),
        ("lr", "learning_rate"),
        ("batch_size", "per_device_train_batch_size"),
        ("max_steps", "max_steps"),
    ):
        if getattr(a, flag) is not None:
            training[key] = getattr(a, flag)
    report = finetune(
        a.task,
        model=a.model,
        train=a.train,
        eval=a.eval,
        out=a.out,
        eval_fraction=a.eval_fraction,
        max_train_examples=a.max_train_examples,
        max_length=a.max_length,
        prefix=a.prefix,
        separator=a.separator.replace("\\n", "\n").replace("\\t", "\t"),
        lora=a.lora,
        lora_r=a.lora_r,
        text_field=a.text_field,
        label_field=a.label_field,
        text_pair_field=a.text_pair_field,
        training=training,
        seed=a.seed,
        device=a.device,
        resume=a.resume,
        metric=a.metric,
        max_eval_generate=a.max_eval_generate,
    )
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items() if k != "labels"}
    print(json.dumps(shown, ensure_ascii=False))
    return 0


def _texts(a: argparse.Namespace) -> list[str]:
    """The texts of a pipeline command: arguments, else --file lines, else standard-input lines."""
    if a.text:
        return list(a.text)
    if a.file:
        lines = Path(a.file).read_text(encoding="utf-8").splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise ValueError("no input text: give TEXT arguments, --file FILE, or lines on standard input")
    return texts


def _documents(a: argparse.Namespace) -> list[str]:
    """summarize's documents: each TEXT argument, else each --file (the whole file), else all of standard input."""
    if a.text:
        return list(a.text)
    if a.file:
        docs = [Path(f).read_text(encoding="utf-8").strip() for f in a.file]
        empty = [f for f, d in zip(a.file, docs) if not d]
        if empty:
            raise ValueError(f"--file {empty[0]} is empty; there is nothing to summarize")
        return docs
    doc = sys.stdin.read().strip()
    if not doc:
        raise ValueError("no document: give TEXT arguments, --file FILE, or the document on standard input")
    return [doc]


def _emit(a: argparse.Namespace, text: str, result: Any, human: Callable[[Any], str]) -> None:
    if a.json:
        print(json.dumps({"input": text, "output": result}, ensure_ascii=False))
    else:
        print(human(result))


def _format_labels(result: Any) -> str:
    """classify's human output: `label score` for the top label (or each of --top-k), tab-separated."""
    return "\t".join(f"{x['label']} {x['score']:.4f}" for x in (result if isinstance(result, list) else [result]))


def cmd_pipeline(a: argparse.Namespace) -> int:
    """classify / fill-mask / ner / embed: one pipeline over the texts, one output per text."""
    from lmforge.pipelines import pipeline

    task = {
        "classify": "text-classification",
        "fill-mask": "fill-mask",
        "ner": "token-classification",
        "embed": "sentence-embeddings",
        "translate": "translation",
        "summarize": "summarization",
    }[a.command]
    options: dict[str, Any] = {}
    if a.command in ("translate", "summarize"):
        options = {"num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens, "truncation": a.truncation}
        task = a.task or task
    if a.command == "classify" and a.top_k is not None:
        options["top_k"] = a.top_k
    if a.command == "fill-mask":
        options["top_k"] = a.top_k or 5
    if a.command == "ner":
        options["aggregation_strategy"] = a.aggregation
    pipe = pipeline(task, model=a.model, device=a.device, batch_size=a.batch_size, **precision(a))
    texts = _documents(a) if a.command == "summarize" else _texts(a)
    results = pipe(texts, **options)
    for text, result in zip(texts, results):
        if a.command == "classify":
            _emit(a, text, result, lambda r, text=text: _format_labels(r) + f"\t{text}")
        elif a.command == "fill-mask":
            _emit(
                a,
                text,
                result,
                lambda r: "\n".join(
                    "  ".join(f"{c['token_str']!r} {c['score']:.3f}" for c in cands)
                    for cands in (r if r and isinstance(r[0], list) else [r])  # one list per [MASK]
                ),
            )
        elif a.command == "ner":
            _emit(
                a,
                text,
                result,
                lambda r: (
                    "\t".join(
                        f"{e.get('entity_group', e.get('entity'))}:{e['word']}[{e['start']}:{e['end']}]" for e in r
                    )
                    or "-"
                ),
            )
        elif a.command in ("translate", "summarize"):
            _emit(a, text, result[0][pipe.result_key], str)
        else:
            vector = [round(float(v), 6) for v in (result[0] if result and isinstance(result[0], list) else result)]
            _emit(a, text, vector, lambda r: " ".join(f"{v:.4f}" for v in r))
    return 0


def cmd_transcribe(a: argparse.Namespace) -> int:
    """Speech to text with a Whisper model: one line (or JSON object) per audio file."""
    from lmforge.pipelines import pipeline

    for path in a.files:  # before the model loads: a typo answers at once
        if not Path(path).exists():
            raise FileNotFoundError(f"audio file {path!r} does not exist; check the path")
    pipe = pipeline(
        "automatic-speech-recognition", model=a.model, device=a.device, batch_size=a.batch_size, **precision(a)
    )
    options = {"language": a.language, "task": a.task, "num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens}
    if not hasattr(pipe.model, "prompt_ids"):  # a CTC recognizer: no prompt, no token budget
        for name in ("language", "task", "max_new_tokens"):
            if options.pop(name) is not None:
                raise ValueError(
                    f"--{name.replace('_', '-')} applies to Whisper models; {a.model!r} is a CTC recognizer"
                )
    results = pipe(list(a.files), **{k: v for k, v in options.items() if v is not None})
    for path, result in zip(a.files, results):
        if a.json:
            print(json.dumps({"file": path, "text": result["text"]}, ensure_ascii=False))
        elif len(a.files) == 1:
            print(result["text"].strip())
        else:
            print(f"{path}\t{result['text'].strip()}")
    return 0


def cmd_speech_synth(a: argparse.Namespace) -> int:
    """Speak bundled (or your) text with espeak-ng's voices into a corpus with unseen-sentence, unseen-voice test."""
    from tqdm.auto import tqdm

    from lmforge.speech.synth import SynthConfig, build_corpus, espeak_ng

    espeak_ng()  # missing program: the install hint, before any work
    config = SynthConfig(
        text=a.text,
        num_train=a.num_train,
        num_test=a.num_test,
        test_variants=a.test_voices,
        variants=tuple(a.voices) if a.voices else None,
        **({"accents": tuple(a.accents)} if a.accents else {}),
        rates=(a.rates[0], a.rates[1]),
        pitches=(a.pitches[0], a.pitches[1]),
        seed=a.seed,
    )
    with tqdm(total=a.num_train + a.num_test, unit="clip", desc="speaking") as bar:
        manifests = build_corpus(a.out, config, workers=a.workers, progress=bar.update)
    for split, path in manifests.items():
        print(f"lmforge speech synth: {split}: {path}")
    return 0


def cmd_speech_train(a: argparse.Namespace) -> int:
    """Train the CTC recognizer (and its word n-gram model) on a synthetic corpus."""
    from lmforge.speech.recipe import SpeechTrainConfig, train_recognizer

    names = ("d_model", "layers", "heads", "ffn", "dropout", "max_steps", "batch_size", "learning_rate", "warmup_steps")
    extra = ("eval_steps", "dev_size", "lm_text", "seed", "units")
    given = {k: getattr(a, k) for k in (*names, *extra) if getattr(a, k) is not None}
    config = SpeechTrainConfig(**given)
    config.warmup_steps = min(config.warmup_steps, config.max_steps)
    out = train_recognizer(a.corpus, a.out, config, log=lambda m: print(m, file=sys.stderr))
    print(f"lmforge speech train: model -> {out}")
    return 0


def cmd_speech_eval(a: argparse.Namespace) -> int:
    """Word and character error rates of a CTC recognizer on a manifest, overall and per voice."""
    from lmforge.files import atomic_write_text
    from lmforge.speech.recipe import evaluate_recognizer

    result = evaluate_recognizer(a.model, a.manifest, beam_width=a.num_beams, limit=a.limit)
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    for name in ("greedy", "beam_lm"):
        if name in result:
            r = result[name]
            main = "per" if "per" in r else "wer"  # a phoneme model's greedy output is phonemes
            figures = "  ".join(f"{k.upper()} {100 * r[k]:.2f}%" for k in ("wer", "cer", "per") if k in r)
            print(f"{name}: {figures}  ({result['clips']} clips)")
            for group in ("accent", "gender", "variant"):
                cells = ", ".join(f"{g} {100 * v[main]:.1f}" for g, v in r[f"by_{group}"].items())
                print(f"  {main.upper()} by {group}: {cells}")
    return 0


def cmd_qa(a: argparse.Namespace) -> int:
    from lmforge.pipelines import pipeline

    if (a.context is None) == (a.context_file is None):
        raise ValueError("give the passage with --context TEXT or --context-file FILE (one of them)")
    context = a.context if a.context is not None else Path(a.context_file).read_text(encoding="utf-8")
    pipe = pipeline("question-answering", model=a.model, device=a.device, **precision(a))
    answers = pipe(question=a.question, context=context, top_k=a.top_k)
    answers = answers if isinstance(answers, list) else [answers]
    for ans in answers:
        if a.json:
            print(json.dumps(ans, ensure_ascii=False))
        else:
            print(f"{ans['answer']!r}\tscore {ans['score']:.4f}\tchars {ans['start']}-{ans['end']}")
    return 0


def cmd_attention(a: argparse.Namespace) -> int:
    """Attention heatmaps (per layer and head, labelled with the tokens) or, for classifiers with
    --attributions, gradient x input scores per token."""
    from lmforge.auto import AutoModel, AutoTokenizer
    from lmforge.hub import read_config_dict, resolve_model_dir
    from lmforge.interpret import (
        plot_attention,
        plot_attributions,
        plot_audio_cross_attention,
        plot_cross_attention,
        token_attributions,
    )
    from lmforge.models.registry import architecture_class

    directory = resolve_model_dir(a.model)
    architecture = (read_config_dict(directory).get("architectures") or [""])[0]
    cls = architecture_class(architecture) or AutoModel  # the class the checkpoint was saved as
    model = cls.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if hasattr(model, "prompt_ids"):  # Whisper: TEXT is an audio file
        if a.attributions:
            raise ValueError("--attributions is for text classifiers; a Whisper model draws its cross-attention")
        path = plot_audio_cross_attention(
            model,
            tokenizer,
            a.text,
            a.out,
            target=a.target,
            layers=a.layers,
            heads=a.heads,
            average_heads=a.average_heads,
            max_new_tokens=a.max_new_tokens,
        )
    elif a.attributions:
        path = plot_attributions(model, tokenizer, a.text, a.out)
        for token, score in token_attributions(model, tokenizer, a.text):
            print(f"{score:+.4f}\t{token}")
    elif getattr(model.config, "is_encoder_decoder", False):
        path = plot_cross_attention(
            model,
            tokenizer,
            a.text,
            a.out,
            target=a.target,
            layers=a.layers,
            heads=a.heads,
            average_heads=a.average_heads,
            max_new_tokens=a.max_new_tokens,
        )
    else:
        if a.target is not None:
            raise ValueError("--target is for encoder-decoders (translation, summarisation); this model has no decoder")
        path = plot_attention(
            model, tokenizer, a.text, a.out, layers=a.layers, heads=a.heads, average_heads=a.average_heads
        )
    print(f"lmforge attention: wrote {path}")
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    """Chunk and embed a folder of documents into a knowledge base on disk."""
    from lmforge.pipelines import KnowledgeBase, pipeline

    kb = KnowledgeBase.build(
        a.sources if len(a.sources) > 1 else a.sources[0],
        embedder=pipeline("sentence-embeddings", model=a.model, **precision(a)) if precision(a) else a.model,
        chunk_chars=a.chunk_chars,
        overlap=a.overlap,
        batch_size=a.batch_size,
    )
    kb.save(a.out)
    print(json.dumps({"out": str(a.out), "documents": kb.info["documents"], "chunks": len(kb), "dims": kb.dims}))
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    """Retrieve the chunks most similar to the question, then answer (extractive reader or generator)."""
    from lmforge.pipelines import KnowledgeBase, pipeline

    if a.reader and a.generator:
        raise ValueError("choose one of --reader (extractive QA model) and --generator (GPT model)")
    kb = KnowledgeBase.load(a.index)
    reader, generator = a.reader, a.generator
    embedder = kb.info["embedder"].get("model")
    if precision(a) and embedder:  # every model the question meets, at that precision
        kb.embedder = pipeline("sentence-embeddings", model=embedder, **precision(a))
    if precision(a):
        reader = reader and pipeline("question-answering", model=reader, **precision(a))
        generator = generator and pipeline("text-generation", model=generator, **precision(a))
    result = kb.ask(
        a.question,
        top_k=a.top_k,
        reader=reader,
        generator=generator,
        generation_options={"max_new_tokens": a.max_new_tokens} if a.generator else None,
    )
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    score = f" (score {result['score']:.3f})" if result.get("score") is not None else ""
    print(f"{result['answer']}{score}")
    for src in result["sources"]:
        print(f"  {src['score']:.3f}  {src['source']}:{src['start']}-{src['end']}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    """Load a Hugging Face (or lmforge) checkpoint and write it again: another dtype, a clean layout."""
    import torch

    from lmforge.auto import AutoModelForCausalLM
    from lmforge.hub import key_map, read_config_dict, read_weights, resolve_model_dir
    from lmforge.models.registry import architecture_class
    from lmforge.tokenizer import Tokenizer

    source = resolve_model_dir(a.source)
    state, weights_file = read_weights(source)
    architecture = (read_config_dict(source).get("architectures") or [""])[0]
    cls = architecture_class(architecture)  # the class the checkpoint was saved as
    model = (cls or AutoModelForCausalLM).from_pretrained(source, dtype=torch.float32)
    print(f"lmforge convert: {weights_file} ({len(state)} tensors) -> {type(model).__name__}")
    family = key_map(model)
    for rule in family.rules:  # what each Hugging Face name became inside lmforge
        hits = sum(1 for name in state if rule.from_hf(name) or rule.from_hf(family.prefix + name))
        if hits:
            note = " (transposed: Conv1D -> Linear)" if rule.transpose else ""
            note += f" (joined: {', '.join(rule.parts)})" if rule.parts else ""
            note += f" ({', '.join(rule.absent)}: not stored, zeros)" if rule.absent else ""
            print(f"  {rule.theirs:44s} -> {rule.ours}{note}  x{hits}")
    dtype = DTYPES[a.dtype]
    model.to(getattr(torch, dtype))
    try:
        tokenizer = Tokenizer.from_pretrained(source)
    except FileNotFoundError:
        tokenizer = None
        print("  (no tokenizer files in the source; only the model is written)")
    model.save_pretrained(a.out, tokenizer=tokenizer)
    if (source / "preprocessor_config.json").is_file():  # a speech model's feature settings go with it
        import shutil

        shutil.copyfile(source / "preprocessor_config.json", Path(a.out) / "preprocessor_config.json")
    print(f"lmforge convert: wrote {a.out} ({dtype}); it loads with lmforge and with transformers")
    return 0


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from lmforge.data import iter_documents
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(
        iterator=iter_documents(a.sources), vocab_size=a.vocab_size, min_frequency=a.min_frequency, show_progress=True
    )
    files = tok.save_pretrained(a.out)
    print(f"lmforge: byte-level BPE with {len(tok)} tokens -> {', '.join(map(str, files))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train, load and sample Transformer language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    # every command that runs a model: the weights' precision
    runs_model = argparse.ArgumentParser(add_help=False, parents=[common])
    runs_model.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: int8 weights, activations quantized per step (CPU; ~4x smaller, several times faster)",
    )
    runs_model.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights in this dtype (default: the checkpoint's); bfloat16 is fast on GPUs and CPUs with AMX / "
        "AVX512-BF16, emulated (slow) elsewhere",
    )

    p = sub.add_parser(
        "pretrain",
        aliases=["train"],
        parents=[common],
        help="train a model from scratch from a recipe (default: a GPT on bundled Shakespeare)",
        description="Train a model from scratch from a recipe (lmforge/configs/*.yaml or a YAML file): a GPT "
        "(shakespeare, sanguo), a BERT (bert-shakespeare, ...) or an encoder-decoder (translate-en-es, "
        "summarize-en). With no arguments: the 'shakespeare' recipe on the bundled corpus.",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help="recipe name or YAML path (default: shakespeare; with --resume, the run's own recipe)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="corpus: .txt/.jsonl files, folders, or bundled names (shakespeare, zh_poems, sanguo)",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (model, checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="random seed (same seed, same run)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: the recipe's, auto)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value, e.g. --set model.n_layer=2 --set training.learning_rate=1e-3",
    )
    p.add_argument("--no-sample", action="store_true", help="skip the sample printed after training")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "generate",
        parents=[runs_model],
        help="continue a prompt with a trained model (streams)",
        description="Stream a continuation of PROMPT from the model in MODEL_DIR.",
    )
    p.add_argument("model_dir", help="a model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("prompt", help="text to continue ('-' reads standard input)")
    _add_generation_options(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="re-write a Hugging Face / lmforge checkpoint (e.g. dtype)",
        description="Load SOURCE (a Hugging Face GPT-2 or lmforge directory, or a cached model id) "
        "and write it to OUT as config.json + model.safetensors + tokenizer files, "
        "printing how the parameter names were mapped.",
    )
    p.add_argument("source", help="model directory or cached model id")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype to write (default float32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a pretrained model for a task",
        description="Fine-tune MODEL on a data file and print evaluation metrics. Tasks: "
        "classification (txt/csv/tsv/jsonl with text,label; TRAIN 'sentiment' / "
        "'sentiment-zh' = bundled English sentences / Chinese reviews), ner (CoNLL "
        "BIO), qa (SQuAD JSON), causal-lm (jsonl/csv/tsv with input,output; a --prefix in "
        "front, loss on the output only).",
    )
    p.add_argument("task", help="classification | ner | qa | causal-lm")
    p.add_argument("--model", required=True, help="pretrained model directory or cached model id")
    p.add_argument(
        "--train",
        required=True,
        help="training data file; bundled: 'sentiment', 'sentiment-zh' (classification), "
        "'bible-en-es' / 'bible-es-en' (causal-lm translation, whole books held out for evaluation)",
    )
    p.add_argument("--eval", default=None, help="evaluation file (default: hold out --eval-fraction of --train)")
    p.add_argument("--out", default="runs/finetune", help="output directory (default runs/finetune)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share without --eval (default 0.1)")
    p.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default 3)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5; 1e-4 with --lora)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default 16)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default 128; qa 384)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (and the task head) only")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--prefix", default="", help="causal-lm: task label put in front of each input")
    p.add_argument("--separator", default="\\n", help="causal-lm: text between input and output (default newline)")
    p.add_argument(
        "--metric",
        choices=["bleu", "rouge"],
        default=None,
        help="causal-lm: generate the evaluation outputs (greedy) and score them (BLEU needs sacrebleu)",
    )
    p.add_argument(
        "--max-eval-generate",
        type=int,
        default=200,
        help="causal-lm with --metric: evaluation outputs generated (default 200)",
    )
    p.add_argument("--text-field", default="text", help="classification: the text column")
    p.add_argument("--label-field", default="label", help="classification: the label column")
    p.add_argument("--text-pair-field", default=None, help="classification: a second text column (pairs)")
    p.add_argument("--seed", type=int, default=42, help="random seed (split, initialisation, order)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrainingArguments field, e.g. --set weight_decay=0.01 --set bf16=true",
    )
    p.set_defaults(func=cmd_finetune)

    for name, about in (
        ("classify", "label texts with a sequence classifier (sentiment, topics, ...)"),
        ("fill-mask", "predict the [MASK] tokens of texts with a masked LM"),
        ("ner", "find entities in texts with a token classifier"),
        ("embed", "sentence vectors (mean pooled, normalised) of texts"),
        ("translate", "translate texts with an encoder-decoder (lmforge train translate-en-es, Marian)"),
        ("summarize", "summarize documents with an encoder-decoder (lmforge train summarize-en, BART)"),
    ):
        whole = name == "summarize"
        p = sub.add_parser(
            name,
            parents=[runs_model],
            help=about,
            description=f"{about[0].upper()}{about[1:]}. "
            + (
                "Each TEXT argument or --file is one document; with neither, all of standard input is one."
                if whole
                else "Texts come from the arguments, --file (one per line) or standard input (one per line)."
            ),
        )
        p.add_argument("model", help="model directory or cached model id")
        p.add_argument("text", nargs="*", help="texts (default: --file or standard input)")
        if whole:
            p.add_argument("--file", action="append", default=[], help="a document to summarize (repeatable)")
        else:
            p.add_argument("--file", default=None, help="read texts from this file, one per line")
        if name in ("translate", "summarize"):
            p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
            p.add_argument("--max-new-tokens", type=int, default=None, help="longest output, in tokens")
            p.add_argument(
                "--truncation", action="store_true", help="cut an input longer than the model takes (default: error)"
            )
            p.add_argument(
                "--task",
                default=None,
                help="pipeline task, e.g. translation_en_to_es (checked against the model's language pair)",
            )
        p.add_argument("--json", action="store_true", help="print one JSON object per text")
        p.add_argument("--batch-size", type=int, default=32, help="texts per model call (default 32)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cpu)")
        if name in ("classify", "fill-mask"):
            p.add_argument("--top-k", type=int, default=None, help="how many labels / tokens to show")
        if name == "ner":
            p.add_argument(
                "--aggregation",
                default="simple",
                choices=["none", "simple", "first", "max", "average"],
                help="how sub-tokens join into words and entities (default simple)",
            )
        p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "transcribe",
        parents=[runs_model],
        help="speech to text with a Whisper model (openai/whisper-* from the local Hugging Face cache, offline)",
        description="Transcribe audio files (WAV, FLAC, OGG, MP3) with a Whisper model: a directory or a model id in "
        "the local Hugging Face cache (e.g. openai/whisper-tiny). Audio longer than 30 s is cut into consecutive "
        "30-s windows whose texts are joined; a progress bar counts them.",
    )
    p.add_argument("model", help="model directory or cached model id (e.g. openai/whisper-tiny)")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    p.add_argument(
        "--language", default=None, help="spoken language code, e.g. en, de, zh (default: detected per window)"
    )
    p.add_argument(
        "--task",
        default=None,
        choices=["transcribe", "translate"],
        help="transcribe (default) or translate into English",
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=None,
        help="beam search width (Whisper: default 1, greedy; CTC recognizers: default 32 with their word n-gram model)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest text per 30-s window, in tokens (default: the model's)",
    )
    p.add_argument("--json", action="store_true", help='print one JSON object per file: {"file": ..., "text": ...}')
    p.add_argument("--batch-size", type=int, default=8, help="30-s windows per model call (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cpu)")
    p.set_defaults(func=cmd_transcribe)

    speech = sub.add_parser(
        "speech", help="a speech recognizer trained here: synthetic corpus, training, evaluation"
    ).add_subparsers(dest="action", metavar="ACTION")
    speech.required = True
    t = speech.add_parser(
        "synth",
        parents=[common],
        help="speak text with espeak-ng's voices into a corpus (test sentences and voices unseen in train)",
        description="Build a synthetic speech corpus with espeak-ng: 16 kHz FLAC files and train.jsonl / test.jsonl "
        "manifests (audio, text, voice, accent, variant, gender, rate, pitch, duration). Test sentences and test "
        "voice variants never occur in train. Deterministic for a seed; an interrupted build resumes.",
    )
    t.add_argument(
        "text", nargs="?", default="bible", help="bible (default), shakespeare, or a text file (a sentence per line)"
    )
    t.add_argument("--out", required=True, metavar="DIR", help="corpus folder")
    t.add_argument("--num-train", type=int, default=8000, help="training clips (default 8000)")
    t.add_argument("--num-test", type=int, default=400, help="test clips (default 400)")
    t.add_argument("--test-voices", type=int, default=8, help="voice variants heard only in test (default 8)")
    t.add_argument(
        "--voices",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="espeak-ng variants to use (default: all but the whispering ones)",
    )
    t.add_argument(
        "--accents", nargs="+", default=None, help="espeak-ng English voices (default: all seven English ones)"
    )
    t.add_argument(
        "--rates",
        nargs=2,
        type=int,
        default=[140, 210],
        metavar=("MIN", "MAX"),
        help="words per minute (default 140 210)",
    )
    t.add_argument(
        "--pitches", nargs=2, type=int, default=[25, 75], metavar=("MIN", "MAX"), help="pitch 0-99 (default 25 75)"
    )
    t.add_argument("--seed", type=int, default=0, help="what is drawn: sentences, voices, rates, pitches (default 0)")
    t.add_argument("--workers", type=int, default=None, help="espeak-ng processes at once (default: CPU count)")
    t.set_defaults(func=cmd_speech_synth)

    t = speech.add_parser(
        "train",
        parents=[common],
        help="train the CTC recognizer and its word n-gram model on a synthetic corpus",
        description="Train a speech encoder with a CTC head from scratch on CORPUS/train.jsonl (a dev set of "
        "unseen sentences is held out for the learning curve in OUT/metrics.jsonl), and a word trigram model on the "
        "corpus's text source without its test and dev sentences. Resumes from OUT's newest checkpoint.",
    )
    t.add_argument("corpus", help="a folder made by `lmforge speech synth`")
    t.add_argument("--out", required=True, metavar="DIR", help="model folder")
    for flag, kind, about in (
        ("max_steps", int, "optimizer steps (default 1250: ~55 min on 2 CPU cores)"),
        ("batch_size", int, "clips per step (default 32)"),
        ("learning_rate", float, "peak learning rate, cosine decay (default 1.5e-3)"),
        ("warmup_steps", int, "(default 150)"),
        ("eval_steps", int, "dev-set WER every N steps: the learning curve (default 200)"),
        ("dev_size", int, "clips of train.jsonl held out as the dev set (default 200)"),
        ("d_model", int, "width (default 256)"),
        ("layers", int, "Transformer layers (default 8)"),
        ("heads", int, "attention heads (default 4)"),
        ("ffn", int, "feed-forward width (default 1024)"),
        ("dropout", float, "(default 0.1)"),
        ("seed", int, "(default 0)"),
    ):
        t.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help=about)
    t.add_argument("--lm-text", default=None, help="text for the word n-gram model (default: the corpus's source)")
    t.add_argument(
        "--units",
        choices=["phonemes", "letters"],
        default=None,
        help="what the CTC head writes: espeak-ng's phonemes, read into words through a lexicon (default), or letters",
    )
    t.set_defaults(func=cmd_speech_train)

    t = speech.add_parser(
        "eval",
        parents=[common],
        help="word and character error rates of a CTC recognizer on a manifest",
        description="WER and CER (jiwer, lower case, punctuation removed) of greedy and beam-search (+ word n-gram "
        "model) decoding, overall and per accent, voice gender and voice variant.",
    )
    t.add_argument("model", help="a model folder made by `lmforge speech train`")
    t.add_argument("manifest", help="a manifest, e.g. CORPUS/test.jsonl")
    t.add_argument("--num-beams", type=int, default=32, help="beam width (default 32)")
    t.add_argument("--limit", type=int, default=None, help="only the first N clips")
    t.add_argument("--out", default=None, help="also write the full result as JSON here")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.set_defaults(func=cmd_speech_eval)

    p = sub.add_parser(
        "qa",
        parents=[runs_model],
        help="answer a question from a passage (extractive)",
        description="Find the answer span to QUESTION in the passage with a question-answering model; "
        "long passages are split into overlapping chunks.",
    )
    p.add_argument("model", help="model directory or cached model id")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--context", default=None, help="the passage text")
    p.add_argument("--context-file", default=None, help="read the passage from this file")
    p.add_argument("--top-k", type=int, default=1, help="answers to show (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON objects")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cpu)")
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser(
        "index",
        parents=[runs_model],
        help="build a knowledge base: chunk and embed documents",
        description="Read .txt/.md/.jsonl files (a folder or files), split them into overlapping "
        "chunks, embed each with a sentence-embedding model and save the index to --out.",
    )
    p.add_argument("sources", nargs="+", help="a folder or files")
    p.add_argument("--model", required=True, help="sentence-embedding model (folder or cached id), e.g. MiniLM")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--chunk-chars", type=int, default=600, help="characters per chunk (default 600)")
    p.add_argument("--overlap", type=int, default=100, help="characters shared by neighbouring chunks (default 100)")
    p.add_argument("--batch-size", type=int, default=32, help="chunks per model call")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "ask",
        parents=[runs_model],
        help="answer a question from a knowledge base (lmforge index)",
        description="Retrieve the top-k chunks of INDEX by cosine similarity to QUESTION, then answer "
        "with an extractive QA model (--reader), a generator (--generator), or, with "
        "neither, show the best chunk. Prints the answer, its score and the sources.",
    )
    p.add_argument("index", help="an index folder written by lmforge index")
    p.add_argument("question", help="the question")
    p.add_argument("--reader", default=None, help="question-answering model (folder or cached id)")
    p.add_argument("--generator", default=None, help="causal LM (folder or cached id) prompted with the context")
    p.add_argument("--top-k", type=int, default=3, help="chunks to retrieve (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generator: answer length (default 64)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "attention",
        parents=[common],
        help="draw attention maps (or token attributions) as a PNG",
        description="Per-layer, per-head attention heatmaps of MODEL on TEXT, labelled with the "
        "tokens (Chinese glyphs need a CJK font: pip install zhplot, or Noto Sans CJK). "
        "--attributions: gradient x input scores of a classifier's predicted class. For an encoder-decoder "
        "(translate-en-es, Marian, BART): the cross-attention between TEXT's tokens (x) and the output's (y). "
        "For a Whisper model TEXT is an audio file: the cross-attention between audio time (x) and the transcript's "
        "tokens (y).",
    )
    p.add_argument("model", help="model directory or cached model id")
    p.add_argument("text", help="the text to look at (Whisper models: an audio file)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indexes (default: all)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="head indexes (default: all)")
    p.add_argument("--average-heads", action="store_true", help="one map per layer, averaged over heads")
    p.add_argument("--attributions", action="store_true", help="token attributions of a classifier instead")
    p.add_argument(
        "--target",
        default=None,
        help="encoder-decoders: the output text to align with TEXT (default: the model's greedy translation or "
        "transcription)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="encoder-decoders: longest greedy output")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser(
        "serve",
        parents=[runs_model],
        help="serve a model over HTTP with OpenAI's API (completions, chat, responses, embeddings, pipelines)",
        description="Serve MODEL over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions and "
        "/v1/responses (causal LMs with continuous batching; encoder-decoders), /v1/embeddings (encoder models), "
        "/v1/audio/transcriptions (speech models), /v1/pipelines/TASK, /v1/models, /tokenize, /detokenize, "
        "/tokenizer_info, /health, /metrics (Prometheus) and a playground page at /. Binds 127.0.0.1 unless --host "
        "says otherwise. SIGTERM or Ctrl+C: stop taking requests, finish those in flight, exit.",
    )
    p.add_argument("model", help="model directory or cached model id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LMFORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health and / (default: $LMFORGE_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: folder name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together (default 64)")
    p.add_argument(
        "--max-batch-tokens", type=int, default=2048, help="most tokens one step processes, prompts included"
    )
    p.add_argument("--max-queue", type=int, default=256, help="most waiting requests; more get 429 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument(
        "--max-upload-bytes", type=int, default=25 << 20,
        help="largest audio upload to /v1/audio/* (default 25 MiB, OpenAI's limit)",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        metavar="STEPS",
        help="hand tokens to the HTTP layer every STEPS decoding steps: streams get them in groups, with fewer "
        "wake-ups (more tokens/s under load on few cores; default 1: every token as soon as it is made)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step through the model's modules (by default a GPT-2-style model's step runs as one "
        "TorchScript function on the CPU: the same logits, faster)",
    )
    p.add_argument(
        "--cors-origin", action="append", default=[], metavar="URL", help="allow browser calls from URL (repeatable)"
    )
    p.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds to let requests finish on shutdown (default 10)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or mps (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", metavar="ACTION")
    p.required = True
    t = p.add_parser(
        "train",
        parents=[common],
        help="train a byte-level BPE tokenizer",
        description="Train a byte-level BPE tokenizer on text and save tokenizer.json.",
    )
    t.add_argument("sources", nargs="+", help=".txt/.jsonl files, folders, or bundled corpus names")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. special tokens")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json and its config")
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        msg = f"lmforge serve needs the 'serve' extra ({e.name} is missing): pip install 'lmforge[serve]'"
        raise ImportError(msg) from None
    from lmforge.hub import resolve_model_dir
    from lmforge.serving import serve
    from lmforge.serving.app import ServerConfig
    from lmforge.utils import resolve_device

    for name in ("max_num_seqs", "max_batch_tokens", "max_queue", "max_body_bytes", "max_upload_bytes",
                 "stream_interval"):  # fmt: skip
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    model_dir = resolve_model_dir(a.model)  # a missing folder fails here, before the server starts
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"lmforge serve: warning: listening on {a.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)  # fmt: skip
    config = ServerConfig(
        model=str(model_dir),
        served_model_name=a.served_model_name or Path(a.model.rstrip("/")).name,
        api_key=a.api_key,
        max_num_seqs=a.max_num_seqs,
        max_batch_tokens=a.max_batch_tokens,
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        max_upload_bytes=a.max_upload_bytes,
        stream_interval=a.stream_interval,
        enforce_eager=a.enforce_eager,
        cors_origins=a.cors_origin,
        device=str(resolve_device(a.device)),
        **precision(a),
    )
    print(f"lmforge serve: {a.model} at http://{a.host}:{a.port}/v1 (playground: http://{a.host}:{a.port}/)",
          file=sys.stderr)  # fmt: skip
    serve(config, host=a.host, port=a.port, drain_timeout=a.drain_timeout)
    return 0


def _version() -> str:
    return f"lmforge {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet
        return 0
    except KeyboardInterrupt as e:
        print(f"\nlmforge: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if getattr(a, "debug", False):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lmforge {a.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
