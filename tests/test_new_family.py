"""A model family is added by writing its own file: a config, a model class that declares its Hugging Face
name map (`hf_key_map`) and registers itself (`@register`). Nothing in the hub, the Auto classes or the
registry is edited, yet the family saves in Hugging Face's names and loads back through the Auto classes.

The "family" below stands in for the next ones (encoder-decoder, speech): a tiny language model whose
Hugging Face names differ from its own and whose checkpoint holds an old buffer to ignore.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge import AutoConfig, AutoModelForCausalLM
from lmforge.config import PretrainedConfig
from lmforge.hub import KeyMap, KeyRule
from lmforge.models.base import PreTrainedModel
from lmforge.models.outputs import CausalLMOutput
from lmforge.models.registry import architecture_class, register
from lmforge.nn.losses import causal_lm_loss

HUB = Path(__file__).resolve().parents[1] / "lmforge" / "hub"


# ---- the family's own file would hold everything from here ... ---------------------------------------
@dataclass
class TinyConfig(PretrainedConfig):
    vocab_size: int = 17
    width: int = 8
    n_layer: int = 2
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    model_type: ClassVar[str] = "tiny-test-lm"
    model_types: ClassVar[tuple[str, ...]] = ("tiny-test-lm",)
    unsupported: ClassVar[dict[str, Any]] = {"is_encoder_decoder": False}

    def __post_init__(self) -> None:
        self._check_labels()

    def to_dict(self, architecture: tuple[str, str] = ("TinyForCausalLM", "TinyForCausalLM")) -> dict[str, Any]:
        fields = {"vocab_size": self.vocab_size, "hidden_size": self.width, "num_hidden_layers": self.n_layer}
        return {**self.extra, "model_type": self.model_type, "architectures": [architecture[0]], **fields}

    @classmethod
    def _rename_hf_keys(cls, d: dict[str, Any]) -> dict[str, Any]:
        d["width"] = d.pop("hidden_size")
        d["n_layer"] = d.pop("num_hidden_layers")
        return d


@register("causal-lm")
class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig
    hf_architecture = "TinyForCausalLM"
    hf_key_map = KeyMap(
        [
            KeyRule("embed.weight", "model.embed_tokens.weight"),
            KeyRule("layers.{i}.weight", "model.layers.{i}.dense.weight", transpose=True),
            KeyRule("layers.{i}.bias", "model.layers.{i}.dense.bias"),
            KeyRule("head.weight", "lm_head.weight"),
        ],
        re.compile(r".*\.rotary_cache$"),  # a buffer some checkpoints carry: not a parameter
        prefix="model.",
    )

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.n_layer))
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        x = self.embed(input_ids)  # (B, T, C)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        logits = self.head(x)  # (B, T, V)
        return CausalLMOutput(loss=None if labels is None else causal_lm_loss(logits, labels), logits=logits)


# ---- ... to here ----------------------------------------------------------------------------------------


def test_the_hub_names_no_family() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(HUB.glob("*.py"))).lower()
    for family in ("gpt", "bert", "tiny"):
        assert not re.search(rf"\bimport\b.*\b{family}", text), f"the hub imports something of {family}"


def test_a_new_family_saves_in_hugging_face_names_and_loads_through_the_auto_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyForCausalLM(TinyConfig())
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config == {"model_type": "tiny-test-lm", "architectures": ["TinyForCausalLM"], "vocab_size": 17,
                      "hidden_size": 8, "num_hidden_layers": 2,
                      "dtype": "float32", "torch_dtype": "float32"}  # fmt: skip
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.dense.bias",
        "model.layers.0.dense.weight",
        "model.layers.1.dense.bias",
        "model.layers.1.dense.weight",
    ]
    assert torch.equal(saved["model.layers.1.dense.weight"], model.layers[1].weight.t())  # the declared transpose

    assert isinstance(AutoConfig.from_pretrained(tmp_path), TinyConfig)
    assert architecture_class("TinyForCausalLM") is TinyForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TinyForCausalLM
    ids = torch.tensor([[1, 5, 3, 16]])
    for name, tensor in model.state_dict().items():  # a copy of the same numbers
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # same weights (above); from_pretrained lays Linear weights out for decoding (nn.inference.decode_layout),
    # so the matmuls may take another kernel path and round differently
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_a_new_family_reads_checkpoints_with_extra_buffers_and_refuses_unsupported_variants(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyForCausalLM(TinyConfig())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.rotary_cache"] = torch.zeros(3)  # ignored by the family's map
    save_file(state, tmp_path / "model.safetensors")
    assert torch.equal(TinyForCausalLM.from_pretrained(tmp_path).head.weight, model.head.weight)

    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "is_encoder_decoder": True}), encoding="utf-8")
    with pytest.raises(ValueError, match="is_encoder_decoder=True, which TinyConfig does not support"):
        AutoModelForCausalLM.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "tiny-other"}), encoding="utf-8")
    with pytest.raises(ValueError, match="model_type 'tiny-other' is not supported by AutoModelForCausalLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
