"""Training and evaluating the small CTC recognizer on a synthetic corpus (`lmforge speech train` / `speech eval`).

    <corpus>/train.jsonl --load_audio--> log-Mel features per clip (own length, Whisper's steps) + letter ids
        --Trainer (AdamW, cosine, grouped by length; SpecAugment inside the model)--> SpeechEncoderForCTC
        -> every `eval_steps`: greedy WER / CER on a dev set (unseen sentences, training voices): the learning curve
    text of the corpus's source, without the test sentences --NGramLM.train--> ngram_lm.json.gz in the model folder
    <corpus>/test.jsonl (unseen sentences, unseen voices) -> greedy and beam-search (+LM) WER and CER, overall and
        per accent, per voice gender and per voice variant -> eval.json

Word error rate is jiwer's, on `normalize_text` (lower case, no punctuation) of both sides.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.constants import IGNORE_INDEX
from lmforge.files import atomic_write_text
from lmforge.models.speech_ctc import BLANK, DEFAULT_ALPHABET, SpeechCTCConfig, SpeechEncoderForCTC
from lmforge.speech.audio import load_audio
from lmforge.speech.ctc_decode import EOS, LM_WEIGHT, WORD_BONUS, BeamSearchDecoder, NGramLM, greedy_decode
from lmforge.speech.features import log_mel_spectrogram, mel_filterbank
from lmforge.speech.synth import normalize_text, phonemize, read_manifest, text_sentences


def _jiwer() -> Any:
    try:
        import jiwer
    except ImportError:
        raise ImportError("word error rates need the jiwer package: pip install 'lmforge[speech]'") from None
    return jiwer


def error_rates(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> dict[str, float]:
    """{"wer", "cer"} (jiwer, in [0, inf)) over normalised texts (`normalize=False`: as given, e.g. phonemes
    separated by spaces, whose "wer" is the phoneme error rate); empty references are left out."""
    jiwer = _jiwer()
    prep = normalize_text if normalize else (lambda t: " ".join(t.split()))
    pairs = [(prep(r), prep(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no reference text to score against")
    refs, hyps = zip(*pairs)
    return {"wer": float(jiwer.wer(list(refs), list(hyps))), "cer": float(jiwer.cer(list(refs), list(hyps)))}


def phoneme_words(rows: Sequence[dict[str, Any]]) -> list[list[list[str]]]:
    """espeak-ng's phoneme words of each clip's text, in the clip's accent (one espeak-ng call per accent)."""
    by_accent: defaultdict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_accent[row.get("accent", "en-us")].append(i)
    out: list[list[list[str]]] = [[] for _ in rows]
    for accent, idx in by_accent.items():
        for i, words in zip(idx, phonemize([rows[i]["text"] for i in idx], accent)):
            out[i] = words
    return out


def pronunciations(
    vocab: Sequence[str], accents: Sequence[str], rows: Sequence[dict[str, Any]], spoken: Sequence[list[list[str]]]
) -> dict[str, list[tuple[str, ...]]]:
    """The phoneme lexicon of a phoneme recognizer: each word of `vocab` as espeak-ng says it alone in each accent,
    plus the forms it takes inside the training sentences (`spoken`: their phoneme words) where espeak-ng kept one
    phoneme word per word (short words are often reduced in context: "the" -> "ðə", "ði")."""
    words = [w for w in vocab if w != EOS]
    found: defaultdict[str, set[tuple[str, ...]]] = defaultdict(set)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # espeak-ng runs as processes
        for said in pool.map(lambda accent: phonemize(words, accent), accents):
            for word, pron in zip(words, said):
                if len(pron) == 1:
                    found[word].add(tuple(pron[0]))
    for row, phon in zip(rows, spoken):
        text = normalize_text(row["text"]).split()
        if len(text) == len(phon):
            for word, pron in zip(text, phon):
                found[word].add(tuple(pron))
    return {w: sorted(p) for w, p in sorted(found.items())}


def encode_text(text: str, alphabet: Sequence[str]) -> list[int]:
    """Normalised text -> alphabet ids (a symbol outside the alphabet is an error naming it)."""
    index = {s: i for i, s in enumerate(alphabet)}
    norm = normalize_text(text)
    missing = sorted({ch for ch in norm if ch not in index})
    if missing:
        raise ValueError(f"text {text!r} has symbols the alphabet lacks: {missing}")
    return [index[ch] for ch in norm]


