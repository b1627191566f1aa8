"""Sequential (lifelong) editing sessions kept on disk.

Edits arrive in a stream: batch after batch, each computed on the model as the earlier batches left it.
An :class:`EditSession` is a directory that holds everything needed to rebuild, resume or roll back such a
stream, written atomically after every batch::

    session.json                      the manifest (the commit point, written last): format, the base model's
                                      fingerprint and source, seed, context templates, and per batch the
                                      editor, resolved hyper-parameters, request and file hashes, the
                                      model's fingerprint after it and the edited matrices' norms
    batches/0001/requests.json        the batch's requests (plain records)
    batches/0001/deltas.safetensors   its deltas (kedit delta file: editor, hparams, fingerprints)
    batches/0001/keys.safetensors     the keys it wrote per layer (MEMIT-family editors), [N, d_k]
    batches/0001/result.json          timings and editor diagnostics
    preserved_keys.safetensors        the running Σ K_p K_pᵀ per layer over all batches (float64), which
                                      AlphaEdit keeps its updates away from
    work/0002/                        a batch in progress (its finished value-optimisation chunks)

::

    model = kedit.load_model("smollm2-135m")
    session = EditSession.create("run/", model)            # or EditSession.open("run/", model)
    session.add(requests[:100], "alphaedit")               # the model now holds batch 1
    session.add(requests[100:200], "memit", layers=[5, 6])
    session.rollback(1)                                     # bit-identical to the model after batch 1

The session edits the model it was given *in place*: after ``create``/``open`` and every ``add`` the model
holds all batches; :meth:`EditSession.restore_base` puts back the base weights. A batch that fails (bad
requests, bad settings, a threshold that keeps nothing) writes nothing and leaves model and directory as
they were. Running the same stream again after a kill (:meth:`EditSession.add_stream`, ``kedit session add
--batch-size``) skips the batches the manifest holds and resumes the one in progress from its finished
value chunks; the result is the same deltas.

Covariance statistics are always read for the base model: sources are prepared with the base weights put
back for the moment (a model edited by earlier batches would otherwise get statistics of its own).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ._version import __version__
from .atomic import write_json_atomic
from .deltas import Deltas, add_deltas_, atomic_save_safetensors, read_safetensors_metadata
from .editors import EditContext, EditResult, compute_edit, get_editor
from .errors import KeditError, RecordError
from .models import LoadedModel
from .requests import EditRequest, requests_from_records, requests_sha256

__all__ = ["EditSession", "SESSION_FORMAT", "MANIFEST", "read_manifest", "norm_statistics"]

SESSION_FORMAT = "kedit-session/1"
MANIFEST = "session.json"
PRESERVED = "preserved_keys.safetensors"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict:
    """The manifest of the session in ``directory`` (checked to be one)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise KeditError(f"{directory} is not an editing session (no {MANIFEST}); create one with "
                         "`kedit session create`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KeditError(f"{path}: not a readable session manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SESSION_FORMAT:
        raise KeditError(f"{path}: not a kedit session manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                         f"{SESSION_FORMAT!r})")
    return manifest


def norm_statistics(model: LoadedModel, base: dict[str, torch.Tensor]) -> dict[str, dict]:
    """For every parameter in ``base`` (its weights before the first batch): ``‖W_k‖``, ``‖W_0‖``, their ratio
    and ``‖W_k − W_0‖`` (Frobenius norms, float64)."""
    params = dict(model.model.named_parameters(remove_duplicate=False))
    out = {}
    for name, w0 in sorted(base.items()):
        wk = params[name].detach().double()
        w0 = w0.to(wk.device).double()
        norm_k, norm_0 = float(wk.norm()), float(w0.norm())
        out[name] = {"norm": norm_k, "base_norm": norm_0, "norm_ratio": norm_k / norm_0 if norm_0 else None,
                     "drift_norm": float((wk - w0).norm())}
    return out


def _accumulate_gram(total: dict[int, torch.Tensor], keys: dict[int, torch.Tensor]) -> None:
    """``total[l] += Kᵀ K`` in float64, in one fixed order (so a rebuilt sum is bit-identical)."""
    for layer in sorted(keys):
        k = keys[layer].to(torch.float64)
        gram = k.T @ k
        total[layer] = total[layer] + gram if layer in total else gram


class _BaseModelStatistics:
    """A covariance source seen through the session: ``prepare`` runs with the base weights put back, so
    statistics computed now are those of the base model, as every batch of a sequential edit uses them."""

    def __init__(self, inner, session: "EditSession"):
        self.inner, self.session = inner, session  # factor and null-space caches are the inner source's

    def prepare(self, model, layers) -> None:
        with self.session.viewing(0):
            self.inner.prepare(model, layers)

    def moment(self, model, layer):
        with self.session.viewing(0):
            return self.inner.moment(model, layer)


class EditSession:
    """A sequential editing session in a directory (see the module docstring). Use :meth:`create` or
    :meth:`open`, not the constructor."""

    def __init__(self, directory: Path, model: LoadedModel, manifest: dict):
        self.directory = directory
        self.model = model
        self.manifest = manifest
        self._base: dict[str, torch.Tensor] = {}       # weights before the first batch, of touched parameters
        self._preserved: dict[int, torch.Tensor] = {}  # Σ K Kᵀ per layer over the applied batches
        self._stats_sources: dict[int, _BaseModelStatistics] = {}
        self._applied = 0                              # batches the model holds now

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, model: LoadedModel, *, seed: int = 0,
               context_templates: list[list[str]] | None = None, model_source: str | None = None) -> "EditSession":
        """Start a session on ``model`` (its current weights are the base) in a new or empty directory."""
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise KeditError(f"{directory} already holds an editing session; open it, or choose another directory")
        if directory.exists() and any(directory.iterdir()):
            raise KeditError(f"{directory} is not empty; a session needs a new or empty directory")
        if context_templates is not None:
            from .editing.templates import validate_template_groups

            validate_template_groups(context_templates)
        manifest = {"format": SESSION_FORMAT, "kedit_version": __version__,
                    "base_fingerprint": model.fingerprint(), "model": model_source or str(model.source),
                    "model_info": dict(model.info), "seed": int(seed), "context_templates": context_templates,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "batches": []}
        write_json_atomic(directory / MANIFEST, manifest)
        return cls(directory, model, manifest)

    @classmethod
    def open(cls, directory: str | Path, model: LoadedModel, *, progress: bool = False) -> "EditSession":
        """Open the session in ``directory`` on ``model``, which must be the session's base model; every
        recorded batch is checked (file hashes, fingerprints) and applied in order. On any error the model is
        left as it was and nothing is written."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        actual = model.fingerprint()
        if actual != manifest["base_fingerprint"]:
            raise KeditError(f"{directory} is a session of another model (base fingerprint "
                             f"{manifest['base_fingerprint']}, made on {manifest.get('model')!r}); this model's "
                             f"fingerprint is {actual}: load the session's base model, with no edits applied")
        session = cls(directory, model, manifest)
        try:
            for record in manifest["batches"]:
                session._apply(session._read_deltas(record), record)
            session._load_preserved()
        except BaseException:
            session.restore_base()
            raise
        return session

    # -- inspection --------------------------------------------------------------------------------
    @property
    def batches(self) -> list[dict]:
        return list(self.manifest["batches"])

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base_fingerprint"]

    @property
    def preserved_keys(self) -> dict[int, torch.Tensor]:
        """Σ K_p K_pᵀ per layer over the batches applied so far."""
        return dict(self._preserved)

    @property
    def base_weights(self) -> dict[str, torch.Tensor]:
        """The weights before the first batch, of every parameter a batch has touched."""
        return dict(self._base)

    def batch_dir(self, index: int) -> Path:
        return self.directory / "batches" / f"{index:04d}"

    def status(self) -> dict:
        return status_of(self.manifest, self.directory)

    # -- adding ------------------------------------------------------------------------------------
    def add(self, requests: Sequence[EditRequest], method: str, hparams=None, *, stats=None, progress: bool = True,
            log: Callable[[str], None] | None = None, context_templates: list[list[str]] | None = None,
            **overrides) -> dict:
        """Compute one batch with editor ``method`` on the model as the earlier batches left it, write it,
        apply it, and return its manifest record. ``stats`` is a covariance source (read for the base model).
        Nothing is written and the model is unchanged if computing the batch fails."""
        requests = list(requests)
        index = len(self.manifest["batches"]) + 1
        if self._applied != index - 1:
            raise KeditError(f"the model holds {self._applied} of the session's {index - 1} batches (restore_base was "
                             "called): open the session again to add batches")
        if not requests:
            raise KeditError(f"batch {index} is empty: a session batch needs at least one request")
        editor_cls = get_editor(method)
        work_dir = self.directory / "work" / f"{index:04d}"
        context = EditContext(seed=int(self.manifest["seed"]), progress=progress, stats=self._wrap_stats(stats),
                              context_templates=context_templates or self.manifest.get("context_templates"),
                              log=log, work_dir=work_dir, preserved_keys=dict(self._preserved) or None,
                              base_weights=dict(self._base) or None)
        torch.manual_seed(int(self.manifest["seed"]) + index)  # editors that draw at random (fine-tuning order)
        start = time.perf_counter()
        result = compute_edit(self.model, requests, editor_cls, hparams, context=context, **overrides)
        seconds = time.perf_counter() - start
        record = self._write_batch(index, requests, result, seconds)
        new_names = [name for name in result.deltas.tensors if name not in self._base]
        preserved_before = self._preserved
        originals = self._apply(result.deltas, record, check=False)
        try:
            record["fingerprint_after"] = self.model.fingerprint()
            record["norms"] = norm_statistics(self.model, self._base)
            total = dict(self._preserved)
            _accumulate_gram(total, self._read_keys(record))
            self._write_preserved(total, self.manifest["batches"] + [record])
            self.manifest["batches"].append(record)
            write_json_atomic(self.directory / MANIFEST, self.manifest)
        except BaseException:  # the batch is not recorded: take it back out of the model
            if self.manifest["batches"] and self.manifest["batches"][-1] is record:
                self.manifest["batches"].pop()
            params = dict(self.model.model.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                for name, original in originals.items():
                    params[name].copy_(original)
            for name in new_names:
                self._base.pop(name, None)
            self._preserved = preserved_before
            raise
        shutil.rmtree(work_dir, ignore_errors=True)
        return record

    def add_stream(self, requests: Sequence[EditRequest], method: str, batch_size: int, hparams=None, *,
                   on_batch: Callable[[dict], None] | None = None, **kwargs) -> list[dict]:
        """Add ``requests`` in consecutive batches of ``batch_size``, skipping the batches the session already
        holds (the same requests in the same place: the resume after a kill); a session that holds other
        batches is an error."""
        requests = list(requests)
        if batch_size < 1:
            raise KeditError(f"batch size {batch_size}: expected at least 1")
        if not requests:
            raise KeditError("no requests to add")
        chunks = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
        done = self.manifest["batches"]
        records = []
        for j, chunk in enumerate(chunks):
            index = j + 1  # a stream starts at the session's first batch
            if index <= len(done):
                held = done[index - 1]
                if held["requests_sha256"] != requests_sha256(chunk):
                    raise KeditError(f"{self.directory}: batch {index} holds other requests than batch {j + 1} of this "
                                     "stream; roll the session back or use another directory")
                records.append(held)
                continue
            record = self.add(chunk, method, hparams, **kwargs)
            records.append(record)
            if on_batch is not None:
                on_batch(record)
        return records

    # -- moving through the stream -----------------------------------------------------------------
    def rollback(self, k: int) -> None:
        """Drop every batch after batch ``k`` (``0``: back to the base model). The model becomes bit-identical
        to the model after batch ``k`` and the running key statistics those after batch ``k``."""
        n = len(self.manifest["batches"])
        if not 0 <= k <= n:
            raise KeditError(f"cannot roll back to batch {k}: the session holds batches 1..{n} (0 is the base model)")
        kept = self.manifest["batches"][:k]
        deltas = [self._read_deltas(record) for record in kept]  # all verified before anything changes
        total: dict[int, torch.Tensor] = {}
        for record in kept:
            _accumulate_gram(total, self._read_keys(record))
        self.restore_base()
        for record, d in zip(kept, deltas):
            self._apply(d, record, check=False)
        self._write_preserved(total, kept)
        self.manifest["batches"] = kept
        write_json_atomic(self.directory / MANIFEST, self.manifest)
        for index in range(k + 1, n + 1):
            shutil.rmtree(self.batch_dir(index), ignore_errors=True)
        shutil.rmtree(self.directory / "work", ignore_errors=True)

    def restore_base(self) -> None:
        """Put the base weights back (the session's batches stay on disk; :meth:`open` re-applies them)."""
        params = dict(self.model.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, w0 in self._base.items():
                params[name].copy_(w0)
        self._applied = 0

    @contextlib.contextmanager
    def viewing(self, k: int) -> Iterator[None]:
        """The model after batch ``k`` for the duration of a ``with`` block; afterwards it holds every batch
        again (exactly). Nothing on disk changes."""
        n = len(self.manifest["batches"])
        if not 0 <= k <= n:
            raise KeditError(f"batch {k}: the session holds batches 1..{n} (0 is the base model)")
        if k == n:
            yield
            return
        deltas = [self._read_deltas(record) for record in self.manifest["batches"][:k]]
        params = dict(self.model.model.named_parameters(remove_duplicate=False))
        current = {name: params[name].detach().clone() for name in self._base}
        try:
            with torch.no_grad():
                for name, w0 in self._base.items():
                    params[name].copy_(w0)
            for d in deltas:
                add_deltas_(self.model.model, d.tensors)
            yield
        finally:
            with torch.no_grad():
                for name, w in current.items():
                    params[name].copy_(w)

    def save_model(self, out: str | Path, *, upto: int | None = None) -> Path:
        """Write the model with the first ``upto`` batches (default: all) as a transformers checkpoint."""
        upto = len(self.manifest["batches"]) if upto is None else upto
        out = Path(out)
        with self.viewing(upto):
            self.model.model.save_pretrained(out)
            self.model.tokenizer.save_pretrained(out)
        write_json_atomic(out / "kedit_session.json", {"session": str(self.directory), "batches": upto,
                                                       "base_fingerprint": self.base_fingerprint,
                                                       "editors": [b["editor"] for b in self.manifest["batches"][:upto]]})
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _wrap_stats(self, stats):
        if stats is None:
            return None
        wrapped = self._stats_sources.get(id(stats))
        if wrapped is None or wrapped.inner is not stats:
            wrapped = self._stats_sources[id(stats)] = _BaseModelStatistics(stats, self)
        return wrapped

    def _write_batch(self, index: int, requests: list[EditRequest], result: EditResult, seconds: float) -> dict:
        bdir = self.batch_dir(index)
        if bdir.exists():  # left by a batch that was killed before its manifest record was written
            shutil.rmtree(bdir)
        write_json_atomic(bdir / "requests.json", [r.to_dict() for r in requests])
        deltas_path = result.deltas.save(bdir / "deltas.safetensors")
        files = {"requests.json": _file_sha256(bdir / "requests.json"), "deltas.safetensors": _file_sha256(deltas_path)}
        if result.keys:
            atomic_save_safetensors({f"layer.{layer}": k for layer, k in result.keys.items()},
                                    bdir / "keys.safetensors", {"format": "kedit-session-keys/1",
                                                                "layers": sorted(result.keys)})
            files["keys.safetensors"] = _file_sha256(bdir / "keys.safetensors")
        write_json_atomic(bdir / "result.json", {"timings": result.timings, "info": result.info}, indent=1)
        return {"index": index, "editor": result.deltas.editor, "hparams": result.deltas.hparams,
                "num_requests": len(requests), "requests_sha256": requests_sha256(requests),
                "case_ids": [r.case_id for r in requests], "fingerprint_before": result.deltas.base_fingerprint,
                "files": files, "seconds": round(seconds, 3),
                "layers": result.deltas.extra.get("layers"), "keys_layers": sorted(result.keys)}

    def _check_file(self, record: dict, name: str) -> Path:
        path = self.batch_dir(record["index"]) / name
        if not path.exists():
            raise KeditError(f"{path}: batch {record['index']}'s file is missing; roll the session back to batch "
                             f"{record['index'] - 1} (`kedit session rollback`) to continue from before it")
        if _file_sha256(path) != record["files"][name]:
            raise KeditError(f"{path}: batch {record['index']}'s file is corrupt (its sha256 differs from the one "
                             f"recorded when it was written); roll back to batch {record['index'] - 1} to continue")
        return path

    def _read_deltas(self, record: dict) -> Deltas:
        deltas = Deltas.load(self._check_file(record, "deltas.safetensors"))
        if deltas.base_fingerprint and deltas.base_fingerprint != record["fingerprint_before"]:
            raise KeditError(f"{self.batch_dir(record['index'])}: the deltas were computed for another model state "
                             "than the manifest says")
        return deltas

    def _read_keys(self, record: dict) -> dict[int, torch.Tensor]:
        if "keys.safetensors" not in record["files"]:
            return {}
        from safetensors import safe_open

        path = self._check_file(record, "keys.safetensors")
        with safe_open(str(path), framework="pt") as f:
            return {int(name.split(".", 1)[1]): f.get_tensor(name) for name in f.keys()}

    def _read_requests(self, record: dict) -> list[EditRequest]:
        path = self._check_file(record, "requests.json")
        return requests_from_records(json.loads(path.read_text(encoding="utf-8")), "plain", source=str(path))

    def requests_of(self, index: int) -> list[EditRequest]:
        """The requests of batch ``index`` (1-based)."""
        return self._read_requests(self.manifest["batches"][index - 1])

    def _apply(self, deltas: Deltas, record: dict, *, check: bool = True) -> dict[str, torch.Tensor]:
        params = dict(self.model.model.named_parameters(remove_duplicate=False))
        if check and self.model.fingerprint() != record["fingerprint_before"]:
            raise KeditError(f"batch {record['index']} of {self.directory} was computed on another model state "
                             "than the one the earlier batches give")
        for name in deltas.tensors:
            if name not in self._base:
                if name not in params:
                    raise KeditError(f"batch {record['index']} edits {name!r}, which this model does not have")
                self._base[name] = params[name].detach().clone()
        originals = add_deltas_(self.model.model, deltas.tensors)
        self._applied = record["index"]
        if check and "fingerprint_after" in record and self.model.fingerprint() != record["fingerprint_after"]:
            raise KeditError(f"applying batch {record['index']} of {self.directory} did not give the recorded model "
                             "(fingerprint differs)")
        return originals

    def _digest(self, records: list[dict]) -> str:
        return hashlib.sha256(json.dumps([r["files"] for r in records], sort_keys=True).encode()).hexdigest()

    def _write_preserved(self, total: dict[int, torch.Tensor], records: list[dict]) -> None:
        """Keep ``total`` (Σ K Kᵀ over ``records``) in memory and write it atomically, tagged with the
        batches it sums so that a stale file is never trusted."""
        path = self.directory / PRESERVED
        if total:
            atomic_save_safetensors({f"layer.{layer}": g for layer, g in total.items()}, path,
                                    {"format": "kedit-session-preserved/1", "batches": len(records),
                                     "digest": self._digest(records),
                                     "statistic": "sum over the session's batches of K K^T per layer (float64)"})
        elif path.exists():
            path.unlink()
        self._preserved = total

    def _load_preserved(self) -> None:
        """Read the running key statistics; rebuild them from the batches' keys when the file is missing,
        unreadable or describes other batches (a kill between two writes)."""
        records = self.manifest["batches"]
        path = self.directory / PRESERVED
        digest = self._digest(records)
        if path.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = read_safetensors_metadata(f.metadata())
                    if meta.get("digest") == digest:
                        self._preserved = {int(n.split(".", 1)[1]): f.get_tensor(n) for n in f.keys()}
                        return
            except Exception:  # rebuilt below
                pass
        total: dict[int, torch.Tensor] = {}
        for record in records:
            _accumulate_gram(total, self._read_keys(record))
        self._preserved = total


def status_of(manifest: dict, directory: str | Path | None = None) -> dict:
    """A summary of a session manifest: base model, batches, editors, edits so far, last norms."""
    batches = manifest["batches"]
    last = batches[-1] if batches else None
    return {"directory": None if directory is None else str(directory), "model": manifest.get("model"),
            "base_fingerprint": manifest["base_fingerprint"], "batches": len(batches),
            "edits": sum(b["num_requests"] for b in batches),
            "editors": [b["editor"] for b in batches],
            "seconds": round(sum(b.get("seconds", 0.0) for b in batches), 3),
            "fingerprint": last["fingerprint_after"] if last else manifest["base_fingerprint"],
            "norm_ratios": {name: s["norm_ratio"] for name, s in (last["norms"] if last else {}).items()},
            "in_progress": sorted(p.name for p in (Path(directory) / "work").iterdir())
            if directory is not None and (Path(directory) / "work").is_dir() else []}
