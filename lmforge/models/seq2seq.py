"""Encoder-decoder Transformers (the original Transformer, MarianMT, BART) in one file.

    source ids (B, S) -> shared embedding * scale + positions [-> layernorm_embedding] -> encoder blocks
        -> memory (B, S, C)
    decoder ids (B, T) -> shared embedding * scale + positions [-> layernorm_embedding]
        -> decoder blocks (causal self-attention, cross-attention over memory, feed-forward)
        -> lm_head (tied to the shared embedding) + final_logits_bias -> logits (B, T, V)

The layouts differ only in settings of `Seq2SeqConfig`: Marian has sinusoidal positions laid out
[all sines | all cosines] and no embedding LayerNorm; BART has learned positions stored two rows down
(offset 2) and `layernorm_embedding`; the original Transformer (model_type "lmforge-seq2seq") has
interleaved sinusoids and may be pre-norm (a final LayerNorm after each stack). Field names are transformers'
config.json keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmforge import generation
from lmforge.config import PretrainedConfig
from lmforge.constants import IGNORE_INDEX
from lmforge.hub import KeyMap, KeyRule
from lmforge.models.base import PreTrainedModel, init_normal
from lmforge.models.outputs import Seq2SeqLMOutput
from lmforge.models.registry import register
from lmforge.nn import (
    AttentionMask,
    DecoderBlock,
    KVCache,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    layer_norm,
)
from lmforge.nn.inference import apply
from lmforge.nn.layers import dropout, run_blocks
from lmforge.nn.losses import masked_lm_items, masked_lm_loss
from lmforge.nn.positions import SINUSOIDAL_LAYOUTS

# lmforge-only layout settings: Marian's and BART's are fixed by their model_type, so not written for them
LAYOUT_KEYS = ("position_embedding", "sinusoidal_layout", "position_offset", "layernorm_embedding", "normalize_before")


@dataclass
class Seq2SeqConfig(PretrainedConfig):
    """An encoder-decoder Transformer; the defaults are the original Transformer (base) with tied
    embeddings. `MarianConfig` and `BartConfig` set their layouts."""

    vocab_size: int = 32000
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    max_position_embeddings: int = 512
    dropout: float = 0.1  # residual and embedding dropout
    attention_dropout: float = 0.0
    scale_embedding: bool = True  # multiply embeddings by sqrt(d_model)
    position_embedding: str = "sinusoidal"  # sinusoidal | learned
    sinusoidal_layout: str = "interleaved"  # interleaved (original Transformer) | split (Marian)
    position_offset: int = 0  # learned positions stored this many rows down (BART: 2)
    layernorm_embedding: bool = False  # a LayerNorm after embeddings + positions (BART)
    normalize_before: bool = False  # pre-norm blocks and a final LayerNorm after each stack
    init_std: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = 1
    decoder_start_token_id: int | None = 0
    forced_eos_token_id: int | None = None  # generation ends with this token at the length limit
    tie_word_embeddings: bool = True
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    is_encoder_decoder: ClassVar[bool] = True  # generation encodes the source once, then decodes
    model_type: ClassVar[str] = "lmforge-seq2seq"
    model_types: ClassVar[tuple[str, ...]] = ("lmforge-seq2seq",)
    default_architecture: ClassVar[str] = "Seq2SeqForConditionalGeneration"  # config.json's "architectures"
    # one embedding shared by encoder, decoder and output (the only variant implemented)
    unsupported: ClassVar[dict[str, Any]] = {"share_encoder_decoder_embeddings": True, "tie_word_embeddings": True}

    def __post_init__(self) -> None:
        if self.position_embedding not in ("sinusoidal", "learned"):
            raise ValueError(f"position_embedding must be 'sinusoidal' or 'learned', got {self.position_embedding!r}")
        if self.sinusoidal_layout not in SINUSOIDAL_LAYOUTS:
            raise ValueError(f"sinusoidal_layout must be one of {SINUSOIDAL_LAYOUTS}, got {self.sinusoidal_layout!r}")
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by the number of heads ({heads})")
        decoder_vocab = self.extra.get("decoder_vocab_size")
        if decoder_vocab not in (None, self.vocab_size):
            raise ValueError(
                f"decoder_vocab_size={decoder_vocab} differs from vocab_size={self.vocab_size}; "
                "lmforge shares one vocabulary between encoder and decoder"
            )
        self._check_labels()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Read config.json. Marian's and BART's layouts are fixed by their model_type: layout keys that their
        older files carry (e.g. normalize_before: false) are kept as they are, not read (transformers ignores
        them too)."""
        if cls.model_type == Seq2SeqConfig.model_type:
            return super().from_dict(d)
        config = super().from_dict({k: v for k, v in d.items() if k not in LAYOUT_KEYS})
        config.extra.update({k: d[k] for k in LAYOUT_KEYS if k in d})
        return config

    def to_dict(self, architecture: tuple[str, str] | None = None) -> dict[str, Any]:
        architecture = architecture or (self.default_architecture, self.default_architecture)
        fields_ = {k: v for k, v in vars(self).items() if k != "extra"}
        if self.model_type != Seq2SeqConfig.model_type:
            fields_ = {k: v for k, v in fields_.items() if k not in LAYOUT_KEYS}
        return {
            **self.extra,
            "model_type": self.model_type,
            "architectures": [architecture[0]],
            "is_encoder_decoder": True,
            **fields_,
        }


