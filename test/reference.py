"""The shared reference set (fixtures + seeded_weights.py), located once for every test."""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# $MATCHANYTHING_REFERENCE_DIR, else <repo>/../shared/reference
REFERENCE_ROOT = Path(os.environ.get("MATCHANYTHING_REFERENCE_DIR")
                      or REPO_ROOT.parent / "shared" / "reference").resolve()


@functools.lru_cache(maxsize=None)
def seeded_weights_module(reference_root: Path) -> Any:
    """`<reference_root>/seeded_weights.py` imported by path (it is reference material, not a package)."""
    spec = importlib.util.spec_from_file_location("seeded_weights", Path(reference_root) / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
