"""Exact softmax attention through PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout


@dataclass
class ExactState(AttentionState):
    """Softmax KV cache: every key and value seen so far, (B, H, P, d) each."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new block's keys and values; return all keys and values."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class ExactAttention(AttentionBackend):
    """Softmax attention: SDPA with a boolean block-causal mask, or over a KV cache."""

    name = "exact"

    def new_state(self) -> ExactState:
        return ExactState()

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
        mask = None
        if state is not None:
            if not isinstance(state, ExactState):
                raise TypeError(f"exact attention got a {type(state).__name__}, not an ExactState")
            # The cache holds exactly the keys the block-causal mask allows: no mask needed.
            k, v = state.append(k, v)
        elif layout is not None:
            if layout.total != q.shape[-2]:
                raise ValueError(f"layout covers {layout.total} tokens, queries have {q.shape[-2]}")
            mask = layout.allowed(q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
