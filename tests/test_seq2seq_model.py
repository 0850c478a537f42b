"""Encoder-decoders (lmforge/models/seq2seq.py) against transformers' MarianMTModel and
BartForConditionalGeneration on tiny random configs built here: same logits and loss from the same files,
both ways, with padded batches of different source lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge import AutoModelForSeq2SeqLM, BartForConditionalGeneration, MarianMTModel
from lmforge.constants import IGNORE_INDEX
from lmforge.models.seq2seq import Seq2SeqConfig, Seq2SeqForConditionalGeneration
from lmforge.nn import sinusoidal_table

# fp32 results of the same weights through different kernels (SDPA vs eager, fused vs separate q/k/v)
ATOL = 1e-5
SIZES = dict(vocab_size=61, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
             decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=40, max_position_embeddings=32,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip


def hf_marian() -> transformers.MarianMTModel:
    torch.manual_seed(0)
    config = transformers.MarianConfig(**SIZES, activation_function="swish", scale_embedding=True, pad_token_id=60,
                                       decoder_start_token_id=60, eos_token_id=0)  # fmt: skip
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # transformers initialises it to zeros; make it count
        model.final_logits_bias.normal_()
    return model


def hf_bart() -> transformers.BartForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.BartConfig(**SIZES, activation_function="gelu", pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def batch(pad: int) -> dict[str, torch.Tensor]:
    """Two sources of different lengths (the shorter right-padded) and two targets, padded as labels."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 60, (2, 7), generator=g)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = pad
    labels = torch.randint(3, 60, (2, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


FAMILIES = [(hf_marian, MarianMTModel, "marian"), (hf_bart, BartForConditionalGeneration, "bart")]


@pytest.mark.parametrize(("make_hf", "ours_cls", "model_type"), FAMILIES, ids=["marian", "bart"])
def test_logits_and_loss_match_transformers_both_ways(make_hf, ours_cls, model_type, tmp_path: Path) -> None:
    hf = make_hf()
    hf.save_pretrained(tmp_path / "hf")
    ours = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf")
    assert type(ours) is ours_cls and ours.config.model_type == model_type
    b = batch(hf.config.pad_token_id)
    with torch.no_grad():
        expected = hf(**b)
        got = ours(**b)
        # explicit decoder ids and a decoder padding mask, no labels
        dec = torch.tensor([[hf.config.decoder_start_token_id, 5, 9, 11], [hf.config.decoder_start_token_id, 7, 3, 3]])
        dec_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec,
                  decoder_attention_mask=dec_mask)  # fmt: skip
        expected_dec, got_dec = hf(**kw).logits, ours(**kw).logits
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_dec[dec_mask.bool()], expected_dec[dec_mask.bool()], atol=ATOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == model_type and config["architectures"] == [ours_cls.hf_architecture]
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, expected.logits, atol=ATOL, rtol=0)
    assert torch.equal(back.final_logits_bias, hf.final_logits_bias)


def test_marian_loads_checkpoints_that_store_the_sinusoid_table_and_tied_copies(tmp_path: Path) -> None:
    hf = hf_marian()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "model.encoder.embed_positions.weight" not in state  # transformers 5 omits them
    for stack in ("encoder", "decoder"):  # what older checkpoints hold
        state[f"model.{stack}.embed_positions.weight"] = hf.model.encoder.embed_positions.weight.detach().clone()
        state[f"model.{stack}.embed_tokens.weight"] = state["model.shared.weight"].clone()
    state["lm_head.weight"] = state["model.shared.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = MarianMTModel.from_pretrained(tmp_path)
    b = batch(hf.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, hf(**b).logits, atol=ATOL, rtol=0)
    # Marian's table is [all sines | all cosines], as transformers computes it
    torch.testing.assert_close(
        ours.model.encoder.embed_positions.table, hf.model.encoder.embed_positions.weight, atol=1e-6, rtol=0
    )


def test_marian_config_keeps_layout_keys_of_older_files_and_refuses_separate_embeddings(tmp_path: Path) -> None:
    hf = hf_marian()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    old = {**config, "normalize_before": True, "static_position_embeddings": True}  # ignored by transformers
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    ours = MarianMTModel.from_pretrained(tmp_path)
    assert not ours.config.normalize_before and ours.config.extra["normalize_before"] is True
    b = batch(hf.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, hf(**b).logits, atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text(encoding="utf-8"))["normalize_before"] is True

    separate = {**config, "share_encoder_decoder_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(separate), encoding="utf-8")
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings=False"):
        MarianMTModel.from_pretrained(tmp_path)


def test_interleaved_pre_norm_variant_saves_and_loads_through_the_auto_class(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = Seq2SeqConfig(**{k: v for k, v in SIZES.items() if k != "activation_dropout"}, normalize_before=True)
    model = Seq2SeqForConditionalGeneration(config).eval()
    torch.testing.assert_close(model.model.encoder.embed_positions.table, sinusoidal_table(32, 16))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(loaded) is Seq2SeqForConditionalGeneration and loaded.config.normalize_before
    b = batch(0)
    with torch.no_grad():
        out = model(**b)
        torch.testing.assert_close(
            loaded(**b).logits, out.logits, rtol=1e-5, atol=1e-6
        )  # decode_layout: same weights, rounding may differ
        # decoding one token at a time with the KV cache gives the same logits as the whole sequence
        dec = out.logits.new_zeros(2, 5, dtype=torch.long)
        dec[:, 1:] = b["labels"][:, :-1].clamp(min=0)
        full = model(b["input_ids"], b["attention_mask"], decoder_input_ids=dec).logits
        cache = model.allocate_cache(2, 8)
        memory = out.encoder_last_hidden_state
        steps = [model(attention_mask=b["attention_mask"], decoder_input_ids=dec[:, t : t + 1], encoder_outputs=memory,
                       past_key_values=cache).logits for t in range(5)]  # fmt: skip
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
