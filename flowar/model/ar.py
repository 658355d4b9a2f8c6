"""The block-causal AR transformer block (adaLN, weightless RMSNorm, RoPE attention, GEGLU)."""

from __future__ import annotations

import torch
from torch import nn

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout
from flowar.model.layers import SelfAttention
from flowar.nn.blocks import GatedGeluMLP, modulate, rms_norm


class ARBlock(nn.Module):
    """Pre-norm transformer block modulated per sample by the class embedding.

    ``ada_lin`` produces six chunks in the release's order: gamma1, gamma2, scale1, scale2,
    shift1, shift2.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        backend: AttentionBackend,
        *,
        mlp_ratio: float,
        qk_norm: bool,
        logit_scale: float,
        attn_dropout: float,
        proj_dropout: float,
        rope_base: float,
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(
            dim, num_heads, backend, qkv_bias=True, qk_norm=qk_norm, logit_scale=logit_scale,
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, rope_base=rope_base,
        )
        self.mlp = GatedGeluMLP(dim, mlp_ratio, proj_dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        sides: tuple[int, ...],
        grid: int,
        layout: BlockLayout | None = None,
        state: AttentionState | None = None,
    ) -> torch.Tensor:
        """x (B, N, D), cond (B, D) -> (B, N, D)."""
        batch, dim = cond.shape
        chunks = self.ada_lin(cond).view(batch, 1, 6, dim).unbind(2)  # 6 x (B, 1, D)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = chunks
        h = modulate(rms_norm(x), shift1, scale1)
        x = x + gamma1 * self.attn(h, sides, grid, layout=layout, state=state)
        h = modulate(rms_norm(x), shift2, scale2)
        return x + gamma2 * self.mlp(h)
