"""Image grids and figures written as PNG files."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(B, C, H, W) images in [0, 1] -> a uint8 (rows*H', cols*W', 3) grid with white padding."""
    if images.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, _, height, width = images.shape
    cols = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = torch.ones(3, rows * (height + pad) + pad, cols * (width + pad) + pad)
    for i in range(count):
        r, c = divmod(i, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[:, top : top + height, left : left + width] = images[i]
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def upscale(images: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest-neighbour enlargement to side x side, so small maps stay visibly blocky."""
    return F.interpolate(images.float(), size=(side, side), mode="nearest")


def _world_readable(path: str | Path) -> None:
    """Give a temporary file the permissions a plain open() would (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 (H, W, 3) array as PNG atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        _world_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1):
    """Save (B, C, H, W) images in [0, 1] as one PNG grid."""
    return save_png(grid_array(images, nrow), path, scale)


def save_progression(
    per_scale: list[torch.Tensor], path: str | Path, max_rows: int = 10
) -> Path:
    """A figure with one row per image and one column per scale (1x1 up to n x n).

    Coarse scales are enlarged with nearest-neighbour so their blocks stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(max_rows, per_scale[0].shape[0])
    side = per_scale[-1].shape[-1]
    cols = len(per_scale)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    for c, images in enumerate(per_scale):
        big = upscale(images[:rows], side)
        for r in range(rows):
            ax = axes[r][c]
            picture = big[r].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture,
                      cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{images.shape[-1]}x{images.shape[-1]}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
