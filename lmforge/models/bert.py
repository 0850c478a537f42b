"""BERT: a bidirectional encoder pretrained to fill in masked tokens (and, originally, to tell whether
sentence B follows sentence A).

    ids (B, T) + segments -> word + position + token-type embeddings -> LayerNorm -> N post-norm
    blocks, every token attending to every real token -> hidden states (B, T, C)
    -> heads: masked-LM logits (B, T, V); pooled first token ([CLS]) -> sentence classes;
    per-token classes; answer-span start/end logits

With the default `BertConfig` it is bert-base-shaped, and Hugging Face BERT checkpoints load one to
one: the name maps below (`bert_trunk_keys`, each class's `hf_key_map`) are what `lmforge.hub` applies.
The blocks are the same `TransformerBlock` as GPT's, with norm_position="post" and no causal mask.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmforge.config import BertConfig
from lmforge.constants import IGNORE_INDEX
from lmforge.hub import KeyMap, KeyRule
from lmforge.models.base import PreTrainedModel, init_normal
from lmforge.models.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    PreTrainingOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from lmforge.models.registry import register
from lmforge.nn import AttentionMask, LearnedPositionalEmbedding, TransformerBlock, get_activation, layer_norm
from lmforge.nn.layers import dropout, run_blocks
from lmforge.nn.losses import (
    masked_lm_items,
    masked_lm_loss,
    next_sentence_loss,
    question_answering_loss,
    sequence_classification_loss,
    token_classification_loss,
)


# ---- lmforge's names <-> Hugging Face BERT's ------------------------------------------------------------
def bert_trunk_keys(prefix: str) -> list[KeyRule]:
    """BERT's trunk under `prefix` on both sides ("bert." in head models, "" in a bare BertModel)."""
    pairs = [  # (lmforge, Hugging Face) module names, each with .weight and .bias
        ("embeddings.ln", "embeddings.LayerNorm"),
        ("layers.{i}.attn.proj", "encoder.layer.{i}.attention.output.dense"),
        ("layers.{i}.ln_1", "encoder.layer.{i}.attention.output.LayerNorm"),
        ("layers.{i}.mlp.fc", "encoder.layer.{i}.intermediate.dense"),
        ("layers.{i}.mlp.proj", "encoder.layer.{i}.output.dense"),
        ("layers.{i}.ln_2", "encoder.layer.{i}.output.LayerNorm"),
        ("pooler", "pooler.dense"),
    ]
    embeddings = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    return (
        [KeyRule(f"{prefix}embeddings.{e}.weight", f"{prefix}embeddings.{e}.weight") for e in embeddings]
        + [
            KeyRule(
                f"{prefix}layers.{{i}}.attn.qkv.{p}",
                f"{prefix}encoder.layer.{{i}}.attention.self.{{part}}.{p}",
                parts=("query", "key", "value"),
            )
            for p in ("weight", "bias")
        ]
        + [
            KeyRule(f"{prefix}{ours}.{p}", f"{prefix}{theirs}.{p}")
            for ours, theirs in pairs
            for p in ("weight", "bias")
        ]
    )


