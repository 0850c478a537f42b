"""automatic-speech-recognition: audio in, text out, with a Whisper model.

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
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.pipelines.base import Feature, Pipeline, check_model_kind, describe
from lmforge.speech import WhisperFeatureExtractor, check_samples, load_audio, resample, to_mono


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
