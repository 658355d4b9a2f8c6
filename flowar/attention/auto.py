"""``auto`` attention: per call, the cheaper of exact and poly, within the error budget.

For each call the polynomial backend's certificate is computed first (logit half-width
``beta``, degree, ``eps``). If poly cannot certify ``target_error`` (output error per unit
max|V|), exact runs. Otherwise a FLOP model picks the cheaper:

* exact: ``4 * Nq * Nk * d`` (``Q K^T`` and ``A V``; the block-causal pass through SDPA with a
  boolean mask computes the full ``N x N`` product, so ``Nk = N`` there);
* poly: ``2 * (Nq + Nk) * rank`` to build the features plus ``2 * (Nq + Nk) * rank * (d + 1)``
  for the key sums and the query products.

Every call reports a :class:`CallStats` whose ``note`` says which backend ran and why, and logs
it at debug level.

In incremental decoding the state holds both the exact KV cache and the constant-size poly
state (so either may run at any later call); its memory is therefore that of the KV cache. The
poly state's degree is fixed at the first call; if that call cannot be certified, poly stays
off for the rest of the sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from flowar.attention import bounds
from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout
from flowar.attention.exact import ExactAttention, ExactState
from flowar.attention.poly import PolyAttention, PolyState
from flowar.attention.stats import CallStats, report

if TYPE_CHECKING:
    from flowar.config import AttentionConfig

logger = logging.getLogger(__name__)


def exact_flops(queries: int, keys: int, head_dim: int) -> int:
    """Multiply-adds x 2 of softmax attention: ``Q K^T`` and ``A V``."""
    return 4 * queries * keys * head_dim


def poly_flops(queries: int, keys: int, head_dim: int, rank: int) -> int:
    """Features of queries and keys, key sums ``phi_K^T [V, 1]`` and query products."""
    return 2 * (queries + keys) * rank * (head_dim + 2)


@dataclass
class AutoState(AttentionState):
    """Both states, so that either backend can answer any later call.

    Attributes:
        exact: the softmax KV cache.
        poly: the constant-size polynomial state.
        poly_enabled: False once the first call could not certify poly.
    """

    exact: ExactState = field(default_factory=ExactState)
    poly: PolyState = field(default_factory=PolyState)
    poly_enabled: bool = True

    def nbytes(self) -> int:
        return self.exact.nbytes() + self.poly.nbytes()


class AutoAttention(AttentionBackend):
    """Chooses exact or poly per call (see the module docstring).

    Args:
        head_dim: width ``d`` of a head.
        poly: the polynomial backend whose certificate and cost are weighed.
    """

    name = "auto"

    def __init__(self, head_dim: int, poly: PolyAttention) -> None:
        super().__init__(head_dim)
        self.exact = ExactAttention(head_dim)
        self.poly = poly

    @classmethod
    def from_config(cls, config: AttentionConfig, head_dim: int) -> AutoAttention:
        """Build from the model's :class:`~flowar.config.AttentionConfig`."""
        return cls(head_dim, PolyAttention.from_config(config, head_dim))

    def new_state(self) -> AutoState:
        return AutoState()

    def choose(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        layout: BlockLayout | None = None,
        state: AutoState | None = None,
    ) -> tuple[str, str, int | None, float]:
        """Which backend a call should use.

        Returns:
            ``(backend, reason, poly degree or None, beta)``.
        """
        poly_state = state.poly if state is not None else None
        beta = self.poly.call_beta(q, k, scale, poly_state)
        target = self.poly.target_error
        if state is not None and not state.poly_enabled:
            return "exact", "poly disabled since the first call of this sequence", None, beta
        try:
            degree, eps = self.poly.plan_call(
                beta, poly_state.degree if poly_state is not None else None
            )
        except bounds.CertificationError as err:
            return "exact", f"poly cannot certify: {err}", None, beta
        if eps > bounds.eps_for_target(target):
            why = (f"degree {degree} gives bound {bounds.output_bound(eps, 1.0):.3g} per unit "
                   f"max|V| at beta={beta:.4g}, above target {target:g}")
            return "exact", why, degree, beta
        queries = q.shape[-2]
        keys = k.shape[-2] + (state.exact.keys.shape[-2] if state is not None
                              and state.exact.keys is not None else 0)
        rank = bounds.rank(self.head_dim, degree)
        cost_exact = exact_flops(queries, keys, self.head_dim)
        cost_poly = poly_flops(queries, k.shape[-2], self.head_dim, rank)
        why = f"flops exact {cost_exact:.3g} vs poly {cost_poly:.3g} (rank {rank})"
        return ("poly" if cost_poly < cost_exact else "exact"), why, degree, beta

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
        if state is not None and not isinstance(state, AutoState):
            raise TypeError(f"auto attention got a {type(state).__name__}, not an AutoState")
        backend, why, degree, beta = self.choose(q, k, scale, layout, state)
        note = f"auto -> {backend}: {why}"
        logger.debug("attention %s", note)
        if backend == "poly":
            try:
                out, stats = self.poly.attend(
                    q, k, v, scale=scale, layout=layout,
                    state=state.poly if state is not None else None,
                )
            except bounds.CertificationError as err:  # a block the call-level check passed
                backend, degree, note = "exact", None, f"auto -> exact: poly failed: {err}"
                logger.debug("attention %s", note)
            else:
                if state is not None:
                    state.exact.append(k, v)
                report(dataclasses.replace(stats, note=note))
                return out
        if state is not None:
            if state.poly_enabled and degree is None and state.poly.degree is None:
                state.poly_enabled = False  # the first call could not certify: no poly state
            if state.poly_enabled:
                self.poly.absorb(k, v, state.poly, degree)
        out = self.exact(q, k, v, scale=scale, layout=layout,
                         state=state.exact if state is not None else None, dropout_p=dropout_p)
        keys = (state.exact.keys.shape[-2] if state is not None
                else layout.total if layout is not None else k.shape[-2])
        report(CallStats("exact", tokens=q.shape[-2], keys=keys, beta=beta, note=note))
        return out
