"""FlowAR networks: the AR transformer, the flow head and the model that joins them."""

from flowar.model.flowar import ARCache, FlowAR, FlowLoss

__all__ = ["ARCache", "FlowAR", "FlowLoss"]
