"""TC0 circuit accounting derived from the computation actually executed.

A :class:`CircuitTracer` is a dispatch mode: while it is active it sees every aten operator the
model runs, maps each one to the primitive gates of the theory brief (section 2.3) and keeps,
for every tensor, the depth of the circuit that computes it. Nothing is described by hand, so
a new block, a different attention backend or another number of flow steps changes the report
without touching this module.

Primitives (depth symbols of the theory brief, one slot each):

* ``std``  d_std: one +, -, x, /, comparison or select on p-bit floats (also casts and
  data-dependent gathers, which are selects);
* ``sum``  d_sum (d_oplus): iterated addition of k terms, k <= poly(n), one layer whatever k;
* ``prod`` d_prod (d_otimes): iterated multiplication (x**k for integer k >= 3, prod, cumprod);
* ``max``  d_max: iterated max/min, or an AND/OR of k bits (softmax's max, ``all``): pairwise
  comparisons plus one threshold layer, so also constant depth;
* ``exp``, ``log``, ``erf``, ``sqrt``, ``trig``: approximations with relative error 2^-p
  (erf has its own slot as the theory brief section 1.6b asks for GELU);
* ``other``: any op the tracer does not know; the report lists them and says so.

Accounting rules (theory brief section 2.4):

* R1/R2: the depth of a result is the maximum over its inputs plus the op's own depth;
* R3: an element-wise op over M entries costs M ops and the depth of one;
* R4: a reduction of k terms costs one iterated op of k terms (depth does not grow with k);
  a matrix product (a x b)(b x c) is a*b*c products (std) and a*c sums of b terms; a bias is
  one more element-wise add (std), whether or not PyTorch fused it into the product;
* R5: weights, buffers, masks, index maps and everything computed from them alone (RoPE
  tables, time-step embeddings) are constants: depth 0, size 0. The inputs of the simulated
  function are the tensors passed to :meth:`CircuitTracer.mark_input` (class labels) and the
  output of every random op (the flow noise);
* R6: loops are unrolled by execution, so layers, scales and steps multiply depth;
* only operations whose results reach the output are counted (checks, logging, dead code are
  dropped).

Depth vectors. Two are reported:

* ``depth`` is the per-primitive longest path: coordinate t is the largest number of
  t-gates on any path from an input to the output. For any unit depths d_t, the circuit depth
  is at most sum_t depth[t] * d_t, so this vector is a weight-free upper bound; it is additive
  over sequential stages and takes the coordinate-wise maximum over parallel ones.
* ``critical_path`` is the primitive count of one longest path under the weights
  ``weights`` (all 1 by default): an actual path, exact for those unit depths.

Size. ``size`` counts primitive operations by type; an iterated op of k terms also adds k to
``<type>_terms``. ``total_size`` = std + sum_terms + prod_terms + max_terms + exp + log + erf +
sqrt + trig + other, i.e. every primitive gate with unit size and iterated ops weighted by
their number of operands. Each primitive is a poly(p)-size threshold circuit, so the circuit's
size is poly(n) * poly(p).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowar.analysis.dispatch import (
    FUSED,
    SDPA,
    aten,
    bind_arguments,
    decompose,
    has_composite_kernel,
    written_arguments,
)

logger = logging.getLogger(__name__)

PRIMITIVES: tuple[str, ...] = (
    "std", "sum", "prod", "max", "exp", "log", "erf", "sqrt", "trig", "other",
)
_INDEX = {name: i for i, name in enumerate(PRIMITIVES)}
SIZE_KEYS: tuple[str, ...] = (
    "std", "sum", "sum_terms", "prod", "prod_terms", "max", "max_terms",
    "exp", "log", "erf", "sqrt", "trig", "other",
)
TOTAL_KEYS: tuple[str, ...] = (
    "std", "sum_terms", "prod_terms", "max_terms", "exp", "log", "erf", "sqrt", "trig", "other",
)
_ZERO = (0,) * len(PRIMITIVES)


def _vec(**counts: int) -> tuple[int, ...]:
    out = [0] * len(PRIMITIVES)
    for name, count in counts.items():
        out[_INDEX[name]] += count
    return tuple(out)


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _max(vectors: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(max(col) for col in zip(*vectors)) if vectors else _ZERO


@dataclass
class Cost:
    """Own depth (a chain of primitives) and size counts of one aten call."""

    depth: tuple[int, ...] = _ZERO
    size: dict[str, int] = field(default_factory=dict)


def _pointwise(numel: int, **chain: int) -> Cost:
    """An element-wise op made of a chain of primitives, applied to ``numel`` entries."""
    return Cost(_vec(**chain), {name: count * numel for name, count in chain.items()})


def _iterated(kind: str, outputs: int, terms: int, **extra: int) -> Cost:
    """``outputs`` iterated ops of type ``kind`` over ``terms`` operands in all, plus a chain
    of element-wise ``extra`` ops on every output."""
    size = {kind: outputs, f"{kind}_terms": terms}
    for name, count in extra.items():
        size[name] = size.get(name, 0) + count * outputs
    return Cost(_vec(**{kind: 1}, **extra), size)


def _matmul(products: int, sums: int, terms: int) -> Cost:
    """``products`` scalar multiplications feeding ``sums`` iterated sums (``terms`` operands)."""
    return Cost(_vec(std=1, sum=1), {"std": products, "sum": sums, "sum_terms": terms})


# --------------------------------------------------------------------------------------------
# Op tables

def _names(*names: str) -> frozenset:
    ops = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.extend(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


_POINTWISE_CHAINS: dict[str, dict[str, int]] = {}
for _name in (
    "add", "sub", "mul", "div", "rsub", "neg", "abs", "sign", "sgn", "reciprocal", "maximum",
    "minimum", "fmax", "fmin", "clamp", "clamp_min", "clamp_max", "eq", "ne", "lt", "le", "gt",
    "ge", "relu", "threshold", "logical_and", "logical_or", "logical_xor", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "floor", "ceil", "round", "trunc",
    "frac", "remainder", "fmod", "square", "isnan", "isinf", "isfinite", "nan_to_num",
    "copysign", "hardtanh", "leaky_relu", "heaviside", "signbit", "floor_divide", "where",
    "masked_fill", "fill", "add_", "sub_", "mul_", "div_", "clamp_", "neg_", "masked_fill_",
    "abs_", "relu_",
):
    _POINTWISE_CHAINS[_name] = {"std": 1}
_POINTWISE_CHAINS.update({
    "addcmul": {"std": 2}, "addcdiv": {"std": 2}, "lerp": {"std": 3}, "addcmul_": {"std": 2},
    "addcdiv_": {"std": 2}, "lerp_": {"std": 3},
    "exp": {"exp": 1}, "exp_": {"exp": 1}, "exp2": {"exp": 1, "std": 1},
    "expm1": {"exp": 1, "std": 1}, "sigmoid": {"exp": 1, "std": 2},
    "tanh": {"exp": 1, "std": 3}, "sinh": {"exp": 1, "std": 2}, "cosh": {"exp": 1, "std": 2},
    "log": {"log": 1}, "log2": {"log": 1, "std": 1}, "log10": {"log": 1, "std": 1},
    "log1p": {"log": 1, "std": 1}, "erf": {"erf": 1}, "erfc": {"erf": 1, "std": 1},
    "sqrt": {"sqrt": 1}, "rsqrt": {"sqrt": 1, "std": 1}, "rsqrt_": {"sqrt": 1, "std": 1},
    "sqrt_": {"sqrt": 1}, "hypot": {"sqrt": 1, "std": 2},
    "sin": {"trig": 1}, "cos": {"trig": 1}, "tan": {"trig": 1}, "atan": {"trig": 1},
    "atan2": {"trig": 1}, "asin": {"trig": 1}, "acos": {"trig": 1},
})
_POINTWISE = {op: chain for name, chain in _POINTWISE_CHAINS.items() for op in _names(name)}

# (primitive, extra element-wise chain per output)
_REDUCTIONS: dict[str, tuple[str, dict[str, int]]] = {
    "sum": ("sum", {}), "mean": ("sum", {"std": 1}), "nansum": ("sum", {"std": 1}),
    "prod": ("prod", {}), "amax": ("max", {}), "amin": ("max", {}), "max": ("max", {}),
    "min": ("max", {}), "argmax": ("max", {}), "argmin": ("max", {}), "all": ("max", {}),
    "any": ("max", {}), "aminmax": ("max", {}),
}
_REDUCE = {op: spec for name, spec in _REDUCTIONS.items() for op in _names(name)}
_SCANS = {op: kind for name, kind in (("cumsum", "sum"), ("cumprod", "prod"))
          for op in _names(name, name + "_")}

_WIRING = _names(
    "cat", "stack", "clone", "copy", "copy_", "contiguous", "repeat", "flip", "roll",
    "constant_pad_nd", "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter",
    "zero_", "fill_", "detach", "alias", "lift_fresh", "lift_fresh_copy", "empty_like",
    "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "tril", "triu", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "_upsample_nearest_exact2d", "expand_copy", "permute_copy", "view_copy",
    "split_with_sizes_copy", "unbind_copy", "repeat_interleave", "resize_", "set_",
)
_GATHERS = _names(
    "index", "_unsafe_index", "index_select", "gather", "embedding", "take", "index_put",
    "index_put_", "_unsafe_index_put", "scatter", "scatter_", "masked_scatter", "masked_select",
)
_MATMULS = _names(
    "mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation"
)
_CONVS = _names("convolution", "_convolution", "convolution_overrideable")
_TAPS = {  # fixed-weight resampling: taps per output entry along each axis
    **{op: 4 for op in _names("upsample_bicubic2d")},
    **{op: 2 for op in _names("upsample_bilinear2d", "upsample_linear1d")},
}
_AA_TAPS = {op: 4 for op in _names("_upsample_bicubic2d_aa")}
_AA_TAPS.update({op: 2 for op in _names("_upsample_bilinear2d_aa")})
_POOLS = _names("_adaptive_avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool3d")
_AVG_POOLS = _names("avg_pool2d", "avg_pool1d", "avg_pool3d")
_CASTS = _names("_to_copy", "to")
_POW = _names("pow", "pow_")
_WHERE = _names("where")
_SELECTS = _names("where", "masked_fill", "masked_fill_")
_BINARY_MINMAX = frozenset(
    op for op in _names("max", "min") if op._overloadname in ("other", "out")
)
_REDUCE = {op: spec for op, spec in _REDUCE.items() if op not in _BINARY_MINMAX}
_POINTWISE.update({op: {"std": 1} for op in _BINARY_MINMAX})
_KNOWN = frozenset().union(
    _WIRING, _POINTWISE, _POW, _CASTS, _REDUCE, _SCANS, _GATHERS, _MATMULS, _CONVS, _TAPS,
    _AA_TAPS, _POOLS, _AVG_POOLS,
)
_FLOAT_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _numel(out: Any) -> int:
    tensors = _tensors(out)
    return tensors[0].numel() if tensors else 1


def _adaptive_window_total(in_size: int, out_size: int) -> int:
    """Sum over outputs of the adaptive-pooling window length along one axis."""
    return sum(
        math.ceil((i + 1) * in_size / out_size) - (i * in_size) // out_size
        for i in range(out_size)
    )


class _ReadWatcher(TorchFunctionMode):
    """Counts data-dependent tensors copied out to numpy or Python lists (no aten op shows
    those; ``.item()`` and ``bool()`` are seen by the dispatch mode)."""

    _READS = ("numpy", "tolist")

    def __init__(self, tracer: CircuitTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self._READS and args:
            if isinstance(args[0], torch.Tensor) and self.tracer._node_of(args[0]) is not None:
                self.tracer._data_scalar_reads += 1
        return func(*args, **(kwargs or {}))


class CircuitTracer(TorchDispatchMode):
    """Traces one computation into TC0 primitive counts (see the module docstring).

    Args:
        weights: unit depth of each primitive used to pick the critical path (default all 1).

    Use::

        tracer = CircuitTracer()
        tracer.mark_input(labels)
        with tracer:
            out = fn(labels)
        count = tracer.count(out)
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(PRIMITIVES)
        if unknown:
            raise ValueError(f"unknown primitives in weights: {sorted(unknown)}")
        self.weights = tuple(float((weights or {}).get(p, 1.0)) for p in PRIMITIVES)
        self._storage: dict[int, tuple[StorageWeakRef, int]] = {}
        # node id -> (bound depth, (critical weight, critical vector), size, parents, op name)
        self._nodes: list[tuple[tuple, tuple, dict, tuple, str]] = []
        self.ops_seen = 0
        self.unclassified: Counter = Counter()
        self.notes: list[str] = []
        self._data_scalar_reads = 0

    def __enter__(self):
        self._watcher = _ReadWatcher(self)
        self._watcher.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._watcher.__exit__(*exc)

    # ---- storage <-> node bookkeeping

    def _node_of(self, tensor: torch.Tensor) -> int | None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        entry = self._storage.get(storage._cdata)
        if entry is None or entry[0].expired():
            return None
        return entry[1]

    def _bind(self, tensor: torch.Tensor, node: int) -> None:
        storage = tensor.untyped_storage()
        self._storage[storage._cdata] = (StorageWeakRef(storage), node)

    def _new_node(self, cost: Cost, parents: list[int], name: str) -> int:
        if parents:
            bound = _max([self._nodes[p][0] for p in parents])
            crit = max((self._nodes[p][1] for p in parents), key=lambda c: (c[0], c[1]))
        else:
            bound, crit = _ZERO, (0.0, _ZERO)
        own_weight = sum(w * d for w, d in zip(self.weights, cost.depth))
        node = (
            _add(bound, cost.depth),
            (crit[0] + own_weight, _add(crit[1], cost.depth)),
            cost.size,
            tuple(sorted(set(parents))),
            name,
        )
        self._nodes.append(node)
        return len(self._nodes) - 1

    def mark_input(self, tensor: torch.Tensor) -> None:
        """Declare ``tensor`` an input of the simulated function (depth 0, not a constant)."""
        self._bind(tensor, self._new_node(Cost(), [], "input"))

    # ---- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Decompositions must not re-enter the read watcher (a torch-function mode).
        with torch._C.DisableTorchFunction():
            return self._dispatch(func, args, kwargs or {})

    def _dispatch(self, func, args, kwargs):
        self.ops_seen += 1
        if func in SDPA:
            out = func(*args, **kwargs)
            self._record(func, args, kwargs, out, self._sdpa_cost(func, args, kwargs))
            return out
        if func in FUSED or has_composite_kernel(func):
            with self:
                out = decompose(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func is aten._local_scalar_dense.default:
            if any(self._node_of(t) is not None for t in _tensors(args)):
                self._data_scalar_reads += 1
            return func(*args, **kwargs)
        if func.is_view:
            return func(*args, **kwargs)  # shares the storage, hence the node
        if torch.Tag.nondeterministic_seeded in func.tags or not _tensors((args, kwargs)):
            out = func(*args, **kwargs)  # noise (an input) or a constant (zeros, arange...)
            self._record(func, args, kwargs, out, Cost())
            return out
        if func not in _KNOWN:
            with self:
                out = decompose(func, args, kwargs)
            if out is not NotImplemented:
                return out
            self.unclassified[str(func)] += 1
            out = func(*args, **kwargs)
            self._record(func, args, kwargs, out, _pointwise(_numel(out), other=1))
            return out
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out, self._classify(func, args, kwargs, out))
        return out

    def _record(self, func, args, kwargs, out, cost: Cost) -> None:
        written = written_arguments(func, args, kwargs)
        parents = [n for n in (self._node_of(t) for t in _tensors((args, kwargs))) if n is not None]
        random = torch.Tag.nondeterministic_seeded in func.tags and func not in SDPA
        if not parents and not random:
            return  # a constant (R5): folded into the wiring
        if random:
            parents, cost = [], Cost()  # fresh noise: an input of the circuit
        node = self._new_node(cost, parents, func.overloadpacket.__name__)
        for tensor in written or _tensors(out):
            self._bind(tensor, node)

    # ---- classification

    def _is_data(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and self._node_of(value) is not None

    def _classify(self, func, args, kwargs, out) -> Cost:
        if func in _WIRING:
            return Cost()
        if func in _POINTWISE:
            if func in _SELECTS:
                cond = args[0] if func in _WHERE else args[1]
                if not self._is_data(cond):
                    return Cost()  # selection by a constant mask is wiring
            shape = torch.broadcast_shapes(*(t.shape for t in _tensors(args)))
            return _pointwise(math.prod(shape), **_POINTWISE[func])
        if func in _POW:
            return self._pow_cost(func, args)
        if func in _CASTS:
            source, target = args[0], kwargs.get("dtype") or args[0].dtype
            narrower = source.is_floating_point() and (
                not target.is_floating_point
                or _FLOAT_BITS.get(target, 99) < _FLOAT_BITS.get(source.dtype, 99)
            )
            return _pointwise(source.numel(), std=1) if narrower else Cost()
        if func in _REDUCE:
            kind, extra = _REDUCE[func]
            return _iterated(kind, _numel(out), args[0].numel(), **extra)
        if func in _SCANS:
            source, dim = args[0], args[1]
            length = source.shape[dim] if source.dim() else 1
            terms = source.numel() * (length + 1) // 2
            return _iterated(_SCANS[func], source.numel(), terms)
        if func in _GATHERS:
            index_data = any(
                self._is_data(t) for t in _tensors((args[1:], kwargs))
                if not t.is_floating_point()
            )
            if not index_data:
                return Cost()
            return _pointwise(_numel(out), std=1)
        if func in _MATMULS:
            return self._matmul_cost(func, args, kwargs)
        if func in _CONVS:
            return self._conv_cost(args, out)
        if func in _TAPS or func in _AA_TAPS:
            return self._resample_cost(func, args)
        if func in _POOLS:
            source, size = args[0], args[1]
            windows = math.prod(
                _adaptive_window_total(i, o) for i, o in zip(source.shape[-len(size):], size)
            )
            lead = math.prod(source.shape[: -len(size)])
            outputs = lead * math.prod(size)
            return _iterated("sum", outputs, lead * windows, std=1)
        if func in _AVG_POOLS:
            bound = bind_arguments(func, args, kwargs)
            taps = math.prod(bound["kernel_size"])
            out_numel = _numel(out)
            return _iterated("sum", out_numel, out_numel * taps, std=1)
        raise AssertionError(f"{func} is in _KNOWN but has no rule")

    def _pow_cost(self, func, args) -> Cost:
        base, exponent = args[0], args[1]
        if not isinstance(base, torch.Tensor):  # scalar ** tensor = exp(x * log(scalar))
            return _pointwise(exponent.numel(), exp=1, std=1)
        numel = base.numel()
        if isinstance(exponent, torch.Tensor):
            numel = math.prod(torch.broadcast_shapes(base.shape, exponent.shape))
            return _pointwise(numel, log=1, std=1, exp=1)
        e = float(exponent)
        if e == 1.0:
            return Cost()
        if e in (2.0, -1.0, 0.0):
            return _pointwise(numel, std=1)
        if e == 0.5:
            return _pointwise(numel, sqrt=1)
        if e == -0.5:
            return _pointwise(numel, sqrt=1, std=1)
        if e.is_integer():
            k = abs(int(e))
            cost = _iterated("prod", numel, numel * k)
            if e < 0:
                cost = Cost(_add(cost.depth, _vec(std=1)), {**cost.size, "std": numel})
            return cost
        return _pointwise(numel, log=1, std=1, exp=1)

    @staticmethod
    def _matmul_cost(func, args, kwargs) -> Cost:
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "_addmm_activation"):
            a, b = (args[1], args[2]) if name != "mm" else (args[0], args[1])
            (rows, inner), cols, batch = a.shape, b.shape[1], 1
        elif name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            batch, rows, inner = a.shape
            cols = b.shape[2]
        elif name in ("mv", "addmv"):
            a = args[0] if name == "mv" else args[1]
            (rows, inner), cols, batch = a.shape, 1, 1
        else:  # dot, vdot
            rows, cols, batch, inner = 1, 1, 1, args[0].numel()
        beta = kwargs.get("beta", 1)
        has_bias = name.startswith("add") or name == "baddbmm" or name == "_addmm_activation"
        outputs = batch * rows * cols
        cost = _matmul(outputs * inner, outputs, outputs * inner)
        if has_bias and beta != 0:
            # PyTorch fuses the bias into the product (addmm) or adds it afterwards (mm, add)
            # depending on memory layout; count it as the separate add in both cases so the
            # depth does not depend on that choice.
            size = {**cost.size, "std": cost.size["std"] + outputs}
            cost = Cost(_add(cost.depth, _vec(std=1)), size)
        return cost

    @staticmethod
    def _conv_cost(args, out) -> Cost:
        weight, bias = args[1], args[2]
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else 1
        kernel = math.prod(weight.shape[2:])
        per_output = (weight.shape[0] // groups) * kernel if transposed else (
            weight.shape[1] * kernel
        )
        outputs = _numel(out)
        terms = outputs * (per_output + (1 if bias is not None else 0))
        return _matmul(outputs * per_output, outputs, terms)

    @staticmethod
    def _resample_cost(func, args) -> Cost:
        source, size = args[0], args[1]
        if size is None:
            raise NotImplementedError("resampling by scale factor is not supported")
        per_axis = _TAPS.get(func) or _AA_TAPS[func]
        taps = 1
        for i, o in zip(source.shape[-len(size):], size):
            widen = max(1, math.ceil(i / o)) if func in _AA_TAPS else 1
            taps *= per_axis * widen
        outputs = math.prod(source.shape[: -len(size)]) * math.prod(size)
        return _matmul(outputs * taps, outputs, outputs * taps)

    def _sdpa_cost(self, func, args, kwargs) -> Cost:
        """Fused softmax attention, counted as PyTorch's reference (math) path computes it.

        Path: q * sqrt(s) || k * sqrt(s) (std) -> scores (std + sum) -> [+ mask (std)] ->
        safe softmax: row max (max), subtract (std), exp, row sum (sum), divide (std), and in
        parallel the all-masked-row check (std, max), then the select (std) -> A V (std + sum).
        Terms removed by a constant mask are left out of every count (R5); the depth is the
        same as when the decomposition is traced op by op.
        """
        bound = bind_arguments(func, args, kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask = bound.get("attn_mask")
        if mask is None:
            mask = bound.get("attn_bias")
        *lead, queries, head = q.shape
        keys, head_v = k.shape[-2], v.shape[-1]
        lead_shape = torch.broadcast_shapes(tuple(lead), tuple(k.shape[:-2]))
        groups = math.prod(lead_shape)
        has_mask = isinstance(mask, torch.Tensor)
        if has_mask:
            allowed = mask if mask.dtype == torch.bool else mask != float("-inf")
            entries = int(allowed.expand(*lead_shape, queries, keys).sum())
        elif bound.get("is_causal"):
            entries = groups * sum(min(i + 1 + keys - queries, keys) for i in range(queries))
        else:
            entries = groups * queries * keys
        rows = groups * queries
        depth = _vec(std=6 + int(has_mask or bool(bound.get("is_causal"))), sum=3, max=1, exp=1)
        std = (
            rows * head + groups * keys * head  # scale q and k
            + entries * head  # score products
            + entries * int(has_mask)  # mask add
            + 4 * entries  # subtract max, divide, check (eq), select
            + entries * head_v  # A V products
        )
        size = {
            "std": std,
            "sum": entries + rows + rows * head_v,
            "sum_terms": entries * head + entries + entries * head_v,
            "max": 2 * rows,
            "max_terms": 2 * entries,
            "exp": entries,
        }
        return Cost(depth, size)

    # ---- results

    def count(self, output: Any) -> CircuitCount:
        """Depth and size of the circuit that computes every tensor in ``output``."""
        roots = [n for n in (self._node_of(t) for t in _tensors(output)) if n is not None]
        if not roots:
            raise ValueError("the output does not depend on any input: nothing to count")
        live, stack = set(), list(roots)
        while stack:
            node = stack.pop()
            if node in live:
                continue
            live.add(node)
            stack.extend(self._nodes[node][3])
        size: Counter = Counter()
        by_op: Counter = Counter()
        for node in live:
            node_size = self._nodes[node][2]
            size.update(node_size)
            by_op[self._nodes[node][4]] += sum(node_size.get(k, 0) for k in TOTAL_KEYS)
        depth = _max([self._nodes[r][0] for r in roots])
        crit = max((self._nodes[r][1] for r in roots), key=lambda c: (c[0], c[1]))
        notes = list(self.notes)
        if self._data_scalar_reads:
            notes.append(
                f"{self._data_scalar_reads} data-dependent values were read back to Python "
                "(.item(), bool(), .numpy(), .tolist(): input range checks, or choices such "
                "as a polynomial degree picked from the data); a read that steers the "
                "computation is not in the count, and can make the depth vary with the data"
            )
        return CircuitCount(
            depth=dict(zip(PRIMITIVES, depth)),
            critical_path=dict(zip(PRIMITIVES, crit[1])),
            size={k: int(size.get(k, 0)) for k in SIZE_KEYS},
            total_size=int(sum(size.get(k, 0) for k in TOTAL_KEYS)),
            ops_seen=self.ops_seen,
            live_ops=len(live),
            by_op=dict(by_op.most_common()),
            unclassified=dict(self.unclassified),
            notes=notes,
        )


@dataclass
class CircuitCount:
    """Depth and size of one traced computation.

    Attributes:
        depth: per-primitive longest path (weight-free upper bound, see module docstring).
        critical_path: primitive counts along one longest path under the tracer's weights.
        size: primitive-operation counts by type (``*_terms``: operands of iterated ops).
        total_size: sum of the unit-size counts (see module docstring).
        ops_seen: aten calls observed (including constants and dead code).
        live_ops: data-dependent calls whose results reach the output.
        by_op: total size per aten operator, largest first.
        unclassified: aten ops the tracer did not know (counted as "other").
        notes: caveats found while tracing.
    """

    depth: dict[str, int]
    critical_path: dict[str, int]
    size: dict[str, int]
    total_size: int
    ops_seen: int
    live_ops: int
    by_op: dict[str, int]
    unclassified: dict[str, int]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trace_circuit(
    fn: Any, *inputs: Any, weights: dict[str, float] | None = None
) -> tuple[CircuitCount, Any]:
    """Run ``fn(*inputs)`` under a :class:`CircuitTracer`; tensor inputs are the circuit's inputs.

    Returns:
        (the count for the whole output, the output).
    """
    tracer = CircuitTracer(weights)
    for tensor in _tensors(inputs):
        tracer.mark_input(tensor)
    with tracer:
        out = fn(*inputs)
    return tracer.count(out), out
