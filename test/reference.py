"""The reference set (golden fixtures of the original code + seeded_weights.py), located once for every test.

It lives in the repository (test/fixtures/reference, see its README.md); $MATCHANYTHING_REFERENCE_DIR
points the suite at another fixture set of the same layout.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_REFERENCE_DIR = REPO_ROOT / "test" / "fixtures" / "reference"
REFERENCE_ROOT = Path(os.environ.get("MATCHANYTHING_REFERENCE_DIR") or BUNDLED_REFERENCE_DIR).resolve()


@functools.lru_cache(maxsize=None)
def seeded_weights_module(reference_root: Path) -> Any:
    """`<reference_root>/seeded_weights.py` imported by path (it is reference material, not a package)."""
    spec = importlib.util.spec_from_file_location("seeded_weights", Path(reference_root) / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
