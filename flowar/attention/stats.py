"""Collecting per-call attention statistics (certified error bounds, backend choices).

Backends report one :class:`CallStats` per call to every active collector. A collector is
opened by the caller around the work it wants to observe::

    with collect_stats() as calls:
        images = sample(...)
    worst = max(c.bound for c in calls if c.bound is not None)

Collectors live in a context variable, so nothing is kept on the modules and nested or
concurrent collections do not see each other's calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

_ACTIVE: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar(
    "flowar_attention_stats", default=()
)


@dataclass(frozen=True)
class CallStats:
    """What one attention call did.

    Attributes:
        backend: the backend that ran ("exact", "poly", "performer").
        tokens: number of query tokens in the call.
        keys: number of keys each query saw (at most).
        beta: certified logit half-width (max |scale * q.k|), poly only.
        degree: polynomial degree, poly only.
        rank: feature dimension, poly and performer.
        eps: worst-case relative error of the polynomial on [-beta, beta].
        bound: certified bound on max |output - exact output|.
        note: free-form reason (e.g. why ``auto`` chose a backend).
    """

    backend: str
    tokens: int
    keys: int
    beta: float | None = None
    degree: int | None = None
    rank: int | None = None
    eps: float | None = None
    bound: float | None = None
    note: str = ""


def stats_enabled() -> bool:
    """True when at least one collector is open (backends may skip work otherwise)."""
    return bool(_ACTIVE.get())


def report(stats: CallStats) -> None:
    """Send one call's statistics to every open collector."""
    for sink in _ACTIVE.get():
        sink.append(stats)


@contextlib.contextmanager
def collect_stats() -> Iterator[list[CallStats]]:
    """Open a collector; yields the list that receives every call's :class:`CallStats`."""
    sink: list[CallStats] = []
    token = _ACTIVE.set(_ACTIVE.get() + (sink,))
    try:
        yield sink
    finally:
        _ACTIVE.reset(token)