def head_keys(ours: str, theirs: str) -> list[KeyRule]:
    """A linear (or LayerNorm) module's weight and bias: `ours` <-> `theirs`."""
    return [KeyRule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


MLM_HEAD_KEYS: list[KeyRule] = [
    *head_keys("lm_head.dense", "cls.predictions.transform.dense"),
    *head_keys("lm_head.ln", "cls.predictions.transform.LayerNorm"),
    KeyRule("lm_head.decoder.weight", "cls.predictions.decoder.weight"),  # tied to the word embedding
    KeyRule("lm_head.decoder.bias", "cls.predictions.bias"),
]
MLM_HEAD = tuple(r.ours for r in MLM_HEAD_KEYS if r.ours != "lm_head.decoder.weight")  # our names; no tied copy
POOLER = ("bert.pooler.weight", "bert.pooler.bias")
TASK_HEADS = ("cls.", "classifier.", "qa_outputs.")  # Hugging Face name prefixes of BERT's task heads
# Buffers some Hugging Face BERT files hold (position ids; no parameters).
BERT_IGNORED = re.compile(r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$")
# Older names, renamed on load: TF-era LayerNorm gamma/beta; the decoder bias, a tie of cls.predictions.bias.
BERT_ALIASES = (
    (r"^(.*)LayerNorm\.gamma$", r"\1LayerNorm.weight"),
    (r"^(.*)LayerNorm\.beta$", r"\1LayerNorm.bias"),
    (r"^cls\.predictions\.decoder\.bias$", "cls.predictions.bias"),
)


def head_model_keys(
    head_rules: list[KeyRule],
    task_head: tuple[str, ...],
    other_heads: tuple[str, ...],
    pooler: bool,
    tied: bool = False,
) -> KeyMap:
    """The map of a BERT head model: the trunk under "bert." (with its pooler when `pooler`; a checkpoint's
    pooler is otherwise left out), plus `head_rules`. `task_head`, `other_heads`: as in `KeyMap`; `tied`: the
    MLM decoder is the word embedding."""
    rules = bert_trunk_keys("bert.")
    if not pooler:
        rules = [r for r in rules if not r.ours.startswith("bert.pooler.")]
        other_heads += ("bert.pooler.",)
    return KeyMap(
        rules + head_rules,
        BERT_IGNORED,
        task_head=task_head,
        other_heads=other_heads,
        prefix="bert.",
        tied=("lm_head.decoder.weight",) if tied else (),
        aliases=BERT_ALIASES,
    )


class BertEmbeddings(nn.Module):
    """word + position + token type (segment A/B) embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = config
        # padding_idx: the pad row gets no gradient, as in Hugging Face's BERT
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = LearnedPositionalEmbedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.ln = layer_norm(c.hidden_size, c.layer_norm_eps)
        self.dropout = c.hidden_dropout_prob

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T); token_type_ids (B, T) or None = all segment 0; position_ids (B, T) or None =
        0..T-1. The defaults add one table row / the first T rows, broadcast over the batch, instead of
        gathering B*T rows (same sums, in the same order: word + segment, then + position)."""
        T = input_ids.size(1)
        x = self.word_embeddings(input_ids)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # (C,)
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        if position_ids is None:
            x = x + self.position_embeddings.weight[:T]  # (T, C)
        else:
            x = x + self.position_embeddings(position_ids)
        return dropout(self.ln(x), self.dropout, self.training)  # (B, T, C)


@register("base-model")
class BertModel(PreTrainedModel):
    """The BERT trunk: embeddings and post-norm blocks (B, T, C), plus the pooler tanh(W h_[CLS] + b)
    (B, C) when `add_pooling_layer`. Also a model of its own: `BertModel.from_pretrained` loads a
    Hugging Face BertModel checkpoint (e.g. a sentence-transformers encoder) or any BERT head's trunk."""

    config_class = BertConfig
    hf_architecture = "BertModel"
    # int8: the projections that read a LayerNorm's output (attention QKV, the FFN's first layer) carry BERT's
    # outlier channels; one 7-bit pass left the real MiniLM's sentence vectors at cosine 0.97 to fp32, two
    # passes there 0.995 (300 sentences, AMD EPYC AVX2)
    int8_two_pass = ("qkv", "fc")
    # a head model's file is read as its trunk (the "bert." prefix stripped, the heads left out)
    hf_key_map = KeyMap(
        bert_trunk_keys(""),
        BERT_IGNORED,
        task_head=("pooler.weight", "pooler.bias"),
        other_heads=TASK_HEADS,
        prefix="bert.",
        base=True,
        aliases=BERT_ALIASES,
    )

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embeddings = BertEmbeddings(c)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.hidden_act,
                bias=True,
                dropout=c.hidden_dropout_prob,
                attn_dropout=c.attention_probs_dropout_prob,
                norm_position="post",
                eps=c.layer_norm_eps,
            )
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooling_layer else None
        self.gradient_checkpointing = False
        init_bert_weights(self, config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        """input_ids (B, T); attention_mask (B, T) 1 = real token, 0 = padding; token_type_ids (B, T)
        segment ids (default 0); position_ids (B, T) (default 0..T-1, as BERT was trained)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's {self.config.max_position_embeddings} "
                f"positions; truncate the input (e.g. truncation=True, "
                f"max_length={self.config.max_position_embeddings})"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # None: segment 0, positions 0..T-1
        mask = AttentionMask.build(attention_mask, T, T, causal=False)  # padding keys hidden from every query
        x, hidden, attentions = run_blocks(
            self.layers,
            x,
            mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            checkpointing=self.gradient_checkpointing and self.training,
        )
        if output_hidden_states:
            hidden.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            x, pooled, tuple(hidden) if output_hidden_states else None, tuple(attentions) if output_attentions else None
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True


def init_bert_weights(model: nn.Module, config: BertConfig) -> None:
    """BERT's initialisation: Linear and Embedding weights ~ N(0, initializer_range), biases 0 (the
    padding row of the word embedding too), LayerNorm 1/0."""
    init_normal(model, config.initializer_range)


class BertPreTrainedModel(PreTrainedModel):
    """What every BERT head class shares: the trunk under `bert`, config, device and dtype,
    checkpoints in Hugging Face's layout, gradient checkpointing."""

    config_class = BertConfig
    hf_architecture = "BertModel"
    int8_two_pass = BertModel.int8_two_pass
    add_pooling_layer: ClassVar[bool]  # whether the trunk has the pooler (its map includes it then)
    bert: BertModel

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, self.add_pooling_layer)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()

    def gradient_checkpointing_enable(self) -> None:
        self.bert.gradient_checkpointing = True

    def _classifier_dropout(self) -> float:
        c = self.config
        return c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout


