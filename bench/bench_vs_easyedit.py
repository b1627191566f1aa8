"""Benchmark: kedit against EasyEdit (zjunlp/EasyEdit), the same MEMIT edit side by side on a real model.

Both tools edit the same model (SmolLM2-135M: the float32 checkpoint kedit's model zoo dequantizes from
its GGUF) with the same requests (the first ``--requests`` CounterFact records), the same context templates (drawn once by kedit, seed 0,
and handed to EasyEdit through its template cache), the same hyper-parameters (MEMIT layers 5-9, λ 15000,
20 value steps, loss at the last layer, the published GPT-J value settings otherwise) and the same C0
corpus (the first WikiText-2 documents holding ``--tokens`` tokens, given to EasyEdit's ``layer_stats`` as
its dataset). EasyEdit runs from a pinned commit of a local mirror of its repository, in its own virtual
environment that this script creates (``--system-site-packages``, so it uses the installed torch and
transformers; EasyEdit's few import-time packages are installed with ``--no-deps``); none of EasyEdit is
copied into kedit. Only EasyEdit's MEMIT modules are imported (its package ``__init__`` would import all 30
editors and their dependencies); they run unchanged, driven by ``execute_memit`` as ``apply_memit_to_model``
drives it.

Measured, one tool after the other on the same cores:

* wall seconds per phase: C0, values, keys (with ``cur_zs``, block L's output at the bare prompts), solve;
  end to end excluding C0 (the edit as a user runs it with statistics already cached);
* peak resident memory of each edit's process (``ru_maxrss``) and after loading the model;
* the relative difference of the weight deltas per layer (Frobenius), kedit reference mode vs EasyEdit
  (expected ≤ 1e-3) and kedit fast mode vs both, and of the two tools' C0;
* ES / PS / NS of each tool's edit, scored by kedit's CounterFact evaluator on the same records.

EasyEdit's C0 is computed by its own ``get_cov`` / ``layer_stats`` (one pass per layer, float32 sums) for
every layer on the unedited model before the edit, and the edit then reads it from EasyEdit's stats cache.
(Run cold, EasyEdit computes C0 inside the layer loop, so layers 6-9 would get the C0 of the model already
edited at the layers below: 1-7 % different deltas, and not what a user with precomputed statistics gets.)

Every stage runs in its own process and writes its result to ``--work-dir``; a stage already done (with
the same inputs) is skipped, so an interrupted run resumes and C0 is computed once per tool and reused by
every mode. ``--redo STAGE`` recomputes one. Hold the CPU lock around the whole run::

    flock /work/cpu.lock .venv/bin/python bench/bench_vs_easyedit.py \\
        --easyedit-repo /work/.mirror/zjunlp+EasyEdit/repo --easyedit-commit 14cea82 --threads 2

``--model tiny-llama --requests 8 --tokens 3000`` runs everything on a small random Llama in a minute
(checks the plumbing). Results: ``--out`` (default ``bench/results/vs_easyedit/``): ``vs_easyedit.json``,
``vs_easyedit.png``, ``vs_easyedit.txt``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COUNTERFACT = Path("/work/shared/data/counterfact_dev.json")
COUNTERFACT_FALLBACK = REPO / "tests" / "fixtures" / "data" / "counterfact_dev.json"
WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
WIKITEXT_FALLBACK = REPO / "tests" / "fixtures" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Packages EasyEdit's MEMIT path imports that the system lacks: `datasets` (imported by rome/layer_stats.py;
# EasyEdit's requirements.txt pins 4.8.5) and what `import datasets` itself needs. All with --no-deps, so
# nothing replaces the installed torch / transformers.
EASYEDIT_PACKAGES = ["datasets==4.8.5", "pandas==2.3.3", "pyarrow==24.0.0", "dill==0.4.1", "multiprocess==0.70.18",
                     "xxhash==3.6.0", "pytz==2025.2", "tzdata==2025.2", "httpx==0.28.1"]

KEDIT_VARIANTS = {
    # name: (hparams overrides, what it is)
    "kedit-fast": ({"mode": "fast"}, "kedit's default fast mode (the published value objective, step for step)"),
    "kedit-fast-early-stop": ({"mode": "fast", "early_stop_most_probable": True},
                              "fast mode with most-probable early stopping (ENCORE's rule; opt-in)"),
    "kedit-reference": ({"mode": "reference"}, "kedit's reference mode (the published loops)"),
}
STAGES = ["prepare", "kedit-c0", *KEDIT_VARIANTS, "easyedit-c0", "easyedit-edit", "evaluate"]


# --------------------------------------------------------------------------------------------------
# small helpers (no kedit imports: the EasyEdit stages run these in EasyEdit's environment)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


class PeakMemory:
    """Resident memory of this process sampled every 20 ms (the peak since ``start``), next to
    ``ru_maxrss`` (the process's lifetime peak, from the kernel)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return False

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def max_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def gib(n: int | float) -> float:
    return n / 2**30


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_plain_model(path: Path):
    """The model and tokenizer as both tools get them: float32, eval mode, right padding, pad = eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


def git_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------------------------------
# stage: prepare (kedit's environment): model, requests, corpus, context templates, hyper-parameters


def materialise_model(args, work: Path) -> tuple[Path, dict]:
    """A save_pretrained directory both tools load (float32): a zoo model's cached checkpoint (SmolLM2's
    GGUF dequantized by kedit_core.zoo), a tiny random Llama, or a directory given as is."""
    if args.model == "tiny-llama":
        from kedit_core.testing import save_tiny_model

        target = work / "model"
        if not (target / "config.json").exists():
            save_tiny_model("llama", target, num_layers=6, hidden_size=64)
        return target, {"source": "tiny random llama (kedit_core.testing, 6 x 64, seed 0)"}
    from kedit_core.zoo import resolve_model

    path, info = resolve_model(args.model)
    return Path(path), {"source": args.model, **info}


def stage_prepare(args, work: Path) -> dict:
    import torch

    from kedit_core.editing import MEMIT_RECIPE, generate_context_templates
    from kedit_core.models import wrap_model
    from kedit_core.requests import load_requests
    from kedit_core.stats.corpus import open_corpus

    model_dir, model_info = materialise_model(args, work)
    model, tok = load_plain_model(model_dir)
    loaded = wrap_model(model, tok, source=str(model_dir))
    adapter = loaded.adapter
    n_layers = adapter.num_layers
    layers = args.layers or ([5, 6, 7, 8, 9] if n_layers >= 30 else [1, 2])
    # EasyEdit takes module names as templates; they must name what kedit's adapter edits.
    templates = {"rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
                 "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
                 "ln_f_module": "model.norm", "lm_head_module": "lm_head"}
    for layer in layers:
        assert templates["rewrite_module_tmp"].format(layer) == adapter.mlp_out_name(layer)
        assert templates["layer_module_tmp"].format(layer) == adapter.layer_name(layer)
    # EasyEdit reads "<lm_head_module>.weight" from named_parameters(), which lists a tied head's weight once,
    # under the input embedding's name (SmolLM2 ties them): name the module that owns it there.
    head = model.get_output_embeddings().weight
    owner = next(name for name, p in model.named_parameters() if p is head)
    templates["lm_head_module"] = owner.rsplit(".", 1)[0]
    data = COUNTERFACT if COUNTERFACT.exists() else COUNTERFACT_FALLBACK
    requests = load_requests(data, limit=args.requests)
    corpus_path = WIKITEXT if WIKITEXT.exists() else WIKITEXT_FALLBACK
    docs, tokens = [], 0
    for text in open_corpus(corpus_path).documents():
        ids = tok(text, truncation=True, max_length=adapter.context_length, add_special_tokens=True)["input_ids"]
        if not ids:
            continue
        docs.append(text)
        tokens += len(ids)
        if tokens >= args.tokens:
            break
    torch.manual_seed(0)
    groups = generate_context_templates(loaded, MEMIT_RECIPE, seed=0)
    hparams = {  # MEMIT, the published value settings; both tools get exactly these
        "layers": layers, "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": args.value_steps,
        "v_lr": 0.5, "v_loss_layer": n_layers - 1, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
        "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": args.lam, "mom2_dataset": "wikitext",
        "mom2_n_samples": len(docs), "mom2_dtype": "float32",
    }
    inputs = {"model_dir": str(model_dir), "model": model_info, "num_layers": n_layers,
              "requests_file": str(data), "requests": [r.__dict__ for r in requests],
              "corpus_file": str(corpus_path), "corpus_documents": docs, "corpus_tokens": tokens,
              "context_templates": groups, "context_templates_origin": "kedit generate_context_templates, seed 0",
              "hparams": hparams, "module_templates": templates}
    write_json(work / "inputs.json", inputs)
    return {"model_dir": str(model_dir), "layers": layers, "requests": len(requests), "corpus_documents": len(docs),
            "corpus_tokens": tokens, "context_templates": groups}


# --------------------------------------------------------------------------------------------------
# kedit stages


def kedit_model(inputs: dict):
    from kedit_core.models import wrap_model

    model, tok = load_plain_model(Path(inputs["model_dir"]))
    return wrap_model(model, tok, source=inputs["model_dir"])


def kedit_covariance(inputs: dict, work: Path, *, recompute: bool = False):
    from kedit_core.stats import CachedCovariance

    docs = inputs["corpus_documents"]
    return CachedCovariance(docs, stats_dir=work / "kedit-stats", docs=len(docs), recompute=recompute)


def kedit_hparams(inputs: dict, overrides: dict) -> dict:
    hp = dict(inputs["hparams"])
    for key in ("mom2_dataset", "mom2_n_samples"):  # recorded for EasyEdit; kedit's C0 comes from the source
        hp.pop(key)
    return {**hp, **overrides}


def stage_kedit_c0(args, work: Path) -> dict:
    inputs = read_json(work / "inputs.json")
    loaded = kedit_model(inputs)
    source = kedit_covariance(inputs, work, recompute=True)
    start, cpu = time.perf_counter(), time.process_time()
    source.prepare(loaded, inputs["hparams"]["layers"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "tokens": inputs["corpus_tokens"], "report": source.last_report,
            "how": "one forward pass for all layers (kedit_core.stats.CachedCovariance)"}


def stage_kedit_edit(args, work: Path, variant: str) -> dict:
    import torch

    from kedit_core import EditContext, compute_edit
    from kedit_core.requests import EditRequest

    import kedit_core.editing.batch as batch_module

    cpu_phases = install_cpu_phase_timer(batch_module)
    overrides, what = KEDIT_VARIANTS[variant]
    inputs = read_json(work / "inputs.json")
    loaded = kedit_model(inputs)
    rss_model = PeakMemory.rss()
    requests = [EditRequest(**r) for r in inputs["requests"]]
    source = kedit_covariance(inputs, work)
    context = EditContext(seed=0, stats=source, context_templates=inputs["context_templates"], progress=True)
    with PeakMemory() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        result = compute_edit(loaded, requests, "memit", context=context, **kedit_hparams(inputs, overrides))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result.deltas.save(work / f"deltas-{variant}.safetensors")
    steps = result.info["value_steps"]
    timings = dict(result.timings)
    return {"what": what, "overrides": overrides, "hparams": result.deltas.hparams, "seconds_end_to_end": seconds,
            "phases": {"values": timings.get("values", 0.0), "keys": timings.get("keys", 0.0),
                       "solve": timings.get("solve", 0.0), "statistics (load C0, factor)": timings.get("statistics", 0.0),
                       "context templates": timings.get("context templates", 0.0)},
            "timings_raw": timings, "cpu_seconds_end_to_end": cpu, "cpu_seconds_per_phase": dict(cpu_phases),
            "value_steps_mean": sum(steps) / len(steps), "value_steps": steps,
            "keys_passes": result.info.get("keys_passes"), "value_batches": result.info.get("value_batches"),
            "rss_after_model_load_gib": gib(rss_model), "peak_rss_gib": gib(peak.peak),
            "max_rss_gib": gib(PeakMemory.max_rss()), "threads": torch.get_num_threads()}


def install_cpu_phase_timer(batch_module) -> dict:
    """Make kedit's phase timer (in ``batch_module``) also add each phase's process CPU seconds (all
    threads) to the returned dict: CPU time is what a busy machine's other jobs disturb least."""
    cpu: dict[str, float] = {}
    base = batch_module.PhaseTimer

    class CpuPhaseTimer(base):
        def __call__(self, phase: str):
            inner = super().__call__(phase)

            class _Phase:
                def __enter__(self_inner):
                    self_inner.cpu = time.process_time()
                    return inner.__enter__()

                def __exit__(self_inner, *exc):
                    cpu[phase] = cpu.get(phase, 0.0) + time.process_time() - self_inner.cpu
                    return inner.__exit__(*exc)

            return _Phase()

    batch_module.PhaseTimer = CpuPhaseTimer
    return cpu


