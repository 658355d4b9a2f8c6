"""``flowar train``: train a FlowAR model on a bundled data set or an image folder."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from tqdm import tqdm

from flowar.cli.common import load_model_config, non_negative_int, positive_int
from flowar.errors import UserError
from flowar.train import NonFiniteError, TrainConfig, train
from flowar.train.config import PRESET_TRAINING
from flowar.train.loop import export_model

# CLI flag -> TrainConfig field; flags left unset keep the preset's recipe.
OVERRIDES = {
    "dataset": "dataset", "image_size": "image_size", "patch_size": "patch_size",
    "batch_size": "batch_size", "steps": "steps", "lr": "lr", "min_lr": "min_lr",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "ema_decay": "ema_decay", "seed": "seed", "log_every": "log_every",
    "sample_every": "sample_every", "checkpoint_every": "checkpoint_every",
    "keep": "keep_checkpoints", "nonfinite": "nonfinite",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model",
        description="Train FlowAR. Flags not given keep the training recipe of the preset.",
    )
    parser.add_argument("--preset", default="mnist16",
                        help="model preset, JSON config file or checkpoint folder")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, samples, log)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--export", help="write the final EMA model here (sampling-only copy)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    parser.add_argument("--dataset", help="mnist, fashion-mnist, digits or an image folder")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--patch-size", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--min-lr", type=float)
    parser.add_argument("--warmup", type=non_negative_int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--grad-clip", type=float)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log-every", type=non_negative_int)
    parser.add_argument("--sample-every", type=non_negative_int)
    parser.add_argument("--checkpoint-every", type=non_negative_int)
    parser.add_argument("--keep", type=positive_int, help="step checkpoints to keep")
    parser.add_argument("--nonfinite", choices=("stop", "skip"))
    parser.set_defaults(func=run)


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's recipe with the flags the user gave."""
    base = PRESET_TRAINING.get(args.preset, TrainConfig())
    changes = {field: getattr(args, flag) for flag, field in OVERRIDES.items()
               if getattr(args, flag) is not None}
    if args.bf16:
        changes["bf16"] = True
    return dataclasses.replace(base, **changes)


def run(args: argparse.Namespace) -> int:
    model_config = load_model_config(args.preset)
    train_config = build_train_config(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("flowar").addHandler(handler)
    logging.getLogger("flowar").setLevel(logging.INFO)

    bar = tqdm(total=train_config.steps, desc="train", unit="step", dynamic_ncols=True)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}",
                        refresh=False)
        bar.refresh()

    try:
        result = train(model_config, train_config, out_dir, resume=args.resume,
                       device=args.device, on_step=on_step)
    except NonFiniteError as err:
        raise UserError(str(err)) from None
    finally:
        bar.close()
        logging.getLogger("flowar").removeHandler(handler)
        handler.close()
    print(f"done: {result.steps_done} steps, last checkpoint {result.last_checkpoint}")
    if args.export and result.last_checkpoint is not None:
        path = export_model(result.last_checkpoint, args.export)
        print(f"exported the EMA model to {path}")
    return 0
