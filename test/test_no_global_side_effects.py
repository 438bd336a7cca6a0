"""A Matcher leaves torch's process-wide state as it found it (cuDNN autotuning, TF32, grad mode, threads).

Those switches are global: a matcher that flipped them changed the numerics, speed and memory of every
other matcher and of the user's own torch code (an fp32 matcher created after an fp16 one once peaked at
34 GB on an H200 from cuDNN autotuning left on).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from matchanything_ros.core.backends import torch_backend
from matchanything_ros.core.backends.torch_backend import numeric_flags
from matchanything_ros.core.matcher import DATA_DIR, Matcher, MatcherConfig


def global_state() -> tuple[Any, ...]:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads(),
            torch.get_default_dtype(), torch.get_float32_matmul_precision())


@pytest.fixture
def unusual_globals() -> Any:
    """Globals set to what no backend sets, so a matcher's own values would show; restored after."""
    saved = global_state()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:3]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_switches_hold_inside_a_run_only(unusual_globals: Any, precision: str) -> None:
    before = global_state()
    with numeric_flags("cuda", precision):
        wanted = torch_backend.CUDA_NUMERICS[precision]
        assert torch.backends.cudnn.benchmark is wanted["cudnn_benchmark"]
        # a run's numerics never depend on what the process set before
        assert torch.backends.cudnn.allow_tf32 is wanted["cudnn_tf32"]
        assert torch.backends.cuda.matmul.allow_tf32 is wanted["matmul_tf32"]
        if precision == "fp32":  # fp32 means fp32: no TF32 anywhere
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert global_state() == before
    with pytest.raises(RuntimeError):  # restored on errors too
        with numeric_flags("cuda", precision):
            raise RuntimeError("a failing run")
    assert global_state() == before


def test_matchers_leave_global_state_unchanged(unusual_globals: Any) -> None:
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        a, b = z["image0"], z["image1"]
    before = global_state()
    cfg = MatcherConfig(backend="torch", device="cpu", precision="fp32", resize_max=320)
    with Matcher(cfg) as first:
        assert global_state() == before
        n = len(first.match(a, b))
        assert global_state() == before
        with Matcher(cfg) as second:
            assert len(second.match(a, b)) == n > 0
    assert global_state() == before
