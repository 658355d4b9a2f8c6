"""``flowar eval``: score a generator, or train the classifier that does the scoring.

Scoring (default): sample ``--num-samples`` class-conditional images (labels i % classes),
then report the shipped (or ``--classifier``) classifier's accuracy against the requested
labels and the Frechet distance in its feature space to the held-out test split, next to the
distance between two random halves of that split.

Training (``--train-classifier``): train a classifier on the train split of ``--dataset``,
measure it on the test split and save it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flowar.errors import UserError

DEFAULTS = {"num_samples": 1000, "seed": 0, "sample_batch_size": 100, "train_batch_size": 128,
            "epochs": 20, "lr": 2e-3, "width": 32, "feature_dim": 64}


def register(subparsers: Any) -> None:
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="score generated images with the project's classifier (accuracy, Frechet distance)",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score = parser.add_argument_group("scoring a generator")
    score.add_argument("--checkpoint", default=None,
                       help="generator checkpoint folder (default: the shipped model)")
    score.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"],
                       help="images to generate, balanced over classes (default: %(default)s)")
    score.add_argument("--cfg", type=float, default=None,
                       help="classifier-free guidance strength (default: SamplingConfig's)")
    score.add_argument("--steps", type=int, default=None,
                       help="ODE steps per scale (default: SamplingConfig's)")
    score.add_argument("--classifier", default=None,
                       help="classifier folder (default: the shipped MNIST 16x16 classifier)")
    score.add_argument("--json", action="store_true", help="print the results as JSON")

    train = parser.add_argument_group("training a classifier (--train-classifier)")
    train.add_argument("--train-classifier", action="store_true",
                       help="train and save a classifier instead of scoring a generator")
    train.add_argument("--dataset", default=None,
                       help="mnist, fashion-mnist, digits or folder:PATH (train split is used)")
    train.add_argument("--image-size", type=int, default=None,
                       help="resize images to this side (default: native size)")
    train.add_argument("--out", default=None, help="folder to write the classifier to")
    train.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                       help="training epochs (default: %(default)s)")
    train.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                       help="peak learning rate (default: %(default)s)")
    train.add_argument("--width", type=int, default=DEFAULTS["width"],
                       help="channels of the first conv stage (default: %(default)s)")
    train.add_argument("--feature-dim", type=int, default=DEFAULTS["feature_dim"],
                       help="size of the feature layer (default: %(default)s)")

    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="seed of sampling / of classifier training (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per batch (default: {DEFAULTS['sample_batch_size']} when "
                        f"sampling, {DEFAULTS['train_batch_size']} when training)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to classifier training or generator scoring."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.train_classifier:
        return _train(args)
    return _score(args)


# ---------------------------------------------------------------- --train-classifier


def _train_command(args: argparse.Namespace, batch_size: int) -> str:
    """The command line that reproduces this training run (every setting spelled out)."""
    parts = ["flowar", "eval", "--train-classifier", "--dataset", args.dataset]
    if args.image_size is not None:
        parts += ["--image-size", str(args.image_size)]
    parts += ["--out", args.out, "--epochs", str(args.epochs), "--seed", str(args.seed),
              "--batch-size", str(batch_size), "--lr", repr(args.lr), "--width", str(args.width),
              "--feature-dim", str(args.feature_dim)]
    return shlex.join(parts)


def _train(args: argparse.Namespace) -> int:
    from flowar.data import load_dataset
    from flowar.eval import ClassifierConfig, accuracy, save_classifier, train_classifier

    if not args.dataset or not args.out:
        raise UserError("--train-classifier needs --dataset NAME and --out DIR")
    batch_size = args.batch_size or DEFAULTS["train_batch_size"]
    train_set = load_dataset(args.dataset, split="train", image_size=args.image_size)
    test_set = load_dataset(args.dataset, split="test", image_size=args.image_size)
    config = ClassifierConfig.for_dataset(train_set, width=args.width,
                                          feature_dim=args.feature_dim)

    steps = args.epochs * math.ceil(len(train_set) / batch_size)
    bar = tqdm(total=steps, desc="training classifier", unit="step", disable=args.json)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    start = time.perf_counter()
    model = train_classifier(train_set, config, epochs=args.epochs, batch_size=batch_size,
                             lr=args.lr, seed=args.seed, progress=progress)
    seconds = time.perf_counter() - start
    bar.close()
    metadata = {
        "dataset": train_set.name,
        "image_size": train_set.image_size,
        "class_names": list(train_set.class_names),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": batch_size,
        "lr": args.lr,
        "num_train": len(train_set),
        "num_test": len(test_set),
        "train_accuracy": round(accuracy(model, train_set), 6),
        "test_accuracy": round(accuracy(model, test_set), 6),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "command": _train_command(args, batch_size),
    }
    path = save_classifier(model, args.out, metadata=metadata)
    if args.json:
        print(json.dumps({"out": str(path), **metadata}, indent=2))
    else:
        print(f"classifier for {train_set.name} at {train_set.image_size}x"
              f"{train_set.image_size} px saved to {path}")
        print(f"  held-out test accuracy {metadata['test_accuracy']:.4f} on {len(test_set)} "
              f"images (train {metadata['train_accuracy']:.4f}); trained in {seconds:.1f} s")
    return 0


# ---------------------------------------------------------------- scoring


def _load_classifier_for(meta: dict[str, Any], path: str | None):
    from flowar.eval import load_classifier, shipped_classifier_dir

    directory = Path(path) if path is not None else shipped_classifier_dir()
    classifier = load_classifier(directory)
    c = classifier.config
    size, classes = meta.get("image_size"), meta.get("num_classes")
    if (size is not None and size != c.image_size) or (
        classes is not None and classes != c.num_classes
    ):
        raise UserError(
            f"classifier {directory} expects {c.image_size}x{c.image_size} images of "
            f"{c.num_classes} classes, but the generator makes {size}x{size} images of "
            f"{classes} classes; train a matching one with `flowar eval --train-classifier "
            f"--dataset {meta.get('dataset', 'NAME')} --image-size {size} --out DIR` and pass "
            "--classifier DIR"
        )
    return classifier, directory


def _score(args: argparse.Namespace) -> int:
    from flowar.data import load_dataset
    from flowar.eval import evaluate_samples
    from flowar.pipeline import load_generator

    if args.num_samples < 2:
        raise UserError(f"--num-samples must be >= 2, got {args.num_samples}")
    batch_size = args.batch_size or DEFAULTS["sample_batch_size"]
    overrides = {k: v for k, v in (("cfg", args.cfg), ("steps", args.steps)) if v is not None}
    generator = load_generator(args.checkpoint)
    sampling = generator.default_sampling(**overrides)
    meta = dict(generator.meta)
    if "dataset" not in meta or "image_size" not in meta:
        raise UserError(
            f"checkpoint {args.checkpoint or '(shipped)'} does not record its data set and image "
            "size, so there are no held-out real images to compare with"
        )
    classifier, classifier_dir = _load_classifier_for(meta, args.classifier)
    trained_on = classifier.metadata.get("dataset")
    if trained_on is not None and trained_on != meta["dataset"]:
        raise UserError(
            f"classifier {classifier_dir} was trained on {trained_on!r} but the generator on "
            f"{meta['dataset']!r}; pass --classifier with a classifier for {meta['dataset']!r}"
        )
    real = load_dataset(meta["dataset"], split="test", image_size=meta["image_size"])

    num_classes = int(meta.get("num_classes", classifier.config.num_classes))
    labels = torch.arange(args.num_samples) % num_classes
    start = time.perf_counter()
    with tqdm(total=args.num_samples, desc="sampling", unit="img", disable=args.json) as bar:
        images = generator.sample(labels, sampling, seed=args.seed, batch_size=batch_size,
                                  progress=bar.update)
    seconds = time.perf_counter() - start
    result = evaluate_samples(classifier, images, labels, real.images, seed=args.seed,
                              real_labels=real.labels)
    result.update({
        "checkpoint": args.checkpoint or "(shipped)",
        "classifier": str(classifier_dir),
        "dataset": meta["dataset"],
        "image_size": meta["image_size"],
        "sampling": {"steps": sampling.steps, "cfg": sampling.cfg,
                     "time_grid": sampling.time_grid, "cfg_schedule": sampling.cfg_schedule},
        "seed": args.seed,
        "sampling_seconds": round(seconds, 2),
    })
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result, real.class_names)
    return 0


def _print_table(result: dict[str, Any], class_names: tuple[str, ...]) -> None:
    s = result["sampling"]
    print(f"generator  {result['checkpoint']}  ({result['dataset']}, {result['image_size']} px)")
    print(f"sampling   {result['num_samples']} images, steps {s['steps']}, cfg {s['cfg']}, "
          f"seed {result['seed']}, {result['sampling_seconds']:.1f} s")
    print(f"classifier {result['classifier']}")
    n, m, h = result["num_samples"], result["num_real"], result["num_real_half"]
    rows = [
        ("accuracy of generated images (vs requested label)", f"{result['accuracy']:.4f}"),
        ("classifier accuracy on real test images", f"{result['real_accuracy']:.4f}"),
        (f"FD generated vs real test ({n} vs {m})", f"{result['fd']:.3f}"),
        (f"FD real half vs half ({h} vs {h}), reference", f"{result['fd_real_halves']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'metric':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")
    print()
    print("per class (accuracy / how often predicted):")
    for cls, (acc, count) in enumerate(zip(result["per_class_accuracy"],
                                           result["predicted_counts"])):
        name = class_names[cls] if cls < len(class_names) else str(cls)
        shown = "   n/a" if acc is None else f"{acc:.3f}"
        print(f"  {cls:>3} {name:<12} {shown}  {count:>6}")
    print(f"FD is measured in the classifier's {result['feature_dim']}-d feature space. The "
          "halves use fewer images,\nso their FD carries more small-sample bias: read it as a "
          "rough floor, not an exact target.")
