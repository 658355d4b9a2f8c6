"""Whole-model scaling: FlowAR sampling time against the largest side n, exact versus poly.

The model is a small-head bounded-entry FlowAR (unit queries and keys, fixed logit scale) with
scales ``1, 2, 4, ..., n``, so the token count grows like ``n^2``. Exact attention with a KV
cache costs about ``n^4`` (the last scales attend over ``Theta(n^2)`` keys); the polynomial
method with its constant-size state costs ``n^2 * rank``. Reported per side: wall time, peak
memory, attention FLOPs (analytic, see :mod:`flowar.bench.common`), total FLOPs (the rest counted
by :class:`torch.utils.flop_counter.FlopCounterMode`), the attention cache of all AR layers at the
end of the sequence, and the worst certified per-call bound. Log-log slopes are fitted on a chosen
range of sides (where attention dominates).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from flowar.attention.stats import collect_stats
from flowar.bench.common import (
    MIB,
    CountingBackend,
    FlopTally,
    loglog_slope,
    measure,
    wrapped_backends,
)
from flowar.config import AttentionConfig, FlowARConfig, FlowHeadConfig, SamplingConfig
from flowar.errors import ConfigError
from flowar.flow.sampler import generate

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ScalingBenchConfig:
    """What :func:`run` measures.

    Attributes:
        sides: largest sides n (powers of two); scales are 1, 2, 4, ..., n.
        backends: "exact" and/or "poly".
        width, heads: AR and flow-head width and heads (head width = width / heads).
        depth: AR encoder and decoder depth (each), flow-head depth.
        logit_scale: bounded-entry logit scale (the certified beta of every call).
        degree, polynomial: the poly backend.
        steps: Euler steps per scale.
        batch: images per sampling call (amortises per-call overhead).
        repeats: timed repeats after one warm-up (best kept).
        fit_sides: (low, high) sides of the slope fit.
        count_flops: count the non-attention FLOPs with FlopCounterMode (else 0 is added).
        seed: model and noise seed.
        device: "cpu", "cuda", ...
    """

    sides: tuple[int, ...] = (16, 32, 64, 128)
    backends: tuple[str, ...] = ("exact", "poly")
    width: int = 32
    heads: int = 2
    depth: int = 1
    logit_scale: float = 0.25
    degree: int = 2
    polynomial: str = "taylor"
    steps: int = 2
    batch: int = 1
    repeats: int = 1
    fit_sides: tuple[int, int] = (32, 128)
    count_flops: bool = True
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.sides or any(s < 2 or s & (s - 1) for s in self.sides):
            raise ConfigError(f"sides must be powers of two >= 2, got {self.sides}")
        if set(self.backends) - {"exact", "poly"}:
            raise ConfigError(f"scaling compares 'exact' and 'poly', got {self.backends}")
        if self.repeats < 1 or self.steps < 1 or self.batch < 1:
            raise ConfigError("repeats, steps and batch must be >= 1")


@dataclass
class ScalingRow:
    """One backend at one largest side."""

    backend: str
    side: int
    tokens: int
    seconds: float
    peak_mib: float | None
    attention_gflop: float
    total_gflop: float
    cache_mib: float
    max_bound: float | None


@dataclass
class ScalingReport:
    """Rows, fitted slopes (time and FLOPs) and the cache ratio at the largest side."""

    config: dict
    rows: list[ScalingRow] = field(default_factory=list)
    time_slopes: dict[str, float] = field(default_factory=dict)
    flop_slopes: dict[str, float] = field(default_factory=dict)
    cache_ratio: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(side: int, backend: str, cfg: ScalingBenchConfig) -> FlowARConfig:
    """The small-head bounded-entry FlowAR with scales 1, 2, ..., ``side``."""
    scales = tuple(2**i for i in range(int(math.log2(side)) + 1))
    return FlowARConfig(
        scales=scales, channels=1, num_classes=10, width=cfg.width, encoder_depth=cfg.depth,
        decoder_depth=cfg.depth, num_heads=cfg.heads, qk_norm=True,
        logit_scale=cfg.logit_scale, rope_grid=16,
        flow=FlowHeadConfig(width=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
                            time_embed_dim=cfg.width),
        attention=AttentionConfig(backend=backend, degree=cfg.degree, polynomial=cfg.polynomial),
    )


def _ar_cache_bytes(model, labels: torch.Tensor) -> int:
    """Attention cache of all AR layers after every scale (one incremental pass, zero maps)."""
    cache = model.new_cache()
    try:
        class_vec = model.class_embedding(labels)
        previous = None
        for side in model.config.scales:
            model.condition_step(cache, class_vec, previous)
            previous = torch.zeros(labels.shape[0], model.config.channels, side, side,
                                   device=labels.device)
        return cache.nbytes()
    finally:
        cache.release()


def _non_attention_flops(model, labels: torch.Tensor, sampling: SamplingConfig) -> int:
    """Matmul FLOPs of one sampling run outside the attention backends."""
    with FlopCounterMode(display=False) as counter:
        generate(model, labels, sampling, seed=0)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    inside = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".backend"))
    return total - inside


def run(cfg: ScalingBenchConfig, progress: Progress | None = None) -> ScalingReport:
    """Sample once per (side, backend) on the same weights, labels and seed, and measure."""
    from flowar.model.flowar import FlowAR

    device = torch.device(cfg.device)
    report = ScalingReport(config=dataclasses.asdict(cfg))
    sampling = SamplingConfig(steps=cfg.steps)
    labels = torch.arange(cfg.batch, device=device) % 10
    for side in cfg.sides:
        # Same weights for every backend; non-attention FLOPs counted once, on the cheap path.
        torch.manual_seed(cfg.seed)
        reference = FlowAR(model_config(side, "poly", cfg)).to(device).eval()
        weights = reference.state_dict()
        other_flops = _non_attention_flops(reference, labels, sampling) if cfg.count_flops else 0
        del reference
        for backend in cfg.backends:
            model = FlowAR(model_config(side, backend, cfg)).to(device).eval()
            model.load_state_dict(weights)
            rank = None
            if backend == "poly":
                rank = math.comb(model.config.head_dim + cfg.degree, cfg.degree)
            tally = FlopTally()
            with wrapped_backends(model, lambda b, r=rank, t=tally: CountingBackend(b, t, r)):
                with torch.no_grad(), collect_stats() as calls:
                    generate(model, labels, sampling, seed=cfg.seed)
            bound = max((c.bound for c in calls if c.bound is not None), default=None)
            m = measure(lambda mm=model: generate(mm, labels, sampling, seed=cfg.seed),
                        device, cfg.repeats)
            with torch.no_grad():
                cache = _ar_cache_bytes(model, labels)
            row = ScalingRow(
                backend=backend, side=side, tokens=model.config.num_tokens, seconds=m.seconds,
                peak_mib=None if m.peak_bytes is None else m.peak_bytes / MIB,
                attention_gflop=tally.flops / 1e9, total_gflop=(tally.flops + other_flops) / 1e9,
                cache_mib=cache / MIB, max_bound=bound,
            )
            report.rows.append(row)
            if progress:
                progress(f"{backend:6s} n={side:4d}  {m.seconds:.4g} s  "
                         f"{row.total_gflop:.3g} GFLOP  cache {row.cache_mib:.3g} MiB")
            del model
    low, high = cfg.fit_sides
    for backend in cfg.backends:
        fit = [r for r in report.rows if r.backend == backend and low <= r.side <= high]
        report.time_slopes[backend] = loglog_slope([r.side for r in fit], [r.seconds for r in fit])
        report.flop_slopes[backend] = loglog_slope(
            [r.side for r in fit], [r.total_gflop for r in fit]
        )
    top = max(cfg.sides)
    caches = {r.backend: r.cache_mib for r in report.rows if r.side == top}
    if "exact" in caches and caches.get("poly"):
        report.cache_ratio = caches["exact"] / caches["poly"]
    return report
