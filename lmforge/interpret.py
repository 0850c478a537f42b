"""Look inside a model: attention maps, gradient x input token attributions, and PNG plots of both.

    text -> tokens (readable labels from the tokenizer's offsets) -> one forward pass
         -> attentions: per layer (1, H, T, T) probabilities -> selected (L, H, T, T)   [attention_maps]
         -> d logit[target] / d word embedding, times the embedding, summed over C  [token_attributions]
    source [-> greedy translation] -> an encoder-decoder's forward pass with the target
         -> cross-attentions: per layer (1, H, T_tgt, T_src) -> selected (L, H, T_tgt, T_src)  [cross_attention_maps]

Plots are drawn with matplotlib's object API (`Figure` + the Agg canvas), never pyplot, so no window
opens and the user's backend and rcParams stay as they were. matplotlib is imported only when a plot
is drawn: `pip install matplotlib`. Labels that hold Chinese (or other CJK) characters need a font
that has them; `cjk_font` finds one (an installed Noto Sans CJK, Source Han Sans, WenQuanYi, ... or
the Noto Sans SC that the `zhplot` package bundles).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmforge.constants import context_length
from lmforge.files import atomic_write_bytes

if TYPE_CHECKING:  # matplotlib is optional and loaded only to draw
    from matplotlib.figure import Figure

__all__ = [
    "attention_maps",
    "cjk_font",
    "cross_attention_maps",
    "plot_attention",
    "plot_attributions",
    "plot_cross_attention",
    "token_attributions",
    "token_labels",
]

# Font family names with CJK coverage, most preferred first (matched as substrings, any case).
CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "WenQuanYi",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "PingFang",
    "Hiragino Sans GB",
    "Heiti SC",
    "Heiti",
    "Droid Sans Fallback",
    "Arial Unicode MS",
)
_LATIN_FONT = "DejaVu Sans"  # ships with matplotlib: always there, and it has the symbols used below
_NO_CJK_FONT_HINT = (
    "`pip install zhplot` (it bundles Noto Sans SC) or install a Noto Sans CJK font (e.g. apt install fonts-noto-cjk)"
)
_warned_no_cjk_font = False  # the missing-font warning is given once per process
_VISIBLE_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\r": "↵", "\t": "⇥"})  # for whitespace-only tokens
_MAX_LABEL_CHARS = 12  # longer labels are cut with "…" on the plots
_MAX_PIXELS = 40_000_000  # a larger grid is drawn at a lower dpi (an RGBA canvas of ~160 MB at most)


# ---------------------------------------------------------------------------------------------- tokens
def token_labels(tokenizer: Any, text: str, text_pair: str | None = None) -> list[str]:
    """One readable label per token of `tokenizer(text[, text_pair])`, for plots and attributions.

    A label is the text the token's offsets span in the input, so "Ġworld" reads "world" and a
    Chinese character that byte-level BPE cut into byte pieces reads as the character itself (on
    each of its pieces). Special tokens ([CLS], [SEP]) and the unknown token show the token
    itself, since that is what the model saw; a token of whitespace only shows it as ␣ / ↵ / ⇥, and
    a token with an empty span "·".
    """
    return _encode(tokenizer, text, text_pair)[1]


def _check_text(text: Any, name: str = "text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty; pass the text to look at")


def _encode(
    tokenizer: Any, text: str, text_pair: str | None = None, device: torch.device | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Model inputs for one text (each (1, T)) and one label per token."""
    _check_text(text)
    if text_pair is not None:
        _check_text(text_pair, "text_pair")
    enc = tokenizer(text, text_pair, return_tensors="pt", return_offsets_mapping=True)
    offsets = [tuple(int(v) for v in span) for span in enc.pop("offset_mapping")[0].tolist()]  # T x (start, end)
    ids = enc["input_ids"][0].tolist()
    if not ids:
        raise ValueError(f"text {text[:40]!r} gives no tokens; pass text the tokenizer can encode")
    # Offsets are into the string each token came from: with a pair, find out which one.
    segments = [0] * len(ids)
    if text_pair is not None:
        backend = getattr(tokenizer, "backend", None)
        seq_ids = backend.encode(text, text_pair).sequence_ids if backend is not None else None
        if seq_ids is not None and len(seq_ids) == len(ids):
            segments = [s if s is not None else 0 for s in seq_ids]
        elif "token_type_ids" in enc:
            segments = enc["token_type_ids"][0].tolist()
    sources = (text, text_pair or "")
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    raw = tokenizer.convert_ids_to_tokens(ids)
    labels = [
        _label(sources[seg][start:end], token, token_id in special, start == end)
        for (start, end), token, token_id, seg in zip(offsets, raw, ids, segments)
    ]
    inputs = {k: v.to(device) if device is not None else v for k, v in enc.items()}
    return inputs, labels


