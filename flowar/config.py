"""Configuration dataclasses (frozen, validated on construction) and named presets.

Every size, channel count, class count and scale list of the library comes from here; a
checkpoint carries its config as plain JSON (:func:`to_dict` / :func:`model_config_from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from flowar.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _has_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` fits one alternative of a field annotation (as written)."""
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple["):
        inner = [k.strip() for k in kind[len("tuple["):-1].split(",")]
        if not isinstance(value, tuple):
            return False
        if inner[-1] == "...":
            return all(_has_kind(v, inner[0]) for v in value)
        return len(value) == len(inner) and all(_has_kind(v, k) for v, k in zip(value, inner))
    return type(value).__name__ == kind


def check_field_types(config: Any) -> None:
    """Raise a :class:`ConfigError` naming the first field whose value does not have the
    annotated type (ints are not bools, floats must be finite numbers)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        kinds = [kind.strip() for kind in str(item.type).split("|")]
        if not any(_has_kind(value, kind) for kind in kinds):
            hint = " (a finite number)" if "float" in kinds else ""
            raise ConfigError(
                f"{type(config).__name__}.{item.name} must be {item.type}{hint}, got {value!r}"
            )
        # numpy scalars become Python numbers, so configs stay JSON-ready.
        if isinstance(value, numbers.Number) and type(value) not in (int, float, bool):
            cast = int if _has_kind(value, "int") and "int" in kinds else float
            object.__setattr__(config, item.name, cast(value))


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention backend every attention call of the model uses.

    Attributes:
        backend: "exact" (SDPA), "poly" (polynomial method), "performer" (FAVOR+) or "auto".
        degree: polynomial degree for "poly"/"auto", or "auto" to pick the smallest degree whose
            certified error meets ``target_error``.
        polynomial: "taylor" or "chebyshev" approximation of exp.
        target_error: error target used by ``degree="auto"`` and by the "auto" backend.
        max_degree: largest degree ``degree="auto"`` may choose.
        performer_features: number of random features for "performer".
        seed: seed of the performer's random features.
    """

    backend: str = "exact"
    degree: int | str = 2
    polynomial: str = "taylor"
    target_error: float = 1e-3
    max_degree: int = 8
    performer_features: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        known = ("exact", "poly", "performer", "auto")
        _require(self.backend in known, f"attention backend must be one of {known}, "
                 f"got {self.backend!r}")
        _require(self.degree == "auto" or (isinstance(self.degree, int) and self.degree >= 1),
                 f"attention degree must be a positive integer or 'auto', got {self.degree!r}")
        _require(self.polynomial in ("taylor", "chebyshev"),
                 f"polynomial must be 'taylor' or 'chebyshev', got {self.polynomial!r}")
        _require(0 < self.target_error < 1, f"target_error must be in (0, 1), "
                 f"got {self.target_error}")
        _require(self.max_degree >= 1, f"max_degree must be >= 1, got {self.max_degree}")
        _require(self.performer_features >= 1,
                 f"performer_features must be >= 1, got {self.performer_features}")


@dataclass(frozen=True)
class FlowHeadConfig:
    """The per-scale flow-matching network (``SimpleTransformerAdaLN`` in the release).

    Attributes:
        width: model width W.
        depth: number of residual blocks.
        num_heads: attention heads (the release uses W // 64).
        cross_attention: use the Attn-CrossAttn-MLP block (FlowAR-L/H) instead of Attn-MLP.
        mlp_ratio: gated-GELU MLP hidden size is int(W * mlp_ratio * 2 / 3).
        time_embed_dim: width of the sinusoidal time features.
    """

    width: int = 1024
    depth: int = 2
    num_heads: int = 16
    cross_attention: bool = False
    mlp_ratio: float = 4.0
    time_embed_dim: int = 256

    def __post_init__(self) -> None:
        check_field_types(self)
        _require(self.width > 0 and self.depth >= 0, "flow head width must be > 0, depth >= 0")
        _require(self.num_heads > 0 and self.width % self.num_heads == 0,
                 f"flow head: num_heads ({self.num_heads}) must divide width ({self.width})")
        _require((self.width // self.num_heads) % 4 == 0,
                 f"flow head: head width {self.width // self.num_heads} must be a multiple of 4 "
                 "for 2-D RoPE")
        _require(self.time_embed_dim >= 2 and self.time_embed_dim % 2 == 0,
                 f"time_embed_dim must be even and >= 2, got {self.time_embed_dim}")
        _require(int(self.width * self.mlp_ratio * 2 / 3) >= 1,
                 f"flow head mlp_ratio {self.mlp_ratio} leaves no MLP hidden units")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class FlowARConfig:
    """The whole FlowAR model.

    Attributes:
        scales: strictly increasing sides of the square token maps; the last is the full map.
        channels: channels of a token (latent channels; 1 for grey pixels).
        num_classes: number of classes; the null (unconditional) class id is ``num_classes``.
        width: AR transformer width D (encoder and decoder).
        encoder_depth, decoder_depth: AR blocks before and after the middle projection.
        num_heads: AR attention heads; head width D / heads.
        mlp_ratio: AR gated-GELU MLP hidden size is int(D * mlp_ratio * 2 / 3).
        label_drop_prob: probability of replacing a label by the null class in training.
        attn_dropout, proj_dropout: AR dropouts (training only).
        rope_grid: RoPE positions are normalised to a grid of this side (16 in the release);
            None means the last scale.
        rope_base: RoPE frequency base.
        time_scale: the flow head sees floor(time_scale * t) (1000 in the release).
        qk_norm: bounded-entry variant: queries and keys are L2-normalised in every attention
            call, so logits are bounded by ``logit_scale``.
        logit_scale: fixed logit scale of the bounded-entry variant.
        flow: the flow head.
        attention: the attention backend.
    """

    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    channels: int = 16
    num_classes: int = 1000
    width: int = 768
    encoder_depth: int = 6
    decoder_depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    rope_grid: int | None = None
    rope_base: float = 10000.0
    time_scale: float = 1000.0
    qk_norm: bool = False
    logit_scale: float = 4.0
    flow: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.scales, (list, tuple)) and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in self.scales
        ):
            object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        check_field_types(self)
        s = self.scales
        _require(len(s) >= 1 and all(x >= 1 for x in s),
                 f"scales must be a non-empty list of positive sides, got {s}")
        _require(all(a < b for a, b in zip(s, s[1:])),
                 f"scales must be strictly increasing, got {s}")
        _require(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
        _require(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        _require(self.width > 0 and self.num_heads > 0 and self.width % self.num_heads == 0,
                 f"num_heads ({self.num_heads}) must divide width ({self.width})")
        _require(self.head_dim % 4 == 0,
                 f"AR head width {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        _require(self.encoder_depth >= 0 and self.decoder_depth >= 0, "depths must be >= 0")
        _require(0.0 <= self.label_drop_prob < 1.0, "label_drop_prob must be in [0, 1)")
        _require(0.0 <= self.attn_dropout < 1.0 and 0.0 <= self.proj_dropout < 1.0,
                 "dropouts must be in [0, 1)")
        _require(self.rope_grid is None or self.rope_grid >= 1, "rope_grid must be >= 1")
        _require(self.logit_scale > 0, f"logit_scale must be > 0, got {self.logit_scale}")
        _require(self.time_scale > 0, "time_scale must be > 0")
        _require(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base}")
        _require(int(self.width * self.mlp_ratio * 2 / 3) >= 1,
                 f"mlp_ratio {self.mlp_ratio} leaves the AR MLP no hidden units")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def size(self) -> int:
        """Side of the full token map (the last scale)."""
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        return sum(x * x for x in self.scales)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def effective_rope_grid(self) -> int:
        return self.rope_grid if self.rope_grid is not None else self.size

    def replace(self, **changes: Any) -> FlowARConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate: ODE grid, guidance and its schedule.

    Attributes:
        steps: Euler steps per scale (the "released" grid runs 2 * (steps // 2), 50 if steps=50).
        time_grid: "uniform" (steps + 1 points from 1 to 0) or "released" (two-piece grid).
        cfg: classifier-free guidance strength at the last scale (1 = no guidance).
        cfg_schedule: "linear" (1 at the first scale, cfg at the last) or "constant".
        guidance_low, guidance_high: guidance is applied on a step when
            guidance_low <= t <= guidance_high (t = 1 noise, t = 0 data).
    """

    steps: int = 25
    time_grid: str = "uniform"
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    guidance_low: float = 0.0
    guidance_high: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        _require(isinstance(self.steps, int) and self.steps >= 1,
                 f"steps must be a positive integer, got {self.steps!r}")
        _require(self.time_grid in ("uniform", "released"),
                 f"time_grid must be 'uniform' or 'released', got {self.time_grid!r}")
        _require(self.time_grid != "released" or self.steps >= 2,
                 "the released time grid needs steps >= 2")
        _require(math.isfinite(self.cfg) and self.cfg >= 1.0,
                 f"cfg must be a finite number >= 1 (1 = no guidance), got {self.cfg}")
        _require(self.cfg_schedule in ("linear", "constant"),
                 f"cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        _require(0.0 <= self.guidance_low <= self.guidance_high <= 1.0,
                 "guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-ready data."""
    return dataclasses.asdict(config)


def model_config_from_dict(data: dict[str, Any]) -> FlowARConfig:
    """Rebuild a :class:`FlowARConfig` from :func:`to_dict` output (unknown keys are errors)."""
    data = dict(data)
    try:
        flow = FlowHeadConfig(**data.pop("flow", {}))
        attention = AttentionConfig(**data.pop("attention", {}))
        if "scales" in data:
            data["scales"] = tuple(data["scales"])
        return FlowARConfig(flow=flow, attention=attention, **data)
    except TypeError as err:
        raise ConfigError(f"config has an unknown or missing field: {err}") from None


# Released FlowAR sizes (spec section 4.1). Param counts: 171,718,072 / 586,862,912 /
# 1,913,316,880 with scales (1, 2, 4, 8, 16) and 16 latent channels.
PRESETS: dict[str, FlowARConfig] = {
    "flowar-s": FlowARConfig(
        width=768, encoder_depth=6, decoder_depth=6, num_heads=12, rope_grid=16,
        flow=FlowHeadConfig(width=1024, depth=2, num_heads=16, cross_attention=False),
    ),
    "flowar-l": FlowARConfig(
        width=1024, encoder_depth=8, decoder_depth=8, num_heads=16, rope_grid=16,
        flow=FlowHeadConfig(width=1024, depth=12, num_heads=16, cross_attention=True),
    ),
    "flowar-h": FlowARConfig(
        width=1536, encoder_depth=15, decoder_depth=15, num_heads=16, rope_grid=16,
        flow=FlowHeadConfig(width=1536, depth=12, num_heads=24, cross_attention=True),
    ),
    # The shipped model: MNIST at 16x16 pixels, 2x2 pixel patches as 4-channel tokens on an
    # 8x8 map, scales 1-2-4-8 (85 tokens). Small enough to train in about an hour on 2 CPU cores.
    "mnist16": FlowARConfig(
        scales=(1, 2, 4, 8), channels=4, num_classes=10, width=192, encoder_depth=2,
        decoder_depth=2, num_heads=6, label_drop_prob=0.1,
        flow=FlowHeadConfig(width=192, depth=2, num_heads=6, time_embed_dim=128),
    ),
    # Bounded-entry variant of mnist16 (issue #3): unit queries and keys with logit scale 1, so
    # every logit lies in [-1, 1]; head width 8 keeps the certified polynomial cheap (Chebyshev
    # degree 5 certifies output error 1e-3 per unit max|V| with rank C(13, 5) = 1287).
    "mnist16-bounded": FlowARConfig(
        scales=(1, 2, 4, 8), channels=4, num_classes=10, width=192, encoder_depth=2,
        decoder_depth=2, num_heads=24, label_drop_prob=0.1, qk_norm=True, logit_scale=1.0,
        flow=FlowHeadConfig(width=192, depth=2, num_heads=24, time_embed_dim=128),
        attention=AttentionConfig(polynomial="chebyshev", degree=5),
    ),
    # A two-block toy used by tests and examples.
    "tiny": FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=10, width=32, encoder_depth=1,
        decoder_depth=1, num_heads=2, label_drop_prob=0.1,
        flow=FlowHeadConfig(width=32, depth=1, num_heads=2, time_embed_dim=32),
    ),
}
