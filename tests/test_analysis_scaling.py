"""Self-checks of the circuit calculator on the FlowAR model (theory brief section 2.8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowar.analysis.circuit import trace_circuit
from flowar.analysis.scaling import circuit_sweep, fit_polynomial, local_slopes
from flowar.analysis.targets import Case, config_for_n, flowar_case_factory, scales_for_n
from flowar.config import AttentionConfig, FlowARConfig, FlowHeadConfig
from flowar.errors import ConfigError


def micro_config(**changes) -> FlowARConfig:
    base = FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=3, width=8, encoder_depth=1,
        decoder_depth=1, num_heads=2, flow=FlowHeadConfig(width=8, depth=1, num_heads=2,
                                                          time_embed_dim=8),
    )
    return base.replace(**changes)


def depth_of(config: FlowARConfig, n: int = 4, steps: int = 1) -> dict[str, int]:
    case = flowar_case_factory(config, steps=steps)(n)
    count, _ = trace_circuit(case.fn, *case.inputs)
    assert not count.unclassified
    return count.depth


def assert_linear(depths: list[dict[str, int]]) -> None:
    """Equal, non-zero increments between consecutive depth vectors."""
    steps = [{k: b[k] - a[k] for k in a} for a, b in zip(depths, depths[1:])]
    assert all(s == steps[0] for s in steps), steps
    assert any(steps[0].values()) and min(steps[0].values()) >= 0


@pytest.mark.parametrize("channels", [1, 4])
def test_depth_vector_is_the_same_for_every_n(channels):
    # channels = 4 once made PyTorch pick addmm at side 1 and mm + add elsewhere.
    config = micro_config(channels=channels)
    report = circuit_sweep(flowar_case_factory(config, steps=1), [4, 8, 16])
    depths = [p.count.depth for p in report.points]
    assert depths[0] == depths[1] == depths[2]
    assert report.conditions["constant_depth"] and report.tc0
    assert report.points[0].count.total_size < report.points[-1].count.total_size


def test_depth_is_linear_in_encoder_layers():
    assert_linear([depth_of(micro_config(encoder_depth=k)) for k in (1, 2, 3)])


def test_depth_is_linear_in_decoder_layers():
    assert_linear([depth_of(micro_config(decoder_depth=k)) for k in (0, 1, 2)])


def test_depth_is_linear_in_flow_layers():
    flow = micro_config().flow
    assert_linear([
        depth_of(micro_config(flow=FlowHeadConfig(width=8, depth=k, num_heads=2,
                                                  time_embed_dim=flow.time_embed_dim)))
        for k in (1, 2, 3)
    ])


def test_depth_is_linear_in_steps():
    assert_linear([depth_of(micro_config(), steps=t) for t in (1, 2, 3)])


def test_depth_is_linear_in_scales():
    # Same largest side, one more scale each time.
    depths = [depth_of(micro_config(scales=s)) for s in ((2, 4), (1, 2, 4), (1, 2, 3, 4))]
    assert_linear(depths)


@pytest.mark.slow
def test_size_exponent_tends_to_4_for_exact_attention():
    report = circuit_sweep(flowar_case_factory(micro_config(), steps=1), [8, 16, 32])
    assert report.slopes[0] < report.slopes[1] < 4.0 + 1e-6
    assert report.slopes[1] > 3.6
    assert report.fit.degree == 4
    assert report.type_slopes["exp"] > 3.9  # softmax exponentials: sum_i N_i P_i ~ n^4


def test_size_exponent_is_2_for_poly_attention_at_fixed_rank():
    attention = AttentionConfig(backend="poly", degree=2)
    report = circuit_sweep(
        flowar_case_factory(micro_config(), steps=1, attention=attention), [4, 8, 16]
    )
    assert abs(report.slopes[-1] - 2.0) < 0.05
    assert report.fit.degree == 2 and report.fit.status == "verified"


def test_attention_functions_alone_have_exponents_4_and_2():
    """Independent of the model: quadratic attention over n^2 tokens vs linear attention."""
    d, g = 8, torch.Generator().manual_seed(0)
    w = torch.randn(d, d, generator=g)

    def softmax_attention(x):
        q = (x @ w)[None, None]
        return F.scaled_dot_product_attention(q, q, q)[0, 0]

    def linear_attention(x):
        q = torch.exp(x @ w)  # positive features of rank d
        state = q.T @ x  # (d, d): one pass over the tokens
        return (q @ state) / (q @ q.sum(0, keepdim=True).T)

    ns = [4, 8, 16]
    for fn, exponent in ((softmax_attention, 4), (linear_attention, 2)):
        sizes = [trace_circuit(fn, torch.randn(n * n, d, generator=g))[0].total_size
                 for n in ns]
        fit = fit_polynomial(ns, sizes, even=True)
        assert fit.degree == exponent, (fn.__name__, fit)


def test_report_changes_when_a_block_is_added():
    small = circuit_sweep(flowar_case_factory(micro_config(), steps=1), [4, 8])
    larger = circuit_sweep(flowar_case_factory(micro_config(encoder_depth=2), steps=1), [4, 8])
    for a, b in zip(small.points, larger.points):
        assert all(b.count.depth[k] >= a.count.depth[k] for k in a.count.depth)
        assert b.count.depth != a.count.depth
        assert b.count.total_size > a.count.total_size
    assert small.table() != larger.table()


def test_growing_number_of_scales_is_flagged():
    report = circuit_sweep(flowar_case_factory(micro_config(), steps=1, rule="double"), [4, 8])
    codes = {f.code for f in report.flags}
    assert {"scales-grow", "depth-grows"} <= codes
    assert not report.tc0
    assert "NOT" in report.table()


def test_steps_width_and_precision_conditions_are_flagged():
    base = flowar_case_factory(micro_config(), steps=1)

    def growing(n: int) -> Case:
        case = base(n)
        case.steps = n  # pretend T grows with n
        case.widths = {**case.widths, "width": n * n}
        return case

    report = circuit_sweep(growing, [4, 8], precision_rule="exp")
    codes = {f.code for f in report.flags}
    assert {"steps-grow", "width-grows", "precision"} <= codes
    assert not report.conditions["constant_flow_steps"]
    assert not report.conditions["widths_at_most_linear"]
    assert not report.conditions["polynomial_precision"]


def test_fit_recovers_a_known_polynomial():
    ns = [4, 8, 16, 32]
    sizes = [3 * n**4 + 5 * n**2 + 7 for n in ns]
    fit = fit_polynomial(ns, sizes, even=True)
    assert fit.degree == 4 and fit.status == "verified"
    assert math.isclose(fit.leading, 3.0, rel_tol=1e-6)
    fit = fit_polynomial(ns, [2 * n**3 + n for n in ns])
    assert fit.degree == 3 and math.isclose(fit.leading, 2.0, rel_tol=1e-6)
    assert local_slopes([1, 2], [1, 16]) == [4.0]


def test_scale_rules():
    assert scales_for_n((1, 2, 4), 16, "rescale") == (4, 8, 16)
    assert scales_for_n((1, 2, 4), 16, "double") == (1, 2, 4, 8, 16)
    assert scales_for_n((1, 2, 4, 8, 16), 32, "rescale") == (2, 4, 8, 16, 32)
    assert config_for_n(micro_config(), 8).scales == (2, 4, 8)
    with pytest.raises(ConfigError, match="whole number"):
        scales_for_n((1, 2, 4, 8, 16), 8, "rescale")
    with pytest.raises(ConfigError, match="power of two"):
        scales_for_n((1, 2, 4), 12, "double")
    with pytest.raises(ConfigError):
        scales_for_n((1, 2, 4), 8, "triple")


def test_attention_terms_match_the_kv_cached_token_counts():
    """Softmax row maxima cover exactly heads * (m * sum N_i P_i + T * m_f * sum N_i^2) scores:
    the AR queries of scale i see the P_i cached keys, the flow head attends within a scale."""
    config = micro_config(encoder_depth=1, decoder_depth=2)
    steps = 2
    case = flowar_case_factory(config, steps=steps)(4)
    count, _ = trace_circuit(case.fn, *case.inputs)
    tokens = [s * s for s in config.scales]
    prefix = [sum(tokens[: i + 1]) for i in range(len(tokens))]
    ar = (config.encoder_depth + config.decoder_depth) * sum(n * p for n, p in zip(tokens, prefix))
    flow = steps * config.flow.depth * sum(n * n for n in tokens)
    scores = config.num_heads * ar + config.flow.num_heads * flow
    # Each score enters two max-type reductions: the softmax row max and the masked-row check.
    assert count.size["max_terms"] == 2 * scores
