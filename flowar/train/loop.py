"""The training loop: AdamW + warm-up/cosine schedule, fp32 EMA, checkpoints, sample grids.

Everything random in a step (data order, flow times, noise, label dropout) is derived from the
seed and the step number, so a resumed run continues exactly the same run.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flowar.codecs.base import PixelCodec
from flowar.config import FlowARConfig, SamplingConfig, to_dict
from flowar.errors import ConfigError, UserError
from flowar.flow.sampler import generate, image_seed
from flowar.io.checkpoint import load_checkpoint, save_checkpoint
from flowar.model import FlowAR
from flowar.train.config import TrainConfig
from flowar.viz import save_grid

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite."""


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    out_dir: Path
    last_checkpoint: Path | None
    steps_done: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0


StepHook = Callable[[int, dict[str, float]], None]


def check_compatible(model_config: FlowARConfig, images: torch.Tensor, num_classes: int) -> None:
    """Raise a :class:`ConfigError` if the data does not fit the model config."""
    _, channels, height, width = images.shape
    if channels != model_config.channels:
        raise ConfigError(
            f"the data gives {channels}-channel tokens but the model expects "
            f"{model_config.channels}; set channels = image channels * patch_size^2"
        )
    if height != model_config.size or width != model_config.size:
        raise ConfigError(
            f"the data gives {height}x{width} token maps but the model's last scale is "
            f"{model_config.size}; the last scale must equal image_size / patch_size"
        )
    if num_classes != model_config.num_classes:
        raise ConfigError(
            f"the data has {num_classes} classes but the model has {model_config.num_classes}"
        )


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms or tables)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_table = "pos_embed" in name or "class_emb" in name
        (decay if param.dim() >= 2 and not is_table else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the batch of ``step``: epochs of seeded permutations, last partial dropped."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the data set ({num_items})")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def checkpoints_in(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run, sorted by step."""
    found = []
    for path in out_dir.glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "config.json").exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def run_meta(dataset: Any, train_config: TrainConfig, step: int, codec: PixelCodec) -> dict:
    """JSON-ready metadata stored beside the weights."""
    return {
        "codec": {
            "type": "pixel", "image_channels": codec.image_channels,
            "patch_size": codec.patch_size,
        },
        "data": {
            "dataset": dataset.name,
            "image_size": train_config.image_size,
            "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names),
        },
        "train": to_dict(train_config),
        "state": {"step": step},
    }


def train(
    model_config: FlowARConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    dataset: Any = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train a FlowAR model.

    Args:
        model_config: the model to build.
        train_config: optimisation and bookkeeping.
        out_dir: run folder (checkpoints, samples, logs).
        resume: continue from the newest complete checkpoint in ``out_dir``.
        device: where to train.
        dataset: an already loaded :class:`flowar.data.ImageDataset` (default: load
            ``train_config.dataset``).
        on_step: called after every step with (step, metrics).
    """
    from flowar.data import load_dataset

    out_dir = Path(out_dir)
    device = torch.device(device)
    torch.manual_seed(train_config.seed)

    # Data: decoded once into latents (the pixel codec is a rescale).
    if dataset is None:
        dataset = load_dataset(train_config.dataset, split="train",
                               image_size=train_config.image_size)
    codec = PixelCodec(dataset.images.shape[1], train_config.patch_size)
    latents = codec.encode(dataset.images).to(device)
    labels = dataset.labels.to(device)
    check_compatible(model_config, latents, dataset.num_classes)

    # Model, EMA, optimiser, schedule.
    model = FlowAR(model_config).to(device)
    ema = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(train_config.ema_decay), use_buffers=True
    )
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train_config)
    )

    start = 0
    existing = checkpoints_in(out_dir) if out_dir.exists() else []
    if existing and not resume:
        raise UserError(
            f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose "
            "another output folder"
        )
    if resume and existing:
        step, path = existing[-1]
        ckpt = load_checkpoint(path, with_optimizer=True)
        if ckpt.model_config != model_config:
            raise ConfigError(f"{path} was trained with another model config; cannot resume")
        model.load_state_dict(ckpt.weights)
        ema.module.load_state_dict(ckpt.ema_weights or ckpt.weights)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer["optimizer"])
            scheduler.load_state_dict(ckpt.optimizer["scheduler"])
            ema.n_averaged.fill_(int(ckpt.optimizer.get("ema_updates", step)))
        start = step
        logger.info("resumed from %s at step %d", path, step)

    out_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(out_dir, existing[-1][1] if existing else None, start)
    logger.info(
        "training %.2fM parameters on %d images (%s), %d steps from step %d",
        sum(p.numel() for p in params) / 1e6, len(latents), dataset.name,
        train_config.steps, start,
    )

    def save(step: int) -> Path:
        path = out_dir / f"checkpoint-{step:07d}"
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema_updates": int(ema.n_averaged),
        }
        save_checkpoint(
            path, model_config, model.state_dict(), ema_weights=ema.module.state_dict(),
            optimizer=state, meta=run_meta(dataset, train_config, step, codec),
        )
        for _, old in checkpoints_in(out_dir)[: -train_config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        result.last_checkpoint = path
        return path

    model.train()
    consecutive_skips = 0
    tick = time.perf_counter()
    for step in range(start, train_config.steps):
        # One optimiser step; all randomness comes from (seed, step).
        index = batch_indices(step, len(latents), train_config.batch_size, train_config.seed)
        generator = torch.Generator(device).manual_seed(image_seed(train_config.seed, step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_config.bf16):
            loss = model.loss(latents[index], labels[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        max_norm = train_config.grad_clip if train_config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

        # Non-finite guard: never step (or checkpoint) on a broken loss or gradient.
        if not (torch.isfinite(loss.total) and torch.isfinite(grad_norm)):
            message = (f"non-finite loss ({float(loss.total):.4g}) or gradient norm "
                       f"({float(grad_norm):.4g}) at step {step}")
            consecutive_skips += 1
            result.skipped_steps += 1
            if train_config.nonfinite == "stop" or consecutive_skips >= train_config.max_skipped:
                raise NonFiniteError(
                    f"{message}; stopping. The last good checkpoint is "
                    f"{result.last_checkpoint or 'none'}. Lower the learning rate, disable "
                    "bf16, or use --nonfinite skip."
                )
            logger.warning("%s; skipping the step", message)
            optimizer.zero_grad(set_to_none=True)
            continue
        consecutive_skips = 0
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)

        done = step + 1
        value = float(loss.total)
        result.losses.append(value)
        result.steps_done = done
        now = time.perf_counter()
        metrics = {
            "loss": value,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "images_per_s": len(index) / max(now - tick, 1e-9),
        }
        tick = now
        if on_step is not None:
            on_step(done, metrics)
        if train_config.log_every and done % train_config.log_every == 0:
            per_scale = " ".join(f"{float(x):.3f}" for x in loss.per_scale)
            logger.info(
                "step %d loss %.4f (per scale %s) lr %.2e grad %.2f %.1f img/s", done, value,
                per_scale, metrics["lr"], metrics["grad_norm"], metrics["images_per_s"],
            )
        if train_config.sample_every and done % train_config.sample_every == 0:
            write_sample_grid(ema.module, codec, out_dir / "samples" / f"step-{done:07d}.png")
            model.train()
        if (train_config.checkpoint_every and done % train_config.checkpoint_every == 0) or (
            done == train_config.steps
        ):
            save(done)
    return result


def write_sample_grid(model: FlowAR, codec, path: Path, per_class: int = 4) -> Path:
    """A grid with ``per_class`` EMA samples of every class (one column per class)."""
    classes = model.config.num_classes
    labels = torch.arange(classes).repeat(per_class)
    latents = generate(model, labels, SamplingConfig(steps=10), seed=0)[-1]
    return save_grid(codec.decode(latents.float()), path, nrow=classes, scale=2)


def export_model(
    checkpoint: str | Path, destination: str | Path, sampling: SamplingConfig | None = None
) -> Path:
    """Write a sampling-only copy of a checkpoint: EMA weights as model.safetensors + config.

    Args:
        checkpoint: a training checkpoint folder.
        destination: the new folder.
        sampling: recommended sampling settings, stored as the model's defaults.
    """
    ckpt = load_checkpoint(checkpoint)
    meta = dict(ckpt.meta)
    meta["source_checkpoint"] = Path(checkpoint).name
    if sampling is not None:
        meta["sampling"] = to_dict(sampling)
    return save_checkpoint(destination, ckpt.model_config, ckpt.best_weights(), meta=meta)
