"""Audio in: read a sound file as 16 kHz mono float32 samples, with errors that name the file and the fix.

    file (WAV, FLAC, OGG/Vorbis/Opus, MP3: whatever libsndfile reads) --soundfile, 10-s blocks--> (frames, channels)
        --mean over channels--> mono --soxr stream (high quality)--> the wanted sampling rate

Files are decoded block by block, so a long recording never sits in memory at its original rate and channel count
(a 2-hour 44.1 kHz stereo file would be 2.5 GB as float32): only the 16 kHz mono result is kept (460 MB for 2 hours).

`soundfile` (libsndfile, bundled in its wheel) reads; `soxr` resamples. Neither is imported until a file is read,
so the rest of lmforge does not need them (`pip install lmforge[speech]`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

SAMPLING_RATE = 16000  # what Whisper's features and models expect
_INSTALL = "install the speech extra: pip install 'lmforge[speech]' (soundfile and soxr)"
_CONVERT = "convert it to WAV or FLAC, e.g. `ffmpeg -i INPUT -ar 16000 -ac 1 OUTPUT.wav`"


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"reading audio needs the {name!r} package: {_INSTALL}") from None


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample mono audio (N,) from orig_sr to target_sr with soxr's high-quality filter -> float32 (M,)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    soxr = _import("soxr")
    return np.asarray(soxr.resample(audio, orig_sr, target_sr, quality="HQ"), dtype=np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32, the channels averaged."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        return audio.mean(axis=1, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be (samples,) or (samples, channels), got shape {audio.shape}")
    return audio


def check_samples(audio: np.ndarray, what: str) -> np.ndarray:
    """Refuse audio with no samples, or only zeros (nothing to recognise: usually a broken recording or export),
    or with NaN/inf values. `what` names the source in the message."""
    if audio.size == 0:
        raise ValueError(f"{what} has no audio samples (0 frames); record or export it again")
    if not np.isfinite(audio).all():
        raise ValueError(f"{what} holds NaN or infinite samples; the audio is damaged")
    if not np.any(audio):
        raise ValueError(
            f"{what} is silent: all {audio.size} samples are 0, so there is nothing to transcribe; "
            "check the recording (muted input?) or the export"
        )
    return audio


def load_audio(path: str | os.PathLike, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Read a sound file as mono float32 samples in [-1, 1] at `sampling_rate` (Hz): (N,).

    Raises FileNotFoundError for a missing file and ValueError (naming the file and the fix) for a file
    that is not audio libsndfile can read, one with no samples, or one that is silent (all zeros)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; pass an audio file (WAV, FLAC, OGG, MP3)")
    return _read(str(path), repr(str(path)), sampling_rate, path.stat().st_size)


def decode_audio(data: bytes, name: str = "the upload", sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A sound file's bytes (WAV, FLAC, OGG, MP3) as mono float32 samples at `sampling_rate`: (N,), what
    `load_audio` reads from the same file (the server's uploads). ValueError, naming `name`, as load_audio."""
    return _read(io.BytesIO(data), name, sampling_rate, len(data))


def _read(source: Any, name: str, sampling_rate: int, size: int) -> np.ndarray:
    """Decode `source` (a path or a binary file object of `size` bytes) in 10-s blocks, each averaged to mono and
    resampled."""
    sf = _import("soundfile")
    try:
        with sf.SoundFile(source) as f:
            rate = int(f.samplerate)
            stream = (
                None if rate == sampling_rate else _import("soxr").ResampleStream(rate, sampling_rate, 1, quality="HQ")
            )
            pieces = []
            while True:
                block = f.read(10 * rate, dtype="float32", always_2d=True)  # (frames, channels)
                last = len(block) < 10 * rate
                mono = block.mean(axis=1, dtype=np.float32)
                pieces.append(mono if stream is None else stream.resample_chunk(mono, last=last))
                if last:
                    break
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        detail = "the file is empty (0 bytes)" if size == 0 else str(e).strip()
        raise ValueError(
            f"cannot read {name} as audio ({detail}); lmforge reads WAV, FLAC, OGG and MP3 through "
            f"libsndfile: {_CONVERT}"
        ) from None
    return check_samples(np.concatenate(pieces).astype(np.float32, copy=False), name)
