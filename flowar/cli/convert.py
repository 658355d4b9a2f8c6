"""``flowar convert``: rewrite FlowAR weights (released .pth, training checkpoints, compiled or
DDP state dicts) as safetensors in the released layout, plus a JSON config beside them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowar.config import PRESETS, model_config_from_dict
from flowar.errors import ConfigError, UserError
from flowar.io.released import describe_config, load_released, save_released

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert released or training FlowAR weights to safetensors (+ JSON config)",
        description=(
            "Read FlowAR weights (a released FlowAR-S/L/H .pth, an official training checkpoint "
            "with 'model'/'model_ema', or any state dict with 'module.'/'_orig_mod.' prefixes; "
            ".pth/.ckpt/.safetensors, pickles opened with weights_only=True only), check them "
            "strictly against the config inferred from their shapes, and write OUT in the "
            "released layout: OUT.safetensors (config in the header) or OUT.pth (for the "
            "official eval.py), plus OUT.json with the config; or, when OUT is a folder name "
            "without suffix, a flowar checkpoint folder (config.json + model.safetensors)."
        ),
    )
    parser.add_argument("input", type=Path, help="weights to read")
    parser.add_argument("output", type=Path,
                        help="OUT.safetensors, OUT.pth, or a folder for a flowar checkpoint")
    parser.add_argument("--heads", type=int, default=None,
                        help="AR attention heads, only needed when the file has no RoPE buffers")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="preset whose non-shape settings seed the inferred config")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON model config to use instead of inferring one")
    parser.add_argument("--no-ema", action="store_true",
                        help="take 'model' over 'model_ema' from a training checkpoint")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.set_defaults(func=run)


def _read_config(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the config {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    return model_config_from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; returns the exit code."""
    if args.input.resolve() == args.output.resolve():
        raise UserError("input and output are the same file; choose another output name")
    if args.heads is not None and args.heads < 1:
        raise UserError(f"--heads must be >= 1, got {args.heads}")
    config = _read_config(args.config) if args.config else None
    loaded = load_released(
        args.input, config=config, heads=args.heads, preset=args.preset,
        prefer_ema=not args.no_ema, dtype=_DTYPES[args.dtype] if args.dtype else None,
    )
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    print(f"read {args.input}: '{loaded.entry}' weights, {params:,} parameters")
    print(f"config: {describe_config(loaded.config)}")
    source = {"source": str(args.input), "weights": loaded.entry}
    if args.output.suffix in (".safetensors", ".pth", ".pt"):
        save_released(model, args.output, **source)
        print(f"wrote {args.output} and {args.output.with_suffix('.json')}")
    elif args.output.suffix == "":
        from flowar.io.checkpoint import save_checkpoint

        cfg = loaded.config
        if cfg.channels == 16:  # the released models' tokens are MAR KL-16 VAE latents
            codec = {"type": "kl16", "image_channels": 3, "scale_factor": 0.2325}
            data = {"dataset": "imagenet", "image_size": cfg.size * 16}
        else:
            codec = {"type": "pixel", "image_channels": cfg.channels}
            data = {"image_size": cfg.size}
        meta = {
            "codec": codec,
            "data": {**data, "num_classes": cfg.num_classes},
            "converted_from": source,
        }
        save_checkpoint(args.output, loaded.config, model.state_dict(), meta=meta)
        print(f"wrote checkpoint folder {args.output}")
    else:
        raise UserError(f"output {args.output} must end in .safetensors or .pth, or be a "
                        "folder name without suffix")
    return 0
