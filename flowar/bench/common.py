"""Shared benchmark helpers: timing, peak memory, FLOP counting hooks, slopes, plots."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout

logger = logging.getLogger(__name__)

MIB = 2.0**20


# --------------------------------------------------------------------------------------------
# Time and peak memory


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> int | None:
    """Return freed heap to the OS and reset the kernel's peak-RSS mark (Linux); baseline KiB."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return _proc_status_kib("VmRSS")


@dataclass
class Measurement:
    """Best wall time over the repeats and the peak memory of the first run.

    Attributes:
        seconds: best wall-clock time.
        peak_bytes: peak memory above the pre-run level (CUDA: allocator peak; CPU: peak RSS
            growth from /proc, Linux only), None where it cannot be measured.
    """

    seconds: float
    peak_bytes: int | None


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> Measurement:
    """Run ``fn`` ``repeats`` times (after one untimed warm-up) and measure it."""
    fn()  # warm-up: caches, lazy initialisation
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_peak()
    best = math.inf
    peak = None
    for i in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        if i == 0:
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - base
            elif base is not None:
                high = _proc_status_kib("VmHWM")
                peak = None if high is None else max(0, high - base) * 1024
    return Measurement(best, peak)


# --------------------------------------------------------------------------------------------
# Wrapping every attention backend of a model


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every submodule that owns an attention backend (attribute ``backend``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]


@contextlib.contextmanager
def wrapped_backends(
    model: torch.nn.Module, wrap: Callable[[AttentionBackend], AttentionBackend]
) -> Iterator[None]:
    """Temporarily replace every attention backend ``b`` of ``model`` by ``wrap(b)``."""
    layers = attention_layers(model)
    originals = [layer.backend for layer in layers]
    try:
        for layer in layers:
            layer.backend = wrap(layer.backend)
        yield
    finally:
        for layer, backend in zip(layers, originals):
            layer.backend = backend


def exact_attention_flops(queries: int, keys: int, head_dim: int) -> int:
    """FLOPs of softmax attention for one head: ``Q K^T`` and ``A V`` (2 per multiply-add)."""
    return 4 * queries * keys * head_dim


def poly_attention_flops(queries: int, keys: int, head_dim: int, rank: int) -> int:
    """FLOPs of factorised attention for one head: features of queries and keys, key sums
    ``phi_K^T [V, 1]`` and query products (the ``auto`` backend's cost model)."""
    return 2 * (queries + keys) * rank * (head_dim + 2)


class FlopTally:
    """Accumulates the analytic attention FLOPs of the calls it sees."""

    def __init__(self) -> None:
        self.flops = 0
        self.calls = 0


@dataclass
class _CountState(AttentionState):
    inner: AttentionState
    keys: int = 0

    def nbytes(self) -> int:
        return self.inner.nbytes()


class CountingBackend(AttentionBackend):
    """Passes every call to ``inner`` and adds its analytic FLOPs to ``tally``.

    Exact calls cost :func:`exact_attention_flops` over all keys a query may see (the dense
    block-causal mask computes every pair); poly calls cost :func:`poly_attention_flops` with
    the new keys only (older keys live in the constant-size state).
    """

    def __init__(self, inner: AttentionBackend, tally: FlopTally, rank: int | None = None):
        super().__init__(inner.head_dim)
        self.inner, self.tally, self.rank = inner, tally, rank

    def new_state(self) -> _CountState:
        return _CountState(self.inner.new_state())

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
        inner_state = state.inner if isinstance(state, _CountState) else None
        if isinstance(state, _CountState):
            state.keys += k.shape[-2]
            seen = state.keys
        else:
            seen = k.shape[-2]
        heads = q.shape[0] * q.shape[1]
        d = q.shape[-1]
        if self.rank is None:
            flops = exact_attention_flops(q.shape[-2], seen, d)
        else:
            flops = poly_attention_flops(q.shape[-2], k.shape[-2], d, self.rank)
        self.tally.flops += heads * flops
        self.tally.calls += 1
        return self.inner(q, k, v, scale=scale, layout=layout, state=inner_state,
                          dropout_p=dropout_p)


# --------------------------------------------------------------------------------------------
# Fits and plots


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (nan with fewer than two points)."""
    if len(x) < 2:
        return math.nan
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def loglog_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    dashed: Sequence[str] = (),
) -> Path:
    """Write a log-log line plot of ``series`` (label -> (x, y)) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for label, (x, y) in series.items():
        pts = [(a, b) for a, b in zip(x, y) if b is not None and b > 0 and math.isfinite(b)]
        if pts:
            xs, ys = zip(*pts)
            ax.loglog(xs, ys, "--" if label in dashed else "-o", label=label, markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text (Markdown-compatible) table."""

    def cell(x: object) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}"
        return str(x)

    body = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)