def _label(span: str, token: str, is_special: bool, empty: bool) -> str:
    """The readable label of one token: see `token_labels`."""
    if is_special:
        return token  # [CLS], [SEP], [UNK], <|endoftext|>: what the model saw, not the text it replaced
    if empty:
        return "·"
    stripped = span.strip()
    if stripped:
        return stripped
    return span.replace("\r\n", "\n").translate(_VISIBLE_WHITESPACE)


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), putting the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_length(model: nn.Module, n_tokens: int) -> None:
    limit = context_length(getattr(model, "config", None))
    if limit is not None and n_tokens > limit:
        raise ValueError(f"text is {n_tokens} tokens but the model handles at most {limit}; shorten the text")


def _select(requested: int | Sequence[int] | None, n: int, what: str) -> list[int]:
    """Indexes into n layers (or heads): None = all; negative indexes count from the end."""
    if requested is None:
        return list(range(n))
    items = [requested] if isinstance(requested, int) else list(requested)
    if not items:
        raise ValueError(f"{what}s is empty; pass None for all {n} {what}s or indexes in 0..{n - 1}")
    chosen = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what} indexes must be ints, got {i!r}")
        if not -n <= i < n:
            raise ValueError(
                f"{what} {i} is out of range: the model has {n} {what}s, valid indexes are "
                f"0..{n - 1} (or -{n}..-1 from the end)"
            )
        chosen.append(i % n)
    return chosen


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether model.forward takes the keyword `name` (or any keyword)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True  # cannot tell: try it
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# ---------------------------------------------------------------------------------------------- attention
def attention_maps(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    text_pair: str | None = None,
) -> tuple[list[str], Tensor]:
    """The attention probabilities of every selected layer and head for one text.

    Returns (tokens, attentions): a readable label per token (see `token_labels`) and a float32 CPU
    tensor (L, H, T, T) for the selected layers and heads, in the order given (default: all).
    attentions[l, h, i, j] is how much query token i attends to key token j; each row sums to 1, and
    a causal model (GPT) gives lower-triangular maps. Runs in eval mode without gradients; the model
    is put back in the mode it was in.
    """
    tokens, maps, _, _ = _attention(model, tokenizer, text, layers, heads, text_pair)
    return tokens, maps


def _attention(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    layers: int | Sequence[int] | None,
    heads: int | Sequence[int] | None,
    text_pair: str | None,
) -> tuple[list[str], Tensor, list[int], list[int]]:
    """(tokens, maps (L, H, T, T), the layer indexes, the head indexes), indexes counted from 0."""
    if _is_encoder_decoder(model):
        raise TypeError(
            f"{type(model).__name__} is an encoder-decoder: use cross_attention_maps(model, tokenizer, source, "
            "target=None) for its source x target attention (plot_attention draws it)"
        )
    if not _accepts(model, "output_attentions"):
        raise TypeError(
            f"{type(model).__name__} does not take output_attentions=True; use an lmforge GPT or "
            "BERT model (or one whose forward returns .attentions)"
        )
    inputs, tokens = _encode(tokenizer, text, text_pair, _device(model))
    _check_length(model, inputs["input_ids"].size(1))
    with _eval_mode(model), torch.no_grad():
        out = model(**inputs, output_attentions=True)
    per_layer = getattr(out, "attentions", None)  # per layer (1, H, T, T)
    if not per_layer:
        raise TypeError(
            f"{type(model).__name__} returned no attention weights for output_attentions=True; "
            "use an lmforge GPT or BERT model"
        )
    layer_idx = _select(layers, len(per_layer), "layer")
    head_idx = _select(heads, per_layer[0].size(1), "head")
    maps = torch.stack([per_layer[i][0] for i in layer_idx])  # (L, H_all, T, T)
    return tokens, maps[:, head_idx].float().cpu(), layer_idx, head_idx  # (L, H, T, T)


