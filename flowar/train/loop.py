"""The training loop: AdamW + warm-up/cosine schedule, fp32 EMA, checkpoints, sample grids.

Everything random in a step (data order, flow times, noise, label dropout, dropout masks) is
derived from the seed and the step number, so a resumed run continues exactly the same run.

Under ``torchrun`` the loop runs data parallel (see :mod:`flowar.train.distributed`): every
process draws the step's randomness for the whole global batch and trains on its slice of it,
so N processes compute the same update as one process with the same global batch. Rank 0
alone logs, writes checkpoints and draws sample grids.

Checkpoints are written atomically (temporary folder, fsync, rename) and old ones are renamed
away before they are deleted, so a run killed at any moment leaves only complete
``checkpoint-N`` folders; leftovers of an interrupted save are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flowar.codecs.base import PixelCodec
from flowar.config import FlowARConfig, SamplingConfig, to_dict
from flowar.errors import CheckpointError, ConfigError, UserError
from flowar.flow.sampler import generate, image_seed
from flowar.io.checkpoint import load_checkpoint, save_checkpoint
from flowar.model import FlowAR
from flowar.model.flowar import LossNoise
from flowar.train import distributed
from flowar.train.config import TrainConfig
from flowar.train.distributed import DistInfo
from flowar.viz import save_grid

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Leftovers of an interrupted save or deletion: ".checkpoint-N.<tmp>", ".checkpoint-N.old"...
PARTIAL_PATTERN = re.compile(r"^\.checkpoint-\d+\..+$")
# Training-config fields that change the run; resuming with other values is allowed but warned.
RUN_FIELDS = (
    "dataset", "image_size", "patch_size", "batch_size", "seed", "lr", "min_lr",
    "warmup_steps", "weight_decay", "betas", "grad_clip", "ema_decay", "bf16",
)


class NonFiniteError(RuntimeError):
    """The loss, the gradients or the weights stopped being finite."""


@dataclass
class TrainResult:
    """Where a finished run left its outputs.

    Attributes:
        out_dir: the run folder.
        last_checkpoint: the newest complete checkpoint (None if none was written or read).
        steps_done: the step the run reached.
        losses: global-batch loss of every optimiser step this call took.
        skipped_steps: steps dropped by the non-finite guard.
        model: the trained model (plain module, also under torchrun; raw, not EMA, weights).
    """

    out_dir: Path
    last_checkpoint: Path | None
    steps_done: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    model: FlowAR | None = field(default=None, repr=False)


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
    """Indices of the (global) batch of ``step``: epochs of seeded permutations, last partial
    batch of an epoch dropped."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"batch size {batch_size} is larger than the data set ({num_items} images); "
            "lower --batch-size"
        )
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG (dropout masks) for ``step`` on process ``rank``."""
    return image_seed(seed + 7919 * (rank + 1), step)


def checkpoints_in(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run, sorted by step.

    Only folders named exactly ``checkpoint-N`` that hold a config.json count; temporary
    folders of an interrupted save are hidden (dot) names and never match.
    """
    found = []
    if not out_dir.is_dir():
        return found
    for path in out_dir.glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / "config.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def check_run_folder(out_dir: Path) -> None:
    """Raise a :class:`UserError` unless ``out_dir`` is, or can become, a writable folder.

    Checks without creating anything, so bad input leaves no trace on disk.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"run folder {out_dir} is a file; give a folder for --out")
    existing = out_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create run folder {out_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {out_dir}: {existing} is not writable")


def remove_partial_checkpoints(out_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted saves or deletions in ``out_dir``; return them."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for path in sorted(out_dir.iterdir()):
        if path.is_dir() and PARTIAL_PATTERN.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder crash-safely: first rename it to a hidden name (atomic), so
    a kill during the deletion never leaves a half-deleted ``checkpoint-N``."""
    hidden = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(hidden, ignore_errors=True)
    try:
        path.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and floating buffer of ``module`` is finite."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _LossModule(nn.Module):
    """Routes :meth:`FlowAR.loss` through ``forward`` so DistributedDataParallel sees it."""

    def __init__(self, model: FlowAR) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, full: torch.Tensor, labels: torch.Tensor, noise: LossNoise
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.model.loss(full, labels, noise=noise)
        return loss.total, torch.stack(loss.per_scale)


