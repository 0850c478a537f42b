"""Model configurations: dataclasses that read and write Hugging Face-shaped `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmforge.files import atomic_write_text

POSITION_KINDS = ("learned", "sinusoidal", "rotary")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


class PretrainedConfig:
    """Base of every family's config (transformers' name). What every config shares: the
    sequence-classification label map (num_labels / id2label / label2id / problem_type, as Hugging Face
    keeps them), `updated`, reading config.json (`from_dict`) and writing it. Subclasses are dataclasses
    with those fields and an `extra` dict; they set `model_type` / `model_types` and write `to_dict`."""

    num_labels: int | None
    id2label: dict[int, str] | None
    label2id: dict[str, int] | None
    problem_type: str | None
    extra: dict[str, Any]

    def _check_labels(self) -> None:
        """Fill num_labels / id2label / label2id from whichever was given, and check they agree."""
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}  # JSON keys are strings
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(
                    f"num_labels={self.num_labels} but id2label has {len(self.id2label)} entries; "
                    "pass one of them, or make them agree"
                )
            self.num_labels = len(self.id2label)
        else:
            self.num_labels = 2 if self.num_labels is None else self.num_labels
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.num_labels <= 0:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}")
        if self.label2id is None:
            self.label2id = {label: i for i, label in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError(
                "problem_type='single_label_classification' needs num_labels > 1; use num_labels=2 "
                "for binary classification, or problem_type='regression' for one output"
            )

    def updated(self, **overrides: Any) -> Any:
        """A copy with `overrides` applied and checked again, as `from_pretrained(path, **overrides)` wants:
        a new `num_labels` replaces the label map with LABEL_0..N-1 (unless `id2label` is given too), and a
        new `id2label` brings its inverse `label2id`."""
        unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option(s) {unknown}")
        if "id2label" in overrides:
            overrides.setdefault("num_labels", None)
            overrides.setdefault("label2id", None)
        elif overrides.get("num_labels") not in (None, self.num_labels):
            overrides.update(id2label=None, label2id=None)
        overrides.setdefault("extra", dict(self.extra))  # the copy does not share the original's dict
        return dataclasses.replace(self, **overrides)

    def save(self, directory: str | os.PathLike, architecture: tuple[str, str] | None = None) -> Path:
        """Write config.json; `architecture`: the saved model's (Hugging Face, lmforge) class names
        (None: the config's default)."""
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        content = self.to_dict(architecture) if architecture else self.to_dict()  # type: ignore[attr-defined]
        atomic_write_text(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Any:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json at {path}: a model directory needs config.json (written by save_pretrained)"
            )
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-save the model with save_pretrained") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Any:
        return cls.from_json_file(Path(directory) / "config.json")

    # set by each family: the config.json model_types it reads (the first is the default), and the
    # settings of variants it does not implement (key -> the only value accepted)
    model_types: ClassVar[tuple[str, ...]] = ()
    unsupported: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _rename_hf_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Family hook: config.json keys -> the config's fields (the dict is the reader's own copy)."""
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Read a config.json dict: check model_type, refuse unsupported variants rather than load a
        different model, keep unknown keys in `extra` (written back on save)."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_types[0])
        if model_type not in cls.model_types:
            raise ValueError(
                f"config has model_type {model_type!r}; {cls.__name__} reads {' or '.join(map(repr, cls.model_types))}"
            )
        d.pop("architectures", None)
        if d.get("id2label") is not None:
            d.pop("num_labels", None)  # the label map wins, as in Hugging Face
        for key, default in cls.unsupported.items():
            if d.get(key, default) != default:
                raise ValueError(
                    f"config.json sets {key}={d[key]!r}, which {cls.__name__} does not support (only {key}={default!r})"
                )
        d = cls._rename_hf_keys(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)


@dataclass
class GPTConfig(PretrainedConfig):
    """A decoder-only Transformer. Field names are GPT-2's `config.json` keys where they exist.

    The defaults are GPT-2-shaped (learned positions, tanh GELU, biases, pre-norm with a final
    LayerNorm, tied embeddings), so a GPT-2 checkpoint loads unchanged.
    """

    vocab_size: int = 8192
    n_positions: int = 256  # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_inner: int | None = None  # feed-forward width; None = 4 * n_embd
    activation_function: str = "gelu_new"
    dropout: float = 0.0  # residual, embedding and attention dropout
    bias: bool = True
    position_embedding: str = "learned"  # learned | sinusoidal | rotary
    rope_theta: float = 10000.0
    norm_position: str = "pre"  # pre (GPT-2) | post (GPT-1)
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # sequence classification (GPTForSequenceClassification); as in Hugging Face, the label map is
    # what config.json stores and num_labels follows it. None = from id2label, else 2.
    num_labels: int | None = None
    id2label: dict[int, str] | None = None  # None = {i: "LABEL_i"}; JSON keys are strings, ints here
    label2id: dict[str, int] | None = None  # None = the inverse of id2label
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept on save

    model_type: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2", "lmforge-gpt")
    # GPT-2 attention variants lmforge does not implement
    unsupported: ClassVar[dict[str, Any]] = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.position_embedding not in POSITION_KINDS:
            raise ValueError(f"position_embedding must be one of {POSITION_KINDS}, got {self.position_embedding!r}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.position_embedding == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary positions need an even head size (n_embd / n_head)")
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_labels()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def is_gpt2_compatible(self) -> bool:
        """True when Hugging Face's GPT2LMHeadModel can load this model unchanged."""
        return (
            self.position_embedding == "learned"
            and self.bias
            and self.norm_position == "pre"
            and self.activation_function in ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh", "silu")
        )

    # ---- JSON in Hugging Face's shape -------------------------------------------------------
    def to_dict(self, architecture: tuple[str, str] = ("GPT2LMHeadModel", "GPTForCausalLM")) -> dict[str, Any]:
        """config.json's content. `architecture`: the saved model's (Hugging Face, lmforge) class names;
        the Hugging Face one is written when transformers can load the model. num_labels is not written:
        as in Hugging Face it is len(id2label)."""
        if len(self.id2label or {}) != self.num_labels:
            raise ValueError(
                f"num_labels={self.num_labels} but id2label has {len(self.id2label or {})} entries; "
                "build the config with config.updated(num_labels=...) so the label map follows"
            )
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "num_labels")}
        gpt2 = self.is_gpt2_compatible()
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "model_type": "gpt2" if gpt2 else "lmforge-gpt",
                "architectures": [architecture[0] if gpt2 else architecture[1]],
                **d,
                "n_ctx": self.n_positions,
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout,
            }
        )
        return out

    @classmethod
    def _rename_hf_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "dropout" not in d and "resid_pdrop" in d:
            d["dropout"] = d["resid_pdrop"]
        if "bias" not in d:
            d["bias"] = True  # GPT-2 always has biases
        for drop in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "n_ctx"):
            d.pop(drop, None)
        return d


