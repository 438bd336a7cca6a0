#!/usr/bin/env python3
"""ELoFTR through the product path (Matcher -> TorchBackend on its CUDA stream) on the GPU.

Times `pipeline.infer` (coarse graph, host selection, fine graph, copies back) with and without the
backend's CUDA graphs, fp32 and fp16, at an 832x832 and a 640x640 (640x480 valid) canvas, and checks
the same path against the official fixture outputs. Usage (repo root, GPU machine):
    python3 bench/device/eloftr_backend_gpu.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eloftr_gpu import reference_dir, seeded_checkpoint  # noqa: E402

from matchanything_ros.core.matcher import Matcher, MatcherConfig  # noqa: E402


def time_infer(m: Matcher, img0: np.ndarray, img1: np.ndarray, runs: int) -> dict[str, float]:
    inputs, meta = m.pipeline.preprocess(img0, img1)
    n = 0
    for _ in range(3):
        out = m.pipeline.infer(m.backend, inputs, meta)
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        out = m.pipeline.infer(m.backend, inputs, meta)
        en.record()
        torch.cuda.synchronize()
        ts.append(st.elapsed_time(en))
    n = len(out["mconf"])
    ts.sort()
    return {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "max_ms": ts[-1], "matches": n,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    ref = reference_dir()
    index, ckpt = seeded_checkpoint(ref, Path(tempfile.mkdtemp()))
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    # parity of the product path (hf_space preset, the fixtures' threshold) on CUDA vs the official outputs
    parity = []
    for prec in ("fp32", "fp16"):
        for cg in (True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            cfg = MatcherConfig.from_params({"checkpoint_path": str(ckpt), "backend": "torch", "device": "cuda",
                                             "precision": prec, "preset": "hf_space", "threshold": index["threshold"]})
            with Matcher(cfg) as m:
                m.backend.cuda_graphs = cg
                for name, pair in index["pairs"].items():
                    d = np.load(ref / "eloftr" / pair["file"])
                    r = m.match(d["input_image0_rgb_u8"], d["input_image1_rgb_u8"])
                    r = m.match(d["input_image0_rgb_u8"], d["input_image1_rgb_u8"])  # second call: replay path
                    same = len(r) == len(d["confidence"])
                    row = {"precision": prec, "cuda_graphs": cg, "pair": name, "n": len(r),
                           "n_ref": len(d["confidence"])}
                    if same and len(r):
                        err = np.abs(np.concatenate([r.keypoints0 - d["keypoints0"],
                                                     r.keypoints1 - d["keypoints1"]], 1))
                        row.update(kp_max_px=float(err.max()), kp_mean_px=float(err.mean()),
                                   pct_within_1px=float((err.max(1) <= 1).mean() * 100))
                    parity.append(row)
                    print("parity", row, flush=True)
    report["parity"] = parity

    # latency: 832x832 canvas (force resize) and the HF canvas (640x480 valid), threshold 0.1
    d = np.load(ref / "eloftr" / index["pairs"][next(iter(index["pairs"]))]["file"])
    img0, img1 = d["input_image0_rgb_u8"], d["input_image1_rgb_u8"]
    lat = []
    for w, h in ((832, 832), (640, 480)):
        for prec in ("fp32", "fp16"):
            for cg in (False, True):
                torch.cuda.reset_peak_memory_stats()
                cfg = MatcherConfig.from_params({"checkpoint_path": str(ckpt), "backend": "torch", "device": "cuda",
                                                 "precision": prec, "force_resize_width": w, "force_resize_height": h,
                                                 "threshold": 0.1})
                with Matcher(cfg) as m:
                    m.backend.cuda_graphs = cg
                    row = {"canvas": max(w, h), "valid_wh": [w, h], "precision": prec, "cuda_graphs": cg,
                           **time_infer(m, img0, img1, args.runs)}
                lat.append(row)
                print(f"latency {max(w, h)}x{max(w, h)} valid {w}x{h} {prec} cuda_graphs={cg!s:5}: median "
                      f"{row['median_ms']:.2f} ms [{row['min_ms']:.2f}-{row['max_ms']:.2f}] M={row['matches']} "
                      f"peak {row['peak_mb']:.0f} MB", flush=True)
    report["latency"] = lat
    Path(args.out, "eloftr_backend_gpu.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
