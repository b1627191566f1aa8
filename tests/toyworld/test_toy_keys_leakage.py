"""bench/toy_keys.py's leakage measure (what a MEMIT-style update writes into the edited keys and what
reaches the others) and bench/toy_widen.py's function-preserving widening: the tools behind the toy
world's MEMIT recall analysis."""

import pytest
import torch

from ..conftest import load_bench_script

toy_keys = load_bench_script("toy_keys")


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


def test_widening_keeps_every_logit_and_adds_key_units():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=100,
                                       n_positions=32)).eval()
    wide = load_bench_script("toy_widen").widen_gpt2(model, 256, seed=3)
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        assert torch.equal(wide(ids).logits, model(ids).logits)
    assert wide.config.n_inner == 256
    fc = wide.transformer.h[0].mlp.c_fc.weight
    assert fc.shape == (32, 256) and fc[:, 64:].abs().sum() > 0      # the new units read the residual ...
    assert wide.transformer.h[0].mlp.c_proj.weight[64:].abs().sum() == 0   # ... and write nothing
