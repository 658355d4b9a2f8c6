"""Bad input across the library and the CLI: every case fails with a clear, documented error.

Library cases must raise a :class:`flowar.errors.UserError` subclass whose message names the
problem. CLI cases must exit with code 2, say what is wrong on stderr, show no traceback and
write nothing (neither in the working folder nor in the input folders they were given).
The property-based tests at the end throw random configs and sampling options at the library.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flowar.cli.main import main
from flowar.config import (
    PRESETS,
    AttentionConfig,
    FlowARConfig,
    FlowHeadConfig,
    SamplingConfig,
    model_config_from_dict,
)
from flowar.data import ImageDataset, load_dataset
from flowar.errors import CheckpointError, ConfigError, DatasetUnavailable, UserError
from flowar.flow.sampler import generate
from flowar.io.checkpoint import load_checkpoint, save_checkpoint
from flowar.model import FlowAR
from flowar.pipeline import load_generator
from flowar.train import TrainConfig, train
from flowar.train.distributed import setup, shard

TINY = PRESETS["tiny"]  # 4x4 grey tokens, 10 classes
META = {
    "codec": {"type": "pixel", "image_channels": 1, "patch_size": 1},
    "data": {"dataset": "digits", "image_size": 4, "num_classes": 10,
             "class_names": [str(i) for i in range(10)]},
}


# --------------------------------------------------------------------------------------------
# Fixtures: good and broken checkpoints, runs and image folders, made once.


def write_pngs(folder: Path, count: int, side: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    good = save_checkpoint(root / "ckpt", TINY, FlowAR(TINY).state_dict(), meta=META)

    run = root / "run"  # a run folder holding one checkpoint of the tiny model
    shutil.copytree(good, run / "checkpoint-0000001")
    other = TINY.replace(width=16, num_heads=1)  # a run of another model
    save_checkpoint(root / "other-run" / "checkpoint-0000001", other,
                    FlowAR(other).state_dict(), meta=META)

    bad_json = root / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    no_tag = root / "no-tag"
    no_tag.mkdir()
    (no_tag / "config.json").write_text(json.dumps({"model": {}}))
    bad_model = root / "bad-model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text(json.dumps(
        {"format": "flowar-checkpoint", "version": 1, "model": {"scales": [4, 2]}}))
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(good / "config.json", no_weights / "config.json")
    truncated = shutil.copytree(good, root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    mismatch = root / "mismatch"  # config says width 16, weights are of width 32
    save_checkpoint(mismatch, other, FlowAR(TINY).state_dict(), meta=META)
    (root / "a-file").write_text("not a folder")
    (root / "bad.json").write_text("{oops")
    (root / "list.json").write_text("[1, 2]")
    (root / "unknown.json").write_text(json.dumps({"bogus_field": 1}))

    (root / "empty-folder").mkdir()
    write_pngs(root / "corrupt-folder" / "a", 2)
    (root / "corrupt-folder" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    write_pngs(root / "one-class" / "only", 12)
    write_pngs(root / "no-images" / "a", 3)
    (root / "no-images" / "b").mkdir()
    return root


# --------------------------------------------------------------------------------------------
# Library table


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Path], Any]
    error: type[Exception]
    words: str


def tiny_dataset(**changes) -> ImageDataset:
    base = dict(images=torch.rand(20, 1, 4, 4), labels=torch.arange(20) % 10, num_classes=10,
                class_names=tuple(str(i) for i in range(10)), name="toy")
    base.update(changes)
    return ImageDataset(**base)


def quick(**changes) -> TrainConfig:
    base = dict(dataset="toy", image_size=4, batch_size=4, steps=1, log_every=0,
                sample_every=0, checkpoint_every=0)
    base.update(changes)
    return TrainConfig(**base)


def shipped_like(root: Path):
    return load_generator(root / "ckpt")


LIBRARY = [
    # configs
    Case("scales not increasing", lambda r: FlowARConfig(scales=(2, 1)), ConfigError,
         "strictly increasing"),
    Case("heads do not divide width", lambda r: TINY.replace(num_heads=3), ConfigError,
         "must divide width"),
    Case("width given as text", lambda r: TINY.replace(width="32"), ConfigError,
         "width must be int"),
    Case("scales given as text", lambda r: TINY.replace(scales="1,2,4"), ConfigError,
         "scales must be"),
    Case("NaN rope base", lambda r: TINY.replace(rope_base=float("nan")), ConfigError,
         "rope_base"),
    Case("zero MLP ratio", lambda r: TINY.replace(mlp_ratio=0.0), ConfigError, "mlp_ratio"),
    Case("flow head heads", lambda r: FlowHeadConfig(width=32, num_heads=3), ConfigError,
         "num_heads"),
    Case("unknown attention backend", lambda r: AttentionConfig(backend="flash"), ConfigError,
         "attention backend must be one of"),
    Case("unknown config field", lambda r: model_config_from_dict({"bogus": 1}), ConfigError,
         "unknown or missing field"),
    Case("zero batch", lambda r: quick(batch_size=0), ConfigError, "batch_size"),
    Case("infinite lr", lambda r: quick(lr=float("inf")), ConfigError, "lr must be float"),
    Case("one beta", lambda r: quick(betas=(0.9,)), ConfigError, "betas"),
    Case("negative seed", lambda r: quick(seed=-1), ConfigError, "seed"),
    Case("bool steps", lambda r: quick(steps=True), ConfigError, "steps must be int"),
    # sampling options
    Case("zero sampling steps", lambda r: SamplingConfig(steps=0), ConfigError, "steps"),
    Case("NaN guidance", lambda r: SamplingConfig(cfg=float("nan")), ConfigError, "cfg"),
    Case("guidance below 1", lambda r: SamplingConfig(cfg=0.5), ConfigError, "cfg must be"),
    Case("unknown time grid", lambda r: SamplingConfig(time_grid="cosine"), ConfigError,
         "time_grid"),
    Case("empty guidance interval",
         lambda r: SamplingConfig(guidance_low=0.9, guidance_high=0.1), ConfigError,
         "guidance interval"),
    Case("unknown stored sampling option",
         lambda r: shipped_like(r).default_sampling(temperature=2.0), ConfigError,
         "temperature"),
    Case("label out of range",
         lambda r: shipped_like(r).sample(torch.tensor([10]), SamplingConfig(steps=1)),
         UserError, "labels must be class ids"),
    Case("2-D labels",
         lambda r: shipped_like(r).sample(torch.zeros(2, 2, dtype=torch.long),
                                          SamplingConfig(steps=1)),
         UserError, "1-D"),
    Case("no images asked",
         lambda r: shipped_like(r).sample(None, SamplingConfig(steps=1), num_images=0),
         UserError, "positive number of images"),
    Case("zero sampling batch",
         lambda r: shipped_like(r).sample(torch.tensor([1]), SamplingConfig(steps=1),
                                          batch_size=0),
         UserError, "batch size"),
    # data
    Case("unknown data set", lambda r: load_dataset("imagenet-42"), DatasetUnavailable,
         "unknown data set"),
    Case("unknown split", lambda r: load_dataset("digits", split="val"), ConfigError,
         "split must be"),
    Case("zero image size", lambda r: load_dataset("digits", image_size=0), ConfigError,
         "image_size"),
    Case("empty image folder", lambda r: load_dataset(str(r / "empty-folder")),
         DatasetUnavailable, "no class sub-folders"),
    Case("class folder without images", lambda r: load_dataset(str(r / "no-images")),
         DatasetUnavailable, "holds no images"),
    Case("corrupt image", lambda r: load_dataset(str(r / "corrupt-folder")),
         DatasetUnavailable, "broken.png"),
    Case("pixels outside [0, 1]", lambda r: tiny_dataset(images=torch.full((20, 1, 4, 4), 2.0)),
         ConfigError, r"\[0, 1\]"),
    # checkpoints
    Case("missing checkpoint", lambda r: load_checkpoint(r / "nope"), CheckpointError,
         "does not exist"),
    Case("checkpoint is a file", lambda r: load_checkpoint(r / "a-file"), CheckpointError,
         "is a file"),
    Case("corrupt config.json", lambda r: load_checkpoint(r / "bad-json"), CheckpointError,
         "not valid JSON"),
    Case("no format tag", lambda r: load_checkpoint(r / "no-tag"), CheckpointError,
         "format tag"),
    Case("invalid stored model config", lambda r: load_checkpoint(r / "bad-model"),
         CheckpointError, "invalid model config"),
    Case("no weights", lambda r: load_checkpoint(r / "no-weights"), CheckpointError,
         "no model.safetensors"),
    Case("truncated weights", lambda r: load_checkpoint(r / "truncated"), CheckpointError,
         "truncated or corrupt"),
    Case("weights of another config", lambda r: load_generator(r / "mismatch"),
         CheckpointError, "does not match its config"),
    # training
    Case("data of another shape", lambda r: train(
        TINY, quick(), r / "never", dataset=tiny_dataset(images=torch.rand(20, 1, 8, 8))),
        ConfigError, "last scale"),
    Case("batch larger than the data", lambda r: train(
        TINY, quick(batch_size=64), r / "never", dataset=tiny_dataset()), ConfigError,
        "larger than the data set"),
    Case("run folder is a file", lambda r: train(
        TINY, quick(), r / "a-file", dataset=tiny_dataset()), UserError, "is a file"),
    Case("run exists without resume", lambda r: train(
        TINY, quick(), r / "run", dataset=tiny_dataset()), UserError, "--resume"),
    Case("resume another model", lambda r: train(
        TINY, quick(steps=2), r / "other-run", resume=True, dataset=tiny_dataset()),
        ConfigError, "another model config"),
    Case("unknown device", lambda r: train(
        TINY, quick(), r / "never", device="tpu9", dataset=tiny_dataset()), ConfigError,
        "device"),
    # distributed
    Case("torchrun variables without rendezvous", lambda r: with_env(
        {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": None, "MASTER_PORT": None},
        lambda: setup("cpu")), ConfigError, "launch with torchrun"),
    Case("world size is text", lambda r: with_env({"WORLD_SIZE": "two"}, lambda: setup("cpu")),
         ConfigError, "WORLD_SIZE"),
    Case("global batch below the process count", lambda r: shard(2, 0, 4), ConfigError,
         "smaller than the number of processes"),
]


def with_env(changes: dict[str, str | None], call: Callable[[], Any]) -> Any:
    import os

    saved = {k: os.environ.get(k) for k in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return call()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.parametrize("case", LIBRARY, ids=[c.name for c in LIBRARY])
def test_library_rejects_bad_input(case, inputs):
    before = tree_digest(inputs)
    with pytest.raises(case.error, match=case.words) as info:
        case.call(inputs)
    assert isinstance(info.value, UserError)  # the CLI turns these into exit code 2
    assert tree_digest(inputs) == before  # inputs untouched, nothing created


# --------------------------------------------------------------------------------------------
# CLI table: (name, argv with {in} for the inputs folder, words expected on stderr)

TRAIN = ["train", "--preset", "tiny", "--out", "run-out", "--steps", "1"]
SAMPLE = ["sample", "--checkpoint", "{in}/ckpt", "--steps", "1", "--out", "grid.png"]

CLI = [
    ("train: zero batch", TRAIN + ["--batch-size", "0"], "positive integer"),
    ("train: negative lr", TRAIN + ["--lr", "-1"], "lr"),
    ("train: NaN lr", TRAIN + ["--lr", "nan"], "finite"),
    ("train: min lr above lr", TRAIN + ["--min-lr", "1"], "min_lr"),
    ("train: EMA decay 1", TRAIN + ["--ema-decay", "1"], "ema_decay"),
    ("train: unknown preset", ["train", "--preset", "nosuch", "--out", "x"], "neither a preset"),
    ("train: preset file not JSON", ["train", "--preset", "{in}/bad.json", "--out", "x"],
     "not valid JSON"),
    ("train: preset file a list", ["train", "--preset", "{in}/list.json", "--out", "x"],
     "JSON object"),
    ("train: preset file unknown field", ["train", "--preset", "{in}/unknown.json", "--out", "x"],
     "unknown or missing field"),
    ("train: unknown data set", TRAIN + ["--dataset", "nope"], "unknown data set"),
    ("train: empty data folder", TRAIN + ["--dataset", "{in}/empty-folder"],
     "no class sub-folders"),
    ("train: corrupt image", TRAIN + ["--dataset", "{in}/corrupt-folder"], "broken.png"),
    ("train: one-class folder for a 10-class model", TRAIN + ["--dataset", "{in}/one-class"],
     "1 classes"),
    ("train: image size off the model", TRAIN + ["--image-size", "8"], "last scale"),
    ("train: patch does not divide", TRAIN + ["--patch-size", "3"], "patch_size"),
    ("train: batch above data set", TRAIN + ["--batch-size", "5000"], "larger than the data"),
    ("train: unknown non-finite policy", TRAIN + ["--nonfinite", "ignore"], "invalid choice"),
    ("train: negative seed", TRAIN + ["--seed", "-1"], "integer >= 0"),
    ("train: zero kept checkpoints", TRAIN + ["--keep", "0"], "positive integer"),
    ("train: unknown device", TRAIN + ["--device", "tpu9"], "device"),
    ("train: out is a file", ["train", "--preset", "tiny", "--out", "{in}/a-file"], "is a file"),
    ("train: export onto a file", TRAIN + ["--export", "{in}/a-file"], "is a file"),
    ("train: export onto a non-model folder", TRAIN + ["--export", "{in}/one-class"],
     "not a flowar model"),
    ("train: existing run without --resume", ["train", "--preset", "tiny", "--out", "{in}/run"],
     "--resume"),
    ("train: resume another model", ["train", "--preset", "tiny", "--out", "{in}/other-run",
                                      "--resume", "--steps", "2"], "another model config"),
    ("sample: label out of range", SAMPLE + ["--labels", "10"], "out of range"),
    ("sample: missing checkpoint", ["sample", "--checkpoint", "{in}/nope"], "does not exist"),
    ("sample: checkpoint is a file", ["sample", "--checkpoint", "{in}/a-file"], "is a file"),
    ("sample: corrupt config", ["sample", "--checkpoint", "{in}/bad-json"], "not valid JSON"),
    ("sample: truncated weights", ["sample", "--checkpoint", "{in}/truncated"],
     "truncated or corrupt"),
    ("sample: weights of another config", ["sample", "--checkpoint", "{in}/mismatch"],
     "does not match"),
    ("sample: guidance below 1", SAMPLE + ["--cfg", "0.5"], "cfg must be"),
    ("sample: NaN guidance", SAMPLE + ["--cfg", "nan"], "cfg"),
    ("sample: released grid with 1 step", SAMPLE + ["--time-grid", "released"],
     "steps >= 2"),
    ("sample: empty guidance interval",
     SAMPLE + ["--cfg", "2", "--guidance-low", "0.9", "--guidance-high", "0.1"],
     "guidance interval"),
    ("sample: zero steps", SAMPLE + ["--steps", "0"], "positive integer"),
    ("sample: not a PNG", SAMPLE[:-1] + ["grid.jpg"], ".png"),
    ("sample: bad degree", SAMPLE + ["--attention", "poly", "--degree", "two"], "--degree"),
    ("sample: negative seed", SAMPLE + ["--seed", "-3"], "seed"),
    ("sample: unknown device", SAMPLE + ["--device", "tpu9"], "device"),
    ("unknown command", ["fly"], "invalid choice"),
]


@pytest.mark.parametrize(("name", "argv", "words"), CLI, ids=[c[0] for c in CLI])
def test_cli_exits_2_with_a_clear_message_and_writes_nothing(
    name, argv, words, inputs, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    before = tree_digest(inputs)
    try:
        code = main([a.replace("{in}", str(inputs)) for a in argv])
    except SystemExit as exit_:  # argparse rejects the argument itself
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran
    assert tree_digest(inputs) == before  # nor in the folders it was given


def test_the_tables_are_large_enough():
    assert len(LIBRARY) >= 30 and len(CLI) >= 30


# --------------------------------------------------------------------------------------------
# Property-based: random configs and sampling options never crash with anything but a
# documented error (UserError and its subclasses: ConfigError, CheckpointError, ...).

WEIRD = st.sampled_from([0, -1, 1.5, 1e-9, 100, math.nan, math.inf, -math.inf, "2", "1,2", None,
                         True, (2, 1), [3]])


def valid_or_weird(good: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Keyword arguments from ``good``, with up to two fields replaced by odd values."""
    clean = st.fixed_dictionaries(good)
    broken = st.lists(st.tuples(st.sampled_from(sorted(good)), WEIRD), min_size=1, max_size=2)
    return st.tuples(clean, broken).map(lambda pair: {**pair[0], **dict(pair[1])})