class SpeechDataset(torch.utils.data.Dataset):
    """A manifest's clips as {"input_features": (n_mels, T) float16, "labels": ids, "length": T}, all read and
    featurised once (a few hundred MB for ten thousand clips). `labels`: each clip's target symbol ids."""

    def __init__(self, rows: Sequence[dict[str, Any]], labels: Sequence[list[int]], n_mels: int = 80) -> None:
        filters = mel_filterbank(n_mels)
        self.rows = list(rows)
        self.items = []
        for row, ids in zip(self.rows, labels, strict=True):
            audio = load_audio(row["audio"])
            feats = log_mel_spectrogram(audio, n_mels, n_samples=None, filters=filters)[0]  # (n_mels, T)
            self.items.append({"input_features": feats.half(), "labels": ids, "length": feats.size(1)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def collate_speech(examples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Pad features with zeros to the longest clip ((B, n_mels, T) + a (B, T) frame mask) and labels with -100."""
    T = max(e["input_features"].size(1) for e in examples)
    L = max(len(e["labels"]) for e in examples)
    n_mels = examples[0]["input_features"].size(0)
    feats = torch.zeros(len(examples), n_mels, T)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        t = e["input_features"].size(1)
        feats[i, :, :t] = e["input_features"].float()
        mask[i, :t] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_features": feats, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def ctc_log_probs(model: SpeechEncoderForCTC, features: Sequence[Tensor], batch_size: int = 32) -> list[np.ndarray]:
    """Per clip (n_mels, T) features -> (T', V) log-probabilities, batched by similar length."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: features[i].size(1))
    out: list[np.ndarray] = [np.empty(0)] * len(features)
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        batch = collate_speech([{"input_features": features[i], "labels": [1]} for i in idx])
        res = model(batch["input_features"], batch["attention_mask"])
        log_probs = res.logits.float().log_softmax(-1)
        for j, i in enumerate(idx):
            out[i] = log_probs[j, : int(res.output_lengths[j])].numpy()
    return out


def greedy_metrics(alphabet: Sequence[str]) -> Callable[[Any], dict[str, float]]:
    """compute_metrics for the Trainer: greedy CTC decoding of the eval logits (padding rows read as blank) against
    the labels: word and character error rates for letters, the phoneme error rate ("per") for phonemes."""
    letters = " " in alphabet

    def compute(pred: Any) -> dict[str, float]:
        hyps = [greedy_decode(logits, alphabet) for logits in pred.predictions]
        symbols = [[alphabet[i] for i in row if i >= 0] for row in pred.label_ids]
        if letters:
            return error_rates(["".join(s) for s in symbols], hyps)
        return {"per": error_rates([" ".join(s) for s in symbols], hyps, normalize=False)["wer"]}

    return compute


@dataclass
class SpeechTrainConfig:
    """What `train_recognizer` does (`lmforge speech train` flags of the same names)."""

    units: str = "phonemes"  # what the CTC head writes: "phonemes" (espeak-ng's, + a lexicon) or "letters"
    d_model: int = 256
    layers: int = 8
    heads: int = 4
    ffn: int = 1024
    conv_strides: list[int] = field(default_factory=lambda: [3, 1])
    dropout: float = 0.1
    max_steps: int = 1250
    batch_size: int = 32
    learning_rate: float = 1.5e-3
    warmup_steps: int = 150
    eval_steps: int = 200
    dev_size: int = 200  # clips held out of train.jsonl for the learning curve (unseen sentences, known voices)
    lm_text: str | None = None  # text for the n-gram model; None: the corpus's own text source
    seed: int = 0


def split_dev(rows: Sequence[dict[str, Any]], dev_size: int, seed: int) -> tuple[list, list]:
    """(train, dev): `dev_size` clips drawn by `seed` from a training manifest (what `train_recognizer` holds out)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[dev_size:]], [rows[i] for i in order[:dev_size]]


def _lm_sentences(corpus: Path, lm_text: str | None, held_out: set[str]) -> list[str]:
    source = lm_text or json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))["config"]["text"]
    sentences = [normalize_text(s) for s in text_sentences(source, min_words=1, max_words=10_000)]
    return [s for s in sentences if s not in held_out]


def train_recognizer(
    corpus: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: SpeechTrainConfig | None = None,
    log: Callable[[str], Any] = print,
) -> Path:
    """Train a CTC recognizer on `<corpus>/train.jsonl` into `output_dir` (model, n-gram LM, metrics.jsonl);
    resumes from the newest checkpoint there. -> the output folder."""
    from lmforge.training import Trainer, TrainingArguments

    config = config or SpeechTrainConfig()
    corpus, out = Path(corpus), Path(output_dir)
    rows = read_manifest(corpus / "train.jsonl")
    test_rows = read_manifest(corpus / "test.jsonl") if (corpus / "test.jsonl").exists() else []
    train_rows, dev_rows = split_dev(rows, config.dev_size, config.seed)
    if not train_rows:
        raise ValueError(f"{corpus / 'train.jsonl'} has {len(rows)} clips, all taken by dev_size={config.dev_size}")
    if config.units not in ("phonemes", "letters"):
        raise ValueError(f"units must be 'phonemes' or 'letters', got {config.units!r}")
    started = time.perf_counter()
    if config.units == "phonemes":
        log(f"speech train: phonemes of {len(rows)} clips (espeak-ng)")
        spoken = phoneme_words([*train_rows, *dev_rows])
        alphabet = [BLANK, *sorted({p for words in spoken for word in words for p in word})]
        index = {p: i for i, p in enumerate(alphabet)}
        labels = [[index[p] for word in words for p in word] for words in spoken]
    else:
        alphabet = list(DEFAULT_ALPHABET)
        labels = [encode_text(r["text"], alphabet) for r in (*train_rows, *dev_rows)]
    model_config = SpeechCTCConfig(
        alphabet=alphabet,
        d_model=config.d_model,
        encoder_layers=config.layers,
        encoder_attention_heads=config.heads,
        encoder_ffn_dim=config.ffn,
        conv_strides=list(config.conv_strides),
        dropout=config.dropout,
    )
    log(f"speech train: reading {len(train_rows)} + {len(dev_rows)} clips")
    train_set = SpeechDataset(train_rows, labels[: len(train_rows)])
    dev_set = SpeechDataset(dev_rows, labels[len(train_rows) :])
    log(f"speech train: features ready in {time.perf_counter() - started:.0f} s")
    # the language model never sees a test or dev sentence
    held_out = {normalize_text(r["text"]) for r in (*test_rows, *dev_rows)}
    lm = NGramLM.train(_lm_sentences(corpus, config.lm_text, held_out))
    if config.units == "phonemes":
        accents = sorted({r.get("accent", "en-us") for r in rows})
        lm.pronunciations = pronunciations(lm.vocab, accents, train_rows, spoken[: len(train_rows)])
        log(f"speech train: lexicon of {len(lm.pronunciations)} words ready at {time.perf_counter() - started:.0f} s")
    torch.manual_seed(config.seed)
    model = SpeechEncoderForCTC(model_config)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        eval_steps=config.eval_steps,
        save_steps=config.eval_steps,
        logging_steps=50,
        group_by_length=True,
        seed=config.seed,
        report_to="jsonl",
    )
    trainer = Trainer(
        model,
        args,
        train_dataset=train_set,
        eval_dataset=dev_set,
        data_collator=collate_speech,
        compute_metrics=greedy_metrics(model_config.alphabet),
    )
    trainer.train(resume_from_checkpoint=True if any(out.glob("checkpoint-*")) else None)
    model.language_model = lm
    trainer.save_model(out)
    lm.save(out)  # the Trainer writes the weights and config; the model folder also carries its n-gram model
    summary = {
        "config": asdict(config),
        "train_clips": len(train_set),
        "train_seconds": round(time.perf_counter() - started, 1),
        "parameters": model.num_parameters(),
    }
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return out


def evaluate_recognizer(
    model_dir: str | os.PathLike,
    manifest: str | os.PathLike,
    beam_width: int = 32,
    alpha: float = LM_WEIGHT,
    beta: float = WORD_BONUS,
    limit: int | None = None,
) -> dict[str, Any]:
    """Error rates of a trained recognizer on a manifest, overall and per accent, voice gender and voice variant:
    "greedy" (letters: WER and CER; phonemes: the phoneme error rate "per" against espeak-ng's phonemes of the
    reference) and, when the model folder has an n-gram model, "beam_lm" (WER and CER of the words)."""
    model = SpeechEncoderForCTC.from_pretrained(model_dir)
    rows = read_manifest(manifest)[:limit]
    filters = mel_filterbank(model.config.num_mel_bins)
    features = [
        log_mel_spectrogram(load_audio(r["audio"]), model.config.num_mel_bins, n_samples=None, filters=filters)[0]
        for r in rows
    ]
    log_probs = ctc_log_probs(model, features)
    alphabet = model.config.alphabet
    texts = [r["text"] for r in rows]
    # (hypotheses, references, normalise, which rates) per decoding
    runs: dict[str, tuple[list[str], list[str], bool, dict[str, str]]] = {}
    greedy = [greedy_decode(lp, alphabet) for lp in log_probs]
    if " " in alphabet:
        runs["greedy"] = (greedy, texts, True, {"wer": "wer", "cer": "cer"})
    else:
        phonemes = [" ".join(p for word in words for p in word) for words in phoneme_words(rows)]
        runs["greedy"] = (greedy, phonemes, False, {"per": "wer"})
    if model.language_model is not None:
        decoder = BeamSearchDecoder(alphabet, model.language_model, alpha=alpha, beta=beta, beam_width=beam_width)
        runs["beam_lm"] = ([decoder.decode(lp) for lp in log_probs], texts, True, {"wer": "wer", "cer": "cer"})
    groups: dict[str, defaultdict[str, list[int]]] = {}
    for key in ("accent", "gender", "variant"):
        groups[key] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[key][str(r.get(key, "?"))].append(i)

    def rates(idx: Sequence[int], hyps: list[str], refs: list[str], norm: bool, names: dict[str, str]) -> dict:
        got = error_rates([refs[i] for i in idx], [hyps[i] for i in idx], normalize=norm)
        return {name: got[source] for name, source in names.items()}

    result: dict[str, Any] = {"clips": len(rows), "manifest": str(manifest)}
    for name, (hyps, refs, norm, names) in runs.items():
        entry: dict[str, Any] = rates(range(len(rows)), hyps, refs, norm, names)
        for key, members in groups.items():
            entry[f"by_{key}"] = {
                g: {**rates(idx, hyps, refs, norm, names), "clips": len(idx)} for g, idx in sorted(members.items())
            }
        result[name] = entry
    result["examples"] = [
        {"reference": normalize_text(texts[i]), **{name: run[0][i] for name, run in runs.items()}}
        for i in range(min(5, len(rows)))
    ]
    return result
