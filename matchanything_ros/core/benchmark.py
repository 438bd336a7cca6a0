"""`matchanything benchmark`: what a user gets from `Matcher.match` — end-to-end latency and its split
(preprocess / inference / postprocess), host CPU time per pair, pairs/s, peak memory and match count.

Per configuration (backend, device, precision, canvas size): warm-up runs first (lazy init, tactic
selection, CUDA-graph capture, allocator growth land there), then `runs` timed runs of the whole
`Matcher.match` path (on CUDA it synchronises before it returns); reported are median, p10/p90,
min/max of each stage and of the total, the host CPU milliseconds per pair (`time.process_time`: on a
Jetson the CPU is the scarce part), the match count, end-to-end pairs/s (1000 / median total), the process's
peak resident memory over the timed runs (Linux VmHWM, reset before them) and, where the backend
can tell, peak device memory. Results go to JSON and a PNG of the latency distributions (drawn with
OpenCV, so no plotting library is needed).
"""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from .validate import run_pair

STAGES = ("preprocess", "inference", "postprocess", "total", "host_cpu")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def _device_memory_probe(backend: Any) -> tuple[Callable[[], None], Callable[[], int | None]]:
    """(reset, read) of peak device memory for a backend, or no-ops returning None."""
    if getattr(backend, "name", "") == "torch" and str(getattr(backend, "device", "")).startswith("cuda"):
        import torch

        dev = backend.torch_device

        def reset() -> None:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)

        return reset, lambda: int(torch.cuda.max_memory_allocated(dev))
    if hasattr(backend, "device_memory_info"):  # TensorRT: device-wide used memory (driver view)
        state: dict[str, int] = {}

        def reset_trt() -> None:
            free, total = backend.device_memory_info()
            state["used"] = total - free

        def read_trt() -> int | None:
            free, total = backend.device_memory_info()
            return total - free

        return reset_trt, read_trt
    return (lambda: None), (lambda: None)


def stats(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms, np.float64)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "std": float(a.std())}


def benchmark_config(pipeline: Any, backend: Any, pairs: list[tuple[str, np.ndarray, np.ndarray]], *,
                     warmup: int, runs: int, label: str) -> dict[str, Any]:
    """Time `runs` matches (cycling over `pairs`) after `warmup` untimed ones."""
    for k in range(warmup):
        _, a, b = pairs[k % len(pairs)]
        run_pair(pipeline, backend, a, b)
    reset_dev, read_dev = _device_memory_probe(backend)
    reset_dev()
    rss_reset = _reset_peak_rss()
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    matches = []
    canvas = None
    for k in range(runs):
        _, a, b = pairs[k % len(pairs)]
        c0, t0 = time.process_time(), time.perf_counter()
        out = run_pair(pipeline, backend, a, b)
        total = (time.perf_counter() - t0) * 1e3
        host_cpu = (time.process_time() - c0) * 1e3  # every thread of the process, the host's real cost
        for s in ("preprocess", "inference", "postprocess"):
            samples[s].append(out.timings_ms[s])
        samples["total"].append(total)
        samples["host_cpu"].append(host_cpu)
        matches.append(len(out.result))
        canvas = out.result.extras.get("canvas0", canvas)
    st = {s: stats(v) for s, v in samples.items()}
    return {
        "label": label, "backend": backend.name, "device": backend.device, "precision": backend.precision,
        "canvas": canvas, "warmup": warmup, "runs": runs, "stages_ms": st, "samples_ms": samples,
        "pairs_per_s": 1000.0 / st["total"]["median"], "matches_median": float(np.median(matches)),
        "peak_host_rss_mb": (peak_rss_bytes() or 0) / 2**20,
        "peak_host_rss_scope": "timed runs" if rss_reset else "process lifetime",
        "peak_device_mb": (lambda v: None if v is None else v / 2**20)(read_dev()),
    }


