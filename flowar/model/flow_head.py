"""The flow-matching head: a small DiT-like transformer with spatial (per-token) adaLN.

It works on the tokens of one scale at a time and predicts the velocity noise - data
(t = 0 is data, t = 1 is noise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowar.attention.base import AttentionBackend
from flowar.config import FlowARConfig
from flowar.model.layers import CrossAttention, SelfAttention
from flowar.nn.blocks import GatedGeluMLP, TimestepEmbedder, modulate, rms_norm

BackendFactory = Callable[[int], AttentionBackend]


def flow_self_attention(config: FlowARConfig, make_backend: BackendFactory) -> SelfAttention:
    """The flow head's self-attention: no qkv bias, RoPE, the model's bounded-entry setting."""
    flow = config.flow
    return SelfAttention(
        flow.width, flow.num_heads, make_backend(flow.head_dim), qkv_bias=False,
        qk_norm=config.qk_norm, logit_scale=config.logit_scale, rope_base=config.rope_base,
    )


class FlowBlock(nn.Module):
    """Attn-MLP block; every token gets its own six modulation chunks from (t_emb + cond)."""

    def __init__(self, config: FlowARConfig, make_backend: BackendFactory) -> None:
        super().__init__()
        flow = config.flow
        self.attn = flow_self_attention(config, make_backend)
        self.mlp = GatedGeluMLP(flow.width, flow.mlp_ratio)
        self.ada_lin = nn.Linear(flow.width, 6 * flow.width)

    def forward(
        self, x: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor, cond: torch.Tensor,
        side: int, grid: int,
    ) -> torch.Tensor:
        """x (B, N, W), t_emb (B, 1, W), c = cond_embed(z) (B, N, W) -> (B, N, W)."""
        batch, count, width = x.shape
        chunks = self.ada_lin(nn.functional.silu(t_emb + c)).view(batch, count, 6, width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = chunks.unbind(2)  # 6 x (B, N, W)
        x = x + gamma1 * self.attn(modulate(rms_norm(x), shift1, scale1), (side,), grid)
        return x + gamma2 * self.mlp(modulate(rms_norm(x), shift2, scale2))


class FlowCrossBlock(nn.Module):
    """Attn-CrossAttn-MLP block (FlowAR-L/H): time-only self-attention modulation, an ungated
    cross-attention to the raw condition, and a per-token modulated MLP."""

    def __init__(self, config: FlowARConfig, make_backend: BackendFactory) -> None:
        super().__init__()
        flow = config.flow
        self.attn = flow_self_attention(config, make_backend)
        self.crossattn = CrossAttention(
            flow.width, config.width, flow.num_heads, make_backend(flow.head_dim),
            qk_norm=config.qk_norm, logit_scale=config.logit_scale, rope_base=config.rope_base,
        )
        self.norm2_1 = nn.RMSNorm(flow.width, eps=1e-6)
        self.norm2_2 = nn.RMSNorm(config.width, eps=1e-6)
        self.mlp = GatedGeluMLP(flow.width, flow.mlp_ratio)
        self.ada_lin_attn = nn.Linear(flow.width, 3 * flow.width)
        self.ada_lin_mlp = nn.Linear(flow.width, 3 * flow.width)

    def forward(
        self, x: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor, cond: torch.Tensor,
        side: int, grid: int,
    ) -> torch.Tensor:
        gamma1, scale1, shift1 = self.ada_lin_attn(nn.functional.silu(t_emb)).chunk(3, dim=-1)
        gamma2, scale2, shift2 = self.ada_lin_mlp(nn.functional.silu(c + t_emb)).chunk(3, dim=-1)
        x = x + gamma1 * self.attn(modulate(rms_norm(x), shift1, scale1), (side,), grid)
        x = x + self.crossattn(self.norm2_1(x), self.norm2_2(cond), side, grid)
        return x + gamma2 * self.mlp(modulate(rms_norm(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Per-token (shift, scale) modulation, then a linear map to the token channels."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(rms_norm(x), shift, scale))


class FlowHead(nn.Module):
    """Velocity network v(x_t, t, z) for the tokens of one scale."""

    def __init__(self, config: FlowARConfig, make_backend: BackendFactory) -> None:
        super().__init__()
        flow = config.flow
        self.grid = config.effective_rope_grid
        self.time_embed = TimestepEmbedder(flow.width, flow.time_embed_dim, config.time_scale)
        self.cond_embed = nn.Linear(config.width, flow.width)
        self.input_proj = nn.Linear(config.channels, flow.width)
        block = FlowCrossBlock if flow.cross_attention else FlowBlock
        self.res_blocks = nn.ModuleList(block(config, make_backend) for _ in range(flow.depth))
        self.final_layer = FinalLayer(flow.width, config.channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) noisy tokens of one square scale, t (B,), cond (B, N, D) -> (B, N, C)."""
        side = round(x.shape[1] ** 0.5)
        if side * side != x.shape[1]:
            raise ValueError(f"the flow head needs a square map, got {x.shape[1]} tokens")
        t_emb = self.time_embed(t)[:, None]  # (B, 1, W)
        c = self.cond_embed(cond)  # (B, N, W)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, t_emb, c, cond, side, self.grid)
        return self.final_layer(h, c + t_emb)
