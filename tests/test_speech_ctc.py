"""The recognizer trained here: espeak-ng corpus builder, CTC model, word n-gram model, beam search, recipe, pipeline
and CLI.

Oracles: PyTorch's own `F.ctc_loss` (the loss, and the CTC probability the beam search sums), hand-computed
Kneser-Ney probabilities and their normalisation, jiwer, soundfile on the written files. The shrunk recipe (a few
dozen clips, a small model, ~20 s) must overfit its training clips: its greedy transcripts of them must be nearly
right, so the whole chain (features, labels, loss, decoding) is checked by what it learns."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from lmforge import pipeline
from lmforge.auto import AutoModelForCTC
from lmforge.cli import main
from lmforge.models.speech_ctc import DEFAULT_ALPHABET, SpeechCTCConfig, SpeechEncoderForCTC, ctc_loss
from lmforge.speech import synth
from lmforge.speech.ctc_decode import BOS, EOS, BeamSearchDecoder, NGramLM, greedy_decode
from lmforge.speech.recipe import error_rates, evaluate_recognizer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is needed: bash scripts/system-packages.sh"
)


def tiny_config(**kw: object) -> SpeechCTCConfig:
    return SpeechCTCConfig(
        **{"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, **kw}
    )


# ---------------------------------------------------------------------------------------------------- the model
def test_logits_do_not_depend_on_the_batch_padding() -> None:
    torch.manual_seed(0)
    model = SpeechEncoderForCTC(tiny_config()).eval()
    a, b = torch.randn(80, 120), torch.randn(80, 77)
    alone = model(b[None]).logits[0]  # (T', V)
    x = torch.zeros(2, 80, 120)
    x[0], x[1, :, :77] = a, b
    x[1, :, 77:] = 5.0  # garbage in the padding must not leak in
    mask = torch.zeros(2, 120, dtype=torch.long)
    mask[0], mask[1, :77] = 1, 1
    out = model(x, mask)
    assert out.output_lengths.tolist() == [40, 26]  # 3x fewer frames, rounded up
    torch.testing.assert_close(out.logits[1, :26], alone, rtol=1e-5, atol=1e-5)


def test_loss_is_pytorch_ctc_per_label_symbol() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20, 28)
    lengths = torch.tensor([20, 15, 12])
    labels = torch.tensor([[3, 4, 4, 5], [7, 1, 8, -100], [9, -100, -100, -100]])
    ours = ctc_loss(logits, lengths, labels)
    per_clip = F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        torch.tensor([3, 4, 4, 5, 7, 1, 8, 9]),
        lengths,
        torch.tensor([4, 3, 1]),
        reduction="none",
    )
    torch.testing.assert_close(ours, per_clip.sum() / 8)


def test_save_and_load_keep_logits_and_language_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SpeechEncoderForCTC(tiny_config()).eval()
    model.language_model = NGramLM.train(["the cat sat", "the dog ran"])
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "lmforge_speech_ctc"
    loaded = AutoModelForCTC.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(1, 80, 50)
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.language_model.log_prob(BOS, "the", "cat") == model.language_model.log_prob(BOS, "the", "cat")


def test_bad_inputs_are_named() -> None:
    model = SpeechEncoderForCTC(tiny_config(max_source_positions=10))
    with pytest.raises(ValueError, match=r"\(batch, 80, frames\)"):
        model(torch.zeros(1, 40, 30))
    with pytest.raises(ValueError, match="max_source_positions"):
        model(torch.zeros(1, 80, 31))  # 11 positions
    with pytest.raises(ValueError, match="alphabet must start"):
        SpeechCTCConfig(alphabet=["a", "b"])


# ---------------------------------------------------------------------------------------------------- decoding
def test_greedy_merges_repeats_and_drops_blanks() -> None:
    alphabet = DEFAULT_ALPHABET
    path = ["c", "c", "<blank>", "a", "t", " ", " ", "<blank>", "s", "o", "<blank>", "o", "n"]
    scores = np.full((len(path), len(alphabet)), -10.0)
    for t, s in enumerate(path):
        scores[t, alphabet.index(s)] = 0.0
    assert greedy_decode(scores, alphabet) == "cat soon"


def test_kneser_ney_by_hand_and_normalised() -> None:
    lm = NGramLM.train(["a b", "a c", "b c"], discount=0.5)
    # P(b | <s> a): c(<s> a b) = 1 of c(<s> a .) = 2, two types after (<s>, a); lower order P2(b | a):
    # continuation counts N1+(. a b) = 1, N1+(. a .) = 2, N1+(a .) = 2 types; P1(b) = N1+(. b) / N1+(. .)
    # P1(b): b follows 2 distinct words (<s>, a) of 7 distinct bigrams; 1% spread over a b c </s> and an unseen word
    p1_b = 0.99 * 2 / 7 + 0.01 / 5
    p2 = (max(1 - 0.5, 0) + 0.5 * 2 * p1_b) / 2
    p3 = (max(1 - 0.5, 0) + 0.5 * 2 * p2) / 2
    assert math.isclose(lm.log_prob(BOS, "a", "b"), math.log(p3), rel_tol=1e-12)
    for context in [(BOS, BOS), (BOS, "a"), ("a", "b"), ("zz", "c"), ("b", "zz")]:
        total = sum(math.exp(lm.log_prob(*context, w)) for w in [*lm.vocab])
        assert total == pytest.approx(1.0, abs=0.011)  # the uniform 1% share also covers unseen words
    assert lm.perplexity(["a b"]) < lm.perplexity(["c a"])


def _ctc_text_log_prob(log_probs: np.ndarray, text: str | list[str], alphabet: list[str]) -> float:
    """log P(text) under CTC (PyTorch's), `text` a string of letters or a list of symbols."""
    target = torch.tensor([alphabet.index(c) for c in text])
    lp = torch.from_numpy(log_probs)[:, None, :]
    return -float(F.ctc_loss(lp, target[None], torch.tensor([len(lp)]), torch.tensor([len(target)]), reduction="sum"))


def test_beam_search_finds_the_most_probable_lexicon_text() -> None:
    """With the LM switched off (alpha = beta = 0) and a wide beam, the answer is the text of the lexicon with the
    highest CTC probability, found by brute force with PyTorch's CTC."""
    alphabet = [DEFAULT_ALPHABET[0], " ", "a", "b"]
    words = ["a", "b", "ab", "ba", "aa"]
    lm = NGramLM.train(words)
    decoder = BeamSearchDecoder(alphabet, lm, alpha=0.0, beta=0.0, beam_width=64, prune=-1e9)
    rng = np.random.default_rng(0)
    for _ in range(5):
        log_probs = torch.randn(6, 4, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        log_probs = log_probs.mul(2).log_softmax(-1).double().numpy()
        texts = [" ".join(p) for n in (1, 2, 3) for p in itertools.product(words, repeat=n)]
        best = max(texts, key=lambda t: _ctc_text_log_prob(log_probs, t, alphabet))
        assert decoder.decode(log_probs) == best


def test_phoneme_beam_search_segments_words_by_the_lexicon() -> None:
    """Phonemes have no word separator: the lexicon cuts the stream into words. With the LM off, the answer is a
    word sequence whose phonemes have the highest CTC probability (brute force with PyTorch's CTC; homophones and
    other segmentations of the same phonemes tie)."""
    alphabet = [DEFAULT_ALPHABET[0], "a", "b", "c"]
    lexicon = {"x": [("a",)], "y": [("b", "c")], "z": [("a", "b"), ("a", "b", "b")], "w": [("c",)]}
    lm = NGramLM.train(lexicon)
    lm.pronunciations = lexicon
    decoder = BeamSearchDecoder(alphabet, lm, alpha=0.0, beta=0.0, beam_width=64, prune=-1e9)
    rng = np.random.default_rng(1)
    for _ in range(5):
        log_probs = torch.from_numpy(rng.normal(size=(7, 4)) * 2).log_softmax(-1).numpy()
        # every symbol string of up to 7 symbols (the frames) that the lexicon can cut into words
        sequences = [
            " ".join(seq)
            for n in range(1, 8)
            for seq in itertools.product("abc", repeat=n)
            if _segmentable(seq, lexicon)
        ]
        best = max(_ctc_text_log_prob(log_probs, s.split(), alphabet) for s in sequences)
        words = decoder.decode(log_probs).split()
        spelled = [
            " ".join(p for part in pron for p in part) for pron in itertools.product(*(lexicon[w] for w in words))
        ]
        assert max(_ctc_text_log_prob(log_probs, s.split(), alphabet) for s in spelled) == pytest.approx(best)


def _segmentable(seq: tuple[str, ...], lexicon: dict[str, list[tuple[str, ...]]]) -> bool:
    prons = {p for ps in lexicon.values() for p in ps}
    ok = [True] + [False] * len(seq)  # ok[i]: seq[:i] is a sequence of words
    for i in range(1, len(seq) + 1):
        ok[i] = any(ok[i - len(p)] and tuple(seq[i - len(p) : i]) == p for p in prons if len(p) <= i)
    return ok[-1]


@needs_espeak
def test_phonemize_is_espeaks_ipa_without_stress() -> None:
    words = synth.phonemize(["The LORD's house", "in the beginning"], "en-us")
    assert words[0] == [["ð", "ə"], ["l", "ɔːɹ", "d", "z"], ["h", "aʊ", "s"]]
    assert sum(words[1], []) == ["ɪ", "n", "ð", "ə", "b", "ɪ", "ɡ", "ɪ", "n", "ɪ", "ŋ"]  # "in the": one word


def test_language_model_corrects_spelling_from_sound() -> None:
    """Acoustics slightly prefer "the kat", the lexicon has no "kat": the search returns "the cat"."""
    alphabet = DEFAULT_ALPHABET
    lm = NGramLM.train(["the cat sat", "the cat ran", "a dog sat"])
    spoken = "the kat"
    scores = np.full((len(spoken) * 2, len(alphabet)), -6.0)
    for t, ch in enumerate(spoken):
        scores[2 * t, alphabet.index(ch)] = -0.1
        scores[2 * t + 1, 0] = -0.1
    scores[8, alphabet.index("c")] = -0.7  # "c" a little less likely than "k"
    log_probs = torch.from_numpy(scores).log_softmax(-1).numpy()
    assert greedy_decode(log_probs, alphabet) == "the kat"
    assert BeamSearchDecoder(alphabet, lm).decode(log_probs) == "the cat"


def test_error_rates_are_jiwer_on_normalised_text() -> None:
    rates = error_rates(["The LORD's house, O Israel!"], ["the lords house o israel"])
    assert rates == {"wer": 0.0, "cer": 0.0}
    rates = error_rates(["one two three four"], ["one too three"])
    assert rates["wer"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- corpus
def test_text_sentences_and_normalisation() -> None:
    assert synth.normalize_text("And God said, Let there be light: and there was light.") == (
        "and god said let there be light and there was light"
    )
    sentences = synth.text_sentences("bible")
    norms = [synth.normalize_text(s) for s in sentences]
    assert len(norms) == len(set(norms)) > 20000
    assert all(4 <= len(n.split()) <= 12 for n in norms)
    assert not any(ch.isdigit() for s in sentences for ch in s)


def test_missing_espeak_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        synth.synthesize("hello")


@needs_espeak
def test_plan_holds_out_sentences_and_voices() -> None:
    config = synth.SynthConfig(num_train=300, num_test=40, test_variants=5, seed=3)
    plan = synth.plan_corpus(config, synth.list_variants())
    train_texts = {synth.normalize_text(u.text) for u in plan["train"]}
    test_texts = {synth.normalize_text(u.text) for u in plan["test"]}
    assert len(train_texts) == 300 and len(test_texts) == 40 and not train_texts & test_texts
    train_voices, test_voices = {u.variant for u in plan["train"]}, {u.variant for u in plan["test"]}
    assert len(test_voices) <= 5 and not train_voices & test_voices
    assert synth.plan_corpus(config, synth.list_variants()) == plan  # the seed decides everything
    assert (
        synth.plan_corpus(synth.SynthConfig(num_train=300, num_test=40, test_variants=5, seed=4), synth.list_variants())
        != plan
    )
    with pytest.raises(ValueError, match="unknown espeak-ng voice variant"):
        synth.select_variants(["m3", "nobody"])


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is needed: bash scripts/system-packages.sh")
    out = tmp_path_factory.mktemp("speech") / "corpus"
    code = main(
        ["speech", "synth", "bible", "--out", str(out), "--num-train", "12", "--num-test", "4", "--test-voices", "2",
         "--voices", "m1", "m3", "f2", "f4", "klatt", "Alicia", "--accents", "en-us", "--seed", "1"]
    )  # fmt: skip
    assert code == 0
    # the n-gram model's text: 300 other verses' clauses and the training sentences (the whole Bible's 12,600-word
    # lexicon would take espeak-ng ~25 s per accent); train_recognizer drops any test or dev sentence from it
    texts = synth.text_sentences("bible")[:300] + [r["text"] for r in read_rows(out / "train.jsonl")]
    (out / "lm.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_espeak
def test_synth_writes_audio_and_manifests(corpus: Path) -> None:
    train = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (corpus / "test.jsonl").read_text().splitlines()]
    assert len(train) == 12 and len(test) == 4
    for row in train[:3] + test[:3]:
        info = sf.info(str(corpus / row["audio"]))
        assert info.samplerate == 16000 and info.channels == 1
        assert row["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
        assert 140 <= row["rate"] <= 210 and row["voice"] == f"en-us+{row['variant']}"
        assert set(row) == {"audio", "text", "voice", "accent", "variant", "gender", "rate", "pitch", "duration"}
    assert not {r["variant"] for r in train} & {r["variant"] for r in test}
    # a second run keeps the files (resume) and writes the same manifests
    first = (corpus / test[0]["audio"]).stat().st_mtime_ns
    before = (corpus / "train.jsonl").read_text()
    config = synth.SynthConfig(num_train=12, num_test=4, test_variants=2, accents=("en-us",), seed=1,
                               variants=("m1", "m3", "f2", "f4", "klatt", "Alicia"))  # fmt: skip
    synth.build_corpus(corpus, config)
    assert (corpus / test[0]["audio"]).stat().st_mtime_ns == first
    assert (corpus / "train.jsonl").read_text() == before


def train_tiny(corpus: Path, out: Path, *extra: str) -> Path:
    """`lmforge speech train` shrunk: a 2-layer model overfitting 10 clips in a few hundred steps."""
    code = main(
        ["speech", "train", str(corpus), "--out", str(out), "--d-model", "96", "--layers", "2", "--heads", "2",
         "--ffn", "192", "--max-steps", "300", "--batch-size", "5", "--learning-rate", "3e-3", "--warmup-steps", "30",
         "--eval-steps", "150", "--dev-size", "2", "--dropout", "0", "--lm-text", str(corpus / "lm.txt"), *extra]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(corpus, tmp_path_factory.mktemp("speech") / "phonemes")


@needs_espeak
def test_recipe_learns_its_training_clips(trained: Path, corpus: Path) -> None:
    rows = read_rows(corpus / "train.jsonl")
    config = json.loads((trained / "config.json").read_text())
    assert config["alphabet"][0] == "<blank>" and "ə" in config["alphabet"] and " " not in config["alphabet"]
    curve = read_rows(trained / "metrics.jsonl")
    assert [e["step"] for e in curve if "eval_per" in e][-2:] == [150, 300]  # the learning curve
    result = evaluate_recognizer(trained, corpus / "train.jsonl", limit=10)
    assert result["clips"] == 10 and set(result) >= {"greedy", "beam_lm", "examples"}
    # clips it trained on: phonemes learned (random output is ~100% wrong), and the words found through the lexicon
    assert result["greedy"]["per"] < 0.35
    assert result["beam_lm"]["wer"] < 0.5
    assert set(result["greedy"]["by_variant"]) <= {r["variant"] for r in rows}
    # the lexicon holds espeak-ng's pronunciations; the n-gram model never saw a test or dev sentence
    lm = NGramLM.load(trained)
    assert ("ð", "ə") in lm.pronunciations["the"]
    for row in read_rows(corpus / "test.jsonl"):
        words = [BOS, BOS, *synth.normalize_text(row["text"]).split(), EOS]
        assert not all(g in lm.trigrams for g in zip(words, words[1:], words[2:]))


@needs_espeak
def test_letters_recipe(corpus: Path, tmp_path: Path) -> None:
    """--units letters: the CTC head writes a-z and space, greedy decoding is scored by WER and CER."""
    out = train_tiny(corpus, tmp_path / "letters", "--units", "letters", "--max-steps", "4", "--eval-steps", "4")
    assert json.loads((out / "config.json").read_text())["alphabet"] == DEFAULT_ALPHABET
    assert NGramLM.load(out).pronunciations is None
    result = evaluate_recognizer(out, corpus / "test.jsonl")
    assert set(result["greedy"]) >= {"wer", "cer", "by_accent"} and "per" not in result["greedy"]


@needs_espeak
def test_pipeline_and_cli_transcribe(trained: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = json.loads((corpus / "train.jsonl").read_text().splitlines()[0])
    audio = corpus / row["audio"]
    asr = pipeline("automatic-speech-recognition", model=trained)
    greedy = asr(str(audio), num_beams=1)["text"]
    samples, rate = sf.read(str(audio), dtype="float32")
    assert asr({"raw": samples, "sampling_rate": rate}, num_beams=1)["text"] == greedy
    beam = asr(str(audio))["text"]  # the default: beam search with the folder's n-gram model
    assert set(beam.split()) <= set(asr.model.language_model.vocab)
    assert main(["transcribe", str(trained), str(audio), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(audio), "text": beam}
    assert main(["transcribe", str(trained), str(audio), "--language", "en"]) == 2
    assert "applies to Whisper models" in capsys.readouterr().err
    assert main(["speech", "eval", str(trained), str(corpus / "test.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("greedy: PER ") and "beam_lm: WER " in out and "WER by gender" in out
