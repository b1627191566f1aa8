"""`kedit eval` end to end on the shared CounterFact and zsRE files, with an editor registered in-process
and with a saved delta file; outputs, resume, weight restoration and errors."""
import csv
import json

import matplotlib.image
import pytest
import torch

from kedit_core import EditContext, compute_edit, load_model
from kedit_core.cli.main import main
from kedit_core.evaluation import EditPlan, EvalSettings, GenerationSettings, load_cases, run_evaluation


def run_eval(*args):
    return main(["eval", "--no-progress", "--device", "cpu", *map(str, args)])


def read_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01  # not blank
    return image


def break_post_edit_evaluation(monkeypatch, message: str) -> None:
    """The evaluation's second scoring pass (the edited model's) raises ``message``; the first runs."""
    from kedit_core.evaluation import harness

    real, calls = harness.evaluate_cases, []

    def failing_after_edit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_cases", failing_after_edit)


def test_counterfact_sweep_writes_json_csv_png_and_resumes(tmp_path, gpt2_dir, nudge_editor, counterfact_path, capsys):
    out = tmp_path / "cf"
    args = ["--model", gpt2_dir, "--data", counterfact_path, "--method", nudge_editor, "--sizes", "2,4",
            "--set", "strength=40", "--seed", "7", "--gen-length", "20", "--out", out]
    assert run_eval(*args) == 0
    captured = capsys.readouterr()
    assert "ES" in captured.out and "metrics.png" in captured.out

    result = json.loads((out / "metrics.json").read_text())
    assert result["format"] == "counterfact" and result["seed"] == 7
    assert result["edit"] == {**result["edit"], "mode": "method", "editor": nudge_editor, "seed": 7,
                              "hparams": {"strength": 40.0}}
    assert result["settings"]["sizes"] == [2, 4] and result["settings"]["generation_settings"]["seed"] == 7
    assert result["data"]["sha256"] and result["model"]["fingerprint"]
    assert [r["num_edits"] for r in result["runs"]] == [2, 4]
    for run in result["runs"]:
        pre, post = run["aggregate"]["pre"], run["aggregate"]["post"]
        assert post["ES"] == 100.0 and post["ES"] > pre["ES"]  # the nudge makes the new target win
        assert pre["num_records"] == post["num_records"] == run["num_edits"] == len(run["records"])
        assert pre["GE"] > 0 and post["GE"] > 0 and pre["RS"] is None
        assert pre["Score"] is not None and set(run["records"][0]) == {"case_id", "pre", "post"}
        assert "texts" not in run["records"][0]["pre"]  # texts live in generations.json
    # the pre-edit numbers of the 2-edit run are those of the first two records of the 4-record run
    first_two = [r["pre"]["metrics"] for r in result["runs"][1]["records"][:2]]
    assert [r["pre"]["metrics"] for r in result["runs"][0]["records"]] == first_two
    assert json.loads((out / "hparams.json").read_text())["hparams"] == {"strength": 40.0}
    gens = json.loads((out / "generations.json").read_text())
    assert {(g["num_edits"], g["phase"]) for g in gens} == {(2, "pre"), (2, "post"), (4, "pre"), (4, "post")}

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["num_edits"], r["phase"]) for r in rows] == [("2", "pre"), ("2", "post"), ("4", "pre"), ("4", "post")]
    assert float(rows[3]["ES"]) == pytest.approx(result["runs"][1]["aggregate"]["post"]["ES"])
    assert len(list(csv.DictReader((out / "records.csv").open()))) == (2 + 4) * 2
    read_png(out / "metrics.png")
    read_png(out / "scaling.png")

    # the same command again reuses every finished phase and gives the same numbers
    assert run_eval(*args) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == 3
    again = json.loads((out / "metrics.json").read_text())
    assert again["runs"] == result["runs"]