@dataclass
class MarianConfig(Seq2SeqConfig):
    """MarianMT: post-norm, sinusoidal positions as [sines | cosines]; OPUS-MT files set scaled embeddings
    and SiLU ("swish")."""

    activation_function: str = "gelu"  # transformers' default; OPUS-MT checkpoints set "swish"
    scale_embedding: bool = False  # transformers' default; OPUS-MT checkpoints set true
    sinusoidal_layout: str = "split"
    pad_token_id: int | None = 58100
    eos_token_id: int | None = 0
    decoder_start_token_id: int | None = 58100
    forced_eos_token_id: int | None = 0  # transformers' default
    vocab_size: int = 58101

    model_type: ClassVar[str] = "marian"
    model_types: ClassVar[tuple[str, ...]] = ("marian",)
    default_architecture: ClassVar[str] = "MarianMTModel"


@dataclass
class BartConfig(Seq2SeqConfig):
    """BART: post-norm, learned positions with offset 2, `layernorm_embedding`, GELU."""

    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    position_embedding: str = "learned"
    position_offset: int = 2
    layernorm_embedding: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2
    forced_eos_token_id: int | None = 2  # transformers' default

    model_type: ClassVar[str] = "bart"
    model_types: ClassVar[tuple[str, ...]] = ("bart",)
    default_architecture: ClassVar[str] = "BartForConditionalGeneration"


def _attention_rules(ours: str, theirs: str) -> list[KeyRule]:
    """Separate q/k/v projections <-> lmforge's fused `qkv`, and the output projection."""
    return [
        KeyRule(f"{ours}.qkv.{w}", f"{theirs}.{{part}}_proj.{w}", parts=("q", "k", "v")) for w in ("weight", "bias")
    ] + [KeyRule(f"{ours}.proj.{w}", f"{theirs}.out_proj.{w}") for w in ("weight", "bias")]


def _norm_rules(ours: str, theirs: str) -> list[KeyRule]:
    return [KeyRule(f"{ours}.{w}", f"{theirs}.{w}") for w in ("weight", "bias")]


def _stack_rules(stack: str) -> list[KeyRule]:
    """Embedding-side and final norms of the encoder or the decoder (absent modules simply match nothing)."""
    return [
        KeyRule(f"model.{stack}.embed_positions.weight", f"model.{stack}.embed_positions.weight"),
        *_norm_rules(f"model.{stack}.layernorm_embedding", f"model.{stack}.layernorm_embedding"),
        *_norm_rules(f"model.{stack}.ln_f", f"model.{stack}.layer_norm"),
    ]


