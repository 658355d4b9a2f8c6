"""Safe reading of weight files: malicious pickles are refused, broken files named clearly."""

import argparse
import os
import pickle

import pytest
import torch

from flowar.errors import CheckpointError
from flowar.io.weights import read_safetensors_metadata, read_weights, write_safetensors_atomic


class _WritesMarker:
    """Unpickling this object would run ``open(marker, 'w')``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(2)}, "extra": _WritesMarker(str(marker))}
    if how == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        read_weights(path)
    assert not marker.exists()
    # sanity: the payload really is live, unpickling without the guard would create the file
    pickle.loads(pickle.dumps(_WritesMarker(str(marker))))
    assert marker.exists()


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    write_safetensors_atomic(tmp_path / "good.safetensors", {"w": torch.randn(64, 64)})
    st = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[: len(st) // 2])
    for name in ("cut.pth", "junk.ckpt", "cut.safetensors"):
        with pytest.raises(CheckpointError, match="corrupt"):
            read_weights(tmp_path / name)
    with pytest.raises(CheckpointError, match="empty"):
        read_weights(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "missing.pth")
    assert torch.equal(read_weights(good)["w"], torch.load(good)["w"])


def test_training_checkpoint_with_argparse_namespace_loads(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {"w": torch.ones(3)}, "args": argparse.Namespace(lr=1e-4), "epoch": 5},
               path)
    obj = read_weights(path)
    assert obj["epoch"] == 5 and obj["args"].lr == 1e-4
    assert torch.equal(obj["model"]["w"], torch.ones(3))


def test_safetensors_atomic_write_and_metadata(tmp_path):
    base = torch.randn(4, 4)
    path = write_safetensors_atomic(
        tmp_path / "sub" / "w.safetensors", {"a": base, "b": base[:2]}, metadata={"k": "v"}
    )
    loaded = read_weights(path)
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["b"], base[:2])
    assert read_safetensors_metadata(path) == {"k": "v"}
    assert sorted(os.listdir(path.parent)) == ["w.safetensors"]  # no temporary file left
