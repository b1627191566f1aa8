"""Process faults: SIGKILL in the middle of value optimisation, an evaluation sweep and statistics (then
the same run again resumes to the same result), two processes computing the same statistics at once,
and a disk that fills up during a write (docs/RELIABILITY.md, "Process faults")."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kedit_core.editing.values as values
from kedit_core import Deltas
from kedit_core.atomic import atomic_path, write_json_atomic
from kedit_core.cli.main import main
from kedit_core.stats import CachedCovariance, read_cache_file
from kedit_core.testing import save_tiny_model

from .conftest import (REPO_ROOT, edit, identity_covariance, main_lines, subprocess_env, three_requests,
                       tiny_for_resume)

WORKER = Path(__file__).with_name("workers.py")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread, as in the killed processes, so both sides compute with the same arithmetic."""
CORPUS = ["The quick brown fox jumps over the lazy dog near the river bank at dawn.",
          "Paris is the capital of France, and Berlin is the capital of Germany.",
          "Statistics of the keys are collected over every token of this small corpus."] * 6


def start(*args, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=REPO_ROOT,
                            env=subprocess_env(PYTHONPATH=str(REPO_ROOT)), stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def wait_for(proc, marker: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended before reaching its marker:\n{out}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the process never reached {marker.name}")
        time.sleep(0.05)


def kill_9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def test_sigkill_during_value_optimisation_then_rerun_resumes(tmp_path, monkeypatch):
    work, marker = tmp_path / "work", tmp_path / "held"
    proc = start("values", work, marker)
    wait_for(proc, marker)
    kill_9(proc)
    assert len(list(work.glob("values-*.pt"))) == 2 and not list(work.glob(".*.tmp"))

    model = tiny_for_resume()
    uninterrupted = edit(model, three_requests(), value_batch_size=1)
    computed = []
    real = values._optimise_chunk
    monkeypatch.setattr(values, "_optimise_chunk", lambda *a, **k: computed.append(1) or real(*a, **k))
    resumed = edit(model, three_requests(), work_dir=work, value_batch_size=1)
    assert len(computed) == 1                                  # only the batch the kill lost
    assert resumed.info["values_resumed"]["batches_loaded"] == 2
    for name in uninterrupted.deltas.names():
        assert torch.equal(resumed.deltas.tensors[name], uninterrupted.deltas.tensors[name]), name


def test_a_damaged_value_batch_is_recomputed_not_trusted(tmp_path):
    model = tiny_for_resume()
    work = tmp_path / "work"
    first = edit(model, three_requests(), work_dir=work, value_batch_size=1)
    files = sorted(work.glob("values-*.pt"))
    files[0].write_bytes(files[0].read_bytes()[:50])                 # truncated
    marker = tmp_path / "code-ran"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # a pickle that would run a command
    files[1].write_bytes(payload)
    with pytest.warns(RuntimeWarning, match=r"values-.*\.pt is unreadable .*; recomputing that batch of values"):
        again = edit(model, three_requests(), work_dir=work, value_batch_size=1)
    assert not marker.exists()                                       # weights_only: the pickle never ran
    for name in first.deltas.names():
        assert torch.equal(again.deltas.tensors[name], first.deltas.tensors[name])


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_model("gpt2", root / "model", num_layers=2, hidden_size=32, context_length=128, seed=3)
    from kedit_core import load_model

    mom2 = identity_covariance(load_model(model_dir, device="cpu")).moment(None, 1).mom2
    save_file({"mom2": mom2.contiguous()}, str(root / "c1.safetensors"))
    data = json.loads((REPO_ROOT / "tests/fixtures/data/counterfact_dev.json").read_text())[:3]
    (root / "cf.json").write_text(json.dumps(data))
    return root


def eval_argv(root, out):
    return ["eval", "--model", root / "model", "--data", root / "cf.json", "--sizes", "1,2,3", "--method", "memit",
            "--set", "layers=[1]", "--set", "v_num_grad_steps=2", "--set", "mom2_update_weight=1", "--cov",
            f"1={root / 'c1.safetensors'}", "--no-generation", "--no-progress", "--device", "cpu", "--out", out]


def test_sigkill_during_an_evaluation_sweep_then_rerun_resumes(eval_setup, tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "held"
    proc = start("evaluation", marker, *eval_argv(eval_setup, out))
    wait_for(proc, marker)
    kill_9(proc)
    # (killed right after edits_1.json was saved: the edit's value batches may still be there)
    assert sorted(p.name for p in (out / "partial").iterdir()) in (["edits_1.json", "pre.json"],
                                                                    ["edits_1.json", "pre.json", "work_1"])

    assert main([str(a) for a in eval_argv(eval_setup, out)]) == 0
    assert not list((out / "partial").glob("work_*"))        # what finished phases no longer need is gone
    log = capsys.readouterr().err
    assert "unedited model: reusing" in log and "1 edits: reusing" in log and "2 edits: computing" in log
    assert main([str(a) for a in eval_argv(eval_setup, tmp_path / "fresh")]) == 0   # never interrupted
    capsys.readouterr()

    def runs(directory):
        return [(r["num_edits"], r["aggregate"]) for r in json.loads((directory / "metrics.json").read_text())["runs"]]

    assert runs(out) == runs(tmp_path / "fresh")


def stats_source(corpus, stats_dir):
    return CachedCovariance(corpus, stats_dir, tokens=300, batch_tokens=64, chunk_tokens=100, progress=False)


def test_two_processes_computing_the_same_statistics_compute_them_once(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    stats_dir, release = tmp_path / "stats", tmp_path / "release"
    first = start("statistics", corpus, stats_dir, tmp_path / "first", 0, release)
    wait_for(first, tmp_path / "first")                  # one chunk done: the first holds the lock, and waits
    second_log = tmp_path / "second.err"
    with open(second_log, "w") as err_file:
        second = start("statistics", corpus, stats_dir, tmp_path / "second", 0, "-", stderr=err_file)
    waiting = "kedit: waiting for another process computing the statistics"
    # released only once the second says it waits at the lock (a fixed sleep raced on a loaded machine)
    deadline = time.monotonic() + 120
    while waiting not in second_log.read_text():
        assert second.poll() is None, "the second process ended without waiting:\n" + second_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the second process never reached the lock"
        time.sleep(0.05)
    release.write_text("")
    (out1, err1), (out2, _) = first.communicate(timeout=180), second.communicate(timeout=180)
    err2 = second_log.read_text()
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    one, two = json.loads(out1.splitlines()[-1]), json.loads(out2.splitlines()[-1])
    assert [r["status"] for r in one.values()] == ["computed", "computed"]
    assert [r["status"] for r in two.values()] == ["cached", "cached"]   # waited, then read the first one's files
    assert waiting in err2
    assert not (tmp_path / "second").exists()            # the second never computed a chunk


def test_sigkill_of_the_process_holding_the_lock_lets_the_other_resume_its_work(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    stats_dir = tmp_path / "stats"
    first = start("statistics", corpus, stats_dir, tmp_path / "first", 2, "-")   # held after 2 of 3 chunks
    wait_for(first, tmp_path / "first")
    while json.loads((tmp_path / "first").read_text())["next_chunk"] < 2:
        time.sleep(0.05)
    second = start("statistics", corpus, stats_dir, tmp_path / "second", 0, "-")
    wait_for(second, tmp_path / "second.ready")
    time.sleep(0.5)
    assert second.poll() is None and not (tmp_path / "second").exists()      # waiting on the lock
    kill_9(first)                                                              # the OS releases its lock
    out2, err2 = second.communicate(timeout=180)
    assert second.returncode == 0, err2[-2000:]
    report = json.loads(out2.splitlines()[-1])
    assert report["0"]["status"] == "computed" and report["0"]["resumed_from"]["next_chunk"] == 2
    model = tiny_for_resume()
    fresh = stats_source(corpus, tmp_path / "fresh")
    fresh.prepare(model, [0, 1])
    for layer in (0, 1):
        got = read_cache_file(stats_source(corpus, stats_dir).path_for(model, layer))
        want = read_cache_file(fresh.path_for(model, layer))
        assert got[1] == want[1] == 300
        assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-9)


# -- disk full -----------------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_disk_full_while_writing_statistics_keeps_the_good_file_and_leaves_no_partial_one(tiny, tmp_path,
                                                                                         monkeypatch):
    good = stats_source(CORPUS, tmp_path / "stats")
    good.prepare(tiny, [1])
    path = good.path_for(tiny, 1)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr("kedit_core.atomic.os.fsync", no_space)      # every kedit write ends with an fsync
        again = CachedCovariance(CORPUS, tmp_path / "stats", tokens=500, batch_tokens=64, chunk_tokens=100,
                                 progress=False, recompute=True)
        with pytest.raises(OSError, match="No space left on device"):
            again.prepare(tiny, [1])
        fresh_dir = tmp_path / "other"
        with pytest.raises(OSError, match="No space left on device"):
            stats_source(CORPUS, fresh_dir).prepare(tiny, [1])
    assert path.read_bytes() == before and not leftovers(tmp_path)
    assert not [p for p in fresh_dir.rglob("*.safetensors")]   # nothing half-written for a later run to trust
    later = stats_source(CORPUS, fresh_dir)
    later.prepare(tiny, [1])
    assert later.last_report[1]["status"] == "computed"


def test_disk_full_while_saving_deltas_from_the_cli_is_one_line_with_status_1(eval_setup, tmp_path, monkeypatch,
                                                                               capsys):
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": "The sport played by {}", "subject": "LeBron James",
                                                  "target_new": "football"}]))
    out = tmp_path / "edit.safetensors"
    out.write_bytes(b"the previous file")

    def half_then_full(tensors, filename, metadata=None):      # half the bytes reach the disk, then ENOSPC
        Path(filename).write_bytes(b"\0" * 100)
        no_space()

    monkeypatch.setattr("safetensors.torch.save_file", half_then_full)
    status, lines = main_lines(["edit", "--model", eval_setup / "model", "--method", "memit", "--requests",
                                tmp_path / "r.json", "--layers", "1", "--cov", f"1={eval_setup / 'c1.safetensors'}",
                                "--set", "v_num_grad_steps=2", "--no-progress", "--device", "cpu",
                                "--save-deltas", out], capsys)
    assert status == 1 and len(lines) == 1 and lines[0].startswith("kedit: error: ")
    assert lines[0].endswith("No space left on device")
    assert out.read_bytes() == b"the previous file" and not leftovers(tmp_path)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 64 KiB tmpfs (needs the right to mount, which root has on kedit's CI machines)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {result.stderr.decode().strip()}")
    yield mount
    import gc

    gc.collect()                                          # drop any mapping of a file there
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_disk_full_on_a_real_small_filesystem(small_filesystem):
    Deltas({"w.weight": torch.zeros(4)}).save(small_filesystem / "small.safetensors")
    before = (small_filesystem / "small.safetensors").read_bytes()
    with pytest.raises(OSError) as info:
        Deltas({"w.weight": torch.zeros(64, 1024)}).save(small_filesystem / "small.safetensors")   # 256 KiB
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        write_json_atomic(small_filesystem / "report.json", {"x": "y" * 200_000})
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:                     # torch.save (value batches): a RuntimeError inside
        with atomic_path(small_filesystem / "values.pt") as tmp:
            torch.save({"delta": torch.zeros(64, 1024)}, tmp)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["small.safetensors"]
    assert (small_filesystem / "small.safetensors").read_bytes() == before
    assert Deltas.load(small_filesystem / "small.safetensors").names() == ["w.weight"]
