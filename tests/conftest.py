"""Shared fixtures: tiny models and configs that run in milliseconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from flowar.config import FlowARConfig, FlowHeadConfig


def tiny_config(**changes) -> FlowARConfig:
    """A two-block FlowAR with 3 scales, 2 channels and 5 classes."""
    base = dict(
        scales=(1, 2, 4), channels=2, num_classes=5, width=32, encoder_depth=1, decoder_depth=1,
        num_heads=2, label_drop_prob=0.0,
        flow=FlowHeadConfig(width=32, depth=1, num_heads=2, time_embed_dim=32),
    )
    base.update(changes)
    return FlowARConfig(**base)


@pytest.fixture
def tiny() -> FlowARConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
