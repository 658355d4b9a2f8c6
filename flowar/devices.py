"""Checking device names before any work starts."""

from __future__ import annotations

import torch

from flowar.errors import ConfigError


def parse_device(device: str | torch.device) -> torch.device:
    """A :class:`torch.device`, with a clear error for names torch does not know or lacks.

    Raises:
        ConfigError: an unknown device name, or CUDA/MPS asked for but not available.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r} asked for but CUDA is not available; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA "
                "device(s) visible"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but MPS is not available; use --device cpu")
    return device
