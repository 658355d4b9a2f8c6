"""Training loop and checkpoints: safe formats, resume bookkeeping, data/model mismatches."""

import json

import pytest
import torch

from flowar.data.base import ImageDataset
from flowar.errors import CheckpointError, ConfigError, UserError
from flowar.io.checkpoint import load_checkpoint
from flowar.pipeline import load_generator
from flowar.train import TrainConfig, train
from flowar.train.loop import batch_indices, checkpoints_in, export_model, lr_factor
from tests.conftest import tiny_config


def toy_dataset(count=40, channels=2, side=4, classes=5):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(count, channels, side, side, generator=gen)
    labels = torch.arange(count) % classes
    return ImageDataset(images=images, labels=labels, num_classes=classes,
                        class_names=tuple(str(i) for i in range(classes)), name="toy")


def quick_config(**changes):
    base = dict(dataset="toy", image_size=4, batch_size=8, steps=4, warmup_steps=1,
                log_every=0, sample_every=0, checkpoint_every=2, keep_checkpoints=2)
    base.update(changes)
    return TrainConfig(**base)


def test_checkpoints_use_safe_formats_only(tmp_path):
    result = train(tiny_config(), quick_config(), tmp_path, dataset=toy_dataset())
    ckpt = result.last_checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "ema.safetensors", "model.safetensors", "optimizer.pt"]
    from safetensors.torch import load_file

    weights = load_file(ckpt / "model.safetensors")
    assert "class_emb.weight" in weights
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # no pickled objects
    assert set(state) == {"optimizer", "scheduler", "ema_updates"}
    info = json.loads((ckpt / "config.json").read_text())
    assert info["state"]["step"] == 4 and info["model"]["num_classes"] == 5
    assert [step for step, _ in checkpoints_in(tmp_path)] == [2, 4]


def test_export_and_load_generator(tmp_path):
    result = train(tiny_config(), quick_config(steps=2), tmp_path / "run", dataset=toy_dataset())
    exported = export_model(result.last_checkpoint, tmp_path / "model")
    assert not (exported / "optimizer.pt").exists()
    loaded = load_checkpoint(result.last_checkpoint)
    generator = load_generator(exported)
    for key, value in loaded.ema_weights.items():
        torch.testing.assert_close(generator.model.state_dict()[key], value)
    images = generator.sample(torch.tensor([0, 3]), generator.default_sampling(steps=2))
    assert images.shape == (2, 2, 4, 4) and 0 <= images.min() and images.max() <= 1


def test_existing_run_needs_resume(tmp_path):
    train(tiny_config(), quick_config(steps=2), tmp_path, dataset=toy_dataset())
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(), quick_config(steps=2), tmp_path, dataset=toy_dataset())


def test_data_must_fit_the_model(tmp_path):
    with pytest.raises(ConfigError, match="last scale"):
        train(tiny_config(), quick_config(), tmp_path, dataset=toy_dataset(side=8))
    with pytest.raises(ConfigError, match="channels"):
        train(tiny_config(), quick_config(), tmp_path, dataset=toy_dataset(channels=1))
    with pytest.raises(ConfigError, match="classes"):
        train(tiny_config(), quick_config(), tmp_path, dataset=toy_dataset(classes=4))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generator(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_generator(broken)
    result = train(tiny_config(), quick_config(steps=2), tmp_path / "run", dataset=toy_dataset())
    weights = result.last_checkpoint / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_generator(result.last_checkpoint)


def test_schedule_and_batches():
    config = quick_config(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(1e-2)
    first = batch_indices(0, 40, 8, seed=0)
    epoch = torch.cat([batch_indices(s, 40, 8, seed=0) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))  # one epoch covers every item once
    assert not torch.equal(batch_indices(5, 40, 8, seed=0), first)  # a new permutation


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(patch_size=3, image_size=16), "patch_size"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_invalid_train_configs(changes, words):
    with pytest.raises(ConfigError, match=words):
        quick_config(**changes)
