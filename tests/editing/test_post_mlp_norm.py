"""The residual-to-MLP-output map through Gemma's post-MLP RMS norm (``BoundAdapter.mlp_output_change``)."""
import torch

from kedit_core.testing import tiny_model


def _gemma(zero_channels=()):
    model = tiny_model("gemma3", dtype=torch.float64, seed=1)
    norm = model.adapter.module(model.adapter.post_mlp_norm_name(1))
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.3)
        for c in zero_channels:
            norm.weight[c] = -1.0          # Gemma's RMSNorm scales by (1 + w): this channel's gain is 0
    return model, norm


def test_a_reachable_change_is_made_exactly():
    model, norm = _gemma()
    torch.manual_seed(0)
    m = torch.randn(3, norm.weight.numel(), dtype=torch.float64)
    wanted = norm(m + 0.2 * torch.randn_like(m))           # an output the norm can give
    change = model.adapter.mlp_output_change(1, m, wanted - norm(m))
    torch.testing.assert_close(norm(m + change), wanted, rtol=1e-6, atol=1e-8)


def test_a_channel_with_zero_gain_gives_a_finite_change():
    model, norm = _gemma(zero_channels=(0, 5))
    torch.manual_seed(0)
    m = torch.randn(3, norm.weight.numel(), dtype=torch.float64)
    residual = 0.1 * torch.randn_like(m)
    change = model.adapter.mlp_output_change(1, m, residual)
    assert torch.isfinite(change).all()
    moved = norm(m + change) - norm(m)
    assert torch.equal(moved[:, [0, 5]], torch.zeros_like(moved[:, [0, 5]]))   # nothing reaches those channels
    # elsewhere the change goes the wanted way
    keep = [c for c in range(m.shape[1]) if c not in (0, 5)]
    cos = torch.nn.functional.cosine_similarity(moved[:, keep], residual[:, keep], dim=-1)
    assert (cos > 0.9).all(), cos
