"""Sampling maths: Euler with an oracle velocity, call counts, guidance, seeds, batches."""

import dataclasses

import pytest
import torch

from flowar.config import SamplingConfig
from flowar.flow import generate, scale_guidance, time_grid
from flowar.flow.sampler import per_image_noise
from flowar.model import FlowAR
from tests.conftest import tiny_config


class Recorder:
    """Wraps model.velocity: records batch sizes and times, optionally replaces the output."""

    def __init__(self, model, replacement=None):
        self.model = model
        self.original = model.velocity
        self.replacement = replacement
        self.calls = []

    def __call__(self, x, t, z):
        self.calls.append((x.shape[0], float(t[0])))
        if self.replacement is not None:
            return self.replacement(x, t, z)
        return self.original(x, t, z)


def oracle_targets(config, batch):
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(batch, s * s, config.channels, generator=gen) for s in config.scales]


@pytest.mark.parametrize("steps", [1, 7])
def test_oracle_velocity_lands_on_the_data(steps, monkeypatch):
    config = tiny_config()
    model = FlowAR(config)
    targets = oracle_targets(config, 3)

    def straight_path_velocity(x, t, z):
        # On x_t = (1 - t) y + t * eps the velocity eps - y equals (x - y) / t.
        side_tokens = x.shape[1]
        y = next(tg for tg in targets if tg.shape[1] == side_tokens)
        return (x - y) / t[:, None, None]

    recorder = Recorder(model, straight_path_velocity)
    monkeypatch.setattr(model, "velocity", recorder)
    out = generate(model, torch.tensor([0, 1, 2]), SamplingConfig(steps=steps), seed=0)
    for k in range(len(config.scales)):
        tokens = out[k].flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, targets[k], atol=1e-5, rtol=1e-5)
    assert len(recorder.calls) == steps * len(config.scales)


def test_guided_steps_count_once_and_cfg1_never_doubles(monkeypatch):
    config = tiny_config()
    model = FlowAR(config)
    recorder = Recorder(model)
    monkeypatch.setattr(model, "velocity", recorder)
    ar_batches = []
    original_step = model.condition_step

    def spy(cache, class_vec, previous):
        ar_batches.append(class_vec.shape[0])
        return original_step(cache, class_vec, previous)

    monkeypatch.setattr(model, "condition_step", spy)

    generate(model, torch.tensor([0, 1]), SamplingConfig(steps=5, cfg=1.0), seed=0)
    assert len(recorder.calls) == 5 * 3
    assert {b for b, _ in recorder.calls} == {2}
    assert ar_batches == [2, 2, 2]

    recorder.calls.clear()
    ar_batches.clear()
    generate(model, torch.tensor([0, 1]), SamplingConfig(steps=5, cfg=3.0), seed=0)
    assert len(recorder.calls) == 5 * 3  # a guided call is one call on a doubled batch
    # Linear ramp: scale 0 has strength 1 (no doubling), later scales are guided.
    assert [b for b, _ in recorder.calls[:5]] == [2] * 5
    assert [b for b, _ in recorder.calls[5:]] == [4] * 10
    assert ar_batches == [4, 4, 4]


def test_guidance_mixes_every_channel_and_uses_the_null_id(monkeypatch):
    config = tiny_config(channels=3)
    model = FlowAR(config)
    seen_labels = []
    original = model.class_embedding

    def spy_labels(labels):
        seen_labels.append(labels.tolist())
        return original(labels)

    monkeypatch.setattr(model, "class_embedding", spy_labels)
    cond_value, null_value = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 4.0])

    def fake_velocity(x, t, z):
        out = torch.empty_like(x)
        half = x.shape[0] // 2
        if x.shape[0] == 2 * 2:  # guided call: conditional rows first
            out[:half], out[half:] = cond_value, null_value
        else:
            out[:] = cond_value
        return out

    monkeypatch.setattr(model, "velocity", fake_velocity)
    sampling = SamplingConfig(steps=1, cfg=3.0, cfg_schedule="constant")
    noise = per_image_noise(0, [0, 1], config.scales, config.channels)
    out = generate(model, torch.tensor([0, 4]), sampling, seed=0)
    assert seen_labels == [[0, 4], [config.null_class] * 2]
    mixed = null_value + 3.0 * (cond_value - null_value)
    expected_last = noise[-1] - mixed  # one step from t = 1 to t = 0
    torch.testing.assert_close(out[-1].flatten(2).transpose(1, 2), expected_last)


