"""Polynomial-method attention (Alman-Song) with a certified error bound per call.

Every weight ``exp(scale * q.k)`` is replaced by a degree-``g`` polynomial ``P`` of the logit
(:mod:`flowar.attention.bounds`). By the multinomial theorem,

    P(scale * q.k) = sum_{|alpha| <= g} w_alpha q^alpha k^alpha,
    w_alpha = a_{|alpha|} * scale^{|alpha|} * multinomial(|alpha|; alpha),

so ``P(scale * Q K^T) = phi_Q(Q) phi_K(K)^T`` with explicit feature maps of rank
``C(d + g, g)`` (the monomials of degree ``<= g`` of a ``d``-vector). With non-negative
coefficients both sides get ``sqrt(w) * monomials`` (symmetric form); otherwise the weights go on
the query side (asymmetric form). Attention is then evaluated without the ``N x N`` matrix:
``out = phi_Q (phi_K^T [V, 1])``, split into numerator and denominator, in ``O(N * rank * d)``.

The three call modes of :mod:`flowar.attention.base` (theory brief, section 4):

* block-causal (teacher forcing): per-block sums ``H_b = phi_K(K_b)^T [V_b, 1]`` and an
  inclusive prefix over blocks; queries of block ``b`` read the prefix up to ``b``. Each block
  is certified on its own (its queries against the keys it sees), exactly as the incremental
  call for that block would be, so both modes use the same polynomials;
* incremental: the state is the running ``sum m(k) [v, 1]^T`` over every key seen (``m`` the
  unweighted monomials, weights applied on the query side so the polynomial may change between
  calls), plus the running max key norm and max ``|v|``: ``O(rank * d)`` memory per head;
* unmasked (flow head): the plain factorised form.

Each block of a call computes ``beta = scale * max ||q|| * max ||k||`` per (batch item, head)
over the keys it uses (then the maximum over batch items and heads), the polynomial's certified
relative error ``eps`` on ``[-beta, beta]`` and the output bound ``2 eps / (1 - eps) * max |V|``;
the call reports its worst block as a :class:`CallStats` and logs it at debug level.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowar.attention import bounds
from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout
from flowar.attention.stats import CallStats, report

if TYPE_CHECKING:
    from flowar.config import AttentionConfig

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Monomial feature maps


@dataclass(frozen=True)
class MonomialPlan:
    """How to build every monomial of degree ``<= g`` in ``d`` variables incrementally.

    The degree-``j`` monomials are the non-decreasing index tuples ``(i_1 <= ... <= i_j)``; each
    is its parent (the tuple without its last index) times ``x[i_j]``.

    Attributes:
        head_dim, degree: ``d`` and ``g``.
        parents: per degree ``j >= 1``, index of each monomial's parent among degree ``j - 1``.
        coords: per degree ``j >= 1``, the coordinate each monomial multiplies its parent by.
        degrees: (rank,) total degree of every monomial, in feature order.
        multinomials: (rank,) multinomial coefficient ``|alpha|! / prod(alpha_i!)``.
    """

    head_dim: int
    degree: int
    parents: tuple[torch.Tensor, ...]
    coords: tuple[torch.Tensor, ...]
    degrees: np.ndarray
    multinomials: np.ndarray

    @property
    def rank(self) -> int:
        return len(self.degrees)


@functools.lru_cache(maxsize=64)
def monomial_plan(head_dim: int, degree: int) -> MonomialPlan:
    """The (cached) :class:`MonomialPlan` for ``d = head_dim`` and ``g = degree``."""
    # previous[combo] = (index, multinomial, multiplicity of the last index) for degree j - 1
    previous = {(): (0, 1.0, 0)}
    parents, coords, degrees, multinomials = [], [], [0], [1.0]
    for j in range(1, degree + 1):
        current, par, crd = {}, [], []
        for combo in itertools.combinations_with_replacement(range(head_dim), j):
            index, coef, last = previous[combo[:-1]]
            # one more factor x_i: multinomial j!/prod(alpha!) gains j / alpha_i
            mult = last + 1 if j > 1 and combo[-2] == combo[-1] else 1
            current[combo] = (len(current), coef * j / mult, mult)
            par.append(index)
            crd.append(combo[-1])
            multinomials.append(coef * j / mult)
            degrees.append(j)
        parents.append(torch.tensor(par, dtype=torch.long))
        coords.append(torch.tensor(crd, dtype=torch.long))
        previous = current
    plan = MonomialPlan(
        head_dim, degree, tuple(parents), tuple(coords), np.array(degrees), np.array(multinomials)
    )
    assert plan.rank == bounds.rank(head_dim, degree)
    return plan


def monomials(x: torch.Tensor, plan: MonomialPlan) -> torch.Tensor:
    """All monomials of degree ``<= g`` of the last dimension: (..., N, d) -> (..., N, rank).

    Built feature-major, (..., rank, N) in memory (gathering whole rows is several times faster
    than gathering along the last dimension); the result is a transposed view.
    """
    xt = x.transpose(-1, -2).contiguous()  # (..., d, N)
    level = torch.ones(*xt.shape[:-2], 1, xt.shape[-1], dtype=x.dtype, device=x.device)
    out = [level]
    for par, crd in zip(plan.parents, plan.coords):
        # rows of degree j: (..., n_{j-1}, N) gathered to (..., n_j, N), times one coordinate
        level = level[..., par.to(x.device), :] * xt[..., crd.to(x.device), :]
        out.append(level)
    return torch.cat(out, dim=-2).transpose(-1, -2)  # (..., N, rank)


def feature_weights(coeffs: np.ndarray, scale: float, plan: MonomialPlan) -> np.ndarray:
    """``w_alpha = a_{|alpha|} scale^{|alpha|} multinomial(alpha)`` for every monomial (float64)."""
    a = np.asarray(coeffs, dtype=np.float64)
    return a[plan.degrees] * float(scale) ** plan.degrees * plan.multinomials


def poly_features(
    q: torch.Tensor, k: torch.Tensor, coeffs: np.ndarray, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps with ``phi_Q(q) . phi_K(k) = P(scale * q.k)``, P given by ``coeffs``.

    Symmetric (``sqrt(w)`` on both sides) when every coefficient is non-negative, asymmetric
    (``w`` on the query side) otherwise.

    Args:
        q: (..., Nq, d) queries.
        k: (..., Nk, d) keys.
        coeffs: power-basis coefficients ``a_0..a_g``.
        scale: logit scale.

    Returns:
        ``phi_Q`` (..., Nq, rank) and ``phi_K`` (..., Nk, rank), rank = C(d + g, g).
    """
    plan = monomial_plan(q.shape[-1], len(coeffs) - 1)
    w = feature_weights(coeffs, scale, plan)
    if np.all(w >= 0):
        root = torch.as_tensor(np.sqrt(w), dtype=q.dtype, device=q.device)
        return monomials(q, plan) * root, monomials(k, plan) * root
    w_t = torch.as_tensor(w, dtype=q.dtype, device=q.device)
    return monomials(q, plan) * w_t, monomials(k, plan)


