"""Certified error bounds of polynomial approximations of exp (theory brief, sections 3.2-3.5).

The polynomial method replaces every attention weight ``exp(x)``, ``x = scale * q.k``, by a
degree-``g`` polynomial ``P(x)``. If every logit lies in ``[-beta, beta]`` and

    eps = max_{|x| <= beta} |P(x) - e^x| / e^x        (worst-case *relative* error)

is below 1, then every approximate weight is within a factor ``1 +- eps`` of the exact one, the
denominators stay positive, and the attention output is off by at most
``2 * eps / (1 - eps) * max|V|`` (:func:`output_bound`).

Two families are supported:

* ``"taylor"``: ``P(x) = sum_{j<=g} x^j / j!`` (coefficients positive: symmetric features).
* ``"chebyshev"``: interpolation of ``e^x`` at the ``g + 1`` Chebyshev nodes of ``[-beta, beta]``
  (not a least-squares fit); its coefficients can have either sign (asymmetric features) and
  depend on ``beta``.

Every ``eps`` returned here is an upper bound on the true maximum, never below it; the argument
is in :func:`taylor_relative_error` and :func:`certified_relative_error`. To keep per-call cost
low, ``beta`` is first rounded *up* to a geometric grid with 1.1 % steps (:func:`quantize_beta`),
which keeps the bound valid (the interval only grows) and lets results be cached.
"""

from __future__ import annotations

import decimal
import functools
import math

import numpy as np
from numpy.polynomial import chebyshev as npcheb
from numpy.polynomial import polynomial as nppoly

from flowar.errors import UserError

KINDS = ("taylor", "chebyshev")

# Below this half-width every polynomial here is essentially exact; flooring avoids a
# degenerate Chebyshev fit on a zero-length interval.
MIN_BETA = 2.0**-10
# beta is rounded up to 2^(n / BETA_STEPS) so bounds can be cached (a few thousand values).
BETA_STEPS = 64

_U64 = float(np.finfo(np.float64).eps)


