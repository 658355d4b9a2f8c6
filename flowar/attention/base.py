"""The one attention interface every FlowAR attention call goes through.

A backend receives queries, keys and values that are already split into heads and rotated
(RoPE is the model's business), plus one of three structures:

* ``layout`` (a :class:`BlockLayout`): teacher-forced block-causal attention over all scales,
  query tokens of block ``b`` see every key of blocks ``<= b``;
* ``state`` (a backend-specific :class:`AttentionState`): incremental decoding, the new block's
  queries see every key seen so far plus the new block's keys; the backend updates ``state``;
* neither: plain unmasked attention (the flow head, which works inside one scale).

States are created by :meth:`AttentionBackend.new_state` and owned by the caller (the sampling
loop), never stored on the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """Sizes of the consecutive blocks (scales) of a block-causal sequence.

    Args:
        lengths: number of tokens in each block, in sequence order.
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"block lengths must be positive, got {self.lengths}")

    @property
    def total(self) -> int:
        """Total number of tokens."""
        return sum(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start index of every block, followed by the total length."""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        return tuple(starts)

    def block_ids(self, device: torch.device | None = None) -> torch.Tensor:
        """Block index of every token, shape (N,)."""
        sizes = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), sizes)

    def allowed(self, device: torch.device | None = None) -> torch.Tensor:
        """Boolean (N, N) matrix, True where query i may attend key j (block(j) <= block(i))."""
        ids = self.block_ids(device)
        return ids[None, :] <= ids[:, None]


class AttentionState:
    """Base class of the per-layer state a backend keeps between incremental calls."""

    def nbytes(self) -> int:
        """Memory held by the state's tensors, in bytes."""
        return 0


class AttentionBackend(nn.Module):
    """Computes softmax attention (or an approximation of it) for one attention layer.

    Subclasses implement :meth:`forward` for the three cases described in the module docstring.
    """

    name: ClassVar[str] = "base"

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def new_state(self) -> AttentionState:
        """A fresh, empty incremental-decoding state for this layer."""
        raise NotImplementedError

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
        """Attention output.

        Args:
            q: queries (B, H, Nq, d).
            k: keys (B, H, Nk, d).
            v: values (B, H, Nk, d).
            scale: logit scale (1/sqrt(d) for standard attention).
            layout: block-causal structure of the sequence (teacher-forced pass).
            state: incremental state, updated in place with ``k`` and ``v``.
            dropout_p: attention dropout (training only; backends may ignore it).

        Returns:
            (B, H, Nq, d) attention output.
        """
        raise NotImplementedError


def default_scale(head_dim: int) -> float:
    """The standard 1/sqrt(d) logit scale."""
    return 1.0 / math.sqrt(head_dim)