def configuration_label(base: str, size: Any, canvas: Any) -> str:
    """`<backend device precision> @<canvas>`: the canvas the timed runs had, which can be below the size asked
    for (ELoFTR's `resize_max` only shrinks: a 741x500 pair at resize_max 832 runs on a 736 canvas), then
    with the size asked for beside it. RoMa reports no canvas: its coarse/upsample sizes stand."""
    if canvas is None or str(canvas) == str(size):
        return f"{base} @{size}"
    return f"{base} @{canvas} (resize_max {size})"


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"package_version": __version__, "python": platform.python_version(),
                           "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    try:
        import os

        env["cpu_count"] = os.cpu_count()
    except Exception:  # pragma: no cover
        pass
    return env


def plot_latencies(configs: list[dict[str, Any]], path: str | Path, stage: str = "total") -> Path:
    """PNG: one row per configuration, every timed run as a dot, p10-p90 box and median bar (OpenCV)."""
    import cv2

    rows = len(configs)
    w, row_h, left, right, top = 1100, 46, 330, 30, 50
    h = top + rows * row_h + 50
    img = np.full((h, w, 3), 255, np.uint8)
    all_ms = [v for c in configs for v in c["samples_ms"][stage]]
    lo, hi = 0.0, max(all_ms) * 1.08 if all_ms else 1.0

    def x_of(ms: float) -> int:
        return int(left + (w - left - right) * (ms - lo) / max(hi - lo, 1e-9))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, f"{stage} latency per pair (ms): dots = runs, box = p10-p90, bar = median", (10, 28), font,
                0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for t in np.linspace(lo, hi, 6):
        x = x_of(float(t))
        cv2.line(img, (x, top - 5), (x, h - 40), (225, 225, 225), 1)
        cv2.putText(img, f"{t:.0f}", (x - 12, h - 20), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    for r, c in enumerate(configs):
        y = top + r * row_h + row_h // 2
        st = c["stages_ms"][stage]
        cv2.putText(img, c["label"][:44], (8, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.rectangle(img, (x_of(st["p10"]), y - 10), (x_of(st["p90"]), y + 10), (255, 200, 150), -1)
        for v in c["samples_ms"][stage]:
            cv2.circle(img, (x_of(v), y), 2, (120, 60, 0), -1, cv2.LINE_AA)
        xm = x_of(st["median"])
        cv2.line(img, (xm, y - 14), (xm, y + 14), (0, 0, 200), 2)
        cv2.putText(img, f"{st['median']:.1f}", (min(xm + 4, w - 60), y - 12), font, 0.4, (0, 0, 200), 1,
                    cv2.LINE_AA)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(p), img):
        raise OSError(f"cannot write {p}")
    return p


def format_table(configs: list[dict[str, Any]]) -> str:
    rows = [f"{'configuration':48s} {'canvas':>6s} {'total':>8s} {'p90':>7s} {'pre':>7s} {'infer':>8s} "
            f"{'post':>7s} {'CPU ms':>7s} {'pairs/s':>8s} {'matches':>7s} {'host MB':>8s} {'dev MB':>7s}"]
    for c in configs:
        s = c["stages_ms"]
        dev = f"{c['peak_device_mb']:7.0f}" if c["peak_device_mb"] is not None else "      -"
        rows.append(f"{c['label'][:48]:48s} {str(c['canvas']):>6s} {s['total']['median']:8.1f} "
                    f"{s['total']['p90']:7.1f} {s['preprocess']['median']:7.1f} {s['inference']['median']:8.1f} "
                    f"{s['postprocess']['median']:7.1f} {s['host_cpu']['median']:7.1f} {c['pairs_per_s']:8.2f} "
                    f"{c['matches_median']:7.0f} {c['peak_host_rss_mb']:8.0f} {dev}")
    return "\n".join(rows)


def write_report(configs: list[dict[str, Any]], json_path: str | Path, png_path: str | Path | None, *,
                 failures: Sequence[tuple[str, str]] = ()) -> None:
    """JSON of the configurations that ran and of those that could not (label, error); PNG of the former."""
    p = Path(json_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    failed = [{"label": label, "error": why} for label, why in failures]
    p.write_text(json.dumps({"environment": environment(), "configs": configs, "failures": failed}, indent=1) + "\n")
    if png_path:
        plot_latencies(configs, png_path)
