"""Training throughput and sampling time of the shipped FlowAR configuration.

Prints a table and, with --json PATH, writes the same numbers as JSON. Timings are the median
of several repeats after warm-up; they depend on the machine and on what else runs on it.

    python benchmarks/generator.py --json benchmarks/results/generator.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flowar.config import PRESETS, SamplingConfig
from flowar.flow import generate
from flowar.model import FlowAR
from flowar.train.config import PRESET_TRAINING
from flowar.train.loop import build_optimizer


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    config = PRESETS[args.preset]
    recipe = PRESET_TRAINING.get(args.preset)
    batch = recipe.batch_size if recipe else 64
    model = FlowAR(config)
    optimizer = build_optimizer(model, recipe) if recipe else torch.optim.AdamW(model.parameters())
    latents = torch.randn(batch, config.channels, config.size, config.size)
    labels = torch.arange(batch) % config.num_classes
    rows = []

    for bf16 in (False, True):
        def step(bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(latents, labels).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, args.repeats)
        rows.append({"task": "train step", "bf16": bf16, "batch": batch,
                     "seconds": seconds, "images_per_s": batch / seconds})

    sample_labels = torch.arange(args.sample_batch) % config.num_classes
    for cfg in (1.0, 3.0):
        sampling = SamplingConfig(steps=25, cfg=cfg)
        seconds = median_seconds(
            lambda sampling=sampling: generate(model, sample_labels, sampling), args.repeats
        )
        rows.append({"task": f"sample 25 steps cfg {cfg}", "bf16": False,
                     "batch": args.sample_batch, "seconds": seconds,
                     "ms_per_image": 1000 * seconds / args.sample_batch})

    print(f"{'task':<24} {'bf16':>5} {'batch':>5} {'seconds':>9} {'rate':>18}")
    for row in rows:
        rate = (f"{row['images_per_s']:.1f} img/s" if "images_per_s" in row
                else f"{row['ms_per_image']:.2f} ms/img")
        print(f"{row['task']:<24} {str(row['bf16']):>5} {row['batch']:>5} "
              f"{row['seconds']:>9.3f} {rate:>18}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {"preset": args.preset, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.processor() or
                platform.machine(), "rows": rows}
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
