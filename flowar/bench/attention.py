"""Attention-only benchmark: time, peak memory and error of exact, poly and performer.

Inputs are in the bounded-entry regime of the theory: unit queries and keys with logit scale
``beta``, so every logit lies in ``[-beta, beta]``; values uniform in ``[-1, 1]``. The
block-causal mask is a FlowAR-like pyramid (each block four times the previous, the last about
3/4 of the tokens). Three measurements:

* :func:`time_backends`: time, peak memory, analytic FLOPs and max error against exact for each
  backend and token count;
* :func:`error_vs_tokens`: measured error and certified bound against ``N`` at fixed ``beta``
  and degree, plus the theory's growing degree ``g(N) = ceil(ln N / 2)``;
* :func:`error_vs_beta`: the same against ``beta`` at fixed degree, on random and on adversarial
  inputs (every logit at ``+-beta``), showing where the method breaks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flowar.attention import bounds
from flowar.attention.base import AttentionBackend, BlockLayout
from flowar.attention.exact import ExactAttention
from flowar.attention.performer import PerformerAttention
from flowar.attention.poly import PolyAttention
from flowar.attention.stats import collect_stats
from flowar.bench.common import (
    MIB,
    exact_attention_flops,
    measure,
    poly_attention_flops,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AttentionBenchConfig:
    """What :func:`time_backends` measures.

    Attributes:
        tokens: token counts N.
        head_dim: head width d.
        heads: heads (batch size 1).
        degree, polynomial: the poly backend.
        beta: logit half-width of the inputs (unit q, k; logit scale beta).
        performer_features: FAVOR+ features.
        backends: which backends to time.
        mode: "block-causal" (pyramid mask) or "unmasked".
        repeats: timed repeats (best is kept) after one warm-up.
        seed: input seed.
        device: "cpu", "cuda", ...
    """

    tokens: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    head_dim: int = 16
    heads: int = 1
    degree: int = 2
    polynomial: str = "taylor"
    beta: float = 0.25
    performer_features: int = 256
    backends: tuple[str, ...] = ("exact", "poly", "performer")
    mode: str = "block-causal"
    repeats: int = 3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from flowar.errors import ConfigError

        if not self.tokens or min(self.tokens) < 2:
            raise ConfigError(f"token counts must be >= 2, got {self.tokens}")
        unknown = set(self.backends) - {"exact", "poly", "performer"}
        if unknown:
            raise ConfigError(f"unknown backends {sorted(unknown)}; use exact, poly, performer")
        if self.mode not in ("block-causal", "unmasked"):
            raise ConfigError(f"mode must be 'block-causal' or 'unmasked', got {self.mode!r}")
        if self.beta <= 0 or self.head_dim < 1 or self.heads < 1 or self.repeats < 1:
            raise ConfigError("beta, head_dim, heads and repeats must be positive")


@dataclass
class TimingRow:
    """One backend at one token count."""

    backend: str
    tokens: int
    seconds: float
    peak_mib: float | None
    gflop: float
    error: float | None
    bound: float | None = None
    rank: int | None = None


@dataclass
class ErrorRow:
    """Measured error against exact, and the certified bound, for one setting."""

    tokens: int
    beta: float
    degree: int
    error: float
    bound: float
    inputs: str = "random"


@dataclass
class AttentionReport:
    """Everything :func:`run` measured (JSON-ready through :func:`dataclasses.asdict`)."""

    config: dict
    timings: list[TimingRow] = field(default_factory=list)
    error_vs_tokens: list[ErrorRow] = field(default_factory=list)
    error_vs_beta: list[ErrorRow] = field(default_factory=list)
    speedup_at_max: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pyramid_layout(tokens: int) -> BlockLayout:
    """FlowAR-like blocks summing to ``tokens``: each about 4x the previous, the last ~3N/4."""
    lengths = []
    remaining = tokens
    while remaining > 4:
        block = (3 * remaining) // 4
        lengths.append(block)
        remaining -= block
    lengths.append(remaining)
    return BlockLayout(tuple(reversed(lengths)))


def bounded_inputs(
    tokens: int,
    heads: int,
    head_dim: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit queries and keys, values uniform in [-1, 1]; each (1, H, N, d)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, heads, tokens, head_dim)
    q = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def _backend(name: str, cfg: AttentionBenchConfig) -> AttentionBackend:
    if name == "exact":
        return ExactAttention(cfg.head_dim)
    if name == "poly":
        return PolyAttention(cfg.head_dim, degree=cfg.degree, kind=cfg.polynomial)
    return PerformerAttention(cfg.head_dim, cfg.performer_features, seed=cfg.seed)


def time_backends(cfg: AttentionBenchConfig, progress: Progress | None = None) -> list[TimingRow]:
    """Time every backend at every token count on the same inputs."""
    device = torch.device(cfg.device)
    rows = []
    for n in cfg.tokens:
        q, k, v = bounded_inputs(n, cfg.heads, cfg.head_dim, seed=cfg.seed, device=device)
        layout = pyramid_layout(n) if cfg.mode == "block-causal" else None
        reference = None
        for name in cfg.backends:
            backend = _backend(name, cfg).to(device)
            with torch.no_grad():
                def run(b=backend, q=q, k=k, v=v, layout=layout):
                    return b(q, k, v, scale=cfg.beta, layout=layout)

                with collect_stats() as calls:
                    out = run()
                m = measure(run, device, cfg.repeats)
            if name == "exact":
                reference = out
                flops = exact_attention_flops(n, n, cfg.head_dim)
            elif name == "poly":
                flops = poly_attention_flops(n, n, cfg.head_dim, calls[0].rank)
            else:
                flops = poly_attention_flops(n, n, cfg.head_dim, cfg.performer_features)
            error = None if reference is None else float((out - reference).abs().max())
            rows.append(TimingRow(
                backend=name, tokens=n, seconds=m.seconds,
                peak_mib=None if m.peak_bytes is None else m.peak_bytes / MIB,
                gflop=cfg.heads * flops / 1e9, error=error,
                bound=calls[0].bound if calls else None, rank=calls[0].rank if calls else None,
            ))
            if progress:
                progress(f"{name:9s} N={n:6d}  {m.seconds:.4g} s  error {error}")
            del out
    return rows


def error_vs_tokens(
    tokens: Sequence[int] = (256, 512, 1024, 2048, 4096),
    *,
    beta: float = 1.0,
    degree: int = 4,
    head_dim: int = 8,
    polynomial: str = "taylor",
    seed: int = 0,
) -> list[ErrorRow]:
    """Error (float64, unmasked) at fixed ``beta`` and degree, then with ``g = ceil(ln N / 2)``."""
    rows = []
    for n in tokens:
        q, k, v = bounded_inputs(n, 1, head_dim, seed=seed, dtype=torch.float64)
        exact = ExactAttention(head_dim)(q, k, v, scale=beta)
        for g, label in ((degree, "random"), (math.ceil(math.log(n) / 2), "random, g = ln N / 2")):
            with collect_stats() as calls:
                out = PolyAttention(head_dim, degree=g, kind=polynomial)(q, k, v, scale=beta)
            rows.append(ErrorRow(n, beta, g, float((out - exact).abs().max()), calls[0].bound,
                                 label))
    return rows


def adversarial_inputs(
    tokens: int, head_dim: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every logit at +beta or -beta (scale 1): q = s sqrt(beta), keys = +-s sqrt(beta), values
    +1 on the + keys and -1 on the - keys (theory brief, table D)."""
    s = F.normalize(torch.ones(head_dim, dtype=torch.float64), dim=0) * math.sqrt(beta)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(tokens // 2)
    q = s.expand(1, 1, 16, head_dim)
    k = (signs[:, None] * s).reshape(1, 1, -1, head_dim)
    v = signs[:, None].expand(-1, head_dim).reshape(1, 1, -1, head_dim)
    return q, k, v


def error_vs_beta(
    betas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    *,
    degree: int = 4,
    tokens: int = 1024,
    head_dim: int = 8,
    polynomial: str = "taylor",
    seed: int = 0,
) -> list[ErrorRow]:
    """Error and certified bound against ``beta`` at a fixed degree (float64, unmasked)."""
    rows = []
    poly = PolyAttention(head_dim, degree=degree, kind=polynomial)
    for beta in betas:
        q, k, v = bounded_inputs(tokens, 1, head_dim, seed=seed, dtype=torch.float64)
        cases = (("random", (q, k, v), beta), ("adversarial",
                                                adversarial_inputs(tokens, head_dim, beta), 1.0))
        for label, (qq, kk, vv), scale in cases:
            exact = ExactAttention(head_dim)(qq, kk, vv, scale=scale)
            try:
                with collect_stats() as calls:
                    out = poly(qq, kk, vv, scale=scale)
            except bounds.CertificationError:
                rows.append(ErrorRow(tokens, beta, degree, math.nan, math.inf, label))
                continue
            rows.append(ErrorRow(tokens, beta, degree, float((out - exact).abs().max()),
                                 calls[0].bound, label))
    return rows


def run(
    cfg: AttentionBenchConfig,
    *,
    errors: bool = True,
    progress: Progress | None = None,
) -> AttentionReport:
    """Timings (and, with ``errors``, the two error sweeps) in one report."""
    report = AttentionReport(config=dataclasses.asdict(cfg))
    report.timings = time_backends(cfg, progress)
    by = {(r.backend, r.tokens): r for r in report.timings}
    n = max(cfg.tokens)
    if ("exact", n) in by and ("poly", n) in by:
        report.speedup_at_max = by["exact", n].seconds / by["poly", n].seconds
    if errors:
        report.error_vs_tokens = error_vs_tokens(polynomial=cfg.polynomial, seed=cfg.seed)
        report.error_vs_beta = error_vs_beta(polynomial=cfg.polynomial, seed=cfg.seed)
    return report
