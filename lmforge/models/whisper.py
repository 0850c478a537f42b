"""Whisper (OpenAI's speech recogniser) in one file: transformers' `WhisperForConditionalGeneration` layout.

    log-Mel features (B, 80, 3000) -> conv1 (k3) -> GELU -> conv2 (k3, stride 2) -> GELU -> (B, 1500, C)
        + sinusoidal positions (a fixed table stored in the checkpoint as embed_positions.weight)
        -> pre-norm Transformer blocks -> layer_norm -> memory (B, 1500, C)
    decoder ids (B, T) -> token embedding + learned positions
        -> pre-norm decoder blocks (causal self-attention, cross-attention over memory, feed-forward) -> layer_norm
        -> proj_out (tied to the token embedding) -> logits (B, T, V)

What differs from the text encoder-decoders of seq2seq.py: the encoder reads features through two convolutions and
takes exactly 3000 frames (30 s); attention has no key bias (a key bias shifts all of a query's scores equally, which
softmax ignores, so lmforge keeps the fused bias with its key part at zero and the checkpoint omits it); both stacks
are pre-norm with a final LayerNorm.

Transcription (`generate`) follows transformers' Whisper: the decoder starts from the prompt
`<|startoftranscript|> <|lang|> <|task|> <|notimestamps|>` (the language detected from the audio when not given, for
multilingual models), with `suppress_tokens` banned at every step and `begin_suppress_tokens` at the first; these
settings come from the checkpoint's generation_config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import generation
from lmforge.config import PretrainedConfig
from lmforge.files import atomic_write_text
from lmforge.hub import KeyMap, KeyRule, resolve_model_dir
from lmforge.models.base import PreTrainedModel, init_normal
from lmforge.models.outputs import Seq2SeqLMOutput, Seq2SeqModelOutput
from lmforge.models.registry import register
from lmforge.models.seq2seq import shift_tokens_right
from lmforge.nn import AttentionMask, DecoderBlock, KVCache, LearnedPositionalEmbedding, TransformerBlock, layer_norm
from lmforge.nn.inference import apply
from lmforge.nn.layers import dropout, run_blocks
from lmforge.nn.losses import masked_lm_items, masked_lm_loss

GENERATION_CONFIG = "generation_config.json"
TASKS = ("transcribe", "translate")


@dataclass
class WhisperConfig(PretrainedConfig):
    """Whisper's config.json (transformers' keys; the defaults are whisper-tiny's shape)."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    max_source_positions: int = 1500  # encoder positions: 3000 feature frames after the stride-2 convolution
    max_target_positions: int = 448  # decoder positions
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = 50257
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = field(default_factory=lambda: [220, 50256])
    tie_word_embeddings: bool = True
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    is_encoder_decoder: ClassVar[bool] = True  # generation encodes the audio once, then decodes
    model_type: ClassVar[str] = "whisper"
    model_types: ClassVar[tuple[str, ...]] = ("whisper",)
    default_architecture: ClassVar[str] = "WhisperForConditionalGeneration"
    # variants lmforge does not implement: untied output, dropout inside the feed-forward
    unsupported: ClassVar[dict[str, Any]] = {"tie_word_embeddings": True, "activation_dropout": 0.0}

    def __post_init__(self) -> None:
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by the number of heads ({heads})")
        self._check_labels()

    @property
    def num_frames(self) -> int:
        """Feature frames the encoder takes: 2 x max_source_positions (3000 = 30 s)."""
        return 2 * self.max_source_positions

    def to_dict(self, architecture: tuple[str, str] | None = None) -> dict[str, Any]:
        architecture = architecture or (self.default_architecture, self.default_architecture)
        fields_ = {k: v for k, v in vars(self).items() if k != "extra"}
        return {
            **self.extra,
            "model_type": self.model_type,
            "architectures": [architecture[0]],
            "is_encoder_decoder": True,
            **fields_,
        }


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's encoder position table (length, channels) = [sin(p * w_i) | cos(p * w_i)] with timescales
    1 / w_i spread geometrically from 1 to max_timescale over the channels // 2 columns (both ends included)."""
    half = channels // 2
    w = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half, dtype=torch.float64))  # (half,)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * w[None, :]  # (length, half)
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