class CertificationError(UserError):
    """No allowed polynomial degree certifies the requested error at this logit range."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"polynomial kind must be one of {KINDS}, got {kind!r}")


def quantize_beta(beta: float) -> float:
    """``beta`` rounded up to the grid ``2^(n / 64)`` (steps of 1.1 %), at least
    :data:`MIN_BETA`; idempotent, and never below ``beta``."""
    if not math.isfinite(beta):
        return math.inf
    beta = max(float(beta), MIN_BETA)
    n = math.ceil(BETA_STEPS * math.log2(beta) - 1e-9)
    q = 2.0 ** (n / BETA_STEPS)
    if q < beta:
        q = 2.0 ** ((n + 1) / BETA_STEPS)
    return q


def rank(head_dim: int, degree: int) -> int:
    """Feature dimension C(d + g, g): monomials of degree <= g in d variables."""
    return math.comb(head_dim + degree, degree)


def output_bound(eps: float, vmax: float, positive: bool = True) -> float:
    """Certified bound on ``max |approx output - exact output|``.

    With relative weight error ``eps < 1``: ``2 * eps / (1 - eps) * vmax`` (theory brief 3.2,
    step 6). Whenever every approximate weight is positive, both outputs are convex combinations
    of the same values, so ``2 * vmax`` also bounds the error; the smaller of the two is returned.
    Without positivity there is no bound (``inf``).
    """
    if not positive:
        return math.inf
    if eps < 1.0:
        return min(2.0 * eps / (1.0 - eps), 2.0) * vmax
    return 2.0 * vmax


def eps_for_target(target: float) -> float:
    """Largest ``eps`` with ``2 * eps / (1 - eps) <= target`` (the output error per unit max|V|)."""
    return target / (2.0 + target)


# --------------------------------------------------------------------------------------------
# Coefficients


@functools.lru_cache(maxsize=256)
def _taylor_coefficients(degree: int) -> tuple[float, ...]:
    return tuple(1.0 / math.factorial(j) for j in range(degree + 1))


@functools.lru_cache(maxsize=16384)
def _chebyshev_coefficients(beta: float, degree: int) -> tuple[float, ...]:
    # Interpolate e^(beta t) at the Chebyshev nodes of [-1, 1], then map t = x / beta.
    j = np.arange(degree + 1)
    nodes = np.cos((2 * j + 1) * np.pi / (2 * (degree + 1)))
    with np.errstate(over="ignore", invalid="ignore"):  # huge beta: inf coefficients, eps = inf
        cheb = npcheb.chebfit(nodes, np.exp(beta * nodes), degree)
        power_t = npcheb.cheb2poly(cheb)
        power_x = power_t / beta ** np.arange(degree + 1)
    return tuple(float(a) for a in power_x)


def coefficients(beta: float, degree: int, kind: str) -> np.ndarray:
    """Power-basis coefficients ``a_0..a_g`` (float64) of ``P(x) = sum_j a_j x^j``.

    ``beta`` matters only for ``"chebyshev"``, where the fit is on ``[-quantize_beta(beta),
    quantize_beta(beta)]``.
    """
    _check_kind(kind)
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if kind == "taylor":
        return np.array(_taylor_coefficients(degree))
    return np.array(_chebyshev_coefficients(quantize_beta(beta), degree))


# --------------------------------------------------------------------------------------------
# Certified relative errors


@functools.lru_cache(maxsize=16384)
def _taylor_eps_exact(beta: float, degree: int) -> float:
    digits = 60 + math.ceil(2.0 * beta / math.log(10.0))
    with decimal.localcontext() as ctx:
        ctx.prec = digits
        ctx.Emax = decimal.MAX_EMAX
        b = decimal.Decimal(beta)  # exact binary value of the float
        worst = decimal.Decimal(0)
        for x in (b, -b):
            term, total = decimal.Decimal(1), decimal.Decimal(1)
            for j in range(1, degree + 1):
                term = term * x / j
                total += term
            worst = max(worst, abs(1 - total * (-x).exp()))
    # ``digits`` exceeds the cancellation in P(-beta) e^beta (about 2 beta / ln 10 digits) by
    # 60, so the decimal value is correct to far better than a float's ulp. Add the float64
    # evaluation allowance used for every polynomial, then round up.
    return math.nextafter(float(worst) + _float_slack(_taylor_coefficients(degree), beta),
                          math.inf)


def _float_slack(coeffs, beta: float) -> float:
    """Allowance for evaluating ``P(x) e^{-x} - 1`` in float64 on ``[-beta, beta]``: a Horner
    rounding bound ``4 (g + 4) u sum_j |a_j| beta^j e^beta`` (inflated by a factor 4)."""
    a = np.abs(np.asarray(coeffs, dtype=np.float64))
    powers = float(beta) ** np.arange(len(a))
    return 4.0 * (len(a) + 3) * _U64 * float(np.sum(a * powers)) * math.exp(beta)


def taylor_relative_error(beta: float, degree: int) -> float:
    """Exact (rounded-up) worst-case relative error of the degree-``g`` Taylor polynomial.

    Argument: let ``f(x) = 1 - P_g(x) e^{-x}``, the signed relative error. Since
    ``P_g' = P_{g-1}``, ``f'(x) = e^{-x} (P_g(x) - P_{g-1}(x)) = e^{-x} x^g / g!``, which has a
    constant sign on ``[0, beta]`` and on ``[-beta, 0]``, and ``f(0) = 0``. So ``|f|`` grows
    monotonically away from 0 on each side, and the maximum over ``[-beta, beta]`` is
    ``max(|f(beta)|, |f(-beta)|)``. Both are evaluated in decimal arithmetic with enough digits
    to absorb the cancellation in ``P_g(-beta)``; the float64 evaluation allowance of
    :func:`certified_relative_error` is added (so the bound also covers the rounding of a float64
    evaluation) and the sum rounded up. ``beta`` is first rounded up by :func:`quantize_beta`,
    which can only increase the result.
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    beta = quantize_beta(beta)
    if beta > 750.0:  # |1 - P(-beta) e^beta| is beyond float range; inf is a valid bound
        return math.inf
    return _taylor_eps_exact(beta, degree)


