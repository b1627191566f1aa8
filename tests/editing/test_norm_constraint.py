"""ENCORE's norm constraint on the cumulative update: the drift D = W_k - W_0 of earlier batches changes
each editor's update by exactly the closed form of its penalised objective (MEMIT: −λ_n D (C + KKᵀ)⁻¹,
AlphaEdit: −λ_n D Û S⁻¹ Ûᵀ, EMMET: a correction that keeps ΔK = R), the "batch" scope ignores the drift,
and over a session the constraint keeps the edited matrices closer to W_0."""
import pytest
import torch

import kedit_core as kedit
from kedit_core.session import EditSession
from kedit_core.testing import tiny_model

from .conftest import TEMPLATES, covariance_from_text, requests_for_tests
from .test_alphaedit import TINY
from .test_session import STREAM

LAYER = 2
WEIGHT = 0.5  # λ_n


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2", num_layers=4, hidden_size=64, dtype=torch.float64)
    cov = covariance_from_text(model, [LAYER])
    name = model.adapter.mlp_out_weight_name(LAYER)
    weight = model.adapter.mlp_out_weight(LAYER).detach()
    drift = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.02
    return model, cov, name, {name: weight - drift}, model.adapter.from_param_layout(drift)


def update(model, cov, method, base_weights=None, requests=None, **overrides):
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, base_weights=base_weights)
    result = kedit.compute_edit(model, requests or requests_for_tests(), method, context=context, layers=[LAYER],
                                norm_constraint=WEIGHT, **overrides)
    name = model.adapter.mlp_out_weight_name(LAYER)
    return model.adapter.from_param_layout(result.deltas.tensors[name]), result.keys[LAYER].double().T


def rel(a, b):
    return float((a - b).norm() / b.norm())


MEMIT = {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "mom2_update_weight": 1.0}


def test_memit_cumulative_penalty_is_the_closed_form(setup):
    model, cov, name, base, drift = setup
    plain, keys = update(model, cov, "memit", **MEMIT)
    pulled, _ = update(model, cov, "memit", base, **MEMIT)
    a = cov.moment(model, LAYER).mom2.double() + WEIGHT * torch.eye(keys.shape[0], dtype=torch.float64) + keys @ keys.T
    expected = -WEIGHT * torch.linalg.solve(a, drift.T).T            # −λ_n D A⁻¹ (A symmetric)
    assert rel(pulled - plain, expected) < 1e-8
    batch_scope, _ = update(model, cov, "memit", base, norm_constraint_scope="batch", **MEMIT)
    assert torch.equal(batch_scope, plain)


def test_alphaedit_cumulative_penalty_is_the_closed_form(setup):
    model, cov, name, base, drift = setup
    plain, keys = update(model, cov, "alphaedit", **TINY)
    pulled, _ = update(model, cov, "alphaedit", base, **TINY)
    values, vectors = torch.linalg.eigh(cov.moment(model, LAYER).mom2.double())
    u = vectors[:, values < TINY["nullspace_threshold"]]
    s = u.T @ keys @ keys.T @ u + (TINY["L2"] + WEIGHT) * torch.eye(u.shape[1], dtype=torch.float64)
    expected = -WEIGHT * drift @ u @ torch.linalg.solve(s, u.T)
    assert rel(pulled - plain, expected) < 1e-8


def test_emmet_correction_keeps_the_equality_constraint(setup):
    model, cov, name, base, drift = setup
    one = requests_for_tests()[:1]  # one request: no λ_e ridge, so ΔK = R holds exactly
    plain, keys = update(model, cov, "emmet", requests=one, **MEMIT)
    pulled, _ = update(model, cov, "emmet", base, requests=one, **MEMIT)
    correction = pulled - plain
    assert float(correction.norm()) > 1e-3 * float(plain.norm())
    assert float((correction @ keys).norm()) < 1e-9 * float(correction.norm() * keys.norm())


def test_the_constraint_keeps_a_session_closer_to_the_base_weights(tmp_path):
    model = tiny_model("gpt2", num_layers=4, hidden_size=64)
    cov = covariance_from_text(model, [1, 2])
    drift = {}
    for tag, weight in (("free", 0.0), ("constrained", 0.05)):
        session = EditSession.create(tmp_path / tag, model, context_templates=TEMPLATES)
        for i in range(3):
            session.add(STREAM[2 * i: 2 * i + 2], "alphaedit", stats=cov, progress=False, layers=[1, 2],
                        norm_constraint=weight, **TINY)
        drift[tag] = max(s["drift_norm"] for s in session.batches[-1]["norms"].values())
        session.restore_base()
    assert drift["constrained"] < 0.8 * drift["free"], drift
