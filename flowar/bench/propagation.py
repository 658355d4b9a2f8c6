"""How far the per-call certified attention bounds carry through a whole FlowAR sampling run.

Every ``poly`` attention call certifies ``max |out - exact out| <= bound_i``. To turn those into a
statement about the generated map, sample once with exact attention while

* a *shadow* ``poly`` backend runs on exactly the same queries, keys and values of every call
  (with its own constant-size state), giving ``bound_i`` at the exact trajectory and the
  measured per-call error, so each certificate is also checked inside the model;
* a zero perturbation ``delta_i`` is added to each exact attention output, so autograd gives
  the sensitivity of every output entry ``y_o`` to every call.

The first-order propagated bound is then

    |y_poly - y_exact|_o <= sum_i bound_i * || d y_o / d a_i ||_1   (+ second-order terms),

maximised over output entries ``o``. It is a linearisation around the exact trajectory, not a
rigorous certificate for the whole network (a global one would need Lipschitz constants of every
layer, which are astronomically loose here); second-order terms scale like ``bound^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowar.attention.base import AttentionBackend, AttentionState, BlockLayout
from flowar.attention.poly import PolyAttention
from flowar.bench.common import wrapped_backends
from flowar.config import AttentionConfig, SamplingConfig
from flowar.flow.sampler import generate


@dataclass
class _ProbeState(AttentionState):
    inner: AttentionState
    shadow: AttentionState

    def nbytes(self) -> int:
        return self.inner.nbytes()


class _Probe(AttentionBackend):
    """Runs ``inner``, shadows it with ``shadow`` and adds a zero leaf ``delta`` to its output."""

    def __init__(self, inner: AttentionBackend, shadow: PolyAttention, record: PropagationReport):
        super().__init__(inner.head_dim)
        self.inner, self.shadow, self.record = inner, shadow, record

    def new_state(self) -> _ProbeState:
        return _ProbeState(self.inner.new_state(), self.shadow.new_state())

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
        inner_state = state.inner if isinstance(state, _ProbeState) else None
        shadow_state = state.shadow if isinstance(state, _ProbeState) else None
        out = self.inner(q, k, v, scale=scale, layout=layout, state=inner_state)
        with torch.no_grad():
            approx, stats = self.shadow.attend(
                q.detach(), k.detach(), v.detach(), scale=scale, layout=layout,
                state=shadow_state,
            )
        self.record.bounds.append(stats.bound)
        self.record.errors.append(float((approx - out.detach()).abs().max()))
        self.record.betas.append(stats.beta)
        delta = torch.zeros_like(out, requires_grad=True)
        self.record.deltas.append(delta)
        return out + delta


@dataclass
class PropagationReport:
    """Per-call certificates along the exact trajectory and their first-order propagation.

    Attributes:
        bounds: certified bound of every attention call, in call order.
        errors: measured ``max |poly - exact|`` of every call on the same inputs.
        betas: certified logit half-width of every call.
        gains: (outputs, calls) ``|| d y_o / d a_i ||_1``.
        propagated: ``max_o sum_i bounds_i * gains[o, i]``.
        outputs: the exact run's generated maps (coarsest first).
    """

    bounds: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)
    gains: torch.Tensor | None = None
    propagated: float = float("nan")
    outputs: list[torch.Tensor] = field(default_factory=list)


def propagate_bounds(
    model,
    labels: torch.Tensor | None,
    sampling: SamplingConfig,
    attention: AttentionConfig,
    *,
    seed: int = 0,
    num_images: int | None = None,
    last_scale_only: bool = True,
) -> PropagationReport:
    """Sample with ``model``'s own (exact) attention, shadowed by ``poly`` per ``attention``.

    Args:
        model: a FlowAR model (its backends are restored afterwards).
        labels, sampling, seed, num_images: as for :func:`flowar.flow.sampler.generate`.
        attention: the ``poly`` configuration whose bounds are propagated.
        last_scale_only: propagate to the final map only (else to every scale's map).

    Returns:
        The :class:`PropagationReport`; one backward pass per output entry is run.
    """
    if attention.backend != "poly":
        raise ValueError(f"bounds can be propagated for the poly backend, not {attention.backend}")
    record = PropagationReport()

    def probe(backend: AttentionBackend) -> _Probe:
        return _Probe(backend, PolyAttention.from_config(attention, backend.head_dim), record)

    with wrapped_backends(model, probe), torch.enable_grad():
        # generate() is decorated with no_grad; its undecorated body keeps the graph
        outputs = generate.__wrapped__(model, labels, sampling, seed=seed, num_images=num_images)
        picked = outputs[-1:] if last_scale_only else outputs
        y = torch.cat([o.reshape(-1) for o in picked])
        gains = torch.zeros(y.numel(), len(record.deltas), dtype=torch.float64)
        for index in range(y.numel()):
            grads = torch.autograd.grad(
                y[index], record.deltas, retain_graph=True, allow_unused=True
            )
            for call, g in enumerate(grads):
                if g is not None:
                    gains[index, call] = g.detach().abs().sum().double()
    bounds = torch.tensor(record.bounds, dtype=torch.float64)
    record.gains = gains
    record.propagated = float((gains * bounds).sum(dim=1).max())
    record.outputs = [o.detach() for o in outputs]
    record.deltas = []
    return record