class BertLMHead(nn.Module):
    """The masked-LM head: dense + activation + LayerNorm, then the decoder to the vocabulary, whose
    weight is the word embedding (tied) and which has a bias of its own."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)
        self.ln = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h: Tensor) -> Tensor:  # (..., C) -> (..., V)
        return self.decoder(self.ln(self.act(self.dense(h))))


class _MaskedLMMixin:
    """The MLM head's use, shared by BertForMaskedLM and BertForPreTraining."""

    config: BertConfig
    bert: BertModel
    lm_head: BertLMHead
    training: bool

    def tie_weights(self) -> None:
        """Share the word embedding and the decoder weight (one tensor, one gradient)."""
        self.lm_head.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def _mlm(
        self, h: Tensor, labels: Tensor | None, num_items_in_batch: int | Tensor | None
    ) -> tuple[Tensor | None, Tensor]:
        """(loss, logits). Training with labels: the vocabulary projection (the costliest matmul) runs only
        at the scored positions, and logits are (N, V) for those N positions in order; otherwise (B, T, V)."""
        if labels is not None and self.training:
            keep = labels != IGNORE_INDEX
            logits = self.lm_head(h[keep])  # (N, V)
            return masked_lm_loss(logits, labels[keep], num_items_in_batch), logits
        logits = self.lm_head(h)  # (B, T, V)
        loss = masked_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return loss, logits

    num_loss_items = staticmethod(masked_lm_items)  # positions `labels` scores, for exact accumulation


@register("masked-lm")
class BertForMaskedLM(_MaskedLMMixin, BertPreTrainedModel):
    """BERT with the masked-LM head: input_ids (B, T) -> logits (B, T, V). `labels` (B, T): the original
    token at masked positions, -100 elsewhere (ignored)."""

    hf_architecture = "BertForMaskedLM"
    add_pooling_layer = False
    hf_key_map = head_model_keys(
        MLM_HEAD_KEYS,
        MLM_HEAD,
        ("cls.seq_relationship.", "classifier.", "qa_outputs."),
        pooler=add_pooling_layer,
        tied=True,
    )

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.lm_head = BertLMHead(config)
        init_bert_weights(self.lm_head, config)  # the trunk initialised itself
        if config.tie_word_embeddings:
            self.tie_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        if kwargs:
            raise TypeError(f"unexpected arguments for BertForMaskedLM.forward: {sorted(kwargs)}")
        out = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states
        )
        loss, logits = self._mlm(out.last_hidden_state, labels, num_items_in_batch)
        return MaskedLMOutput(loss, logits, out.hidden_states, out.attentions)


