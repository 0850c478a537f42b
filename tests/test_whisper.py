"""Whisper against transformers (the oracle) on tiny random models built in the test: logits within 1e-5 both ways
(their directory loaded by lmforge, lmforge's saved directory loaded by transformers), the loss, transcription tokens
identical to transformers' `generate` (prompt from generation_config.json, language detection, suppressed tokens,
greedy and beam search, English-only models), the tokenizer's text, and loading from the offline Hugging Face cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import GREEDY_MARGIN, save_tiny_whisper
from safetensors.torch import load_file
from test_seq2seq_generate import GreedyGap, SourceBeamGaps
from transformers import WhisperForConditionalGeneration as HFWhisper  # test-only oracle
from transformers import WhisperTokenizer as HFWhisperTokenizer

import lmforge
from lmforge import (
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    generation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper-en") / "tiny.en", seed=1, multilingual=False)


def features(batch: int, seed: int = 1) -> torch.Tensor:
    """Random log-Mel-like features (B, 80, 3000)."""
    return torch.randn(batch, 80, 3000, generator=torch.Generator().manual_seed(seed))


def clear_generate(model: WhisperForConditionalGeneration, x: torch.Tensor, **options: object) -> torch.Tensor:
    """model.generate(x, **options), after checking that no choice it makes is a near tie (the language detected, each
    greedy token, each beam step: see helpers.GREEDY_MARGIN), so that transformers' other kernels make the same."""
    if options.get("language") is None and model.generation_config.get("lang_to_id"):
        langs = torch.tensor(sorted(model.generation_config["lang_to_id"].values()))
        with torch.no_grad():
            start = torch.full((x.size(0), 1), model.generation_config["decoder_start_token_id"])
            top2 = model(input_features=x, decoder_input_ids=start).logits[:, -1, langs].topk(2).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > GREEDY_MARGIN, "a near tie between two languages"
    K = int(options.get("num_beams", 1))
    gaps = GreedyGap() if K == 1 else SourceBeamGaps(K, 1)
    out = model.generate(x, logits_processors=[gaps], **options)
    assert gaps.gap > GREEDY_MARGIN, f"a near tie ({gaps.gap:.2e}): the comparison could flip on another machine"
    return out


def test_logits_and_loss_equal_transformers_both_ways(tiny: Path, tmp_path: Path) -> None:
    theirs = HFWhisper.from_pretrained(tiny).eval()
    ours = AutoModelForSpeechSeq2Seq.from_pretrained(tiny)
    assert type(ours) is WhisperForConditionalGeneration
    x = features(2)
    dec = torch.tensor([[265, 266, 270, 274, 68, 10, 75], [265, 268, 270, 274, 200, 3, 9]])
    labels = torch.tensor([[266, 270, 274, 68, 10, 75, 264], [268, 270, 274, 200, 3, -100, -100]])
    with torch.no_grad():
        expected = theirs(input_features=x, decoder_input_ids=dec, labels=labels)
        got = ours(input_features=x, decoder_input_ids=dec, labels=labels)
        no_dec = ours(input_features=x, labels=labels)  # labels shifted right behind the start token, as transformers
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(no_dec.loss, theirs(input_features=x, labels=labels).loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=0, atol=1e-5)
    assert float(expected.logits.std()) > 0.5  # weights spread: the comparison is not of near-constants

    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(saved) == set(load_file(tiny / "model.safetensors")) - {"proj_out.weight"}  # tied, not stored
    assert not any(k.endswith("k_proj.bias") for k in saved)  # Whisper has no key bias
    back = HFWhisper.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_features=x, decoder_input_ids=dec).logits, expected.logits, atol=1e-5, rtol=0
        )
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["architectures"] == ["WhisperForConditionalGeneration"]


