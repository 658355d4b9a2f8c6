"""The small CNN classifier used to score generated images, its training and its files.

The classifier is trained by the project itself on the training split of a bundled data set
(no pretrained network is available offline). Its penultimate layer is the feature space of the
Frechet distance in :mod:`flowar.eval.metrics`.

A saved classifier is a folder::

    config.json        {"format": "flowar-classifier", "version": 1, "config": {...},
                        "training": {data set, image size, seed, command, test accuracy, ...}}
    model.safetensors  the weights
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowar.data import ImageDataset
from flowar.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

FORMAT = "flowar-classifier"
VERSION = 1
SHIPPED_CLASSIFIER = "classifier-mnist16"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the classifier.

    Attributes:
        in_channels: image channels (1 grey, 3 RGB).
        image_size: side of the square input images.
        num_classes: number of classes.
        width: channels of the first conv stage (the second has twice as many).
        feature_dim: size of the penultimate layer (the Frechet-distance features).
        dropout: dropout before the last layer (training only).
    """

    in_channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64
    dropout: float = 0.25

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes", "width", "feature_dim"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1,
                     f"classifier {name} must be a positive integer, got {value!r}")
        _require(self.image_size >= 4,
                 f"classifier image_size must be >= 4 (two 2x poolings), got {self.image_size}")
        _require(self.num_classes >= 2,
                 f"classifier num_classes must be >= 2, got {self.num_classes}")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 f"classifier dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def pooled_size(self) -> int:
        """Side of the feature map entering the fully connected layer."""
        return min(4, self.image_size // 4)

    @classmethod
    def for_dataset(cls, dataset: ImageDataset, **overrides: Any) -> ClassifierConfig:
        """A config whose input shape and class count match ``dataset``."""
        return cls(in_channels=dataset.channels, image_size=dataset.image_size,
                   num_classes=dataset.num_classes, **overrides)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Two conv stages (conv-conv-pool each), a fully connected feature layer and a linear head.

    Inputs are images in [0, 1] of shape (B, in_channels, image_size, image_size).
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w, p = config.width, config.pooled_size
        self.body = nn.Sequential(
            _conv_block(config.in_channels, w), _conv_block(w, w), nn.MaxPool2d(2),
            _conv_block(w, 2 * w), _conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(p),
        )
        self.fc = nn.Linear(2 * w * p * p, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        # Set by load_classifier: how the weights were trained (data set, accuracy, command).
        self.metadata: dict[str, Any] = {}

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"classifier expects images of shape (B, {c.in_channels}, {c.image_size}, "
                f"{c.image_size}), got {tuple(x.shape)}; train a classifier for this image "
                "size with `flowar eval --train-classifier`"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [0, 1] -> (B, feature_dim) penultimate activations."""
        self._check_input(x)
        h = self.body(x * 2.0 - 1.0)  # (B, 2w, p, p)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [0, 1] -> (B, num_classes) logits."""
        return self.head(self.dropout(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass: (B, feature_dim) features and (B, num_classes) logits."""
        feats = self.features(x)
        return feats, self.head(self.dropout(feats))


def _random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels in each direction (zero fill)."""
    if shift == 0:
        return x
    batch, side = x.shape[0], x.shape[-1]
    padded = F.pad(x, (shift, shift, shift, shift))  # (B, C, S + 2s, S + 2s)
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator)
    grid = torch.arange(side)
    rows = (offsets[:, :1] + grid)[:, :, None]  # (B, S, 1)
    cols = (offsets[:, 1:] + grid)[:, None, :]  # (B, 1, S)
    out = padded.permute(0, 2, 3, 1)[torch.arange(batch)[:, None, None], rows, cols]  # (B, S, S, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, S, S)


def train_classifier(
    dataset: ImageDataset,
    config: ClassifierConfig | None = None,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    shift: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Classifier:
    """Train a classifier on ``dataset`` with AdamW and a cosine learning-rate decay.

    Deterministic for a given ``seed`` on CPU (the global RNG state is saved and restored).

    Args:
        dataset: training images and labels.
        config: network shape; None derives it from ``dataset`` with default widths.
        epochs, batch_size, lr, weight_decay: optimisation settings.
        shift: augmentation: random translation of up to this many pixels (0 = none);
            None picks ``image_size // 16`` (1 pixel at 16-31 px, none for 8x8 digits).
        seed: seeds weight initialisation, batch order, augmentation and dropout.
        progress: called after every step with (step, total_steps, loss).

    Returns:
        The trained classifier in eval mode.
    """
    config = config or ClassifierConfig.for_dataset(dataset)
    expected = (config.in_channels, config.image_size, config.num_classes)
    got = (dataset.channels, dataset.image_size, dataset.num_classes)
    _require(expected == got, f"classifier config (channels, size, classes) = {expected} does "
             f"not match the data set {dataset.name!r}: {got}")
    _require(_is_int(epochs) and epochs >= 1, f"epochs must be a positive integer, got {epochs!r}")
    _require(_is_int(batch_size) and batch_size >= 1,
             f"batch_size must be a positive integer, got {batch_size!r}")
    _require(math.isfinite(lr) and lr > 0, f"lr must be a positive number, got {lr!r}")
    if shift is None:
        shift = config.image_size // 16
    _require(_is_int(shift) and shift >= 0, f"shift must be an integer >= 0, got {shift!r}")
    _require(len(dataset) >= 1, "cannot train a classifier on an empty data set")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = Classifier(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(dataset) / batch_size)
        total = epochs * steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
        )
        model.train()
        step = 0
        for epoch in range(epochs):
            order = torch.randperm(len(dataset), generator=generator)
            running = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                images = _random_shift(dataset.images[idx], shift, generator)
                loss = F.cross_entropy(model(images), dataset.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                running += loss.item()
                if progress is not None:
                    progress(step, total, loss.item())
            logger.debug("classifier epoch %d: mean loss %.4f", epoch + 1,
                         running / steps_per_epoch)
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """(N,) predicted class ids for (N, C, S, S) images in [0, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = [model(images[i : i + batch_size].to(device)).argmax(1).cpu()
             for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def accuracy(model: Classifier, dataset: ImageDataset) -> float:
    """Share of ``dataset`` the classifier labels correctly."""
    return float((predict(model, dataset.images) == dataset.labels).float().mean())


def shipped_classifier_dir() -> Path:
    """Folder of the classifier shipped with the package (MNIST, 16x16 pixels)."""
    return Path(__file__).resolve().parent.parent / "assets" / SHIPPED_CLASSIFIER


def _make_readable(folder: Path) -> None:
    """Give a temporary folder and its files the usual permissions (mkdtemp makes them 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def save_classifier(
    model: Classifier, directory: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to a folder (config.json + model.safetensors), atomically.

    The files are written into a temporary folder next to ``directory`` which then replaces it,
    so a crash never leaves a half-written classifier behind.

    Args:
        model: the classifier.
        directory: the folder to write; replaced if it exists.
        metadata: JSON-ready facts about training (stored under "training").
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(model.config),
        "training": dict(metadata if metadata is not None else model.metadata),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        _make_readable(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved classifier to %s", directory)
    return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Read a classifier folder written by :func:`save_classifier` (in eval mode).

    Raises:
        CheckpointError: the folder or a file is missing, corrupt or does not match the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"classifier folder {directory} does not exist; train one with `flowar eval "
            "--train-classifier --dataset NAME --image-size N --out DIR`"
        )
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"classifier folder {directory} has no {path.name}")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a {FORMAT} config (format tag missing)")
    if info.get("version") != VERSION:
        raise CheckpointError(
            f"{config_path} has version {info.get('version')!r}; this flowar reads {VERSION}"
        )
    try:
        config = ClassifierConfig(**info["config"])
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{config_path} holds an invalid classifier config: {err}") from None

    try:
        weights = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt ({err})") from None
    model = Classifier(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:2]
        raise CheckpointError(
            f"{weights_path} does not match {config_path}: {' '.join(first)}"
        ) from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(f"{weights_path} holds non-finite values in {bad[:3]}")
    model.metadata = dict(info.get("training") or {})
    return model.to(device).eval()
