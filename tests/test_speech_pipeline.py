"""pipeline("automatic-speech-recognition") and `lmforge transcribe` on a tiny random Whisper with WAV files written
in the test: texts equal to transformers' generate + WhisperTokenizer on the same audio (the oracle), files, arrays
and dicts, batches, long audio cut into 30-s windows, and the bad inputs (missing file, a text file named .wav, a
0-length WAV, a silent file, wrong sampling rates) as one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import save_tiny_whisper
from test_whisper import clear_generate
from transformers import WhisperFeatureExtractor as HFWhisperFeatureExtractor  # test-only oracles
from transformers import WhisperForConditionalGeneration as HFWhisper
from transformers import WhisperTokenizer as HFWhisperTokenizer

from lmforge import WhisperForConditionalGeneration, pipeline
from lmforge.cli import main
from lmforge.pipelines.speech_recognition import AutomaticSpeechRecognitionPipeline, join_windows

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 16000


def clip(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Noise under a chirp: something for the random model to transcribe differently per clip."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t * (1 + t))
    return (chirp + 0.1 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("asr") / "tiny")


@pytest.fixture(scope="module")
def wavs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wavs")
    files = {
        "a": (clip(3.0, 1), SR),
        "b": (clip(7.5, 2, sr=44100), 44100),  # resampled on reading
        "long": (clip(65.0, 3), SR),  # three windows: 30 + 30 + 5 s
    }
    out = {}
    for name, (samples, sr) in files.items():
        sf.write(root / f"{name}.wav", samples, sr, subtype="FLOAT")
        out[name] = root / f"{name}.wav"
    (root / "notes.wav").write_text("not audio, just text\n")
    out["text"] = root / "notes.wav"
    sf.write(root / "empty.wav", np.zeros(0, np.float32), SR)
    out["empty"] = root / "empty.wav"
    sf.write(root / "silent.wav", np.zeros(SR, np.float32), SR)
    out["silent"] = root / "silent.wav"
    return out


def oracle_texts(directory: Path, audios: list[np.ndarray], **generate: object) -> list[str]:
    """transformers: features, Whisper generate and the tokenizer's text, window by window (after checking that no
    choice lmforge makes on these features is a near tie, so that the two agree on any machine)."""
    model = HFWhisper.from_pretrained(directory).eval()
    tok = HFWhisperTokenizer.from_pretrained(directory)
    x = HFWhisperFeatureExtractor.from_pretrained(directory)(audios, sampling_rate=SR, return_tensors="pt")
    clear_generate(
        WhisperForConditionalGeneration.from_pretrained(directory), x.input_features, max_new_tokens=20, **generate
    )
    tokens = model.generate(x.input_features, max_new_tokens=20, **generate)
    return tok.batch_decode(tokens, skip_special_tokens=True)


def test_texts_equal_transformers(tiny: Path, wavs: dict[str, Path]) -> None:
    asr = pipeline("automatic-speech-recognition", model=str(tiny), max_new_tokens=20)
    assert isinstance(asr, AutomaticSpeechRecognitionPipeline)
    a = sf.read(wavs["a"], dtype="float32")[0]
    expected = oracle_texts(tiny, [a, clip(12.0, 4)])
    assert asr(str(wavs["a"])) == {"text": expected[0]}
    assert asr({"raw": a, "sampling_rate": SR}) == {"text": expected[0]}
    assert asr({"array": torch.from_numpy(a), "sampling_rate": SR})["text"] == expected[0]
    assert asr([a, clip(12.0, 4)], batch_size=2) == [{"text": t} for t in expected]
    assert expected[0] != expected[1] and expected[0].strip()
    # language and beam search go to generate as in transformers
    beams = oracle_texts(tiny, [a], language="de", num_beams=2)
    assert asr(a, language="de", num_beams=2)["text"] == beams[0]
    assert asr(a, generate_kwargs={"language": "de", "num_beams": 2})["text"] == beams[0]


def test_resampled_file_and_dict_agree(tiny: Path, wavs: dict[str, Path]) -> None:
    asr = pipeline("automatic-speech-recognition", model=tiny, max_new_tokens=20)
    raw, rate = sf.read(wavs["b"], dtype="float32")
    assert rate == 44100
    from_file = asr(wavs["b"])
    assert from_file == asr({"raw": raw, "sampling_rate": rate})
    stereo = np.stack([raw, raw], axis=1)  # (frames, 2): mixed to mono
    assert asr({"raw": stereo, "sampling_rate": rate}) == from_file


def test_long_audio_is_windowed_and_joined(tiny: Path, wavs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    asr = pipeline("automatic-speech-recognition", model=tiny, max_new_tokens=20, batch_size=2)
    audio = sf.read(wavs["long"], dtype="float32")[0]
    windows = [audio[:480000], audio[480000:960000], audio[960000:]]
    expected = join_windows(oracle_texts(tiny, windows, language="en"))
    got = asr(str(wavs["long"]), language="en")
    assert got == {"text": expected}
    assert "3/3" in capsys.readouterr().err  # the progress bar counted the windows
    assert join_windows([" a", "b", " c ", "d"]) == " a b c d"


def test_bad_inputs(tiny: Path, wavs: dict[str, Path]) -> None:
    asr = pipeline("automatic-speech-recognition", model=tiny, max_new_tokens=5)
    with pytest.raises(FileNotFoundError, match=r"audio file '.*missing.wav' does not exist"):
        asr(str(wavs["a"].parent / "missing.wav"))
    with pytest.raises(ValueError, match=r"cannot read '.*notes.wav' as audio"):
        asr(wavs["text"])
    with pytest.raises(ValueError, match=r"empty.wav' has no audio samples \(0 frames\)"):
        asr(wavs["empty"])
    with pytest.raises(ValueError, match=r"silent.wav' is silent"):
        asr(wavs["silent"])
    with pytest.raises(
        ValueError, match=r"input 1 is a dict with keys \['raw'\]; give the samples as 'raw' or 'array'"
    ):
        asr([clip(1.0, 1), {"raw": clip(1.0, 1)}])
    with pytest.raises(ValueError, match=r"sampling_rate must be a positive integer \(Hz\), got '16k'"):
        asr({"raw": clip(1.0, 1), "sampling_rate": "16k"})
    with pytest.raises(ValueError, match=r"input 0: give samples as floats in \[-1, 1\], not int16"):
        asr(np.ones(SR, dtype=np.int16))
    with pytest.raises(ValueError, match="input 0 has no audio samples"):
        asr(np.zeros(0, np.float32))
    with pytest.raises(TypeError, match="input 0 is a bytes"):
        asr([b"RIFF...."])
    with pytest.raises(TypeError, match="has no option 'return_timestamps'"):
        asr(clip(1.0, 1), return_timestamps=True)
    # the feature extractor itself refuses audio at another rate than its own
    with pytest.raises(ValueError, match="sampled at 8000 Hz but this feature extractor expects 16000 Hz"):
        asr.feature_extractor(clip(1.0, 1, sr=8000), sampling_rate=8000)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", "transcribe", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_transcribe(tiny: Path, wavs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    asr = pipeline("automatic-speech-recognition", model=tiny, max_new_tokens=12)
    # one batch, as the command makes (the same arithmetic, so the same tokens on any machine)
    expected = [r["text"] for r in asr([wavs["a"], wavs["b"]], language="en")]
    alone = asr(wavs["a"], language="en")["text"]
    done = run_cli(str(tiny), str(wavs["a"]), str(wavs["b"]), "--json", "--language", "en", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [{"file": str(wavs[k]), "text": t} for k, t in zip(("a", "b"), expected)]
    one = run_cli(str(tiny), str(wavs["a"]), "--language", "en", "--max-new-tokens", "12")
    assert one.returncode == 0 and one.stdout == alone.strip() + "\n"
    beams = asr(wavs["a"], num_beams=2, language="en")["text"].strip()
    capsys.readouterr()
    args = ["transcribe", str(tiny), str(wavs["a"]), "--num-beams", "2", "--language", "en", "--max-new-tokens", "12"]
    assert main(args) == 0
    assert capsys.readouterr().out == beams + "\n"


def test_cli_transcribe_user_errors(tiny: Path, wavs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    for path, message in (
        (wavs["a"].parent / "missing.wav", "does not exist; check the path"),
        (wavs["text"], "as audio"),
        (wavs["empty"], "has no audio samples (0 frames)"),
    ):
        assert main(["transcribe", str(tiny), str(wavs["a"]), str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmforge transcribe: error: ") and message in err and "\n" not in err
    assert main(["transcribe", str(tiny), str(wavs["a"]), "--language", "xx"]) == 2
    assert "language 'xx' is not one this model knows" in capsys.readouterr().err
    assert main(["transcribe", str(tiny.parent / "nope"), str(wavs["a"])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ten_minute_file_on_the_command_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A long recording (10 minutes: 20 windows) is transcribed window by window, with a progress bar; the text is
    the windows' texts joined (a 2-hour file is 240 windows the same way)."""
    audio = np.concatenate([clip(30.0, seed) for seed in range(20)])  # each window a different sound
    path = tmp_path / "lecture.flac"
    sf.write(path, audio, SR)
    assert main(["transcribe", str(tiny), str(path), "--max-new-tokens", "3", "--batch-size", "8", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "20/20" in err and "window" in err  # the progress bar
    text = json.loads(out)["text"]
    asr = pipeline("automatic-speech-recognition", model=tiny, max_new_tokens=3)
    windows = asr([sf.read(path, dtype="float32")[0][i : i + 480000] for i in range(0, len(audio), 480000)])
    assert text == join_windows([w["text"] for w in windows])
    assert len({w["text"] for w in windows}) > 5


def test_audio_cross_attention_equals_transformers(tiny: Path, wavs: dict[str, Path], tmp_path: Path) -> None:
    """`lmforge attention WHISPER talk.wav`: the decoder's cross-attention over the audio's 20-ms frames, the same
    numbers as transformers' `cross_attentions` for the same prompt and tokens, cut to the audio's 3 s."""
    from lmforge.interpret import audio_cross_attention_maps

    model = WhisperForConditionalGeneration.from_pretrained(tiny)
    tok = lmforge_tokenizer(tiny)
    frames, tokens, maps = audio_cross_attention_maps(model, tok, wavs["a"], target="hello there", language="en")
    target = tok("hello there", add_special_tokens=False)["input_ids"]
    assert len(frames) == 150 and frames[:2] == ["0.00s", "0.02s"] and frames[-1] == "2.98s"
    assert maps.shape == (2, 2, len(target), 150) and len(tokens) == len(target)
    prompt = model.prompt_ids(language="en")[0].tolist()
    x = HFWhisperFeatureExtractor.from_pretrained(tiny)(sf.read(wavs["a"])[0], sampling_rate=SR, return_tensors="pt")
    hf = HFWhisper.from_pretrained(tiny, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(x.input_features, decoder_input_ids=torch.tensor([prompt + target[:-1]]), output_attentions=True)
    expected = torch.stack([a[0, :, len(prompt) - 1 :, :150] for a in out.cross_attentions])
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    assert bool((maps.sum(-1) <= 1 + 1e-5).all())
    png = tmp_path / "audio.png"
    assert main(["attention", str(tiny), str(wavs["a"]), "--out", str(png), "--average-heads"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def lmforge_tokenizer(directory: Path) -> object:
    from lmforge.auto import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