def test_attention_weights_equal_transformers(tiny: Path) -> None:
    theirs = HFWhisper.from_pretrained(tiny, attn_implementation="eager").eval()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    x, dec = features(1, seed=3), torch.tensor([[265, 266, 270, 274, 68]])
    with torch.no_grad():
        expected = theirs(input_features=x, decoder_input_ids=dec, output_attentions=True)
        got = ours(input_features=x, decoder_input_ids=dec, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        for a, b in zip(getattr(got, name), getattr(expected, name)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert got.cross_attentions[0].shape == (1, 2, 5, 1500)


def test_key_bias_is_zero_and_sinusoids_match(tiny: Path) -> None:
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    C = ours.config.d_model
    for block in ours.model.encoder.layers:
        assert torch.equal(block.attn.qkv.bias[C : 2 * C], torch.zeros(C))
    for block in ours.model.decoder.layers:
        assert torch.equal(block.cross_attn.kv.bias[:C], torch.zeros(C))
    fresh = WhisperForConditionalGeneration(ours.config)  # a new model computes the table the checkpoint stores
    torch.testing.assert_close(
        fresh.model.encoder.embed_positions.weight, ours.model.encoder.embed_positions.weight, rtol=0, atol=1e-4
    )


GENERATE_CASES = [
    {},  # language detected per clip, then transcribe (forced_decoder_ids [[1, None], [2, transcribe]])
    {"language": "en"},
    {"language": "<|de|>", "task": "translate"},
    {"task": "translate"},
    {"num_beams": 3},
    {"num_beams": 2, "language": "zh", "length_penalty": 0.5},
]


@pytest.mark.parametrize("options", GENERATE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "auto")
def test_generate_token_identical_to_transformers(tiny: Path, options: dict) -> None:
    theirs = HFWhisper.from_pretrained(tiny).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    x = features(4)
    expected = theirs.generate(x, max_new_tokens=20, **options)
    got = clear_generate(ours, x, max_new_tokens=20, **options)
    assert got.tolist() == expected.tolist()
    assert len({tuple(r) for r in got.tolist()}) > 1  # the clips are transcribed differently
    uncached = ours.generate(x, max_new_tokens=20, use_cache=False, **options)
    assert uncached.tolist() == got.tolist()


def test_num_return_sequences_gives_the_best_beams(tiny: Path) -> None:
    """transformers' Whisper repeats each clip R times and returns the best beam R times; lmforge returns the R best
    distinct beams, the first of which is transformers' answer."""
    theirs = HFWhisper.from_pretrained(tiny).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    x = features(4)
    best = theirs.generate(x, max_new_tokens=20, num_beams=3).tolist()
    got = clear_generate(ours, x, max_new_tokens=20, num_beams=3, num_return_sequences=2).tolist()
    assert len(got) == 8
    pad = ours.generation_config["pad_token_id"]
    strip = [[t for t in row if t != pad] for row in got]
    assert strip[::2] == [[t for t in row if t != pad] for row in best]
    assert all(a != b for a, b in zip(strip[::2], strip[1::2]))


def test_prompt_and_language_detection(tiny: Path) -> None:
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    ids = json.loads((tiny / "generation_config.json").read_text())
    sot = ids["decoder_start_token_id"]
    transcribe, translate = ids["task_to_id"]["transcribe"], ids["task_to_id"]["translate"]
    no_ts, en = ids["no_timestamps_token_id"], ids["lang_to_id"]["<|en|>"]
    x = features(4)
    detected = ours.detect_language(x).tolist()
    assert set(detected) <= set(ids["lang_to_id"].values()) and len(set(detected)) > 1
    assert ours.prompt_ids(x).tolist() == [[sot, lang, transcribe, no_ts] for lang in detected]
    assert ours.prompt_ids(x[:1], language="en").tolist() == [[sot, en, transcribe, no_ts]]
    assert ours.prompt_ids(x[:1], language="en", task="translate").tolist() == [[sot, en, translate, no_ts]]
    with pytest.raises(ValueError, match=r"language 'xx' is not one this model knows; use a code among \['de', 'en'"):
        ours.generate(x, language="xx")
    with pytest.raises(ValueError, match="task must be one of"):
        ours.generate(x, language="en", task="summarize")
    with pytest.raises(ValueError, match=r"shape \(batch, 80, 3000\) \(30 s\); got \(1, 80, 100\)"):
        ours.generate(torch.zeros(1, 80, 100))


@pytest.mark.parametrize("max_length", [10, 48])
def test_default_length_follows_transformers(tiny: Path, max_length: int) -> None:
    """Without max_new_tokens, generation_config.json's max_length bounds the new tokens plus (most of) the prompt,
    within the decoder's positions, as in transformers."""
    theirs = HFWhisper.from_pretrained(tiny).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    theirs.generation_config.max_length = ours.generation_config["max_length"] = max_length
    x = features(3, seed=8)
    ours.generation_config["begin_suppress_tokens"] = theirs.generation_config.begin_suppress_tokens = None
    ours.generation_config["suppress_tokens"] = [ours.generation_config["eos_token_id"]]  # run to the limit
    theirs.generation_config.suppress_tokens = [ours.generation_config["eos_token_id"]]
    got, expected = clear_generate(ours, x), theirs.generate(x)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] == (max_length if max_length < 44 else 44)


def test_audio_encoded_once(tiny: Path) -> None:
    """Language detection and decoding share one encoder pass (transformers encodes twice); passing encoder_outputs
    to lmforge.generation.generate gives the same tokens as letting it encode."""
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    calls = []
    hook = ours.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = features(2)
    for options in ({}, {"num_beams": 2}):
        calls.clear()
        ours.generate(x, max_new_tokens=5, **options)
        assert len(calls) == 1
    hook.remove()
    prompt = ours.prompt_ids(x, language="en")
    with torch.inference_mode():
        memory = ours.encode(x)
    for options in ({}, {"num_beams": 3}):
        given = generation.generate(
            ours, x, decoder_input_ids=prompt, encoder_outputs=memory, max_new_tokens=6, **options
        )
        assert (
            given.tolist()
            == generation.generate(ours, x, decoder_input_ids=prompt, max_new_tokens=6, **options).tolist()
        )
        assert given[:, :4].tolist() == prompt.tolist()  # generation.generate returns the prompt too


def test_english_only_model(tiny_en: Path) -> None:
    theirs = HFWhisper.from_pretrained(tiny_en).eval()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny_en)
    x = features(3, seed=5)
    g = ours.generation_config
    assert ours.prompt_ids(x).tolist() == [[g["decoder_start_token_id"], g["no_timestamps_token_id"]]] * 3
    for options in ({}, {"num_beams": 2}):
        assert (
            clear_generate(ours, x, max_new_tokens=15, **options).tolist()
            == theirs.generate(x, max_new_tokens=15, **options).tolist()
        )
    with pytest.raises(ValueError, match="English-only Whisper model: it takes no language or task"):
        ours.generate(x, language="en")


