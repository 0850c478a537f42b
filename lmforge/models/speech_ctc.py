"""A speech encoder with a CTC head: lmforge's small recognizer trained from scratch (`lmforge speech train`).

    log-Mel features (B, 80, T) at 100 frames/s (Whisper's features, each clip at its own length, zero-padded)
        -> conv1 (k3, stride s1) -> GELU -> conv2 (k3, stride s2) -> GELU     (B, T', C), T' = T / (s1 * s2)
        (training: SpecAugment zeroes random bands of Mel bins and runs of frames first)
        + sinusoidal positions -> pre-norm Transformer blocks (padding masked) -> layer_norm
        -> ctc_head -> logits (B, T', V) over the config's alphabet: [blank, phonemes...] or [blank, space, a..z]

Why CTC and not Whisper's decoder here: on a 2-core CPU a CTC encoder learns the alignment of audio to symbols within
minutes (each output frame is scored on its own, no decoder has to learn where to look), and the knowledge of the
language that a decoder would have to learn from a few thousand transcripts comes instead from a word n-gram model
and a pronunciation lexicon in the beam search (`lmforge.speech.ctc_decode`), built from text alone. Why phonemes
rather than letters: sounds map to phonemes locally, while English spelling needs context the acoustic model would
have to learn (docs/speech.md has the learning curves of both).

Padded frames are zeroed after each convolution and masked out of attention, so a clip's logits do not depend on
what it is batched with. The format is lmforge's own (no Hugging Face class has this layout): config.json +
model.safetensors, with the alphabet in the config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import PretrainedConfig
from lmforge.constants import IGNORE_INDEX
from lmforge.hub import KeyMap, KeyRule, resolve_model_dir
from lmforge.models.base import PreTrainedModel, init_normal
from lmforge.models.outputs import CTCOutput
from lmforge.models.registry import register
from lmforge.nn import AttentionMask, TransformerBlock, layer_norm
from lmforge.nn.inference import apply
from lmforge.nn.layers import dropout, run_blocks
from lmforge.nn.positions import sinusoidal_table

BLANK = "<blank>"
DEFAULT_ALPHABET = [BLANK, " ", *"abcdefghijklmnopqrstuvwxyz"]


@dataclass
class SpeechCTCConfig(PretrainedConfig):
    """config.json of a CTC speech encoder (lmforge's own `model_type`)."""

    alphabet: list[str] = field(default_factory=lambda: list(DEFAULT_ALPHABET))  # index 0 is the CTC blank
    num_mel_bins: int = 80
    d_model: int = 256
    encoder_layers: int = 8
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 1024
    conv_strides: list[int] = field(default_factory=lambda: [3, 1])  # 100 frames/s -> 33 frames/s
    activation_function: str = "gelu"
    dropout: float = 0.1
    max_source_positions: int = 2000  # frames after the convolutions (60 s at 33 frames/s)
    init_std: float = 0.02
    # SpecAugment while training (Park et al. 2019): per clip, masks of up to `*_mask_width` Mel bins / frames
    freq_masks: int = 2
    freq_mask_width: int = 12
    time_masks: int = 2
    time_mask_width: int = 20
    extra: dict[str, Any] = field(default_factory=dict)

    model_type: ClassVar[str] = "lmforge_speech_ctc"
    model_types: ClassVar[tuple[str, ...]] = ("lmforge_speech_ctc",)
    default_architecture: ClassVar[str] = "SpeechEncoderForCTC"

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        if len(self.conv_strides) != 2 or min(self.conv_strides) < 1:
            raise ValueError(f"conv_strides must be two strides >= 1, got {self.conv_strides}")
        if not self.alphabet or self.alphabet[0] != BLANK or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet must start with {BLANK!r} and have no repeated symbol")

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @property
    def stride(self) -> int:
        """Feature frames per output frame."""
        return self.conv_strides[0] * self.conv_strides[1]

    def to_dict(self, architecture: tuple[str, str] | None = None) -> dict[str, Any]:
        fields_ = {k: v for k, v in vars(self).items() if k != "extra"}
        name = (architecture or (self.default_architecture,))[0]
        return {**self.extra, "model_type": self.model_type, "architectures": [name], **fields_}


def output_lengths(lengths: Tensor, strides: list[int]) -> Tensor:
    """Feature frames (B,) -> output frames (B,) after the k3, padding-1 convolutions with these strides."""
    for s in strides:
        lengths = (lengths - 1) // s + 1
    return lengths


def frame_mask(lengths: Tensor, total: int) -> Tensor:
    """(B,) lengths -> (B, total) with 1 on real frames and 0 on padding."""
    return (torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]).to(torch.long)


