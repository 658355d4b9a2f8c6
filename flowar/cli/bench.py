"""``flowar bench attention`` and ``flowar bench scaling``: tables, log-log plots, ``--json``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from flowar.errors import UserError

logger = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="attention and whole-model scaling benchmarks",
        description="Benchmarks of the attention backends (issue #3).",
    )
    which = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    att = which.add_parser("attention", help="time, memory and error of exact/poly/performer")
    att.add_argument("--tokens", type=_ints, default=(256, 512, 1024, 2048, 4096, 8192, 16384),
                     help="comma-separated token counts (default 256..16384)")
    att.add_argument("--head-dim", type=int, default=16)
    att.add_argument("--heads", type=int, default=1)
    att.add_argument("--degree", type=int, default=2, help="poly degree (default 2)")
    att.add_argument("--polynomial", choices=("taylor", "chebyshev"), default="taylor")
    att.add_argument("--beta", type=float, default=0.25,
                     help="logit half-width of the inputs (unit q, k; default 0.25)")
    att.add_argument("--features", type=int, default=256, help="performer features")
    att.add_argument("--backends", default="exact,poly,performer")
    att.add_argument("--mode", choices=("block-causal", "unmasked"), default="block-causal")
    att.add_argument("--no-errors", action="store_true", help="skip the error sweeps")
    _common(att)

    sc = which.add_parser("scaling", help="whole FlowAR sampling time versus side n")
    sc.add_argument("--sides", type=_ints, default=(16, 32, 64, 128))
    sc.add_argument("--backends", default="exact,poly")
    sc.add_argument("--width", type=int, default=32)
    sc.add_argument("--heads", type=int, default=2)
    sc.add_argument("--depth", type=int, default=1)
    sc.add_argument("--logit-scale", type=float, default=0.25)
    sc.add_argument("--degree", type=int, default=2)
    sc.add_argument("--polynomial", choices=("taylor", "chebyshev"), default="taylor")
    sc.add_argument("--steps", type=int, default=2, help="Euler steps per scale")
    sc.add_argument("--batch", type=int, default=1, help="images per sampling call")
    sc.add_argument("--fit", type=_ints, default=(32, 128), help="slope-fit range of sides")
    sc.add_argument("--no-flops", action="store_true",
                    help="skip counting the non-attention FLOPs (totals = attention only)")
    _common(sc, repeats=1)
    parser.set_defaults(func=run)


def _common(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats (best kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for the PNG plots (default bench-results/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device != "cpu" and not torch.device(args.device).type == "cpu":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.bench == "attention":
        report = _attention(args)
    else:
        report = _scaling(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


def _attention(args: argparse.Namespace) -> dict:
    from flowar.bench import attention as ab
    from flowar.bench.common import format_table, loglog_plot

    cfg = ab.AttentionBenchConfig(
        tokens=args.tokens, head_dim=args.head_dim, heads=args.heads, degree=args.degree,
        polynomial=args.polynomial, beta=args.beta, performer_features=args.features,
        backends=tuple(args.backends.split(",")), mode=args.mode, repeats=args.repeats,
        seed=args.seed, device=args.device,
    )
    report = ab.run(cfg, errors=not args.no_errors, progress=print)
    print(f"\nattention, head width {cfg.head_dim}, {cfg.mode}, beta {cfg.beta}, "
          f"poly degree {cfg.degree} ({cfg.polynomial}), device {cfg.device}")
    print(format_table(
        ["backend", "tokens", "seconds", "peak MiB", "GFLOP", "max error", "bound", "rank"],
        [(r.backend, r.tokens, r.seconds, r.peak_mib, r.gflop, r.error, r.bound, r.rank)
         for r in report.timings],
    ))
    if report.speedup_at_max is not None:
        print(f"exact / poly time at N={max(cfg.tokens)}: {report.speedup_at_max:.3g}x")
    series = {}
    for name in cfg.backends:
        rows = [r for r in report.timings if r.backend == name]
        series[name] = ([r.tokens for r in rows], [r.seconds for r in rows])
    loglog_plot(args.out / "attention_time.png", series, xlabel="tokens N", ylabel="seconds",
                title=f"attention time, d={cfg.head_dim}, {cfg.mode}")
    if report.error_vs_tokens:
        print("\nerror versus N (float64, unmasked)")
        print(_error_table(report.error_vs_tokens))
        print("\nerror versus beta at fixed degree")
        print(_error_table(report.error_vs_beta))
        _error_plots(args.out, report)
    return report.to_dict()


def _error_table(rows) -> str:
    from flowar.bench.common import format_table

    return format_table(["inputs", "tokens", "beta", "degree", "max error", "certified bound"],
                        [(r.inputs, r.tokens, r.beta, r.degree, r.error, r.bound) for r in rows])


def _error_plots(out: Path, report) -> None:
    from flowar.bench.common import loglog_plot

    series = {}
    for label in sorted({r.inputs for r in report.error_vs_tokens}):
        rows = [r for r in report.error_vs_tokens if r.inputs == label]
        series[f"error, {label}"] = ([r.tokens for r in rows], [r.error for r in rows])
        series[f"bound, {label}"] = ([r.tokens for r in rows], [r.bound for r in rows])
    loglog_plot(out / "error_vs_tokens.png", series, xlabel="tokens N", ylabel="max |error|",
                title="poly error versus N", dashed=[k for k in series if k.startswith("bound")])
    series = {}
    for label in ("random", "adversarial"):
        rows = [r for r in report.error_vs_beta if r.inputs == label]
        series[f"error, {label}"] = ([r.beta for r in rows], [r.error for r in rows])
    rows = [r for r in report.error_vs_beta if r.inputs == "adversarial"]
    series["certified bound"] = ([r.beta for r in rows], [r.bound for r in rows])
    loglog_plot(out / "error_vs_beta.png", series, xlabel="beta", ylabel="max |error|",
                title=f"poly error versus beta (degree {rows[0].degree if rows else '?'})",
                dashed=["certified bound"])


def _scaling(args: argparse.Namespace) -> dict:
    from flowar.bench import scaling as sb
    from flowar.bench.common import format_table, loglog_plot

    if len(args.fit) != 2:
        raise UserError(f"--fit takes two sides LOW,HIGH, got {args.fit}")
    cfg = sb.ScalingBenchConfig(
        sides=args.sides, backends=tuple(args.backends.split(",")), width=args.width,
        heads=args.heads, depth=args.depth, logit_scale=args.logit_scale, degree=args.degree,
        polynomial=args.polynomial, steps=args.steps, batch=args.batch, repeats=args.repeats,
        fit_sides=tuple(args.fit), count_flops=not args.no_flops, seed=args.seed,
        device=args.device,
    )
    report = sb.run(cfg, progress=print)
    print(f"\nwhole-model sampling, head width {cfg.width // cfg.heads}, logit scale "
          f"{cfg.logit_scale}, {cfg.steps} Euler steps per scale, batch {cfg.batch}, "
          f"device {cfg.device}")
    print(format_table(
        ["backend", "side n", "tokens", "seconds", "peak MiB", "attn GFLOP", "total GFLOP",
         "AR cache MiB", "max bound"],
        [(r.backend, r.side, r.tokens, r.seconds, r.peak_mib, r.attention_gflop, r.total_gflop,
          r.cache_mib, r.max_bound) for r in report.rows],
    ))
    low, high = cfg.fit_sides
    for name in cfg.backends:
        print(f"{name}: log-log slope over n = {low}..{high}: time "
              f"{report.time_slopes[name]:.2f}, FLOPs {report.flop_slopes[name]:.2f}")
    if report.cache_ratio is not None:
        print(f"AR cache at n={max(cfg.sides)}: exact / poly = {report.cache_ratio:.3g}x")
    series, flops = {}, {}
    for name in cfg.backends:
        rows = [r for r in report.rows if r.backend == name]
        series[name] = ([r.side for r in rows], [r.seconds for r in rows])
        flops[name] = ([r.side for r in rows], [r.total_gflop for r in rows])
    loglog_plot(args.out / "scaling_time.png", series, xlabel="largest side n",
                ylabel="seconds per sample", title="FlowAR sampling time")
    loglog_plot(args.out / "scaling_flops.png", flops, xlabel="largest side n",
                ylabel="GFLOP per sample", title="FlowAR sampling FLOPs")
    return report.to_dict()