def _warn_changed_recipe(meta: dict[str, Any], train_config: TrainConfig, path: Path) -> None:
    stored = meta.get("train", {})
    now = json.loads(json.dumps(to_dict(train_config)))
    changed = [k for k in RUN_FIELDS if k in stored and stored[k] != now.get(k)]
    if changed:
        logger.warning(
            "resuming %s with a changed training recipe (%s); the run will differ from an "
            "uninterrupted one", path, ", ".join(f"{k}: {stored[k]} -> {now[k]}" for k in changed),
        )


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
    """Train a FlowAR model (data parallel when launched with ``torchrun``).

    Args:
        model_config: the model to build.
        train_config: optimisation and bookkeeping; ``batch_size`` is the global batch.
        out_dir: run folder (checkpoints, samples, logs). Under torchrun it must be on a file
            system every node sees.
        resume: continue from the newest complete checkpoint in ``out_dir`` (a fresh run if
            there is none).
        device: where to train; under torchrun "cuda" means the local rank's GPU.
        dataset: an already loaded :class:`flowar.data.ImageDataset` (default: load
            ``train_config.dataset``).
        on_step: called on rank 0 after every optimiser step with (step, metrics).

    Raises:
        NonFiniteError: the loss, gradients or weights stopped being finite (``nonfinite``
            "stop", or too many skipped steps); no checkpoint is written from broken weights.
        UserError: bad input (config, data, run folder, device).
    """
    info = distributed.setup(device)
    try:
        return _train(model_config, train_config, Path(out_dir), resume, info, dataset, on_step)
    finally:
        distributed.teardown(info)


def _pick_checkpoint(
    out_dir: Path, resume: bool, model_config: FlowARConfig, info: DistInfo
) -> tuple[int, Any]:
    """Rank 0 chooses what to resume from and every rank loads the same checkpoint.

    Returns (step, checkpoint), or (0, None) for a new run. Leftovers of interrupted saves are
    removed; an unreadable newest checkpoint falls back to the one before it.
    """
    # (error class or None, message or chosen path, step)
    choice: tuple[str | None, str | None, int] = (None, None, 0)
    ckpt = None
    if info.is_main:
        for removed in remove_partial_checkpoints(out_dir):
            logger.warning("removed %s, left by an interrupted save", removed)
        existing = checkpoints_in(out_dir)
        if existing and not resume:
            choice = ("user", f"{out_dir} already holds checkpoints; pass --resume to continue "
                      "that run or choose another output folder", 0)
        elif resume and existing:
            choice = ("user", f"no checkpoint in {out_dir} can be read; move them away to "
                      "start over", 0)
            for step, path in reversed(existing):
                try:
                    ckpt = load_checkpoint(path, with_optimizer=True)
                    recorded = int(ckpt.meta.get("state", {}).get("step", step))
                    if recorded != step:
                        raise CheckpointError(f"config.json records step {recorded}")
                except CheckpointError as err:
                    logger.warning("cannot resume from %s (%s); trying an older one", path, err)
                    ckpt = None
                    continue
                if ckpt.model_config != model_config:
                    choice = ("config", f"{path} was trained with another model config; cannot "
                              "resume it (use the same --preset, or a new --out)", 0)
                    ckpt = None
                else:
                    choice = (None, str(path), step)
                break
    error, detail, step = distributed.broadcast_object(choice, info)
    if error is not None:
        raise (ConfigError if error == "config" else UserError)(detail)
    if detail is not None and ckpt is None:  # the other ranks read the chosen checkpoint
        path = Path(detail)
        if not path.is_dir():
            raise UserError(
                f"rank {info.rank} cannot see {path}; the run folder must be on a file system "
                "shared by all nodes"
            )
        ckpt = load_checkpoint(path, with_optimizer=True)
    return step, ckpt


