#!/usr/bin/env python3
"""RoMa's refiner kernels on the GPU, and the CUDA speed forms end to end (`RomaOptions`).

1. kernels: each refiner scale's largest real shape (batch 2; channels 1377/1137/569/144/24 at 35²/108²/216²/432²/
   864², and padded to multiples of 8), fp16 and fp32: max |delta| of the fused depthwise kernels vs F.conv2d +
   biases + ReLU in fp32, and median GPU ms (CUDA events) of cuDNN NCHW, cuDNN channels-last and each kernel.
2. forms: `Matcher.match` on a 640x480 photo pair (seeded weights of the fixtures) per `RomaOptions` form —
   the default, and one switch changed at a time — wall median, stage split, peak memory, and the dense output's
   largest deviation from the default form of the same precision.

Usage (repo root, GPU machine): python3 bench/roma_refiner_speed.py --out DIR [--runs 10]
                                python3 bench/roma_refiner_speed.py --out DIR --dry-run  (CPU, tiny: checks the script)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from matchanything_ros.core.matcher import Matcher, MatcherConfig
from matchanything_ros.core.roma import refiner_kernel
from matchanything_ros.core.roma.model import REFINER_DIMS
from matchanything_ros.core.roma.options import RomaOptions

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "test" / "fixtures" / "reference"
REAL_SHAPES = [(s, REFINER_DIMS[s][0], side)
               for s, side in (("16", 35), ("8", 108), ("4", 216), ("2", 432), ("1", 864))]
PADDED_SHAPES = [(s + " pad8", c + (-c) % 8, side) for s, c, side in REAL_SHAPES if c % 8]
DRY_SHAPES = [("16", 6, 5), ("1", 4, 37)]
# each form: the default with one switch changed (RomaOptions names them)
FORMS: dict[str, dict[str, Any]] = {
    "default": {}, "refiner blocks cuDNN NCHW": {"refiner_blocks": None},
    "refiner blocks triton": {"refiner_blocks": "triton"}, "channels unpadded": {"refiner_channel_multiple": None},
    "window products by GEMM": {"fused_window_dots": False}, "sampler eager": {"capture_sampler": False},
    "GP newton_schulz": {"cuda_gp_solver": "newton_schulz"}, "fp32 convolutions TF32": {"fp32_cudnn_tf32": True}}


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int = 25) -> float:
    """Median ms per call (CUDA events on CUDA) after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_rows(shapes: list[tuple[str, int, int]], dtype: torch.dtype, device: torch.device,
                modes: tuple[str, ...], reps: int) -> list[dict[str, Any]]:
    rows = []
    for scale, c, side in shapes:
        g = torch.Generator().manual_seed(c * 1000 + side)
        x = torch.randn(2, c, side, side, generator=g).to(device, dtype)
        w = (torch.randn(c, 1, 5, 5, generator=g) / 5).to(device, dtype)
        b, ib = (torch.randn(c, generator=g).to(device, dtype) for _ in range(2))
        row: dict[str, Any] = {"scale": scale, "shape": [2, c, side, side], "dtype": str(dtype).removeprefix("torch.")}
        xc, wc = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = torch.relu(F.conv2d(x.float() + ib.float().view(1, c, 1, 1), w.float(), b.float(), padding=2,
                                      groups=c))
            timed: dict[str, Callable[[], torch.Tensor]] = {
                "cudnn_nchw": lambda: torch.relu(F.conv2d(x, w, b, padding=2, groups=c)),
                "cudnn_channels_last": lambda: torch.relu(F.conv2d(xc, wc, b, padding=2, groups=c))}
            for mode in modes:
                got = refiner_kernel.fused_depthwise_bias_relu(mode, x, w, b, ib)
                row[f"max_abs_delta_{mode}"] = float((got.float() - ref).abs().max())
                timed[mode] = lambda mode=mode: refiner_kernel.fused_depthwise_bias_relu(mode, x, w, b, ib)
            for name, fn in timed.items():
                row[f"ms_{name}"] = time_ms(fn, device, reps)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return rows


def seeded_roma_files(tmp: Path) -> dict[str, str]:
    """The fixtures' seeded RoMa + DINOv2 weights written as a user's files."""
    spec = importlib.util.spec_from_file_location("seeded_weights", FIXTURES / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    seeded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeded)
    seed = json.loads((FIXTURES / "roma" / "fixtures_meta.json").read_text())["weights_seed"]
    torch.save({"state_dict": seeded.seeded_state_dict(FIXTURES / "roma" / "manifest.json", seed)}, tmp / "roma.ckpt")
    torch.save(seeded.seeded_state_dict(FIXTURES / "roma" / "dinov2_manifest.json", seed), tmp / "dinov2.pth")
    return {"checkpoint_path": str(tmp / "roma.ckpt"), "dinov2_path": str(tmp / "dinov2.pth")}


def form_row(files: dict[str, str], precision: str, options: RomaOptions, pair: tuple[np.ndarray, ...],
             sizes: tuple[int, int], device: str, runs: int) -> tuple[dict[str, Any], np.ndarray]:
    config = MatcherConfig(variant="roma", backend="torch", device=device, precision=precision, coarse_res=sizes[0],
                           upsample_res=sizes[1], sample_mode="topk", options=options, **files)
    with Matcher(config) as matcher:
        for _ in range(3):
            result = matcher.match(*pair)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        walls, stages = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            result = matcher.match(*pair)
            walls.append((time.perf_counter() - t0) * 1e3)
            stages.append(result.timings_ms)
    return ({"median_ms": statistics.median(walls), "matches": len(result),
             "stages_ms": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
             "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None},
            np.concatenate([result.keypoints0, result.keypoints1], 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and sizes: checks the script itself")
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if not dry else "cpu",
                              "torch": torch.__version__, "triton": refiner_kernel.triton_available(), "kernels": []}
    modes = ("triton", "shifted") if report["triton"] and not dry else ("shifted",)
    for dtype in (torch.float32,) if dry else (torch.float16, torch.float32):
        report["kernels"] += kernel_rows(DRY_SHAPES if dry else REAL_SHAPES + PADDED_SHAPES, dtype, device, modes,
                                         2 if dry else 25)
    import cv2

    with np.load(FIXTURES / "roma" / "pair1_rocket_crossmodal.npz") as z:
        pair = tuple(np.ascontiguousarray(cv2.resize(z[k], (640, 480), interpolation=cv2.INTER_AREA))
                     for k in ("img0_uint8", "img1_uint8"))
    files = seeded_roma_files(Path(tempfile.mkdtemp(prefix="roma_refiner_")))
    sizes, runs = ((56, 64), 1) if dry else ((560, 864), args.runs)
    report["forms"] = []
    for precision in ("fp32",) if dry else ("fp16", "fp32"):
        reference = None
        for label, changes in FORMS.items():
            if precision == "fp16" and changes.get("fp32_cudnn_tf32"):
                continue  # an fp32 switch
            options = dataclasses.replace(RomaOptions(), **changes)
            row, keypoints = form_row(files, precision, options, pair, sizes, str(device), runs)
            if reference is None:
                reference = keypoints
            n = min(len(reference), len(keypoints))
            row.update(label=label, precision=precision,
                       max_keypoint_delta_px=float(np.abs(keypoints[:n] - reference[:n]).max()) if n else None)
            report["forms"].append(row)
            print(f"{precision} {label:28s} {row['median_ms']:8.2f} ms {row['stages_ms']} peak {row['peak_mib']} "
                  f"MiB, top-k keypoints vs default {row['max_keypoint_delta_px']}", flush=True)
    (out / "roma_refiner_speed.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