SCALES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda s: tuple(sorted(set(s))))
FLOW = dict(width=st.sampled_from([8, 16]), depth=st.integers(0, 2),
            num_heads=st.sampled_from([1, 2]), cross_attention=st.booleans(),
            mlp_ratio=st.floats(0.5, 4), time_embed_dim=st.sampled_from([4, 8, 16]))
ATTENTION = dict(backend=st.sampled_from(["exact", "poly", "performer", "auto"]),
                 degree=st.sampled_from([1, 2, 3, "auto"]),
                 polynomial=st.sampled_from(["taylor", "chebyshev"]),
                 target_error=st.floats(1e-4, 0.5), max_degree=st.integers(1, 4),
                 performer_features=st.integers(1, 16), seed=st.integers(0, 5))
MODEL = dict(scales=SCALES, channels=st.integers(1, 3), num_classes=st.integers(1, 4),
             width=st.sampled_from([8, 16]), encoder_depth=st.integers(0, 2),
             decoder_depth=st.integers(0, 2), num_heads=st.sampled_from([1, 2]),
             mlp_ratio=st.floats(0.5, 4), label_drop_prob=st.floats(0, 0.99),
             attn_dropout=st.floats(0, 0.5), proj_dropout=st.floats(0, 0.5),
             rope_grid=st.one_of(st.none(), st.integers(1, 8)), rope_base=st.floats(2, 1e4),
             time_scale=st.floats(1, 1000), qk_norm=st.booleans(),
             logit_scale=st.floats(0.5, 8))