def plot_attention(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    path: str | os.PathLike,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    average_heads: bool = False,
    text_pair: str | None = None,
) -> Path:
    """Draw the attention maps of `text` as a PNG grid and return its path.

    One heatmap per (layer, head): a row of panels per layer, a column per head (one column of
    head-averaged maps with `average_heads`). Rows of a map are queries, columns keys, both labelled
    with the tokens; one colour bar (0 to the largest weight shown) serves every panel. The file is
    written atomically; missing parent folders are created. For an encoder-decoder (Marian, BART, ...)
    `text` is the source and the cross-attention over its greedy translation is drawn, as
    `plot_cross_attention` does.
    """
    if _is_encoder_decoder(model):
        if text_pair is not None:
            raise ValueError(
                "text_pair has no meaning for an encoder-decoder; to draw the cross-attention over a given "
                "translation call plot_cross_attention(model, tokenizer, source, path, target=...)"
            )
        return plot_cross_attention(
            model, tokenizer, text, path, layers=layers, heads=heads, average_heads=average_heads
        )
    path = _png_path(path)
    tokens, maps, layer_idx, head_idx = _attention(model, tokenizer, text, layers, heads, text_pair)
    _plot_maps(maps, tokens, tokens, layer_idx, head_idx, average_heads, path, "query (attending)", "key (attended to)")
    return path


def _plot_maps(
    maps: Tensor,
    row_tokens: list[str],
    col_tokens: list[str],
    layer_idx: list[int],
    head_idx: list[int],
    average_heads: bool,
    path: Path,
    row_name: str,
    col_name: str,
) -> None:
    """Draw maps (L, H, rows, cols) as a grid of heatmaps, a row of panels per layer and a column per head
    (one column, the mean over heads, with `average_heads`), and write the PNG to `path`."""
    if average_heads:
        maps = maps.mean(1, keepdim=True)  # (L, 1, rows, cols)
    n_rows, n_cols = maps.size(0), maps.size(1)
    T_rows, T_cols = maps.size(-2), maps.size(-1)
    square = T_rows == T_cols and row_tokens == col_tokens
    if n_rows * n_cols > 64:
        warnings.warn(
            f"drawing {n_rows * n_cols} attention panels; pass layers=/heads= or average_heads=True "
            "for a figure that stays readable",
            stacklevel=3,
        )

    def draw(fig: Figure) -> None:
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        vmax = max(float(maps.max()), 1e-6)
        x_ticks, x_labels = _ticks(col_tokens)
        y_ticks, y_labels = _ticks(row_tokens)
        x_size, y_size = _tick_font_size(T_cols), _tick_font_size(T_rows)
        image = None
        for r in range(n_rows):
            for c in range(n_cols):
                ax = axes[r][c]
                image = ax.imshow(
                    maps[r, c].numpy(),
                    cmap="viridis",
                    vmin=0.0,
                    vmax=vmax,
                    interpolation="nearest",
                    aspect="equal" if square else "auto",
                )
                head = "heads averaged" if average_heads else f"head {head_idx[c]}"
                ax.set_title(f"layer {layer_idx[r]}, {head}", fontsize=9)
                ax.set_xticks(x_ticks)
                ax.set_yticks(y_ticks)
                # every panel has the same tokens: label the bottom row and the left column only
                ax.set_xticklabels(x_labels if r == n_rows - 1 else [], rotation=90, fontsize=x_size)
                ax.set_yticklabels(y_labels if c == 0 else [], fontsize=y_size)
                if r == n_rows - 1:
                    ax.set_xlabel(col_name, fontsize=8)
                if c == 0:
                    ax.set_ylabel(row_name, fontsize=8)
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")

    def panel(n: int) -> float:  # inches per heatmap side: ~0.16 in per token, kept readable
        return min(max(0.16 * n + 0.9, 2.2), 7.5)

    x_room = 0.09 * min(max(map(len, col_tokens)), _MAX_LABEL_CHARS) + 0.6  # rotated tick labels
    y_room = x_room if square else 0.09 * min(max(map(len, row_tokens)), _MAX_LABEL_CHARS) + 0.6
    figsize = (n_cols * panel(T_cols) + y_room + 1.2, n_rows * (panel(T_rows) + 0.35) + x_room + 0.3)
    _save_figure(draw, figsize, row_tokens + col_tokens, path)


