"""Tests of the codec interface, the identity pixel codec and the MAR KL-16 VAE."""

import math

import pytest
import torch

from flowar.codecs import Codec, PixelCodec
from flowar.codecs.kl16 import (
    KL16VAE,
    AttnBlock,
    KL16Config,
    load_kl16,
    load_kl16_state_dict,
)
from flowar.errors import CheckpointError, ConfigError, UserError


def test_pixel_codec_round_trip_and_range():
    codec = PixelCodec(image_channels=3)
    images = torch.rand(2, 3, 8, 8)
    latents = codec.encode(images)
    assert latents.shape == images.shape
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(latents, images * 2 - 1)
    assert torch.allclose(codec.decode(latents), images, atol=1e-6)
    assert (codec.channels, codec.stride, codec.image_channels) == (3, 1, 3)
    assert isinstance(codec, Codec)


def test_pixel_codec_decode_clamps():
    codec = PixelCodec(1)
    out = codec.decode(torch.tensor([-3.0, 0.0, 5.0]).view(1, 1, 1, 3))
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]


def test_pixel_codec_rejects_wrong_channels():
    codec = PixelCodec(1)
    with pytest.raises(UserError, match="shape"):
        codec.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(UserError, match="shape"):
        codec.decode(torch.rand(2, 8, 8))
    with pytest.raises(UserError):
        PixelCodec(0)


# --------------------------------------------------------------------------------------------
# MAR KL-16 VAE

TINY = KL16Config(
    embed_dim=4, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, resolution=16,
    encoder_attn_resolutions=(4,), decoder_attn_resolutions=(), num_groups=4,
)


def _tiny_vae(seed: int = 0) -> KL16VAE:
    torch.manual_seed(seed)
    return KL16VAE(TINY).eval()


def test_released_vae_sizes_on_meta_device():
    with torch.device("meta"):
        vae = KL16VAE()
    state = vae.state_dict()
    # Spec 5.6: 312 keys, 66,456,019 parameters (encoder 28,265,760, decoder 38,188,931).
    assert len(state) == 312
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019
    assert sum(p.numel() for p in vae.encoder.parameters()) == 28_265_760
    assert sum(p.numel() for p in vae.decoder.parameters()) == 38_188_931
    assert (vae.channels, vae.stride, vae.image_channels) == (16, 16, 3)
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.4.attn.0.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.conv1.weight": (128, 256, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    shortcuts = {k.rsplit(".", 2)[0] for k in state if "nin_shortcut" in k}
    assert shortcuts == {
        "encoder.down.2.block.0", "encoder.down.4.block.0",
        "decoder.up.3.block.0", "decoder.up.1.block.0",
    }
    per_level = {}
    for k in state:
        parts = k.split(".")
        if parts[1] in ("down", "up"):
            per_level[".".join(parts[:3])] = per_level.get(".".join(parts[:3]), 0) + 1
    assert [per_level[f"encoder.down.{i}"] for i in range(5)] == [18, 18, 20, 18, 38]
    assert [per_level[f"decoder.up.{i}"] for i in range(5)] == [24, 28, 26, 28, 26]
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in state)


def test_tiny_vae_shapes_and_range():
    vae = _tiny_vae()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = vae.encode(images)
        out = vae.decode(z)
    assert z.shape == (2, 4, 4, 4)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert vae.latent_side(16) == 4
    with pytest.raises(UserError, match="multiple"):
        vae.encode(torch.rand(1, 3, 10, 10))


def test_latent_scale_and_posterior_sampling():
    vae = _tiny_vae()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        mean, logvar = vae.moments(images)
        z_mean = vae.encode(images)
        g1 = torch.Generator().manual_seed(7)
        g2 = torch.Generator().manual_seed(7)
        s1 = vae.encode(images, sample=True, generator=g1)
        s2 = vae.encode(images, sample=True, generator=g2)
        # decode divides by the scale: decode(z) equals the decoder run on the unscaled mean
        direct = ((vae.decoder(vae.post_quant_conv(mean)) + 1) / 2).clamp(0, 1)
        decoded = vae.decode(z_mean)
    assert torch.allclose(z_mean, mean * 0.2325)
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, z_mean)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(s1, (mean + torch.exp(0.5 * logvar) * noise) * 0.2325, atol=1e-6)
    assert torch.allclose(decoded, direct, atol=1e-6)


def test_attention_block_matches_softmax_formula():
    torch.manual_seed(0)
    block = AttnBlock(8, groups=4)
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        h = block.norm(x).flatten(2)[0]  # (C, N)
        q = block.q.weight[:, :, 0, 0] @ h + block.q.bias[:, None]
        k = block.k.weight[:, :, 0, 0] @ h + block.k.bias[:, None]
        v = block.v.weight[:, :, 0, 0] @ h + block.v.bias[:, None]
        attn = torch.softmax(q.T @ k / math.sqrt(8), dim=-1)  # (N, N)
        out = (v @ attn.T).reshape(1, 8, 3, 3)
        expected = x + block.proj_out(out)
        assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["ckpt", "pth", "safetensors"])
def test_tiny_vae_save_load_round_trip(tmp_path, fmt):
    vae = _tiny_vae(seed=1)
    path = tmp_path / f"vae.{fmt}"
    if fmt == "ckpt":
        torch.save({"model": vae.state_dict(), "epoch": 3}, path)  # MAR's kl16.ckpt layout
    elif fmt == "pth":
        torch.save({f"module.{k}": v for k, v in vae.state_dict().items()}, path)
    else:
        from safetensors.torch import save_file

        save_file(vae.state_dict(), str(path))
    loaded = load_kl16(path, TINY)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), vae.encode(images))
        z = torch.randn(2, 4, 4, 4)
        assert torch.equal(loaded.decode(z), vae.decode(z))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_vae_load_names_mismatch_and_ignores_loss_keys():
    vae = _tiny_vae()
    state = dict(vae.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(1)
    load_kl16_state_dict(_tiny_vae(seed=3), state)  # loss.* keys are ignored
    del state["decoder.conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias.*extra\.weight"):
        load_kl16_state_dict(_tiny_vae(), state)
    with torch.device("meta"):
        big = KL16VAE()
    with pytest.raises(CheckpointError, match="another shape"):
        load_kl16_state_dict(big, vae.state_dict())


def test_vae_config_validation():
    with pytest.raises(ConfigError, match="num_groups"):
        KL16Config(base_channels=8, num_groups=32)
    with pytest.raises(ConfigError, match="scale_factor"):
        KL16Config(scale_factor=0.0)
