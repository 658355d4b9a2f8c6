"""Shared plumbing of the two analysis modes (precision and circuit): which aten ops are expanded
into simpler ones before they are rounded or counted, and which arguments an op writes.

Both modes see the model through :class:`torch.utils._python_dispatch.TorchDispatchMode`, i.e.
one call per aten operator actually executed, so they need no change to the model code. Fused
kernels that hide several primitive operations behind one call (softmax, GELU, the norms, fused
attention) are replaced by their reference decompositions, run with the mode still active, so
every exp, sum and division inside them is seen on its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._decomp import decomposition_table

aten = torch.ops.aten


def _overloads(*packets: Any) -> frozenset:
    ops = []
    for packet in packets:
        ops.extend(getattr(packet, name) for name in packet.overloads())
    return frozenset(ops)


def _maybe(name: str) -> list:
    packet = getattr(aten, name, None)
    return [packet] if packet is not None else []


# Fused ops made of several primitives: always expanded (when a decomposition exists).
FUSED = _overloads(
    aten._softmax, aten._log_softmax, aten._safe_softmax, aten.gelu, aten.silu, aten.softplus,
    aten.mish, aten.hardswish, aten.native_layer_norm, aten.native_group_norm, aten.var_mean,
    aten.var, aten.std, aten.std_mean, aten.logsumexp, aten.linalg_vector_norm,
    aten._scaled_dot_product_flash_attention_for_cpu,
    *_maybe("_fused_rms_norm"),
)

# Fused attention kernels (different devices choose different ones).
SDPA = _overloads(
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_attention_math,
    *_maybe("_scaled_dot_product_flash_attention"),
    *_maybe("_scaled_dot_product_efficient_attention"),
    *_maybe("_scaled_dot_product_cudnn_attention"),
    *_maybe("_scaled_dot_product_fused_attention_overrideable"),
)


def has_composite_kernel(func: torch._ops.OpOverload) -> bool:
    """True when ``func`` is defined in terms of other aten ops (CompositeImplicitAutograd)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeImplicitAutograd"
    )


def decompose(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` through its reference decomposition; NotImplemented when it has none.

    Call this with the dispatch mode active (``with self:``) so that the ops of the
    decomposition are seen one by one.
    """
    if func in decomposition_table:
        return decomposition_table[func](*args, **kwargs)
    if has_composite_kernel(func):
        return func.decompose(*args, **kwargs)
    return NotImplemented


def written_arguments(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list:
    """The tensors an op writes in place (``self`` of ``add_``, ``out=`` tensors)."""
    written = []
    for index, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = kwargs.get(arg.name) if arg.kwarg_only or index >= len(args) else args[index]
        if isinstance(value, torch.Tensor):
            written.append(value)
        elif isinstance(value, (list, tuple)):
            written.extend(v for v in value if isinstance(v, torch.Tensor))
    return written


def bind_arguments(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of one call by schema name (defaults filled in)."""
    bound: dict[str, Any] = {}
    for index, arg in enumerate(func._schema.arguments):
        if index < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[index]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound
