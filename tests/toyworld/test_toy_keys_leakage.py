"""bench/toy_keys.py's leakage measure: what a MEMIT-style update writes into the edited keys and what
reaches the others (the measure behind the toy world's MEMIT recall analysis)."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("toy_keys", Path(__file__).parents[2] / "bench" / "toy_keys.py")
toy_keys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_keys)


def test_orthogonal_keys_leak_nothing_and_write_the_ridge_share():
    keys = torch.eye(40, dtype=torch.float64)          # 40 subjects, each its own direction
    r = toy_keys.update_leakage(keys, torch.eye(40, dtype=torch.float64), num_edits=10, lam=3.0)
    assert r["leaked"] == pytest.approx(0.0, abs=1e-12)
    assert r["written"] == pytest.approx(1 / (1 + 3.0), rel=1e-9)   # (λI + k kᵀ)⁻¹ k = k / (λ + 1)


def test_shared_directions_leak():
    base = torch.eye(40, dtype=torch.float64)
    keys = torch.cat([base, base])                      # every subject has a twin with the same key
    r = toy_keys.update_leakage(keys, torch.eye(40, dtype=torch.float64), num_edits=10, lam=3.0)
    assert r["leaked"] > 0.01


def test_wider_random_features_leak_less():
    small, wide = (toy_keys.random_feature_keys(32, d_ff, 900, seed=1) for d_ff in (128, 1024))
    leak = [toy_keys.update_leakage(k[:300], k.T @ k / k.shape[0], 50, 100.0)["leaked"] for k in (small, wide)]
    assert leak[1] < 0.7 * leak[0]
