"""bench/diag_zsre_misses.py: a zsRE report's edits split by subject sharing and value convergence, the
classes adding up to the whole batch's efficacy shortfall, and a report it cannot split refused in one line."""
import json

import pytest

from .conftest import load_bench_script

DATA = [{"subject": "USS Leedstown", "alt": "Boeing"}, {"subject": "Ada", "alt": "Zeus"},
        {"subject": "USS Leedstown", "alt": "Airbus"}, {"subject": "Rome", "alt": "Spain"},
        {"subject": "Oslo", "alt": "Peru"}]


def report(efficacy, losses, steps=None):
    def metrics(e):
        return {"metrics": {"efficacy": e, "paraphrase": e / 2, "specificity": 50.0}}
    return {"format": "zsre", "model": {"alias": "tiny", "source": "/x"},
            "edit": {"editor": "memit", "hparams": {"v_num_grad_steps": 10}},
            "runs": [{"num_edits": len(efficacy),
                      "editor_info": {"value_final_loss": losses, "value_steps": steps or [3] * len(efficacy)},
                      "records": [{"case_id": i, "pre": metrics(0.0), "post": metrics(e)}
                                  for i, e in enumerate(efficacy)]}]}


def test_the_classes_split_the_batch_and_add_up_to_its_shortfall(tmp_path):
    diag = load_bench_script("diag_zsre_misses")
    efficacy = [50.0, 100.0, 0.0, 80.0, 100.0]
    result = diag.split(report(efficacy, [0.2, 0.1, 2.0, 1.5, 0.05], steps=[9, 2, 9, 9, 1]), DATA)
    groups = result["groups"]
    assert groups["shared subject"]["records"] == 2 and groups["shared subject"]["efficacy"] == 25.0
    assert groups["unique subject, value converged"]["records"] == 2          # Ada and Oslo
    assert groups["unique subject, value not converged"]["efficacy"] == 80.0  # Rome
    assert groups["value not converged"]["records"] == 2
    assert groups["all"]["efficacy_full"] == 40.0
    assert result["records_with_a_conflicting_target"] == 2 and result["subjects_edited_more_than_once"] == 1
    assert result["values_at_the_step_limit"] == 3
    assert sum(result["efficacy_points_lost"].values()) == pytest.approx(100 - sum(efficacy) / 5)

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(report(efficacy, [0.2, 0.1, 2.0, 1.5, 0.05])))
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(DATA))
    assert diag.main(["--report", str(path), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "misses.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "misses.json").read_text())["groups"]["all"]["records"] == 5


def test_a_report_without_per_edit_value_losses_is_refused():
    diag = load_bench_script("diag_zsre_misses")
    bare = report([50.0, 100.0], [0.2, 0.1])
    bare["runs"][0]["editor_info"] = {}
    with pytest.raises(SystemExit, match="no value_final_loss per edit"):
        diag.split(bare, DATA)
    with pytest.raises(SystemExit, match=r"no run of 7 edits \(it has \[2\]\)"):
        diag.split(bare, DATA, num_edits=7)
