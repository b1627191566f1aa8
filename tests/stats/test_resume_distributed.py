"""Long runs: kill -9 then rerun resumes to the same C0; two torchrun processes equal one; the CLI."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from kedit_core.cli.main import main
from kedit_core.stats import CachedCovariance, collect_second_moments, read_cache_file
from kedit_core.testing import save_tiny_model, tiny_model

from .conftest import relative_error

MODEL = dict(num_layers=4, hidden_size=32, context_length=32)
SETTINGS = dict(tokens=700, batch_tokens=64, chunk_tokens=100, mom2_dtype="float64")

KILLED_RUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from kedit_core.stats import CachedCovariance
    from kedit_core.testing import tiny_model

    corpus, stats_dir, marker = sys.argv[1:4]
    model = tiny_model("gpt2", **json.loads(sys.argv[4]))

    def on_checkpoint(info):
        if info["next_chunk"] == 3:       # three chunks are safely on disk: signal, then keep "working"
            Path(marker).write_text(json.dumps(info))
            time.sleep(600)

    source = CachedCovariance(corpus, stats_dir, checkpoint_every=0, progress=False, on_checkpoint=on_checkpoint,
                              **json.loads(sys.argv[5]))
    source.prepare(model, [1, 2])
    print("finished without being killed")
""")


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_VERBOSITY="error")


@pytest.fixture()
def corpus_file(tmp_path, small_corpus):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(small_corpus) + "\n")
    return path


def test_kill_9_mid_run_then_rerun_resumes_to_the_same_c0(tmp_path, corpus_file):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    marker = tmp_path / "checkpointed.json"
    stats_dir = tmp_path / "stats"
    proc = subprocess.Popen([sys.executable, str(script), str(corpus_file), str(stats_dir), str(marker),
                             json.dumps(MODEL), json.dumps(SETTINGS)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read()}\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("the run never wrote its third checkpoint")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()

    partials = list(stats_dir.rglob(".partial-*"))
    assert len(partials) == 1 and not list(stats_dir.rglob("*.mlp.c_proj.safetensors"))
    model = tiny_model("gpt2", **MODEL)
    resumed = CachedCovariance(corpus_file, stats_dir, checkpoint_every=0, progress=False, **SETTINGS)
    resumed.prepare(model, [1, 2])
    report = resumed.last_report[1]
    assert report["status"] == "computed" and report["resumed_from"]["next_chunk"] == 3
    assert not partials[0].exists()

    settings = {k: v for k, v in SETTINGS.items() if k != "mom2_dtype"}
    uninterrupted = collect_second_moments(model, [1, 2], corpus_file, progress=False, **settings)
    for layer in (1, 2):
        got = resumed.moment(model, layer)
        assert got.count == uninterrupted.count == 700
        assert relative_error(got.mom2, uninterrupted.moment(layer)) < 1e-12


def test_a_checkpoint_from_other_settings_or_damaged_is_not_resumed(tmp_path, small_corpus):
    model = tiny_model("gpt2", **MODEL)
    ckpt = tmp_path / "partial.safetensors"
    settings = {k: v for k, v in SETTINGS.items() if k != "mom2_dtype"}
    first = collect_second_moments(model, [1], small_corpus, checkpoint=ckpt, checkpoint_every=0, progress=False,
                                   **settings)
    assert ckpt.exists() and first.info["resumed_from"] is None
    same = collect_second_moments(model, [1], small_corpus, checkpoint=ckpt, progress=False, **settings)
    assert same.info["resumed_from"]["tokens"] == 700 and same.count == 700  # the finished state resumes as done
    assert torch.equal(same.sums[1], first.sums[1])
    with pytest.warns(RuntimeWarning, match=r"other settings \(batch_tokens\)"):
        other = collect_second_moments(model, [1], small_corpus, checkpoint=ckpt, progress=False,
                                       **{**settings, "batch_tokens": 32})
    assert other.info["resumed_from"] is None
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.warns(RuntimeWarning, match="unreadable partial statistics"):
        damaged = collect_second_moments(model, [1], small_corpus, checkpoint=ckpt, progress=False, **settings)
    assert damaged.info["resumed_from"] is None and damaged.count == 700


def test_two_torchrun_processes_equal_one(tmp_path, corpus_file):
    model_dir = save_tiny_model("gpt2", tmp_path / "model", **MODEL)
    args = ["stats", "--model", str(model_dir), "--layers", "1,2", "--corpus", str(corpus_file), "--tokens", "700",
            "--batch-tokens", "64", "--chunk-tokens", "100", "--mom2-dtype", "float64", "--no-progress"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "kedit_core.cli.main", *args, "--stats-dir", str(tmp_path / "two")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["world_size"] == 2 and [entry["status"] for entry in report["layers"]] == ["computed"] * 2
    assert not list((tmp_path / "two").rglob(".partial-*"))

    single = CachedCovariance(corpus_file, tmp_path / "one", batch_tokens=64, chunk_tokens=100, progress=False,
                              tokens=700, mom2_dtype="float64")
    loaded = tiny_model("gpt2", **MODEL)  # same seed: the saved model's weights
    for layer, entry in zip((1, 2), report["layers"]):
        mom2, count, meta = read_cache_file(entry["path"])
        one = single.moment(loaded, layer)
        assert count == one.count == 700  # each rank forwarded only its chunks, yet all 700 tokens count
        assert relative_error(mom2, one.mom2) < 1e-10


def test_kedit_stats_command_computes_then_reuses(tmp_path, corpus_file, capsys):
    model_dir = save_tiny_model("llama", tmp_path / "model", **MODEL)
    args = ["stats", "--model", str(model_dir), "--layers", "0-1,3", "--corpus", str(corpus_file), "--tokens", "300",
            "--stats-dir", str(tmp_path / "stats"), "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert [(e["layer"], e["status"], e["count"]) for e in first["layers"]] == [(0, "computed", 300),
                                                                                (1, "computed", 300),
                                                                                (3, "computed", 300)]
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in second["layers"]] == ["cached"] * 3
    assert main(["stats", "--model", str(model_dir), "--layers", "1"]) == 2
    assert "needs --corpus" in capsys.readouterr().err
    assert main(["stats", "--model", str(model_dir), "--layers", "1,x", "--corpus", str(corpus_file)]) == 2
    assert "expected comma-separated layer numbers" in capsys.readouterr().err


def test_torchrun_ranks_take_gpus_only_when_each_has_its_own(monkeypatch):
    # Two ranks on a one-GPU machine must not both take cuda:0 (NCCL refuses a shared GPU): all go to the CPU.
    from kedit_core.stats.collect import distributed_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert distributed_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed_device("auto") == "cuda:1"
    assert distributed_device("cpu") == "cpu"   # an explicit device is kept
