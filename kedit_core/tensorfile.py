"""kedit's tensor files (deltas, statistics, checkpoints): safetensors only, so loading one never runs
code (no pickle), written atomically, and read in two steps. :func:`open_tensor_file` first reads the
header (kedit's metadata, every tensor's name, dtype and shape) and validates it: names must be plain
dotted identifiers (nothing path-like), shapes within bounds, metadata a JSON object. Tensors are
read only after that, so a file whose header names a path or claims an absurd shape is rejected
before anything is allocated. Every failure is a :class:`~kedit_core.errors.TensorFileError` that names
the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import TensorFileError

__all__ = ["METADATA_KEY", "MAX_DIM", "MAX_NUMEL", "TensorFile", "open_tensor_file", "safetensors_metadata",
           "read_safetensors_metadata", "atomic_save_safetensors", "tensor_sha256", "check_name", "FLOAT_DTYPES"]

METADATA_KEY = "kedit"
# Bounds on what a header may claim, far above any real model (Llama-3-405B: d_ff 53,248, vocabulary
# 128,256, 6.8e8 elements in its largest matrix) and far below what would exhaust a machine's memory
# by accident.
MAX_DIM = 1 << 24
MAX_NUMEL = 1 << 33
MAX_METADATA_CHARS = 1 << 24
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")


def check_name(name: Any, what: str, source: str | os.PathLike) -> str:
    """``name`` if it is a plain dotted identifier (``transformer.h.3.mlp.c_proj.weight``); anything
    else (a path, ``..``, a separator, an empty string, a non-string) is a :class:`TensorFileError`."""
    if not isinstance(name, str) or len(name) > 512 or not _NAME.match(name):
        raise TensorFileError(f"{source}: {what} {name!r} is not a plain dotted name (letters, digits, '_' and "
                              "'.' only); the file is not one kedit wrote")
    return name


def safetensors_metadata(meta: dict) -> dict[str, str]:
    """kedit's metadata as one sorted JSON string under one key: safetensors writes its metadata map
    in hash order, so several keys would make identical saves differ byte-wise."""
    return {METADATA_KEY: json.dumps(meta, sort_keys=True, default=str)}


def read_safetensors_metadata(raw: Mapping[str, str] | None) -> dict:
    """kedit's metadata from a safetensors metadata map; ``{}`` when it is absent, not JSON, too
    large or too deeply nested to parse, or not a JSON object."""
    text = (raw or {}).get(METADATA_KEY)
    if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (CPU, contiguous; any dtype)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: dict) -> Path:
    """Write ``tensors`` (moved to the CPU, in sorted name order) and kedit's metadata to ``path``
    atomically: a temporary file in the same directory, then a rename, so a reader (or a process
    killed mid-write, or a disk that fills up) never sees a partial file."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=safetensors_metadata(meta))
    return Path(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class TensorFile:
    """An open tensor file whose header passed validation: ``meta`` (kedit's metadata), and per tensor
    its ``shapes`` and safetensors ``dtypes`` (``"F32"``, ``"BF16"``, ``"I64"``...). :meth:`get` reads
    one tensor."""

    path: Path
    meta: dict
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    _handle: Any = None

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def fail(self, message: str) -> TensorFileError:
        return TensorFileError(f"{self.path}: {message}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise self.fail(f"has no tensor {name!r} (it holds {self.names})")
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:  # safetensors reports damage with several error types
            raise self.fail(f"tensor {name!r} is unreadable ({_first_line(exc)})") from None


# safetensors' own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: Path, what: str) -> tuple[dict, dict[str, tuple[int, ...]], dict[str, str]]:
    """``(raw metadata, shapes, dtypes)`` from the header alone: 8 bytes of little-endian length, then
    JSON (the safetensors format). Read by hand because ``safe_open`` maps the whole file first, which a
    header claiming terabytes makes fail (or succeed) for reasons that have nothing to do with the claim."""
    def bad(message: str) -> TensorFileError:
        return TensorFileError(f"{path} is not a readable safetensors {what} ({message})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than a header")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad(f"header is not JSON: {_first_line(exc)}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    shapes, dtypes = {}, {}
    for name, info in header.items():
        check_name(name, "tensor name", path)
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name!r} has no valid shape")
        numel = 1
        for dim in shape:
            numel *= dim
        if any(dim > MAX_DIM for dim in shape) or numel > MAX_NUMEL:
            raise TensorFileError(f"{path}: tensor {name!r} claims shape {shape}, beyond what kedit reads (at most "
                                  f"{MAX_DIM} per dimension and {MAX_NUMEL} elements)")
        shapes[name] = tuple(shape)
        dtypes[name] = str(info.get("dtype"))
    return raw_meta if isinstance(raw_meta, dict) else {}, shapes, dtypes


@contextlib.contextmanager
def open_tensor_file(path: str | os.PathLike, *, what: str = "tensor file") -> Iterator[TensorFile]:
    """Open a safetensors file and validate its header (see the module docstring); yields a
    :class:`TensorFile`. ``what`` names the kind of file in errors (``"delta file"``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise TensorFileError(f"{what} not found: {path}")
    if not path.is_file():
        raise TensorFileError(f"{path}: expected a {what}, found a directory or special file")
    raw_meta, shapes, dtypes = _read_header(path, what)   # validated before anything is mapped or allocated
    try:
        handle_cm = safe_open(str(path), framework="pt")   # checks offsets, sizes and coverage of the data
        handle = handle_cm.__enter__()
    except Exception as exc:
        raise TensorFileError(f"{path} is not a readable safetensors {what} ({_first_line(exc)})") from None
    try:
        yield TensorFile(path, read_safetensors_metadata(raw_meta), shapes, dtypes, handle)
    finally:
        handle_cm.__exit__(None, None, None)
