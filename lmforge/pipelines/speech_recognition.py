"""automatic-speech-recognition: audio in, text out, with a Whisper model or a CTC recognizer trained by lmforge.

    "talk.wav" | {"raw": samples, "sampling_rate": 44100} | {"array": ..., "sampling_rate": ...} | samples (16 kHz)
        -> 16 kHz mono float32 (read with soundfile, resampled with soxr)
        -> consecutive 30-s windows -> log-Mel features (B, 80, 3000) -> Whisper generate -> text per window
        -> {"text": the windows' texts joined}

Long audio: the samples are cut into plain consecutive, non-overlapping 30-s windows (480,000 samples; the last one
shorter, padded with silence by the features); each window is transcribed on its own with the same prompt (language,
task), in batches of `batch_size` windows, and the windows' texts are concatenated in order, with a space put between
two of them only when neither has one at the junction. A word spoken across a boundary may come out cut or twice; this
is the price of windows that do not depend on each other (transformers' long-form mode needs timestamp tokens instead).
A progress bar (on standard error) counts the windows when the audio is longer than one window.

CTC recognizers (`SpeechEncoderForCTC`, `lmforge speech train`) take the same inputs and windows; each window's
features keep its own length (no padding to 30 s), and the letters are decoded greedily or, when the model folder
has a word n-gram model, by beam search with it (`CTCSpeechRecognitionPipeline`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.pipelines.base import Feature, Pipeline, check_model_kind, describe
from lmforge.speech import WhisperFeatureExtractor, check_samples, load_audio, log_mel_spectrogram, resample, to_mono
from lmforge.speech.ctc_decode import LM_WEIGHT, WORD_BONUS, BeamSearchDecoder, greedy_decode


class AutomaticSpeechRecognitionPipeline(Pipeline):
    """Transcribe audio with a Whisper model (WhisperForConditionalGeneration).

    Inputs: a file path (WAV, FLAC, OGG, MP3), a dict {"raw" or "array": samples, "sampling_rate": Hz} (resampled
    to 16 kHz when needed), or a 1-D numpy array / tensor of 16 kHz samples; or a list of them (a list of results).
    Options: `language` ("en", "de", ...; None: detected per window by multilingual models), `task` ("transcribe" or
    "translate"), `num_beams` (1), `length_penalty`, `max_new_tokens` (per window; None: what the decoder's positions
    allow), `generate_kwargs` (a dict of the same, as transformers takes them), `progress` (None: a bar when the audio
    is longer than one window). Result: {"text": ...}.
    """

    task: ClassVar[str] = "automatic-speech-recognition"
    single_types: ClassVar[tuple[type, ...]] = (str, os.PathLike, dict, np.ndarray, torch.Tensor)

    def __init__(self, model: Any, tokenizer: Any = None, feature_extractor: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if feature_extractor is None:
            feature_extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        elif isinstance(feature_extractor, (str, os.PathLike)):
            feature_extractor = WhisperFeatureExtractor.from_pretrained(feature_extractor)
        if feature_extractor.feature_size != model.config.num_mel_bins:
            raise ValueError(
                f"the feature extractor makes {feature_extractor.feature_size} Mel bins but the model reads "
                f"{model.config.num_mel_bins}; use the model's own preprocessor_config.json"
            )
        self.feature_extractor = feature_extractor
        self._bar: Any = None

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["a speech recogniser (WhisperForConditionalGeneration)"],
            lambda m: hasattr(m, "prompt_ids") and hasattr(getattr(m, "config", None), "num_mel_bins"),
            "load one with lmforge.AutoModelForSpeechSeq2Seq.from_pretrained",
        )

    def _options(
        self,
        language: str | None = None,
        task: str | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        generate = {"language": language, "task": task, "num_beams": num_beams, "length_penalty": length_penalty}
        generate["max_new_tokens"] = max_new_tokens
        extra = dict(generate_kwargs or {})
        unknown = sorted(set(extra) - set(generate))
        if unknown:
            raise TypeError(f"{self.task}: generate_kwargs has unsupported option(s) {unknown}; use {sorted(generate)}")
        generate.update(extra)
        if not isinstance(generate["num_beams"], int) or generate["num_beams"] < 1:
            raise ValueError(f"num_beams must be a positive integer, got {generate['num_beams']!r}")
        return {"generate": generate, "progress": progress}

    def _input_kinds(self) -> str:
        return "an audio file path, a dict {'raw' or 'array': samples, 'sampling_rate': Hz}, or a 1-D array of samples"

    @property
    def window(self) -> int:
        """Samples per window (30 s)."""
        return self.feature_extractor.n_samples

    def audio_of(self, item: Any, index: int) -> np.ndarray:
        """Input `index` as 16 kHz mono float32 samples (N,), or a user error naming it."""
        rate = self.feature_extractor.sampling_rate
        if isinstance(item, (str, os.PathLike)):
            return load_audio(item, rate)
        what = f"{self.task}: input {index}"
        if isinstance(item, dict):
            keys = [k for k in ("raw", "array") if k in item]
            if len(keys) != 1 or "sampling_rate" not in item:
                raise ValueError(
                    f"{what} is a dict with keys {sorted(item)}; give the samples as 'raw' or 'array' and their rate "
                    "as 'sampling_rate', e.g. {'raw': samples, 'sampling_rate': 16000}"
                )
            given = item["sampling_rate"]
            if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given <= 0:
                raise ValueError(f"{what}: sampling_rate must be a positive integer (Hz), got {describe(given)}")
            samples = self._samples(item[keys[0]], what)
            return check_samples(resample(samples, int(given), rate), what)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            return check_samples(self._samples(item, what), what)
        raise TypeError(f"{what} is a {type(item).__name__} ({describe(item)}); give {self._input_kinds()}")

    @staticmethod
    def _samples(value: Any, what: str) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in "fiu" or array.ndim not in (1, 2):
            raise ValueError(
                f"{what}: samples must be numbers, (samples,) or (samples, channels); got dtype {array.dtype} and "
                f"shape {array.shape}"
            )
        if array.dtype.kind in "iu":
            raise ValueError(
                f"{what}: give samples as floats in [-1, 1], not {array.dtype} (divide by 32768 for int16)"
            )
        return to_mono(array)

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        """Each input's samples cut into 30-s windows: one row per window. Starts the progress bar over all windows."""
        features = []
        for k, item in enumerate(items):
            audio = self.audio_of(item, start + k)
            windows = [audio[i : i + self.window] for i in range(0, len(audio), self.window)]
            features.append(Feature(rows=[{"audio": w} for w in windows]))
        total = sum(len(f.rows) for f in features)
        long_audio = any(len(f.rows) > 1 for f in features)
        show = opts["progress"] if opts["progress"] is not None else long_audio
        self._bar = tqdm(total=total, unit="window", desc="transcribing", disable=not show)
        return features

    def _batches(self, rows: list[dict[str, Any]], batch_size: int, opts: dict[str, Any]) -> list[list[int]]:
        """Windows in order (all make features of the same size)."""
        return [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]

    def _run(self, items: list[Any], start: int, opts: dict[str, Any], batch_size: int) -> list[Any]:
        try:
            return super()._run(items, start, opts, batch_size)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[list[int]]:
        """A batch of windows -> each window's tokens (pad dropped)."""
        rate = self.feature_extractor.sampling_rate
        x = self.feature_extractor([r["audio"] for r in rows], sampling_rate=rate)["input_features"]
        x = x.to(self.device, self.model.dtype)  # (B, n_mels, 3000)
        tokens = self.model.generate(x, **{k: v for k, v in opts["generate"].items() if v is not None})  # (B, n)
        pad = self.model.generation_config.get("pad_token_id")
        if self._bar is not None:
            self._bar.update(len(rows))
        return [[t for t in row if t != pad] for row in tokens.tolist()]

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> dict[str, str]:
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
        return {"text": join_windows(texts)}


