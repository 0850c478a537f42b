"""A synthetic speech corpus: bundled English text spoken by espeak-ng's voices, with a split that holds out both
sentences and voices.

    text source (the bundled KJV verses cut into clauses, Shakespeare's lines, or a text file)
        -> normalised, de-duplicated sentences -> seeded split: test sentences never appear in train
    espeak-ng accents x voice variants -> seeded split: test variants never speak in train
        -> espeak-ng --stdout (22,050 Hz WAV) -> soxr -> 16 kHz FLAC files
        -> train.jsonl / test.jsonl: {"audio", "text", "voice", "accent", "variant", "gender", "rate", "pitch",
                                      "duration"}

Everything is decided by the seed (which sentence, voice, rate and pitch each utterance gets), and espeak-ng is
deterministic, so the same command builds the same corpus. Files are written atomically and an existing file is
kept, so an interrupted build resumes where it stopped. The manifests are written last.

`espeak-ng` is a system program (Debian/Ubuntu: `apt-get install espeak-ng`; macOS: `brew install espeak-ng`;
Windows: the installer from the espeak-ng releases page); `espeak_ng()` names the fix when it is missing.
A recognizer trained on this speech knows espeak-ng's voices only: it does not transfer to real recordings (use a
Whisper checkpoint for those).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.files import atomic_write_bytes, atomic_write_text
from lmforge.speech.audio import SAMPLING_RATE, resample

INSTALL_ESPEAK = (
    "install espeak-ng: `apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS), or the "
    "Windows installer from https://github.com/espeak-ng/espeak-ng/releases (then put espeak-ng on PATH)"
)
# English accents espeak-ng ships (its `--voices=en` list, without the MBROLA voices, which need extra packages).
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
# Variants left out by default: whispering (no voicing at all) and "fast_test" (a speed test, not a voice).
EXCLUDED_VARIANTS = ("whisper", "whisperf", "fast")
TEXT_SOURCES = ("bible", "shakespeare")


def espeak_ng() -> str:
    """The espeak-ng program's path; a clear error naming the install command when it is missing."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(f"espeak-ng is not on PATH; {INSTALL_ESPEAK}")
    return path


@dataclass(frozen=True)
class Variant:
    """One espeak-ng voice variant (the timbre: pitch range, formants), combinable with any accent."""

    name: str  # the id espeak-ng takes after "+", e.g. "m3", "Alicia", "klatt2"
    label: str  # espeak-ng's display name, e.g. "male3"
    gender: str  # "M" or "F", as espeak-ng lists it


