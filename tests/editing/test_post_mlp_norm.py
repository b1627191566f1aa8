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


def _wide_gains(model, norm, low=1e-3, high=1e2, seed=0):
    """Gains spread over decades, as in Gemma-3-270m (1e-3 … 800 within one layer's post-MLP norm)."""
    import math
    g = torch.Generator().manual_seed(seed)
    gains = torch.exp(torch.empty(norm.weight.numel(), dtype=torch.float64).uniform_(math.log(low), math.log(high),
                                                                                     generator=g))
    with torch.no_grad():
        norm.weight.copy_(gains - 1.0)
    return gains


def test_gains_spread_over_decades_keep_the_wanted_direction():
    # Dividing the wanted output by the gain lets the channels of tiny gain take all the rms: the realised
    # change then points nowhere near the wanted one (cos ~ 0, often negative). The nearest reachable
    # output keeps it.
    model, norm = _gemma()
    _wide_gains(model, norm)
    torch.manual_seed(0)
    m = torch.randn(4, norm.weight.numel(), dtype=torch.float64)
    for scale in (0.01, 0.05, 0.2):
        r = torch.randn_like(m)
        r = r / r.norm(dim=1, keepdim=True) * scale * norm(m).norm(dim=1, keepdim=True)
        change = model.adapter.mlp_output_change(1, m, r)
        assert torch.isfinite(change).all()
        moved = norm(m + change) - norm(m)
        cos = torch.nn.functional.cosine_similarity(moved, r, dim=-1)
        assert (cos > 0.5).all(), (scale, cos)
        share = (moved * r).sum(-1) / r.pow(2).sum(-1)
        assert (share > 0.25).all() and (share < 1.0 + 1e-9).all(), (scale, share)


def test_the_output_is_the_nearest_reachable_one():
    model, norm = _gemma()
    gains = _wide_gains(model, norm, low=1e-2, high=10.0, seed=3)
    torch.manual_seed(1)
    m = torch.randn(3, norm.weight.numel(), dtype=torch.float64)
    wanted = norm(m) + 0.3 * norm(m).norm(dim=1, keepdim=True) / m.shape[1] ** 0.5 * torch.randn_like(m)
    change = model.adapter.mlp_output_change(1, m, wanted - norm(m))
    got = (norm(m + change) - wanted).norm(dim=1)
    rms = lambda x: x.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    # the old map (the wanted output divided by the gain, rescaled) lands farther away
    direction = wanted / gains
    old = direction * (rms(m) / rms(direction))
    assert (got < (norm(old) - wanted).norm(dim=1)).all()
    # and no nearby point of the norm's outputs is nearer
    star = m + change
    for k in range(20):
        other = star + 0.01 * rms(star) * torch.randn_like(star)
        assert ((norm(other) - wanted).norm(dim=1) >= got - 1e-9).all(), k
