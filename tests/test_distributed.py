"""Data-parallel training: two gloo processes on CPU against one process, same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowar.config import PRESETS
from flowar.data import ImageDataset
from flowar.errors import ConfigError
from flowar.io.checkpoint import load_checkpoint
from flowar.model import FlowAR
from flowar.train import TrainConfig, train
from flowar.train.distributed import DistInfo, setup, shard

MODEL = PRESETS["tiny"]
WORLD = 2
# Global batches: one that splits evenly over 2 processes and one that does not (4 + 3 rows).
BATCHES = (8, 7)


def synthetic_data() -> ImageDataset:
    """32 random 4x4 grey images in 10 classes (the tiny preset's shape)."""
    gen = torch.Generator().manual_seed(1)
    return ImageDataset(
        images=torch.rand(32, 1, 4, 4, generator=gen),
        labels=torch.arange(32) % 10,
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        name="synthetic",
        split="train",
    )


def recipe(batch: int) -> TrainConfig:
    # A long warm-up keeps the learning rate at 1e-4..3e-4 over the three steps. Adam turns
    # the rounding differences of near-zero gradients (the flow head's output layer starts at
    # zero) into update differences proportional to the learning rate; at this rate they stay
    # ~1e-7 while the weights still move by ~1e-4, far above the 1e-6 tolerance.
    return TrainConfig(
        dataset="synthetic", image_size=4, batch_size=batch, steps=3, lr=1e-3, warmup_steps=10,
        log_every=0, sample_every=0, checkpoint_every=0, seed=5,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, ports: list[int], root: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then plain train()."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
    )
    for batch, port in zip(BATCHES, ports):
        os.environ["MASTER_PORT"] = str(port)
        result = train(MODEL, recipe(batch), Path(root) / f"ddp-{batch}",
                       dataset=synthetic_data())
        torch.save(
            {"state": result.model.state_dict(), "losses": result.losses,
             "checkpoint": str(result.last_checkpoint)},
            Path(root) / f"rank{rank}-{batch}.pt",
        )


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.manual_seed(recipe(8).seed)  # train() seeds the initial weights the same way
    initial = FlowAR(MODEL).state_dict()
    ports = [free_port() for _ in BATCHES]
    mp.start_processes(_worker, args=(ports, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    for batch in BATCHES:
        single = train(MODEL, recipe(batch), tmp_path / f"single-{batch}",
                       dataset=synthetic_data())
        ranks = [torch.load(tmp_path / f"rank{r}-{batch}.pt") for r in range(WORLD)]
        reference = single.model.state_dict()
        assert len(single.losses) == 3
        for name, value in reference.items():
            # Every process holds bit-identical weights...
            assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
            # ...equal to the one-process run with the same global batch.
            torch.testing.assert_close(ranks[0]["state"][name], value, rtol=0, atol=1e-6)
        # The weights moved far more than the tolerance, so the comparison above means something.
        moved = max(float((v - initial[k]).abs().max()) for k, v in reference.items())
        assert moved > 100 * 1e-6
        for rank in ranks:
            torch.testing.assert_close(rank["losses"], single.losses, rtol=0, atol=1e-5)
        # Only rank 0 writes checkpoints, and they load into a plain model.
        ckpts = sorted((tmp_path / f"ddp-{batch}").glob("checkpoint-*"))
        assert [c.name for c in ckpts] == ["checkpoint-0000003"]
        assert ranks[1]["checkpoint"] == str(ckpts[0])
        plain = FlowAR(MODEL)
        plain.load_state_dict(load_checkpoint(ckpts[0]).weights)  # strict: no "module." keys


@pytest.mark.parametrize(("total", "world"), [(8, 2), (7, 2), (10, 3), (5, 5), (64, 8)])
def test_shards_cover_the_global_batch_once(total, world):
    rows = [shard(total, r, world) for r in range(world)]
    covered = [i for s in rows for i in range(total)[s]]
    assert covered == list(range(total))
    sizes = [s.stop - s.start for s in rows]
    assert max(sizes) - min(sizes) <= 1


def test_batch_smaller_than_world_is_a_clear_error():
    with pytest.raises(ConfigError, match="smaller than the number of processes"):
        shard(3, 0, 4)


def test_setup_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = setup("cpu")
    assert info == DistInfo(device=torch.device("cpu"))
    assert not info.enabled and info.is_main


def test_setup_needs_the_torchrun_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        setup("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        setup("cpu")


@pytest.mark.slow
def test_flowar_train_under_torchrun_matches_one_process(tmp_path):
    """End to end: the CLI launched by torchrun (2 CPU processes) against a plain CLI run."""
    import subprocess
    import sys

    args = ["-m", "flowar", "train", "--preset", "tiny", "--steps", "2", "--batch-size", "8",
            "--warmup", "10", "--seed", "3"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    multi = subprocess.run(launcher + args + ["--out", str(tmp_path / "multi")], env=env,
                           capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert multi.stdout.count("done: 2 steps") == 1  # only rank 0 prints
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    a = load_checkpoint(tmp_path / "multi" / "checkpoint-0000002").weights
    b = load_checkpoint(tmp_path / "single" / "checkpoint-0000002").weights
    for name, value in b.items():
        torch.testing.assert_close(a[name], value, rtol=0, atol=1e-6)
