"""Training configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flowar.config import check_field_types
from flowar.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing of one training run.

    Attributes:
        dataset: data set name ("mnist", "fashion-mnist", "digits") or an image folder.
        image_size: side the images are resized to (the model's last scale times patch_size).
        patch_size: pixels per token side (space-to-depth pixel codec).
        batch_size: global batch size (split over processes in distributed runs).
        steps: optimiser steps.
        lr: peak learning rate (AdamW).
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay (matrices only; biases, norms, tables excluded).
        betas: AdamW betas.
        grad_clip: max global gradient norm (0 disables clipping).
        ema_decay: decay of the fp32 EMA of the weights.
        bf16: bf16 autocast for forward and backward.
        seed: seed of data order, times, noise and label dropout.
        log_every, sample_every, checkpoint_every: intervals in steps (0 disables).
        keep_checkpoints: how many of the newest step checkpoints to keep.
        nonfinite: "stop" (raise) or "skip" (drop the step) on a non-finite loss or gradient.
        max_skipped: stop anyway after this many consecutive skipped steps.
    """

    dataset: str = "mnist"
    image_size: int = 16
    patch_size: int = 1
    batch_size: int = 64
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 3.0
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    nonfinite: str = "stop"
    max_skipped: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.betas, (list, tuple)):
            object.__setattr__(self, "betas", tuple(self.betas))
        check_field_types(self)
        checks = [
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.patch_size >= 1 and self.image_size % self.patch_size == 0,
             f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "betas must be two numbers in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables it)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (min(self.log_every, self.sample_every, self.checkpoint_every) >= 0,
             "intervals must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.nonfinite in ("stop", "skip"), "nonfinite must be 'stop' or 'skip'"),
            (self.max_skipped >= 1, "max_skipped must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# Training recipes that go with the model presets of flowar.config.PRESETS.
PRESET_TRAINING: dict[str, TrainConfig] = {
    "mnist16": TrainConfig(
        dataset="mnist", image_size=16, patch_size=2, batch_size=64, steps=4000, lr=1e-3,
        min_lr=1e-5, warmup_steps=200, ema_decay=0.999, seed=0, sample_every=500,
        checkpoint_every=500,
    ),
    "mnist16-bounded": TrainConfig(
        dataset="mnist", image_size=16, patch_size=2, batch_size=64, steps=600, lr=1e-3,
        min_lr=1e-5, warmup_steps=50, ema_decay=0.99, seed=0, sample_every=0,
        checkpoint_every=300,
    ),
    "tiny": TrainConfig(
        dataset="digits", image_size=4, patch_size=1, batch_size=32, steps=50, lr=1e-3,
        warmup_steps=5, sample_every=0, checkpoint_every=25,
    ),
}
