"""Circuit accounting as n grows: depth vectors, size counts, fitted degree, TC0 conditions.

:func:`circuit_sweep` traces one computation per n (see :mod:`flowar.analysis.targets` for
FlowAR inference) and checks the conditions of the TC0 theorem (theory brief section 2.7):

* the number of scales K and of flow steps T must not grow with n (otherwise the depth grows
  like log n, or faster: not TC0);
* the depth vector must be the same for every n;
* the precision p(n) must be at most polynomial in n (R7);
* widths must not grow faster than n;
* every operator must be classified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flowar.analysis.circuit import PRIMITIVES, TOTAL_KEYS, CircuitCount, trace_circuit
from flowar.analysis.targets import Case

logger = logging.getLogger(__name__)

PRECISION_RULES = ("const", "poly", "exp")


def precision_bits(rule: str, n: int, const: int = 52) -> int:
    """Fraction bits p(n) assumed by the circuit: constant, linear in n, or 2^n (super-poly)."""
    if rule == "const":
        return const
    if rule == "poly":
        return n
    if rule == "exp":
        return 2**n
    raise ValueError(f"precision rule must be one of {PRECISION_RULES}, got {rule!r}")


@dataclass
class SweepPoint:
    """The count at one n."""

    n: int
    scales: tuple[int, ...]
    steps: int
    widths: dict[str, int]
    precision_bits: int
    count: CircuitCount
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_scales(self) -> int:
        return len(self.scales)


@dataclass(frozen=True)
class Flag:
    """A failed condition of the TC0 theorem, or a caveat of the count."""

    code: str
    message: str


@dataclass
class PolynomialFit:
    """size(n) ~ sum_k coefficients[k] * n^k.

    Attributes:
        exponents, coefficients: the monomials used and their (non-negative) coefficients.
        degree: highest exponent with a non-zero coefficient.
        leading: coefficient of n^degree.
        residual: max relative misfit over the points.
        status: "verified" (reproduces every point to 1e-6 with more points than unknowns,
            so at least one point checks the form), "determined" (as many points as unknowns:
            matches, but nothing is left to check it), "underdetermined" (fewer points than
            unknowns: the leading term is an estimate) or "misfit" (no low-degree polynomial
            matches; the size is not a polynomial in n over this range, e.g. K grows).
    """

    exponents: list[int]
    coefficients: list[float]
    degree: int
    leading: float
    residual: float
    status: str

    @property
    def exact(self) -> bool:
        return self.status in ("verified", "determined")

    def term(self) -> str:
        return f"{self.leading:.4g} * n^{self.degree}"


def local_slopes(ns: Sequence[int], values: Sequence[float]) -> list[float]:
    """log-log slopes between consecutive points."""
    return [
        math.log(v1 / v0) / math.log(n1 / n0)
        for (n0, v0), (n1, v1) in zip(zip(ns, values), zip(ns[1:], values[1:]))
        if v0 > 0 and v1 > 0 and n1 != n0
    ]


def fit_polynomial(
    ns: Sequence[int], values: Sequence[float], *, even: bool = False, max_degree: int = 12
) -> PolynomialFit:
    """Non-negative least-squares fit of ``values`` by monomials of n, lowest degree first.

    Degrees are tried from the ceiling of the last log-log slope upward (a polynomial with
    non-negative coefficients has local slope <= its degree); the first degree that reproduces
    every point to 1e-6 (relative) wins. With ``even`` only even exponents are used, which is
    exact when every side grows in proportion to n (sizes are then polynomials in n^2) and
    makes the fit determined from 3 points for degree 4.
    """
    from scipy.optimize import nnls

    ns_arr = np.asarray(ns, dtype=float)
    vals = np.asarray(values, dtype=float)
    if len(ns_arr) < 2 or np.any(vals <= 0):
        raise ValueError("fitting needs at least two n with positive sizes")
    order = np.argsort(ns_arr)
    ns_arr, vals = ns_arr[order], vals[order]
    slopes = local_slopes(list(ns_arr), list(vals))
    start = max(0, math.ceil(slopes[-1] - 1e-9)) if slopes else 0
    step = 2 if even else 1
    if even and start % 2:
        start += 1
    best: PolynomialFit | None = None
    for degree in range(start, max_degree + 1, step):
        exponents = list(range(0, degree + 1, step))
        basis = np.stack([ns_arr**k for k in exponents], axis=1) / vals[:, None]
        coef, _ = nnls(basis, np.ones_like(vals))
        residual = float(np.max(np.abs(basis @ coef - 1.0)))
        nonzero = [k for k, c in zip(exponents, coef) if c > 0]
        top = max(nonzero) if nonzero else 0
        fit = PolynomialFit(
            exponents=exponents, coefficients=[float(c) for c in coef], degree=top,
            leading=float(coef[exponents.index(top)]) if nonzero else 0.0,
            residual=residual,
            status=_fit_status(residual, len(ns_arr), len(exponents)),
        )
        if best is None or residual < best.residual - 1e-12:
            best = fit
        if residual < 1e-6:
            return fit
    assert best is not None
    return best


def _fit_status(residual: float, points: int, unknowns: int) -> str:
    if residual >= 1e-6:
        return "misfit"
    if points > unknowns:
        return "verified"
    return "determined" if points == unknowns else "underdetermined"


@dataclass
class SweepReport:
    """Circuit counts over n with the fitted growth and the TC0 conditions."""

    points: list[SweepPoint]
    slopes: list[float]
    fit: PolynomialFit
    type_slopes: dict[str, float]
    flags: list[Flag]
    conditions: dict[str, bool]

    @property
    def ns(self) -> list[int]:
        return [p.n for p in self.points]

    @property
    def tc0(self) -> bool:
        return all(self.conditions.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [
                {
                    "n": p.n, "scales": list(p.scales), "num_scales": p.num_scales,
                    "steps": p.steps, "widths": p.widths, "precision_bits": p.precision_bits,
                    "depth": p.count.depth, "critical_path": p.count.critical_path,
                    "size": p.count.size, "total_size": p.count.total_size,
                    "live_ops": p.count.live_ops, "by_op": p.count.by_op,
                    "unclassified": p.count.unclassified, "notes": p.count.notes,
                    "meta": p.meta,
                }
                for p in self.points
            ],
            "slopes": self.slopes,
            "fit": asdict(self.fit) | {"term": self.fit.term(), "exact": self.fit.exact},
            "type_slopes": self.type_slopes,
            "flags": [asdict(f) for f in self.flags],
            "conditions": self.conditions,
            "tc0": self.tc0,
        }

    def table(self) -> str:
        """A plain-text report: per-n table, fitted growth, conditions and flags."""
        used = [k for k in PRIMITIVES if any(p.count.depth[k] for p in self.points)]
        lines = []
        header = ["n", "K", "T"] + [f"d_{k}" for k in used] + ["size", "slope"]
        header += [k for k in TOTAL_KEYS if any(p.count.size[k] for p in self.points)]
        size_keys = header[len(used) + 5:]
        rows = []
        slopes = ["-"] + [f"{s:.2f}" for s in self.slopes]
        for p, slope in zip(self.points, slopes):
            rows.append(
                [str(p.n), str(p.num_scales), str(p.steps)]
                + [str(p.count.depth[k]) for k in used]
                + [f"{p.count.total_size:.3e}", slope]
                + [f"{p.count.size[k]:.2e}" for k in size_keys]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        lines.append("")
        lines.append(
            "depth = " + " + ".join(
                f"{self.points[-1].count.depth[k]}*d_{k}" for k in used
            ) + f"   (at n = {self.points[-1].n}; per-primitive longest path)"
        )
        fit = self.fit
        lines.append(
            f"size ~ {fit.term()}   (degree {fit.degree}, fit {fit.status}, residual "
            f"{fit.residual:.1e}; last log-log slope {self.slopes[-1]:.2f})"
        )
        if self.type_slopes:
            lines.append("last slope by type: " + ", ".join(
                f"{k} {v:.2f}" for k, v in self.type_slopes.items()
            ))
        lines.append("")
        for name, ok in self.conditions.items():
            lines.append(f"[{'ok' if ok else 'FAIL'}] {name.replace('_', ' ')}")
        for flag in self.flags:
            if flag.code == "note":
                lines.append(f"note: {flag.message}")
            else:
                lines.append(f"WARNING {flag.code}: {flag.message}")
        lines.append(
            "verdict: " + ("constant depth, polynomial size: consistent with TC0"
                           if self.tc0 else "NOT shown to be in TC0 (see the warnings)")
        )
        return "\n".join(lines)


def _check(points: list[SweepPoint], precision_rule: str) -> tuple[dict[str, bool], list[Flag]]:
    flags: list[Flag] = []
    ks = [p.num_scales for p in points]
    ts = [p.steps for p in points]
    depths = [tuple(p.count.depth.values()) for p in points]
    conditions = {
        "constant_number_of_scales": len(set(ks)) == 1,
        "constant_flow_steps": len(set(ts)) == 1,
        "constant_depth": len(set(depths)) == 1,
        "polynomial_precision": precision_rule != "exp",
        "widths_at_most_linear": True,
        "all_ops_classified": not any(p.count.unclassified for p in points),
    }
    if not conditions["constant_number_of_scales"]:
        flags.append(Flag("scales-grow", (
            f"the number of scales K grows with n ({ks[0]} -> {ks[-1]}); every scale is a "
            "sequential stage, so depth grows like log n: not TC0 (constant depth needs a "
            "fixed K; use the 'rescale' scale rule)"
        )))
    if not conditions["constant_flow_steps"]:
        flags.append(Flag("steps-grow", (
            f"the number of flow steps T changes with n ({ts[0]} -> {ts[-1]}); depth "
            "multiplies by T, so T growing with n means depth growing with n: not TC0"
        )))
    if not conditions["constant_depth"]:
        grow = [k for k in PRIMITIVES if points[-1].count.depth[k] != points[0].count.depth[k]]
        flags.append(Flag("depth-grows", (
            f"the depth vector changes with n (primitives {', '.join(grow)}): the circuit "
            "family does not have constant depth"
        )))
    if not conditions["polynomial_precision"]:
        flags.append(Flag("precision", (
            "the precision p(n) grows faster than any polynomial (2^n bits): the primitive "
            "gates are no longer poly(n)-size TC0 circuits (rule R7): not TC0"
        )))
    ns = [p.n for p in points]
    for key in points[0].widths:
        slopes = local_slopes(ns, [p.widths[key] for p in points])
        if slopes and max(slopes) > 1.0 + 1e-9:
            conditions["widths_at_most_linear"] = False
            flags.append(Flag("width-grows", (
                f"{key} grows faster than n (log-log slope {max(slopes):.2f}); the theorem "
                "assumes widths d <= O(n)"
            )))
    unknown = sorted({op for p in points for op in p.count.unclassified})
    if unknown:
        flags.append(Flag("unclassified", (
            f"ops with no primitive rule were counted as 'other' (depth 1 each): "
            f"{', '.join(unknown)}"
        )))
    notes = sorted({note for p in points for note in p.count.notes})
    for note in notes:
        flags.append(Flag("note", note))
    return conditions, flags


def circuit_sweep(
    make_case: Callable[[int], Case],
    ns: Sequence[int],
    *,
    precision_rule: str = "const",
    weights: dict[str, float] | None = None,
    even_fit: bool | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepReport:
    """Trace ``make_case(n)`` for every n and report depth, size, growth and TC0 conditions.

    Args:
        make_case: n -> :class:`Case` (e.g. :func:`flowar.analysis.targets.flowar_case_factory`).
        ns: the largest sides to sweep (at least two for a fit).
        precision_rule: how the assumed precision grows with n ("const", "poly", "exp").
        weights: unit depths used to choose the critical path.
        even_fit: fit size with even powers of n only (default: when every scale list is
            proportional to n, i.e. the scale count does not change).
        on_point: called after each n (progress).
    """
    ns = sorted(set(int(n) for n in ns))
    if len(ns) < 2:
        raise ValueError("a sweep needs at least two values of n")
    precision_bits(precision_rule, 1)  # validates the rule
    points = []
    for n in ns:
        case = make_case(n)
        count, _ = trace_circuit(case.fn, *case.inputs, weights=weights)
        point = SweepPoint(
            n=n, scales=tuple(case.scales), steps=case.steps, widths=dict(case.widths),
            precision_bits=precision_bits(precision_rule, n), count=count, meta=dict(case.meta),
        )
        points.append(point)
        logger.debug("n=%d size=%d depth=%s", n, count.total_size, count.depth)
        if on_point is not None:
            on_point(point)
    sizes = [p.count.total_size for p in points]
    if even_fit is None:
        even_fit = len({p.num_scales for p in points}) == 1 and all(
            tuple(s * points[0].n for s in p.scales) == tuple(s * p.n for s in points[0].scales)
            for p in points
        )
    fit = fit_polynomial(ns, sizes, even=even_fit)
    type_slopes = {}
    for key in TOTAL_KEYS:
        values = [p.count.size[key] for p in points]
        if all(v > 0 for v in values):
            type_slopes[key] = local_slopes(ns, values)[-1]
    conditions, flags = _check(points, precision_rule)
    if fit.status == "misfit":
        flags.append(Flag("fit", (
            f"no polynomial of low degree matches the sizes (residual {fit.residual:.1e}); "
            "read the leading term as an estimate"
        )))
    elif fit.status == "underdetermined":
        flags.append(Flag("fit", (
            f"too few n for a degree-{fit.degree} fit; the leading term is an estimate "
            "(add larger n)"
        )))
    return SweepReport(points, local_slopes(ns, sizes), fit, type_slopes, flags, conditions)


def plot_sweep(report: SweepReport, path: str, title: str = "") -> None:
    """Log-log plot of circuit size (total and by type) versus n, with n^2 and n^4 guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array(report.ns, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    totals = np.array([p.count.total_size for p in report.points], dtype=float)
    ax.loglog(ns, totals, "o-", color="black", lw=2, label="total size")
    for key, style in (("std", "s--"), ("sum_terms", "^--"), ("exp", "v--"), ("erf", "d--"),
                       ("max_terms", "x--"), ("sqrt", "+--")):
        values = np.array([p.count.size[key] for p in report.points], dtype=float)
        if np.all(values > 0):
            ax.loglog(ns, values, style, lw=1, alpha=0.8, label=key)
    for power, colour in ((2, "tab:blue"), (4, "tab:red")):
        guide = totals[-1] * (ns / ns[-1]) ** power
        ax.loglog(ns, guide, ":", color=colour, lw=1, label=f"~ n^{power}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(int(n)) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("n (side of the largest token map)")
    ax.set_ylabel("primitive operations")
    ax.set_title(title or f"circuit size vs n (fit: {report.fit.term()})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