# lmforge's names <-> transformers' (MarianMTModel, BartForConditionalGeneration: the same layout)
SEQ2SEQ_KEYS: list[KeyRule] = [
    KeyRule("model.shared.weight", "model.shared.weight"),
    *_stack_rules("encoder"),
    *_attention_rules("model.encoder.layers.{i}.attn", "model.encoder.layers.{i}.self_attn"),
    *_norm_rules("model.encoder.layers.{i}.ln_1", "model.encoder.layers.{i}.self_attn_layer_norm"),
    *_norm_rules("model.encoder.layers.{i}.ln_2", "model.encoder.layers.{i}.final_layer_norm"),
    *_stack_rules("decoder"),
    *_attention_rules("model.decoder.layers.{i}.attn", "model.decoder.layers.{i}.self_attn"),
    *_norm_rules("model.decoder.layers.{i}.ln_1", "model.decoder.layers.{i}.self_attn_layer_norm"),
    *[
        KeyRule(f"model.decoder.layers.{{i}}.cross_attn.q.{w}", f"model.decoder.layers.{{i}}.encoder_attn.q_proj.{w}")
        for w in ("weight", "bias")
    ],
    *[
        KeyRule(
            f"model.decoder.layers.{{i}}.cross_attn.kv.{w}",
            f"model.decoder.layers.{{i}}.encoder_attn.{{part}}_proj.{w}",
            parts=("k", "v"),
        )
        for w in ("weight", "bias")
    ],
    *[
        KeyRule(
            f"model.decoder.layers.{{i}}.cross_attn.proj.{w}", f"model.decoder.layers.{{i}}.encoder_attn.out_proj.{w}"
        )
        for w in ("weight", "bias")
    ],
    *_norm_rules("model.decoder.layers.{i}.ln_cross", "model.decoder.layers.{i}.encoder_attn_layer_norm"),
    *_norm_rules("model.decoder.layers.{i}.ln_2", "model.decoder.layers.{i}.final_layer_norm"),
    *[
        KeyRule(f"model.{s}.layers.{{i}}.mlp.{a}.{w}", f"model.{s}.layers.{{i}}.{b}.{w}")
        for s in ("encoder", "decoder")
        for a, b in (("fc", "fc1"), ("proj", "fc2"))
        for w in ("weight", "bias")
    ],
    KeyRule("final_logits_bias", "final_logits_bias"),
    KeyRule("lm_head.weight", "lm_head.weight"),
]
# copies of the shared embedding that older checkpoints store under the encoder's and decoder's names
TIED_COPIES = r"model\.(encoder|decoder)\.embed_tokens\.weight"
# Marian's fixed sinusoid table: transformers 5 does not save it, older checkpoints do (recomputed here)
SINUSOID_TABLE = r"model\.(encoder|decoder)\.embed_positions\.weight"


