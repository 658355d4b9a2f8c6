"""Bounded-precision execution: the dispatch mode, the sweep and the smallest-p rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowar.analysis.precision import (
    PrecisionMode,
    PrecisionRow,
    precision_by_n,
    precision_sweep,
    run_at_precision,
    smallest_p,
)
from flowar.analysis.rounding import is_representable, round_significand
from flowar.analysis.targets import flowar_case_factory
from flowar.config import FlowARConfig, FlowHeadConfig


def micro_config(**changes) -> FlowARConfig:
    base = FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=3, width=8, encoder_depth=1,
        decoder_depth=1, num_heads=2, flow=FlowHeadConfig(width=8, depth=1, num_heads=2,
                                                          time_embed_dim=8),
    )
    return base.replace(**changes)


def make_block(seed: int = 0):
    """A small model-like function: linear, GELU, RMSNorm, softmax and fused attention."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(6, 16, generator=g, dtype=torch.float64) / 3
    w2 = torch.randn(16, 6, generator=g, dtype=torch.float64) / 4
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)

    def block(inp):
        h = F.gelu(inp @ w1)
        h = F.rms_norm(h, (16,))
        a = torch.softmax(h @ h.T / 4, dim=-1)
        att = F.scaled_dot_product_attention(h[None, None], h[None, None], h[None, None])[0, 0]
        return (a @ h + att) @ w2 + torch.exp(-inp)

    return block, x


def test_p52_reproduces_float64_exactly_without_expansion():
    block, x = make_block()
    out = run_at_precision(block, 52, x, promote=False, expand=False)
    assert torch.equal(out, block(x))


def test_p52_reproduces_the_float64_reference_on_flowar():
    case = flowar_case_factory(micro_config(), steps=1, dtype=torch.float64)(4)
    reference = run_at_precision(case.fn, None, *case.inputs)
    out = run_at_precision(case.fn, 52, *case.inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    assert not torch.equal(run_at_precision(case.fn, 20, *case.inputs)[-1], reference[-1])


def test_error_decreases_as_p_grows():
    block, x = make_block()
    rows = precision_sweep(block, (x,), ps=[6, 10, 14, 18, 22, 30, 40])
    errors = [r.rel_error for r in rows]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Rounding error scales like 2^-p: 8 more bits buy at least a factor 2^5.
    assert errors[0] / errors[2] > 2**5
    assert 0 < errors[-1] < 1e-9


def test_every_result_inside_the_mode_is_a_p_bit_float():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, dtype=torch.float64, generator=g)
    b = torch.randn(50, dtype=torch.float64, generator=g)
    with PrecisionMode(9):
        products = a * b
        summed = (a @ b.view(-1, 1)).squeeze()
        expo = torch.exp(a)
        c = a.clone()
        c.add_(b)  # in-place results are rounded too
    for value in (products, summed, expo, c):
        assert is_representable(value, 9)
    assert not is_representable(a * b, 9)


def test_weights_and_inputs_are_rounded_before_use():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, dtype=torch.float64, generator=g)
    x = torch.randn(8, dtype=torch.float64, generator=g)
    with PrecisionMode(7):
        out = w @ x
    by_hand = round_significand(round_significand(w, 7) @ round_significand(x, 7), 7)
    assert torch.equal(out, by_hand)
    with PrecisionMode(7, round_inputs=False):
        unrounded_inputs = w @ x
    assert torch.equal(unrounded_inputs, round_significand(w @ x, 7))


def test_promote_removes_float32_islands():
    x = torch.linspace(0.1, 3.0, 64, dtype=torch.float64)

    def fn(inp):
        return torch.exp(inp.float()).to(inp.dtype) * inp

    exact = torch.exp(x) * x
    promoted = run_at_precision(fn, 45, x)
    kept = run_at_precision(fn, 45, x, promote=False)
    assert ((promoted - exact).abs() / exact).max() < 1e-12
    assert ((kept - exact).abs() / exact).max() > 1e-9  # float32 accuracy, about 6e-8


def test_smallest_p_needs_every_larger_p_to_meet_the_target():
    def row(p, err):
        return PrecisionRow(p, p + 1, err, err, 0)

    rows = [row(8, 1e-4), row(12, 5e-3), row(16, 2e-4), row(20, 1e-5), row(52, 0.0)]
    assert smallest_p(rows, 1e-3) == 16  # p = 8 is a lucky dip, p = 12 misses
    assert smallest_p(rows, 1e-1) == 8
    assert smallest_p([row(8, 1.0), row(16, 0.5)], 1e-3) is None
    assert smallest_p(rows, 1e-4, metric="abs") == 20


@pytest.mark.slow
def test_precision_by_n_reports_each_n():
    factory = flowar_case_factory(micro_config(), steps=1, dtype=torch.float64)
    report = precision_by_n(factory, [4, 8], [10, 52], target=1e-2)
    assert list(report.rows) == [4, 8]
    for n, rows in report.rows.items():
        assert [r.p for r in rows] == [10, 52]
        assert rows[-1].rel_error == 0.0
        assert report.needed[n] in (10, 52)
    data = report.to_dict()
    assert data["points"][0]["meta"]["scales"] == [1, 2, 4]
    assert "needed p" in report.table()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PrecisionMode(0)
    with pytest.raises(ValueError):
        smallest_p([], 1e-3, metric="max")
