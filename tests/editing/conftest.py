"""Fixtures for the editor tests: tiny random models with covariance statistics measured on real text,
requests whose subject ends the prompt (a random 4-layer model cannot route a change at a mid-prompt
token to the last position, so those would test the model, not the editor), and settings suited to
tiny models (their hidden states are ~100x smaller than a real model's, so the published weight decay
and clamp would pin δ near zero)."""
from __future__ import annotations

import pytest
import torch

from kedit_core.requests import EditRequest
from kedit_core.stats import InMemoryCovariance
from kedit_core.testing import tiny_model
from kedit_core.text import mean_target_nll, prompt_target_batch
from kedit_core.tracing import TraceDict

from ..conftest import DATA

TEMPLATES = [["{}"], ["The sky was clear. {}", "Because of this, {}"]]
TINY_SETTINGS = {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "mom2_update_weight": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every module here runs on one intra-op thread (``one_thread`` in tests/conftest.py)."""


def requests_for_tests() -> list[EditRequest]:
    return [EditRequest("The sport played by {}", "LeBron James", "football", "basketball", case_id=0),
            EditRequest("The capital city of {}", "France", "Berlin", "Paris", case_id=1),
            EditRequest("The birthplace of {}", "Albert Einstein", "Tokyo", "Ulm", case_id=2)]


@torch.no_grad()
def covariance_from_text(model, layers, tokens: int = 2048) -> InMemoryCovariance:
    """C0 of ``layers`` measured on wikitext (the normalised uncentred moment of the keys)."""
    text = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:40000]
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    x = torch.tensor(ids[: len(ids) // 32 * 32]).reshape(32, -1)
    names = {layer: model.adapter.mlp_out_name(layer) for layer in layers}
    with TraceDict(model.model, list(names.values()), retain_input=True) as td:
        model.model(input_ids=x)
    moments = {}
    for layer, name in names.items():
        k = td[name].input.reshape(-1, model.adapter.key_size).double()
        moments[layer] = (k.T @ k / k.shape[0]).float()
    return InMemoryCovariance(moments, {layer: x.numel() for layer in layers})


@torch.no_grad()
def target_nlls(model, requests) -> list[tuple[float, float]]:
    """(NLL of target_new, NLL of target_true) on each request's rewrite prompt."""
    out = []
    for r in requests:
        b = prompt_target_batch(model.tokenizer, [r.filled_prompt] * 2, [r.target_new, r.target_true])
        nll = mean_target_nll(model.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        out.append((float(nll[0]), float(nll[1])))
    return out


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_bit_identical(model, snapshot) -> None:
    now = model.model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2", num_layers=4, hidden_size=64)
    return model, covariance_from_text(model, range(4))