def join_windows(texts: list[str]) -> str:
    """The windows' texts in order, with a space between two only when neither has whitespace at the junction."""
    out = ""
    for text in texts:
        if out and text and not out[-1].isspace() and not text[0].isspace():
            out += " "
        out += text
    return out


class CTCSpeechRecognitionPipeline(AutomaticSpeechRecognitionPipeline):
    """Transcribe audio with a CTC recognizer (SpeechEncoderForCTC); no tokenizer: the alphabet is in the config.

    Options: `num_beams` (None: 32 when the model has a word n-gram model (`model.language_model`), else 1;
    1 = greedy), `lm_weight` (alpha) and `word_bonus` (beta) of the beam search (defaults: ctc_decode's LM_WEIGHT
    and WORD_BONUS), `progress`.
    Result: {"text": ...} in lower case without punctuation, as the model was trained."""

    def __init__(self, model: Any, tokenizer: Any = None, feature_extractor: Any = None, **kwargs: Any) -> None:
        if tokenizer is None:  # the model's alphabet is its tokenizer
            tokenizer = list(getattr(getattr(model, "config", None), "alphabet", None) or ["<blank>"])
        super().__init__(model, tokenizer, feature_extractor, **kwargs)
        self._decoders: dict[tuple[int, float, float], BeamSearchDecoder] = {}

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["a CTC speech recognizer (SpeechEncoderForCTC)"],
            lambda m: hasattr(m, "ctc_head") and hasattr(getattr(m, "config", None), "alphabet"),
            "load one with lmforge.AutoModelForCTC.from_pretrained",
        )

    def _options(
        self,
        num_beams: int | None = None,
        lm_weight: float = LM_WEIGHT,
        word_bonus: float = WORD_BONUS,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        lm = getattr(self.model, "language_model", None)
        beams = num_beams if num_beams is not None else (32 if lm is not None else 1)
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
        if beams > 1 and lm is None:
            raise ValueError(
                "num_beams > 1 needs the model's word n-gram model (ngram_lm.json.gz in its folder, as "
                "`lmforge speech train` writes it); use num_beams=1 for greedy decoding"
            )
        return {"beams": beams, "alpha": float(lm_weight), "beta": float(word_bonus), "progress": progress}

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[str]:
        """A batch of windows -> each window's text."""
        c = self.model.config
        features = [log_mel_spectrogram(r["audio"], c.num_mel_bins, n_samples=None)[0] for r in rows]  # (n_mels, T)
        T = max(f.size(1) for f in features)
        x = torch.zeros(len(rows), c.num_mel_bins, T)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, f in enumerate(features):
            x[i, :, : f.size(1)], mask[i, : f.size(1)] = f, 1
        with torch.no_grad():
            out = self.model(x.to(self.device, self.model.dtype), mask.to(self.device))
        log_probs = out.logits.float().log_softmax(-1).cpu().numpy()  # (B, T', V)
        texts = []
        for i, n in enumerate(out.output_lengths.tolist()):
            if opts["beams"] == 1:
                texts.append(greedy_decode(log_probs[i, :n], c.alphabet))
            else:
                texts.append(self._decoder(opts).decode(log_probs[i, :n]))
        if self._bar is not None:
            self._bar.update(len(rows))
        return texts

    def _decoder(self, opts: dict[str, Any]) -> BeamSearchDecoder:
        key = (opts["beams"], opts["alpha"], opts["beta"])
        if key not in self._decoders:
            self._decoders[key] = BeamSearchDecoder(
                self.model.config.alphabet, self.model.language_model, opts["alpha"], opts["beta"], opts["beams"]
            )
        return self._decoders[key]

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> dict[str, str]:
        return {"text": " ".join(t for t in outputs if t)}
