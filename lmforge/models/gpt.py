"""GPT: a decoder-only Transformer trained to maximise sum_i log P(x_i | x_<i).

    ids (B, T) -> token embedding + position encoding -> n_layer causal blocks -> ln_f -> lm_head
    -> logits (B, T, vocab)

With the default `GPTConfig` it is exactly GPT-2-shaped, so Hugging Face GPT-2 weights load
one to one: `GPT2_KEYS` below is the name map, which `lmforge.hub` applies.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from lmforge import generation
from lmforge.config import GPTConfig
from lmforge.hub import KeyMap, KeyRule
from lmforge.models.base import PreTrainedModel, init_normal
from lmforge.models.outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput
from lmforge.models.registry import register
from lmforge.nn import (
    AttentionMask,
    KVCache,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    layer_norm,
)
from lmforge.nn.inference import apply
from lmforge.nn.layers import dropout, run_blocks
from lmforge.nn.losses import causal_lm_items, causal_lm_loss, sequence_classification_loss

# lmforge's names <-> Hugging Face GPT-2's (GPT2LMHeadModel); GPT-2's Conv1D weights are stored transposed.
GPT2_KEYS: list[KeyRule] = [
    KeyRule("transformer.wte.weight", "transformer.wte.weight"),
    KeyRule("transformer.wpe.weight", "transformer.wpe.weight"),
    KeyRule("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight"),
    KeyRule("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias"),
    KeyRule("transformer.h.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True),
    KeyRule("transformer.h.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
    KeyRule("transformer.h.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", transpose=True),
    KeyRule("transformer.h.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    KeyRule("transformer.h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight"),
    KeyRule("transformer.h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias"),
    KeyRule("transformer.h.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", transpose=True),
    KeyRule("transformer.h.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    KeyRule("transformer.h.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", transpose=True),
    KeyRule("transformer.h.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    KeyRule("transformer.ln_f.weight", "transformer.ln_f.weight"),
    KeyRule("transformer.ln_f.bias", "transformer.ln_f.bias"),
    KeyRule("lm_head.weight", "lm_head.weight"),
]
GPT2_TRUNK_KEYS = [r for r in GPT2_KEYS if r.ours.startswith("transformer.")]
# Non-parameter entries found in some Hugging Face GPT-2 files (old causal-mask buffers).
GPT2_IGNORED = re.compile(r".*\.attn\.(bias|masked_bias)$")


class GPTModel(nn.Module):
    """The GPT trunk: embeddings and blocks, returning the final hidden states (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe: nn.Module | None = None
        rotary = None
        if c.position_embedding == "learned":
            self.wpe = LearnedPositionalEmbedding(c.n_positions, c.n_embd)
        elif c.position_embedding == "sinusoidal":
            self.wpe = SinusoidalPositionalEmbedding(c.n_positions, c.n_embd)
        else:
            rotary = RotaryEmbedding(c.head_dim, c.n_positions, c.rope_theta)
        self.h = nn.ModuleList(
            TransformerBlock(
                c.n_embd,
                c.n_head,
                c.ffn_dim,
                c.activation_function,
                c.bias,
                c.dropout,
                norm_position=c.norm_position,
                eps=c.layer_norm_epsilon,
                rotary=rotary,
            )
            for _ in range(c.n_layer)
        )
        # pre-norm needs a final norm; post-norm blocks already end in one
        self.ln_f = layer_norm(c.n_embd, c.layer_norm_epsilon, c.bias) if c.norm_position == "pre" else nn.Identity()
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        keep: Tensor | slice | None = None,
    ) -> BaseModelOutput:
        """input_ids (B, T) -> the final hidden states (B, T, C), or (B, len(keep), C) for the positions `keep`
        names (the last block's feed-forward then runs on those only; not with output_hidden_states)."""
        if keep is not None and output_hidden_states:
            raise ValueError("keep drops positions the hidden states would hold: pass one or the other")
        B, T = input_ids.shape
        if getattr(past_key_values, "packed", False):  # several sequences in one row (nn.attention.PackedCache)
            if position_ids is None:
                raise ValueError("a packed cache needs position_ids: each token's position in its own sequence")
            past = 0  # each sequence's length and context limit are the cache owner's to keep
        else:
            past = past_key_values.length if past_key_values is not None else 0
            if past + T > self.config.n_positions:
                raise ValueError(
                    f"sequence of {past + T} tokens is longer than the model's context of "
                    f"{self.config.n_positions}; truncate the input (e.g. truncation=True, "
                    f"max_length={self.config.n_positions})"
                )
        if attention_mask is not None and attention_mask.size(1) != past + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.size(1)} positions, expected {past + T} (past + new tokens)"
            )
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                # left padding: real tokens are numbered from 0 in each row
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        x = dropout(x, self.config.dropout, self.training)
        mask = AttentionMask.build(attention_mask, T, past + T, causal=True)
        x, hidden, attentions = run_blocks(
            self.h,
            x,
            mask,
            position_ids,
            past_key_values,
            output_attentions,
            output_hidden_states,
            self.gradient_checkpointing and self.training,
            keep,
        )
        x = apply(self.ln_f, x)
        if output_hidden_states:
            hidden.append(x)
        if past_key_values is not None:
            past_key_values.advance(T)
        return BaseModelOutput(
            x,
            past_key_values,
            tuple(hidden) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )


