"""The FlowAR network: teacher-forced vs incremental equivalence, RoPE, configs, loss."""

import math

import pytest
import torch

from flowar.config import PRESETS, ConfigError, FlowARConfig, FlowHeadConfig
from flowar.model import FlowAR
from flowar.nn.rope import Rope2d
from flowar.pyramid import scale_targets
from tests.conftest import tiny_config


def incremental_conditions(model: FlowAR, full: torch.Tensor, labels: torch.Tensor):
    """z of every scale from the scale-by-scale cached pass fed the ground truth."""
    targets = scale_targets(full, model.config.scales)
    class_vec = model.class_embedding(labels)
    cache = model.new_cache()
    pieces = [model.condition_step(cache, class_vec, None)]
    for index in range(1, len(model.config.scales)):
        pieces.append(model.condition_step(cache, class_vec, targets[index - 1]))
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 3, 5), (2, 4, 6)])
@pytest.mark.parametrize("cross", [False, True])
def test_teacher_forced_equals_incremental(scales, cross):
    config = tiny_config(scales=scales, encoder_depth=2, decoder_depth=1,
                         flow=FlowHeadConfig(width=32, depth=1, num_heads=2,
                                             cross_attention=cross, time_embed_dim=32))
    model = FlowAR(config).eval()
    full = torch.randn(3, config.channels, scales[-1], scales[-1])
    labels = torch.tensor([0, 4, config.null_class])
    with torch.no_grad():
        teacher = model.condition_all(full, labels)
        incremental = incremental_conditions(model, full, labels)
    assert teacher.shape == (3, config.num_tokens, config.width)
    torch.testing.assert_close(incremental, teacher, atol=1e-5, rtol=0)


def test_later_scales_do_not_change_earlier_conditions(tiny):
    model = FlowAR(tiny).eval()
    full = torch.randn(2, tiny.channels, 4, 4)
    labels = torch.tensor([1, 2])
    edited = full.clone()
    edited[:, :, 3, 3] += 5.0  # changes the last scale's ground truth only... and coarser means
    with torch.no_grad():
        z_a = model.condition_all(full, labels)
        z_b = model.condition_all(edited, labels)
    # Scale 0 input is the class token only: its condition cannot depend on the image.
    torch.testing.assert_close(z_a[:, :1], z_b[:, :1])
    assert not torch.allclose(z_a[:, 5:], z_b[:, 5:])


def test_rope_rotates_rows_then_columns():
    rope = Rope2d(64)
    x = torch.zeros(4, 64)
    x[:, 0] = 1.0
    out = rope(x, (2,), 16)  # 2x2 grid on a 16-wide frame: rows at 0 and 8
    torch.testing.assert_close(out[0, :2], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out[2, :2], torch.tensor([math.cos(8), math.sin(8)]))
    y = torch.zeros(4, 64)
    y[:, 32] = 1.0
    out = rope(y, (2,), 16)
    torch.testing.assert_close(out[1, 32:34], torch.tensor([math.cos(8), math.sin(8)]))
    torch.testing.assert_close(out[2, 32:34], torch.tensor([1.0, 0.0]))


def test_rope_preserves_norm():
    rope = Rope2d(16)
    x = torch.randn(2, 3, 21, 16)
    out = rope(x, (1, 2, 4), 4)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(scales=(1, 4, 2)), "strictly increasing"),
        (dict(scales=(1, 2, 2)), "strictly increasing"),
        (dict(scales=()), "non-empty"),
        (dict(width=30, num_heads=4), "must divide width"),
        (dict(width=24, num_heads=4), "multiple of 4"),
        (dict(num_classes=0), "num_classes"),
        (dict(label_drop_prob=1.5), "label_drop_prob"),
    ],
)
def test_invalid_model_configs_name_the_problem(changes, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(**changes)


def test_flow_head_heads_must_divide_width():
    with pytest.raises(ConfigError, match="must divide width"):
        FlowHeadConfig(width=30, num_heads=4)


def test_presets_match_released_parameter_counts():
    counts = {}
    for name in ("flowar-s", "flowar-l"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in FlowAR(PRESETS[name]).parameters())
    assert counts == {"flowar-s": 171_718_072, "flowar-l": 586_862_912}


def test_labels_out_of_range_are_refused(tiny):
    model = FlowAR(tiny)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\]"):
        model.class_embedding(torch.tensor([6]))
    with pytest.raises(ValueError, match="labels must be in"):
        model.class_embedding(torch.tensor([-1]))


def test_loss_weights_scales_by_token_share(tiny):
    model = FlowAR(tiny).train()
    full = torch.randn(4, tiny.channels, 4, 4)
    loss = model.loss(full, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    weights = [1 / 16, 4 / 16, 1.0]
    expected = sum(w * part for w, part in zip(weights, loss.per_scale))
    torch.testing.assert_close(loss.total.detach(), expected)
    loss.total.backward()
    assert all(p.grad is not None for p in model.flownet.parameters())


def test_loss_rejects_wrong_shapes(tiny):
    model = FlowAR(tiny)
    with pytest.raises(ValueError, match="expected latents of shape"):
        model.loss(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))


def test_label_dropout_uses_null_class():
    config = tiny_config(label_drop_prob=0.5)
    model = FlowAR(config)
    dropped = model.drop_labels(torch.zeros(1000, dtype=torch.long),
                                torch.Generator().manual_seed(0))
    assert set(dropped.tolist()) == {0, config.null_class}
    assert 400 < int((dropped == config.null_class).sum()) < 600


def test_model_config_round_trips_through_json():
    import json

    from flowar.config import model_config_from_dict, to_dict

    config = PRESETS["mnist16"]
    again = model_config_from_dict(json.loads(json.dumps(to_dict(config))))
    assert again == config
    with pytest.raises(ConfigError, match="unknown or missing field"):
        model_config_from_dict({**to_dict(config), "depth_typo": 3})


def test_no_hard_coded_sizes_in_tiny_odd_config():
    config = FlowARConfig(scales=(2, 3), channels=3, num_classes=7, width=16, encoder_depth=1,
                          decoder_depth=0, num_heads=2,
                          flow=FlowHeadConfig(width=24, depth=2, num_heads=3, time_embed_dim=8))
    model = FlowAR(config)
    loss = model.loss(torch.randn(2, 3, 3, 3), torch.tensor([0, 6]))
    assert torch.isfinite(loss.total)
