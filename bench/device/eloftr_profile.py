#!/usr/bin/env python3
"""Where the ELoFTR fp16 forward spends its time on the GPU (torch profiler, 832x832 canvas).

Usage (repo root, on the GPU machine): python3 bench/device/eloftr_profile.py [--out DIR]
Prints the top CUDA kernels/ops by GPU time and writes eloftr_profile.txt to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eloftr_gpu import Variant, load_weights, reference_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--canvas", type=int, default=832)
    args = ap.parse_args()
    state = load_weights(reference_dir(), 1234)
    v = Variant("fp16 speed form, half weights", state, "cuda", fp16=True, speed=True, half_weights=True)
    s = args.canvas
    g = torch.Generator().manual_seed(0)
    a, b = v.images(torch.rand(1, 1, s, s, generator=g), torch.rand(1, 1, s, s, generator=g))
    m = torch.ones(1, s // 8, s // 8, dtype=torch.bool, device="cuda")

    def forward() -> None:
        with torch.inference_mode(), v.ctx():
            v.coarse_topk(a, b, m, m)

    for _ in range(5):
        forward()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            forward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    # per-part wall times (CUDA events) to split backbone / transformer / head
    parts = {}
    with torch.inference_mode(), v.ctx():
        for name, fn in (("features (backbone + transformer)", lambda: v.net.features(a, b, m, m)),):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(10):
                st.record()
                fn()
                en.record()
                torch.cuda.synchronize()
                ts.append(st.elapsed_time(en))
            parts[name] = sorted(ts)[len(ts) // 2]
    text = f"canvas {s}x{s}, {torch.cuda.get_device_name()}\n{table}\nparts (median ms): {parts}\n"
    print(text)
    Path(args.out, "eloftr_profile.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
