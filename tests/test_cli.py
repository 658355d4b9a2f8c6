"""The command line: the shipped model samples with no arguments, bad input exits with 2."""

import pytest
import torch

from flowar.cli.main import main
from flowar.pipeline import load_generator, shipped_model_dir


def test_shipped_model_loads_and_samples_on_cpu():
    generator = load_generator()
    assert generator.meta["dataset"] == "mnist"
    config = generator.default_sampling(steps=2)
    images = generator.sample(torch.tensor([3, 7]), config, seed=0)
    assert images.shape == (2, 1, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a blank canvas


def test_sample_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    code = main(["sample", "--out", str(out), "--labels", "1", "2", "--per-label", "2",
                 "--steps", "2"])
    assert code == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 16 and image.height > 16


def test_progression_figure(tmp_path):
    out = tmp_path / "progression.png"
    assert main(["sample", "--progression", "--labels", "5", "--per-label", "2", "--steps",
                 "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


@pytest.mark.parametrize(
    "args, words",
    [
        (["--labels", "10"], "out of range"),
        (["--labels", "-1"], "out of range"),
        (["--checkpoint", "/nonexistent/run"], "does not exist"),
        (["--cfg", "0.5"], "cfg must be"),
        (["--unconditional", "--labels", "3"], "exclude each other"),
        (["--degree", "3"], "need --attention"),
    ],
)
def test_bad_sample_input_exits_2_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "never.png"
    code = main(["sample", "--out", str(out), "--steps", "1", *args])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((shipped_model_dir() / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "x.png"
    assert main(["sample", "--checkpoint", str(broken), "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not out.exists()


def test_invalid_config_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text('{"scales": [1, 4, 2], "channels": 1, "num_classes": 10}')
    out = tmp_path / "run"
    assert main(["train", "--preset", str(bad), "--out", str(out), "--steps", "1"]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert not any(out.glob("checkpoint-*"))