def test_zsre_with_saved_deltas_and_request_check(tmp_path, gpt2_dir, nudge_editor, zsre_path, capsys):
    model = load_model(gpt2_dir, device="cpu")
    _, cases = load_cases(zsre_path, limit=3)
    result = compute_edit(model, [c.request for c in cases], nudge_editor, context=EditContext(seed=1))
    deltas = result.deltas.save(tmp_path / "edit.safetensors")

    out = tmp_path / "zsre"
    assert run_eval("--model", gpt2_dir, "--data", zsre_path, "--deltas", deltas, "--n", 3, "--out", out) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["format"] == "zsre" and doc["edit"]["mode"] == "deltas" and doc["edit"]["editor"] == nudge_editor
    (run,) = doc["runs"]
    assert run["aggregate"]["post"]["efficacy"] > run["aggregate"]["pre"]["efficacy"]
    assert set(run["aggregate"]["post"]) >= {"efficacy", "paraphrase", "specificity"}
    read_png(out / "metrics.png")
    assert not (out / "scaling.png").exists()

    capsys.readouterr()
    assert run_eval("--model", gpt2_dir, "--data", zsre_path, "--deltas", deltas, "--n", 4, "--out", out) == 2
    err = capsys.readouterr().err
    assert "other requests" in err and "--n 3" in err and "Traceback" not in err


def test_unedited_evaluation_only(tmp_path, gpt2_dir, zsre_path):
    out = tmp_path / "base"
    assert run_eval("--model", gpt2_dir, "--data", zsre_path, "--format", "zsre", "--n", 5, "--out", out) == 0
    doc = json.loads((out / "metrics.json").read_text())
    (run,) = doc["runs"]
    assert run["num_edits"] == 0 and set(run["aggregate"]) == {"pre"} and doc["edit"] == {"mode": "none"}
    assert len(run["records"]) == 5
    read_png(out / "metrics.png")


def test_rs_with_reference_texts_and_a_named_corpus(tmp_path, gpt2_dir, counterfact_path, wikitext_path):
    _, cases = load_cases(counterfact_path, limit=3)
    refs = {c.request.relation_id: {} for c in cases[:2]}
    for c in cases[:2]:  # no reference texts for the third record: its RS is left out
        refs[c.request.relation_id][c.target_new_id] = [f"{c.request.target_new.strip()} is spoken and written there."]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "rs"
    assert run_eval("--model", gpt2_dir, "--data", counterfact_path, "--n", 3, "--gen-length", 16,
                    "--reference-texts", tmp_path / "refs.json", "--tfidf-corpus", wikitext_path, "--out", out) == 0
    doc = json.loads((out / "metrics.json").read_text())
    pre = doc["runs"][0]["aggregate"]["pre"]
    assert pre["RS_n"] == 2 and 0 <= pre["RS"] <= 100
    assert doc["rs"]["tfidf_documents"] > 1000
    assert doc["runs"][0]["records"][2]["pre"]["metrics"]["RS"] is None


