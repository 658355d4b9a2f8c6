"""FAVOR+ attention: seeded buffers, unbiased kernel, the three call modes."""

import pytest
import torch

from flowar.attention import BlockLayout, build_backend, collect_stats
from flowar.attention.performer import PerformerAttention, orthogonal_gaussian
from flowar.config import AttentionConfig

F64 = torch.float64
LAYOUT = BlockLayout((1, 4, 16, 9))


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def qkv(b=2, h=2, n=LAYOUT.total, d=8, scale=0.3):
    return rand(b, h, n, d, scale=scale), rand(b, h, n, d, scale=scale, seed=1), rand(b, h, n, d,
                                                                                     seed=2)


def test_features_are_seeded_buffers_saved_with_the_model():
    a, b, c = PerformerAttention(8, 40, seed=3), PerformerAttention(8, 40, seed=3), \
        PerformerAttention(8, 40, seed=4)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert "projection" in a.state_dict() and a.projection.shape == (40, 8)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.projection, a.projection)


def test_rows_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0))
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)


def test_kernel_estimate_converges_to_softmax_attention():
    d = 8
    q, k, v = qkv(d=d)
    exact = torch.softmax(d**-0.5 * q @ k.transpose(-1, -2), -1) @ v
    errors = []
    for m in (16, 4096):
        out = PerformerAttention(d, m, seed=0)(q, k, v, scale=d**-0.5)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.05 and errors[1] < errors[0]


def test_block_prefix_sums_equal_the_dense_masked_form():
    d = 8
    q, k, v = qkv(d=d)
    backend = PerformerAttention(d, 32, seed=1)
    out = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    # Dense masked form of the same random-feature kernel.
    w = backend.projection.double()
    phi = lambda x: torch.exp(x * d**-0.25 @ w.T - 0.5 * (x * d**-0.25).pow(2).sum(-1, True))  # noqa: E731
    a = (phi(q) @ phi(k).transpose(-1, -2)).masked_fill(~LAYOUT.allowed(), 0)
    torch.testing.assert_close(out, (a @ v) / a.sum(-1, keepdim=True), rtol=0, atol=1e-10)


def test_incremental_state_equals_teacher_forcing_and_is_constant_size():
    d = 8
    q, k, v = qkv(d=d)
    backend = PerformerAttention(d, 32, seed=1)
    forced = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    state, outs, sizes = backend.new_state(), [], []
    offs = LAYOUT.offsets
    for s, e in zip(offs[:-1], offs[1:]):
        # growing key norms force the running stabiliser to rescale the stored sums
        grow = 1.0 + s / 10
        outs.append(backend(q[..., s:e, :], k[..., s:e, :] * grow, v[..., s:e, :],
                            scale=d**-0.5, state=state))
        sizes.append(state.nbytes())
    k_grown = torch.cat([k[..., s:e, :] * (1.0 + s / 10) for s, e in zip(offs[:-1], offs[1:])], -2)
    forced = backend(q, k_grown, v, scale=d**-0.5, layout=LAYOUT)
    torch.testing.assert_close(torch.cat(outs, -2), forced, rtol=0, atol=1e-10)
    assert len(set(sizes)) == 1


def test_later_tokens_do_not_change_earlier_blocks_and_batch_items_are_independent():
    d = 8
    q, k, v = qkv(b=3, d=d)
    backend = PerformerAttention(d, 32)
    base = backend(q, k, v, scale=d**-0.5, layout=LAYOUT)
    last = LAYOUT.offsets[-2]
    k2 = k.clone()
    k2[..., last:, :] *= 3
    moved = backend(q, k2, v, scale=d**-0.5, layout=LAYOUT)
    torch.testing.assert_close(moved[..., :last, :], base[..., :last, :], rtol=1e-12, atol=0)
    alone = backend(q[1:2], k[1:2], v[1:2], scale=d**-0.5, layout=LAYOUT)
    torch.testing.assert_close(alone, base[1:2], rtol=1e-12, atol=1e-12)


def test_ones_in_ones_out_and_bf16_finite_at_magnitude_10():
    d = 16
    backend = PerformerAttention(d, 64)
    q, k, _ = qkv(d=d)
    out = backend(q, k, torch.ones_like(q), scale=d**-0.5, layout=LAYOUT)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    big = [torch.empty(1, 2, 512, d).uniform_(-10, 10, generator=g).bfloat16() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = backend(*big, scale=d**-0.5, layout=BlockLayout((1, 511)))
    assert torch.isfinite(out).all()


def test_registry_and_stats():
    backend = build_backend(AttentionConfig(backend="performer", performer_features=24, seed=5), 8)
    assert isinstance(backend, PerformerAttention) and backend.num_features == 24
    with collect_stats() as calls:
        backend(*qkv(d=8), scale=8**-0.5)
    assert calls[0].backend == "performer" and calls[0].rank == 24 and calls[0].bound is None


def test_rejects_a_non_positive_scale():
    with pytest.raises(ValueError, match="positive logit scale"):
        PerformerAttention(8, 8)(*qkv(d=8), scale=-1.0)
