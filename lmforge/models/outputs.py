"""Output dataclasses returned by every model (Hugging Face-shaped: `.loss`, `.logits`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


class ModelOutput:
    """Attribute access plus `out["logits"]` and tuple-style `out[0]` over the fields that are set."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None  # a lmforge.nn.KVCache when use_cache=True
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CTCOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T', V) per output frame
    output_lengths: Tensor | None = None  # (B,) real output frames per clip
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, num_labels)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor  # (B, T, C)
    pooler_output: Tensor | None = None  # (B, C): tanh(dense(first token)), for sentence-level heads
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T, V); (N, V) for the N scored positions when training with labels
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: Tensor | None = None  # masked-LM loss + next-sentence loss
    prediction_logits: Tensor | None = None  # as MaskedLMOutput.logits
    seq_relationship_logits: Tensor | None = None  # (B, 2): is-next, not-next
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T, num_labels)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None  # (B, T)
    end_logits: Tensor | None = None  # (B, T)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T, V)
    past_key_values: Any = None  # the decoder's lmforge.nn.KVCache when use_cache=True
    # with output_attentions=True, per layer (transformers' names and field order):
    decoder_attentions: tuple[Tensor, ...] | None = None  # causal self-attention (B, H, T, past + T)
    cross_attentions: tuple[Tensor, ...] | None = None  # decoder queries over the source (B, H, T, S)
    encoder_last_hidden_state: Tensor | None = None  # (B, S, C)
    encoder_attentions: tuple[Tensor, ...] | None = None  # (B, H, S, S); None when encoder_outputs was passed


@dataclass
class Seq2SeqModelOutput(ModelOutput):
    """An encoder-decoder trunk's output (transformers' names): the decoder's last hidden states and the encoder's."""

    last_hidden_state: Tensor | None = None  # (B, T, C): the decoder's
    past_key_values: Any = None
    decoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    encoder_last_hidden_state: Tensor | None = None  # (B, S, C)
    encoder_attentions: tuple[Tensor, ...] | None = None