def test_guidance_ramp_and_interval(monkeypatch):
    assert scale_guidance(4.0, 4) == [1.0, 2.0, 3.0, 4.0]
    assert scale_guidance(2.5, 1) == [2.5]
    assert scale_guidance(2.5, 3, "constant") == [2.5, 2.5, 2.5]

    config = tiny_config(scales=(4,))
    model = FlowAR(config)
    recorder = Recorder(model)
    monkeypatch.setattr(model, "velocity", recorder)
    sampling = SamplingConfig(steps=10, cfg=2.0, guidance_low=0.3, guidance_high=0.6)
    generate(model, torch.tensor([1]), sampling, seed=0)
    guided = [round(t, 6) for b, t in recorder.calls if b == 2]
    unguided = [round(t, 6) for b, t in recorder.calls if b == 1]
    assert guided == [0.6, 0.5, 0.4, 0.3]  # inside [0.3, 0.6]: on
    assert unguided == [1.0, 0.9, 0.8, 0.7, 0.2, 0.1]  # off before and back off after


def test_callers_config_is_not_mutated(tiny):
    sampling = SamplingConfig(steps=2, cfg=2.5)
    before = dataclasses.asdict(sampling)
    generate(FlowAR(tiny), torch.tensor([0]), sampling, seed=0)
    assert dataclasses.asdict(sampling) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampling.cfg = 1.0  # type: ignore[misc]


def test_same_seed_same_images_and_batch_independence(tiny):
    model = FlowAR(tiny)
    sampling = SamplingConfig(steps=3, cfg=2.0)
    labels = torch.tensor([0, 1, 2, 3, 4])
    full = generate(model, labels, sampling, seed=7)[-1]
    again = generate(model, labels, sampling, seed=7)[-1]
    torch.testing.assert_close(full, again, atol=0, rtol=0)
    other = generate(model, labels, sampling, seed=8)[-1]
    assert not torch.allclose(full, other)
    for start, stop in [(0, 2), (2, 5), (4, 5)]:
        part = generate(model, labels[start:stop], sampling, seed=7,
                        image_ids=range(start, stop))[-1]
        torch.testing.assert_close(part, full[start:stop], atol=1e-5, rtol=1e-5)


def test_unconditional_sampling_uses_null_class_without_doubling(tiny, monkeypatch):
    model = FlowAR(tiny)
    recorder = Recorder(model)
    monkeypatch.setattr(model, "velocity", recorder)
    out = generate(model, None, SamplingConfig(steps=2, cfg=4.0), seed=0, num_images=3)
    assert out[-1].shape == (3, tiny.channels, 4, 4)
    assert {b for b, _ in recorder.calls} == {3}


def test_sampling_restores_training_mode_and_releases_cache(tiny, monkeypatch):
    model = FlowAR(tiny).train()
    caches = []
    original = model.new_cache

    def spy():
        cache = original()
        caches.append(cache)
        return cache

    monkeypatch.setattr(model, "new_cache", spy)
    generate(model, torch.tensor([0]), SamplingConfig(steps=1), seed=0)
    assert model.training
    assert caches[0].encoder == [] and caches[0].decoder == []

    def broken(x, t, z):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "velocity", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, torch.tensor([0]), SamplingConfig(steps=1), seed=0)
    assert caches[1].encoder == [] and caches[1].decoder == []  # released despite the error
    assert model.training


def test_bad_labels_are_refused(tiny):
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\]"):
        generate(FlowAR(tiny), torch.tensor([5]), SamplingConfig(steps=1))


def test_time_grids():
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0],
                                                           dtype=torch.float64))
    released = time_grid(25, "released")
    assert len(released) == 25 and released[11] == pytest.approx(0.3)
    assert released[12] == pytest.approx(0.25) and released[-1] == 0.0
    assert len(time_grid(50, "released")) == 51


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(steps=0), "steps"),
        (dict(cfg=0.5), "cfg"),
        (dict(cfg=float("nan")), "cfg"),
        (dict(time_grid="cosine"), "time_grid"),
        (dict(guidance_low=0.8, guidance_high=0.2), "guidance interval"),
    ],
)
def test_invalid_sampling_configs(changes, words):
    from flowar.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        SamplingConfig(**changes)