def test_prompt_from_an_older_config_json(tiny: Path, tmp_path: Path) -> None:
    """Checkpoints without generation_config.json keep forced_decoder_ids in config.json; transformers falls back to
    them, and so does lmforge."""
    shutil.copytree(tiny, tmp_path / "old")
    (tmp_path / "old" / "generation_config.json").unlink()
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["forced_decoder_ids"] = [[1, 267], [2, 269], [3, 274]]  # <|zh|> <|translate|> <|notimestamps|>
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    ours = WhisperForConditionalGeneration.from_pretrained(tmp_path / "old")
    theirs = HFWhisper.from_pretrained(tmp_path / "old").eval()
    x = features(2, seed=9)
    assert ours.prompt_ids(x).tolist() == [[265, 267, 269, 274]] * 2
    assert clear_generate(ours, x, max_new_tokens=10).tolist() == theirs.generate(x, max_new_tokens=10).tolist()


def test_suppressed_tokens_never_appear(tiny: Path) -> None:
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    g = ours.generation_config
    x = features(4, seed=7)
    free = ours.generate(x, max_new_tokens=20)
    g_saved = dict(g)
    try:
        # ban every token the model chose: it must pick others
        chosen = sorted({t for row in free.tolist() for t in row} - {g["eos_token_id"]})
        g["suppress_tokens"] = list(g["suppress_tokens"]) + chosen
        banned = ours.generate(x, max_new_tokens=20)
        assert not set(chosen) & {t for row in banned.tolist() for t in row}
        g["begin_suppress_tokens"] = [220, g["eos_token_id"], *{row[0] for row in banned.tolist()}]
        first = ours.generate(x, max_new_tokens=5)
        assert not {row[0] for row in first.tolist()} & set(g["begin_suppress_tokens"])
    finally:
        ours.generation_config = g_saved