class WhisperEncoder(nn.Module):
    """Log-Mel features (B, n_mels, 3000) -> memory (B, 1500, C)."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)  # fixed sinusoids, not trained
        self.embed_positions.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.d_model,
                c.encoder_attention_heads,
                c.encoder_ffn_dim,
                c.activation_function,
                dropout=c.dropout,
                attn_dropout=c.attention_dropout,
                norm_position="pre",
            )
            for _ in range(c.encoder_layers)
        )
        self.layer_norm = layer_norm(c.d_model)

    def reset_positions(self) -> None:
        with torch.no_grad():
            self.embed_positions.weight.copy_(whisper_sinusoids(*self.embed_positions.weight.shape))

    def forward(self, input_features: Tensor, output_attentions: bool = False) -> tuple[Tensor, list[Tensor]]:
        """(B, n_mels, 3000) -> memory (B, 1500, C), and each layer's (B, H, 1500, 1500) attention weights if
        output_attentions (else an empty list)."""
        c = self.config
        if input_features.dim() != 3 or input_features.shape[1:] != (c.num_mel_bins, c.num_frames):
            raise ValueError(
                f"Whisper takes log-Mel features of shape (batch, {c.num_mel_bins}, {c.num_frames}) (30 s); got "
                f"{tuple(input_features.shape)}. Make them with lmforge.speech.WhisperFeatureExtractor, which pads or "
                "cuts audio to 30 s"
            )
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))  # (B, C, 3000)
        x = F.gelu(self.conv2(x))  # (B, C, 1500)
        x = x.transpose(1, 2).contiguous() + self.embed_positions.weight  # (B, 1500, C), rows contiguous
        x = dropout(x, c.dropout, self.training)
        x, _, attentions = run_blocks(self.layers, x, AttentionMask(), output_attentions=output_attentions)
        return apply(self.layer_norm, x), attentions


class WhisperDecoder(nn.Module):
    """Token ids (B, T) attending over memory (B, S, C) -> hidden states (B, T, C)."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.embed_positions = LearnedPositionalEmbedding(c.max_target_positions, c.d_model)
        self.layers = nn.ModuleList(
            DecoderBlock(
                c.d_model,
                c.decoder_attention_heads,
                c.decoder_ffn_dim,
                c.activation_function,
                dropout=c.dropout,
                attn_dropout=c.attention_dropout,
                norm_position="pre",
            )
            for _ in range(c.decoder_layers)
        )
        self.layer_norm = layer_norm(c.d_model)

    def forward(
        self,
        input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """ids (B, T), memory (B, S, C) -> (B, T, C), and if output_attentions each layer's self-attention
        (B, H, T, past + T) and cross-attention (B, H, T, S) weights (else empty lists)."""
        T = input_ids.size(1)
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_target_positions:
            raise ValueError(
                f"{past + T} decoder tokens exceed Whisper's {self.config.max_target_positions} positions; "
                "lower max_new_tokens"
            )
        positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions)  # (B, T, C)
        x = dropout(x, self.config.dropout, self.training)
        mask = AttentionMask.build(attention_mask, T, past + T, causal=True)
        memory_mask = AttentionMask()  # every audio frame is real (the features are padded with silence)
        self_attentions: list[Tensor] = []
        cross_attentions: list[Tensor] = []
        for i, block in enumerate(self.layers):
            x, self_w, cross_w = block(x, memory, mask, memory_mask, cache, i, output_attentions)
            if output_attentions:
                self_attentions.append(self_w)
                cross_attentions.append(cross_w)
        if cache is not None:
            cache.advance(T)
        return apply(self.layer_norm, x), self_attentions, cross_attentions


def _attention_rules(ours: str, theirs: str) -> list[KeyRule]:
    """Separate q/k/v projections <-> the fused `qkv` (k has no bias in the checkpoint), and the output projection."""
    return [
        KeyRule(f"{ours}.qkv.weight", f"{theirs}.{{part}}_proj.weight", parts=("q", "k", "v")),
        KeyRule(f"{ours}.qkv.bias", f"{theirs}.{{part}}_proj.bias", parts=("q", "k", "v"), absent=("k",)),
        *[KeyRule(f"{ours}.proj.{w}", f"{theirs}.out_proj.{w}") for w in ("weight", "bias")],
    ]


def _rename(ours: str, theirs: str) -> list[KeyRule]:
    return [KeyRule(f"{ours}.{w}", f"{theirs}.{w}") for w in ("weight", "bias")]


