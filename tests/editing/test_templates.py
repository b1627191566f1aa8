"""Context templates: seeded, inspectable, shaped as published, and accepted explicitly."""
import json

import pytest

from kedit_core.editing.templates import (MEMIT_RECIPE, fill_template, generate_context_templates,
                                          load_context_templates, resolve_context_templates, rome_recipe,
                                          validate_template_groups)
from kedit_core.editors import EditContext
from kedit_core.errors import KeditError


def test_memit_templates_are_seeded_and_shaped_as_published(gpt2):
    model, _ = gpt2
    a = generate_context_templates(model, MEMIT_RECIPE, seed=1)
    b = generate_context_templates(model, MEMIT_RECIPE, seed=1)
    c = generate_context_templates(model, MEMIT_RECIPE, seed=2)
    assert a == b and a != c
    assert a[0] == ["{}"] and len(a) == 2 and len(a[1]) == 5
    for template, seed_word in zip(a[1], MEMIT_RECIPE.seed_prompts):
        assert template.startswith(seed_word) and template.endswith(". {}") and template.count("{}") == 1
        assert len(model.tokenizer(template[:-4])["input_ids"]) <= 12  # <= 10 tokens, give or take re-tokenising


def test_rome_templates_follow_the_length_parameters(gpt2):
    model, _ = gpt2
    groups = generate_context_templates(model, rome_recipe([[3, 4], [5, 2]]), seed=0)
    assert [len(g) for g in groups] == [1, 4, 2]
    assert all(t.endswith(". {}") and "<|endoftext|>" not in t for t in groups[1] + groups[2])


def test_explicit_templates_win_and_are_validated(tmp_path, gpt2):
    model, _ = gpt2
    path = tmp_path / "t.json"
    path.write_text(json.dumps([["{}"], ["The sky. {}", "Because of this. {}"]]))
    groups = load_context_templates(path)
    resolved, record = resolve_context_templates(model, MEMIT_RECIPE, EditContext(context_templates=groups))
    assert resolved == groups and record == {"source": "given"}
    for bad, match in [([], "non-empty JSON list"), ([["no slot"]], "exactly one"), (["{}"], "group 0"),
                       ([["{} {}"]], "exactly one"), ([[]], "non-empty list")]:
        with pytest.raises(KeditError, match=match):
            validate_template_groups(bad)
    path.write_text("[[")
    with pytest.raises(KeditError, match="not valid JSON"):
        load_context_templates(path)


def test_fill_template():
    assert fill_template("The sky. {}", "{} plays") == "The sky. {} plays"
