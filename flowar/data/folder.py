"""An image-folder data set: one sub-folder per class, PNG or JPEG files inside.

Layout::

    ROOT/
      cat/  a.png  b.jpg ...
      dog/  c.png ...

Classes are the non-hidden sub-folders, sorted by name. Every PNG/JPEG file of every class is
decoded (so a corrupt file is reported whichever split is asked for, and both splits get the
same channel count). Images become grey (1 channel) when every image is grey, otherwise RGB;
an alpha channel is dropped. Non-square images are centre-cropped to a square, then resized
with :func:`flowar.data.base.resize`. The train/test split is a fixed per-class split
(10 % test, seed 0), the same as for the digits data set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flowar.data.base import SPLIT_SEED, TEST_FRACTION, resize, stratified_split
from flowar.errors import DatasetUnavailable

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_image_folder(root: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """The image files of a class-per-sub-folder tree, their labels and the class names."""
    if not root.exists():
        raise DatasetUnavailable(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {root} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not class_dirs:
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DatasetUnavailable(
            f"image folder {root} has no class sub-folders{hint}; put the images of each class "
            f"in their own sub-folder, e.g. {root}/<class name>/<image>.png"
        )
    if loose:
        logger.warning("ignoring %d images directly in %s (not in a class folder)",
                       len(loose), root)
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        members = sorted(
            p for p in class_dir.iterdir()
            if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not members:
            raise DatasetUnavailable(
                f"class folder {class_dir} holds no images (PNG or JPEG files); add images or "
                "remove the folder"
            )
        files.extend(members)
        labels.extend([label] * len(members))
    return files, np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs)


def _decode(path: Path) -> tuple[np.ndarray, bool]:
    """One image as an (H, W, 3) or (H, W, 1) float32 array in [0, 1], and whether it is grey."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here
            mode = image.mode
            if mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey
                pixels = np.asarray(image, dtype=np.float32)
                top = 65535.0 if mode != "I" or pixels.max() > 255 else 255.0
                return np.clip(pixels / top, 0, 1)[..., None], True
            if mode == "F":
                return np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None], True
            if mode in _GREY_MODES:
                return np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0, True
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetUnavailable(
            f"cannot read image file {path}: {err}; replace or remove the file"
        ) from None
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return (rgb[..., :1] if grey else rgb), grey


def _centre_square(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def load_image_folder(
    root: str | Path, split: str, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], str]:
    """Images (N, C, S, S) float32, labels (N,), class names and canonical name of a folder."""
    root = Path(root).expanduser().resolve()
    files, labels, class_names = list_image_folder(root)
    decoded = [_decode(path) for path in files]
    all_grey = all(grey for _, grey in decoded)
    channels = 1 if all_grey else 3

    keep = stratified_split(labels, split, test_fraction=TEST_FRACTION, seed=SPLIT_SEED)
    if len(keep) == 0:
        raise DatasetUnavailable(
            f"image folder {root} is too small to hold out a {split!r} split (10 % of each "
            "class, rounded); add images (at least 5 per class) or use split='all'"
        )
    squares = []
    for index in keep:
        pixels = _centre_square(decoded[index][0])
        if pixels.shape[-1] != channels:  # a grey image in an RGB data set
            pixels = np.repeat(pixels, channels, axis=-1)
        squares.append(pixels)

    sizes = sorted({p.shape[0] for p in squares})
    if image_size is None and len(sizes) > 1:
        raise DatasetUnavailable(
            f"images in {root} have different sizes ({sizes[0]} to {sizes[-1]} pixels after a "
            "centre crop to a square); pass an image size (image_size= / --image-size)"
        )
    target = image_size if image_size is not None else sizes[0]
    images = torch.empty(len(squares), channels, target, target)
    for side in sizes:  # resize all images of one size together
        idx = [i for i, p in enumerate(squares) if p.shape[0] == side]
        batch = torch.from_numpy(np.stack([squares[i] for i in idx]))  # (n, side, side, C)
        images[idx] = resize(batch.permute(0, 3, 1, 2).contiguous(), target)  # (n, C, S, S)
    logger.info("loaded %d images of %d classes from %s (%s split, %d channels, %d px)",
                len(images), len(class_names), root, split, channels, target)
    return images, torch.from_numpy(labels[keep]), class_names, f"folder:{root}"
