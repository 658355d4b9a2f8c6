"""Whole-model checks of the fast path: poly sampling of a bounded-entry FlowAR."""

import math

import pytest
import torch

from flowar.attention import bounds, collect_stats
from flowar.bench.propagation import propagate_bounds
from flowar.config import AttentionConfig, FlowARConfig, FlowHeadConfig, SamplingConfig
from flowar.flow.sampler import generate
from flowar.model.flowar import FlowAR

LOGIT_SCALE = 1.0


def bounded_model(attention: AttentionConfig) -> FlowAR:
    config = FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=10, width=32, encoder_depth=1,
        decoder_depth=1, num_heads=4, qk_norm=True, logit_scale=LOGIT_SCALE,
        flow=FlowHeadConfig(width=32, depth=1, num_heads=4, time_embed_dim=32),
        attention=attention,
    )
    torch.manual_seed(0)
    model = FlowAR(config).double().eval()
    # The release zero-initialises the output layer; give it weights so samples depend on
    # every attention call.
    torch.nn.init.normal_(model.flownet.final_layer.linear.weight, std=0.05)
    return model


def test_poly_sampling_matches_exact_within_the_propagated_bound():
    # unit queries and keys: beta = logit_scale (up to rounding); certify 1e-3 per call
    degree = bounds.choose_degree(LOGIT_SCALE * (1 + 1e-6), 1e-3, "chebyshev", 12)
    poly_cfg = AttentionConfig(backend="poly", degree=degree, polynomial="chebyshev")
    exact = bounded_model(AttentionConfig())
    poly = bounded_model(poly_cfg)
    poly.load_state_dict(exact.state_dict())
    labels = torch.tensor([3])
    sampling = SamplingConfig(steps=2)

    with collect_stats() as calls:
        fast = generate(poly, labels, sampling, seed=5)[-1]
    assert calls and all(c.backend == "poly" for c in calls)
    assert max(c.beta for c in calls) <= LOGIT_SCALE * 1.02  # bounded by construction
    assert all(bounds.output_bound(c.eps, 1.0) <= 1e-3 for c in calls)  # certified for 1e-3

    report = propagate_bounds(exact, labels, sampling, poly_cfg, seed=5)
    slow = report.outputs[-1]
    torch.testing.assert_close(slow, generate(exact, labels, sampling, seed=5)[-1])
    # every certificate holds inside the model, on the exact trajectory's inputs
    assert len(report.bounds) == len(calls)
    assert all(e <= b for e, b in zip(report.errors, report.bounds))
    err = (fast - slow).abs().max().item()
    assert 0 < err <= report.propagated * 1.5  # first order, 50 % room for higher orders
    assert report.propagated < 0.05  # and the propagated bound says something
    assert math.isfinite(report.propagated)


@pytest.mark.parametrize("backend", ["poly", "performer", "auto"])
def test_every_backend_samples_a_bounded_model(backend):
    cfg = AttentionConfig(backend=backend, degree=4, polynomial="chebyshev", target_error=1e-2)
    model = bounded_model(cfg)
    out = generate(model, torch.tensor([1]), SamplingConfig(steps=2), seed=0)
    assert torch.isfinite(out[-1]).all() and out[-1].shape == (1, 1, 4, 4)