# ---------------------------------------------------------------------------------------------- cross-attention
def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def cross_attention_maps(
    model: nn.Module,
    tokenizer: Any,
    source: str,
    target: str | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    max_new_tokens: int = 64,
) -> tuple[list[str], list[str], Tensor]:
    """An encoder-decoder's cross-attention between a source text and its translation.

    Returns (source_tokens, target_tokens, attentions): a readable label per source token (as
    `token_labels`, `</s>` included), a label per target token, and a float32 CPU tensor
    (L, H, T_tgt, T_src) for the selected decoder layers and heads (default: all).

    The target is `target` tokenized as labels (`text_target` for a Marian tokenizer), or, with
    target=None, the model's greedy translation (`model.generate`, at most `max_new_tokens` tokens).
    Row i belongs to target token y_i: it is the decoder step that reads the decoder start token and
    y_1 .. y_{i-1} and predicts y_i (teacher forcing, decoder_input_ids = the target shifted right), so
    the decoder start token is an input but not a row, and a final `</s>` is the last row.
    attentions[l, h, i, j] is how much that step attends to source token j; each row sums to 1 over
    the source. Runs in eval mode without gradients; the model is put back in the mode it was in.
    """
    src, tgt, maps, _, _ = _cross_attention(model, tokenizer, source, target, layers, heads, max_new_tokens)
    return src, tgt, maps


def _cross_attention(
    model: nn.Module,
    tokenizer: Any,
    source: str,
    target: str | None,
    layers: int | Sequence[int] | None,
    heads: int | Sequence[int] | None,
    max_new_tokens: int,
) -> tuple[list[str], list[str], Tensor, list[int], list[int]]:
    """(source labels, target labels, maps (L, H, T_tgt, T_src), the layer indexes, the head indexes)."""
    if not _is_encoder_decoder(model):
        raise TypeError(
            f"{type(model).__name__} is not an encoder-decoder, so it has no cross-attention; "
            "use attention_maps / plot_attention for its self-attention"
        )
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError("the model's config has no decoder_start_token_id; set it to decode a target")
    device = _device(model)
    inputs, src_labels = _encode_source(tokenizer, source, device)
    _check_length(model, inputs["input_ids"].size(1))
    with _eval_mode(model), torch.no_grad():
        if target is None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
            limit = context_length(config)  # the decoder start takes one position
            max_new_tokens = min(max_new_tokens, limit - 1) if limit else max_new_tokens
            generated = model.generate(  # (1, 1 + n): the decoder start, then the greedy tokens
                inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            target_ids = generated[0, 1:].tolist()
            tgt_labels = _id_labels(tokenizer, target_ids)
        else:
            _check_text(target, "target")
            target_ids, tgt_labels = _encode_target(tokenizer, target)
        if not target_ids:
            raise ValueError("the target has no tokens; pass a target text the tokenizer can encode")
        _check_length(model, len(target_ids))
        decoder_input_ids = torch.tensor([[start, *target_ids[:-1]]], device=device)  # (1, T_tgt): shifted right
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            decoder_input_ids=decoder_input_ids,
            output_attentions=True,
        )
    per_layer = getattr(out, "cross_attentions", None)  # per decoder layer (1, H, T_tgt, T_src)
    if not per_layer:
        raise TypeError(f"{type(model).__name__} returned no cross_attentions for output_attentions=True")
    layer_idx = _select(layers, len(per_layer), "layer")
    head_idx = _select(heads, per_layer[0].size(1), "head")
    maps = torch.stack([per_layer[i][0] for i in layer_idx])  # (L, H_all, T_tgt, T_src)
    return src_labels, tgt_labels, maps[:, head_idx].float().cpu(), layer_idx, head_idx