@pytest.mark.parametrize("args, message", [
    (["--sizes", "2,3"], "give --method"),
    (["--method", "eval-test-nudge", "--sizes", "2,9", "--n", "4"], "only 4 records"),
    (["--method", "no-such-editor"], "no editor named 'no-such-editor'"),
    (["--method", "eval-test-nudge", "--set", "strenght=2"], "unknown key 'strenght'"),
    (["--set", "strength=2"], "apply to --method"),
    (["--format", "zsre"], "record 0"),
])
def test_errors_are_one_line(args, message, tmp_path, gpt2_dir, counterfact_path, nudge_editor, capsys):
    assert run_eval("--model", gpt2_dir, "--data", counterfact_path, "--out", tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_evaluation_restores_weights_even_when_a_phase_fails(gpt2, nudge_editor, counterfact_path,
                                                                   monkeypatch):
    _, cases = load_cases(counterfact_path, limit=3)
    snapshot = {n: p.detach().clone() for n, p in gpt2.model.named_parameters()}
    settings = EvalSettings(generation=False, progress=False)
    result = run_evaluation(gpt2, cases, "counterfact", plan=EditPlan(method=nudge_editor), sizes=[1, 3],
                            settings=settings)
    assert [r["aggregate"]["post"]["ES"] for r in result["runs"]] == [100.0, 100.0]
    assert all(torch.equal(p, snapshot[n]) for n, p in gpt2.model.named_parameters())
    with pytest.raises(Exception, match="strength"):
        run_evaluation(gpt2, cases, "counterfact", plan=EditPlan(method=nudge_editor, hparams={"strength": "x"}),
                       settings=settings)
    assert all(torch.equal(p, snapshot[n]) for n, p in gpt2.model.named_parameters())
    # evaluation of the edited model fails: the edit is still reverted
    break_post_edit_evaluation(monkeypatch, "evaluation broke")
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_evaluation(gpt2, cases, "counterfact", plan=EditPlan(method=nudge_editor), settings=settings)
    assert all(torch.equal(p, snapshot[n]) for n, p in gpt2.model.named_parameters())
    with pytest.raises(Exception, match="exactly one"):
        EditPlan()
    assert GenerationSettings().max_length == 100


def test_an_evaluation_cut_short_after_the_edit_resumes_its_values(tmp_path, gpt2, counterfact_path, monkeypatch):
    """MEMIT's value batches are kept under partial/work_<n> while the edit runs: a run that dies after the
    edit (here: in the post-edit evaluation) loads them on the next try instead of optimising again, and the
    folder is gone once the phase is saved."""
    from kedit_core.stats import InMemoryCovariance

    _, cases = load_cases(counterfact_path, limit=2)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1024, gpt2.adapter.key_size, generator=g)
    stats = InMemoryCovariance({1: keys.T @ keys / keys.shape[0]})
    plan = EditPlan(method="memit", stats=stats, context_templates=[["{}"]],
                    overrides={"layers": [1], "v_num_grad_steps": 3, "mom2_update_weight": 1.0})
    settings = EvalSettings(generation=False, progress=False)
    out = tmp_path / "eval"
    break_post_edit_evaluation(monkeypatch, "killed during the post-edit evaluation")
    with pytest.raises(RuntimeError, match="killed"):
        run_evaluation(gpt2, cases, "counterfact", plan=plan, sizes=[2], settings=settings, out_dir=out)
    assert list((out / "partial" / "work_2").rglob("*")), "the finished value batches were not kept"
    result = run_evaluation(gpt2, cases, "counterfact", plan=plan, sizes=[2], settings=settings, out_dir=out)
    resumed = result["runs"][0]["editor_info"]["values_resumed"]
    assert resumed["batches_loaded"] >= 1 and resumed["batches_computed"] == 0
    assert not (out / "partial" / "work_2").exists()


def test_plans_that_differ_only_in_lambda_share_one_kept_value_store(tmp_path, gpt2, counterfact_path):
    """EditPlan.values_dir: a second plan with another MEMIT λ loads every value the first one optimised
    (values do not depend on λ) and still edits differently; the store is kept afterwards, and a plan whose
    values differ (other value steps) computes its own beside them."""
    from kedit_core.stats import InMemoryCovariance

    _, cases = load_cases(counterfact_path, limit=2)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1024, gpt2.adapter.key_size, generator=g)
    stats = InMemoryCovariance({1: keys.T @ keys / keys.shape[0]})
    store = tmp_path / "values"
    settings = EvalSettings(generation=False, progress=False)

    def run(out, **overrides):
        plan = EditPlan(method="memit", stats=stats, context_templates=[["{}"]], values_dir=store,
                        overrides={"layers": [1], "v_num_grad_steps": 3, "mom2_update_weight": 1.0, **overrides})
        result = run_evaluation(gpt2, cases, "counterfact", plan=plan, sizes=[2], settings=settings,
                                out_dir=tmp_path / out)
        return result["runs"][0]

    first = run("a")
    assert first["editor_info"]["values_resumed"]["batches_computed"] >= 1
    saved = sorted(p.name for p in store.glob("values-*.pt"))
    assert saved and not (tmp_path / "a" / "partial" / "work_2").exists()
    second = run("b", mom2_update_weight=100.0)
    assert second["editor_info"]["values_resumed"]["batches_computed"] == 0
    assert second["editor_info"]["values_resumed"]["batches_loaded"] == len(saved)
    assert second["deltas_norms"] != first["deltas_norms"]
    assert sorted(p.name for p in store.glob("values-*.pt")) == saved
    other = run("c", v_num_grad_steps=2)
    assert other["editor_info"]["values_resumed"]["batches_loaded"] == 0
    assert len(list(store.glob("values-*.pt"))) > len(saved)