def test_tokenizer_text_equals_transformers(tiny: Path) -> None:
    ours, theirs = AutoTokenizer.from_pretrained(tiny), HFWhisperTokenizer.from_pretrained(tiny)
    model = WhisperForConditionalGeneration.from_pretrained(tiny)
    tokens = model.generate(features(4), max_new_tokens=20).tolist()
    assert ours.batch_decode(tokens, skip_special_tokens=True) == theirs.batch_decode(tokens, skip_special_tokens=True)
    text = "the cat sat on the mat in the sun"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    prompt = model.prompt_ids(language="en")[0].tolist()
    assert ours.decode(prompt) == "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
    assert ours.decode(prompt, skip_special_tokens=True) == ""
    assert lmforge.WhisperTokenizer is lmforge.Tokenizer


def test_tokenizer_from_legacy_files(tiny: Path, tmp_path: Path) -> None:
    """A Whisper folder without tokenizer.json (vocab.json + merges.txt + added_tokens.json, tokenizer_class
    WhisperTokenizer) reads as GPT-2's byte-level BPE plus the added tokens, as transformers reads it."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, legacy / name)
    vocab = json.loads((tiny / "vocab.json").read_text())
    added = {t["content"]: t["id"] for t in json.loads((tiny / "tokenizer.json").read_text())["added_tokens"]}
    added = {k: v for k, v in added.items() if k not in vocab}
    (legacy / "added_tokens.json").write_text(json.dumps(added))
    special = {"eos_token": "<|endoftext|>", "additional_special_tokens": sorted(added, key=added.get)}
    (legacy / "special_tokens_map.json").write_text(json.dumps(special))
    ours, theirs = AutoTokenizer.from_pretrained(legacy), HFWhisperTokenizer.from_pretrained(legacy)
    tokens = WhisperForConditionalGeneration.from_pretrained(tiny).generate(features(3), max_new_tokens=12).tolist()
    assert ours.batch_decode(tokens, skip_special_tokens=True) == theirs.batch_decode(tokens, skip_special_tokens=True)
    prompt = [added[t] for t in ("<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>")]
    assert ours.decode(prompt + tokens[0], skip_special_tokens=True) == theirs.decode(tokens[0])
    text = "the cat sat in the hat"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_saved_directory_transcribes_the_same_in_transformers(tiny: Path, tmp_path: Path) -> None:
    ours = WhisperForConditionalGeneration.from_pretrained(tiny)
    ours.save_pretrained(tmp_path / "ours", tokenizer=AutoTokenizer.from_pretrained(tiny))
    theirs = HFWhisper.from_pretrained(tmp_path / "ours").eval()
    x = features(2, seed=11)
    assert theirs.generate(x, max_new_tokens=12).tolist() == clear_generate(ours, x, max_new_tokens=12).tolist()
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text())["lang_to_id"]


def put_in_hf_cache(cache: Path, repo_id: str, source: Path, commit: str = "c" * 40) -> None:
    """`source`'s files laid out as huggingface_hub's cache does: blobs/, snapshots/<commit>/ of relative symlinks,
    refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_loads_offline_from_the_hf_cache(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    put_in_hf_cache(cache, "openai/whisper-tiny", tiny)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForSpeechSeq2Seq.from_pretrained("openai/whisper-tiny")
    assert model.generation_config["lang_to_id"]  # generation_config.json read from the snapshot too
    extractor = WhisperFeatureExtractor.from_pretrained("openai/whisper-tiny")
    tokenizer = AutoTokenizer.from_pretrained("openai/whisper-tiny")
    expected = WhisperForConditionalGeneration.from_pretrained(tiny)
    x = features(1, seed=2)
    assert model.generate(x, max_new_tokens=8).tolist() == expected.generate(x, max_new_tokens=8).tolist()
    assert extractor.feature_size == 80 and tokenizer.convert_tokens_to_ids("<|en|>") == 266
    with pytest.raises(FileNotFoundError, match="openai/whisper-small' is not a local directory and is not in the"):
        AutoModelForSpeechSeq2Seq.from_pretrained("openai/whisper-small")


def test_gradients_equal_transformers(tiny: Path) -> None:
    """Training: the loss's gradients equal transformers' (the fused q/k/v gradient is theirs stacked; the key bias,
    which transformers does not have, gets exactly zero: softmax ignores it)."""
    theirs = HFWhisper.from_pretrained(tiny).train()
    ours = WhisperForConditionalGeneration.from_pretrained(tiny).train()
    x = features(2, seed=4)
    labels = torch.tensor([[266, 270, 274, 68, 10, 75, 264], [268, 270, 274, 200, 3, 264, -100]])
    theirs(input_features=x, labels=labels).loss.backward()
    ours(input_features=x, labels=labels).loss.backward()
    hf = dict(theirs.named_parameters())
    C = ours.config.d_model
    enc, dec = ours.model.encoder, ours.model.decoder
    pairs = [
        (enc.conv1.weight.grad, hf["model.encoder.conv1.weight"].grad),
        (enc.layers[0].attn.qkv.weight.grad[:C], hf["model.encoder.layers.0.self_attn.q_proj.weight"].grad),
        (enc.layers[1].attn.qkv.weight.grad[C : 2 * C], hf["model.encoder.layers.1.self_attn.k_proj.weight"].grad),
        (dec.layers[1].cross_attn.kv.weight.grad[C:], hf["model.decoder.layers.1.encoder_attn.v_proj.weight"].grad),
        (dec.embed_tokens.weight.grad, hf["model.decoder.embed_tokens.weight"].grad),
        (dec.embed_positions.weight.grad, hf["model.decoder.embed_positions.weight"].grad),
    ]
    for got, expected in pairs:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert float(expected.abs().max()) > 1e-3  # not an all-zero gradient
    assert enc.embed_positions.weight.grad is None  # the fixed sinusoids are not trained
    torch.testing.assert_close(enc.layers[0].attn.qkv.bias.grad[C : 2 * C], torch.zeros(C), rtol=0, atol=1e-6)


def test_convert_keeps_the_speech_files(tiny: Path, tmp_path: Path) -> None:
    from lmforge.cli import main

    assert main(["convert", str(tiny), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    names = {p.name for p in (tmp_path / "bf16").iterdir()}
    assert {"generation_config.json", "preprocessor_config.json", "tokenizer.json", "model.safetensors"} <= names
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16 and model.generation_config["lang_to_id"]
    assert HFWhisper.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_whisper_model_trunk_equals_transformers(tiny: Path, tmp_path: Path) -> None:
    from transformers import WhisperModel as HFWhisperModel

    ours = lmforge.AutoModel.from_pretrained(tiny)  # the trunk of a WhisperForConditionalGeneration directory
    assert type(ours) is lmforge.WhisperModel
    theirs = HFWhisperModel.from_pretrained(tiny).eval()
    x, dec = features(2, seed=6), torch.tensor([[265, 266, 270, 274, 68], [265, 268, 270, 274, 9]])
    with torch.no_grad():
        got, expected = ours(input_features=x, decoder_input_ids=dec), theirs(input_features=x, decoder_input_ids=dec)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=0, atol=1e-5)
    ours.save_pretrained(tmp_path / "trunk")
    assert not any(k.startswith(("model.", "proj_out")) for k in load_file(tmp_path / "trunk" / "model.safetensors"))
    back = HFWhisperModel.from_pretrained(tmp_path / "trunk").eval()
    with torch.no_grad():
        again = back(input_features=x, decoder_input_ids=dec).last_hidden_state
    torch.testing.assert_close(again, expected.last_hidden_state, rtol=0, atol=1e-5)
    full = WhisperForConditionalGeneration.from_pretrained(tmp_path / "trunk")  # a trunk file read by the head model
    with torch.no_grad():
        logits = full(input_features=x, decoder_input_ids=dec).logits
    torch.testing.assert_close(
        logits, HFWhisper.from_pretrained(tiny)(input_features=x, decoder_input_ids=dec).logits, rtol=0, atol=1e-5
    )
