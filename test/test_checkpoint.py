"""Checkpoint formats, strict loading and the errors for missing/corrupt/wrong/partial files.

Uses a reduced ELoFTR configuration (same code, smaller sizes) so the files stay small.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.engines.cache import sha256_file
from matchanything_ros.core.eloftr.config import EloftrConfig
from matchanything_ros.core.eloftr.model import EloftrNet
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.errors import CheckpointError

SMALL = EloftrConfig(block_dims=(16, 16, 32), layer_depths=(1, 2, 2), d_model=32, nhead=4,
                     layer_names=("self", "cross"), fine_d_model=16, fine_regress_dim=4)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return EloftrNet(SMALL).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lightning_ckpt_with_matcher_prefix(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"matcher.{k}": v for k, v in state.items()}}, path)
    _same(load_state_dict(path, "eloftr"), state)


def test_plain_state_dict_prefixed_or_not(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save(state, tmp_path / "plain.pth")
    _same(load_state_dict(tmp_path / "plain.pth", "eloftr"), state)
    torch.save({f"matcher.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pt")
    _same(load_state_dict(tmp_path / "prefixed.pt", "eloftr"), state)


def test_safetensors(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = load_state_dict(tmp_path / "model.safetensors", "eloftr")
    _same(loaded, state)
    # and it builds the model strictly
    EloftrPipeline({}, SMALL).build_net(loaded)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.ckpt", "eloftr")


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    """Any garbage gives a CheckpointError (the unpickler fails differently on different bytes)."""
    rng = np.random.default_rng(1234)
    path = tmp_path / f"broken{suffix}"
    for size in (1, 7, 64, 4096) * 50:
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="corrupt|not a plain weights"):
            load_state_dict(path, "eloftr")


def test_truncated_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": state}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state_dict(path, "eloftr")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"backbone.layer0.x": _Exploit()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path, "eloftr")


def test_wrong_variant(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    roma_like = {"matcher.model.encoder.cnn.layers.0.weight": torch.zeros(4, 3, 3, 3),
                 "matcher.model.decoder.gps.1.sigma_noise": torch.zeros(1)}
    torch.save({"state_dict": roma_like}, tmp_path / "roma.ckpt")
    with pytest.raises(CheckpointError, match="roma checkpoint.*'eloftr'"):
        load_state_dict(tmp_path / "roma.ckpt", "eloftr")
    torch.save({"state_dict": state}, tmp_path / "eloftr.ckpt")
    with pytest.raises(CheckpointError, match="eloftr checkpoint.*'roma'"):
        load_state_dict(tmp_path / "eloftr.ckpt", "roma")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a MatchAnything checkpoint"):
        load_state_dict(tmp_path / "other.pth", "eloftr")


def test_partial_or_extra_keys_are_named(state: dict[str, torch.Tensor]) -> None:
    pipe = EloftrPipeline({}, SMALL)
    partial = dict(state)
    dropped = sorted(k for k in partial if k.startswith("fine_preprocess."))
    for k in dropped:
        del partial[k]
    with pytest.raises(CheckpointError, match=rf"missing keys: {len(dropped)} \(fine_preprocess\."):
        pipe.build_net(partial)
    extra = dict(state, **{"backbone.layer0.rbr_reparam.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: 1 \(backbone.layer0.rbr_reparam.weight\)"):
        pipe.build_net(extra)
    # a checkpoint of another size (the released layout into the reduced config) fails on shapes
    big = EloftrNet(EloftrConfig()).state_dict()
    with pytest.raises(CheckpointError):
        pipe.build_net(big)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
