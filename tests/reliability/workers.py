"""Programs the process-fault tests run as real processes (``python workers.py KIND ...``) and kill with
SIGKILL at a known point: each writes a marker file at that point, then waits to be killed."""
import json
import sys
import time
from pathlib import Path


def hold(marker: str, info) -> None:
    Path(marker).write_text(json.dumps(info))
    time.sleep(600)


def values(work_dir: str, marker: str) -> None:
    """MEMIT whose value optimisation is killed after two of its three batches are on disk."""
    import kedit_core.editing.values as vals

    from tests.reliability.conftest import edit, three_requests, tiny_for_resume

    real_save = vals.ValueStore.save

    def save(self, key, result, seconds=0.0):
        real_save(self, key, result, seconds)
        if self.saved == 2:
            hold(marker, {"saved": self.saved})

    vals.ValueStore.save = save
    edit(tiny_for_resume(), three_requests(), work_dir=work_dir, value_batch_size=1)
    print("finished without being killed")


def evaluation(marker: str, *argv: str) -> None:
    """``kedit eval`` killed once the phase of the first edit count is saved."""
    import kedit_core.evaluation.harness as harness
    from kedit_core.cli.main import main

    real_save = harness._save_phase

    def save(path, key, result):
        real_save(path, key, result)
        if path is not None and path.name == "edits_1.json":
            hold(marker, {"saved": str(path)})

    harness._save_phase = save
    sys.exit(main(list(argv)))


def statistics(corpus: str, stats_dir: str, marker: str, hold_after: str, release: str) -> None:
    """Statistics of layers 0 and 1 of the resume model (300 tokens, chunks of 100, a checkpoint after each).
    Writes ``marker`` + ".ready" before it starts; after each chunk writes ``marker`` and, while a file
    ``release`` is named and absent, waits for it (so another process can arrive meanwhile); with
    ``hold_after`` > 0 it is held for a SIGKILL once that many chunks are on disk. Prints the report."""
    from kedit_core.stats import CachedCovariance

    from tests.reliability.conftest import tiny_for_resume

    def on_checkpoint(info):
        Path(marker).write_text(json.dumps(info))
        if int(hold_after) and info["next_chunk"] >= int(hold_after):
            hold(marker, info)
        while release != "-" and not Path(release).exists():
            time.sleep(0.05)

    source = CachedCovariance(corpus, stats_dir, tokens=300, batch_tokens=64, chunk_tokens=100, checkpoint_every=0,
                              progress=True, on_checkpoint=on_checkpoint)
    model = tiny_for_resume()
    Path(marker + ".ready").write_text("")
    source.prepare(model, [0, 1])
    print(json.dumps({layer: {k: v for k, v in r.items() if k != "tokens_per_second"}
                      for layer, r in source.last_report.items()}))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    {"values": values, "evaluation": evaluation, "statistics": statistics}[sys.argv[1]](*sys.argv[2:])
