"""Audio in and Whisper's log-Mel features: files read as 16 kHz mono (soundfile + soxr), bad files refused with
messages that name the file and the fix, and features equal to transformers' WhisperFeatureExtractor (the oracle)
within 1e-5 on sweeps, noise, different lengths and batches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor as HFWhisperFeatureExtractor  # test-only oracle

from lmforge.speech import (
    WhisperFeatureExtractor,
    load_audio,
    log_mel_spectrogram,
    mel_filterbank,
    resample,
)

SR = 16000


def sweep(seconds: float, sr: int = SR, f0: float = 100.0, f1: float = 7000.0) -> np.ndarray:
    """A linear chirp from f0 to f1 Hz: energy in every Mel band in turn."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)
    return (0.5 * np.sin(phase)).astype(np.float32)


def noise(seconds: float, seed: int, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def oracle() -> HFWhisperFeatureExtractor:
    return HFWhisperFeatureExtractor()


def test_mel_filterbank_equals_transformers(oracle: HFWhisperFeatureExtractor) -> None:
    ours = mel_filterbank(80, 400, SR).numpy()
    assert ours.shape == (201, 80)
    np.testing.assert_allclose(ours, oracle.mel_filters, rtol=1e-5, atol=1e-8)
    assert mel_filterbank(128, 400, SR).shape == (201, 128)  # large-v3's 128 bins


@pytest.mark.parametrize(
    "clip",
    [
        sweep(7.0),
        noise(3.0, 0),
        noise(35.0, 1, scale=1.0),  # longer than 30 s: cut
        sweep(30.0, f0=50, f1=8000) + noise(30.0, 2, 0.01),  # exactly 30 s
        np.concatenate([np.zeros(SR, np.float32), sweep(0.5)]),  # silence then sound: the 80 dB floor matters
        sweep(0.01),  # 160 samples: one hop
    ],
    ids=["sweep-7s", "noise-3s", "noise-35s", "sweep+noise-30s", "silence-then-sweep", "one-hop"],
)
def test_features_equal_transformers(oracle: HFWhisperFeatureExtractor, clip: np.ndarray) -> None:
    expected = oracle(clip, sampling_rate=SR, return_tensors="pt").input_features
    got = WhisperFeatureExtractor()(clip, sampling_rate=SR)["input_features"]
    assert got.shape == expected.shape == (1, 80, 3000)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float(got.std()) > 0.01  # not a constant (the comparison would then be empty)


def test_batched_features_equal_one_by_one_and_transformers(oracle: HFWhisperFeatureExtractor) -> None:
    clips = [sweep(7.0), noise(3.0, 0), noise(35.0, 1, 1.0), sweep(12.0, f0=300, f1=3000)]
    expected = oracle(clips, sampling_rate=SR, return_tensors="pt").input_features
    got = WhisperFeatureExtractor()(clips, sampling_rate=SR)["input_features"]
    assert got.shape == (4, 80, 3000)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # each row's clamp floor is its own maximum - 8, so a row does not depend on the others
    for i, clip in enumerate(clips):
        torch.testing.assert_close(got[i : i + 1], log_mel_spectrogram(clip), rtol=0, atol=1e-6)
    # a (B, N) array is a batch too
    same = np.stack([noise(2.0, 5), noise(2.0, 6)])
    torch.testing.assert_close(
        log_mel_spectrogram(same),
        oracle(list(same), sampling_rate=SR, return_tensors="pt").input_features,
        atol=1e-5,
        rtol=0,
    )


def test_unpadded_features() -> None:
    """n_samples=None keeps the longest clip's length (no 30-s padding): its frames equal the padded run's first."""
    clip = sweep(2.0)
    full = log_mel_spectrogram(clip)  # (1, 80, 3000)
    short = log_mel_spectrogram([clip, clip[:8000]], n_samples=None)  # (2, 80, 200)
    assert short.shape == (2, 80, 200)
    # same spectrum where the frames see the same samples; the floor (max - 8) is the same clip's
    torch.testing.assert_close(short[0, :, :190], full[0, :, :190], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="100 samples are too few for a window of 400"):
        log_mel_spectrogram(clip[:100], n_samples=None)


def test_numpy_output_and_normalize(oracle: HFWhisperFeatureExtractor) -> None:
    clip = sweep(4.0) + 0.2
    ours = WhisperFeatureExtractor()(clip, sampling_rate=SR, return_tensors="np", do_normalize=True)["input_features"]
    theirs = oracle(clip, sampling_rate=SR, return_tensors="np", do_normalize=True).input_features
    assert isinstance(ours, np.ndarray)
    # normalising sums 64,000 float32 samples, in an order that depends on the thread count (and differs from
    # numpy's), and log10 of the weakest Mel bins magnifies that rounding: seen 2e-5 with 2 threads. Whisper's
    # own features (no normalising) are held to 1e-5 in the tests above.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_wrong_sampling_rate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sampled at 8000 Hz but this feature extractor expects 16000 Hz; resample"):
        WhisperFeatureExtractor()(sweep(1.0, sr=8000), sampling_rate=8000)


def test_preprocessor_config_round_trip_with_transformers(tmp_path, oracle: HFWhisperFeatureExtractor) -> None:
    ours = WhisperFeatureExtractor()
    ours.save_pretrained(tmp_path / "ours")
    theirs = HFWhisperFeatureExtractor.from_pretrained(tmp_path / "ours")
    assert (theirs.feature_size, theirs.n_samples, theirs.nb_max_frames) == (80, 480000, 3000)
    clip = noise(2.0, 3)
    torch.testing.assert_close(
        theirs(clip, sampling_rate=SR, return_tensors="pt").input_features,
        ours(clip, sampling_rate=SR)["input_features"],
        rtol=0,
        atol=1e-5,
    )
    # transformers' file (128 Mel bins, as large-v3 uses) read by lmforge
    HFWhisperFeatureExtractor(feature_size=128).save_pretrained(tmp_path / "theirs")
    loaded = WhisperFeatureExtractor.from_pretrained(tmp_path / "theirs")
    assert loaded.feature_size == 128
    assert loaded(clip, sampling_rate=SR)["input_features"].shape == (1, 128, 3000)
    saved = json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "WhisperFeatureExtractor" and saved["nb_max_frames"] == 3000
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json"):
        WhisperFeatureExtractor.from_pretrained(tmp_path)


# ---- reading files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_load_audio_formats_mono_and_resampling(tmp_path, fmt: str) -> None:
    clip = sweep(1.5, sr=44100, f0=200, f1=5000)
    stereo = np.stack([clip, 0.5 * clip], axis=1)  # (frames, 2)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, stereo, 44100, format=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - int(1.5 * SR)) <= 1
    if fmt in ("WAV", "FLAC"):  # lossless: the mono mix resampled must equal soxr on the mean of the channels
        expected = resample(stereo.mean(axis=1).astype(np.float32), 44100, SR)
        np.testing.assert_allclose(audio, expected, atol=1e-4)
    # the mix is 0.75 x the chirp; its peak survives resampling (the chirp stays under 8 kHz)
    assert 0.3 < np.abs(audio).max() < 0.45


def test_load_audio_at_16k_is_the_samples(tmp_path) -> None:
    clip = noise(1.0, 4, 0.3)
    sf.write(tmp_path / "a.wav", clip, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), clip)
    assert len(load_audio(tmp_path / "a.wav", sampling_rate=8000)) == 8000


def test_bad_audio_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"audio file '.*nope.wav' does not exist"):
        load_audio(tmp_path / "nope.wav")
    text = tmp_path / "notes.wav"
    text.write_text("this is a text file, not audio\n")
    with pytest.raises(ValueError, match=r"cannot read '.*notes.wav' as audio .*ffmpeg -i INPUT"):
        load_audio(text)
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.wav' as audio \(the file is empty \(0 bytes\)\)"):
        load_audio(empty_file)
    no_frames = tmp_path / "zero.wav"
    sf.write(no_frames, np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match=r"zero.wav' has no audio samples \(0 frames\)"):
        load_audio(no_frames)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match=r"silent.wav' is silent: all 16000 samples are 0"):
        load_audio(silent)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_audio(tmp_path)


def test_missing_speech_extra_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf.write(tmp_path / "a.wav", sweep(0.5), SR)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"needs the 'soundfile' package: install the speech extra: pip install"):
        load_audio(tmp_path / "a.wav")
    monkeypatch.setitem(sys.modules, "soxr", None)
    with pytest.raises(ImportError, match="needs the 'soxr' package"):
        resample(sweep(0.5), SR, 8000)
