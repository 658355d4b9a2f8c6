"""The shipped bounded-entry model samples with certified polynomial attention."""

import torch

from flowar.attention import collect_stats
from flowar.pipeline import load_generator, shipped_model_dir


def test_bounded_model_samples_with_certified_poly_attention():
    path = shipped_model_dir("flowar-mnist16-bounded")
    exact = load_generator(path)
    assert exact.model.config.qk_norm  # logits bounded by construction
    poly = load_generator(path, attention={"backend": "poly"})
    assert poly.model.config.attention.polynomial == "chebyshev"  # the model's own choice kept
    labels = torch.tensor([2, 7])
    sampling = exact.default_sampling(steps=3)
    with collect_stats() as calls:
        fast = poly.sample(labels, sampling, seed=0)
    certified = [c for c in calls if c.backend == "poly"]
    assert certified and len(certified) == len(calls)
    logit_scale = exact.model.config.logit_scale
    # beta is rounded up to a 1.1% grid before certification, so it may exceed the scale a bit
    assert all(c.beta <= logit_scale * 1.02 for c in certified)
    assert all(2 * c.eps / (1 - c.eps) <= 1e-3 for c in certified)
    reference = exact.sample(labels, sampling, seed=0)
    assert (fast - reference).abs().max() < 0.05  # same images up to the propagated error