@dataclass
class BertConfig(PretrainedConfig):
    """A bidirectional encoder (BERT). Field names are Hugging Face's BertConfig keys, and the
    defaults are bert-base's, so a BERT checkpoint's config.json reads unchanged."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) GELU
    hidden_dropout_prob: float = 0.1  # embeddings, residual branches, feed-forward
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segments A / B (token_type_ids)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None  # None = hidden_dropout_prob
    tie_word_embeddings: bool = True  # the MLM decoder is the word embedding
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept on save

    model_type: ClassVar[str] = "bert"
    model_types: ClassVar[tuple[str, ...]] = ("bert",)
    # BERT variants lmforge does not implement
    unsupported: ClassVar[dict[str, Any]] = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
    }

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self._check_labels()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self, architecture: tuple[str, str] = ("BertForMaskedLM", "BertForMaskedLM")) -> dict[str, Any]:
        """config.json's content, as Hugging Face's BertConfig writes it (num_labels follows id2label)."""
        if len(self.id2label or {}) != self.num_labels:
            raise ValueError(
                f"num_labels={self.num_labels} but id2label has {len(self.id2label or {})} entries; "
                "build the config with config.updated(num_labels=...) so the label map follows"
            )
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "num_labels")}
        out: dict[str, Any] = dict(self.extra)
        out.update({"model_type": "bert", "architectures": [architecture[0]], **d})
        return out
