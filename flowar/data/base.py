"""The in-memory image data set every loader returns, plus shared helpers.

Images are kept as one float32 tensor in [0, 1]; the trainer and the evaluator index it
directly, so no ``DataLoader`` is involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flowar.errors import ConfigError

SPLITS = ("train", "test", "all")

# The fixed per-class train/test split of data sets that have no official one (MNIST-5k,
# digits, image folders): this share of each class, shuffled with this seed, is "test".
TEST_FRACTION = 0.1
SPLIT_SEED = 0

# Largest side ``image_size`` may ask for: a guard against typos such as 2560 for 256.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image data set held in memory.

    Attributes:
        images: (N, C, H, W) float32 tensor with values in [0, 1].
        labels: (N,) int64 tensor with values in ``[0, num_classes)``.
        num_classes: number of classes.
        class_names: one readable name per class, in label order.
        name: the name that loads this data set again with :func:`flowar.data.load_dataset`
            (e.g. ``"mnist"`` or ``"folder:/abs/path"``).
        split: which split these images are ("train", "test" or "all").
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    split: str = "all"

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ConfigError(
                f"ImageDataset.images must be a (N, C, H, W) float32 tensor, "
                f"got shape {tuple(images.shape)} and dtype {images.dtype}"
            )
        if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise ConfigError(
                f"ImageDataset.labels must be a ({len(images)},) int64 tensor, "
                f"got shape {tuple(labels.shape)} and dtype {labels.dtype}"
            )
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"ImageDataset: {len(self.class_names)} class names for "
                f"{self.num_classes} classes"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(f"ImageDataset: labels must lie in [0, {self.num_classes})")
        if len(images) and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise ConfigError("ImageDataset: image values must lie in [0, 1]")
        if self.split not in SPLITS:
            raise ConfigError(f"ImageDataset: split must be one of {SPLITS}, got {self.split!r}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return self.images.shape[-1]


def check_split(split: str) -> None:
    """Raise :class:`ConfigError` unless ``split`` is a known split name."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


def check_image_size(image_size: int | None) -> None:
    """Raise :class:`ConfigError` unless ``image_size`` is None or a sensible positive int."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be between 1 and {MAX_IMAGE_SIZE}, got {image_size}")


def resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize (N, C, H, W) images in [0, 1] to ``image_size`` x ``image_size``.

    Uses bilinear interpolation with ``antialias=True``: when shrinking (28 -> 16 for MNIST) the
    filter widens with the scale factor, so every source pixel contributes (no aliasing); when
    enlarging (8 -> 16 for digits) it is plain bilinear. The result is clamped to [0, 1].
    ``None`` or the current size returns the input unchanged.
    """
    if image_size is None or images.shape[-2:] == (image_size, image_size):
        return images
    out = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False,
        antialias=True,
    )
    return out.clamp_(0.0, 1.0)


def stratified_split(
    labels: np.ndarray, split: str, *, test_fraction: float, seed: int
) -> np.ndarray:
    """Indices of one split of a deterministic, per-class (stratified) train/test split.

    Within each class the indices are shuffled with ``seed`` and the first
    ``round(n_class * test_fraction)`` go to "test", the rest to "train"; "all" keeps every
    index. The result is sorted, so the order of the source is kept.
    """
    check_split(split)
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_test = int(round(len(members) * test_fraction))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
