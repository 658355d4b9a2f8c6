"""Released FlowAR weights: sizes, config inference, strict round trips, wrappers, bad files."""

import dataclasses
import json
import pickle

import pytest
import torch

from flowar.attention.registry import BACKENDS
from flowar.cli.main import main as cli_main
from flowar.config import PRESETS, AttentionConfig, FlowARConfig, FlowHeadConfig, SamplingConfig
from flowar.errors import CheckpointError, ConfigError
from flowar.io.released import (
    RELEASED_PRESETS,
    block_causal_mask,
    infer_config,
    load_released,
    load_released_generator,
    load_state_into,
    match_preset,
    released_sampling_config,
    released_state_dict,
    save_released,
    scales_from_mask,
    strip_wrapper_prefixes,
    unwrap_model,
)
from flowar.model import FlowAR

# Spec section 4.1 / 5.4: released parameter counts and state-dict key counts (mask included).
RELEASED_PARAMS = {"flowar-s": 171_718_072, "flowar-l": 586_862_912, "flowar-h": 1_913_316_880}
RELEASED_KEYS = {"flowar-s": 204, "flowar-l": 484, "flowar-h": 666}
RELEASED_ROPE_BUFFERS = {"flowar-s": 14, "flowar-l": 40, "flowar-h": 54}

SMALL = FlowARConfig(
    scales=(1, 2, 4), channels=3, num_classes=7, width=32, encoder_depth=2, decoder_depth=1,
    num_heads=4,
    flow=FlowHeadConfig(width=32, depth=2, num_heads=2, cross_attention=True, time_embed_dim=16),
)


def _meta_model(name: str) -> FlowAR:
    with torch.device("meta"):
        return FlowAR(PRESETS[name])


