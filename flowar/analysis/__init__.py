"""Computational-limits toolkit: TC0 circuit accounting and bounded-precision execution.

* :mod:`flowar.analysis.circuit`: trace a computation into TC0 primitive counts (depth vector,
  size by type), derived from the aten operators actually executed.
* :mod:`flowar.analysis.scaling`: sweep n, fit the growth of the size, check the conditions of
  the TC0 theorem.
* :mod:`flowar.analysis.precision`: run a computation with every operation rounded to a p-bit
  significand (round to nearest even) on top of float64.
* :mod:`flowar.analysis.targets`: FlowAR inference resized to a largest side n.
"""

from flowar.analysis.circuit import CircuitCount, CircuitTracer, trace_circuit
from flowar.analysis.precision import (
    PrecisionMode,
    PrecisionReport,
    PrecisionRow,
    precision_by_n,
    precision_sweep,
    run_at_precision,
    smallest_p,
)
from flowar.analysis.rounding import round_significand
from flowar.analysis.scaling import SweepReport, circuit_sweep, fit_polynomial
from flowar.analysis.targets import config_for_n, flowar_case_factory, scales_for_n

__all__ = [
    "CircuitCount",
    "CircuitTracer",
    "PrecisionMode",
    "PrecisionReport",
    "PrecisionRow",
    "SweepReport",
    "circuit_sweep",
    "config_for_n",
    "fit_polynomial",
    "flowar_case_factory",
    "precision_by_n",
    "precision_sweep",
    "round_significand",
    "run_at_precision",
    "scales_for_n",
    "smallest_p",
    "trace_circuit",
]
