"""The bundled model's files and checkpoint resolution, free of torch and of the matcher.

The engine cache (which names exports by their checkpoint) and the matcher both need to know which file an
empty `checkpoint_path` means; this module is where that is decided, and it imports nothing of theirs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_ELOFTR_WEIGHTS = DATA_DIR / "demo_eloftr.safetensors"
DEMO_ELOFTR_CONFIG = DATA_DIR / "demo_eloftr.json"
# said by every output (CLI, PNG, node log, debug image) made with the bundled demo model
DEMO_MODEL_NOTICE = "demo model (not MatchAnything's weights)"


def resolve_eloftr_checkpoint(checkpoint_path: str) -> tuple[Path, Any, bool]:
    """-> (weights path, EloftrConfig, is_demo). Empty path = the bundled demo model.

    A `<name>.json` beside the weights holds EloftrConfig fields (a reduced model); without it the
    released model's configuration is used.
    """
    from .eloftr.config import EloftrConfig

    if not checkpoint_path:
        if not DEMO_ELOFTR_WEIGHTS.is_file() or not DEMO_ELOFTR_CONFIG.is_file():
            raise CheckpointError(
                f"no checkpoint_path given and the bundled demo model is missing ({DEMO_ELOFTR_WEIGHTS}, "
                f"{DEMO_ELOFTR_CONFIG.name}); pass the released matchanything_eloftr.ckpt"
            )
        return DEMO_ELOFTR_WEIGHTS, EloftrConfig.from_json(DEMO_ELOFTR_CONFIG), True
    path = Path(checkpoint_path).expanduser()
    sidecar = path.with_suffix(".json")
    cfg = EloftrConfig.from_json(sidecar) if sidecar.is_file() else EloftrConfig()
    is_demo = path.resolve() == DEMO_ELOFTR_WEIGHTS.resolve()
    return path, cfg, is_demo
