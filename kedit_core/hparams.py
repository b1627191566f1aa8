"""Hyper-parameters as validated data: frozen dataclasses that reject unknown keys and wrong types,
load from JSON files or dicts, and write themselves next to every result.

Subclass :class:`HyperParams` as a frozen dataclass, give every field a type and a default, and put
value checks in :meth:`HyperParams.validate`::

    @dataclass(frozen=True)
    class MyHParams(HyperParams):
        layers: list[int] = field(default_factory=lambda: [3, 4])
        lr: float = 0.5

        def validate(self):
            self.require(self.lr > 0, "lr", "must be positive")
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from .errors import HyperParamsError

__all__ = ["HyperParams", "find_model_defaults", "model_name_keys", "parse_assignments"]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the value (lists become lists, ints
    are accepted for floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except HyperParamsError as exc:
                errors.append(str(exc))
        raise HyperParamsError(f"{where}: expected {_type_name(tp)}; got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise HyperParamsError(f"{where}: expected one of {list(get_args(tp))}; got {value!r}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise HyperParamsError(f"{where}: expected a list; got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise HyperParamsError(f"{where}: expected {len(args)} items; got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise HyperParamsError(f"{where}: expected an object; got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise HyperParamsError(f"{where}: expected true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise HyperParamsError(f"{where}: expected an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperParamsError(f"{where}: expected a number; got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            raise HyperParamsError(f"{where}: expected a finite number; got an integer of {len(str(value))} "
                                   "digits") from None
        if not math.isfinite(value):  # JSON's NaN/Infinity: no setting means "not a number"
            raise HyperParamsError(f"{where}: expected a finite number; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise HyperParamsError(f"{where}: expected a string; got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise HyperParamsError(f"{where}: expected {_type_name(tp)}; got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """Base class for editor hyper-parameters (see module docstring)."""

    # Keys accepted in input files and ignored with no effect, e.g. a reference file's comment fields.
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{type(self).__name__}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Override to check values (call :meth:`require`)."""

    def require(self, condition: bool, field_name: str, message: str) -> None:
        if not condition:
            raise HyperParamsError(f"{type(self).__name__}.{field_name} = {getattr(self, field_name)!r}: {message}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "hyper-parameters"):
        if not isinstance(data, dict):
            raise HyperParamsError(f"{source}: expected an object of hyper-parameters; got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(data) - known - cls.IGNORED_KEYS)
        if unknown:
            raise HyperParamsError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; "
                                   f"valid keys are {sorted(known)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except HyperParamsError as exc:
            raise HyperParamsError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path):
        from .requests import read_json_file

        path = Path(path)
        return cls.from_dict(read_json_file(path, what="hyper-parameter file", error=HyperParamsError),
                             source=str(path))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise HyperParamsError(f"unknown key(s) {unknown} for {type(self).__name__}; valid keys are "
                                   f"{sorted(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | Path) -> Path:
        from .atomic import write_json_atomic

        return write_json_atomic(path, self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Published per-model defaults shipped as JSON files, and hyper-parameters given as command-line flags

def model_name_keys(model) -> list[str]:
    """The names a model's default hyper-parameter files may have, most specific first: a zoo alias
    (``smollm2-135m``), the lowercased hub name with ``/`` as ``_`` (``eleutherai_gpt-j-6b``), then its
    last component (``gpt-j-6b``).
    ``model`` is a :class:`~kedit_core.models.LoadedModel` (its ``source``) or a name/path string."""
    alias = (getattr(model, "info", None) or {}).get("alias")   # a zoo model, loaded from kedit's cache
    source = str(getattr(model, "source", model)).rstrip("/\\")
    if not source or source.startswith("<"):
        return [alias.lower()] if alias else []
    keys = [alias.lower() if alias else "", source.replace("\\", "/").lower().replace("/", "_"),
            Path(source).name.lower()]
    return list(dict.fromkeys(k for k in keys if k))


def find_model_defaults(directory: str | Path, model) -> Path | None:
    """The JSON file in ``directory`` that holds the published defaults for ``model`` (see
    :func:`model_name_keys`: ``gpt2-xl.json`` matches ``gpt2-xl``, ``openai-community/gpt2-xl`` and
    ``/models/gpt2-xl``), or None when kedit ships none for it."""
    directory = Path(directory)
    for key in model_name_keys(model):
        candidate = directory / f"{key}.json"
        if candidate.is_file():
            return candidate
    return None


def parse_assignments(cls: type[HyperParams], assignments) -> dict:
    """``["lr=1e-3", "layers=[0,1]", "module=mlp"]`` (command-line ``--set`` flags) as overrides for
    ``cls``: values are JSON, a bare word is a string; unknown keys and wrong types are errors. Pass the
    result to :func:`kedit_core.resolve_hparams` as keyword overrides."""
    known = set(cls.field_names())
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise HyperParamsError(f"hyper-parameter flag {item!r}: expected KEY=VALUE")
        if key not in known:
            raise HyperParamsError(f"hyper-parameter flag {item!r}: unknown key {key!r} for {cls.__name__}; "
                                   f"valid keys are {sorted(known)}")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        where = f"{cls.__name__}.{key} (flag {item!r})"
        try:
            out[key] = _coerce(value, hints[key], where)
        except HyperParamsError as first:
            if value == raw:
                raise
            try:
                out[key] = _coerce(raw, hints[key], where)  # e.g. a string field given a number-like word
            except HyperParamsError:
                raise first from None
    return out
