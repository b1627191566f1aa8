"""The editor interface every editing method implements, and :func:`compute_edit`, which runs one.

An editor *computes* an edit: it returns :class:`~kedit_core.deltas.Deltas` and never leaves the
model changed (if it must measure a partially edited model it uses
:func:`~kedit_core.deltas.temporarily_applied` or :func:`~kedit_core.deltas.preserved_weights`).
Applying and reverting are the core's job.
"""
from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from .deltas import Deltas
from .errors import KeditError, KeditRuntimeError, NumericalError, RecordError
from .hparams import HyperParams
from .models import LoadedModel
from .requests import EditRequest, requests_sha256

__all__ = ["Editor", "EditContext", "EditResult", "PhaseTimer", "check_requests_fit", "compute_edit", "get_editor",
           "list_editors", "resolve_hparams"]


@dataclass
class EditContext:
    """What an edit runs with besides the model, requests and hyper-parameters."""

    seed: int = 0
    progress: bool = True
    # Where covariance statistics (C0) come from: a kedit_core.stats source, or None for the editor's
    # default (statistics computed or read from the cache as the hyper-parameters say).
    stats: Any = None
    # Explicit context templates (a list of template groups); None = the editor draws them, seeded.
    context_templates: list[list[str]] | None = None
    log: Callable[[str], None] | None = None
    options: dict = field(default_factory=dict)
    # Where long phases keep what they finished (batched value optimisation, per batch of requests),
    # so the same edit run again with the same directory resumes instead of starting over.
    work_dir: str | Path | None = None
    # The base model's fingerprint (compute_edit fills it in; it keys what work_dir holds).
    base_fingerprint: str | None = None

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase: ``with timer("keys"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self_inner):
                self_inner.start = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self_inner.start
                return False

        return _Phase()


