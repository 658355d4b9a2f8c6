"""``flowar precision``: FlowAR inference with every operation rounded to a p-bit significand.

Each run rounds the result (and the inputs, so weights too) of every aten operator to p
fraction bits, round to nearest even, emulated on float64 without changing the model; the
output is compared with the float64 run. p counts fraction bits: 52 is float64, 23 float32,
7 bfloat16. The report gives the relative error for every (p, n), the smallest p that meets
``--target`` at each n, and how many bits each doubling of n costs.

Random weights of the given config are used (float64), except with a checkpoint folder, whose
own weights run at its own size.

Examples:
  flowar precision --config tiny --n 4 8 16 --p 8 12 16 20 24 32 52 --target 1e-3
  flowar precision --config runs/mnist/checkpoint --p 8 16 24 52 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from tqdm import tqdm

from flowar.cli.circuit import add_model_arguments, attention_config
from flowar.errors import UserError


def _p_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer p, got {text!r}") from None
    if not 1 <= value <= 52:
        raise argparse.ArgumentTypeError(f"p must be in [1, 52] (52 = float64), got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``precision`` sub-command."""
    parser = subparsers.add_parser(
        "precision",
        help="output error of p-bit FlowAR inference against float64, and the p needed",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, default_n="s 2s; a checkpoint runs at its own s")
    parser.add_argument("--p", type=_p_value, nargs="+",
                        default=[8, 12, 16, 20, 24, 32, 40, 52],
                        help="fraction bits to try (default: %(default)s)")
    parser.add_argument("--target", type=float, default=1e-3,
                        help="relative error to reach (default: %(default)s)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="do not round weights and inputs to p bits, only op results")
    parser.add_argument("--no-promote", action="store_true",
                        help="keep the model's own float32 islands (e.g. RMSNorm) instead of "
                        "computing them in float64")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweeps and print the table (or JSON); write the plot if asked."""
    from flowar.analysis.precision import plot_precision, precision_by_n
    from flowar.analysis.targets import checkpoint_case, flowar_case_factory, resolve_config

    if not 0 < args.target < 1:
        raise UserError(f"--target must be in (0, 1), got {args.target}")
    config, checkpoint = resolve_config(args.config)
    attention = attention_config(config, args)
    ns = sorted(set(args.n or [config.size, 2 * config.size]))
    if checkpoint is not None:
        if attention is not None:
            raise UserError("--attention/--degree cannot change a checkpoint's attention here; "
                            "pass its config.json instead to use random weights")
        size = config.size
        if args.n is not None and ns != [size]:
            raise UserError(
                f"a checkpoint runs at its own size n = {size}; drop --n, or pass its "
                "config.json to use random weights at other sizes"
            )
        ns = [size]

        def make(n: int):
            return checkpoint_case(checkpoint, steps=args.steps, seed=args.seed,
                                   batch=args.batch)
    else:
        make = flowar_case_factory(
            config, rule=args.scale_rule, steps=args.steps, attention=attention,
            seed=args.seed, batch=args.batch, dtype=torch.float64,
        )
    total = len(ns) * len(set(args.p))
    with tqdm(total=total, desc="p-bit runs", file=sys.stderr, disable=None) as bar:
        try:
            report = precision_by_n(
                make, ns, args.p, args.target, round_inputs=not args.keep_weights,
                promote=not args.no_promote, on_run=lambda n, p: bar.update(1),
            )
        except ValueError as err:
            raise UserError(str(err)) from None
    if args.json:
        payload = report.to_dict()
        payload["config"] = args.config
        print(json.dumps(payload, indent=2))
    else:
        source = f"checkpoint {checkpoint}" if checkpoint else f"config {args.config} (random)"
        print(f"{source}, {args.steps} Euler steps per scale, scale rule {args.scale_rule}")
        print(report.table())
    if args.plot:
        plot_precision(report, args.plot, title=f"p-bit FlowAR inference ({args.config})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