def _takes(fn: Any, name: str) -> bool:
    """Whether the callable takes the keyword `name` (a tokenizer's __call__: offsets, text_target)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _encode_source(tokenizer: Any, text: str, device: torch.device) -> tuple[dict[str, Tensor], list[str]]:
    """The source's model inputs (1, S) and one label per token: from offsets where the tokenizer gives them,
    else from decoding the ids (a Marian tokenizer)."""
    if _takes(tokenizer, "return_offsets_mapping"):
        inputs, labels = _encode(tokenizer, text, device=device)
        return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}, labels
    _check_text(text)
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    if not ids:
        raise ValueError(f"text {text[:40]!r} gives no tokens; pass text the tokenizer can encode")
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
    return inputs, _id_labels(tokenizer, ids)


def _encode_target(tokenizer: Any, text: str) -> tuple[list[int], list[str]]:
    """A target text's label ids (special tokens added, e.g. the final </s>) and one label per token."""
    if _takes(tokenizer, "text_target"):  # Marian: the target side has its own SentencePiece model
        ids = tokenizer(text_target=text)["input_ids"]
        return list(ids), _id_labels(tokenizer, list(ids))
    if _takes(tokenizer, "return_offsets_mapping"):
        inputs, labels = _encode(tokenizer, text)
        return inputs["input_ids"][0].tolist(), labels
    ids = list(tokenizer(text)["input_ids"])
    return ids, _id_labels(tokenizer, ids)


