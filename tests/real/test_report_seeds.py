"""The seed papers' report (``bench/report_seeds.py --quick``) on SmolLM2-135M: every table is complete,
the files are written, a rerun reuses every finished run, and unconstrained fine-tuning of every block
keeps fewer of the unmodified facts than FT-L (Zhu et al.'s finding, a property of the methods: the ℓ∞
ball bounds how far FT-L can move any weight)."""
import json

import pytest

from ..conftest import load_bench_script
from .conftest import zoo_model_or_skip

# The shipped SmolLM2 defaults with 10 value-optimisation steps for the locate-then-edit editors: the test
# checks the report's pipeline and FT vs FT-L, not how well those editors reach their targets.
SMOLLM2_SETTINGS = [arg for editor in ("memit", "emmet", "alphaedit", "rome")
                    for arg in ("--set", f"{editor}.v_num_grad_steps=10")]


def _complete(metrics: dict, keys) -> bool:
    return all(isinstance(metrics.get(k), float) for k in keys)


@pytest.mark.slow
def test_quick_seeds_report_on_smollm2(tmp_path):
    zoo_model_or_skip("smollm2-135m")
    report = load_bench_script("report_seeds")
    out = tmp_path / "seeds"
    doc = report.main(["--quick", "--out", str(out), *SMOLLM2_SETTINGS])
    results = doc["results"]
    assert set(results) == {"zhu", "memit", "flearning"}

    # 1. Zhu et al.: every size has the unedited model, FT, FT-Mix, the δ sweep and FT-L (and FT) per layer.
    zhu = results["zhu"]
    for size in zhu["sizes"]:
        rows = [r for r in zhu["rows"] if r["tags"]["size"] == size]
        ids = {(r["run_id"], r["tags"].get("group"), r["tags"].get("layer")) for r in rows}
        assert ("unedited", None, None) in ids and ("zhu-ft", "methods", None) in ids
        assert ("zhu-ft-mix", "methods", None) in ids
        for layer in zhu["layers"]:
            assert ("zhu-ft-l", "layers", layer) in ids
            if size in zhu["ft_layer_sizes"]:
                assert ("zhu-ft", "layers", layer) in ids
        for row in rows:
            assert _complete(row["metrics"], ("A_M", "A_F_minus_S", "A_bar")), row["label"]
    sweep = [r for r in zhu["rows"] if r["tags"].get("group") == "delta_sweep"]
    assert len(sweep) == len(zhu["deltas"])

    small = zhu["sizes"][0]
    ft = next(r for r in zhu["rows"] if r["run_id"] == "zhu-ft" and r["tags"] == {"size": small, "group": "methods"})
    ftl = next(r for r in zhu["rows"] if r["run_id"] == "zhu-ft-l" and r["tags"].get("group") == "layers"
               and r["tags"]["size"] == small and r["tags"]["layer"] == zhu["delta_choice"]["layer"])
    assert ftl["max_abs_change"] <= zhu["delta_choice"]["delta"]
    assert ft["metrics"]["A_F_minus_S"] < ftl["metrics"]["A_F_minus_S"], (ft["metrics"], ftl["metrics"])

    # 2. MEMIT's comparison: every method at every size (ROME up to its cap), the headline metrics measured.
    memit = results["memit"]
    methods = {r["label"] for r in memit["rows"] if r["run_id"] != "unedited"}
    assert {"FT-W", "FT-L", "ROME", "MEMIT", "EMMET"} <= methods
    skipped = {(s["label"], s["dataset"], s["edits"]) for s in memit["skipped"]}
    for dataset, keys in (("counterfact", ("ES", "PS", "NS", "Score")), ("zsre", ("efficacy", "paraphrase", "specificity"))):
        sizes = memit["datasets"][dataset]["sizes"]
        for label in methods | {"unedited"}:
            for n in sizes:
                row = [r for r in memit["rows"] if r["label"] == label and r["tags"] == {"dataset": dataset, "edits": n}]
                if (label, dataset, n) in skipped:
                    assert not row
                    continue
                assert len(row) == 1, (label, dataset, n)
                assert _complete(row[0]["metrics"], keys), (label, dataset, n, row[0]["metrics"])
                if dataset == "counterfact" and n == sizes[-1]:
                    assert isinstance(row[0]["metrics"]["GE"], float)

    # 3. F-Learning: the stage-0 model and every method on both datasets, with seconds.
    fl = results["flearning"]
    assert set(fl["stage0"]) == {"counterfact", "zsre"}
    for dataset in ("counterfact", "zsre"):
        rows = [r for r in fl["rows"] if r["tags"]["dataset"] == dataset]
        labels = [r["label"] for r in rows]
        for label in ("full FT", "LoRA", "FT-c (FT-L)", "ROME", "MEMIT", "F-Learning lora forget → full learn",
                      "F-Learning full forget → full learn", "F-Learning lora forget → lora learn",
                      "F-Learning full forget → lora learn"):
            assert label in labels, (dataset, label)
        for row in rows:
            assert _complete(row["metrics"], ("reliability", "generality", "locality")), (dataset, row["label"])
            if row["run_id"] != "stage0":
                assert row["seconds"]["edit"] > 0 and row["hparams"]
        for row in rows:
            if row["run_id"].startswith("fl-") and row["editor"] == "f-learning" and row["run_id"] != "fl-lora":
                assert _complete(row["stage1"], ("A_old", "locality"))

    # 4. The files, and a findings line for each seed finding.
    for name in ("seeds_report.md", "seeds_report.json", "zhu.csv", "memit.csv", "flearning.csv", "zhu_methods.png",
                 "zhu_layers.png", "zhu_delta.png", "memit_counterfact.png", "memit_zsre.png", "flearning.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "seeds_report.md").read_text(encoding="utf-8")
    for heading in ("## 1. Zhu et al.", "## 2. MEMIT", "## 3. F-Learning", "## 4. Findings"):
        assert heading in text
    assert len(doc["findings"]) >= 8
    assert all(f["verdict"] in ("reproduces", "does not reproduce", None) for f in doc["findings"])
    assert json.loads((out / "seeds_report.json").read_text(encoding="utf-8"))["runs_from_cache"] == doc["runs_from_cache"]

    # A rerun computes nothing and gives the same numbers.
    again = report.main(["--quick", "--out", str(out), "--parts", "zhu", *SMOLLM2_SETTINGS])
    assert again["runs_computed"] == 0
    assert [r["metrics"] for r in again["results"]["zhu"]["rows"]] == [r["metrics"] for r in zhu["rows"]]
