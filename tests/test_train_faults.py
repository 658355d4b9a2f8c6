"""Faults a long run meets: kills during a save, interrupted runs, non-finite losses/gradients."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from flowar.config import PRESETS
from flowar.data import ImageDataset
from flowar.io.checkpoint import load_checkpoint
from flowar.model import FlowAR
from flowar.train import NonFiniteError, TrainConfig, train
from flowar.train import loop as train_loop
from flowar.train.loop import checkpoints_in

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset with dropout on, so resuming must also restore the dropout masks' randomness
# (label dropout is on in the preset too).
MODEL = PRESETS["tiny"].replace(attn_dropout=0.1, proj_dropout=0.1)


def toy_data() -> ImageDataset:
    """40 random 4x4 grey images in 10 classes."""
    gen = torch.Generator().manual_seed(3)
    return ImageDataset(
        images=torch.rand(40, 1, 4, 4, generator=gen), labels=torch.arange(40) % 10,
        num_classes=10, class_names=tuple(str(i) for i in range(10)), name="toy",
        split="train",
    )


def recipe(**changes) -> TrainConfig:
    base = dict(dataset="toy", image_size=4, batch_size=8, steps=6, lr=2e-3, warmup_steps=1,
                log_every=0, sample_every=0, checkpoint_every=2, keep_checkpoints=2, seed=11)
    base.update(changes)
    return TrainConfig(**base)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its losses and final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    result = train(MODEL, recipe(), out, dataset=toy_data())
    assert len(result.losses) == 6
    return result


def assert_same_checkpoint(a: Path, b: Path) -> None:
    one, two = load_checkpoint(a, with_optimizer=True), load_checkpoint(b, with_optimizer=True)
    for key, value in one.weights.items():
        assert torch.equal(value, two.weights[key]), key
    for key, value in one.ema_weights.items():
        assert torch.equal(value, two.ema_weights[key]), key
    assert one.optimizer["ema_updates"] == two.optimizer["ema_updates"]
    assert one.optimizer["scheduler"] == two.optimizer["scheduler"]


class Interrupt(Exception):
    pass


def test_keeps_the_last_k_complete_checkpoints(reference):
    assert [step for step, _ in checkpoints_in(reference.out_dir)] == [4, 6]
    assert not [p for p in reference.out_dir.iterdir() if p.name.startswith(".")]


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, reference):
    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(MODEL, recipe(), tmp_path, dataset=toy_data(), on_step=stop_at_5)
    assert [step for step, _ in checkpoints_in(tmp_path)] == [2, 4]
    resumed = train(MODEL, recipe(), tmp_path, resume=True, dataset=toy_data())
    # Steps 5 and 6 again, from checkpoint 4: bit-identical losses, weights, EMA, optimizer.
    assert resumed.losses == reference.losses[4:]
    assert_same_checkpoint(resumed.last_checkpoint, reference.last_checkpoint)


SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import safetensors.torch
    from tests.test_train_faults import MODEL, recipe, toy_data
    from flowar.train import train

    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real_save = safetensors.torch.save_file

    def slow_save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if "checkpoint-0000004" in str(filename):
            marker.write_text(str(filename))  # half of checkpoint 4 is on disk: kill me now
            time.sleep(600)

    safetensors.torch.save_file = slow_save
    train(MODEL, recipe(), out, dataset=toy_data())
    """
)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, reference):
    out, marker = tmp_path / "run", tmp_path / "saving"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(out), str(marker)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the training subprocess never reached the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in out.iterdir() if p.name.startswith(".checkpoint-0000004")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert [step for step, _ in checkpoints_in(out)] == [2]  # the partial one does not count

    resumed = train(MODEL, recipe(), out, resume=True, dataset=toy_data())
    assert resumed.losses == reference.losses[2:]  # continued from step 2, same run
    assert not partial[0].exists()  # the leftover was cleaned up
    assert [step for step, _ in checkpoints_in(out)] == [4, 6]
    assert_same_checkpoint(resumed.last_checkpoint, reference.last_checkpoint)


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, reference, caplog):
    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(MODEL, recipe(), tmp_path, dataset=toy_data(), on_step=stop_at_5)
    newest = tmp_path / "checkpoint-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:64])  # e.g. a disk that filled up
    resumed = train(MODEL, recipe(), tmp_path, resume=True, dataset=toy_data())
    assert "cannot resume from" in caplog.text
    assert resumed.losses == reference.losses[2:]