def _id_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """One readable label per token id, without offsets (generated ids): special tokens show themselves;
    the others show the text each adds to the decoded prefix of its run of ordinary tokens, so a word-start
    piece "▁mundo" reads "mundo" and the byte pieces of one character all read as that character."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    labels: list[str] = [""] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] in special:
            labels[i] = str(tokenizer.convert_ids_to_tokens([ids[i]])[0])
            i += 1
            continue
        end = i
        while end < len(ids) and ids[end] not in special:
            end += 1
        _run_labels(tokenizer, ids, i, end, labels)
        i = end
    return labels


def _run_labels(tokenizer: Any, ids: list[int], start: int, end: int, labels: list[str]) -> None:
    """Fill labels[start:end] for a run of ordinary tokens by decoding growing prefixes of the run."""
    before, first = "", start  # the decoded text so far; the first token not labelled yet
    for i in range(start, end):
        text = tokenizer.decode(ids[start : i + 1])
        if text.endswith("\ufffd") and i + 1 < end:  # a character cut into byte pieces: wait for the rest
            continue
        piece = text[len(before) :] if text.startswith(before) else tokenizer.decode(ids[first : i + 1])
        label = "".join(ch if ch.isprintable() or ch.isspace() else _escape(ch) for ch in piece)  # no \x00 boxes
        label = _label(label, "", False, not piece)
        for j in range(first, i + 1):
            labels[j] = label
        before, first = text, i + 1


def _escape(ch: str) -> str:
    """A control character as its escape ("\\x00"): generated bytes may hold characters no font can draw."""
    return ch.encode("unicode_escape").decode("ascii")


def plot_cross_attention(
    model: nn.Module,
    tokenizer: Any,
    source: str,
    path: str | os.PathLike,
    target: str | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    average_heads: bool = False,
    max_new_tokens: int = 64,
) -> Path:
    """Draw an encoder-decoder's cross-attention (see `cross_attention_maps`) as a PNG grid and return its path.

    Source tokens run along x, target tokens down y (row i: the step that predicts target token i); one
    panel per (layer, head) as in `plot_attention`, one column of head-averaged maps with `average_heads`,
    one colour bar for all. target=None draws the model's greedy translation of `source`.
    """
    path = _png_path(path)
    src, tgt, maps, layer_idx, head_idx = _cross_attention(
        model, tokenizer, source, target, layers, heads, max_new_tokens
    )
    _plot_maps(maps, tgt, src, layer_idx, head_idx, average_heads, path, "target (predicted)", "source (attended to)")
    return path


def audio_cross_attention_maps(
    model: nn.Module,
    tokenizer: Any,
    audio: str | os.PathLike | Any,
    target: str | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    language: str | None = None,
    max_new_tokens: int = 64,
) -> tuple[list[str], list[str], Tensor]:
    """A Whisper model's cross-attention between the output tokens and the audio frames (first 30 s).

    `audio`: a file path or 16 kHz mono samples. Returns (frame labels, token labels, attentions): one label per
    encoder frame, its start time ("1.24s"; frames are 20 ms), one per output token, and a float32 CPU tensor
    (L, H, T_tokens, T_frames) for the selected decoder layers and heads, cut to the audio's length (the rest of the
    30-s window is padding). The tokens are `target` encoded by the tokenizer, or (target=None) the model's greedy
    transcription. Row i is the decoder step that predicts token i after the Whisper prompt; each row sums to 1 over
    all 1500 frames, so a cut row sums to at most 1."""
    from lmforge.speech import WhisperFeatureExtractor, load_audio

    if not hasattr(model, "prompt_ids"):
        raise TypeError(f"{type(model).__name__} is not a Whisper model; audio attention maps need one")
    samples = load_audio(audio) if isinstance(audio, (str, os.PathLike)) else audio
    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    device = _device(model)
    features = extractor(samples, sampling_rate=extractor.sampling_rate)["input_features"].to(device, model.dtype)
    with _eval_mode(model), torch.no_grad():
        prompt = model.prompt_ids(features, language=language)[0].tolist()
        if target is None:
            ids = model.generate(features, language=language, max_new_tokens=max_new_tokens, num_beams=1)[0]
            eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
            target_ids = [t for t in ids.tolist() if t != eos] + ([eos] if eos is not None else [])
        else:
            _check_text(target, "target")
            target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        if not target_ids:
            raise ValueError("the target has no tokens; pass a target text the tokenizer can encode")
        decoder_input_ids = torch.tensor([prompt + target_ids[:-1]], device=device)  # (1, P + T - 1)
        out = model(input_features=features, decoder_input_ids=decoder_input_ids, output_attentions=True)
    frames = min(-(-len(samples) // (2 * extractor.hop_length)), model.config.max_source_positions)  # 20-ms frames
    first = len(prompt) - 1  # the step that reads the prompt's last token predicts target token 0
    per_layer = out.cross_attentions  # per decoder layer (1, H, P + T - 1, 1500)
    layer_idx = _select(layers, len(per_layer), "layer")
    head_idx = _select(heads, per_layer[0].size(1), "head")
    maps = torch.stack([per_layer[i][0, :, first:, :frames] for i in layer_idx])[:, head_idx]
    frame_labels = [f"{0.02 * j:.2f}s" for j in range(frames)]
    return frame_labels, _id_labels(tokenizer, target_ids), maps.float().cpu()


def plot_audio_cross_attention(
    model: nn.Module,
    tokenizer: Any,
    audio: str | os.PathLike | Any,
    path: str | os.PathLike,
    target: str | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    average_heads: bool = False,
    language: str | None = None,
    max_new_tokens: int = 64,
) -> Path:
    """Draw `audio_cross_attention_maps` as a PNG grid (time along x, output tokens down y) and return its path."""
    path = _png_path(path)
    frames, tokens, maps = audio_cross_attention_maps(
        model, tokenizer, audio, target, layers, heads, language, max_new_tokens
    )
    layer_idx = _select(layers, len(model.model.decoder.layers), "layer")
    head_idx = _select(heads, model.config.decoder_attention_heads, "head")
    _plot_maps(maps, tokens, frames, layer_idx, head_idx, average_heads, path, "token (predicted)", "audio time")
    return path


# ---------------------------------------------------------------------------------------------- attributions
def token_attributions(
    model: nn.Module, tokenizer: Any, text: str, target: int | str | None = None, text_pair: str | None = None
) -> list[tuple[str, float]]:
    """Gradient x input of a sequence classifier's target logit, one (label, score) per token.

    The score of token t is sum_c (d logit[target] / d e_t[c]) * e_t[c], where e_t is the token's word
    embedding (before position and segment embeddings are added). `target` is a class index or a
    label name from config.id2label; default the predicted class. Runs in eval mode; parameter
    gradients are left untouched.
    """
    labels, scores, _, _ = _attributions(model, tokenizer, text, target, text_pair)
    return list(zip(labels, scores.tolist()))


def _attributions(
    model: nn.Module, tokenizer: Any, text: str, target: int | str | None, text_pair: str | None
) -> tuple[list[str], Tensor, int, Tensor]:
    """(labels, scores (T,), target class, logits (num_labels,))."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no get_input_embeddings(); token_attributions needs a "
            "sequence classifier such as BertForSequenceClassification or GPTForSequenceClassification"
        )
    inputs, labels = _encode(tokenizer, text, text_pair, _device(model))
    _check_length(model, inputs["input_ids"].size(1))
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        # a leaf copy of the word embeddings (1, T, C): its gradient is the one we want, even when
        # the parameters are frozen
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = embedding.register_forward_hook(hook)
    try:
        with _eval_mode(model), torch.enable_grad():
            logits = getattr(model(**inputs), "logits", None)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                shape = "no logits" if not isinstance(logits, Tensor) else f"logits of shape {tuple(logits.shape)}"
                raise TypeError(
                    f"{type(model).__name__} is not a sequence classifier: it returns {shape}, "
                    "expected (1, num_labels); use e.g. BertForSequenceClassification or "
                    "GPTForSequenceClassification"
                )
            if len(captured) != 1:
                raise TypeError(
                    f"{type(model).__name__}'s input embedding ran {len(captured)} times in one "
                    "forward pass; expected once"
                )
            cls = _target_class(model, logits, target)
            (grad,) = torch.autograd.grad(logits[0, cls], captured[0])  # (1, T, C)
    finally:
        handle.remove()
    embeds = captured[0].detach()
    scores = (grad * embeds).sum(-1)[0].float().cpu()  # (T,)
    return labels, scores, cls, logits.detach()[0].float().cpu()


