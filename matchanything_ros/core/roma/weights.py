"""Loading the two RoMa weight files strictly: the MatchAnything checkpoint and Meta's DINOv2 ViT-L/14.

The released `matchanything_roma.ckpt` holds everything except DINOv2 (603 tensors, keys
`matcher.model.encoder.*` / `matcher.model.decoder.*`); DINOv2 comes from Meta's
`dinov2_vitl14_pretrain.pth` (343 tensors). Both go through `core/checkpoint.py` (no pickled code
runs, missing/unexpected keys are named); unlike the original (strict=False) nothing is ignored.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import _extract_state_dict, _read_raw, check_keys, detect_variant
from ..errors import CheckpointError
from .model import RomaNet

MODEL_PREFIX = "model."  # after checkpoint.py strips "matcher."


def _expected(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def _refuse_matchanything_keys(state: dict[str, torch.Tensor], source: str) -> None:
    if detect_variant(state) is not None or any(k.startswith(("matcher.", "model.")) for k in state):
        raise CheckpointError(f"{source} looks like a MatchAnything checkpoint, not Meta's "
                              "dinov2_vitl14_pretrain.pth (pass the DINOv2 file as dinov2_path)")


def load_state_dicts_into(model: RomaNet, roma_state: dict[str, torch.Tensor],
                          dinov2_state: dict[str, torch.Tensor], roma_source: str = "RoMa checkpoint",
                          dinov2_source: str = "DINOv2 weights") -> None:
    """Strictly load a RoMa state dict (keys with or without `matcher.`) and a DINOv2 state dict."""
    roma = {(k[len("matcher."):] if k.startswith("matcher.") else k): v for k, v in roma_state.items()}
    not_model = sorted(k for k in roma if not k.startswith(MODEL_PREFIX))
    if not_model:
        raise CheckpointError(f"{roma_source}: keys outside `matcher.model.`: {', '.join(not_model[:5])}")
    roma = {k[len(MODEL_PREFIX):]: v for k, v in roma.items()}
    part = model.checkpoint_modules()
    check_keys(roma, _expected(part), roma_source)
    _refuse_matchanything_keys(dinov2_state, dinov2_source)
    check_keys(dinov2_state, _expected(model.dinov2), dinov2_source)
    part.load_state_dict(roma, strict=True)
    model.dinov2.load_state_dict(dinov2_state, strict=True)


def load_dinov2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not str(path):
        raise CheckpointError("RoMa needs Meta's DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth): set dinov2_path")
    if not p.is_file():
        raise CheckpointError(f"DINOv2 weights file not found: {p}")
    state = _extract_state_dict(_read_raw(p), p)
    _refuse_matchanything_keys(state, str(p))
    return state
