"""``torchrun --nproc-per-node 2 kedit edit``: two CPU processes share the requests' value optimisation
and gather the values; the deltas equal one process's to float64 rounding. And ``--max-memory``."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from kedit_core.cli.main import main
from kedit_core.testing import save_tiny_model

from .conftest import TEMPLATES

REQUESTS = [{"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"},
            {"prompt": "The capital city of {}", "subject": "France", "target_new": "Berlin"},
            {"prompt": "The birthplace of {}", "subject": "Albert Einstein", "target_new": "Tokyo"},
            {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "English"}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model("llama", root / "model", num_layers=4, hidden_size=64)
    (root / "requests.json").write_text(json.dumps(REQUESTS))
    (root / "templates.json").write_text(json.dumps(TEMPLATES))
    return root


def edit_args(root, out, *extra):
    return ["edit", "--model", str(root / "model"), "--method", "memit", "--requests", str(root / "requests.json"),
            "--layers", "1,2", "--context-templates", str(root / "templates.json"), "--set", "mom2_adjustment=false",
            "--set", "clamp_norm_factor=4", "--set", "v_weight_decay=0.001", "--set", "v_num_grad_steps=6",
            "--dtype", "float64", "--device", "cpu", "--no-progress", "--json", "--save-deltas", str(out), *extra]


def test_two_torchrun_processes_give_one_processs_deltas(workdir, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "kedit_core.cli.main", *edit_args(workdir, workdir / "two.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout)   # rank 0 alone prints
    assert two["value_batches"]["world_size"] == 2 and two["value_batches"]["requests_per_rank"] == [2, 2]

    assert main(edit_args(workdir, workdir / "one.safetensors")) == 0
    one = json.loads(capsys.readouterr().out)
    assert "world_size" not in one["value_batches"]
    a, b = load_file(str(workdir / "two.safetensors")), load_file(str(workdir / "one.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 2
    for name in a:
        assert float((a[name] - b[name]).norm() / b[name].norm()) < 1e-10, name


def test_max_memory_too_small_is_a_clear_cli_error(workdir, capsys):
    assert main(edit_args(workdir, workdir / "never.safetensors", "--max-memory", "16KB")) == 2
    err = capsys.readouterr().err
    assert "does not fit in memory: request 0 alone" in err and "Traceback" not in err
    assert not (workdir / "never.safetensors").exists()
    assert main(edit_args(workdir, workdir / "never.safetensors", "--max-memory", "lots")) == 2
    assert "memory size 'lots'" in capsys.readouterr().err
