"""Shared pieces of the reliability tests (docs/RELIABILITY.md lists what each test checks): a tiny model,
a cheap MEMIT setting, covariance statistics that need no corpus, a full hash of a model's weights, and
the CLI run in-process or as a real process."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kedit_core as kedit
from kedit_core.stats import InMemoryCovariance
from kedit_core.testing import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = [["{}"]]
# MEMIT on one layer with two value steps: enough to run every phase of an edit in well under a second.
EDIT = dict(layers=[1], v_num_grad_steps=2, mom2_update_weight=1.0, clamp_norm_factor=4.0, v_weight_decay=1e-3)


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer, name and bytes (all of them, not a sample)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity_covariance(model, layers=(1,), scale: float = 1.0) -> InMemoryCovariance:
    d = model.adapter.key_size
    return InMemoryCovariance({layer: scale * torch.eye(d) for layer in layers})


def requests():
    return [kedit.EditRequest("The sport played by {}", "LeBron James", "football", "basketball", case_id=0),
            kedit.EditRequest("The capital city of {}", "France", "Berlin", "Paris", case_id=1)]


def edit(model, reqs=None, stats=None, work_dir=None, **overrides):
    context = kedit.EditContext(stats=stats if stats is not None else identity_covariance(model, overrides.get(
        "layers", EDIT["layers"])), context_templates=TEMPLATES, progress=False, work_dir=work_dir)
    return kedit.compute_edit(model, reqs if reqs is not None else requests(), "memit", context=context,
                              **{**EDIT, **overrides})


@pytest.fixture(scope="package")
def tiny():
    """A 2-layer GPT-2 (d 32, context 64) with the test tokenizer; tests that change it restore it."""
    torch.set_num_threads(1)
    return tiny_model("gpt2", num_layers=2, hidden_size=32, context_length=64)


def subprocess_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_VERBOSITY="error", **extra)


def run_kedit(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``kedit ARGS`` as a real process (exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "kedit_core.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=timeout)


def main_lines(argv, capsys) -> tuple[int, list[str]]:
    """Run the CLI in-process; returns the exit status and the non-empty lines of stderr."""
    from kedit_core.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


# transformers' "Loading weights: 100%|...| 29/29" bars: output while working, not part of an error
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")


def tiny_for_resume():
    """The model the process-fault tests use in a killed process and again in the test (same seed)."""
    return tiny_model("gpt2", num_layers=2, hidden_size=32, context_length=64, seed=3)


def three_requests():
    return requests() + [kedit.EditRequest("The birthplace of {}", "Albert Einstein", "Tokyo", "Ulm", case_id=2)]

