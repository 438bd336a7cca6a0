"""Our Triton kernels, loaded where Triton is: each kernel module imports Triton itself, so callers reach it through
here and get None where it is missing (the CPU-only CI image, some Jetson wheels) and keep their torch form."""
from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def resample_kernel() -> Any:
    """`resample_kernel.py` where Triton imports (torch's CUDA wheels bring it), else None; decided once."""
    try:
        from . import resample_kernel as module
    except Exception:  # noqa: BLE001 - any failure to import means no Triton here
        return None
    return module