@register("pretraining")
class BertForPreTraining(_MaskedLMMixin, BertPreTrainedModel):
    """BERT's pretraining heads: masked LM on every position and next-sentence prediction on the pooled
    [CLS] (0 = B follows A, 1 = B is random). The loss is the sum of the two losses that are given."""

    hf_architecture = "BertForPreTraining"
    add_pooling_layer = True
    hf_key_map = head_model_keys(
        MLM_HEAD_KEYS + head_keys("nsp", "cls.seq_relationship"),
        POOLER + MLM_HEAD + ("nsp.weight", "nsp.bias"),
        ("classifier.", "qa_outputs."),
        pooler=add_pooling_layer,
        tied=True,
    )

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.lm_head = BertLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)
        init_bert_weights(self.lm_head, config)
        init_bert_weights(self.nsp, config)  # the trunk initialised itself
        if config.tie_word_embeddings:
            self.tie_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> PreTrainingOutput:
        if kwargs:
            raise TypeError(f"unexpected arguments for BertForPreTraining.forward: {sorted(kwargs)}")
        out = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states
        )
        mlm_loss, logits = self._mlm(out.last_hidden_state, labels, num_items_in_batch)
        nsp_logits = self.nsp(out.pooler_output)  # (B, 2)
        loss = mlm_loss
        if next_sentence_label is not None:
            nsp_loss = next_sentence_loss(nsp_logits, next_sentence_label)
            loss = nsp_loss if loss is None else loss + nsp_loss
        return PreTrainingOutput(loss, logits, nsp_logits, out.hidden_states, out.attentions)


class _BertClassifier(BertPreTrainedModel):
    """dropout + a linear classifier (`classifier`) on the pooled [CLS] token (`add_pooling_layer = True`) or
    on every token; subclasses add their loss."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_bert_weights(self.classifier, config)  # the trunk initialised itself

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def _logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        position_ids: Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
        kwargs: dict[str, Any],
    ) -> tuple[BaseModelOutputWithPooling, Tensor]:
        if kwargs:
            raise TypeError(f"unexpected arguments for {type(self).__name__}.forward: {sorted(kwargs)}")
        out = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states
        )
        features = out.pooler_output if self.add_pooling_layer else out.last_hidden_state  # (B, C) or (B, T, C)
        return out, self.classifier(dropout(features, self._classifier_dropout(), self.training))


@register("sequence-classification")
class BertForSequenceClassification(_BertClassifier):
    """BERT with dropout + a linear classifier on the pooled [CLS] token: input_ids (B, T) -> logits
    (B, num_labels). The loss follows `config.problem_type` (inferred as transformers does)."""

    hf_architecture = "BertForSequenceClassification"
    add_pooling_layer = True
    hf_key_map = head_model_keys(
        head_keys("classifier", "classifier"),
        POOLER + ("classifier.weight", "classifier.bias"),
        ("cls.", "qa_outputs."),
        pooler=add_pooling_layer,
    )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        out, logits = self._logits(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states, kwargs
        )
        loss = sequence_classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)


@register("token-classification")
class BertForTokenClassification(_BertClassifier):
    """BERT with dropout + a linear classifier on every token (e.g. named entities): logits
    (B, T, num_labels); `labels` (B, T) class ids, -100 ignored."""

    hf_architecture = "BertForTokenClassification"
    add_pooling_layer = False
    hf_key_map = head_model_keys(
        head_keys("classifier", "classifier"),
        ("classifier.weight", "classifier.bias"),
        ("cls.", "qa_outputs."),
        pooler=add_pooling_layer,
    )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> TokenClassifierOutput:
        out, logits = self._logits(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states, kwargs
        )
        loss = token_classification_loss(logits, labels) if labels is not None else None
        return TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)


@register("question-answering")
class BertForQuestionAnswering(BertPreTrainedModel):
    """BERT for extractive question answering: a linear layer gives each token a start and an end
    logit, (B, T) each. The loss is the mean of the start and end cross-entropies; positions outside the
    input are clamped to T and ignored, as transformers does."""

    hf_architecture = "BertForQuestionAnswering"
    add_pooling_layer = False
    hf_key_map = head_model_keys(
        head_keys("qa_outputs", "qa_outputs"),
        ("qa_outputs.weight", "qa_outputs.bias"),
        ("cls.", "classifier."),
        pooler=add_pooling_layer,
    )

    def __init__(self, config: BertConfig) -> None:
        if config.num_labels != 2:  # transformers sizes qa_outputs by num_labels, so a saved model must say 2
            raise ValueError(
                f"BertForQuestionAnswering has two outputs per token (start, end) and needs "
                f"num_labels=2, got {config.num_labels}; pass num_labels=2"
            )
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_bert_weights(self.qa_outputs, config)  # the trunk initialised itself

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput:
        if kwargs:
            raise TypeError(f"unexpected arguments for BertForQuestionAnswering.forward: {sorted(kwargs)}")
        out = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, output_attentions, output_hidden_states
        )
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
