"""Loading models: any Hugging Face causal LM by hub name or local ``save_pretrained`` directory,
bound to its model adapter."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapters import BoundAdapter, bind_adapter
from .errors import KeditError
from .fingerprint import model_fingerprint

__all__ = ["LoadedModel", "load_model", "wrap_model", "MODEL_ALIASES", "resolve_dtype", "resolve_device"]

# Names that resolve to a model shipped with kedit (filled in by kedit's own modules, e.g. the toy world).
MODEL_ALIASES: dict[str, Callable[[], str]] = {}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise KeditError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(sorted(_DTYPES))}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KeditError("device 'cuda' was requested but torch sees no CUDA device")
    return device


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and its bound adapter: what editors, statistics and evaluation take."""

    model: nn.Module
    tokenizer: object
    adapter: BoundAdapter
    source: str = "<in memory>"
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)


def _prepare_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None:
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise KeditError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def wrap_model(model: nn.Module, tokenizer, source: str = "<in memory>") -> LoadedModel:
    """Bind an already-loaded model and tokenizer (switches the model to eval mode and freezes it:
    editors enable gradients only where they need them)."""
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=bind_adapter(model), source=source)


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer by hub name or local directory, a ``.gguf`` file, or a kedit
    alias: ``toy`` (the toy fact world's model) or a zoo model such as ``smollm2-135m`` /
    ``gemma3-270m`` (:mod:`kedit_core.zoo`; GGUF files are dequantized once into kedit's cache).
    Nothing is downloaded when ``HF_HUB_OFFLINE=1``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .zoo import resolve_model

    name = str(name_or_path)
    if name not in MODEL_ALIASES:
        from . import toyworld  # noqa: F401  (registers the "toy" alias; imported late to keep imports light)
    if name in MODEL_ALIASES:
        name = MODEL_ALIASES[name]()
    name, provenance = resolve_model(name)
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    path = Path(name)
    is_dir = path.is_dir()
    if not is_dir and (path.exists() or path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        # Clearly meant as a local path (a hub name is "org/name"): say so rather than try the hub.
        what = "is a file, not a model directory (save_pretrained)" if path.exists() else "does not exist"
        raise KeditError(f"could not load model {name!r}: the path {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = ("" if is_dir else " It is not a local directory, so it would have to come from the Hugging Face "
                "hub, which is unreachable or not cached here.")
        raise KeditError(f"could not load model {name!r}: {str(exc).splitlines()[0]}.{hint}") from None
    except Exception as exc:  # safetensors reports a truncated or corrupt weights file with its own error type
        if type(exc).__name__ != "SafetensorError":
            raise
        raise KeditError(f"could not load model {name!r}: its weights file is corrupt or truncated "
                         f"({str(exc).splitlines()[0]})") from None
    model.to(device)
    loaded = wrap_model(model, tokenizer, source=name)
    loaded.info.update({"dtype": str(loaded.dtype).replace("torch.", ""), "device": str(device), **provenance})
    return loaded
