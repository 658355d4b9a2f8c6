"""Polynomial-method attention: feature maps, certified bounds, the three call modes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowar.attention import BlockLayout, bounds, build_backend, collect_stats
from flowar.attention.poly import PolyAttention, monomial_plan, poly_features
from flowar.config import AttentionConfig
from flowar.errors import UserError

F64 = torch.float64
LAYOUT = BlockLayout((1, 4, 16, 9))  # FlowAR-like scale blocks


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def qkv(b=2, h=3, n=LAYOUT.total, d=8, scale=0.3, seed=0):
    return (rand(b, h, n, d, scale=scale, seed=seed), rand(b, h, n, d, scale=scale, seed=seed + 1),
            rand(b, h, n, d, seed=seed + 2))


def softmax_attention(q, k, v, scale, mask=None):
    logits = scale * q @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    return torch.softmax(logits, dim=-1) @ v


def incremental(backend, q, k, v, scale, layout):
    state = backend.new_state()
    offs = layout.offsets
    outs = [backend(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], scale=scale, state=state)
            for s, e in zip(offs[:-1], offs[1:])]
    return torch.cat(outs, dim=-2), state


# -- feature maps ------------------------------------------------------------------------------


@pytest.mark.parametrize("d, g", [(1, 3), (4, 1), (4, 3), (8, 2), (6, 4)])
def test_feature_dimension_is_the_monomial_count(d, g):
    assert monomial_plan(d, g).rank == math.comb(d + g, g)
    fq, fk = poly_features(rand(2, 5, d), rand(2, 7, d), bounds.coefficients(1.0, g, "taylor"), 0.5)
    assert fq.shape == (2, 5, math.comb(d + g, g)) and fk.shape == (2, 7, math.comb(d + g, g))


@pytest.mark.parametrize("kind", bounds.KINDS)
@pytest.mark.parametrize("d, g", [(4, 3), (8, 2), (5, 5)])
def test_features_reproduce_the_polynomial_of_the_scaled_logits(kind, d, g):
    q, k, scale = rand(3, 11, d, seed=1), rand(3, 13, d, seed=2), 1 / math.sqrt(d)
    coeffs = bounds.coefficients(2.0, g, kind)
    fq, fk = poly_features(q, k, coeffs, scale)
    expected = np.polynomial.polynomial.polyval((scale * q @ k.transpose(-1, -2)).numpy(), coeffs)
    torch.testing.assert_close(fq @ fk.transpose(-1, -2), torch.from_numpy(expected),
                               rtol=1e-12, atol=1e-12)


def test_signed_coefficients_use_the_asymmetric_form():
    coeffs = np.array([1.0, -0.5, 0.25])
    q, k = rand(4, 3), rand(5, 3, seed=3)
    fq, fk = poly_features(q, k, coeffs, 1.0)
    torch.testing.assert_close(fk[:, 1:4], k)  # unweighted key monomials
    expected = np.polynomial.polynomial.polyval((q @ k.T).numpy(), coeffs)
    torch.testing.assert_close(fq @ fk.T, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


# -- the certified bound -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", bounds.KINDS)
@pytest.mark.parametrize("degree", [2, 3, 4, 6])
@pytest.mark.parametrize("size", [0.15, 0.8])
def test_random_inputs_never_exceed_the_bound(kind, degree, size):
    d = 8
    q, k, v = qkv(d=d, scale=size, seed=degree)
    backend = PolyAttention(d, degree=degree, kind=kind)
    mask = LAYOUT.allowed()
    for layout in (None, LAYOUT):
        try:
            with collect_stats() as calls:
                out = backend(q, k, v, scale=d**-0.5, layout=layout)
        except UserError:  # odd degree refused past its root: nothing to bound
            assert degree % 2 == 1 or kind == "chebyshev"
            continue
        exact = softmax_attention(q, k, v, d**-0.5, mask if layout else None)
        assert len(calls) == 1 and calls[0].backend == "poly" and calls[0].degree == degree
        assert (out - exact).abs().max().item() <= calls[0].bound


@pytest.mark.parametrize("kind", bounds.KINDS)
@pytest.mark.parametrize("degree", [2, 4, 6, 8])
@pytest.mark.parametrize("beta", [0.25, 1.0, 2.25, 4.0, 9.0])
def test_adversarial_logits_at_plus_minus_beta_never_exceed_the_bound(kind, degree, beta):
    # q = a s, keys = +-c s, so every logit is +beta or -beta; V = +1 on the + keys, -1 else.
    d, n, scale = 4, 64, 0.25
    s = torch.nn.functional.normalize(rand(d, seed=7), dim=0)
    a = c = math.sqrt(beta / scale)
    signs = torch.tensor([1.0, -1.0], dtype=F64).repeat(n // 2)
    q = (a * s).expand(1, 1, 8, d)
    k = (c * signs[:, None] * s).reshape(1, 1, n, d)
    v = signs[:, None].expand(n, d).reshape(1, 1, n, d)
    backend = PolyAttention(d, degree=degree, kind=kind)
    try:
        with collect_stats() as calls:
            out = backend(q, k, v, scale=scale)
    except UserError:
        assert bounds.relative_error(beta, degree, kind) >= 1  # refused only when uncertified
        return
    exact = softmax_attention(q, k, v, scale)
    err = (out - exact).abs().max().item()
    assert calls[0].beta >= beta * (1 - 1e-12)
    assert err <= calls[0].bound


def test_auto_degree_meets_the_target_and_refuses_with_beta_and_target():
    d = 8
    q, k, v = qkv(d=d, scale=0.3)
    backend = PolyAttention(d, degree="auto", target_error=1e-3, max_degree=8)
    with collect_stats() as calls:
        out = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    exact = softmax_attention(q, k, v, d**-0.5, LAYOUT.allowed())
    assert calls[0].bound <= 1e-3 * v.abs().max().item()
    assert (out - exact).abs().max().item() <= calls[0].bound
    with pytest.raises(UserError, match=r"0\.001 .*beta = 46"):
        backend(q * 10, k * 10, v, scale=d**-0.5)


def test_odd_degree_is_refused_only_when_the_denominator_can_go_negative():
    d = 4
    backend = PolyAttention(d, degree=1)  # P(x) = 1 + x: root at -1
    q, k, v = qkv(d=d, n=6, scale=0.2)
    backend(q, k, v, scale=1.0)  # beta < 1: certified positive
    with pytest.raises(UserError, match="not certified positive"):
        backend(q * 10, k * 10, v, scale=1.0)


# -- the three modes ---------------------------------------------------------------------------


def dense_masked(q, k, v, scale, layout, kind, degree):
    """The masked N x N form of the same approximation: each block's polynomial is fitted on
    its own half-width (its queries against the keys of blocks <= it), per batch item and head."""
    out = torch.empty_like(v)
    offs = layout.offsets
    for b_ in range(q.shape[0]):
        for h in range(q.shape[1]):
            for s, e in zip(offs[:-1], offs[1:]):
                qb, kb, vb = q[b_, h, s:e], k[b_, h, :e], v[b_, h, :e]
                beta = scale * qb.norm(dim=-1).max() * kb.norm(dim=-1).max()
                coeffs = bounds.coefficients(float(beta), degree, kind)
                w = np.polynomial.polynomial.polyval((scale * qb @ kb.T).numpy(), coeffs)
                w = torch.from_numpy(w)
                out[b_, h, s:e] = (w @ vb) / w.sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize("kind", bounds.KINDS)
def test_block_prefix_sums_equal_the_dense_masked_form(kind):
    d = 8
    q, k, v = qkv(d=d, scale=0.4)
    out = PolyAttention(d, degree=3, kind=kind)(q, k, v, scale=d**-0.5, layout=LAYOUT)
    torch.testing.assert_close(out, dense_masked(q, k, v, d**-0.5, LAYOUT, kind, 3),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind, degree", [("taylor", 2), ("taylor", 4), ("chebyshev", 3)])
def test_incremental_constant_state_equals_teacher_forcing(kind, degree):
    d = 8
    q, k, v = qkv(d=d, scale=0.4)
    backend = PolyAttention(d, degree=degree, kind=kind)
    forced = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    stepped, state = incremental(backend, q, k, v, d**-0.5, LAYOUT)
    torch.testing.assert_close(stepped, forced, rtol=0, atol=1e-10)
    # The state is the running (rank x (d + 1)) sums plus two (B, H) maxima, whatever N.
    b, h = q.shape[:2]
    assert state.keys == LAYOUT.total
    assert state.nbytes() == b * h * (math.comb(d + degree, degree) * (d + 1) + 2) * 8


def test_incremental_with_auto_degree_on_unit_queries_and_keys():
    d = 8
    q, k, v = qkv(d=d)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # bounded-entry: beta = scale
    backend = PolyAttention(d, degree="auto", target_error=1e-4)
    forced = backend(q, k, v, scale=1.0, layout=LAYOUT)
    stepped, _ = incremental(backend, q, k, v, 1.0, LAYOUT)
    torch.testing.assert_close(stepped, forced, rtol=0, atol=1e-10)


def test_state_memory_does_not_grow_with_tokens():
    d = 8
    backend = PolyAttention(d, degree=2)
    state = backend.new_state()
    sizes = []
    for step in range(4):
        q, k, v = qkv(b=1, h=2, n=4**step, d=d, seed=step)
        backend(q, k, v, scale=d**-0.5, state=state)
        sizes.append(state.nbytes())
    assert len(set(sizes)) == 1


@pytest.mark.parametrize("kind, degree", [("taylor", 2), ("chebyshev", 4), ("taylor", "auto")])
def test_later_tokens_never_change_earlier_blocks(kind, degree):
    d = 8
    q, k, v = qkv(d=d, scale=0.3)
    backend = PolyAttention(d, degree=degree, kind=kind, target_error=1e-2)
    base = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    last = LAYOUT.offsets[-2]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[..., last:, :] *= 1.7  # larger norms too: the last block's beta grows
    moved = backend(q2, k2, v2, scale=d**-0.5, layout=LAYOUT)
    assert torch.equal(moved[..., :last, :], base[..., :last, :])
    assert not torch.allclose(moved[..., last:, :], base[..., last:, :])


@pytest.mark.parametrize("kind, degree", [("taylor", 2), ("chebyshev", 4), ("taylor", "auto")])
def test_batch_items_are_independent(kind, degree):
    d = 8
    q, k, v = qkv(b=3, d=d, scale=0.3)
    q[2] *= 1.5  # a batch item with larger logits must not change the others' polynomial
    k[2] *= 1.5
    backend = PolyAttention(d, degree=degree, kind=kind, target_error=1e-2)
    together = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    for i in range(3):
        alone = backend(q[i:i + 1], k[i:i + 1], v[i:i + 1], scale=d**-0.5, layout=LAYOUT)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", [None, LAYOUT])
@pytest.mark.parametrize("degree", [2, 5])
def test_ones_in_ones_out(layout, degree):
    d = 8
    q, k, _ = qkv(d=d, scale=0.3)
    out = PolyAttention(d, degree=degree)(q, k, torch.ones_like(q), scale=d**-0.5, layout=layout)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)


def test_unmasked_with_different_query_and_key_counts():
    d = 8
    q, k, v = rand(2, 2, 5, d, scale=0.3), rand(2, 2, 9, d, scale=0.3, seed=4), rand(2, 2, 9, d)
    with collect_stats() as calls:
        out = PolyAttention(d, degree=4)(q, k, v, scale=d**-0.5)
    assert out.shape == (2, 2, 5, d)
    assert (out - softmax_attention(q, k, v, d**-0.5)).abs().max() <= calls[0].bound


# -- precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("layout", [None, BlockLayout((1, 63, 960))])
def test_bf16_autocast_accumulates_in_fp32_and_stays_finite(degree, layout):
    d, n = 16, 1024
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.empty(1, 2, n, d).uniform_(-10, 10, generator=g).bfloat16() for _ in range(3))
    backend = PolyAttention(d, degree=degree)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = backend(q, k, v, scale=d**-0.5, layout=layout)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Reference: the same approximation in float64 on the same bf16 inputs. Sums of 1024 terms
    # accumulated in bf16 would be off by percents; fp32 accumulation leaves only the final
    # bf16 rounding of the output (2^-8 relative).
    ref = backend(q.double(), k.double(), v.double(), scale=d**-0.5, layout=layout)
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=10 * 2**-7)


def test_registry_builds_poly_from_config():
    backend = build_backend(AttentionConfig(backend="poly", degree=3, polynomial="chebyshev"), 8)
    assert isinstance(backend, PolyAttention)
    assert (backend.degree, backend.kind) == (3, "chebyshev")
