"""FAVOR+ attention (Performer): positive orthogonal random features, the practitioners' baseline.

With ``x = sqrt(scale) q`` and ``y = sqrt(scale) k``, and ``w ~ N(0, I_d)``,

    E_w[exp(w.x - |x|^2 / 2) exp(w.y - |y|^2 / 2)] = exp(x.y) = exp(scale * q.k),

so ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``m`` random rows ``W`` is an unbiased,
positive estimate of the softmax kernel. The rows are drawn in orthogonal blocks of ``d`` (QR of
a Gaussian matrix), each row rescaled by the norm of an independent Gaussian vector so that its
marginal is still ``N(0, I)``: orthogonal features have lower variance. The draw comes from a
``torch.Generator`` seeded with the config's seed and is kept as a buffer, so it is saved with
the model. There is no error certificate: the estimate's variance grows like
``exp(|x|^2 + |y|^2)``.

Numerical stabilisation subtracts a per-query constant on the query side and a per-(batch, head)
constant on the key side; both cancel exactly between numerator and denominator. The incremental
state keeps a running key-side constant and rescales its sums when it grows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout
from flowar.attention.poly import compute_dtype, split_normalise
from flowar.attention.stats import CallStats, report

if TYPE_CHECKING:
    from flowar.config import AttentionConfig

logger = logging.getLogger(__name__)


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_features, dim) rows, orthogonal within blocks of ``dim``, with N(0, I) marginals."""
    num_blocks = math.ceil(num_features / dim)
    gauss = torch.randn(num_blocks, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)  # (blocks, d, d) each
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar: unique QR
    rows = q.transpose(-1, -2).reshape(num_blocks * dim, dim)[:num_features]  # (m, d), unit rows
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


@dataclass
class PerformerState(AttentionState):
    """Running FAVOR+ sums of one layer.

    Attributes:
        sums: (B, H, m, d + 1): ``sum_j exp(-offset) phi(k_j) [v_j, 1]^T``.
        offset: (B, H, 1, 1) key-side stabiliser the sums are scaled by.
        keys: number of keys seen.
    """

    sums: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    keys: int = 0

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.sums, self.offset) if t is not None)


class PerformerAttention(AttentionBackend):
    """FAVOR+ softmax-kernel attention with ``num_features`` positive orthogonal random features.

    Args:
        head_dim: width ``d`` of a head.
        num_features: number ``m`` of random features.
        seed: seed of the feature draw.
    """

    name = "performer"

    def __init__(self, head_dim: int, num_features: int = 256, seed: int = 0) -> None:
        super().__init__(head_dim)
        generator = torch.Generator().manual_seed(seed)
        projection = orthogonal_gaussian(num_features, head_dim, generator).float()
        self.register_buffer("projection", projection)  # (m, d), saved with the model
        self.num_features = num_features

    @classmethod
    def from_config(cls, config: AttentionConfig, head_dim: int) -> PerformerAttention:
        """Build from the model's :class:`~flowar.config.AttentionConfig`."""
        return cls(head_dim, num_features=config.performer_features, seed=config.seed)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}"

    def new_state(self) -> PerformerState:
        return PerformerState()

    def _logits(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``W x - |x|^2 / 2`` for ``x`` scaled by sqrt(scale): (..., N, d) -> (..., N, m)."""
        x = x * math.sqrt(scale)
        w = self.projection.to(x.dtype)
        return x @ w.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)

    def _query_features(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        logits = self._logits(q, scale)
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # per-query constant

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        layout: BlockLayout | None = None,
        state: AttentionState | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        if state is not None and not isinstance(state, PerformerState):
            raise TypeError(f"performer got a {type(state).__name__}, not a PerformerState")
        if layout is not None and layout.total != q.shape[-2]:
            raise ValueError(f"layout covers {layout.total} tokens, queries have {q.shape[-2]}")
        if scale <= 0:
            raise ValueError(f"performer features need a positive logit scale, got {scale}")
        dtype = compute_dtype(q)
        # NOTE: autocast off so the feature sums and denominators accumulate in fp32 (or fp64).
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, Nk, d + 1)
            fq = self._query_features(q, scale)  # (B, H, Nq, m)
            key_logits = self._logits(k, scale)  # (B, H, Nk, m)
            offset = key_logits.amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
            if state is not None:
                out = self._incremental(fq, key_logits, offset, v1, state)
                keys = state.keys
            elif layout is not None:
                fk = torch.exp(key_logits - offset)
                prefix, outputs = None, []
                offsets = layout.offsets
                for start, end in zip(offsets[:-1], offsets[1:]):
                    block = fk[..., start:end, :].transpose(-1, -2) @ v1[..., start:end, :]
                    prefix = block if prefix is None else prefix + block  # (B, H, m, d + 1)
                    outputs.append(fq[..., start:end, :] @ prefix)
                out = split_normalise(torch.cat(outputs, dim=-2))
                keys = layout.total
            else:
                fk = torch.exp(key_logits - offset)
                out = split_normalise(fq @ (fk.transpose(-1, -2) @ v1))
                keys = k.shape[-2]
        stats = CallStats(self.name, tokens=q.shape[-2], keys=keys, rank=self.num_features)
        report(stats)
        logger.debug("performer attention: %d queries x %d keys, %d features",
                     stats.tokens, keys, self.num_features)
        return out.to(v.dtype) if out.dtype != v.dtype else out

    @staticmethod
    def _incremental(
        fq: torch.Tensor,
        key_logits: torch.Tensor,
        offset: torch.Tensor,
        v1: torch.Tensor,
        state: PerformerState,
    ) -> torch.Tensor:
        if state.sums is None:
            new_offset = offset
        else:
            new_offset = torch.maximum(offset, state.offset.to(offset.dtype))
        update = torch.exp(key_logits - new_offset).transpose(-1, -2) @ v1  # (B, H, m, d + 1)
        if state.sums is None:
            state.sums = update
        else:
            rescale = torch.exp(state.offset.to(offset.dtype) - new_offset)  # <= 1
            state.sums = state.sums.to(update.dtype) * rescale + update
        state.offset = new_offset
        state.keys += key_logits.shape[-2]
        return split_normalise(fq @ state.sums)