# --------------------------------------------------------------------------------------------
# Non-finite guard


def poison_loss(monkeypatch, bad_calls: set[int]) -> None:
    """Make FlowAR.loss return NaN on the given (0-based) calls."""
    real = FlowAR.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if calls["n"] in bad_calls:
            out.total = out.total * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(FlowAR, "loss", loss)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {4})  # step 5
    with pytest.raises(NonFiniteError, match=r"step 4.*checkpoint-0000004"):
        train(MODEL, recipe(checkpoint_every=1, keep_checkpoints=1), tmp_path,
              dataset=toy_data())
    assert [step for step, _ in checkpoints_in(tmp_path)] == [4]
    good = load_checkpoint(tmp_path / "checkpoint-0000004")
    assert all(torch.isfinite(v).all() for v in good.weights.values())


def test_nan_loss_is_skipped_when_asked(tmp_path, monkeypatch, caplog):
    poison_loss(monkeypatch, {2, 3})
    result = train(MODEL, recipe(nonfinite="skip"), tmp_path, dataset=toy_data())
    assert result.skipped_steps == 2 and len(result.losses) == 4
    assert "skipping the step" in caplog.text
    ckpt = load_checkpoint(result.last_checkpoint, with_optimizer=True)
    assert all(torch.isfinite(v).all() for v in ckpt.weights.values())
    assert ckpt.optimizer["ema_updates"] == 4  # the EMA saw only the good steps


def test_too_many_skips_in_a_row_stop(tmp_path, monkeypatch):
    poison_loss(monkeypatch, set(range(1, 100)))
    with pytest.raises(NonFiniteError, match="3 skipped steps in a row"):
        train(MODEL, recipe(nonfinite="skip", max_skipped=3), tmp_path, dataset=toy_data())
    assert checkpoints_in(tmp_path) == []


def test_nan_gradient_with_a_finite_loss_is_caught(tmp_path, monkeypatch):
    real = FlowAR.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if calls["n"] == 1:
            # A finite loss whose gradient is NaN: d/dx sqrt(x) at 0 is inf, times 0.
            out.total = out.total + torch.sqrt(self.z_proj.weight.sum() * 0)
        calls["n"] += 1
        return out

    monkeypatch.setattr(FlowAR, "loss", loss)
    with pytest.raises(NonFiniteError, match="gradient norm"):
        train(MODEL, recipe(), tmp_path, dataset=toy_data())
    assert checkpoints_in(tmp_path) == []


def test_broken_weights_are_never_saved_over_a_good_checkpoint(tmp_path, monkeypatch):
    real_build = train_loop.build_optimizer

    def build(model, config):
        optimizer = real_build(model, config)
        real_step = optimizer.step
        count = {"n": 0}

        def step(self, *args, **kwargs):
            out = real_step(*args, **kwargs)
            count["n"] += 1
            if count["n"] == 4:  # finite loss and gradients, but the update overflows
                with torch.no_grad():
                    model.z_proj.weight[0, 0] = float("inf")
            return out

        optimizer.step = types.MethodType(step, optimizer)  # the scheduler wants a method
        return optimizer

    saved = {}

    def remember(step, metrics):
        if step == 3:
            saved.update(digest(tmp_path / "checkpoint-0000002"))

    monkeypatch.setattr(train_loop, "build_optimizer", build)
    with pytest.raises(NonFiniteError, match="not saving"):
        train(MODEL, recipe(checkpoint_every=2, keep_checkpoints=1), tmp_path,
              dataset=toy_data(), on_step=remember)
    assert [step for step, _ in checkpoints_in(tmp_path)] == [2]
    assert saved and digest(tmp_path / "checkpoint-0000002") == saved
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
