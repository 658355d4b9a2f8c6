"""Safe reading and atomic writing of weight files (.safetensors, .pth, .ckpt, .pt, .bin).

Pickled files are only ever opened with ``torch.load(weights_only=True)``: tensors, dicts, lists
and plain numbers load; anything that would need to import and run code (a custom class, a
function call hidden in ``__reduce__``) is refused with a :class:`CheckpointError` and never
executed. The one class allowed beyond torch's own list is ``argparse.Namespace`` (the ``args``
entry of the released FlowAR training checkpoints), whose unpickling only fills a ``__dict__``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from flowar.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Classes beyond torch's weights-only allow-list that are data only (no code runs on load).
_EXTRA_SAFE_GLOBALS = [argparse.Namespace]


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a weight file without executing code from it.

    Args:
        path: a ``.safetensors`` file (returns a flat dict of tensors) or a pickled torch file
            (returns whatever object it holds: a state dict or a checkpoint dict).
        map_location: device for the loaded tensors.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or would need arbitrary code
            to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download or save it again")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        return _read_safetensors(path, map_location)
    return _read_pickle(path, map_location)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a .safetensors header ({} when there is none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors header of {path}: {err}") from None


def _looks_like_safetensors(path: Path) -> bool:
    """True when the file starts like a safetensors file (8-byte length, then '{')."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return False
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except Exception as err:  # SafetensorError, OSError
        raise CheckpointError(
            f"cannot read {path} as safetensors ({err}); the file is probably truncated or "
            "corrupt: download or convert it again"
        ) from None


def _read_pickle(path: Path, map_location: str | torch.device) -> Any:
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found:
                reason = (
                    "it needs arbitrary Python code to unpickle "
                    f"(it references {found.group(1)})"
                )
            else:
                detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
                reason = (
                    "it is not a tensor-only pickle"
                    + (f" ({detail.group(1).strip()})" if detail else "")
                    + ", so it is corrupt or needs arbitrary Python code to unpickle"
                )
            raise CheckpointError(
                f"refusing to load {path}: {reason}. flowar opens pickled files only with "
                "torch.load(weights_only=True) and never runs code from them. If you trust the "
                "file, re-save its state dict as .safetensors in the program that wrote it"
            ) from None
        raise _corrupt(path, err) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as err:
        raise _corrupt(path, err) from None


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"cannot read {path}: the file is truncated or corrupt ({first_line[:160]}); "
        "download or save it again"
    )


def write_safetensors_atomic(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` as safetensors: a temporary file in the same folder, then
    an atomic rename, so a crash never leaves a half-written file under the final name.

    Tensors are made contiguous and moved to the CPU; shared storage is copied.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(plain, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote %d tensors to %s", len(plain), path)
    return path
