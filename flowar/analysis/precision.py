"""Bounded-precision execution: run any PyTorch computation with every operation's result rounded
to a p-bit significand (round to nearest, ties to even), emulated on top of float64.

The theorem "FlowAR is in TC0" is about p-bit floating point with p <= poly(n): every weight,
input and intermediate value is a p-bit float and every primitive operation rounds once. This
module makes that arithmetic executable without touching the model code: a dispatch mode sees
each aten operator, rounds its floating inputs (so weights and inputs are p-bit numbers too) and
its result. Fused kernels (softmax, GELU, norms, fused attention) are expanded first, so each
exp, sum and division rounds on its own; a matrix product or an iterated sum rounds once, which
is the theory's "iterated addition, exact then rounded once" primitive (float64 accumulation
stands in for the exact sum).

``p`` counts fraction bits (see :mod:`flowar.analysis.rounding`): p = 52 is float64 exactly.

Example::

    rows = precision_sweep(lambda: model_fn(), ps=[8, 16, 24, 52])
    p_needed = smallest_p(rows, target=1e-3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from flowar.analysis.dispatch import (
    FUSED,
    aten,
    decompose,
    has_composite_kernel,
    written_arguments,
)
from flowar.analysis.rounding import MAX_P, MIN_P, round_significand

logger = logging.getLogger(__name__)

_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class PrecisionMode(TorchDispatchMode):
    """Inside this context every floating aten result is rounded to ``p`` fraction bits.

    Args:
        p: fraction bits (1..52); None rounds nothing (only ``promote`` applies), which gives the
            float64 reference run.
        round_inputs: also round the floating inputs of every op, so weights, buffers and the
            caller's inputs are p-bit numbers as the theory requires (idempotent on values that
            are already rounded).
        promote: skip casts from float64 to narrower floats (e.g. a norm the model computes in
            float32), so the emulated p-bit rounding is the only precision limit of the run.
        expand: run fused kernels (softmax, GELU, norms, fused attention) as their reference
            decompositions so each inner operation rounds; False rounds a fused kernel once.
            The float64 reference must use the same setting: expanded kernels agree with the
            native ones only to float64 rounding (about 1e-16).

    Attributes:
        rounded_ops: number of aten calls whose result was rounded.
    """

    def __init__(
        self,
        p: int | None,
        *,
        round_inputs: bool = True,
        promote: bool = True,
        expand: bool = True,
    ) -> None:
        super().__init__()
        if p is not None and (not isinstance(p, int) or not MIN_P <= p <= MAX_P):
            raise ValueError(f"p must be an integer in [{MIN_P}, {MAX_P}] or None, got {p!r}")
        self.p = p
        self.round_inputs = round_inputs
        self.promote = promote
        self.expand = expand
        self.rounded_ops = 0

    def _round(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return round_significand(value, self.p)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if has_composite_kernel(func) or (self.expand and func in FUSED):
            with self:
                out = decompose(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if self.promote and func is aten._to_copy.default:
            kwargs = _promoted_cast(args, kwargs)
        if self.p is None or func.is_view:
            return func(*args, **kwargs)
        written = written_arguments(func, args, kwargs)
        if self.round_inputs:
            keep = {id(t) for t in written}
            args, kwargs = tree_map(
                lambda v: v if id(v) in keep else self._round(v), (args, kwargs)
            )
        out = func(*args, **kwargs)
        self.rounded_ops += 1
        if written:
            for tensor in written:
                if tensor.is_floating_point():
                    tensor.copy_(round_significand(tensor, self.p))
            return out
        return tree_map(self._round, out)


def _promoted_cast(args: tuple, kwargs: dict) -> dict:
    """kwargs of an ``_to_copy`` with a float64 -> narrower-float cast turned into float64."""
    source = args[0] if args else None
    target = kwargs.get("dtype")
    if (
        isinstance(source, torch.Tensor)
        and source.dtype == torch.float64
        and target in _NARROW_FLOATS
    ):
        return {**kwargs, "dtype": torch.float64}
    return kwargs


def run_at_precision(
    fn: Callable[..., Any],
    p: int | None,
    *inputs: Any,
    round_inputs: bool = True,
    promote: bool = True,
    expand: bool = True,
) -> Any:
    """``fn(*inputs)`` with every operation rounded to ``p`` fraction bits (None: float64)."""
    with PrecisionMode(p, round_inputs=round_inputs, promote=promote, expand=expand):
        return fn(*inputs)


@dataclass(frozen=True)
class PrecisionRow:
    """Error of one p-bit run against the float64 reference.

    Attributes:
        p: fraction bits.
        significand_bits: p + 1 (the theory's P).
        max_abs_error: max |y_p - y_ref| over every output entry.
        rel_error: max_abs_error / max |y_ref| (inf when the p-bit run overflowed or gave NaN).
        rounded_ops: aten calls rounded during the run.
    """

    p: int
    significand_bits: int
    max_abs_error: float
    rel_error: float
    rounded_ops: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _floating_leaves(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_error(output: Any, reference: Any) -> tuple[float, float]:
    """(max absolute error, relative error) of every floating tensor of ``output``.

    The relative error is the max absolute error divided by the largest |reference| entry.
    """
    out, ref = _floating_leaves(output), _floating_leaves(reference)
    if len(out) != len(ref) or not ref:
        raise ValueError(
            f"output has {len(out)} floating tensors, reference has {len(ref)}; "
            "both must be the same non-empty structure"
        )
    worst, scale = 0.0, 0.0
    for a, b in zip(out, ref):
        if a.shape != b.shape:
            raise ValueError(f"output shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        diff = (a.double() - b.double()).abs()
        if not torch.isfinite(diff).all():
            return math.inf, math.inf
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        scale = max(scale, float(b.double().abs().max()) if b.numel() else 0.0)
    return worst, (worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf))


def precision_sweep(
    fn: Callable[..., Any],
    inputs: Sequence[Any] = (),
    ps: Iterable[int] = (8, 12, 16, 20, 24, 32, 40, 52),
    reference: Any = None,
    *,
    round_inputs: bool = True,
    promote: bool = True,
    expand: bool = True,
    on_run: Callable[[int], None] | None = None,
) -> list[PrecisionRow]:
    """Run ``fn(*inputs)`` at every p and measure the output error against float64.

    Args:
        fn: the computation (e.g. one FlowAR sampling call); it must be deterministic (fix its
            seeds) and compute in float64.
        inputs: positional arguments of ``fn``.
        ps: fraction-bit counts to try.
        reference: the float64 output; computed (p=None, same ``promote`` and ``expand``) if
            None.
        round_inputs, promote, expand: see :class:`PrecisionMode`.
        on_run: called with p after each run (progress reporting).

    Returns:
        One :class:`PrecisionRow` per p, in increasing p.
    """
    ps = sorted(set(int(p) for p in ps))
    if not ps:
        raise ValueError("precision_sweep needs at least one p")
    if reference is None:
        reference = run_at_precision(fn, None, *inputs, promote=promote, expand=expand)
    leaves = _floating_leaves(reference)
    if leaves and any(t.dtype != torch.float64 for t in leaves):
        logger.warning("reference output is not float64; errors below its own rounding are "
                       "not meaningful (build the model with .double())")
    rows = []
    for p in ps:
        mode = PrecisionMode(p, round_inputs=round_inputs, promote=promote, expand=expand)
        with mode:
            out = fn(*inputs)
        abs_err, rel_err = output_error(out, reference)
        rows.append(PrecisionRow(p, p + 1, abs_err, rel_err, mode.rounded_ops))
        logger.debug("p=%d rel_error=%.3g abs_error=%.3g", p, rel_err, abs_err)
        if on_run is not None:
            on_run(p)
    return rows


def smallest_p(rows: Sequence[PrecisionRow], target: float, *, metric: str = "rel") -> int | None:
    """The smallest swept p from which on every larger swept p meets ``target``.

    Requiring all larger p to meet the target too makes the answer robust to an error curve
    that is not monotone (rounding noise can make a lucky low p look good).

    Args:
        rows: output of :func:`precision_sweep`.
        target: error to reach.
        metric: "rel" (relative error) or "abs" (max absolute error).

    Returns:
        The p, or None when even the largest p misses the target.
    """
    if metric not in ("rel", "abs"):
        raise ValueError(f"metric must be 'rel' or 'abs', got {metric!r}")
    best = None
    for row in sorted(rows, key=lambda r: r.p, reverse=True):
        error = row.rel_error if metric == "rel" else row.max_abs_error
        if error <= target:
            best = row.p
        else:
            break
    return best


@dataclass
class PrecisionReport:
    """Precision sweeps at several n and the smallest p that meets a target at each.

    Attributes:
        target: the error target (relative, see :func:`output_error`).
        rows: n -> one :class:`PrecisionRow` per p.
        needed: n -> smallest p meeting the target (None: not reached by the largest p).
        bits_per_doubling: least-squares slope of the needed p against log2 n (how many more
            fraction bits each doubling of n costs); None with fewer than two reached n.
        meta: n -> what was run (scales, steps...).
    """

    target: float
    rows: dict[int, list[PrecisionRow]]
    needed: dict[int, int | None]
    bits_per_doubling: float | None
    meta: dict[int, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "convention": "p = fraction bits; significand_bits = p + 1; p = 52 is float64",
            "points": [
                {"n": n, "needed_p": self.needed[n], "meta": self.meta.get(n, {}),
                 "rows": [r.to_dict() for r in rows]}
                for n, rows in self.rows.items()
            ],
            "bits_per_doubling": self.bits_per_doubling,
        }

    def table(self) -> str:
        """Relative error for every (p, n), then the smallest p per n."""
        ns = list(self.rows)
        ps = sorted({r.p for rows in self.rows.values() for r in rows})
        by = {(n, r.p): r.rel_error for n, rows in self.rows.items() for r in rows}
        header = ["p", "bits"] + [f"n={n}" for n in ns]
        body = [
            [str(p), str(p + 1)] + [f"{by.get((n, p), math.nan):.2e}" for n in ns] for p in ps
        ]
        needed = ["needed p", ""] + [
            str(self.needed[n]) if self.needed[n] is not None else f">{ps[-1]}" for n in ns
        ]
        rows = [header, *body, needed]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        rule = "-" * len(lines[0])
        lines.insert(1, rule)
        lines.insert(len(lines) - 1, rule)
        lines.append("")
        lines.append(
            f"error = max |y_p - y_float64| / max |y_float64| over the generated map; target "
            f"{self.target:g}; p = fraction bits (float64: 52, float32: 23, bfloat16: 7)"
        )
        if self.bits_per_doubling is not None:
            lines.append(
                f"needed p changes by {self.bits_per_doubling:+.2f} bits per doubling of n "
                "over this range (fit of needed p against log2 n)"
            )
        return "\n".join(lines)


def precision_by_n(
    make_case: Callable[[int], Any],
    ns: Sequence[int],
    ps: Iterable[int],
    target: float,
    *,
    round_inputs: bool = True,
    promote: bool = True,
    on_run: Callable[[int, int], None] | None = None,
) -> PrecisionReport:
    """:func:`precision_sweep` of ``make_case(n)`` for every n, with the smallest p meeting
    ``target`` at each n and how it grows.

    Args:
        make_case: n -> :class:`flowar.analysis.targets.Case` whose ``fn`` computes in float64;
            the error is measured on the last tensor the case returns (the finest scale).
        ns: sizes to run.
        ps: fraction bits to try.
        target: relative error to reach.
        round_inputs, promote: see :class:`PrecisionMode`.
        on_run: called with (n, p) after each run.
    """
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target}")
    ps = sorted(set(int(p) for p in ps))
    rows: dict[int, list[PrecisionRow]] = {}
    needed: dict[int, int | None] = {}
    meta: dict[int, dict[str, Any]] = {}
    for n in sorted(set(int(n) for n in ns)):
        case = make_case(n)

        def last(*inputs, _fn=case.fn):
            out = _fn(*inputs)
            return out[-1] if isinstance(out, (list, tuple)) else out

        rows[n] = precision_sweep(
            last, case.inputs, ps, round_inputs=round_inputs, promote=promote,
            on_run=(lambda p, _n=n: on_run(_n, p)) if on_run is not None else None,
        )
        needed[n] = smallest_p(rows[n], target)
        meta[n] = {"scales": list(case.scales), "steps": case.steps, **case.meta}
    reached = [(n, p) for n, p in needed.items() if p is not None]
    slope = None
    if len(reached) >= 2:
        x = [math.log2(n) for n, _ in reached]
        y = [p for _, p in reached]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        var = sum((a - mx) ** 2 for a in x)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var else None
    return PrecisionReport(target, rows, needed, slope, meta)


def plot_precision(report: PrecisionReport, path: str, title: str = "") -> None:
    """Error versus p (one curve per n, log scale) and the needed p versus n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    exact_at: set[int] = set()
    all_ps: set[int] = set()
    for n, rows in report.rows.items():
        shown = [r for r in rows if math.isfinite(r.rel_error) and r.rel_error > 0]
        exact_at.update(r.p for r in rows if r.rel_error == 0)
        all_ps.update(r.p for r in rows)
        left.semilogy([r.p for r in shown], [r.rel_error for r in shown], "o-", label=f"n = {n}")
    grid = np.array(sorted(all_ps), dtype=float)
    left.semilogy(grid, 2.0 ** -grid, ":", color="gray", lw=1, label="2^-p")
    left.axhline(report.target, color="black", ls="--", lw=1, label=f"target {report.target:g}")
    if exact_at:
        left.text(0.98, 0.98, f"error 0 (bit-exact) at p = {', '.join(map(str, sorted(exact_at)))}",
                  transform=left.transAxes, ha="right", va="top", fontsize=8)
    left.set_xlabel("p (fraction bits; 52 = float64)")
    left.set_ylabel("relative output error vs float64")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    ns = [n for n, p in report.needed.items() if p is not None]
    right.plot(ns, [report.needed[n] for n in ns], "s-", color="tab:red")
    right.set_xscale("log", base=2)
    if ns:
        right.set_xticks(ns, [str(n) for n in ns])
        right.minorticks_off()
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("n (side of the largest token map)")
    right.set_ylabel(f"smallest p with error <= {report.target:g}")
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or "bounded-precision FlowAR inference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
