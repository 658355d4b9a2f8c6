"""``flowar circuit``: TC0 circuit depth and size of FlowAR inference, traced from the model.

For every n (side of the largest token map) the model config is resized (``--scale-rule``),
one inference pass (all scales, ``--steps`` Euler steps each) runs under a tracer that maps
every aten operator to TC0 primitives, and the report gives the depth vector over the
primitives (d_std, d_sum, d_max, d_exp, d_erf, d_sqrt, ...), the size counts by type, the
fitted polynomial degree and leading term of the size in n, and whether the conditions of the
TC0 theorem hold (constant scales, steps and depth; polynomial precision; widths <= O(n)).

Examples:
  flowar circuit --config tiny --n 8 16 32 --attention exact
  flowar circuit --config my_config.json --n 8 16 32 --attention poly --json
  flowar circuit --config tiny --n 4 8 16 --scale-rule double   # K grows: flagged, not TC0
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm import tqdm

from flowar.cli.common import positive_int
from flowar.errors import UserError


def add_model_arguments(parser: argparse.ArgumentParser, default_n: str) -> None:
    """Options shared by ``circuit`` and ``precision``: the model, the sizes, the sampler."""
    parser.add_argument(
        "--config", default="shipped",
        help="preset name (tiny, flowar-s, ...), 'shipped', a JSON model config file, or a "
        "checkpoint folder (default: %(default)s)",
    )
    parser.add_argument(
        "--n", type=positive_int, nargs="+", default=None,
        help=f"largest sides to analyse (default: {default_n}, s = the config's largest side)",
    )
    parser.add_argument(
        "--scale-rule", choices=("rescale", "double"), default="rescale",
        help="how the scale list follows n: 'rescale' keeps the number of scales K and "
        "multiplies every side by n / (largest side); 'double' doubles from the smallest "
        "side up to n, so K grows like log n (default: %(default)s)",
    )
    parser.add_argument(
        "--attention", choices=("exact", "poly", "performer", "auto"), default=None,
        help="attention backend (default: the config's)",
    )
    parser.add_argument("--degree", type=positive_int, default=None,
                        help="polynomial degree of the 'poly' backend (default: the config's)")
    parser.add_argument("--steps", type=positive_int, default=2,
                        help="Euler steps per scale (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="images per inference pass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and the noise (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot here")


def attention_config(config: Any, args: argparse.Namespace) -> Any:
    """The config's attention settings with the command-line overrides applied (or None)."""
    if args.attention is None and args.degree is None:
        return None
    changes = {}
    if args.attention is not None:
        changes["backend"] = args.attention
    if args.degree is not None:
        changes["degree"] = args.degree
    import dataclasses

    return dataclasses.replace(config.attention, **changes)


def register(subparsers: Any) -> None:
    """Add the ``circuit`` sub-command."""
    parser = subparsers.add_parser(
        "circuit",
        help="TC0 circuit depth and size of FlowAR inference as n grows",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, default_n="s 2s 4s")
    parser.add_argument(
        "--precision", choices=("const", "poly", "exp"), default="const",
        help="how the float precision p(n) of the circuit grows: constant (52 bits), "
        "poly (p = n) or exp (p = 2^n, flagged: not TC0) (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Trace the sweep and print the table (or JSON); write the plot if asked."""
    from flowar.analysis.scaling import circuit_sweep, plot_sweep
    from flowar.analysis.targets import flowar_case_factory, resolve_config

    config, _checkpoint = resolve_config(args.config)
    attention = attention_config(config, args)
    if args.n is None:
        args.n = [config.size, 2 * config.size, 4 * config.size]
    factory = flowar_case_factory(
        config, rule=args.scale_rule, steps=args.steps, attention=attention, seed=args.seed,
        batch=args.batch,
    )
    with tqdm(total=len(set(args.n)), desc="tracing", unit="n", file=sys.stderr,
              disable=None) as bar:
        try:
            report = circuit_sweep(
                factory, args.n, precision_rule=args.precision,
                on_point=lambda point: bar.update(1),
            )
        except ValueError as err:
            raise UserError(str(err)) from None
    backend = (attention or config.attention).backend
    if args.json:
        payload = report.to_dict()
        payload["config"] = args.config
        payload["attention"] = backend
        payload["scale_rule"] = args.scale_rule
        print(json.dumps(payload, indent=2))
    else:
        print(f"config {args.config}, attention {backend}, scale rule {args.scale_rule}, "
              f"{args.steps} Euler steps per scale, batch {args.batch}")
        print(report.table())
    if args.plot:
        plot_sweep(report, args.plot, title=f"circuit size vs n ({args.config}, {backend})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
