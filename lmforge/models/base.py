"""What every model class shares: checkpoints in Hugging Face's layout, device, dtype, size."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge import hub
from lmforge.hub import KeyMap


def init_normal(model: nn.Module, std: float) -> None:
    """The GPT-2 / BERT initialisation: Linear and Embedding weights ~ N(0, std), biases 0 (and an
    embedding's padding row), LayerNorm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class PreTrainedModel(nn.Module):
    """Base of every lmforge model: `save_pretrained` / `from_pretrained` (through `lmforge.hub`),
    `device`, `dtype`, `num_parameters`. Subclasses set `config_class`, `hf_architecture` (the class
    name written to config.json's "architectures") and `hf_key_map` (how their parameter names map to
    Hugging Face's, declared in the family's file)."""

    config_class: ClassVar[type]
    hf_architecture: ClassVar[str]
    hf_key_map: ClassVar[KeyMap]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied tensor is counted once

    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str | None = None
    ) -> None:
        """Write config.json + model.safetensors under Hugging Face's parameter names [+ tokenizer files];
        `max_shard_size` (e.g. "2GB") splits the weights into shards with an index, as transformers does."""
        hub.save_pretrained(self, directory, tokenizer=tokenizer, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a directory written by `save_pretrained`, a Hugging Face directory of the same family, or
        a model id from the local Hugging Face cache. A head the checkpoint lacks (or has in another size,
        e.g. `num_labels=`) is freshly initialised, with a warning; `dtype=`, `device=` as in transformers."""
        return hub.load_pretrained(cls, path, **kwargs)