def list_variants(exclude: Sequence[str] = EXCLUDED_VARIANTS) -> list[Variant]:
    """espeak-ng's voice variants (`espeak-ng --voices=variant`), sorted by id, without `exclude`."""
    out = subprocess.run([espeak_ng(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = []
    for line in out.splitlines()[1:]:
        # "Pty Language Age/Gender VoiceName File": " 5  variant  --/M  Adam  !v/adam"
        fields = line.split()
        if len(fields) < 5 or not fields[4].startswith("!v/"):
            continue
        name = fields[4][3:]
        if name not in exclude:
            variants.append(Variant(name=name, label=fields[3], gender=fields[2][-1]))
    if not variants:
        raise RuntimeError("espeak-ng lists no voice variants; its data files may be missing (reinstall espeak-ng)")
    return sorted(variants, key=lambda v: v.name.lower())


def select_variants(names: Sequence[str] | None) -> list[Variant]:
    """The variants named (espeak-ng ids, e.g. "m3", "Alicia"), or all but EXCLUDED_VARIANTS for None."""
    if names is None:
        return list_variants()
    known = {v.name: v for v in list_variants(exclude=())}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown espeak-ng voice variant(s) {unknown}; `espeak-ng --voices=variant` lists them "
            f"(the last column without '!v/'), e.g. {', '.join(sorted(known)[:6])}"
        )
    return [known[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------------- text
def normalize_text(text: str) -> str:
    """What word error rate is measured on: lower case, apostrophes dropped ("lord's" -> "lords"), every other
    non-letter a space, spaces collapsed."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.sub(r"[^a-z]+", " ", text).split())


def text_sentences(source: str | os.PathLike, min_words: int = 4, max_words: int = 12) -> list[str]:
    """Sentences to speak, from a bundled source ("bible": KJV verses cut at ; : . ? !; "shakespeare": the plays'
    lines) or a UTF-8 text file (one sentence per line), as written (normalise with `normalize_text`).
    Kept: `min_words`..`max_words` words, no digits (espeak-ng would read "12" as "twelve"). Duplicates (after
    normalising) are dropped, first one kept, so a held-out sentence cannot come back as a copy."""
    if str(source) == "bible":
        from lmforge.data.bundled import _bible_rows

        pieces: Iterable[str] = (c for row in _bible_rows() for c in re.split(r"[;:.?!]", row["en"]))
    elif str(source) == "shakespeare":
        import lzma

        from lmforge.data.bundled import BUNDLED

        with lzma.open(BUNDLED["shakespeare"].path, "rt", encoding="utf-8") as f:
            pieces = [line for line in f.read().splitlines() if not line.isupper()]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"text source {str(source)!r} is neither a bundled one ({', '.join(TEXT_SOURCES)}) nor a file"
            )
        from lmforge.textio import read_text

        pieces = read_text(path).splitlines()
    seen: set[str] = set()
    sentences = []
    for piece in pieces:
        piece = " ".join(piece.split()).strip(" ,")
        norm = normalize_text(piece)
        if not (min_words <= len(norm.split()) <= max_words) or re.search(r"\d", piece) or norm in seen:
            continue
        seen.add(norm)
        sentences.append(piece)
    if not sentences:
        raise ValueError(f"text source {str(source)!r} has no sentence of {min_words}-{max_words} words")
    return sentences


# ---------------------------------------------------------------------------------------------------- audio
def synthesize(
    text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """`text` spoken by espeak-ng (`voice` as "accent+variant", `rate` in words per minute, `pitch` 0-99) ->
    mono float32 samples (N,) at `sampling_rate`."""
    import soundfile as sf

    result = subprocess.run(
        [espeak_ng(), "--stdout", "-v", voice, "-s", str(rate), "-p", str(pitch)],
        input=text.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} (exit {result.returncode}): {message}")
    # espeak-ng streams its WAV with unknown sizes in the header; libsndfile reads such a stream
    audio, rate_in = sf.read(io.BytesIO(result.stdout), dtype="float32")
    return resample(np.asarray(audio, dtype=np.float32).reshape(-1), int(rate_in), sampling_rate)


def phonemize(texts: Sequence[str], voice: str = "en-us") -> list[list[list[str]]]:
    """espeak-ng's own phonemes for each text, as it speaks them with `voice` (an accent, e.g. "en-gb-scotland"):
    per text a list of phoneme words, each a list of IPA phonemes ("h", "ə", "l", "oʊ"), stress marks dropped.
    espeak-ng joins some short words to the next ("in the" -> one phoneme word), so the counts of words and of phoneme
    words may differ. Texts are normalised first (`normalize_text`), one line each."""
    lines = [normalize_text(t) for t in texts]
    result = subprocess.run(
        [espeak_ng(), "-q", "--ipa", "--sep=_", "-v", voice],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    out = result.stdout.splitlines()
    if result.returncode != 0 or len(out) != len(lines):
        raise RuntimeError(
            f"espeak-ng gave {len(out)} phoneme lines for {len(lines)} texts (voice {voice!r}, exit "
            f"{result.returncode}): {result.stderr.strip()}"
        )
    return [
        [[p for p in word.replace("\u02c8", "").replace("\u02cc", "").split("_") if p] for word in line.split()]
        for line in out
    ]


@dataclass(frozen=True)
class Utterance:
    """One line of a manifest."""

    audio: str  # path relative to the manifest's folder
    text: str
    voice: str  # "accent+variant", as espeak-ng takes it
    accent: str
    variant: str
    gender: str
    rate: int
    pitch: int
    duration: float = 0.0  # seconds, filled in once spoken


@dataclass(frozen=True)
class SynthConfig:
    """What `build_corpus` makes; everything random comes from `seed`."""

    text: str = "bible"
    num_train: int = 8000
    num_test: int = 400
    test_variants: int = 8  # voice variants heard only in test
    variants: tuple[str, ...] | None = None  # espeak-ng variant ids to draw from; None: all but EXCLUDED_VARIANTS
    accents: tuple[str, ...] = ACCENTS
    rates: tuple[int, int] = (140, 210)  # words per minute, drawn uniformly
    pitches: tuple[int, int] = (25, 75)
    seed: int = 0


def plan_corpus(config: SynthConfig, variants: Sequence[Variant]) -> dict[str, list[Utterance]]:
    """The utterances of each split (no audio yet): test sentences and test variants are both unseen in train."""
    rng = random.Random(config.seed)
    sentences = text_sentences(config.text)
    if config.num_train + config.num_test > len(sentences):
        raise ValueError(
            f"{config.num_train} train + {config.num_test} test sentences asked, but the text source "
            f"{config.text!r} has {len(sentences)}; ask for fewer or use a bigger source"
        )
    if not 0 < config.test_variants < len(variants):
        raise ValueError(f"test_variants must be between 1 and {len(variants) - 1}, got {config.test_variants}")
    order = list(range(len(sentences)))
    rng.shuffle(order)
    test_sentences = [sentences[i] for i in order[: config.num_test]]
    train_sentences = [sentences[i] for i in order[config.num_test : config.num_test + config.num_train]]
    shuffled = list(variants)
    rng.shuffle(shuffled)
    test_variants = sorted(shuffled[: config.test_variants], key=lambda v: v.name.lower())
    train_variants = sorted(shuffled[config.test_variants :], key=lambda v: v.name.lower())

    def utterances(split: str, texts: list[str], pool: list[Variant]) -> list[Utterance]:
        out = []
        for i, text in enumerate(texts):
            variant = pool[rng.randrange(len(pool))]
            accent = config.accents[rng.randrange(len(config.accents))]
            out.append(
                Utterance(
                    audio=f"audio/{split}/{i:06d}.flac",
                    text=text,
                    voice=f"{accent}+{variant.name}",
                    accent=accent,
                    variant=variant.name,
                    gender=variant.gender,
                    rate=rng.randint(*config.rates),
                    pitch=rng.randint(*config.pitches),
                )
            )
        return out

    return {
        "train": utterances("train", train_sentences, train_variants),
        "test": utterances("test", test_sentences, test_variants),
    }


def _speak_to(path: Path, u: Utterance) -> float:
    """Write `u` as a 16-bit 16 kHz FLAC at `path` (kept if it exists) -> its duration in seconds."""
    import soundfile as sf

    if path.exists():
        return round(sf.info(str(path)).frames / SAMPLING_RATE, 3)
    audio = synthesize(u.text, u.voice, u.rate, u.pitch)
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLING_RATE, format="FLAC", subtype="PCM_16")
    atomic_write_bytes(path, buffer.getvalue())
    return round(len(audio) / SAMPLING_RATE, 3)


def build_corpus(
    out_dir: str | os.PathLike,
    config: SynthConfig = SynthConfig(),
    workers: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Path]:
    """Speak the planned corpus into `out_dir` (audio/<split>/NNNNNN.flac) and write `<split>.jsonl` manifests
    and `corpus.json` (the config and the voice split) -> {split: manifest path}. `progress(n)` is called as
    files are done."""
    out = Path(out_dir)
    plan = plan_corpus(config, select_variants(config.variants))
    for split in plan:
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(split, i, u) for split, us in plan.items() for i, u in enumerate(us)]
    durations: dict[tuple[str, int], float] = {}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # espeak-ng runs as processes
        futures = {(s, i): pool.submit(_speak_to, out / u.audio, u) for s, i, u in jobs}
        for key, future in futures.items():
            durations[key] = future.result()
            if progress is not None:
                progress(1)
    manifests = {}
    for split, us in plan.items():
        lines = [
            json.dumps(asdict(u) | {"duration": durations[(split, i)]}, ensure_ascii=False) for i, u in enumerate(us)
        ]
        manifests[split] = out / f"{split}.jsonl"
        atomic_write_text(manifests[split], "\n".join(lines) + "\n")
    summary = {
        "config": asdict(config),
        "voices": {split: sorted({u.variant for u in us}, key=str.lower) for split, us in plan.items()},
        "hours": {
            split: round(sum(durations[(split, i)] for i in range(len(us))) / 3600, 3) for split, us in plan.items()
        },
    }
    atomic_write_text(out / "corpus.json", json.dumps(summary, indent=2) + "\n")
    return manifests


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A manifest's utterances (dicts), with `audio` made absolute (relative to the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist; build one with `lmforge speech synth`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if "audio" not in row or "text" not in row:
            raise ValueError(f"{path}:{n}: a manifest line needs 'audio' and 'text' fields, got {sorted(row)}")
        row["audio"] = str((path.parent / row["audio"]).resolve())
        rows.append(row)
    return rows
