"""Training checkpoints: a folder with safetensors weights, a JSON config and optimizer state.

Layout of a checkpoint folder::

    config.json        format tag, model config, codec, data, training config and state
    model.safetensors  raw weights
    ema.safetensors    EMA weights (optional; preferred for sampling)
    optimizer.pt       optimizer and scheduler state dicts (tensors and numbers only, so
                       torch.load(weights_only=True) reads it)

A folder is written under a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowar.config import FlowARConfig, model_config_from_dict, to_dict
from flowar.errors import CheckpointError, ConfigError
from flowar.io.weights import read_weights

logger = logging.getLogger(__name__)

FORMAT = "flowar-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint folder holds once read."""

    path: Path
    model_config: FlowARConfig
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = field(default=None, repr=False)

    def best_weights(self) -> dict[str, torch.Tensor]:
        """EMA weights when present, else the raw weights."""
        return self.ema_weights if self.ema_weights is not None else self.weights


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    model_config: FlowARConfig,
    weights: dict[str, torch.Tensor],
    *,
    ema_weights: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temporary folder, fsync, rename).

    Args:
        directory: final folder; replaced if it exists.
        model_config: the model's config, stored as JSON.
        weights: model state dict.
        ema_weights: EMA state dict (optional).
        optimizer: optimizer/scheduler state (optional; tensors, numbers, lists, dicts only).
        meta: JSON-ready extra data (codec, data set, training config and state).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        info = {"format": FORMAT, "version": VERSION, "model": to_dict(model_config)}
        info.update(meta or {})
        (tmp / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        for name, tensors in (("model", weights), ("ema", ema_weights)):
            if tensors is not None:
                plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
                save_file(plain, tmp / f"{name}.safetensors")
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", directory)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder, validated for format."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file; a flowar checkpoint is a folder with config.json and "
            "model.safetensors (use 'flowar convert' for released .pth files)"
        )
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json; it is not a flowar checkpoint")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); the checkpoint is corrupt"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config (format tag missing)")
    return info


def load_checkpoint(directory: str | Path, *, with_optimizer: bool = False) -> Checkpoint:
    """Read a checkpoint folder (weights via safetensors; optimizer only if asked)."""
    directory = Path(directory)
    info = read_config(directory)
    try:
        model_config = model_config_from_dict(info["model"])
    except (KeyError, ConfigError, TypeError) as err:
        raise CheckpointError(
            f"{directory}/config.json has an invalid model config: {err}"
        ) from None
    if not (directory / "model.safetensors").exists():
        raise CheckpointError(f"{directory} has no model.safetensors")
    weights = read_weights(directory / "model.safetensors")
    ema = None
    if (directory / "ema.safetensors").exists():
        ema = read_weights(directory / "ema.safetensors")
    optimizer = None
    if with_optimizer and (directory / "optimizer.pt").exists():
        optimizer = read_weights(directory / "optimizer.pt")
    meta = {k: v for k, v in info.items() if k not in ("format", "version", "model")}
    return Checkpoint(directory, model_config, meta, weights, ema, optimizer)
