"""``flowar sample``: generate a PNG grid (or a scale-by-scale progression figure)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from flowar.attention import collect_stats
from flowar.cli.common import non_negative_int, positive_int
from flowar.config import AttentionConfig
from flowar.errors import UserError
from flowar.pipeline import Generator, load_generator

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="generate images",
        description="Generate class-conditional images scale by scale. With no arguments the "
        "shipped MNIST model draws every class and writes samples.png.",
    )
    parser.add_argument("--checkpoint", help="checkpoint folder from 'flowar train' (default: "
                        "the shipped model), or released FlowAR weights (.pth/.safetensors)")
    parser.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    parser.add_argument("--labels", nargs="+", type=int,
                        help="class ids, one column each (default: every class)")
    parser.add_argument("--per-label", type=positive_int, default=8,
                        help="images per label (default 8)")
    parser.add_argument("--unconditional", action="store_true",
                        help="sample without labels (null class); use --num-images")
    parser.add_argument("--num-images", type=positive_int, default=16,
                        help="images for --unconditional (default 16)")
    parser.add_argument("--cfg", type=float, help="guidance strength at the last scale")
    parser.add_argument("--steps", type=positive_int, help="Euler steps per scale")
    parser.add_argument("--time-grid", choices=("uniform", "released"))
    parser.add_argument("--cfg-schedule", choices=("linear", "constant"))
    parser.add_argument("--guidance-low", type=float, help="guidance only for t >= this")
    parser.add_argument("--guidance-high", type=float, help="guidance only for t <= this")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--progression", action="store_true",
                        help="write a figure with every image at every scale instead of a grid")
    parser.add_argument("--device", default="cpu")
    backend = parser.add_argument_group("attention backend")
    backend.add_argument("--attention", choices=("exact", "poly", "performer", "auto"),
                         help="replace the model's attention backend")
    backend.add_argument("--degree", help="poly degree, or 'auto'")
    backend.add_argument("--target-error", type=float, help="error target for degree 'auto'")
    backend.add_argument("--polynomial", choices=("taylor", "chebyshev"),
                         help="poly approximation of exp (default: the model's, else taylor)")
    released = parser.add_argument_group("released FlowAR weights")
    released.add_argument("--vae", help="MAR KL-16 VAE weights (kl16.ckpt)")
    released.add_argument("--recipe", choices=("released",),
                          help="the released sampling recipe for the model's preset")
    released.add_argument("--heads", type=positive_int, help="AR heads if not inferable")
    released.add_argument("--preset", help="preset whose head count and RoPE grid to use")
    parser.set_defaults(func=run)


def attention_changes(args: argparse.Namespace) -> dict | None:
    """Changes to the model's attention config asked for on the command line (None: keep it).

    Only the given fields change, so a model trained for the polynomial method keeps its own
    polynomial and degree unless the flags say otherwise.
    """
    if args.attention is None:
        if args.degree is not None or args.target_error is not None or args.polynomial:
            raise UserError("--degree, --target-error and --polynomial need --attention poly "
                            "or auto")
        return None
    changes = {"backend": args.attention}
    if args.polynomial is not None:
        changes["polynomial"] = args.polynomial
    if args.degree is not None:
        changes["degree"] = args.degree if args.degree == "auto" else _int(args.degree)
    if args.target_error is not None:
        changes["target_error"] = args.target_error
    return changes


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--degree must be an integer or 'auto', got {text!r}") from None


def load(args: argparse.Namespace) -> tuple[Generator, object]:
    """The generator and the sampling config the arguments ask for."""
    attention = attention_changes(args)
    checkpoint = args.checkpoint
    overrides = dict(
        steps=args.steps, cfg=args.cfg, time_grid=args.time_grid, cfg_schedule=args.cfg_schedule,
        guidance_low=args.guidance_low, guidance_high=args.guidance_high,
    )
    if checkpoint and Path(checkpoint).suffix in WEIGHT_FILE_SUFFIXES:
        from flowar.io.released import load_released_generator, released_sampling_config

        generator = load_released_generator(
            checkpoint, args.vae, attention=AttentionConfig(**attention) if attention else None,
            heads=args.heads, preset=args.preset,
            device=args.device,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if args.recipe == "released":
            return generator, released_sampling_config(generator.model.config, **given)
        return generator, generator.default_sampling(**given)
    if args.vae or args.recipe:
        raise UserError("--vae and --recipe apply to released weight files (.pth, .safetensors)")
    generator = load_generator(checkpoint, attention=attention, device=args.device)
    return generator, generator.default_sampling(**overrides)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {out}")
    generator, sampling = load(args)
    classes = generator.num_classes
    if args.unconditional:
        if args.labels:
            raise UserError("--unconditional and --labels exclude each other")
        labels, columns = None, None
        total = args.num_images
    else:
        chosen = args.labels if args.labels else list(range(classes))
        bad = [c for c in chosen if not 0 <= c < classes]
        if bad:
            raise UserError(f"labels {bad} are out of range: this model has classes "
                            f"0..{classes - 1}")
        labels = torch.tensor(chosen * args.per_label)
        columns = len(chosen)
        total = len(labels)

    bar = tqdm(total=total, desc="sample", unit="img", dynamic_ncols=True)
    with collect_stats() as calls:
        images = generator.sample(
            labels, sampling, seed=args.seed, num_images=total, batch_size=args.batch_size,
            all_scales=args.progression, progress=bar.update,
        )
    bar.close()

    from flowar.viz import save_grid, save_progression

    if args.progression:
        save_progression(images, out, max_rows=min(total, 10))
    else:
        save_grid(images, out, nrow=columns, scale=max(1, 128 // images.shape[-1]))
    print(f"wrote {out} ({total} images, cfg {sampling.cfg}, {sampling.steps} steps, "
          f"{sampling.time_grid} grid)")
    report_attention(calls)
    return 0


def report_attention(calls) -> None:
    """Print what the approximate backends certified."""
    bounds = [c for c in calls if c.bound is not None]
    chosen = {c.backend for c in calls}
    if bounds:
        worst = max(bounds, key=lambda c: c.bound)
        print(f"attention: {len(bounds)} certified calls; largest certified output error "
              f"{worst.bound:.3g} (beta {worst.beta:.3g}, degree {worst.degree}, "
              f"rank {worst.rank}); backends used: {', '.join(sorted(chosen))}")
    elif chosen - {"exact"}:
        print(f"attention backends used: {', '.join(sorted(chosen))} (no certified bound)")
