"""Tests of the ``flowar eval`` command: classifier training and scoring a generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flowar
import flowar.pipeline
from flowar.cli.main import main
from flowar.config import SamplingConfig
from flowar.data import load_dataset
from flowar.eval import load_classifier


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "digits8"
    code = main(["eval", "--train-classifier", "--dataset", "digits", "--image-size", "8",
                 "--out", str(out), "--epochs", "3", "--width", "8", "--feature-dim", "16",
                 "--batch-size", "32", "--lr", "0.01", "--json"])
    assert code == 0
    return out


def test_train_classifier_writes_folder_and_reproducible_command(digits_classifier, capsys):
    model = load_classifier(digits_classifier)
    meta = model.metadata
    assert meta["dataset"] == "digits" and meta["image_size"] == 8 and meta["seed"] == 0
    assert meta["num_test"] == len(load_dataset("digits", split="test"))
    assert meta["test_accuracy"] > 0.8
    cmd = meta["command"].split()
    assert cmd[:3] == ["flowar", "eval", "--train-classifier"]
    assert cmd[cmd.index("--epochs") + 1] == "3" and cmd[cmd.index("--width") + 1] == "8"
    assert cmd[cmd.index("--out") + 1] == str(digits_classifier)


class FakeGenerator:
    """Stands in for a trained model: returns real held-out digits of the requested class."""

    def __init__(self, meta, flip: bool = False):
        self.meta = meta
        self.flip = flip
        self.calls = []
        data = load_dataset("digits", split="test", image_size=8)
        self.bank = {c: data.images[data.labels == c] for c in range(10)}

    def default_sampling(self, **changes):
        return SamplingConfig(**{k: v for k, v in changes.items() if v is not None})

    def sample(self, labels, config, *, seed, batch_size, progress=None):
        assert isinstance(config, SamplingConfig)
        self.calls.append((config, seed, batch_size))
        out = []
        for i, label in enumerate(labels.tolist()):
            label = (label + 1) % 10 if self.flip else label
            out.append(self.bank[label][i % len(self.bank[label])])
        for start in range(0, len(labels), batch_size):
            if progress is not None:
                progress(min(batch_size, len(labels) - start))
        return torch.stack(out)


def _install(monkeypatch, generator):
    seen = {}

    def fake_load(checkpoint=None, **kwargs):
        seen["checkpoint"] = checkpoint
        return generator

    monkeypatch.setattr(flowar.pipeline, "load_generator", fake_load)
    return seen


META = {"dataset": "digits", "image_size": 8, "num_classes": 10}


def test_score_json(monkeypatch, capsys, digits_classifier):
    gen = FakeGenerator(META)
    seen = _install(monkeypatch, gen)
    code = main(["eval", "--checkpoint", "some/ckpt", "--classifier", str(digits_classifier),
                 "--num-samples", "60", "--steps", "3", "--cfg", "2.5", "--seed", "7",
                 "--batch-size", "25", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert seen["checkpoint"] == "some/ckpt"
    config, seed, batch = gen.calls[0]
    assert (config.steps, config.cfg, seed, batch) == (3, 2.5, 7, 25)
    assert result["num_samples"] == 60 and result["predicted_counts"] is not None
    assert result["accuracy"] > 0.8 and result["real_accuracy"] > 0.8
    assert result["fd"] >= 0 and result["fd_real_halves"] >= 0
    assert result["sampling"]["steps"] == 3 and result["dataset"] == "digits"


def test_score_table_and_wrong_labels(monkeypatch, capsys, digits_classifier):
    _install(monkeypatch, FakeGenerator(META, flip=True))
    code = main(["eval", "--classifier", str(digits_classifier), "--num-samples", "40"])
    assert code == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("accuracy of generated"))
    assert float(line.split()[-1]) < 0.3  # every image shows the next class
    assert "FD generated vs real test (40 vs" in out and "FD real half vs half" in out


def test_score_refuses_mismatched_classifier(monkeypatch, capsys, digits_classifier):
    _install(monkeypatch, FakeGenerator({**META, "image_size": 16}))
    assert main(["eval", "--classifier", str(digits_classifier), "--num-samples", "10"]) == 2
    err = capsys.readouterr().err
    assert "--train-classifier --dataset digits --image-size 16" in err
    _install(monkeypatch, FakeGenerator({**META, "dataset": "mnist"}))
    assert main(["eval", "--classifier", str(digits_classifier), "--num-samples", "10"]) == 2
    assert "trained on 'digits'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--num-samples", "1"], "--num-samples"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--steps", "0"], "steps"),
    (["eval", "--train-classifier", "--dataset", "digits"], "--out"),
    (["eval", "--train-classifier", "--dataset", "nope", "--out", "x"], "unknown data set"),
    (["eval", "--train-classifier", "--dataset", "digits", "--out", "x", "--image-size", "0"],
     "image_size"),
])
def test_bad_arguments_exit_2(monkeypatch, capsys, argv, message):
    _install(monkeypatch, FakeGenerator(META))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_classifier_folder(monkeypatch, capsys, tmp_path):
    _install(monkeypatch, FakeGenerator(META))
    assert main(["eval", "--classifier", str(tmp_path / "none"), "--num-samples", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (Path(flowar.__file__).parent / "assets" / "flowar-mnist16").is_dir(),
                    reason="the shipped generator is not there yet")
def test_shipped_model_reaches_accuracy(capsys):
    assert main(["eval", "--num-samples", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] >= 0.90
