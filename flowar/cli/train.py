"""``flowar train``: train a FlowAR model on a bundled data set or an image folder.

Runs unchanged under ``torchrun`` (one process per device, data parallel): only rank 0 shows
the progress bar, writes train.log, prints and exports. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from tqdm import tqdm

from flowar.cli.common import load_model_config, non_negative_int, positive_int
from flowar.devices import parse_device
from flowar.errors import UserError
from flowar.train import NonFiniteError, TrainConfig, train
from flowar.train.config import PRESET_TRAINING
from flowar.train.distributed import env_rank
from flowar.train.loop import check_run_folder, export_model

# CLI flag -> TrainConfig field; flags left unset keep the preset's recipe.
OVERRIDES = {
    "dataset": "dataset", "image_size": "image_size", "patch_size": "patch_size",
    "batch_size": "batch_size", "steps": "steps", "lr": "lr", "min_lr": "min_lr",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "ema_decay": "ema_decay", "seed": "seed", "log_every": "log_every",
    "sample_every": "sample_every", "checkpoint_every": "checkpoint_every",
    "keep": "keep_checkpoints", "nonfinite": "nonfinite", "max_skipped": "max_skipped",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model",
        description="Train FlowAR. Flags not given keep the training recipe of the preset. "
        "Launch with torchrun for several processes (--batch-size stays the global batch).",
    )
    parser.add_argument("--preset", default="mnist16",
                        help="model preset, JSON config file or checkpoint folder")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, samples, log)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest complete checkpoint")
    parser.add_argument("--export", help="write the final EMA model here (sampling-only copy)")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cpu or cuda (under torchrun: each rank's GPU)")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    parser.add_argument("--dataset", help="mnist, fashion-mnist, digits or an image folder")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--patch-size", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int,
                        help="global batch size (split over torchrun processes)")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--min-lr", type=float)
    parser.add_argument("--warmup", type=non_negative_int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--grad-clip", type=float)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--seed", type=non_negative_int)
    parser.add_argument("--log-every", type=non_negative_int)
    parser.add_argument("--sample-every", type=non_negative_int)
    parser.add_argument("--checkpoint-every", type=non_negative_int)
    parser.add_argument("--keep", type=positive_int, help="step checkpoints to keep")
    parser.add_argument("--nonfinite", choices=("stop", "skip"),
                        help="on a non-finite loss or gradient: stop, or skip the step")
    parser.add_argument("--max-skipped", type=positive_int,
                        help="with --nonfinite skip: stop after this many skips in a row")
    parser.set_defaults(func=run)


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's recipe with the flags the user gave."""
    base = PRESET_TRAINING.get(args.preset, TrainConfig())
    changes = {field: getattr(args, flag) for flag, field in OVERRIDES.items()
               if getattr(args, flag, None) is not None}
    if args.bf16:
        changes["bf16"] = True
    return dataclasses.replace(base, **changes)


class RunLogHandler(logging.Handler):
    """Appends log records to ``<run folder>/train.log`` once the folder exists.

    Records before that are held in memory, so a run that fails its input checks writes
    nothing to disk.
    """

    def __init__(self, out_dir: Path) -> None:
        super().__init__()
        self.path = out_dir / "train.log"
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            if not self.path.parent.is_dir():
                self.pending.append(record)
                return
            self.file = logging.FileHandler(self.path)
            self.file.setFormatter(self.formatter)
            for held in self.pending:
                self.file.emit(held)
            self.pending.clear()
        self.file.emit(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def check_export_target(path: Path) -> None:
    """Refuse export targets that would replace something that is not a flowar model."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--export {path} is a file; give a folder for the exported model")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise UserError(
            f"--export {path} is a non-empty folder that is not a flowar model; it would be "
            "replaced: choose a new folder"
        )


def run(args: argparse.Namespace) -> int:
    model_config = load_model_config(args.preset)
    train_config = build_train_config(args)
    parse_device(args.device)
    out_dir = Path(args.out)
    check_run_folder(out_dir)
    if args.export:
        check_export_target(Path(args.export))
    main = env_rank() == 0
    flowar_log = logging.getLogger("flowar")
    handler = RunLogHandler(out_dir)
    if main:
        flowar_log.addHandler(handler)
        flowar_log.setLevel(logging.INFO)
    else:
        flowar_log.setLevel(logging.WARNING)

    bars: list[tqdm] = []  # made at the first step, so failed input checks print no bar

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if not bars:
            bars.append(tqdm(total=train_config.steps, initial=step - 1, desc="train",
                             dynamic_ncols=True, disable=not main,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"))
        bar = bars[0]
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
        for bar in bars:
            bar.close()
        flowar_log.removeHandler(handler)
        handler.close()
    if not main:
        return 0
    print(f"done: {result.steps_done} steps, last checkpoint {result.last_checkpoint}")
    if args.export and result.last_checkpoint is not None:
        path = export_model(result.last_checkpoint, args.export)
        print(f"exported the EMA model to {path}")
    return 0