def init_gpt_weights(model: nn.Module, config: GPTConfig) -> None:
    """GPT-2's initialisation: Linear and Embedding weights ~ N(0, initializer_range), biases 0,
    LayerNorm 1/0; the residual projections get std / sqrt(2 * n_layer) so the residual stream's
    variance does not grow with depth."""
    std = config.initializer_range
    init_normal(model, std)
    for name, p in model.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))


class GPTPreTrainedModel(PreTrainedModel):
    """What every GPT model class shares: the trunk under `transformer`, gradient checkpointing, sizes."""

    config_class = GPTConfig
    hf_architecture = "GPT2Model"
    transformer: GPTModel

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def gradient_checkpointing_enable(self) -> None:
        self.transformer.gradient_checkpointing = True

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = super().num_parameters()
        if exclude_embeddings and isinstance(self.transformer.wpe, LearnedPositionalEmbedding):
            n -= self.transformer.wpe.weight.numel()
        return n


@register("causal-lm")
class GPTForCausalLM(GPTPreTrainedModel):
    """GPT with a language-model head; `labels` give the causal-LM loss (shifted inside)."""

    hf_architecture = "GPT2LMHeadModel"  # written to config.json's "architectures"
    # a classifier's "score" head in the file is left out; lm_head is the embedding when tied
    hf_key_map = KeyMap(GPT2_KEYS, GPT2_IGNORED, other_heads=("score.weight",), tied=("lm_head.weight",))
    shifts_labels = True  # labels are the input ids; the loss shifts them (for collators and sample weights)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_gpt_weights(self, config)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embedding and the output projection (one tensor, one gradient)."""
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int | Tensor = 0,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, V): only the last `logits_to_keep` positions if > 0, or the positions
        a 1-D tensor of indices names (transformers' convention)."""
        if kwargs:
            raise TypeError(f"unexpected arguments for GPTForCausalLM.forward: {sorted(kwargs)}")
        if use_cache and past_key_values is None:
            past_key_values = self.allocate_cache(input_ids.size(0), self.config.n_positions)
        keep: Tensor | slice | None = None
        if isinstance(logits_to_keep, Tensor):
            keep = logits_to_keep  # (len(index),) positions
        elif logits_to_keep:
            keep = slice(-logits_to_keep, None)
        # positions whose logits are not wanted skip the last block's feed-forward (a prefill keeps one); with
        # every block's hidden states asked for, or a loss, all positions run and the kept ones are picked after
        early = keep is not None and not output_hidden_states and labels is None
        out = self.transformer(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            output_attentions,
            output_hidden_states,
            keep if early else None,
        )
        h = out.last_hidden_state  # (B, T, C), or (B, len(keep), C) where kept early
        if keep is not None and not early:
            h = h[:, keep]
        logits = apply(self.lm_head, h)  # (B, len(keep) or T, V)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions)

    num_loss_items = staticmethod(causal_lm_items)  # positions `labels` scores, for exact accumulation

    def allocate_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A preallocated KV cache for `batch_size` sequences of up to `max_len` tokens."""
        c = self.config
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            min(max_len, c.n_positions),
            c.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Prompt followed by new tokens; see `lmforge.generation.generate` for the options."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ---- sizes, for MFU ---------------------------------------------------------------------
    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * L * C * T (PaLM appendix B)."""
        c = self.config
        T = seq_len or c.n_positions
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * c.n_layer * c.n_embd * T


@register("sequence-classification")
class GPTForSequenceClassification(GPTPreTrainedModel):
    """GPT with a linear head on the last real token of each row (Hugging Face's
    GPT2ForSequenceClassification): input_ids (B, T) -> logits (B, num_labels).

    The causal mask means only the last token has seen the whole text, so it is the one pooled: the
    rightmost token that is not `config.pad_token_id` (left or right padding alike). Without a pad
    token only batches of one row can be told apart, and the last position is used.
    """

    hf_architecture = "GPT2ForSequenceClassification"
    # the trunk, and a bias-free linear "score" head that a language model's file lacks (freshly initialised)
    hf_key_map = KeyMap(
        GPT2_TRUNK_KEYS + [KeyRule("score.weight", "score.weight")],
        GPT2_IGNORED,
        task_head=("score.weight",),
        other_heads=("lm_head.weight",),
    )

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        init_gpt_weights(self, config)

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def last_token_index(self, input_ids: Tensor) -> Tensor:
        """(B,) position of the last non-padding token of each row; 0 for a row that is all padding
        (transformers' rule, kept so that logits match)."""
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError(
                    f"a batch of {B} rows needs config.pad_token_id to find each row's last token; "
                    "set it (e.g. model.config.pad_token_id = tokenizer.pad_token_id) or pass one "
                    "row at a time"
                )
            return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        non_pad = (input_ids != pad).int()  # (B, T)
        positions = torch.arange(T, device=input_ids.device, dtype=torch.int)
        return (positions * non_pad).argmax(-1)  # the rightmost real token

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """input_ids (B, T) -> logits (B, num_labels); `labels` ((B,) class ids, (B,) or (B, N) floats
        for regression, (B, N) multi-hot floats) give the loss for `config.problem_type`."""
        if kwargs:
            raise TypeError(f"unexpected arguments for GPTForSequenceClassification.forward: {sorted(kwargs)}")
        out = self.transformer(input_ids, attention_mask, position_ids, None, output_attentions, output_hidden_states)
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        pooled = out.last_hidden_state[rows, self.last_token_index(input_ids)]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)
        loss = sequence_classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)