# lmforge's own format: the file's names are the module's names
_BLOCK = ("ln_1", "attn.qkv", "attn.proj", "ln_2", "mlp.fc", "mlp.proj")
_KEYS = [
    KeyRule(name, name)
    for module in ("conv1", "conv2", "layer_norm", "ctc_head", *(f"layers.{{i}}.{m}" for m in _BLOCK))
    for name in (f"{module}.weight", f"{module}.bias")
]


@register("speech-ctc")
class SpeechEncoderForCTC(PreTrainedModel):
    """Convolutions + Transformer encoder + a linear CTC head over the config's alphabet.

    `language_model`: the word n-gram model the beam search uses (`lmforge.speech.ctc_decode.NGramLM`), read from
    and written to the model folder as ngram_lm.json.gz; None when the folder has none (greedy decoding only)."""

    config_class = SpeechCTCConfig
    hf_architecture = "SpeechEncoderForCTC"
    hf_key_map = KeyMap(_KEYS, re.compile(r"(?!)"), prefix="")

    def __init__(self, config: SpeechCTCConfig) -> None:
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, stride=c.conv_strides[0], padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=c.conv_strides[1], padding=1)
        self.register_buffer("positions", sinusoidal_table(c.max_source_positions, c.d_model), persistent=False)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.d_model,
                c.encoder_attention_heads,
                c.encoder_ffn_dim,
                c.activation_function,
                dropout=c.dropout,
                norm_position="pre",
            )
            for _ in range(c.encoder_layers)
        )
        self.layer_norm = layer_norm(c.d_model)
        self.ctc_head = nn.Linear(c.d_model, c.vocab_size)
        init_normal(self, c.init_std)
        for conv in (self.conv1, self.conv2):  # PyTorch's default (Kaiming-uniform) init suits the GELU convs
            conv.reset_parameters()
        self.language_model: Any = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """As every lmforge model, plus the folder's word n-gram model (ngram_lm.json.gz) when it has one."""
        from lmforge.speech.ctc_decode import LM_FILE, NGramLM

        model = super().from_pretrained(path, **kwargs)
        lm_path = resolve_model_dir(path, kwargs.get("revision"), kwargs.get("cache_dir")) / LM_FILE
        model.language_model = NGramLM.load(lm_path) if lm_path.is_file() else None
        return model

    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str | None = None
    ) -> None:
        """config.json + model.safetensors [+ ngram_lm.json.gz, the language model]."""
        super().save_pretrained(directory, tokenizer=tokenizer, max_shard_size=max_shard_size)
        if self.language_model is not None:
            self.language_model.save(Path(directory))

    def forward(
        self,
        input_features: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        output_attentions: bool = False,
    ) -> CTCOutput:
        """Features (B, n_mels, T) and their frame mask (B, T) (1 = real) -> CTC logits (B, T', V) and
        `output_lengths` (B,). With `labels` (B, L) (alphabet ids, -100 = padding): the CTC loss summed over the
        batch and divided by the number of label symbols (or by `num_items_in_batch`)."""
        c = self.config
        if input_features.dim() != 3 or input_features.size(1) != c.num_mel_bins:
            raise ValueError(
                f"expected log-Mel features (batch, {c.num_mel_bins}, frames), got {tuple(input_features.shape)}"
            )
        B, _, T = input_features.shape
        lengths = (
            attention_mask.sum(dim=1)
            if attention_mask is not None
            else torch.full((B,), T, device=input_features.device)
        )
        x = input_features.to(self.conv1.weight.dtype)
        if attention_mask is not None:
            x = x * attention_mask[:, None, :].to(x.dtype)  # padding reads as zeros, as past a clip's end
        if self.training:
            x = spec_augment(x, lengths, c)
        mask1 = frame_mask(output_lengths(lengths, c.conv_strides[:1]), -(-T // c.conv_strides[0]))
        x = F.gelu(self.conv1(x)) * mask1[:, None, :]  # (B, C, T1), padding zeroed
        out_lengths = output_lengths(lengths, c.conv_strides)
        mask2 = frame_mask(out_lengths, -(-x.size(2) // c.conv_strides[1]))  # (B, T')
        x = F.gelu(self.conv2(x)) * mask2[:, None, :]  # (B, C, T')
        T2 = x.size(2)
        if T2 > c.max_source_positions:
            raise ValueError(
                f"{T} feature frames give {T2} encoder positions, more than max_source_positions "
                f"({c.max_source_positions}); cut the audio into shorter pieces"
            )
        x = x.transpose(1, 2) + self.positions[:T2]  # (B, T', C)
        x = dropout(x, c.dropout, self.training)
        mask = AttentionMask.build(mask2, T2, T2, causal=False)
        x, _, attentions = run_blocks(self.layers, x, mask, output_attentions=output_attentions)
        logits = apply(self.ctc_head, apply(self.layer_norm, x))  # (B, T', V)
        loss = None
        if labels is not None:
            loss = ctc_loss(logits, out_lengths, labels, num_items_in_batch)
        return CTCOutput(loss, logits, out_lengths, tuple(attentions) if output_attentions else None)

    @staticmethod
    def num_loss_items(labels: Tensor) -> Tensor:
        """Label symbols in `labels` (the loss is a mean over them)."""
        return (labels != IGNORE_INDEX).sum()


def _bands(count: int, width: int, size: Tensor, total: int) -> Tensor:
    """(B, total) bool: `count` random runs of 0..width-1 positions each, inside each row's first size[b]."""
    B = size.size(0)
    hit = torch.zeros(B, total, dtype=torch.bool, device=size.device)
    pos = torch.arange(total, device=size.device)
    for _ in range(count):
        w = torch.randint(0, width, (B,), device=size.device)
        start = (torch.rand(B, device=size.device) * (size - w).clamp(min=1)).long()
        hit |= (pos[None] >= start[:, None]) & (pos[None] < (start + w)[:, None])
    return hit


def spec_augment(x: Tensor, lengths: Tensor, c: SpeechCTCConfig) -> Tensor:
    """Zero random Mel bands and frame runs of features x (B, n_mels, T) (global RNG: seeded runs repeat)."""
    B, n_mels, T = x.shape
    freq = _bands(c.freq_masks, c.freq_mask_width, torch.full((B,), n_mels, device=x.device), n_mels)  # (B, n_mels)
    time_ = _bands(c.time_masks, c.time_mask_width, lengths, T)  # (B, T)
    return x.masked_fill(freq[:, :, None] | time_[:, None, :], 0.0)


def ctc_loss(logits: Tensor, lengths: Tensor, labels: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """CTC loss of logits (B, T', V) with output `lengths` (B,) against `labels` (B, L) (-100 = padding), summed
    and divided by the label symbol count (`num_items` when given). Clips too short for their text (CTC needs
    T' >= label length + repeated neighbours) give zero rather than infinity."""
    target_lengths = (labels != IGNORE_INDEX).sum(dim=1)
    targets = labels.clamp(min=0)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T', B, V), as F.ctc_loss takes them
    summed = F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=0, reduction="sum", zero_infinity=True)
    return summed / (num_items if num_items is not None else target_lengths.sum().clamp(min=1))