def _train(
    model_config: FlowARConfig,
    train_config: TrainConfig,
    out_dir: Path,
    resume: bool,
    info: DistInfo,
    dataset: Any,
    on_step: StepHook | None,
) -> TrainResult:
    from flowar.data import load_dataset

    device, main = info.device, info.is_main
    log = logger.info if main else logger.debug
    check_run_folder(out_dir)
    torch.manual_seed(train_config.seed)
    rows = distributed.shard(train_config.batch_size, info.rank, info.world_size)

    # Data: decoded once into latents (the pixel codec is a rescale).
    if dataset is None:
        dataset = load_dataset(train_config.dataset, split="train",
                               image_size=train_config.image_size)
    codec = PixelCodec(dataset.images.shape[1], train_config.patch_size)
    latents = codec.encode(dataset.images).to(device)
    labels = dataset.labels.to(device)
    check_compatible(model_config, latents, dataset.num_classes)
    batch_indices(0, len(latents), train_config.batch_size, train_config.seed)  # size check

    # Model, EMA (rank 0 only), optimiser, schedule.
    model = FlowAR(model_config).to(device)
    ema = None
    if main:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(train_config.ema_decay), use_buffers=True
        )
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train_config)
    )

    start, ckpt = _pick_checkpoint(out_dir, resume, model_config, info)
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
        if ema is not None:
            ema.module.load_state_dict(ckpt.ema_weights or ckpt.weights)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer["optimizer"])
            scheduler.load_state_dict(ckpt.optimizer["scheduler"])
            if ema is not None:
                ema.n_averaged.fill_(int(ckpt.optimizer.get("ema_updates", start)))
        else:
            logger.warning("%s has no optimizer state; the optimizer starts afresh", ckpt.path)
        if main:
            _warn_changed_recipe(ckpt.meta, train_config, ckpt.path)
        log("resumed from %s at step %d", ckpt.path, start)
    elif resume:
        log("no checkpoint in %s to resume; starting a new run", out_dir)

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(out_dir, ckpt.path if ckpt is not None else None, start, model=model)
    log(
        "training %.2fM parameters on %d images (%s), %d steps from step %d, global batch %d "
        "over %d process(es)",
        sum(p.numel() for p in params) / 1e6, len(latents), dataset.name,
        train_config.steps, start, train_config.batch_size, info.world_size,
    )

    loss_fn: nn.Module = _LossModule(model)
    if info.enabled:
        loss_fn = nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None,
        )

    def save(step: int) -> Path:
        path = out_dir / f"checkpoint-{step:07d}"
        if main:
            # Never replace a good checkpoint by broken weights.
            if not (all_finite(model) and all_finite(ema.module)):
                raise NonFiniteError(
                    f"the weights are no longer finite at step {step}; not saving. The last "
                    f"good checkpoint is {result.last_checkpoint or 'none'}."
                )
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
                remove_checkpoint(old)
        result.last_checkpoint = path
        return path

    model.train()
    consecutive_skips = 0
    weight = (rows.stop - rows.start) * info.world_size / train_config.batch_size
    tick = time.perf_counter()
    for step in range(start, train_config.steps):
        # One optimiser step; all randomness comes from (seed, step), drawn for the global
        # batch and sliced, so the update does not depend on the number of processes.
        index = batch_indices(step, len(latents), train_config.batch_size, train_config.seed)
        generator = torch.Generator(device).manual_seed(image_seed(train_config.seed, step))
        draws = model.draw_loss_noise(len(index), generator, device=device, dtype=latents.dtype)
        local = index[rows]
        torch.manual_seed(dropout_seed(train_config.seed, step, info.rank))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_config.bf16):
            total, per_scale = loss_fn(latents[local], labels[local], draws.rows(rows))
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over processes; rescale so uneven shares give the global mean.
        (total if weight == 1 else total * weight).backward()
        max_norm = train_config.grad_clip if train_config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

        # Global loss of the step (mean over the global batch) for logging and the guard.
        stats = torch.cat([total.detach().float().reshape(1), per_scale.float()])
        if info.enabled:
            stats = distributed.all_reduce_sum(stats * len(local), info) / len(index)
        value, grad_value = float(stats[0]), float(grad_norm)
        done = step + 1

        # Non-finite guard: never step (or checkpoint) on a broken loss or gradient. The values
        # are global, so every process takes the same decision.
        if not (math.isfinite(value) and math.isfinite(grad_value)):
            message = (f"non-finite loss ({value:.4g}) or gradient norm ({grad_value:.4g}) at "
                       f"step {step}")
            consecutive_skips += 1
            result.skipped_steps += 1
            if train_config.nonfinite == "stop" or consecutive_skips >= train_config.max_skipped:
                why = ("" if train_config.nonfinite == "stop"
                       else f" after {consecutive_skips} skipped steps in a row")
                raise NonFiniteError(
                    f"{message}; stopping{why}. The last good checkpoint is "
                    f"{result.last_checkpoint or 'none'}. Lower the learning rate, disable "
                    "bf16, or use --nonfinite skip."
                )
            if main:
                logger.warning("%s; skipping the step", message)
            optimizer.zero_grad(set_to_none=True)
            continue
        consecutive_skips = 0
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

        result.losses.append(value)
        result.steps_done = done
        now = time.perf_counter()
        metrics = {
            "loss": value,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_value,
            "images_per_s": len(index) / max(now - tick, 1e-9),
        }
        tick = now
        if on_step is not None and main:
            on_step(done, metrics)
        if main and train_config.log_every and done % train_config.log_every == 0:
            scales = " ".join(f"{float(x):.3f}" for x in stats[1:])
            logger.info(
                "step %d loss %.4f (per scale %s) lr %.2e grad %.2f %.1f img/s", done, value,
                scales, metrics["lr"], metrics["grad_norm"], metrics["images_per_s"],
            )
        if main and train_config.sample_every and done % train_config.sample_every == 0:
            write_sample_grid(ema.module, codec, out_dir / "samples" / f"step-{done:07d}.png")
            model.train()
        if (train_config.checkpoint_every and done % train_config.checkpoint_every == 0) or (
            done == train_config.steps
        ):
            save(done)
    distributed.barrier(info)  # the final checkpoint exists before any process returns
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
