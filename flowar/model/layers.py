"""Attention layers of FlowAR: projections + RoPE around a pluggable attention backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout, default_scale
from flowar.nn.rope import Rope2d


class QKNorm(nn.Module):
    """Bounded-entry option: L2-normalised queries and keys with a fixed logit scale.

    With unit queries and keys every logit lies in [-logit_scale, logit_scale], so the
    polynomial method's condition (bounded attention entries) holds by construction.
    """

    def __init__(self, enabled: bool, logit_scale: float, head_dim: int) -> None:
        super().__init__()
        self.enabled = enabled
        self.scale = logit_scale if enabled else default_scale(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return q, k
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2-D RoPE; the attention itself is the backend's."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        backend: AttentionBackend,
        *,
        qkv_bias: bool,
        qk_norm: bool = False,
        logit_scale: float = 1.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope = Rope2d(self.head_dim, rope_base)
        self.qk_norm = QKNorm(qk_norm, logit_scale, self.head_dim)
        self.backend = backend
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        sides: tuple[int, ...],
        grid: int,
        layout: BlockLayout | None = None,
        state: AttentionState | None = None,
    ) -> torch.Tensor:
        """x (B, N, D) whose tokens are the square maps ``sides`` -> (B, N, D)."""
        batch, count, dim = x.shape
        qkv = self.qkv(x).view(batch, count, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        q, k = self.qk_norm(q, k)
        q, k = self.rope(q, sides, grid), self.rope(k, sides, grid)
        out = self.backend(
            q, k, v, scale=self.qk_norm.scale, layout=layout, state=state,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, count, dim)  # (B, N, D)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Queries from the flow tokens, keys and values from the AR condition of the same grid."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        num_heads: int,
        backend: AttentionBackend,
        *,
        qk_norm: bool = False,
        logit_scale: float = 1.0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rope = Rope2d(self.head_dim, rope_base)
        self.qk_norm = QKNorm(qk_norm, logit_scale, self.head_dim)
        self.backend = backend

    def forward(self, x: torch.Tensor, cond: torch.Tensor, side: int, grid: int) -> torch.Tensor:
        """x (B, N, W), cond (B, N, D) on the same side x side grid -> (B, N, W)."""
        batch, count, dim = x.shape
        q = self.q(x).view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(cond).view(batch, count, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        q, k = self.qk_norm(q, k)
        q, k = self.rope(q, (side,), grid), self.rope(k, (side,), grid)
        out = self.backend(q, k, v, scale=self.qk_norm.scale)
        out = out.transpose(1, 2).reshape(batch, count, dim)  # (B, N, W)
        return self.proj(out)
