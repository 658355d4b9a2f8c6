"""``auto`` attention: cost model, error budget, fallback to exact, incremental state."""

import torch
import torch.nn.functional as F

from flowar.attention import BlockLayout, build_backend, collect_stats
from flowar.attention.auto import AutoAttention, exact_flops, poly_flops
from flowar.attention.exact import ExactAttention
from flowar.attention.poly import PolyAttention
from flowar.config import AttentionConfig

F64 = torch.float64


def unit_qkv(n, b=1, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v


def auto(d=4, degree="auto", target=1e-3):
    return AutoAttention(d, PolyAttention(d, degree=degree, target_error=target))


def test_cost_model():
    assert exact_flops(10, 20, 4) == 4 * 10 * 20 * 4
    assert poly_flops(10, 20, 4, 15) == 2 * 30 * 15 * 6
    # poly wins only when the key count is large compared with the rank
    assert poly_flops(100, 100, 16, 153) > exact_flops(100, 100, 16)
    assert poly_flops(8192, 8192, 16, 153) < exact_flops(8192, 8192, 16)


def test_picks_poly_on_long_certified_calls_and_exact_on_short_ones():
    d, scale = 4, 0.5  # unit q, k: beta = 0.5
    backend = auto(d)
    for n, expected in ((8, "exact"), (2048, "poly")):
        q, k, v = unit_qkv(n, d=d)
        with collect_stats() as calls:
            out = backend(q, k, v, scale=scale)
        assert calls[0].backend == expected and "flops" in calls[0].note
        exact = ExactAttention(d)(q, k, v, scale=scale)
        if expected == "poly":
            assert calls[0].bound <= 1e-3 * v.abs().max()
            assert (out - exact).abs().max() <= calls[0].bound
        else:
            torch.testing.assert_close(out, exact)


def test_falls_back_to_exact_and_says_why_when_poly_cannot_certify():
    d = 4
    q, k, v = unit_qkv(2048, d=d)
    with collect_stats() as calls:
        out = auto(d)(q * 20, k * 20, v, scale=0.5)  # beta = 200
    assert calls[0].backend == "exact" and "cannot certify" in calls[0].note
    assert "beta" in calls[0].note and calls[0].beta > 100
    torch.testing.assert_close(out, ExactAttention(d)(q * 20, k * 20, v, scale=0.5))
    # a fixed degree that misses the target also falls back
    with collect_stats() as calls:
        auto(d, degree=2, target=1e-6)(q, k, v, scale=0.5)
    assert calls[0].backend == "exact" and "above target" in calls[0].note


def test_incremental_state_keeps_both_and_matches_teacher_forcing():
    d, scale = 4, 0.5
    layout = BlockLayout((1, 4, 16, 1024))
    q, k, v = unit_qkv(layout.total, d=d)
    backend = auto(d)
    with collect_stats() as forced_calls:
        forced = backend(q, k, v, scale=scale, layout=layout)
    state, outs = backend.new_state(), []
    offs = layout.offsets
    with collect_stats() as calls:
        for s, e in zip(offs[:-1], offs[1:]):
            outs.append(backend(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], scale=scale,
                                state=state))
    chosen = [c.backend for c in calls]
    assert chosen[0] == "exact" and chosen[-1] == "poly"  # short blocks exact, the long one poly
    assert state.exact.keys.shape[-2] == layout.total and state.poly.keys == layout.total
    # Blocks that ran exact match the exact teacher-forced pass; the poly block is within bound.
    stepped = torch.cat(outs, -2)
    exact = ExactAttention(d)(q, k, v, scale=scale, layout=layout)
    last = offs[-2]
    torch.testing.assert_close(stepped[..., :last, :], exact[..., :last, :])
    assert (stepped - exact).abs().max() <= max(c.bound or 0 for c in calls) + 1e-12
    assert forced_calls[0].backend == "poly"
    assert (forced - exact).abs().max() <= forced_calls[0].bound


def test_registry_builds_auto():
    backend = build_backend(AttentionConfig(backend="auto", degree=2), 16)
    assert isinstance(backend, AutoAttention) and backend.poly.degree == 2
