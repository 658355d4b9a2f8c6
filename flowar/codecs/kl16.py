"""The MAR KL-16 VAE (a KL-regularised convolutional autoencoder) as a latent codec.

FlowAR uses the frozen VAE released with MAR (``kl16.ckpt``): a 256x256 RGB image becomes a
16-channel latent on a 16x16 grid, multiplied by 0.2325 so that its std is about 1. Module and
parameter names follow the released state dict (312 keys, 66,456,019 parameters), so the file
loads with a plain strict ``load_state_dict``; see spec section 5.6 for the layout.

Shape of the default model: encoder 3 -> 128 channels, five levels with channel multipliers
(1, 1, 2, 2, 4), two residual blocks per level, self-attention at the 16x16 level and in the
middle, 2x2 downsampling between levels; ``quant_conv`` gives 16 means + 16 log-variances. The
decoder mirrors it with three residual blocks per level, nearest-neighbour upsampling and no
attention outside the middle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowar.codecs.base import Codec
from flowar.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# Log-variance clamp of the diagonal Gaussian posterior (as in the release).
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class KL16Config:
    """Sizes of the KL autoencoder; the defaults are the released MAR KL-16 VAE.

    Attributes:
        image_channels: channels of input and output images.
        embed_dim: latent channels.
        base_channels: channels of the first (full-resolution) level.
        channel_mult: channel multiplier of every level; there are len - 1 downsamplings, so
            the stride is 2 ** (len - 1).
        num_res_blocks: residual blocks per encoder level (the decoder uses one more).
        resolution: nominal image side used to place attention (the release uses 256).
        encoder_attn_resolutions: nominal sides at which encoder levels add attention blocks.
        decoder_attn_resolutions: the same for decoder levels (none in the release).
        num_groups: GroupNorm groups (must divide every channel count).
        scale_factor: latents are multiplied by this after encoding (0.2325 for FlowAR).
    """

    image_channels: int = 3
    embed_dim: int = 16
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    num_groups: int = 32
    scale_factor: float = 0.2325

    def __post_init__(self) -> None:
        for name in ("channel_mult", "encoder_attn_resolutions", "decoder_attn_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.image_channels < 1 or self.embed_dim < 1 or self.base_channels < 1:
            raise ConfigError(
                "KL16Config: image_channels, embed_dim and base_channels must be >= 1"
            )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"KL16Config: channel_mult must be positive, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"KL16Config: num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.resolution % self.stride != 0:
            raise ConfigError(
                f"KL16Config: resolution {self.resolution} must be a multiple of the stride "
                f"{self.stride}"
            )
        bad = [c for c in self.level_channels if c % self.num_groups != 0]
        if self.num_groups < 1 or bad:
            raise ConfigError(
                f"KL16Config: num_groups {self.num_groups} must divide every level's channels "
                f"{self.level_channels}"
            )
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ConfigError(f"KL16Config: scale_factor must be > 0, got {self.scale_factor}")

    @property
    def stride(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Output channels of every level, finest first."""
        return tuple(self.base_channels * m for m in self.channel_mult)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in the release
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1-conv projections)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, tokens in row-major order.
        q, k, v = (p(hn).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2, (B, 1, H*W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad one zero row/column at the bottom/right, then a stride-2 3x3 conv (no padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention blocks, optional resampler.

    Attribute names (``block``, ``attn``, ``downsample``/``upsample``) are the released keys.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, C_img, H, W) in [-1, 1] -> (B, 2 * embed_dim, H/s, W/s) pre-moments."""

    def __init__(self, config: KL16Config) -> None:
        super().__init__()
        g = config.num_groups
        chans = config.level_channels
        self.conv_in = nn.Conv2d(config.image_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch, res = config.base_channels, config.resolution
        for level, out_ch in enumerate(chans):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(in_ch, out_ch, g))
                in_ch = out_ch
                if res in config.encoder_attn_resolutions:
                    attns.append(AttnBlock(out_ch, g))
            stage = _Level(blocks, attns)
            if level != len(chans) - 1:
                stage.downsample = Downsample(out_ch)
                res //= 2
            self.down.append(stage)
        self.mid = _Mid(in_ch, g)
        self.norm_out = _group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, 2 * config.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, embed_dim, h, w) -> image (B, C_img, h*s, w*s), roughly in [-1, 1].

    ``up`` is indexed by level (``up[-1]`` runs first, at the coarsest resolution).
    """

    def __init__(self, config: KL16Config) -> None:
        super().__init__()
        g = config.num_groups
        chans = config.level_channels
        in_ch = chans[-1]
        res = config.resolution // config.stride
        self.conv_in = nn.Conv2d(config.embed_dim, in_ch, 3, padding=1)
        self.mid = _Mid(in_ch, g)
        levels: list[_Level] = []
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(in_ch, out_ch, g))
                in_ch = out_ch
                if res in config.decoder_attn_resolutions:
                    attns.append(AttnBlock(out_ch, g))
            stage = _Level(blocks, attns)
            if level != 0:
                stage.upsample = Upsample(out_ch)
                res *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, config.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KL16VAE(Codec):
    """The MAR KL-16 VAE as a :class:`~flowar.codecs.base.Codec`.

    Args:
        config: sizes; the default is the released model.
        sample_posterior: if True, :meth:`encode` draws mean + std * noise (as FlowAR's training
            does); if False it returns the posterior mean. Either can be overridden per call.
    """

    def __init__(self, config: KL16Config | None = None, sample_posterior: bool = False) -> None:
        super().__init__()
        self.config = config or KL16Config()
        self.channels = self.config.embed_dim
        self.stride = self.config.stride
        self.image_channels = self.config.image_channels
        self.scale_factor = self.config.scale_factor
        self.sample_posterior = sample_posterior
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        e = self.config.embed_dim
        self.quant_conv = nn.Conv2d(2 * e, 2 * e, 1)
        self.post_quant_conv = nn.Conv2d(e, e, 1)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, log-variance), each (B, embed_dim, H/s, W/s), unscaled.

        Args:
            images: (B, image_channels, H, W) in [0, 1].
        """
        self.check_images(images)
        moments = self.quant_conv(self.encoder(images * 2.0 - 1.0))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def encode(
        self,
        images: torch.Tensor,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> scaled latents (B, embed_dim, H/s, W/s).

        Args:
            images: the images.
            sample: draw from the posterior instead of taking its mean (default:
                ``self.sample_posterior``).
            generator: random generator for the posterior sample (on the images' device).
        """
        mean, logvar = self.moments(images)
        if self.sample_posterior if sample is None else sample:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> images (B, C, h*s, w*s) in [0, 1]."""
        self.check_latents(latents)
        images = self.decoder(self.post_quant_conv(latents / self.scale_factor))
        return ((images + 1.0) * 0.5).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        c = self.config
        return (f"embed_dim={c.embed_dim}, stride={c.stride}, scale_factor={c.scale_factor}, "
                f"sample_posterior={self.sample_posterior}")


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The VAE state dict inside a loaded file: ``obj['model']``, ``obj['state_dict']`` or obj."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{source}: expected a VAE state dict (or a dict with a 'model' entry), found "
            f"{type(obj).__name__}"
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_kl16_state_dict(
    model: KL16VAE, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> KL16VAE:
    """Load ``state_dict`` strictly into ``model``.

    Keys of an autoencoder training loss (``loss.*``: discriminator, perceptual net) are ignored
    with a log message; any other missing or unexpected key, or a shape mismatch, is a
    :class:`CheckpointError` naming the first offenders.
    """
    state = _unwrap_state_dict(state_dict, source)
    ignored = [k for k in state if k.startswith("loss.")]
    if ignored:
        logger.info("%s: ignoring %d training-loss keys (loss.*)", source, len(ignored))
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (model wants {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the KL-16 VAE ({model.config}): "
            f"{len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}), "
            f"{len(wrong)} with another shape (first: {wrong[:3]}). "
            "Pass the MAR kl16.ckpt or a KL16Config matching the file."
        )
    model.load_state_dict(state, strict=True)
    return model


def load_kl16(
    path: str | Path,
    config: KL16Config | None = None,
    sample_posterior: bool = False,
    map_location: str | torch.device = "cpu",
) -> KL16VAE:
    """Build a :class:`KL16VAE` and load weights from ``path``.

    Accepts the MAR ``kl16.ckpt`` (a dict whose ``'model'`` entry is the state dict), a bare
    state dict in a .ckpt/.pth file (read with ``torch.load(weights_only=True)`` only), or a
    .safetensors file. The returned model is in eval mode with gradients off.
    """
    from flowar.io.weights import read_weights  # io sits beside codecs; import on use

    obj = read_weights(path, map_location=map_location)
    model = KL16VAE(config, sample_posterior=sample_posterior)
    load_kl16_state_dict(model, obj, source=str(path))
    model.eval().requires_grad_(False)
    return model