# --------------------------------------------------------------------------------------------
# The backend


@dataclass
class PolyState(AttentionState):
    """Constant-size incremental state of one polynomial attention layer.

    Attributes:
        degree: degree of the stored monomials (fixed by the first call).
        sums: (B, H, rank, d + 1): ``sum_j m(k_j) [v_j, 1]^T`` over every key seen, ``m`` the
            unweighted monomials; the last column is ``sum_j m(k_j)``.
        key_norm: (B, H) running max key norm (float64), for the certified ``beta``.
        value_max: (B, H) running max ``|v|`` (float64), for the output bound.
        keys: number of keys seen.
    """

    degree: int | None = None
    sums: torch.Tensor | None = None
    key_norm: torch.Tensor | None = None
    value_max: torch.Tensor | None = None
    keys: int = 0

    def nbytes(self) -> int:
        tensors = (self.sums, self.key_norm, self.value_max)
        return sum(t.nbytes for t in tensors if t is not None)


@dataclass
class HeadPlan:
    """The certified polynomial of one block for every (batch item, head).

    Attributes:
        beta, degree, eps, bound: worst over (batch item, head): half-width (rounded up), degree,
            relative error and output bound.
        weights: (B, H, rank) query-side feature weights ``w_alpha`` (float64), zero beyond each
            (batch item, head)'s own degree; ``rank`` is that of ``degree``.
    """

    beta: float
    degree: int
    eps: float
    bound: float
    weights: np.ndarray


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class PolyAttention(AttentionBackend):
    """Polynomial-method attention with a certified output error bound.

    Args:
        head_dim: width ``d`` of a head.
        degree: polynomial degree, or ``"auto"`` for the smallest degree whose certified output
            bound per unit max|V| meets ``target_error`` at each call's ``beta``.
        kind: ``"taylor"`` or ``"chebyshev"``.
        target_error: target for ``degree="auto"``.
        max_degree: largest degree ``"auto"`` may pick.
    """

    name = "poly"

    def __init__(
        self,
        head_dim: int,
        degree: int | str = 2,
        kind: str = "taylor",
        target_error: float = 1e-3,
        max_degree: int = 8,
    ) -> None:
        super().__init__(head_dim)
        if degree != "auto" and not (isinstance(degree, int) and degree >= 1):
            raise ValueError(f"degree must be a positive integer or 'auto', got {degree!r}")
        if kind not in bounds.KINDS:
            raise ValueError(f"kind must be one of {bounds.KINDS}, got {kind!r}")
        self.degree = degree
        self.kind = kind
        self.target_error = target_error
        self.max_degree = max_degree

    @classmethod
    def from_config(cls, config: AttentionConfig, head_dim: int) -> PolyAttention:
        """Build from the model's :class:`~flowar.config.AttentionConfig`."""
        return cls(
            head_dim,
            degree=config.degree,
            kind=config.polynomial,
            target_error=config.target_error,
            max_degree=config.max_degree,
        )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, degree={self.degree}, kind={self.kind}"

    def new_state(self) -> PolyState:
        return PolyState()

    # -- degree and certificate ----------------------------------------------------------------

    def plan_call(self, beta: float, max_degree: int | None = None) -> tuple[int, float]:
        """Degree and certified ``eps`` for logit half-width ``beta``.

        Args:
            beta: logit half-width.
            max_degree: degree of the monomials an incremental state already holds; no larger
                degree can be used.

        Raises:
            CertificationError: ``degree="auto"`` cannot meet the target (within
                ``max_degree``), or the polynomial is not certified positive on
                ``[-beta, beta]`` (odd Taylor degree past its root, Chebyshev fit with
                ``eps >= 1``), so denominators could be ``<= 0``.
        """
        if self.degree == "auto":
            degree = bounds.choose_degree(beta, self.target_error, self.kind, self.max_degree)
            if max_degree is not None and degree > max_degree:
                raise bounds.CertificationError(
                    f"degree='auto' fixed degree {max_degree} at the first incremental call, but "
                    f"this call has logit half-width beta = {beta:.4g}, which needs degree "
                    f"{degree} to certify output error {self.target_error:g}. Use a fixed "
                    "degree, bound the logits (qk_norm), or use the exact or auto backend."
                )
        else:
            degree = int(self.degree)
        eps = bounds.relative_error(beta, degree, self.kind)
        if not bounds.positive_on_interval(beta, degree, self.kind):
            raise bounds.CertificationError(
                f"the degree-{degree} {self.kind} polynomial of exp is not certified positive on "
                f"[-beta, beta] with beta = {beta:.4g} (relative error {eps:.3g} >= 1), so "
                "attention denominators could be zero or negative. Use an even Taylor degree, "
                "bound the logits (qk_norm), or use the exact backend."
            )
        return degree, eps

    def plan_heads(
        self,
        beta: np.ndarray,
        value_max: np.ndarray,
        scale: float,
        max_degree: int | None = None,
    ) -> HeadPlan:
        """Certify one block for every (batch item, head).

        Args:
            beta: (B, H) logit half-widths of the block.
            value_max: (B, H) max ``|v|`` over the keys the block sees.
            scale: logit scale.
            max_degree: as in :meth:`plan_call`.
        """
        betas = np.vectorize(bounds.quantize_beta, otypes=[np.float64])(beta)
        unique, inverse = np.unique(betas, return_inverse=True)
        plans = [self.plan_call(float(b), max_degree) for b in unique]
        degrees = np.array([g for g, _ in plans])
        eps = np.array([e for _, e in plans])[inverse].reshape(beta.shape)
        top = int(degrees.max())
        plan = monomial_plan(self.head_dim, top)
        weights = np.zeros((len(unique), plan.rank))
        for i, (b, (g, _)) in enumerate(zip(unique, plans)):
            coeffs = np.zeros(top + 1)
            coeffs[: g + 1] = bounds.coefficients(float(b), g, self.kind)  # degree-g part only
            weights[i] = feature_weights(coeffs, scale, plan)
        bound = max(
            bounds.output_bound(float(e), float(m)) for e, m in zip(eps.ravel(), value_max.ravel())
        )
        return HeadPlan(
            beta=float(betas.max()), degree=top, eps=float(eps.max()), bound=bound,
            weights=weights[inverse].reshape(*beta.shape, plan.rank),
        )

    # -- forward -------------------------------------------------------------------------------

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
        out, stats = self.attend(q, k, v, scale=scale, layout=layout, state=state)
        report(stats)
        logger.debug(
            "poly attention: %d queries x %d keys, beta=%.4g, degree=%d, rank=%d, eps=%.3g, "
            "bound=%.3g", stats.tokens, stats.keys, stats.beta, stats.degree, stats.rank,
            stats.eps, stats.bound,
        )
        return out

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        layout: BlockLayout | None = None,
        state: AttentionState | None = None,
    ) -> tuple[torch.Tensor, CallStats]:
        """:meth:`forward` without reporting: the output and the call's :class:`CallStats`.

        The stats hold the worst block of the call: largest ``beta``, degree and ``eps``, and
        the largest per-block bound.
        """
        if state is not None and not isinstance(state, PolyState):
            raise TypeError(f"poly attention got a {type(state).__name__}, not a PolyState")
        if layout is not None:
            if layout.total != q.shape[-2] or layout.total != k.shape[-2]:
                raise ValueError(f"layout covers {layout.total} tokens, queries have "
                                 f"{q.shape[-2]} and keys {k.shape[-2]}")
            offsets = layout.offsets
            spans = [(s, e, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
        else:
            spans = [(0, q.shape[-2], 0, k.shape[-2])]
        out_dtype = v.dtype
        dtype = compute_dtype(q)
        # NOTE: autocast off so every sum and denominator accumulates in fp32 (or fp64).
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            out, stats = self._run_blocks(q, k, v, scale, spans, state)
        return out.to(out_dtype), stats

    def call_beta(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, state: PolyState | None = None
    ) -> float:
        """Logit half-width of a whole call, ``scale * max ||q|| * max ||k||`` maximised over
        (batch item, head), the keys including those already in ``state``. It bounds every
        block's own half-width (used by the ``auto`` backend to decide)."""
        key_norm = k.detach().double().norm(dim=-1).amax(dim=-1)  # (B, H)
        if state is not None and state.key_norm is not None:
            key_norm = torch.maximum(key_norm, state.key_norm.to(key_norm.device))
        query_norm = q.detach().double().norm(dim=-1).amax(dim=-1)  # (B, H)
        return math.nextafter(abs(scale) * float((query_norm * key_norm).max()), math.inf)

    def _run_blocks(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        spans: list[tuple[int, int, int, int]],
        state: PolyState | None,
    ) -> tuple[torch.Tensor, CallStats]:
        """The one evaluation loop of all three modes.

        ``spans[b] = (q_start, q_end, k_start, k_end)``: the queries of block ``b`` see the keys
        of spans ``<= b`` plus every key already in ``state``. Each block gets its own certified
        ``beta_b`` (its queries against the keys it sees), hence its own polynomial: exactly what
        an incremental call for that block computes, so later blocks never change earlier ones.
        """
        # 1. Certify every block, per (batch item, head), before touching the state.
        query_norm = q.detach().double().norm(dim=-1)  # (B, H, Nq)
        key_norm_tok = k.detach().double().norm(dim=-1)  # (B, H, Nk)
        value_abs = v.detach().double().abs().amax(dim=-1)  # (B, H, Nk)
        key_norm = state.key_norm if state is not None else None  # (B, H) running maxima
        value_max = state.value_max if state is not None else None
        held = state.degree if state is not None else None
        plans = []
        for qs, qe, ks, ke in spans:
            key_norm = _running_max(key_norm, key_norm_tok[..., ks:ke])
            value_max = _running_max(value_max, value_abs[..., ks:ke])
            beta = abs(scale) * _running_max(None, query_norm[..., qs:qe]) * key_norm  # (B, H)
            plans.append(self.plan_heads(
                beta.cpu().numpy(), value_max.cpu().numpy(), scale, held
            ))
        top = held if held is not None else max(p.degree for p in plans)
        plan = monomial_plan(self.head_dim, top)

        # 2. Symmetric features when one non-negative polynomial serves every block and head
        #    (never with a state: it keeps unweighted key monomials so the polynomial may change
        #    between calls).
        first = plans[0].weights
        symmetric = (
            state is None
            and all(p.weights.shape == first.shape and np.array_equal(p.weights, first)
                    for p in plans)
            and bool(np.all(first >= 0))
            and bool(np.all(first == first[:1, :1]))  # same for every batch item and head
        )
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, Nk, d + 1)
        fk = monomials(k, plan)  # (B, H, Nk, rank_top)
        if symmetric:
            root = torch.as_tensor(np.sqrt(first), dtype=q.dtype, device=q.device)[:, :, None]
            fk = fk * root  # root: (B, H, 1, rank)

        # 3. Per-block key sums, inclusive prefix over blocks, queries read their prefix.
        prefix = state.sums if state is not None else None  # (B, H, rank, d + 1)
        outputs = []
        for (qs, qe, ks, ke), head_plan in zip(spans, plans):
            block_sum = fk[..., ks:ke, :].transpose(-1, -2) @ v1[..., ks:ke, :]
            prefix = block_sum if prefix is None else prefix + block_sum.to(prefix.dtype)
            rank = head_plan.weights.shape[-1]
            fq = monomials(q[..., qs:qe, :], monomial_plan(self.head_dim, head_plan.degree))
            if symmetric:
                fq = fq * root
            else:
                w = torch.as_tensor(head_plan.weights, dtype=q.dtype, device=q.device)
                fq = fq * w[:, :, None]  # w: (B, H, 1, rank)
            outputs.append(fq @ prefix[..., :rank, :].to(q.dtype))  # (B, H, N_b, d + 1)
        out = split_normalise(torch.cat(outputs, dim=-2))

        if state is not None:
            state.degree, state.sums = top, prefix
            state.key_norm, state.value_max = key_norm, value_max
            state.keys += k.shape[-2]
            keys = state.keys
        else:
            keys = k.shape[-2]
        stats = CallStats(
            backend=self.name, tokens=q.shape[-2], keys=keys, beta=max(p.beta for p in plans),
            degree=top, rank=plan.rank, eps=max(p.eps for p in plans),
            bound=max(p.bound for p in plans),
        )
        return out, stats

    def absorb(
        self, k: torch.Tensor, v: torch.Tensor, state: PolyState, degree: int | None = None
    ) -> None:
        """Add keys and values (B, H, N, d) to ``state`` without answering queries.

        ``degree`` fixes the state's degree on its first use; afterwards the state's is used.
        """
        if state.degree is None:
            if degree is None:
                raise ValueError("the first absorb into an empty PolyState needs a degree")
            state.degree = degree
        dtype = compute_dtype(k)
        with torch.autocast(device_type=k.device.type, enabled=False):
            k, v = k.to(dtype), v.to(dtype)
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, N, d + 1)
            plan = monomial_plan(self.head_dim, state.degree)
            update = monomials(k, plan).transpose(-1, -2) @ v1  # (B, H, rank, d + 1)
            state.key_norm = _running_max(state.key_norm, k.detach().double().norm(dim=-1))
            state.value_max = _running_max(state.value_max, v.detach().double().abs().amax(-1))
        state.sums = update if state.sums is None else state.sums + update.to(state.sums.dtype)
        state.keys += k.shape[-2]


def _running_max(running: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Max of ``running`` (B, H) and ``new`` (B, H, n) over its last dimension."""
    new = new.amax(dim=-1) if new.shape[-1] else new.new_zeros(new.shape[:-1])
    return new if running is None else torch.maximum(running.to(new.device), new)


def split_normalise(numerator_denominator: torch.Tensor) -> torch.Tensor:
    """Split (..., d + 1) into numerator (..., d) / denominator (..., 1)."""
    num, den = numerator_denominator[..., :-1], numerator_denominator[..., -1:]
    # NOTE: a certified-positive polynomial gives den > 0 in exact arithmetic; the clamp only
    # guards against rounding when den underflows, so outputs stay finite.
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)