def _target_class(model: nn.Module, logits: Tensor, target: int | str | None) -> int:
    n = logits.size(-1)
    if target is None:
        return int(logits[0].argmax())
    if isinstance(target, str):
        label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
        if target not in label2id:
            raise ValueError(f"target {target!r} is not a label of this model; its labels are {sorted(label2id)}")
        return int(label2id[target])
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target must be a class index, a label name or None, got {target!r}")
    if not 0 <= target < n:
        raise ValueError(f"target {target} is out of range: the model has {n} classes, valid targets are 0..{n - 1}")
    return target


def plot_attributions(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    path: str | os.PathLike,
    target: int | str | None = None,
    text_pair: str | None = None,
) -> Path:
    """Draw `token_attributions` as a horizontal bar chart (tokens top to bottom in text order) and
    return the PNG's path. Bars pushing towards the target class are blue, against it orange."""
    path = _png_path(path)
    labels, scores, cls, logits = _attributions(model, tokenizer, text, target, text_pair)
    config = getattr(model, "config", None)
    name = (getattr(config, "id2label", None) or {}).get(cls, str(cls))
    if len(logits) > 1 and getattr(config, "problem_type", None) in (None, "single_label_classification"):
        value = f"p = {float(logits.softmax(-1)[cls]):.3f}"
    else:  # regression or multi-label: a softmax probability would mean nothing
        value = f"logit = {float(logits[cls]):+.3f}"

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        y = list(range(len(labels)))
        colours = ["#1f77b4" if s >= 0 else "#ff7f0e" for s in scores.tolist()]
        ax.barh(y, scores.numpy(), color=colours)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(t) for t in labels], fontsize=_tick_font_size(len(labels)))
        ax.invert_yaxis()  # first token on top
        ax.set_xlabel("gradient × input (positive: towards the class)")
        ax.set_title(f"class {name!r} ({value})", fontsize=10)

    figsize = (7.0, min(max(0.24 * len(labels) + 1.4, 3.0), 40.0))
    _save_figure(draw, figsize, labels + [name], path)
    return path


# ---------------------------------------------------------------------------------------------- drawing
def _png_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} does not end in .png; the plots are written as PNG images")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name ending in .png")
    return path


def _ticks(tokens: list[str], most: int = 40) -> tuple[list[int], list[str]]:
    """Tick positions and labels: every token up to `most` tokens, then every k-th."""
    step = max(1, math.ceil(len(tokens) / most))
    ticks = list(range(0, len(tokens), step))
    return ticks, [_short(tokens[i]) for i in ticks]


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL_CHARS else label[: _MAX_LABEL_CHARS - 1] + "…"


def _tick_font_size(n: int) -> float:
    return 9.0 if n <= 16 else 8.0 if n <= 28 else 7.0