# --------------------------------------------------------------------------------------------------
# EasyEdit (its own environment)


def easyedit_python(args, work: Path) -> Path:
    """EasyEdit's virtual environment (created once): system site packages (torch, transformers), the
    import-time packages with --no-deps, and EasyEdit's source at the pinned commit on its path."""
    venv = work / "easyedit-venv"
    python = venv / "bin" / "python"
    commit = resolve_easyedit_commit(args)
    src = work / f"easyedit-src-{commit[:12]}"
    if not (src / "easyeditor").is_dir():
        tmp = work / "easyedit-src.tmp"
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(git_dir(args.easyedit_repo)), "archive", commit, "easyeditor"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        os.replace(tmp, src)
    if not python.exists():
        base_python = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter kedit's venv was made from
        subprocess.run([str(base_python), "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *EASYEDIT_PACKAGES], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "easyedit_src.pth").write_text(str(src.resolve()) + "\n")
    return python


def git_dir(repo: str) -> Path:
    path = Path(repo)
    return path / ".git" if (path / ".git").is_dir() else path


def resolve_easyedit_commit(args) -> str:
    if args.easyedit_repo is None:
        raise SystemExit("--easyedit-repo PATH (a clone or mirror of zjunlp/EasyEdit) is needed for the EasyEdit stages")
    out = subprocess.run(["git", "--git-dir", str(git_dir(args.easyedit_repo)), "rev-parse", "--verify",
                          f"{args.easyedit_commit}^{{commit}}"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"EasyEdit commit {args.easyedit_commit!r} is not in {args.easyedit_repo}: {out.stderr.strip()}")
    return out.stdout.strip()


def import_easyedit_memit():
    """EasyEdit's MEMIT modules without the package __init__ files that import every editor."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("easyeditor")
    root = Path(spec.submodule_search_locations[0])
    for name in ("easyeditor", "easyeditor.models"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.parent / name.replace(".", "/"))]
        sys.modules[name] = package
    from easyeditor.models.memit import memit_main
    from easyeditor.models.memit.memit_hparams import MEMITHyperParams
    from easyeditor.models.rome import layer_stats

    return memit_main, MEMITHyperParams, layer_stats, root.parent


def easyedit_setup(work: Path):
    inputs = read_json(work / "inputs.json")
    memit_main, MEMITHyperParams, layer_stats, src = import_easyedit_memit()
    docs = [{"text": text} for text in inputs["corpus_documents"]]
    # layer_stats loads its corpus with datasets.load_dataset (the hub): give it the same documents.
    layer_stats.load_dataset = lambda name, config=None, **kw: {"train": docs}
    hp = MEMITHyperParams(**inputs["hparams"], **inputs["module_templates"], alg_name="MEMIT", device="cpu",
                          model_name=Path(inputs["model_dir"]).name, stats_dir=str(work / "easyedit-stats"))
    model, tok = load_plain_model(Path(inputs["model_dir"]))
    return inputs, memit_main, hp, model, tok, src


def stage_easyedit_c0(args, work: Path) -> dict:
    inputs, memit_main, hp, model, tok, src = easyedit_setup(work)
    per_layer = {}
    start, cpu = time.perf_counter(), time.process_time()
    for layer in hp.layers:
        t = time.perf_counter()
        memit_main.get_cov(model, tok, hp.rewrite_module_tmp.format(layer), hp.mom2_dataset, hp.mom2_n_samples,
                           hp.mom2_dtype, hparams=hp)
        per_layer[layer] = time.perf_counter() - t
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "seconds_per_layer": per_layer, "easyedit_source": str(src),
            "how": "EasyEdit get_cov -> layer_stats per layer (one pass per layer), on the unedited model"}


def stage_easyedit_edit(args, work: Path) -> dict:
    import torch

    inputs, memit_main, hp, model, tok, src = easyedit_setup(work)
    rss_model = PeakMemory.rss()
    memit_main.CONTEXT_TEMPLATES_CACHE = inputs["context_templates"]
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
                cpu_seconds[name] = cpu_seconds.get(name, 0.0) + time.process_time() - c
        return wrapper

    memit_main.compute_z = timed("values", memit_main.compute_z)
    memit_main.compute_ks = timed("keys", memit_main.compute_ks)
    memit_main.get_module_input_output_at_words = timed("keys: cur_zs", memit_main.get_module_input_output_at_words)
    memit_main.get_cov = timed("statistics (load C0)", memit_main.get_cov)
    steps: list[int] = []
    adam = torch.optim.Adam

    class CountingAdam(adam):  # counts the value optimisation's steps (the only Adam in this process)
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            steps.append(0)

        def step(self, *a, **kw):
            steps[-1] += 1
            return super().step(*a, **kw)

    torch.optim.Adam = CountingAdam
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "case_id": r["case_id"]} for r in inputs["requests"]]
    with PeakMemory() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        deltas = memit_main.execute_memit(model, tok, requests, hp)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    torch.optim.Adam = adam
    tensors = {}
    for name, (key_mat, val_mat) in deltas.items():  # as apply_memit_to_model forms the update
        weight = dict(model.named_parameters())[name]
        tensors[name] = memit_main.upd_matrix_match_shape(key_mat @ val_mat.T, weight.shape).float().contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(work / "deltas-easyedit.safetensors"))
    keys = seconds.get("keys", 0.0) + seconds.get("keys: cur_zs", 0.0)
    phases = {"values": seconds.get("values", 0.0), "keys": keys,
              "statistics (load C0)": seconds.get("statistics (load C0)", 0.0)}
    phases["solve"] = total - sum(phases.values())
    return {"what": "EasyEdit MEMIT (execute_memit)", "easyedit_source": str(src), "seconds_end_to_end": total,
            "phases": phases, "timings_raw": seconds, "cpu_seconds_end_to_end": cpu, "cpu_seconds_per_phase": cpu_seconds,
            "value_steps_mean": sum(steps) / max(len(steps), 1),
            "value_steps": steps, "rss_after_model_load_gib": gib(rss_model), "peak_rss_gib": gib(peak.peak),
            "max_rss_gib": gib(PeakMemory.max_rss()), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# evaluation and comparison (kedit's environment)


def relative_differences(a: dict, b: dict) -> dict:
    return {name: float((a[name].double() - b[name].double()).norm() / b[name].double().norm()) for name in sorted(b)}


def stage_evaluate(args, work: Path) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from kedit_core.deltas import Deltas
    from kedit_core.evaluation import EvalSettings, aggregate, load_cases

    inputs = read_json(work / "inputs.json")
    loaded = kedit_model(inputs)
    fmt, cases = load_cases(inputs["requests_file"], limit=len(inputs["requests"]))
    settings = EvalSettings(generation=False, progress=True)
    from kedit_core.evaluation import evaluate_cases

    tools = ["easyedit", *KEDIT_VARIANTS]
    deltas = {tool: load_file(str(work / f"deltas-{tool}.safetensors")) for tool in tools
              if (work / f"deltas-{tool}.safetensors").exists()}
    metrics = {"unedited": aggregate(evaluate_cases(loaded, cases, fmt, settings), fmt)}
    for tool, tensors in deltas.items():
        with Deltas(dict(tensors)).apply(loaded.model, check_fingerprint=False):
            metrics[tool] = aggregate(evaluate_cases(loaded, cases, fmt, settings), fmt)
    comparisons = {}
    for a, b in [("kedit-reference", "easyedit"), ("kedit-fast", "easyedit"), ("kedit-fast-early-stop", "easyedit"),
                 ("kedit-fast", "kedit-reference")]:
        if a in deltas and b in deltas:
            comparisons[f"{a} vs {b}"] = relative_differences(deltas[a], deltas[b])
    # The two tools' C0 (same documents, each tool's own code).
    c0 = {}
    source = kedit_covariance(inputs, work)
    hp = inputs["hparams"]
    for layer in hp["layers"]:
        module = inputs["module_templates"]["rewrite_module_tmp"].format(layer)
        found = sorted((work / "easyedit-stats").rglob(f"{module}_float32_mom2*.npz"))
        if not found:
            continue
        ee = np.load(found[0], allow_pickle=True)  # EasyEdit's tally cache: the CombinedStat's state
        ee_mom2 = torch.from_numpy(ee["mom2.mom2"]).double() / float(ee["mom2.count"])
        kd = source.moment(loaded, layer)
        c0[layer] = {"relative_difference": float((kd.mom2.double() - ee_mom2).norm() / ee_mom2.norm()),
                     "kedit_count": kd.count, "easyedit_count": int(ee["mom2.count"])}
    return {"metrics": metrics, "delta_relative_differences": comparisons, "c0_kedit_vs_easyedit": c0,
            "records": len(cases), "format": fmt, "settings": settings.to_dict()}


# --------------------------------------------------------------------------------------------------
# report


def phase_rows(results: dict) -> list[tuple[str, dict]]:
    cols = [c for c in ("kedit-fast", "kedit-fast-early-stop", "kedit-reference", "easyedit") if c in results]
    c0 = {"easyedit": results.get("easyedit-c0", {}).get("seconds")}
    for c in cols:
        if c.startswith("kedit"):
            c0[c] = results.get("kedit-c0", {}).get("seconds")
    rows = [("C0", c0)]
    for phase in ("values", "keys", "solve"):
        rows.append((phase, {c: results[c]["phases"].get(phase) for c in cols}))
    rows.append(("C0 load (+ factor)", {c: results[c]["phases"].get("statistics (load C0, factor)",
                                                                     results[c]["phases"].get("statistics (load C0)"))
                                        for c in cols}))
    rows.append(("end to end excluding C0", {c: results[c]["seconds_end_to_end"] for c in cols}))
    return rows


def report(args, work: Path, results: dict, out: Path) -> dict:
    cols = [c for c in ("kedit-fast", "kedit-fast-early-stop", "kedit-reference", "easyedit") if c in results]
    rows = phase_rows(results)
    lines = [f"{'phase':<26s}" + "".join(f"{c:>28s}" for c in cols) + f"{'EasyEdit / kedit-fast':>24s}"]
    summary = {"seconds": {}, "speedup_vs_easyedit": {}}
    for phase, values in rows:
        summary["seconds"][phase] = values
        ee = values.get("easyedit")
        cells = "".join(f"{'' if values.get(c) is None else '%.1f s' % values[c]:>28s}" for c in cols)
        ratio = ""
        if ee and values.get("kedit-fast"):
            ratio = f"{ee / values['kedit-fast']:.1f}x"
        for c in cols:
            if c != "easyedit" and ee and values.get(c):
                summary["speedup_vs_easyedit"].setdefault(c, {})[phase] = ee / values[c]
        lines.append(f"{phase:<26s}{cells}{ratio:>24s}")
    cpu = {c: results[c].get("cpu_seconds_end_to_end") for c in cols}
    lines.append(f"{'CPU s, end to end excl C0':<26s}" + "".join(f"{'' if cpu[c] is None else '%.1f s' % cpu[c]:>28s}"
                                                               for c in cols)
                 + (f"{cpu['easyedit'] / cpu['kedit-fast']:>23.1f}x" if cpu.get("easyedit") and cpu.get("kedit-fast")
                    else ""))
    summary["cpu_seconds_end_to_end"] = cpu
    lines.append(f"{'value steps per request':<26s}" + "".join(f"{results[c]['value_steps_mean']:>28.2f}" for c in cols))
    lines.append(f"{'peak RSS (GiB)':<26s}" + "".join(f"{results[c]['peak_rss_gib']:>28.2f}" for c in cols))
    ev = results.get("evaluate")
    if ev:
        for metric in ("ES", "PS", "NS"):
            lines.append(f"{metric:<26s}" + "".join(f"{ev['metrics'].get(c, {}).get(metric, float('nan')):>28.1f}"
                                                     for c in cols)
                         + f"   (unedited {ev['metrics']['unedited'].get(metric, float('nan')):.1f})")
        for pair, diffs in ev["delta_relative_differences"].items():
            lines.append(f"delta rel. diff {pair}: " + ", ".join(f"{k.split('.')[2]}: {v:.1e}" for k, v in diffs.items()))
        for layer, c in ev["c0_kedit_vs_easyedit"].items():
            lines.append(f"C0 layer {layer}: kedit vs EasyEdit rel. diff {c['relative_difference']:.1e} "
                         f"({c['kedit_count']} / {c['easyedit_count']} tokens)")
    goals = goal_checks(results, summary)
    summary["goals"] = goals
    for name, g in goals.items():
        lines.append(f"goal {name}: {g['measured']} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": results["command"], "machine": results["machine"], "easyedit": results.get("easyedit_info"),
           "kedit_commit": git_commit(REPO), "summary": summary, "stages": results["stages"],
           "inputs": results.get("inputs_summary")}
    write_json(out / "vs_easyedit.json", doc)
    (out / "vs_easyedit.txt").write_text(text + "\n", encoding="utf-8")
    (out / "vs_easyedit.md").write_text(markdown_table(results, rows, cols, goals), encoding="utf-8")
    plot(rows, cols, out / "vs_easyedit.png", results)
    if args.readme:
        update_readme(Path(args.readme), (out / "vs_easyedit.md").read_text(encoding="utf-8"))
    return doc


README_BEGIN = "<!-- bench_vs_easyedit table: begin (written by bench/bench_vs_easyedit.py --readme) -->"
README_END = "<!-- bench_vs_easyedit table: end -->"


def markdown_table(results: dict, rows, cols, goals: dict) -> str:
    """The per-phase table (kedit fast / fast following the published steps / reference / EasyEdit)."""
    names = {"kedit-fast": "kedit fast", "kedit-fast-early-stop": "kedit fast, early stop (opt-in)",
             "kedit-reference": "kedit reference", "easyedit": "EasyEdit"}
    out = ["| phase | " + " | ".join(names[c] for c in cols) + " | EasyEdit / kedit fast |",
           "|---" * (len(cols) + 2) + "|"]
    for phase, values in rows:
        cells = ["" if values.get(c) is None else f"{values[c]:,.1f} s" for c in cols]
        ee, fast = values.get("easyedit"), values.get("kedit-fast")
        ratio = f"{ee / fast:.1f}x" if ee and fast else ""
        bold = phase.startswith("end to end")
        out.append(f"| {'**' + phase + '**' if bold else phase} | " + " | ".join(cells)
                   + f" | {'**' + ratio + '**' if bold and ratio else ratio} |")
    cpu = {c: results[c].get("cpu_seconds_end_to_end") for c in cols}
    if all(cpu.values()):
        ratio = f"{cpu['easyedit'] / cpu['kedit-fast']:.1f}x" if "easyedit" in cpu and "kedit-fast" in cpu else ""
        out.append("| CPU seconds (all threads), end to end excluding C0 | " + " | ".join(f"{cpu[c]:,.0f} s" for c in cols)
                   + f" | {ratio} |")
    out.append("| value steps per request | " + " | ".join(f"{results[c]['value_steps_mean']:.1f}" for c in cols) + " | |")
    out.append("| peak memory (RSS) | " + " | ".join(f"{results[c]['peak_rss_gib']:.2f} GiB" for c in cols) + " | |")
    ev = results.get("evaluate")
    if ev:
        for metric in ("ES", "PS", "NS"):
            out.append(f"| {metric} (unedited {ev['metrics']['unedited'][metric]:.1f}) | "
                       + " | ".join("" if c not in ev["metrics"] else f"{ev['metrics'][c][metric]:.1f}" for c in cols)
                       + " | |")
    loads = [results["stages"][s]["loadavg_start"][0] for s in results["stages"] if "loadavg_start" in results["stages"][s]]
    out.append("")
    out.append(f"Load average (1 min) at the start of the stages: {min(loads):.2f}-{max(loads):.2f}." if loads else "")
    out.append("")
    for name, g in goals.items():
        out.append(f"- {name}: {g['measured']} (goal {g['goal']}): **{'met' if g['met'] else 'not met'}**")
    return "\n".join(out) + "\n"


def update_readme(path: Path, table: str) -> None:
    """Replace the text between the README's table markers with ``table``."""
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path} has no bench_vs_easyedit table markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(head + README_BEGIN + "\n" + table + README_END + tail, encoding="utf-8")


def goal_checks(results: dict, summary: dict) -> dict:
    """The issue's goals, measured: speed-ups over EasyEdit, C0, memory, and quality."""
    goals = {}
    speed = summary["speedup_vs_easyedit"]
    end = "end to end excluding C0"
    if "kedit-fast" in speed and end in speed["kedit-fast"]:
        x = speed["kedit-fast"][end]
        goals["fast mode (default) end to end vs EasyEdit"] = {"measured": f"{x:.1f}x", "goal": ">= 20x", "met": x >= 20}
        goals["published objective step for step vs EasyEdit"] = {"measured": f"{x:.1f}x", "goal": ">= 6x",
                                                                    "met": x >= 6}
    if "kedit-fast-early-stop" in speed and end in speed["kedit-fast-early-stop"]:
        x = speed["kedit-fast-early-stop"][end]
        goals["fast mode with early stopping vs EasyEdit (quality below)"] = {"measured": f"{x:.1f}x",
                                                                             "goal": ">= 20x", "met": x >= 20}
    if "kedit-fast" in speed and "C0" in speed["kedit-fast"]:
        x = speed["kedit-fast"]["C0"]
        goals["C0 vs EasyEdit"] = {"measured": f"{x:.1f}x", "goal": ">= 10x", "met": x >= 10}
    if "kedit-fast" in results and "kedit-reference" in results:
        x = results["kedit-fast"]["peak_rss_gib"] / results["kedit-reference"]["peak_rss_gib"]
        goals["peak memory fast / reference"] = {"measured": f"{x:.2f}", "goal": "<= 1.5", "met": x <= 1.5}
    ev = results.get("evaluate")
    if ev and "kedit-fast" in ev["metrics"] and "easyedit" in ev["metrics"]:
        diffs = {m: ev["metrics"]["kedit-fast"][m] - ev["metrics"]["easyedit"][m] for m in ("ES", "PS", "NS")}
        goals["ES/PS/NS fast mode vs EasyEdit"] = {
            "measured": ", ".join(f"{m} {d:+.1f}" for m, d in diffs.items()), "goal": "equal or better",
            "met": all(d >= 0 for d in diffs.values())}
    ref = ev and ev["delta_relative_differences"].get("kedit-reference vs easyedit")
    if ref:
        worst = max(ref.values())
        goals["deltas reference mode vs EasyEdit"] = {"measured": f"{worst:.1e} (worst layer)", "goal": "<= 1e-3",
                                                      "met": worst <= 1e-3}
    return goals


def plot(rows, cols, path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [(name, values) for name, values in rows if name in ("C0", "values", "keys", "solve")]
    colours = {"kedit-fast": "#1f77b4", "kedit-fast-early-stop": "#6baed6", "kedit-reference": "#9ecae1",
               "easyedit": "#999999"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        xs = [k + i * width for k in range(len(phases))]
        axes[0].bar(xs, [values.get(c) or 0 for _, values in phases], width, label=c, color=colours.get(c))
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(phases))], [p for p, _ in phases])
    axes[0].set_ylabel("seconds")
    axes[0].set_title("per phase")
    axes[0].legend(fontsize=8)
    end = dict(rows)["end to end excluding C0"]
    axes[1].bar(cols, [end[c] for c in cols], color=[colours.get(c) for c in cols])
    ee = end.get("easyedit")
    for k, c in enumerate(cols):
        if ee and c != "easyedit":
            axes[1].text(k, end[c], f"{ee / end[c]:.1f}x", ha="center", va="bottom")
    axes[1].set_title("end to end excluding C0 (speed-up over EasyEdit)")
    axes[1].tick_params(axis="x", labelsize=7)
    fig.suptitle(f"MEMIT, {results.get('inputs_summary', {}).get('requests')} CounterFact edits, "
                 f"{results['machine'].get('threads')} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------
# orchestration


def stage_key(args, stage: str, work: Path) -> str:
    """What a stage's result depends on besides the code: the run's inputs."""
    inputs = work / "inputs.json"
    payload = {"model": args.model, "requests": args.requests, "tokens": args.tokens, "layers": args.layers,
               "lam": args.lam, "value_steps": args.value_steps, "threads": args.threads}
    if stage.startswith("easyedit"):
        payload["easyedit_commit"] = resolve_easyedit_commit(args)
    if stage != "prepare" and inputs.exists():
        payload["inputs"] = hashlib.sha256(inputs.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def run_stage_here(args, stage: str, work: Path) -> dict:
    set_threads(args.threads)
    if stage == "prepare":
        return stage_prepare(args, work)
    if stage == "kedit-c0":
        return stage_kedit_c0(args, work)
    if stage in KEDIT_VARIANTS:
        return stage_kedit_edit(args, work, stage)
    if stage == "easyedit-c0":
        return stage_easyedit_c0(args, work)
    if stage == "easyedit-edit":
        return stage_easyedit_edit(args, work)
    if stage == "evaluate":
        return stage_evaluate(args, work)
    raise SystemExit(f"unknown stage {stage!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--easyedit-repo", help="a clone or mirror of github.com/zjunlp/EasyEdit")
    parser.add_argument("--easyedit-commit", default="14cea82", help="EasyEdit commit to run (default 14cea82)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="a zoo model (default smollm2-135m), tiny-llama, or a save_pretrained directory")
    parser.add_argument("--requests", type=int, default=100, help="CounterFact edits (default 100)")
    parser.add_argument("--tokens", type=int, default=100_000, help="C0 corpus: WikiText documents up to this many tokens")
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="edited layers (default 5,6,7,8,9 for a 30-layer model)")
    parser.add_argument("--lam", type=float, default=15000.0, help="mom2_update_weight (default 15000)")
    parser.add_argument("--value-steps", type=int, default=20, help="v_num_grad_steps (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every stage (default 2)")
    parser.add_argument("--work-dir", default=str(REPO / "out" / "vs_easyedit"),
                        help="where stages keep their results (resumable; default out/vs_easyedit)")
    parser.add_argument("--out", default=str(HERE / "results" / "vs_easyedit"))
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run (default: all)")
    parser.add_argument("--redo", default="", help="comma-separated stages to recompute even if done")
    parser.add_argument("--readme", help="also write the table into this README (between its table markers)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    if args.stage:
        load_start = os.getloadavg()
        result = run_stage_here(args, args.stage, work)
        result["loadavg_start"], result["loadavg_end"] = load_start, os.getloadavg()
        write_json(work / f"stage-{args.stage}.result.json", result)
        return 0

    wanted = [s for s in args.stages.split(",") if s]
    redo = {s for s in args.redo.split(",") if s}
    unknown = (set(wanted) | redo) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    common = ["--model", args.model, "--requests", str(args.requests), "--tokens", str(args.tokens), "--lam",
              str(args.lam), "--value-steps", str(args.value_steps), "--threads", str(args.threads),
              "--work-dir", str(work)]
    if args.layers:
        common += ["--layers", ",".join(map(str, args.layers))]
    if args.easyedit_repo:
        common += ["--easyedit-repo", args.easyedit_repo, "--easyedit-commit", args.easyedit_commit]
    for stage in STAGES:
        if stage not in wanted:
            continue
        path = work / f"stage-{stage}.json"
        key = stage_key(args, stage, work)
        if stage not in redo and path.exists() and read_json(path).get("key") == key:
            print(f"[{stage}] done before: {path}")
            continue
        python = easyedit_python(args, work) if stage.startswith("easyedit") else Path(sys.executable)
        print(f"[{stage}] running ({python})", flush=True)
        load_start = os.getloadavg()
        start = time.perf_counter()
        subprocess.run([str(python), str(Path(__file__).resolve()), "--stage", stage, *common], check=True,
                       cwd=str(REPO))
        result = read_json(work / f"stage-{stage}.result.json")
        write_json(path, {"key": key, "stage": stage, "wall_seconds": time.perf_counter() - start,
                          "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "kedit_commit": git_commit(REPO),
                          "result": result})
        key_after = stage_key(args, stage, work)  # prepare writes inputs.json: later keys see it
        if stage == "prepare" and key_after != key:
            write_json(path, {**read_json(path), "key": key_after})

    results = {"stages": {}}
    for stage in STAGES:
        path = work / f"stage-{stage}.json"
        if path.exists():
            results["stages"][stage] = read_json(path)
            results[stage] = results["stages"][stage]["result"]
    if "easyedit-edit" in results:
        results["easyedit"] = results["easyedit-edit"]
    missing = [c for c in ("kedit-fast", "easyedit") if c not in results]
    if missing:
        print(f"not reporting yet: stage(s) {missing} not done")
        return 0
    import torch

    results["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__, "threads": args.threads,
                          "cpu_count": os.cpu_count(), "processor": platform.processor(),
                          "loadavg_at_report": os.getloadavg()}
    if args.easyedit_repo:
        results["easyedit_info"] = {"repository": "github.com/zjunlp/EasyEdit", "commit": resolve_easyedit_commit(args),
                                    "mirror": args.easyedit_repo, "packages_no_deps": EASYEDIT_PACKAGES}
    prep = results.get("prepare", {})
    results["inputs_summary"] = {k: prep.get(k) for k in ("layers", "requests", "corpus_documents", "corpus_tokens",
                                                          "context_templates")}
    report(args, work, results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