@dataclass
class EditResult:
    deltas: Deltas
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Editor(abc.ABC):
    """Base class for editing methods. Subclasses set :attr:`name`, :attr:`HParams` and implement
    :meth:`compute`; a plugin registers the class from its ``register_editors`` hook."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    HParams: ClassVar[type[HyperParams]] = HyperParams
    # Whether the editor reads covariance statistics (C0); harnesses and the CLI prepare them if so.
    uses_covariance: ClassVar[bool] = False

    def __init__(self, hparams: HyperParams):
        if not isinstance(hparams, self.HParams):
            raise KeditError(f"editor '{self.name}' needs {self.HParams.__name__}; got {type(hparams).__name__}")
        self.hparams = hparams

    @classmethod
    def default_hparams(cls, model: LoadedModel) -> HyperParams:
        """The defaults for ``model``: the published settings when kedit ships them for this model,
        otherwise the class defaults. Override to choose by model."""
        return cls.HParams()

    @classmethod
    def check_hparams(cls, hparams: HyperParams, model: LoadedModel) -> None:
        """Check hyper-parameters against the model (layer ranges, architecture strings). Raise
        :class:`~kedit_core.errors.HyperParamsError` with a clear message."""

    @abc.abstractmethod
    def compute(self, model: LoadedModel, requests: Sequence[EditRequest], context: EditContext) -> EditResult:
        """Compute the edit and return its deltas; leave ``model`` as it was."""


def list_editors() -> dict[str, type[Editor]]:
    from .plugins import get_registry

    return {name: reg.obj for name, reg in sorted(get_registry().editors.items())}


def get_editor(name: str) -> type[Editor]:
    from .plugins import failed_plugins

    editors = list_editors()
    if name not in editors:
        failed = failed_plugins()
        broken = f"; plugin(s) that failed to load: {', '.join(sorted(failed))}" if failed else ""
        raise KeditError(f"no editor named {name!r}; installed editors: {', '.join(editors) or 'none'}{broken} "
                         "(`kedit plugins` lists what each plugin registers)")
    return editors[name]


def resolve_hparams(editor_cls: type[Editor], model: LoadedModel,
                    hparams: HyperParams | dict | str | Path | None = None, **overrides) -> HyperParams:
    """Defaults for the model, or a file/dict/object, then ``overrides``; validated and checked."""
    if hparams is None:
        hp = editor_cls.default_hparams(model)
    elif isinstance(hparams, HyperParams):
        hp = hparams
    elif isinstance(hparams, dict):
        hp = editor_cls.HParams.from_dict(hparams)
    else:
        hp = editor_cls.HParams.from_json(hparams)
    if overrides:
        hp = hp.replace(**overrides)
    editor_cls.check_hparams(hp, model)
    return hp


def check_requests_fit(model: LoadedModel, requests: Sequence[EditRequest]) -> None:
    """Every request can be edited in this model: subject and target tokenise to at least one token
    the tokenizer knows (not only its unknown token), and prompt plus target fit the context length.
    Raises :class:`~kedit_core.errors.RecordError` naming the request and the field."""
    tokenizer = model.tokenizer
    unk = getattr(tokenizer, "unk_token_id", None)
    limit = model.adapter.context_length

    def ids(texts, special=False):
        return tokenizer(list(texts), add_special_tokens=special)["input_ids"]

    subjects = ids(r.subject for r in requests)
    targets = ids(r.target_new for r in requests)
    prompts = ids((r.filled_prompt for r in requests), special=True)
    for i, req in enumerate(requests):
        for field_name, tokens, text in (("subject", subjects[i], req.subject), ("target_new", targets[i],
                                                                                 req.target_new)):
            if not tokens:
                raise RecordError(f"{text!r} (case {req.case_id}) tokenises to no tokens", index=i, field=field_name)
            if unk is not None and all(t == unk for t in tokens):
                raise RecordError(f"the tokenizer knows none of {text!r} (case {req.case_id}): every token is its "
                                  f"unknown token {tokenizer.unk_token!r}", index=i, field=field_name)
        if len(prompts[i]) + len(targets[i]) > limit:
            raise RecordError(f"case {req.case_id}: the prompt and target are {len(prompts[i]) + len(targets[i])} "
                              f"tokens; the model reads at most {limit}", index=i, field="prompt")


def compute_edit(model: LoadedModel, requests: Sequence[EditRequest], method: str | type[Editor],
                 hparams: HyperParams | dict | str | Path | None = None, *, context: EditContext | None = None,
                 **overrides) -> EditResult:
    """Compute an edit with the named editor. The model is left exactly as it was (checked by
    fingerprint); the returned deltas carry the editor, the resolved hyper-parameters, the requests'
    hash and the base model's fingerprint. Apply them with ``result.deltas.apply(model.model)``."""
    editor_cls = get_editor(method) if isinstance(method, str) else method
    requests = list(requests)
    if not requests:
        raise KeditError("no requests to edit")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise KeditError(f"request {i} is a {type(r).__name__}; expected kedit_core.EditRequest")
    hp = resolve_hparams(editor_cls, model, hparams, **overrides)
    check_requests_fit(model, requests)
    context = context or EditContext()
    before = model.fingerprint()
    if context.base_fingerprint is None:
        context = dataclasses.replace(context, base_fingerprint=before)
    start = time.perf_counter()
    result = editor_cls(hp).compute(model, requests, context)
    total = time.perf_counter() - start
    after = model.fingerprint()
    if after != before:
        raise KeditRuntimeError(f"editor '{editor_cls.name}' left the model's weights changed after computing an edit "
                         "(a bug in the editor: editors must return deltas and restore what they touch)")
    d = result.deltas
    for name, tensor in sorted(d.tensors.items()):
        if not torch.isfinite(tensor).all():  # e.g. a value optimisation that diverged
            raise NumericalError(f"editor '{editor_cls.name}' computed NaN or infinite values for {name}; nothing was "
                                 "applied (a smaller step size or other statistics may help: --set v_lr=...)")
    d.editor = editor_cls.name
    d.hparams = hp.to_dict()
    d.requests_sha256 = requests_sha256(requests)
    d.base_fingerprint = before
    d.extra.setdefault("seed", context.seed)
    d.extra.setdefault("num_requests", len(requests))
    if context.context_templates is not None:
        d.extra.setdefault("context_templates", context.context_templates)
    result.timings.setdefault("total", total)
    return result
