"""Solves: Woodbury and direct Cholesky against float64 LU (1e-8 relative), EMMET and ROME fast vs the
published arithmetic, one batched factorisation for all layers, and the factor cache."""
import pytest
import torch

from kedit_core import ops
from kedit_core.editing.solvers import CovarianceFactors, FactorCache, emmet_solve, memit_solve, rome_left_vector
from kedit_core.errors import KeditError
from kedit_core.stats import InMemoryCovariance
from kedit_core.testing import tiny_model


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", num_layers=3, hidden_size=64)  # d_k = 256


def random_moment(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rank or 4 * d, d, generator=g) * torch.linspace(0.2, 2.0, d)
    return (k.T @ k / k.shape[0]).float()


def factors_for(model, layers, scale=15000.0, shift=0.0, rank=None):
    source = InMemoryCovariance({l: random_moment(model.adapter.key_size, l, rank) for l in layers})
    f = CovarianceFactors(model, source, list(layers), scale=scale, shift=shift, cache=FactorCache())
    f.prepare()
    return f


@pytest.mark.parametrize("n", [1, 10, 40, 200])
def test_memit_woodbury_and_direct_match_lu(model, n):
    f = factors_for(model, [0, 1])
    keys = torch.randn(256, n, dtype=torch.float64) * 3
    expected = memit_solve(f, 1, keys, "reference")
    for method in ("auto", "woodbury", "direct"):
        assert rel(memit_solve(f, 1, keys, method), expected) <= 1e-8, method


def test_emmet_fast_matches_published_inverses(model):
    f = factors_for(model, [2], scale=1000.0, shift=0.5)
    for n in (1, 12):
        keys = torch.randn(256, n, dtype=torch.float64)
        assert rel(emmet_solve(f, 2, keys, 0.1, "auto"), emmet_solve(f, 2, keys, 0.1, "reference")) <= 1e-8


def test_rome_left_vector_matches_float32_inverse(model):
    f = factors_for(model, [1], scale=1.0)
    key = torch.randn(256)
    fast, ref = rome_left_vector(f, 1, key, "auto"), rome_left_vector(f, 1, key, "reference")
    assert abs(float(fast.norm()) - 1) < 1e-6 and rel(fast, ref) <= 1e-4


def test_all_layers_are_factored_in_one_batched_call_and_cached(model, monkeypatch):
    calls = []
    real = ops.spd_factor

    def spy(a):
        calls.append(tuple(a.shape))
        return real(a)

    monkeypatch.setattr(ops, "spd_factor", spy)
    source = InMemoryCovariance({l: random_moment(256, l) for l in range(3)})
    cache = FactorCache()
    f = CovarianceFactors(model, source, [0, 1, 2], scale=20000.0, cache=cache)
    f.prepare()
    f.factor_all()
    assert calls == [(3, 256, 256)]
    assert rel(f.factor(1) @ f.factor(1).T, f.matrix(1)) <= 1e-12
    again = CovarianceFactors(model, source, [0, 1, 2], scale=20000.0, cache=cache)
    again.prepare()
    again.factor_all()
    assert calls == [(3, 256, 256)]  # served from the cache
    other_scale = CovarianceFactors(model, source, [0], scale=1.0, cache=cache)
    other_scale.prepare()
    other_scale.factor_all()
    assert calls[-1] == (1, 256, 256)


def test_factor_cache_on_disk_beside_the_statistics(model, tmp_path):
    source = InMemoryCovariance({0: random_moment(256, 0)})
    source.factor_cache_dir = tmp_path / "factors"
    f = CovarianceFactors(model, source, [0], scale=2.0)
    f.prepare()
    f.factor_all()
    files = list((tmp_path / "factors").glob("factor-*.safetensors"))
    assert len(files) == 1
    fresh = FactorCache(tmp_path / "factors")
    assert torch.equal(fresh.get(f._key(0), "cpu"), f.factor(0))


def test_singular_statistics_fall_back_or_fail_clearly(model):
    f = factors_for(model, [0], scale=1.0, rank=100)  # rank 100 < d_k = 256: C0 is singular
    assert f.factor(0) is None
    keys = torch.randn(256, 3, dtype=torch.float64)
    with pytest.raises(KeditError, match="not positive definite.*too few tokens"):
        memit_solve(f, 0, keys, "auto")
    with pytest.raises(KeditError, match="not positive definite"):
        rome_left_vector(f, 0, torch.randn(256), "auto")


def test_identity_covariance(model):
    f = CovarianceFactors(model, None, [0], scale=3.0)
    f.prepare()
    keys = torch.randn(256, 4, dtype=torch.float64)
    expected = torch.linalg.solve(3.0 * torch.eye(256, dtype=torch.float64) + keys @ keys.T, keys)
    assert rel(memit_solve(f, 0, keys, "auto"), expected) <= 1e-10
    assert torch.allclose(rome_left_vector(f, 0, keys[:, 0].float()), (keys[:, 0] / keys[:, 0].norm()).float())
