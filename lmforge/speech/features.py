"""Whisper's log-Mel features in PyTorch, batched, and a `WhisperFeatureExtractor` that reads and writes
Hugging Face's `preprocessor_config.json`.

    audio (B, N) at 16 kHz --pad with zeros / cut to 30 s = 480,000 samples--> (B, 480000)
        --torch.stft (Hann window 400, hop 160, centred: reflect-padded)--> |X|^2 (B, 201, 3001), last frame dropped
        --80 triangular Slaney-normalised Mel filters over 0-8 kHz--> mel power (B, 80, 3000)
        --log10(max(mel, 1e-10)), clamped to [row max - 8, ...], (x + 4) / 4--> features (B, 80, 3000)

The clamp floor is each example's own maximum - 8 (80 dB of dynamic range), as in Whisper.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.files import atomic_write_text
from lmforge.hub import resolve_model_dir

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# Slaney's Mel scale (as in the Auditory Toolbox and librosa's default): linear below 1 kHz, logarithmic above
_F_SP = 200.0 / 3  # Hz per Mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # = 15
_LOG_STEP = math.log(6.4) / 27.0  # 27 Mels per factor 6.4 above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, hz)


def mel_filterbank(
    n_mels: int = 80, n_fft: int = 400, sampling_rate: int = 16000, f_min: float = 0.0, f_max: float = 8000.0
) -> Tensor:
    """Triangular filters (n_fft // 2 + 1, n_mels), float32, on Slaney's Mel scale with Slaney's area
    normalisation: filter m rises from edge m to its peak at edge m + 1 and falls to edge m + 2 (n_mels + 2 edges
    evenly spaced in Mel between f_min and f_max), then is scaled by 2 / (bandwidth in Hz) so each has equal area."""
    fft_hz = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)  # (F,) frequency of each STFT bin
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    width = np.diff(edges)  # (n_mels + 1,)
    dist = edges[None, :] - fft_hz[:, None]  # (F, n_mels + 2): edge minus bin frequency
    rising = -dist[:, :-2] / width[:-1]  # (F, n_mels): 0 at the lower edge, 1 at the peak
    falling = dist[:, 2:] / width[1:]  # (F, n_mels): 1 at the peak, 0 at the upper edge
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (edges[2:] - edges[:-2])  # Slaney normalisation: equal area per filter
    return torch.from_numpy(filters).float()


def _as_batch(audio: Tensor | np.ndarray | Sequence[Any]) -> list[Tensor]:
    """One clip (N,) or a batch (B, N) / list of clips of any lengths -> a list of float32 1-D tensors."""
    if isinstance(audio, (Tensor, np.ndarray)):
        t = torch.as_tensor(np.asarray(audio) if isinstance(audio, np.ndarray) else audio).float()
        if t.dim() == 1:
            return [t]
        if t.dim() == 2:
            return list(t)
        raise ValueError(f"audio must be (samples,) or (batch, samples), got shape {tuple(t.shape)}")
    clips = list(audio)
    if clips and all(isinstance(x, (int, float)) for x in clips):
        return [torch.tensor(clips, dtype=torch.float32)]
    out = []
    for clip in clips:
        t = torch.as_tensor(np.asarray(clip, dtype=np.float32))
        if t.dim() != 1:
            raise ValueError(f"each clip must be mono, (samples,); got shape {tuple(t.shape)} (mix channels first)")
        out.append(t)
    return out


def pad_or_trim(clips: Sequence[Tensor], n_samples: int) -> Tensor:
    """Clips of any lengths -> (B, n_samples): zeros appended to short clips, long clips cut at n_samples."""
    out = torch.zeros(len(clips), n_samples, dtype=torch.float32)
    for i, clip in enumerate(clips):
        n = min(clip.numel(), n_samples)
        out[i, :n] = clip[:n]
    return out


def log_mel_spectrogram(
    audio: Tensor | np.ndarray | Sequence[Any],
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sampling_rate: int = 16000,
    n_samples: int | None = 480000,
    filters: Tensor | None = None,
) -> Tensor:
    """Whisper's log-Mel features of one clip (N,) or a batch (a (B, N) array or a list of clips): (B, n_mels, T).

    Each clip is padded with zeros or cut to `n_samples` (30 s: T = 3000 frames; None keeps the longest clip's
    length, the others zero-padded to it). `filters` (n_fft // 2 + 1, n_mels) saves rebuilding the filterbank."""
    clips = _as_batch(audio)
    if not clips:
        raise ValueError("no audio given")
    length = n_samples if n_samples is not None else max(c.numel() for c in clips)
    if length <= n_fft // 2:
        raise ValueError(f"{length} samples are too few for a window of {n_fft}; give at least {n_fft // 2 + 1}")
    x = pad_or_trim(clips, length)  # (B, N)
    if filters is None:
        filters = mel_filterbank(n_mels, n_fft, sampling_rate)
    window = torch.hann_window(n_fft)  # periodic, as in Whisper
    spec = torch.stft(x, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True)
    parts = torch.view_as_real(spec)  # (B, F, T + 1, 2): real and imaginary parts
    power = parts[..., 0].square().addcmul_(parts[..., 1], parts[..., 1])  # (B, F, T + 1): |X|^2
    mel = filters.T @ power[..., :-1]  # (B, n_mels, T): the last frame dropped, as Whisper does
    log_spec = mel.clamp_(min=1e-10).log10_()
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0  # (B, 1, 1): 80 dB below each clip's peak
    return torch.maximum(log_spec, floor, out=log_spec).add_(4.0).div_(4.0)


@dataclass
class WhisperFeatureExtractor:
    """transformers' `WhisperFeatureExtractor`: raw 16 kHz mono audio -> `input_features` (B, 80, 3000).

    Fields are `preprocessor_config.json`'s keys; unknown keys are kept in `extra` and written back."""

    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 30
    n_fft: int = 400
    padding_value: float = 0.0
    padding_side: str = "right"
    return_attention_mask: bool = False
    dither: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.padding_value != 0.0 or self.padding_side != "right":
            raise ValueError("only zero padding on the right is supported (padding_value=0.0, padding_side='right')")
        if self.dither != 0.0:
            raise ValueError(f"dither={self.dither} is not supported (features would be random); use dither=0.0")
        self._filters = mel_filterbank(self.feature_size, self.n_fft, self.sampling_rate)

    @property
    def n_samples(self) -> int:
        """Samples per window (30 s = 480,000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Feature frames per window (3000)."""
        return self.n_samples // self.hop_length

    def __call__(
        self,
        raw_speech: Tensor | np.ndarray | Sequence[Any],
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        do_normalize: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """One clip or a batch of mono clips at `sampling_rate` Hz -> {"input_features": (B, 80, 3000)} as a torch
        tensor ("pt") or a numpy array ("np" / None). A rate other than the extractor's is an error (resample with
        `lmforge.speech.resample` first). `do_normalize`: each clip to zero mean and unit variance first."""
        if kwargs:
            raise TypeError(f"WhisperFeatureExtractor got unknown option(s) {sorted(kwargs)}")
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"the audio is sampled at {sampling_rate} Hz but this feature extractor expects {self.sampling_rate} "
                f"Hz; resample it first (lmforge.speech.resample(audio, {sampling_rate}, {self.sampling_rate}), or "
                "load files with lmforge.speech.load_audio, which resamples)"
            )
        clips = _as_batch(raw_speech)
        if do_normalize:
            clips = [(c - c.mean()) / torch.sqrt(c.var(correction=0) + 1e-7) for c in clips]
        features = log_mel_spectrogram(
            clips, self.feature_size, self.n_fft, self.hop_length, self.sampling_rate, self.n_samples, self._filters
        )
        if return_tensors == "pt":
            return {"input_features": features}
        if return_tensors in (None, "np"):
            return {"input_features": features.numpy()}
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {
            **self.extra,
            "feature_extractor_type": "WhisperFeatureExtractor",
            **d,
            "n_samples": self.n_samples,
            "nb_max_frames": self.nb_max_frames,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write preprocessor_config.json (Hugging Face's keys) into `directory`."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WhisperFeatureExtractor:
        d = dict(d)
        kind = d.pop("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise ValueError(f"feature_extractor_type is {kind!r}; lmforge reads WhisperFeatureExtractor only")
        for derived in ("n_samples", "nb_max_frames", "mel_filters"):  # recomputed (older files store the filters)
            d.pop(derived, None)
        names = {"feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value"}
        names |= {"padding_side", "return_attention_mask", "dither"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> WhisperFeatureExtractor:
        """Read preprocessor_config.json from a directory or a model id in the local Hugging Face cache."""
        path = Path(name_or_path)
        if path.is_file():
            directory = path.parent
        elif path.is_dir():
            directory = path
        else:
            directory = resolve_model_dir(name_or_path, **kwargs)
        config = directory / PREPROCESSOR_CONFIG
        if not config.is_file():
            raise FileNotFoundError(
                f"{directory} has no {PREPROCESSOR_CONFIG}; a Whisper model directory needs it (save one with "
                "WhisperFeatureExtractor().save_pretrained(directory))"
            )
        try:
            return cls.from_dict(json.loads(config.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON ({e})") from None