SAMPLING = dict(steps=st.integers(1, 3), time_grid=st.sampled_from(["uniform", "released"]),
                cfg=st.floats(1, 5), cfg_schedule=st.sampled_from(["linear", "constant"]),
                guidance_low=st.floats(0, 0.5), guidance_high=st.floats(0.5, 1))
TRAINING = dict(batch_size=st.integers(1, 64), steps=st.integers(1, 10), lr=st.floats(1e-5, 1),
                warmup_steps=st.integers(0, 5), weight_decay=st.floats(0, 1),
                grad_clip=st.floats(0, 10), ema_decay=st.floats(0, 0.999),
                seed=st.integers(0, 100), keep_checkpoints=st.integers(1, 3),
                nonfinite=st.sampled_from(["stop", "skip"]), max_skipped=st.integers(1, 5))

PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(valid_or_weird(MODEL), valid_or_weird(FLOW), valid_or_weird(ATTENTION),
       valid_or_weird(SAMPLING), valid_or_weird(TRAINING))
def test_odd_config_values_raise_only_config_errors(model, flow, attention, sampling, training):
    for make in (
        lambda: FlowARConfig(**{**model, "flow": FlowHeadConfig(**flow),
                                "attention": AttentionConfig(**attention)}),
        lambda: SamplingConfig(**sampling),
        lambda: TrainConfig(**training),
        lambda: model_config_from_dict({**model, "flow": flow, "attention": attention}),
    ):
        try:
            make()
        except ConfigError as err:
            assert str(err)  # a message, not an empty error


@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries(MODEL), st.fixed_dictionaries(FLOW),
       st.fixed_dictionaries(ATTENTION), st.fixed_dictionaries(SAMPLING), st.booleans())
def test_every_valid_config_trains_and_samples(model, flow, attention, sampling, conditional):
    try:
        config = FlowARConfig(**{**model, "flow": FlowHeadConfig(**flow),
                                 "attention": AttentionConfig(**attention)})
        options = SamplingConfig(**sampling)
    except ConfigError:
        return  # e.g. the released grid with one step: a documented rejection
    torch.manual_seed(0)
    net = FlowAR(config)
    full = torch.rand(2, config.channels, config.size, config.size)
    labels = torch.tensor([0, config.num_classes - 1])
    try:
        loss = net.loss(full, labels, torch.Generator().manual_seed(0)).total
        loss.backward()
        images = generate(net, labels if conditional else None, options, num_images=2)[-1]
    except UserError:
        return  # e.g. a polynomial degree that cannot certify these logits
    assert torch.isfinite(loss)
    assert images.shape == full.shape and torch.isfinite(images).all()
