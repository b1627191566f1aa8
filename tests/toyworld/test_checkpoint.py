"""The committed toy model: loads through ``--model toy`` and knows the world's facts."""
import json

import pytest

import kedit_core
from kedit_core import toyworld
from kedit_core.models import MODEL_ALIASES


def test_alias_loads_the_committed_checkpoint_with_the_gpt2_adapter(toy):
    assert "toy" in MODEL_ALIASES and toy.source == toyworld.checkpoint_dir()
    assert toy.adapter.name == "gpt2"
    assert toy.adapter.num_layers >= 4
    assert toy.adapter.key_size == 4 * toy.adapter.hidden_size   # GELU MLP, d_ff = 4d
    assert toy.model.config.activation_function.startswith("gelu")
    assert toy.dtype == kedit_core.models.torch.float32
    assert toy.tokenizer.pad_token_id is not None and toy.tokenizer.eos_token_id is not None


def test_checkpoint_is_small_and_records_how_it_was_made(world):
    files = list(toyworld.CHECKPOINT_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10 * 1024 * 1024
    meta = toyworld.checkpoint_metadata()
    assert meta["world_sha256"] == world.sha256 == toyworld.build_world().sha256   # the default world
    assert toyworld.TrainConfig.from_dict(meta["train"]) == toyworld.TrainConfig()  # the default settings
    assert meta["command"].startswith("kedit toyworld train")
    assert meta["recall"]["worst_template"]["recall"] >= 0.98
    json.dumps(meta)


def test_recalls_every_fact_under_every_template(toy, world):
    report = toyworld.fact_recall(toy, world)
    assert report.num_prompts == sum(len(world.relation(f.relation_id).templates) for f in world.facts)
    per = {f"{rid}: {t}": round(r, 4) for rid, temps in report.per_template.items() for t, r in temps.items()}
    assert len(per) == sum(len(r.templates) for r in world.relations)
    assert min(per.values()) >= 0.98, per
    recorded = toyworld.checkpoint_metadata()["recall"]["overall"]
    assert report.overall == pytest.approx(recorded, abs=1e-3)   # the same numbers as at training time


def test_recall_fails_for_wrong_objects(toy, world):
    # The check can fail: the same prompts with another object of the relation are not recalled.
    facts = world.facts[:200]
    prompts = [world.prompt(f, 0) for f in facts]
    wrong = []
    for f in facts:
        objects = world.relation(f.relation_id).objects
        wrong.append(" " + objects[(objects.index(f.object) + 1) % len(objects)])
    assert toyworld.recall_matrix(toy.model, toy.tokenizer, prompts, wrong).float().mean() < 0.05


def test_per_fact_hits_add_up_to_the_recall_report(toy, world):
    # edit_and_measure counts recall per fact (so the unedited model's counts serve every edit); the
    # counts must be what fact_recall aggregates.
    facts = world.facts[::12]
    per_fact = toyworld.recall.fact_hits(toy, world, facts)
    report = toyworld.fact_recall(toy, world, facts)
    assert list(per_fact) == list(facts)
    assert all(n == len(world.relation(f.relation_id).templates) for f, (_, n) in per_fact.items())
    assert sum(n for _, n in per_fact.values()) == report.num_prompts
    assert sum(h for h, _ in per_fact.values()) == round(report.overall * report.num_prompts)
    assert any(h < n for h, n in per_fact.values()) or report.overall == 1.0