_ENC, _DEC = "model.encoder.layers.{i}", "model.decoder.layers.{i}"
# lmforge's names <-> transformers' WhisperForConditionalGeneration
WHISPER_KEYS: list[KeyRule] = [
    *_rename("model.encoder.conv1", "model.encoder.conv1"),
    *_rename("model.encoder.conv2", "model.encoder.conv2"),
    KeyRule("model.encoder.embed_positions.weight", "model.encoder.embed_positions.weight"),
    *_attention_rules(f"{_ENC}.attn", f"{_ENC}.self_attn"),
    *_rename(f"{_ENC}.ln_1", f"{_ENC}.self_attn_layer_norm"),
    *_rename(f"{_ENC}.ln_2", f"{_ENC}.final_layer_norm"),
    *_rename(f"{_ENC}.mlp.fc", f"{_ENC}.fc1"),
    *_rename(f"{_ENC}.mlp.proj", f"{_ENC}.fc2"),
    *_rename("model.encoder.layer_norm", "model.encoder.layer_norm"),
    KeyRule("model.decoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"),
    KeyRule("model.decoder.embed_positions.weight", "model.decoder.embed_positions.weight"),
    *_attention_rules(f"{_DEC}.attn", f"{_DEC}.self_attn"),
    *_rename(f"{_DEC}.ln_1", f"{_DEC}.self_attn_layer_norm"),
    *_rename(f"{_DEC}.cross_attn.q", f"{_DEC}.encoder_attn.q_proj"),
    KeyRule(f"{_DEC}.cross_attn.kv.weight", f"{_DEC}.encoder_attn.{{part}}_proj.weight", parts=("k", "v")),
    KeyRule(f"{_DEC}.cross_attn.kv.bias", f"{_DEC}.encoder_attn.{{part}}_proj.bias", parts=("k", "v"), absent=("k",)),
    *_rename(f"{_DEC}.cross_attn.proj", f"{_DEC}.encoder_attn.out_proj"),
    *_rename(f"{_DEC}.ln_cross", f"{_DEC}.encoder_attn_layer_norm"),
    *_rename(f"{_DEC}.ln_2", f"{_DEC}.final_layer_norm"),
    *_rename(f"{_DEC}.mlp.fc", f"{_DEC}.fc1"),
    *_rename(f"{_DEC}.mlp.proj", f"{_DEC}.fc2"),
    *_rename("model.decoder.layer_norm", "model.decoder.layer_norm"),
    KeyRule("proj_out.weight", "proj_out.weight"),
]


# the bare trunk (transformers' WhisperModel): the same names without "model." and without the output projection
WHISPER_BASE_KEYS = [
    KeyRule(r.ours.removeprefix("model."), r.theirs.removeprefix("model."), r.transpose, r.parts, r.absent)
    for r in WHISPER_KEYS
    if r.ours.startswith("model.")
]


@register("base-model")
class WhisperModel(PreTrainedModel):
    """The encoder and the decoder without the output projection (transformers' `WhisperModel`): the decoder's
    hidden states (B, T, C) and the encoder's (B, 1500, C), e.g. as audio features for another head. Reads
    WhisperModel files and the trunk of WhisperForConditionalGeneration files."""

    config_class = WhisperConfig
    hf_architecture = "WhisperModel"
    hf_key_map = KeyMap(WHISPER_BASE_KEYS, re.compile(r"(?!)"), other_heads=("proj_out.",), prefix="model.", base=True)

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)
        init_normal(self, config.init_std)
        for conv in (self.encoder.conv1, self.encoder.conv2):
            nn.init.normal_(conv.weight, std=config.init_std)
            nn.init.zeros_(conv.bias)
        self.encoder.reset_positions()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def forward(
        self,
        input_features: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: Tensor | None = None,
        past_key_values: KVCache | None = None,
        output_attentions: bool = False,
        attention_mask: Tensor | None = None,
    ) -> Seq2SeqModelOutput:
        """Features (B, n_mels, 3000) (or `encoder_outputs`) and decoder ids (B, T) -> the decoder's last hidden
        states (B, T, C) and the encoder's (B, 1500, C); `attention_mask` is accepted and unused."""
        encoder_attentions: list[Tensor] | None = None
        if encoder_outputs is None:
            if input_features is None:
                raise ValueError("pass input_features (log-Mel features of the audio) or encoder_outputs")
            encoder_outputs, encoder_attentions = self.encoder(input_features, output_attentions)
        if decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids (e.g. the prompt <|startoftranscript|> ...)")
        h, self_w, cross_w = self.decoder(
            decoder_input_ids, encoder_outputs, decoder_attention_mask, past_key_values, output_attentions
        )
        out = Seq2SeqModelOutput(
            last_hidden_state=h, past_key_values=past_key_values, encoder_last_hidden_state=encoder_outputs
        )
        if output_attentions:
            out.decoder_attentions, out.cross_attentions = tuple(self_w), tuple(cross_w)
            out.encoder_attentions = tuple(encoder_attentions) if encoder_attentions is not None else None
        return out


@register("speech-seq2seq")
class WhisperForConditionalGeneration(PreTrainedModel):
    """Whisper with its output projection tied to the decoder's token embedding (transformers' class name).

    `generation_config` holds the checkpoint's generation_config.json (the prompt tokens, the language and task ids,
    the suppressed tokens); `from_pretrained` reads it and `save_pretrained` writes it."""

    config_class = WhisperConfig
    hf_architecture = "WhisperForConditionalGeneration"
    hf_key_map = KeyMap(WHISPER_KEYS, re.compile(r"(?!)"), prefix="model.", tied=("proj_out.weight",))

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.model = WhisperModel(config)  # the trunk, initialised
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)  # tied: the token embedding
        self.tie_weights()
        self.generation_config: dict[str, Any] = default_generation_config(config)

    def tie_weights(self) -> None:
        """The output projection is the decoder's token embedding (one tensor, one gradient)."""
        self.proj_out.weight = self.model.decoder.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """As every lmforge model (a directory, or a model id in the local Hugging Face cache, offline), plus the
        directory's generation_config.json when there is one."""
        model = super().from_pretrained(path, **kwargs)
        directory = resolve_model_dir(path, kwargs.get("revision"), kwargs.get("cache_dir"))
        model.generation_config = read_generation_config(directory, model.config)
        return model

    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str | None = None
    ) -> None:
        """config.json + model.safetensors (transformers' names) + generation_config.json [+ tokenizer files]."""
        super().save_pretrained(directory, tokenizer=tokenizer, max_shard_size=max_shard_size)
        text = json.dumps(self.generation_config, indent=2, sort_keys=True) + "\n"
        atomic_write_text(Path(directory) / GENERATION_CONFIG, text)

    def allocate_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A preallocated decoder self-attention cache (it also keeps the cross-attention keys/values)."""
        c = self.config
        heads = c.decoder_attention_heads
        max_len = min(max_len, c.max_target_positions)
        return KVCache(c.decoder_layers, batch_size, heads, max_len, c.d_model // heads, self.dtype, self.device)

    def encode(self, input_features: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder alone: features (B, n_mels, 3000) -> memory (B, 1500, C), to pass as `encoder_outputs`."""
        return self.model.encoder(input_features)[0]

    def forward(
        self,
        input_features: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        encoder_outputs: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        num_items_in_batch: int | Tensor | None = None,
        output_attentions: bool = False,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Features (B, n_mels, 3000) (or their `encoder_outputs` (B, 1500, C)) and decoder ids (B, T) -> logits
        (B, T, V). Without decoder_input_ids, `labels` shifted right behind decoder_start_token_id are used, as
        transformers does. `attention_mask` (over the audio) is accepted and unused: every frame is attended to.
        output_attentions=True also returns the per-layer attention probabilities (transformers' fields)."""
        if kwargs:
            raise TypeError(f"unexpected arguments for {type(self).__name__}.forward: {sorted(kwargs)}")
        c = self.config
        encoder_attentions: list[Tensor] | None = None
        if encoder_outputs is None:
            if input_features is None:
                raise ValueError("pass input_features (log-Mel features of the audio) or encoder_outputs")
            encoder_outputs, encoder_attentions = self.model.encoder(input_features, output_attentions)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (shifted right to become the decoder's input)")
            if c.pad_token_id is None or c.decoder_start_token_id is None:
                raise ValueError("labels are shifted right behind decoder_start_token_id: set it and pad_token_id")
            decoder_input_ids = shift_tokens_right(labels, c.pad_token_id, c.decoder_start_token_id)
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache(decoder_input_ids.size(0), c.max_target_positions)
        h, decoder_attentions, cross_attentions = self.model.decoder(  # h: (B, T, C)
            decoder_input_ids, encoder_outputs, decoder_attention_mask, past_key_values, output_attentions
        )
        logits = apply(self.proj_out, h)  # (B, T, V)
        loss = masked_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        out = Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=past_key_values, encoder_last_hidden_state=encoder_outputs
        )
        if output_attentions:
            out.decoder_attentions = tuple(decoder_attentions)
            out.cross_attentions = tuple(cross_attentions)
            out.encoder_attentions = tuple(encoder_attentions) if encoder_attentions is not None else None
        return out

    num_loss_items = staticmethod(masked_lm_items)

    # ---- transcription ------------------------------------------------------------------------------------------

    def detect_language(self, input_features: Tensor | None = None, encoder_outputs: Tensor | None = None) -> Tensor:
        """The most likely language token of each clip, (B,): the decoder's first prediction after
        <|startoftranscript|>, restricted to the language tokens of generation_config.json's lang_to_id."""
        lang_to_id = self.generation_config.get("lang_to_id")
        if not lang_to_id:
            raise ValueError("this model's generation_config.json has no lang_to_id: it cannot detect languages")
        with torch.inference_mode():
            memory = encoder_outputs if encoder_outputs is not None else self.encode(input_features)
            start = torch.full((memory.size(0), 1), self._start_id(), dtype=torch.long, device=memory.device)
            logits = self(decoder_input_ids=start, encoder_outputs=memory).logits[:, -1]  # (B, V)
        allowed = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
        return allowed[logits[:, allowed].argmax(dim=-1)]

    def _start_id(self) -> int:
        start = self.generation_config.get("decoder_start_token_id", self.config.decoder_start_token_id)
        if start is None:
            raise ValueError("decoder_start_token_id is not set (config.json / generation_config.json)")
        return int(start)

    def prompt_ids(
        self,
        input_features: Tensor | None = None,
        language: str | None = None,
        task: str | None = None,
        encoder_outputs: Tensor | None = None,
    ) -> Tensor:
        """The decoder prompt of each clip (B, P): <|startoftranscript|> [<|lang|>] [<|task|>] [<|notimestamps|>],
        built as transformers' Whisper builds it: from generation_config.json's forced_decoder_ids unless `language`
        or `task` is given; `language` ("en", "<|en|>") detected from the audio (or its `encoder_outputs`) when a
        multilingual model leaves it open; `task` "transcribe" (the default once a language is given) or "translate"
        (into English)."""
        g = self.generation_config
        lang_to_id: dict[str, int] = g.get("lang_to_id") or {}
        task_to_id: dict[str, int] = g.get("task_to_id") or {}
        if g.get("is_multilingual") is False and (language is not None or task is not None):
            raise ValueError("this is an English-only Whisper model: it takes no language or task; drop them")
        known = input_features if input_features is not None else encoder_outputs
        batch = known.size(0) if known is not None else 1
        init: list[int | None] = [self._start_id()]
        if language is None and task is None:
            for position, token in g.get("forced_decoder_ids") or []:  # (1, lang), (2, task), ... in order
                if position != len(init):
                    raise ValueError(
                        f"generation_config.json's forced_decoder_ids {g['forced_decoder_ids']} skip a place"
                    )
                init.append(token)
        rows = [list(init) for _ in range(batch)]
        lang_ids: list[int] | None = None
        if language is not None:
            lang_ids = [self._language_id(language, lang_to_id)] * batch
        elif lang_to_id and (len(init) == 1 or init[1] is None):
            if known is None:
                raise ValueError("the language is to be detected from the audio: pass input_features (or a language)")
            lang_ids = self.detect_language(input_features, encoder_outputs).tolist()
        if lang_ids is not None:
            for row, lang in zip(rows, lang_ids):
                if len(row) > 1:
                    row[1] = lang
                else:
                    row.append(lang)
        no_timestamps = g.get("no_timestamps_token_id")
        for row in rows:
            if task is not None:
                if task not in TASKS or task not in task_to_id:
                    raise ValueError(f"task must be one of {sorted(task_to_id) or list(TASKS)}, got {task!r}")
                if any(t in row for t in task_to_id.values()):
                    row[:] = [task_to_id[task] if t in task_to_id.values() else t for t in row]
                else:
                    row.append(task_to_id[task])
            elif language is not None and task_to_id and not any(t in row for t in task_to_id.values()):
                row.append(task_to_id["transcribe"])
            if no_timestamps is not None and row[-1] != no_timestamps:
                row.append(no_timestamps)
            row[:] = [t for t in row if t is not None]
        device = known.device if known is not None else self.device
        return torch.tensor(rows, dtype=torch.long, device=device)

    @staticmethod
    def _language_id(language: str, lang_to_id: dict[str, int]) -> int:
        token = language if language.startswith("<|") else f"<|{language.lower()}|>"
        if token not in lang_to_id:
            codes = sorted(t.strip("<|>") for t in lang_to_id)
            raise ValueError(f"language {language!r} is not one this model knows; use a code among {codes}")
        return int(lang_to_id[token])

    def generate(
        self,
        input_features: Tensor,
        language: str | None = None,
        task: str | None = None,
        max_new_tokens: int | None = None,
        logits_processors: list[generation.LogitsProcessor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Features (B, n_mels, 3000) -> the transcription's tokens (B * R, n), as transformers' Whisper `generate`
        returns them for audio up to 30 s: without the prompt and without the final EOS, rows padded with pad_token_id
        to the longest (n = 0 when every row ended at once). Greedy by
        default; `num_beams`, `length_penalty` etc. as in `lmforge.generation.generate`; `num_return_sequences` gives
        the R best beams of each clip (transformers' Whisper repeats the best one R times). `max_new_tokens` defaults to
        generation_config.json's max_length (448 for OpenAI's checkpoints), within the decoder's positions."""
        g = self.generation_config
        with torch.inference_mode():  # encoded once, for the language detection and the decoding
            memory = self.encode(input_features)  # (B, 1500, C)
        prompt = self.prompt_ids(input_features, language, task, encoder_outputs=memory)  # (B, P)
        P = prompt.size(1)
        if max_new_tokens is None:  # transformers' rule: max_length counts the new tokens and (most of) the prompt
            limit = self.config.max_target_positions
            total = min((g.get("max_length") or limit) + min(limit // 2 - 1, P), limit)
            max_new_tokens = max(total - P, 0)
        processors = [*suppression_processors(g, P), *(logits_processors or [])]
        kwargs.setdefault("eos_token_id", g.get("eos_token_id", self.config.eos_token_id))
        kwargs.setdefault("pad_token_id", g.get("pad_token_id", self.config.pad_token_id))
        out = generation.generate(
            self,
            input_features,
            decoder_input_ids=prompt,
            encoder_outputs=memory,
            max_new_tokens=max_new_tokens,
            logits_processors=processors,
            **kwargs,
        )  # (B * R, P + n)
        return _strip_eos(out[:, P:], kwargs["eos_token_id"], kwargs["pad_token_id"])


def _strip_eos(tokens: Tensor, eos: int | list[int] | None, pad: int | None) -> Tensor:
    """New tokens (N, n) -> each row cut before its first EOS, padded with `pad` to the longest row (N, n')."""
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    rows = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:end])
    width = max((len(r) for r in rows), default=0)
    fill = pad if pad is not None else (min(eos_ids) if eos_ids else 0)
    out = torch.full((len(rows), width), fill, dtype=tokens.dtype, device=tokens.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=tokens.dtype)
    return out


def suppression_processors(generation_config: dict[str, Any], begin_index: int) -> list[generation.LogitsProcessor]:
    """Whisper's bans: `suppress_tokens` at every step, `begin_suppress_tokens` (e.g. a space, EOS) for the first
    new token, at decoder position `begin_index` (the prompt's length)."""
    processors: list[generation.LogitsProcessor] = []
    always = generation_config.get("suppress_tokens")
    if always:
        banned = torch.tensor(always, dtype=torch.long)

        def suppress(ids: Tensor, logits: Tensor) -> Tensor:
            return logits.index_fill(-1, banned.to(logits.device), float("-inf"))

        processors.append(suppress)
    first = generation_config.get("begin_suppress_tokens")
    if first:
        banned_first = torch.tensor(first, dtype=torch.long)

        def suppress_first(ids: Tensor, logits: Tensor) -> Tensor:
            if ids.size(1) != begin_index:
                return logits
            return logits.index_fill(-1, banned_first.to(logits.device), float("-inf"))

        processors.append(suppress_first)
    return processors


def default_generation_config(config: WhisperConfig) -> dict[str, Any]:
    """generation_config.json's content for a model without one: the token ids of config.json."""
    g: dict[str, Any] = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "begin_suppress_tokens": config.begin_suppress_tokens,
    }
    if config.suppress_tokens is not None:
        g["suppress_tokens"] = config.suppress_tokens
    if config.extra.get("forced_decoder_ids"):  # older checkpoints keep the prompt in config.json
        g["forced_decoder_ids"] = config.extra["forced_decoder_ids"]
    return g


def read_generation_config(directory: Path, config: WhisperConfig) -> dict[str, Any]:
    """The directory's generation_config.json over the defaults from config.json."""
    path = Path(directory) / GENERATION_CONFIG
    g = default_generation_config(config)
    if path.is_file():
        try:
            g.update(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    return g
