"""The TensorRT backend's device-only buffers (ELoFTR's fine maps between the coarse and the fine engine):
allocated once, reused while they fit, never given a pinned host twin, freed with the pool. CUDA cannot
run here: a stand-in of the two pycuda calls the pool makes (mem_alloc, pagelocked_empty)."""
from __future__ import annotations

import types

import numpy as np

from matchanything_ros.core.engines.cuda_context import BufferPool


class _Allocation:
    def __init__(self, nbytes: int, log: list[str]) -> None:
        self.nbytes, self.log = nbytes, log
        log.append(f"alloc {nbytes}")

    def __int__(self) -> int:
        return 0x1000 + self.nbytes

    def free(self) -> None:
        self.log.append(f"free {self.nbytes}")


def test_device_only_buffers_are_reused_grown_and_freed_without_host_copies() -> None:
    log: list[str] = []
    cuda = types.SimpleNamespace(mem_alloc=lambda n: _Allocation(n, log),
                                 pagelocked_empty=lambda n, dt: log.append(f"pinned {n}") or np.empty(n, dt))
    pool = BufferPool(cuda)
    fine_map = (1, 64, 416, 416)
    p1 = pool.get_device("coarse/feat_f0", fine_map, np.float32)
    assert pool.get_device("coarse/feat_f0", fine_map, np.float32) == p1  # the next frame: same buffer
    assert pool.get_device("coarse/feat_f0", (1, 64, 320, 320), np.float32) == p1  # smaller fits
    n416, n832 = 64 * 416 * 416 * 4, 64 * 832 * 832 * 4
    assert log == [f"alloc {n416}"] and pool.bytes_allocated == n416
    pool.get_device("coarse/feat_f0", (1, 64, 832, 832), np.float32)  # a larger canvas: replaced
    assert log == [f"alloc {n416}", f"free {n416}", f"alloc {n832}"]
    assert not any(entry.startswith("pinned") for entry in log)  # never staged on the host
    pool.free()
    assert log[-1] == f"free {n832}" and pool.bytes_allocated == 0
