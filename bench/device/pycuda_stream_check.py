#!/usr/bin/env python3
"""The TensorRT backend's CUDA plumbing on a real GPU, with a CUDA kernel standing in for the engine.

Exercises `matchanything_ros.core.engines.cuda_context.CudaWorker` exactly as `TensorRTBackend` uses
it: the worker thread retains the primary context and pushes/pops it per task, one non-blocking
stream, pinned host + device buffers from `BufferPool` (allocated once per shape, reused), async
H2D copy -> kernel on that stream -> async D2H copy -> stream sync. Checks:

  1. results are correct (vs numpy) for calls from many threads at once (ROS-callback style);
  2. every call ran on the worker thread; no context is left current in the calling threads;
  3. the classic failure is real: pycuda work in a plain thread without the context raises;
  4. buffers are reused (allocation count constant at a fixed shape; grows once for a larger one);
  5. torch (same process, same primary context) keeps working alongside;
  6. clean teardown: after close(), device memory is back to the baseline and calls are refused;
  7. timings: per-call latency (CUDA events on the stream and wall clock), H2D/D2H bandwidth.

Prints a short table; writes pycuda_stream_check.json to --out (default $OUT). Needs pycuda
(bench/device/build_pycuda.sh) and nvcc (for SourceModule). Runs in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from matchanything_ros.core.engines.cuda_context import CudaWorker  # noqa: E402

KERNEL = r"""
extern "C" __global__ void affine(const float* x, float* y, float a, float b, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + b;
}
"""


class FakeEngine:
    """Mimics TensorRTBackend._execute: name-keyed buffers, async copies and the 'engine' on one stream."""

    def __init__(self, worker: CudaWorker) -> None:
        self.worker = worker
        self.module: Any = None
        self.threads: set[str] = set()

        def compile_kernel(w: CudaWorker) -> None:
            from pycuda.compiler import SourceModule

            self.module = SourceModule(KERNEL, no_extern_c=True)
            self.func = self.module.get_function("affine")

        worker.call(compile_kernel)

    def run(self, x: np.ndarray, a: float, b: float, timed: bool = False) -> tuple[np.ndarray, float | None]:
        import pycuda.driver as cuda

        def execute(w: CudaWorker) -> tuple[np.ndarray, float | None]:
            self.threads.add(threading.current_thread().name)
            start, end = (cuda.Event(), cuda.Event()) if timed else (None, None)
            if start is not None:
                start.record(w.stream)
            d_in = w.upload("fake/x", x)
            d_out = w.device_buffer("fake/y", x.shape, np.float32)
            n = x.size
            self.func(np.intp(d_in), np.intp(d_out), np.float32(a), np.float32(b), np.int32(n),
                      block=(256, 1, 1), grid=((n + 255) // 256, 1), stream=w.stream)
            host = w.download("fake/y", x.shape, np.float32)
            if end is not None:
                end.record(w.stream)
            w.synchronize()
            ms = end.time_since(start) if end is not None else None
            return host.copy(), ms

        return self.worker.call(execute)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    import pycuda.driver as cuda

    report: dict[str, Any] = {"checks": {}}
    checks = report["checks"]
    cuda.init()
    dev = cuda.Device(0)
    report["gpu"] = dev.name()
    report["compute_capability"] = "{}.{}".format(*dev.compute_capability())
    report["driver_version"] = cuda.get_driver_version()

    # 3. the classic failure, for contrast: a plain thread touching pycuda without a current context
    err: list[str] = []

    def naked() -> None:
        try:
            cuda.mem_alloc(1024)
            err.append("no error")
        except Exception as exc:  # pycuda._driver.LogicError
            err.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=naked)
    t.start()
    t.join()
    checks["plain_thread_without_context_fails"] = err[0] != "no error"
    report["plain_thread_error"] = err[0]

    # torch first (if present): it keeps the primary context alive, as in a process that also runs torch,
    # so the memory baseline below measures only what the worker allocates
    torch_mod: Any = None
    try:
        import torch

        if torch.cuda.is_available():
            torch_mod = torch
            warm = torch.randn(2048, 2048, device="cuda")  # cuBLAS handle + workspace exist before the baseline
            (warm @ warm).sum().item()
            del warm
            torch.cuda.empty_cache()
    except ImportError:
        pass

    # baseline free memory, seen through a short-lived worker (it releases everything)
    with CudaWorker(0) as probe:
        free_before, total = probe.call(lambda w: w.memory_info())

    t_start = time.monotonic()
    worker = CudaWorker(0, thread_name="matchanything-trt")
    engine = FakeEngine(worker)
    rng = np.random.default_rng(0)

    # 1+2. correctness from many threads at once
    inputs = [rng.standard_normal(1 << 16).astype(np.float32) for _ in range(64)]

    def job(k: int) -> tuple[bool, bool]:
        x = inputs[k % len(inputs)]
        y, _ = engine.run(x, 1.5 + k, -2.0)
        # the calling (callback) thread never gets a context pushed onto it
        return bool(np.allclose(y, (1.5 + k) * x - 2.0, rtol=1e-6, atol=1e-5)), cuda.Context.get_current() is None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ros-callback") as pool:
        results = list(pool.map(job, range(256)))
    checks["correct_from_8_threads_256_calls"] = all(r[0] for r in results)
    checks["all_cuda_work_on_worker_thread"] = engine.threads == {"matchanything-trt"}
    checks["no_context_left_in_callers"] = all(r[1] for r in results)

    # 4. buffer reuse
    alloc_after_warm = worker.buffers.allocations
    for x in inputs[:32]:
        engine.run(x, 2.0, 1.0)
    checks["no_new_allocations_at_same_shape"] = worker.buffers.allocations == alloc_after_warm
    big = rng.standard_normal(1 << 20).astype(np.float32)
    engine.run(big, 1.0, 0.0)
    grew = worker.buffers.allocations - alloc_after_warm
    engine.run(inputs[0], 1.0, 0.0)  # smaller again: fits, no allocation
    engine.run(big, 1.0, 0.0)
    checks["grows_once_for_larger_shape"] = grew == 2 and worker.buffers.allocations == alloc_after_warm + 2

    # 5. torch alongside (shares the primary context), work interleaved from another thread
    if torch_mod is not None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(engine.run, inputs[1], 3.0, 0.5)
            a = torch_mod.randn(2048, 2048, device="cuda")
            total = float((a @ a).sum().item())
            y, _ = fut.result()
        del a
        torch_mod.cuda.empty_cache()
        checks["torch_alongside_ok"] = bool(np.isfinite(total)) and bool(
            np.allclose(y, 3.0 * inputs[1] + 0.5, rtol=1e-6, atol=1e-5))

    # 7. timings
    small = inputs[0]
    for _ in range(20):
        engine.run(small, 1.0, 0.0)
    wall, gpu = [], []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        _, ms = engine.run(small, 1.0, 0.0, timed=True)
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(ms or 0.0)
    report["call_256KB"] = {"wall_ms_median": statistics.median(wall), "wall_ms_p90": float(np.percentile(wall, 90)),
                            "stream_ms_median": statistics.median(gpu), "calls": args.calls}

    def bandwidth(w: CudaWorker) -> dict[str, float]:
        nbytes = 256 << 20
        host, dptr = w.buffers.get("bw", (nbytes,), np.uint8)
        host[...] = 1
        s0, s1, s2 = cuda.Event(), cuda.Event(), cuda.Event()
        s0.record(w.stream)
        for _ in range(4):
            cuda.memcpy_htod_async(dptr, host, w.stream)
        s1.record(w.stream)
        for _ in range(4):
            cuda.memcpy_dtoh_async(host, dptr, w.stream)
        s2.record(w.stream)
        s2.synchronize()
        return {"h2d_GBps": 4 * nbytes / (s1.time_since(s0) * 1e-3) / 1e9,
                "d2h_GBps": 4 * nbytes / (s2.time_since(s1) * 1e-3) / 1e9}

    report["pinned_bandwidth_256MB"] = worker.call(bandwidth)
    report["buffers_bytes"] = worker.buffers.bytes_allocated
    used_during = worker.call(lambda w: w.memory_info())
    report["device_used_mb_during"] = (used_during[1] - used_during[0]) / 2**20

    # 6. teardown: the kernel module is unloaded on the worker thread (as the TensorRT objects are)
    def unload(w: CudaWorker) -> None:
        engine.func = None
        engine.module = None

    worker.call(unload)
    worker.close()
    worker.close()  # idempotent
    try:
        engine.run(small, 1.0, 0.0)
        checks["calls_refused_after_close"] = False
    except Exception as exc:
        checks["calls_refused_after_close"] = "closed" in str(exc)
    with CudaWorker(0) as probe:
        free_after, _ = probe.call(lambda w: w.memory_info())
    leaked_mb = (free_before - free_after) / 2**20
    report["leaked_mb_after_close"] = leaked_mb
    checks["memory_released_after_close"] = leaked_mb < 4.0
    report["seconds"] = time.monotonic() - t_start
    report["passed"] = all(checks.values())

    print(f"GPU {report['gpu']} (sm {report['compute_capability']}), driver {report['driver_version']}")
    print(f"{'check':40s} result")
    for k, v in checks.items():
        print(f"{k:40s} {'ok' if v else 'FAILED'}")
    c = report["call_256KB"]
    bw = report["pinned_bandwidth_256MB"]
    print(f"call (256 KB in/out, kernel, sync): wall median {c['wall_ms_median']:.3f} ms (p90 "
          f"{c['wall_ms_p90']:.3f}), on-stream {c['stream_ms_median']:.3f} ms over {c['calls']} calls")
    print(f"pinned async copies: H2D {bw['h2d_GBps']:.1f} GB/s, D2H {bw['d2h_GBps']:.1f} GB/s; "
          f"leaked after close {leaked_mb:.1f} MB; plain-thread error: {report['plain_thread_error'][:80]}")
    print("PASS" if report["passed"] else "FAIL")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pycuda_stream_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