def certified_relative_error(coeffs: np.ndarray, beta: float) -> float:
    """An upper bound on ``max_{|x|<=beta} |P(x) e^{-x} - 1|`` for any power-basis ``P``.

    Argument: let ``r(x) = P(x) e^{-x} - 1``; then ``r'' = e^{-x} (P'' - 2 P' + P)``, so
    ``|r''| <= M = e^beta * sum_j |c_j| beta^j`` with ``c`` the coefficients of ``P'' - 2P' + P``.
    On a uniform grid of spacing ``h``, the linear interpolant of ``r`` between two nodes is
    bounded by the larger node value and differs from ``r`` by at most ``M h^2 / 8``, so
    ``max |r| <= (grid max) + M h^2 / 8``. The grid is refined until that margin is below 1% of
    the grid max (or 2^20 points). A floating-point allowance of ``4 (g + 4) u S e^beta`` with
    ``S = sum_j |a_j| beta^j`` (a standard Horner rounding bound, inflated) covers the rounding
    of the grid evaluation, and the sum is rounded up.
    """
    a = np.asarray(coeffs, dtype=np.float64)
    if beta > 700.0 or not np.all(np.isfinite(a)):  # e^beta overflows: nothing certified
        return math.inf
    degree = len(a) - 1
    powers = float(beta) ** np.arange(degree + 1)
    c = nppoly.polyadd(nppoly.polysub(nppoly.polyder(a, 2), 2.0 * nppoly.polyder(a)), a)
    curvature = math.exp(beta) * float(np.sum(np.abs(c) * powers[: len(c)]))
    slack = _float_slack(a, beta)
    n = 4097
    while True:
        x = np.linspace(-beta, beta, n)
        grid_max = float(np.max(np.abs(nppoly.polyval(x, a) * np.exp(-x) - 1.0)))
        margin = curvature * (2.0 * beta / (n - 1)) ** 2 / 8.0
        if margin <= 0.01 * grid_max or n > 2**20:
            break
        n = 4 * n - 3
    total = grid_max + margin + slack
    if not math.isfinite(total):
        return math.inf
    return math.nextafter(total, math.inf)


@functools.lru_cache(maxsize=16384)
def _chebyshev_eps(beta: float, degree: int) -> float:
    return certified_relative_error(np.array(_chebyshev_coefficients(beta, degree)), beta)


def relative_error(beta: float, degree: int, kind: str) -> float:
    """Certified worst-case relative error ``eps(beta, g)`` of :func:`coefficients` on
    ``[-beta, beta]`` (never below the true maximum; ``inf`` when nothing can be certified)."""
    _check_kind(kind)
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if kind == "taylor":
        return taylor_relative_error(beta, degree)
    return _chebyshev_eps(quantize_beta(beta), degree)


def positive_on_interval(beta: float, degree: int, kind: str) -> bool:
    """True when ``P > 0`` on ``[-beta, beta]`` is certified, so every denominator is positive.

    Even-degree Taylor polynomials of exp have no real root. Otherwise positivity follows from
    ``eps < 1`` (``P(x) >= (1 - eps) e^x``). For odd Taylor degrees this is also necessary:
    ``P_g(-beta) <= 0`` exactly when ``eps >= 1``, so odd degrees are refused past their root.
    """
    if kind == "taylor" and degree % 2 == 0:
        return True
    return relative_error(beta, degree, kind) < 1.0


def choose_degree(beta: float, target: float, kind: str, max_degree: int) -> int:
    """Smallest degree ``g <= max_degree`` whose certified output bound per unit max|V|,
    ``2 eps / (1 - eps)``, is at most ``target``.

    Raises:
        CertificationError: no degree up to ``max_degree`` meets the target; the message names
            ``beta`` and the target.
    """
    _check_kind(kind)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    limit = eps_for_target(target)
    best = math.inf
    for degree in range(1, max_degree + 1):
        eps = relative_error(beta, degree, kind)
        if eps <= limit:
            return degree
        best = min(best, output_bound(eps, 1.0, positive_on_interval(beta, degree, kind)))
    raise CertificationError(
        f"no {kind} polynomial of degree <= {max_degree} certifies attention output error "
        f"{target:g} (per unit max|V|) at logit half-width beta = {beta:.4g}; the best bound is "
        f"{best:.3g}. Bound the logits (qk_norm with a smaller logit_scale), allow a larger "
        "max_degree, raise target_error, or use the exact backend."
    )