def _is_cjk(ch: str) -> bool:
    """Han, kana, hangul, CJK punctuation and full-width forms."""
    o = ord(ch)
    return (
        0x2E80 <= o <= 0x9FFF
        or 0xAC00 <= o <= 0xD7AF
        or 0xF900 <= o <= 0xFAFF
        or 0xFE30 <= o <= 0xFE4F
        or 0xFF00 <= o <= 0xFFEF
        or 0x20000 <= o <= 0x3FFFF
    )


def _matplotlib() -> Any:
    """matplotlib and the submodules the plots use, imported here when the first plot is drawn (the one
    lazy import of this module): matplotlib takes a while to import, and computing attention maps or
    attributions needs none of it, so `import lmforge.interpret` stays light."""
    try:
        import matplotlib
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        import matplotlib.font_manager
        import matplotlib.ft2font
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    return matplotlib


def _save_figure(draw: Any, figsize: tuple[float, float], texts: list[str], path: Path) -> None:
    """Build a Figure off-screen, let `draw(fig)` fill it, and write it as PNG, atomically."""
    mpl = _matplotlib()
    family, missing_glyphs = _font_family(texts)
    width, height = figsize
    dpi = min(100.0, math.sqrt(_MAX_PIXELS / (width * height)))
    with mpl.rc_context({"font.family": family}), warnings.catch_warnings():
        if missing_glyphs:  # already explained by the warning from _font_family: not once per glyph
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig = mpl.figure.Figure(figsize=figsize, dpi=dpi, layout="constrained")
        mpl.backends.backend_agg.FigureCanvasAgg(
            fig
        )  # attaches itself as fig.canvas: no pyplot, no window, no backend switch
        draw(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def _font_family(texts: list[str]) -> tuple[list[str], bool]:
    """The font family list for the labels (DejaVu Sans, then a CJK font when they need one, as a
    per-glyph fallback) and whether some glyphs will still be missing (warned about once)."""
    global _warned_no_cjk_font
    family = [_LATIN_FONT]
    chars = {ch for t in texts for ch in t if not ch.isspace()}
    if all(ord(ch) in _charmap(_latin_font_path()) for ch in chars):
        return family, False
    needs_cjk = any(_is_cjk(ch) for ch in chars)
    font = cjk_font() if needs_cjk else None
    if font is not None:
        family.append(_register_font(font))
        return family, False
    if needs_cjk and not _warned_no_cjk_font:
        _warned_no_cjk_font = True
        warnings.warn(
            f"no font with Chinese/CJK characters was found, so they show as empty boxes; {_NO_CJK_FONT_HINT}",
            UserWarning,
            stacklevel=4,
        )
    return family, needs_cjk


@cache
def _latin_font_path() -> str:
    return _matplotlib().font_manager.findfont(_LATIN_FONT)


@lru_cache(maxsize=8)
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for."""
    return frozenset(_matplotlib().ft2font.FT2Font(path).get_charmap())


def _register_font(path: Path) -> str:
    """Make a font file known to matplotlib's font manager (once) and return its family name."""
    font_manager = _matplotlib().font_manager
    if not any(Path(f.fname) == path for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def cjk_font() -> Path | None:
    """A font file with Chinese/Japanese/Korean glyphs, or None: an installed font whose family name
    is one of `CJK_FONT_NAMES` (in that order of preference), else the Noto Sans SC bundled with the
    optional `zhplot` package (found without importing zhplot, which would change rcParams)."""
    return _find_cjk_font()


@lru_cache(maxsize=1)
def _find_cjk_font() -> Path | None:
    fonts = _matplotlib().font_manager.fontManager.ttflist
    for wanted in CJK_FONT_NAMES:
        matches = [f for f in fonts if wanted.lower() in f.name.lower()]
        # prefer a regular upright face over bold/light/italic ones
        matches.sort(key=lambda f: (f.style != "normal", abs(_weight(f.weight) - 400)))
        for f in matches:
            try:
                if ord("中") in _charmap(f.fname):  # the name promises CJK glyphs: check one is there
                    return Path(f.fname)
            except (OSError, RuntimeError, ValueError):  # an unreadable font file: try the next one
                continue
    spec = importlib.util.find_spec("zhplot")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "fonts" / "NotoSansSC-Regular.ttf"
        if bundled.is_file():
            return bundled
    return None


def _weight(weight: int | str) -> int:
    if isinstance(weight, int):
        return weight
    return int(_matplotlib().font_manager.weight_dict.get(weight, 400))
