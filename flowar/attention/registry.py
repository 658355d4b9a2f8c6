"""Backend names and the factory the model uses for every attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowar.attention.auto import AutoAttention
from flowar.attention.base import AttentionBackend
from flowar.attention.exact import ExactAttention
from flowar.attention.performer import PerformerAttention
from flowar.attention.poly import PolyAttention

if TYPE_CHECKING:
    from flowar.config import AttentionConfig

BACKENDS: dict[str, type[AttentionBackend]] = {
    "exact": ExactAttention,
    "poly": PolyAttention,
    "performer": PerformerAttention,
    "auto": AutoAttention,
}


def build_backend(config: AttentionConfig, head_dim: int) -> AttentionBackend:
    """Build the backend named by ``config.backend`` for heads of width ``head_dim``."""
    try:
        cls = BACKENDS[config.backend]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown attention backend {config.backend!r}; known: {known}") from None
    if cls is ExactAttention:
        return ExactAttention(head_dim)
    return cls.from_config(config, head_dim)  # type: ignore[attr-defined]