class Seq2SeqStack(nn.Module):
    """The encoder (TransformerBlocks, bidirectional) or the decoder (DecoderBlocks, causal, attending to
    the encoder's output); the shared token embedding is passed in, not owned."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool) -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.embed_positions: nn.Module
        if c.position_embedding == "learned":
            self.embed_positions = LearnedPositionalEmbedding(c.max_position_embeddings + c.position_offset, c.d_model)
        else:
            self.embed_positions = SinusoidalPositionalEmbedding(
                c.max_position_embeddings, c.d_model, c.sinusoidal_layout
            )
        self.layernorm_embedding = layer_norm(c.d_model) if c.layernorm_embedding else nn.Identity()
        norm = "pre" if c.normalize_before else "post"
        if decoder:
            heads, ffn, n = c.decoder_attention_heads, c.decoder_ffn_dim, c.decoder_layers
            block: type[nn.Module] = DecoderBlock
        else:
            heads, ffn, n = c.encoder_attention_heads, c.encoder_ffn_dim, c.encoder_layers
            block = TransformerBlock
        self.layers = nn.ModuleList(
            block(
                c.d_model,
                heads,
                ffn,
                c.activation_function,
                dropout=c.dropout,
                attn_dropout=c.attention_dropout,
                norm_position=norm,
            )
            for _ in range(n)
        )
        self.ln_f = layer_norm(c.d_model) if c.normalize_before else nn.Identity()

    def embed(self, tokens: nn.Embedding, ids: Tensor, past: int = 0) -> Tensor:
        """ids (B, T) -> token embedding * scale + positions past.. past+T-1 (B, T, C)."""
        T = ids.size(1)
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's {self.config.max_position_embeddings} "
                "positions; truncate the input (e.g. truncation=True)"
            )
        positions = torch.arange(past, past + T, device=ids.device) + self.config.position_offset  # (T,)
        x = tokens(ids) * self.embed_scale + self.embed_positions(positions)  # (B, T, C)
        return dropout(apply(self.layernorm_embedding, x), self.config.dropout, self.training)

    def encode(
        self, tokens: nn.Embedding, input_ids: Tensor, attention_mask: Tensor | None, output_attentions: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Encoder: source ids (B, S) -> memory (B, S, C), and each layer's (B, H, S, S) self-attention
        weights if output_attentions (else an empty list)."""
        S = input_ids.size(1)
        x = self.embed(tokens, input_ids)
        mask = AttentionMask.build(attention_mask, S, S, causal=False)
        x, _, attentions = run_blocks(self.layers, x, mask, output_attentions=output_attentions)
        return apply(self.ln_f, x), attentions

    def decode(
        self,
        tokens: nn.Embedding,
        decoder_input_ids: Tensor,
        memory: Tensor,
        memory_padding: Tensor | None,
        decoder_attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Decoder: target ids (B, T) and memory (B, S, C) -> hidden states (B, T, C), and if output_attentions
        each layer's self-attention (B, H, T, past + T) and cross-attention (B, H, T, S) weights (else empty
        lists)."""
        T, S = decoder_input_ids.size(1), memory.size(1)
        past = cache.length if cache is not None else 0
        x = self.embed(tokens, decoder_input_ids, past)
        mask = AttentionMask.build(decoder_attention_mask, T, past + T, causal=True)
        memory_mask = AttentionMask.build(memory_padding, T, S, causal=False)
        self_attentions: list[Tensor] = []
        cross_attentions: list[Tensor] = []
        for i, block in enumerate(self.layers):
            x, self_w, cross_w = block(x, memory, mask, memory_mask, cache, i, output_attentions)
            if output_attentions:
                self_attentions.append(self_w)
                cross_attentions.append(cross_w)
        if cache is not None:
            cache.advance(T)
        return apply(self.ln_f, x), self_attentions, cross_attentions


class Seq2SeqModel(nn.Module):
    """The shared embedding, the encoder and the decoder (transformers' `model.` of MarianMTModel)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = Seq2SeqStack(config, decoder=False)
        self.decoder = Seq2SeqStack(config, decoder=True)


def shift_tokens_right(labels: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Teacher forcing: the decoder reads decoder_start followed by the labels but the last (ignored
    labels read as padding). labels (B, T) -> (B, T)."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


@register("seq2seq-lm")
class Seq2SeqForConditionalGeneration(PreTrainedModel):
    """An encoder-decoder with a language-model head tied to the shared embedding, plus a
    `final_logits_bias` buffer (zeros unless a checkpoint brings one)."""

    config_class = Seq2SeqConfig
    hf_architecture = "Seq2SeqForConditionalGeneration"
    hf_key_map = KeyMap(SEQ2SEQ_KEYS, re.compile(TIED_COPIES), prefix="model.", tied=("lm_head.weight",))

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Seq2SeqModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))  # saved, as transformers does
        init_normal(self, config.init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The output projection is the shared embedding (one tensor, one gradient)."""
        self.lm_head.weight = self.model.shared.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def allocate_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A preallocated self-attention KV cache for the decoder; it also keeps the cross-attention keys/values,
        projected from the encoder's output on the first forward."""
        c = self.config
        heads = c.decoder_attention_heads
        max_len = min(max_len, c.max_position_embeddings)
        return KVCache(c.decoder_layers, batch_size, heads, max_len, c.d_model // heads, self.dtype, self.device)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder alone: source ids (B, S) -> memory (B, S, C), to pass as `encoder_outputs`."""
        return self.model.encoder.encode(self.model.shared, input_ids, attention_mask)[0]

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Source ids (B, S) -> decoder_start_token_id followed by new tokens (B * R, 1 + n), as transformers'
        generate; see `lmforge.generation.generate` for the options."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        encoder_outputs: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        num_items_in_batch: int | Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Source ids (B, S) (or their `encoder_outputs` (B, S, C)) and decoder ids (B, T) -> logits (B, T, V).

        Without decoder_input_ids, `labels` shifted right behind decoder_start_token_id are used (as
        transformers does); labels are not shifted by the loss (position t predicts labels[:, t]).
        output_attentions=True also returns, per layer, the attention probabilities as transformers does:
        `encoder_attentions` (B, H, S, S) (None when encoder_outputs is passed), `decoder_attentions`
        (B, H, T, past + T) and `cross_attentions` (B, H, T, S), padded source positions weighted 0. They are
        computed with the explicit formula; without output_attentions the fused SDPA kernels run."""
        if kwargs:
            raise TypeError(f"unexpected arguments for {type(self).__name__}.forward: {sorted(kwargs)}")
        c = self.config
        encoder_attentions: list[Tensor] | None = None
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the source) or encoder_outputs")
            encoder_outputs, encoder_attentions = self.model.encoder.encode(
                self.model.shared, input_ids, attention_mask, output_attentions
            )
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (shifted right to become the decoder's input)")
            if c.pad_token_id is None or c.decoder_start_token_id is None:
                raise ValueError(
                    "labels are shifted right behind decoder_start_token_id with padding: set "
                    "config.pad_token_id and config.decoder_start_token_id, or pass decoder_input_ids"
                )
            decoder_input_ids = shift_tokens_right(labels, c.pad_token_id, c.decoder_start_token_id)
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache(decoder_input_ids.size(0), c.max_position_embeddings)
        h, decoder_attentions, cross_attentions = self.model.decoder.decode(  # h: (B, T, C)
            self.model.shared,
            decoder_input_ids,
            encoder_outputs,
            attention_mask,
            decoder_attention_mask,
            past_key_values,
            output_attentions,
        )
        logits = apply(self.lm_head, h) + self.final_logits_bias  # (B, T, V)
        loss = masked_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        out = Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=past_key_values, encoder_last_hidden_state=encoder_outputs
        )
        if output_attentions:
            out.decoder_attentions = tuple(decoder_attentions)
            out.cross_attentions = tuple(cross_attentions)
            out.encoder_attentions = tuple(encoder_attentions) if encoder_attentions is not None else None
        return out

    num_loss_items = staticmethod(masked_lm_items)  # positions `labels` scores (no shift), for exact accumulation


@register("seq2seq-lm")
class MarianMTModel(Seq2SeqForConditionalGeneration):
    """MarianMT (transformers' `MarianMTModel`); a stored sinusoid table is dropped (recomputed)."""

    config_class = MarianConfig
    hf_architecture = "MarianMTModel"
    hf_key_map = KeyMap(
        SEQ2SEQ_KEYS, re.compile(f"{TIED_COPIES}|{SINUSOID_TABLE}"), prefix="model.", tied=("lm_head.weight",)
    )


@register("seq2seq-lm")
class BartForConditionalGeneration(Seq2SeqForConditionalGeneration):
    """BART (transformers' `BartForConditionalGeneration`)."""

    config_class = BartConfig
    hf_architecture = "BartForConditionalGeneration"
