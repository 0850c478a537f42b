"""What every model class shares: checkpoints in Hugging Face's layout, device, dtype, size."""

from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge import hub
from lmforge.hub import KeyMap
from lmforge.nn.inference import decode_layout
from lmforge.nn.quantize import cpu_has_native_bf16, is_quantized, quantize


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """'bf16' -> torch.bfloat16 etc. (the hub's names, and its error for a name that is no float dtype);
    torch dtypes, 'auto' and None pass through."""
    return hub.torch_dtype(dtype, "dtype argument") if isinstance(dtype, str) and dtype != "auto" else dtype


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
    # Linear layers (by attribute name) that int8 quantization gives two passes (see lmforge.nn.quantize)
    int8_two_pass: ClassVar[tuple[str, ...]] = ()

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
        if is_quantized(self):
            raise ValueError(
                "this model is int8-quantized for inference and is not saved that way: save the float model, "
                "and quantize when loading it (from_pretrained(path, quantize='int8') or --quantize int8)"
            )
        hub.save_pretrained(self, directory, tokenizer=tokenizer, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a directory written by `save_pretrained`, a Hugging Face directory of the same family, or
        a model id from the local Hugging Face cache. A head the checkpoint lacks (or has in another size,
        e.g. `num_labels=`) is freshly initialised, with a warning; `dtype=`, `device=` as in transformers
        ("bf16" / "fp16" / "fp32" short names too); `quantize="int8"` for int8 Linear layers (CPU inference)."""
        mode = kwargs.pop("quantize", None)
        if "dtype" in kwargs:
            kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
        if mode is not None and kwargs.get("dtype") not in (None, "auto", torch.float32):
            raise ValueError(
                f"quantize={mode!r} computes in float32 around int8 weights; drop dtype={kwargs['dtype']} "
                "(or use dtype alone, without quantize)"
            )
        model = hub.load_pretrained(cls, path, **kwargs)
        decode_layout(model)  # faster one-row matmuls when decoding; same values (lmforge.nn.inference)
        if mode is not None:
            model.quantize(mode)
        elif model.dtype == torch.bfloat16 and model.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "bfloat16 on this CPU (no AVX512-BF16 / AMX) is emulated: matmuls over more than a few rows run "
                "slower than float32. For speed on this CPU use quantize='int8' (--quantize int8)",
                stacklevel=2,
            )
        return model

    def quantize(self, mode: str = "int8") -> Any:
        """Int8 inference in place (`lmforge.nn.quantize`): every Linear's weights become int8, activations
        are quantized per call; ~4x smaller and several times faster to decode on a CPU. Returns the model."""
        if self.dtype != torch.float32:
            self.float()  # int8 weights are made from, and answer in, float32
        return quantize(self, mode, two_pass=self.int8_two_pass)

    @property
    def is_quantized(self) -> bool:
        return is_quantized(self)
