"""Speech in: reading audio files (`audio`) and Whisper's log-Mel features (`features`).

load_audio(path) -> 16 kHz mono float32 samples
WhisperFeatureExtractor()(samples) -> {"input_features": (B, 80, 3000)}
"""

from lmforge.speech.audio import SAMPLING_RATE, check_samples, decode_audio, load_audio, resample, to_mono
from lmforge.speech.features import (
    PREPROCESSOR_CONFIG,
    WhisperFeatureExtractor,
    log_mel_spectrogram,
    mel_filterbank,
)

__all__ = [
    "PREPROCESSOR_CONFIG",
    "SAMPLING_RATE",
    "WhisperFeatureExtractor",
    "check_samples",
    "decode_audio",
    "load_audio",
    "log_mel_spectrogram",
    "mel_filterbank",
    "resample",
    "to_mono",
]
