"""Model fingerprints: a content hash that tells one set of weights from another, recorded in delta
files and statistics caches so they are never applied to or reused for the wrong model.

The hash covers the config (minus its name/path), every parameter's name, shape and dtype, and its
bytes: all of them for tensors up to ``FULL_HASH_NUMEL`` elements, and an evenly strided sample of
``SAMPLE_NUMEL`` elements (first and last included) for larger ones, so that hashing a 7B model
takes well under a second. Any dense edit (MEMIT, ROME, fine-tuning, LoRA merges) changes sampled
bytes. The hash reads bytes, so it is the same on CPU and GPU.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

FULL_HASH_NUMEL = 1 << 20
SAMPLE_NUMEL = 1 << 16
_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                        "torch_dtype", "dtype", "_attn_implementation_autoset", "_attn_implementation",
                        "architectures", "use_cache"}


def _config_digest(config) -> str:
    if config is None:
        return "no-config"
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    data = {k: v for k, v in data.items() if k not in _IGNORED_CONFIG_KEYS}
    return json.dumps(data, sort_keys=True, default=str)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > FULL_HASH_NUMEL:
        # float32 linspace can round the last index up to numel for large tensors: clamp it back.
        idx = torch.linspace(0, flat.numel() - 1, SAMPLE_NUMEL, device=flat.device).round().long()
        idx = idx.clamp_(max=flat.numel() - 1)
        flat = flat[idx]
    flat = flat.contiguous().cpu()
    # view as bytes: safe for any dtype (bf16 has no numpy equivalent)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def parameter_digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over the config and the (sampled) parameter contents."""
    h = hashlib.sha256()
    h.update(_config_digest(getattr(model, "config", None)).encode())
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(f"{tuple(param.shape)}|{param.dtype}".encode())
        h.update(_tensor_bytes(param))
    return "sha256:" + h.hexdigest()