def _outputs(model: FlowAR, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AR condition of every token and the flow head's velocity on the last scale."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, cfg.channels, cfg.size, cfg.size, generator=gen)
    labels = torch.tensor([1, cfg.num_classes])  # a class and the null class
    with torch.no_grad():
        z = model.condition_all(latents, labels)
        last = z[:, -cfg.size * cfg.size:]
        x = torch.randn(2, cfg.size * cfg.size, cfg.channels, generator=gen)
        v = model.velocity(x, torch.tensor([0.3, 0.9]), last)
    return z, v


def _small_model(seed: int = 0, config: FlowARConfig = SMALL) -> FlowAR:
    """A model with random weights everywhere (the release zero-initialises the flow head's
    output layer and every bias, which would hide swapped or missing keys)."""
    torch.manual_seed(seed)
    model = FlowAR(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 or name.startswith("flownet.final_layer.linear"):
                param.normal_(0.0, 0.1)
    return model


# ------------------------------------------------------------------------------------------------
# Sizes of the released models (meta device: no memory)


@pytest.mark.parametrize("name", RELEASED_PRESETS)
def test_preset_sizes_match_release(name):
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[name]
    state = released_state_dict(model)
    assert len(state) == RELEASED_KEYS[name]
    assert sum(k.endswith("rope.freqs") for k in state) == RELEASED_ROPE_BUFFERS[name]
    assert list(state)[3] == "mask"  # after the three position tables, as in the release
    assert tuple(state["mask"].shape) == (1, 1, 341, 341)


@pytest.mark.parametrize("name", RELEASED_PRESETS)
@pytest.mark.parametrize("drop_rope", [False, True])
def test_config_inference_recovers_preset(name, drop_rope):
    state = released_state_dict(_meta_model(name))
    state["mask"] = block_causal_mask(PRESETS[name].scales)  # real values: scales from the mask
    if drop_rope:  # then the head count comes from the preset with the same sizes
        state = {k: v for k, v in state.items() if not k.endswith("rope.freqs")}
    config = infer_config(state)
    assert config == PRESETS[name]
    assert match_preset(config) == name


def test_mask_values_and_scale_recovery():
    mask = block_causal_mask((1, 2, 4, 8, 16))[0, 0]
    allowed = torch.isfinite(mask).sum(dim=1)
    # spec 2.7: rows 0 / 1-4 / 5-20 / 21-84 / 85-340 see 1 / 5 / 21 / 85 / 341 keys
    for rows, count in (((0, 1), 1), ((1, 5), 5), ((5, 21), 21), ((21, 85), 85), ((85, 341), 341)):
        assert (allowed[rows[0]:rows[1]] == count).all()
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert scales_from_mask(block_causal_mask((1, 3, 5))) == (1, 3, 5)
    broken = block_causal_mask((1, 2, 4)).clone()
    broken[0, 0, 0, 3] = 0.0  # token 0 may now see a later scale
    with pytest.raises(CheckpointError, match="mask"):
        scales_from_mask(broken)


def test_heads_needed_when_no_rope_and_no_preset():
    state = released_state_dict(_small_model())
    state = {k: v for k, v in state.items() if not k.endswith("rope.freqs")}
    with pytest.raises(CheckpointError, match="head count"):
        infer_config(state)
    no_flow_freqs = {k: v for k, v in state.items() if k.startswith("flownet.")}
    no_flow_freqs.update(released_state_dict(_small_model()))
    no_flow_freqs = {k: v for k, v in no_flow_freqs.items()
                     if not (k.startswith("flownet.") and k.endswith("rope.freqs"))}
    with pytest.raises(CheckpointError, match="flow head's head count"):
        infer_config(no_flow_freqs)
    ar_only = {k: v for k, v in released_state_dict(_small_model()).items()
               if not (k.endswith("rope.freqs") and not k.startswith("flownet."))}
    with pytest.raises(CheckpointError, match="--heads"):
        infer_config(ar_only)
    config = infer_config(state, heads=4, base=SMALL)
    assert config == SMALL
    with pytest.raises(CheckpointError, match="contradicts"):
        infer_config(released_state_dict(_small_model()), heads=2)


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "name", ["flowar-s", "flowar-l", pytest.param("flowar-h", marks=pytest.mark.slow)]
)
def test_round_trip_released_widths(name):
    # Real widths, heads and block types of each preset, with one block per stack and three
    # scales so that it runs in seconds on a CPU.
    preset = PRESETS[name]
    config = preset.replace(scales=(1, 2, 4), encoder_depth=1, decoder_depth=0,
                            flow=dataclasses.replace(preset.flow, depth=1))
    model = _small_model(config=config)
    state = released_state_dict(model)
    assert tuple(state["mask"].shape) == (1, 1, 21, 21)
    # the RoPE grid (16 in the release) is not visible in the shapes: the preset supplies it
    loaded = load_released(state, preset=name)
    assert loaded.config == config
    assert loaded.dropped == ["mask"]
    expected = _outputs(model)
    for a, b in zip(expected, _outputs(loaded.model)):
        assert torch.equal(a, b)
    if name == "flowar-s":  # a different RoPE grid changes the outputs: the check can fail
        other = load_released(state, config=config.replace(rope_grid=None))
        assert not torch.allclose(_outputs(other.model)[1], expected[1])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_load_file_round_trip(tmp_path, suffix):
    model = _small_model(seed=1)
    path = save_released(model, tmp_path / f"model{suffix}")
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["model"]["scales"] == [1, 2, 4] and info["layout"] == "released"
    raw = torch.load(path, weights_only=True) if suffix == ".pth" else None
    if raw is not None:  # the official eval.py loads a bare state dict with the mask
        assert "mask" in raw and not any(k.startswith("module.") for k in raw)
    loaded = load_released(path)
    assert loaded.config == SMALL
    for a, b in zip(_outputs(model), _outputs(loaded.model)):
        assert torch.equal(a, b)
    # without the JSON sidecar the config is inferred from shapes and the RoPE buffers
    path.with_suffix(".json").unlink()
    if suffix == ".pth":
        assert load_released(path).config == SMALL


def test_training_checkpoint_prefers_ema_and_strips_prefixes(tmp_path):
    raw, ema = _small_model(seed=1), _small_model(seed=2)
    ckpt = {
        "model": {f"module.{k}": v for k, v in released_state_dict(raw).items()},
        "model_ema": {f"module._orig_mod.{k}": v for k, v in released_state_dict(ema).items()},
        "epoch": 3, "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(ckpt, tmp_path / "checkpoint-last.pth")
    loaded = load_released(tmp_path / "checkpoint-last.pth", config=SMALL)
    assert loaded.entry == "model_ema"
    assert torch.equal(_outputs(loaded.model)[1], _outputs(ema)[1])
    plain = load_released(tmp_path / "checkpoint-last.pth", config=SMALL, prefer_ema=False)
    assert plain.entry == "model"
    assert torch.equal(_outputs(plain.model)[1], _outputs(raw)[1])


def test_compiled_and_ddp_wrappers_both_ways():
    import torch.distributed as dist

    source = _small_model(seed=3)
    compiled = torch.compile(source)  # wraps as OptimizedModule without compiling anything yet
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    # compiled -> plain
    loaded = load_released(compiled.state_dict(), config=SMALL)
    assert torch.equal(_outputs(loaded.model)[0], _outputs(source)[0])
    # plain -> compiled target, and released layout from a compiled model has no prefixes
    target = torch.compile(_small_model(seed=4))
    load_state_into(target, released_state_dict(source))
    assert torch.equal(_outputs(unwrap_model(target))[0], _outputs(source)[0])
    assert set(released_state_dict(compiled)) == set(released_state_dict(source))

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_small_model(seed=5))
        assert all(k.startswith("module.") for k in ddp.state_dict())
        from_ddp = load_released(ddp.state_dict(), config=SMALL)  # DDP -> plain
        assert torch.equal(_outputs(from_ddp.model)[1], _outputs(ddp.module)[1])
        load_state_into(ddp, released_state_dict(source))  # plain -> DDP
        assert torch.equal(_outputs(ddp.module)[1], _outputs(source)[1])
    finally:
        dist.destroy_process_group()


def test_strip_wrapper_prefixes():
    t = torch.zeros(1)
    out = strip_wrapper_prefixes({"module._orig_mod.a.b": t, "_orig_mod.module.c": t,
                                  "flownet._orig_mod.d": t})
    assert set(out) == {"a.b", "c", "flownet.d"}
    with pytest.raises(CheckpointError, match="two entries"):
        strip_wrapper_prefixes({"module.a": t, "a": t})


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_state_dict_of_another_size_names_the_mismatch():
    other = SMALL.replace(width=48, num_heads=4)
    state = released_state_dict(_small_model(config=other))
    with pytest.raises(CheckpointError) as info:
        load_released(state, config=SMALL)
    message = str(info.value)
    assert "encoder_pos_embed_learned (1, 21, 48) vs (1, 21, 32)" in message
    assert "width 32" in message  # names the config it tried
    deeper = SMALL.replace(encoder_depth=3)
    state = released_state_dict(_small_model(config=deeper))
    with pytest.raises(CheckpointError, match=r"unexpected \(first: \['encoder_blocks\.2\."):
        load_released(state, config=SMALL)
    with pytest.raises(CheckpointError, match=r"missing keys \(first: \['encoder_blocks\.1\."):
        load_released(released_state_dict(_small_model(config=SMALL.replace(encoder_depth=1))),
                      config=SMALL)


def test_wrong_rope_buffers_are_refused():
    state = released_state_dict(_small_model())
    key = "encoder_blocks.0.attn.rope.freqs"
    state[key] = state[key] * 1.5
    with pytest.raises(CheckpointError, match="rope.freqs"):
        load_released(state, config=SMALL)


def test_malicious_checkpoint_refused_through_loader(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = released_state_dict(_small_model())
    path = tmp_path / "FlowAR-S.pth"
    torch.save({**state, "evil": Payload()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        load_released(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing"):
        load_released(path)
    assert not marker.exists()


def test_truncated_file_gives_clear_error(tmp_path):
    path = save_released(_small_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_released(path)


# ------------------------------------------------------------------------------------------------
# Recipe and CLI


def test_released_recipes():
    s = released_sampling_config("flowar-s")
    assert (s.steps, s.time_grid, s.cfg, s.guidance_high, s.cfg_schedule) == (
        25, "released", 4.3, 0.9, "linear")
    h = released_sampling_config(PRESETS["flowar-h"], cfg=2.8)
    assert (h.steps, h.cfg, h.guidance_high) == (50, 2.8, 0.7)
    with pytest.raises(ConfigError, match="recipe"):
        released_sampling_config(SMALL)


def test_convert_cli(tmp_path, capsys):
    model = _small_model(seed=6)
    src = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in released_state_dict(model).items()}}, src)
    (tmp_path / "cfg.json").write_text(json.dumps({"model": dataclasses.asdict(SMALL)}))
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(src), str(out), "--config", str(tmp_path / "cfg.json")]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    loaded = load_released(out)
    assert torch.equal(_outputs(loaded.model)[0], _outputs(model)[0])
    folder = tmp_path / "ckpt_dir"
    assert cli_main(["convert", str(out), str(folder)]) == 0
    from flowar.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(folder)
    assert ckpt.model_config == SMALL and "mask" not in ckpt.weights
    assert cli_main(["convert", str(tmp_path / "none.pth"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_load_with_any_attention_backend(backend):
    model = _small_model(seed=7)
    loaded = load_released(released_state_dict(model), config=SMALL,
                           attention=AttentionConfig(backend=backend))
    tensors = list(loaded.model.parameters()) + list(loaded.model.buffers())
    assert not any(t.is_meta for t in tensors)  # backend buffers were rebuilt
    assert loaded.model.config.attention.backend == backend
    z, _ = _outputs(loaded.model)
    assert torch.isfinite(z).all()
    if backend == "exact":
        assert torch.equal(z, _outputs(model)[0])


def test_released_generator_samples_images(tmp_path):
    from flowar.codecs.kl16 import KL16VAE, KL16Config

    vae_config = KL16Config(embed_dim=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            resolution=8, encoder_attn_resolutions=(4,), num_groups=4)
    torch.manual_seed(0)
    torch.save({"model": KL16VAE(vae_config).state_dict()}, tmp_path / "kl.ckpt")
    path = save_released(_small_model(seed=8), tmp_path / "FlowAR-T.safetensors")
    generator = load_released_generator(path, tmp_path / "kl.ckpt", vae_config=vae_config)
    sampling = SamplingConfig(steps=4, time_grid="released", cfg=2.0, guidance_high=0.9)
    images = generator.sample(torch.tensor([0, 6]), sampling, seed=1, batch_size=1)
    assert images.shape == (2, 3, 8, 8)  # 4x4 latent map, stride 2
    assert images.min() >= 0 and images.max() <= 1
    # the same request in one batch gives the same images (noise is drawn per image)
    assert torch.allclose(generator.sample(torch.tensor([0, 6]), sampling, seed=1), images,
                          atol=1e-5)
    with pytest.raises(ConfigError, match="--vae"):
        load_released_generator(path, None)
