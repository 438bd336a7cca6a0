"""Safe, strict checkpoint loading for both variants.

Accepts a PyTorch-Lightning `.ckpt` (`{"state_dict": ...}` with keys prefixed `matcher.`), a plain
state dict (`.pth`/`.pt`, prefixed or not) and `.safetensors`. Pickles are opened with
`torch.load(weights_only=True)`, so no code in the file runs. The key set is checked against the
variant's expected layout: a wrong variant or a partial/extra load is a CheckpointError that
names the missing/unexpected keys (no silent non-strict loading, unlike the original).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import CheckpointError

PREFIX = "matcher."
# key prefixes (after stripping "matcher.") that identify a variant's checkpoint
VARIANT_MARKERS = {
    "eloftr": ("backbone.layer0.", "loftr_coarse.layers."),
    "roma": ("model.encoder.", "model.decoder."),
}


def _read_raw(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ... : all mean unreadable
            raise CheckpointError(f"corrupt safetensors file {path}: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a plain weights file (refusing to execute pickled code; weights_only=True): "
            f"{_unpickler_reason(exc)}"
        ) from None
    except Exception as exc:
        # Garbage bytes make the unpickler fail in arbitrary ways (IndexError, KeyError, struct.error,
        # UnicodeDecodeError, ...): every one of them means "this file is not a readable checkpoint".
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error naming what the file holds, without torch's advice to load it
    with weights_only=False (which would run that code)."""
    for line in str(exc).splitlines():
        if line.strip().startswith(("Unsupported", "Trying to load unsupported")):
            return line.strip()
    return "unsupported pickle content"


def _extract_state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]  # Lightning checkpoint
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path} holds no state dict (got {type(raw).__name__})")
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(raw) or not all(isinstance(k, str) for k in raw):
        bad = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f"{path}: state dict has non-tensor entries, e.g. {bad}")
    # the original strips ONE leading "matcher." (Lightning's module attribute name)
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}


def detect_variant(keys: Iterable[str]) -> str | None:
    """The variant whose marker prefixes the keys carry, or None."""
    keys = list(keys)
    for variant, markers in VARIANT_MARKERS.items():
        if any(k.startswith(markers) for k in keys):
            return variant
    return None


def _key_summary(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Raise CheckpointError unless `state` has exactly the expected keys with the expected shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_summary(unexpected)}")
        raise CheckpointError(f"{source} does not load strictly: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in sorted(expected)
             if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {'; '.join(wrong[:3])}")


def load_state_dict(path: str | Path, variant: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file -> state dict without the `matcher.` prefix, checked to be `variant`.

    Strict key/shape checks against a concrete model happen in `check_keys` (the pipelines call it).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    state = _extract_state_dict(_read_raw(p), p)
    found = detect_variant(state)
    if found != variant:
        what = f"a {found} checkpoint" if found else "not a MatchAnything checkpoint of a known variant"
        raise CheckpointError(f"{p} is {what}, but variant {variant!r} was requested "
                              f"(first keys: {', '.join(list(state)[:3])})")
    return state
