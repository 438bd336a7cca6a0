#!/usr/bin/env python3
"""Where the product path's ELoFTR fp16 time goes now, and what the coarse matching head could save.

1. Phases of `pipeline.infer` through Matcher -> TorchBackend (CUDA graphs on): coarse graph (incl.
   copies), host selection, fine graph; 832x832 and the HF 640x480 canvas.
2. Device time per part of the coarse graph (torch profiler, eager, same autocast/speed form):
   backbone + transformer vs matching head, and the top kernels.
3. Head variants on the same transformer features, timed and compared with the current head:
   current; similarity in TF32 (exact for fp16 features: every fp16 value is a TF32 value and the
   1/sqrt(d) scale is a power of two); the log-sum-exp form of the dual softmax (top-K of
   2*sim - lse_col, conf = exp(top - lse_row): no [L0,L1] softmax/transposes/products); the same
   under torch.compile.
Usage (repo root, GPU machine): python3 bench/device/eloftr_head_gpu.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eloftr_gpu import reference_dir, seeded_checkpoint  # noqa: E402

from matchanything_ros.core.eloftr.model import _flat_cells, border_valid_cells  # noqa: E402
from matchanything_ros.core.eloftr.postprocess import select_coarse_matches  # noqa: E402
from matchanything_ros.core.matcher import Matcher, MatcherConfig  # noqa: E402


def median_ms(fn: Callable[[], Any], runs: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        fn()
        en.record()
        torch.cuda.synchronize()
        ts.append(st.elapsed_time(en))
    return float(np.median(ts))


def phases(m: Matcher, img0: np.ndarray, img1: np.ndarray, runs: int = 30) -> dict[str, float]:
    """Wall-clock phases of pipeline.infer (backend.run synchronizes its stream before returning)."""
    p, be = m.pipeline, m.backend
    inputs, meta = p.preprocess(img0, img1)
    for _ in range(3):
        p.infer(be, inputs, meta)
    rows: dict[str, list[float]] = {"coarse": [], "select": [], "fine": [], "infer": []}
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()

        coarse = be.run("coarse", inputs)
        t1 = time.perf_counter()
        cm = select_coarse_matches(coarse, meta.mask0, meta.mask1, p.threshold, p.model_config.border_rm)
        t2 = time.perf_counter()
        if cm.i_ids.size:
            be.run("fine", {"feat_f0": coarse["feat_f0"], "feat_f1": coarse["feat_f1"],
                            "i_ids": cm.i_ids, "j_ids": cm.j_ids})
        t3 = time.perf_counter()
        p.infer(be, inputs, meta)
        t4 = time.perf_counter()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            rows[k].append(v * 1e3)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out["matches"] = int(len(cm.i_ids))
    return out


def current_head(coarse: Any, feats: dict[str, torch.Tensor], m0: torch.Tensor, m1: torch.Tensor) -> Any:
    j, c, _, _ = coarse.head(feats, m0, m1)
    return j, c


def lse_head(t0: torch.Tensor, t1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor,
             temperature: float, d_model: int, border: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    f0 = _flat_cells(t0).float() / d_model ** 0.5
    f1 = _flat_cells(t1).float() / d_model ** 0.5
    sim = torch.einsum("nlc,nsc->nls", f0, f1) / temperature
    valid = mask0.flatten(1)[:, :, None] & mask1.flatten(1)[:, None, :]
    sim = sim.masked_fill(~valid, -1e9)
    lse_row = torch.logsumexp(sim, 2, keepdim=True)
    lse_col = torch.logsumexp(sim, 1, keepdim=True)
    keep1 = border_valid_cells(mask1, border)
    score = (2 * sim - lse_col).masked_fill(~keep1[:, None, :], float("-inf"))
    top, j = torch.topk(score, k, dim=2)
    return j, torch.exp(top - lse_row)


def agreement(ref: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    rj, rc = (t[0].cpu().numpy() for t in ref)
    gj, gc = (t[0].cpu().numpy() for t in got)
    out: dict[str, float] = {"max_abs_conf_diff_sorted": float(np.abs(np.sort(rc, 1) - np.sort(gc, 1)).max())}
    for thr in (1e-3, 1e-2, 0.1):
        a = {(i, j) for i, j in zip(*np.nonzero(rc > thr))}
        ra = {(i, int(rj[i, s])) for i, s in a}
        b = {(i, int(gj[i, s])) for i, s in zip(*np.nonzero(gc > thr))}
        out[f"jaccard@{thr}"] = len(ra & b) / max(len(ra | b), 1)
        out[f"n_ref@{thr}"] = len(ra)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    ref = reference_dir()
    index, ckpt = seeded_checkpoint(ref, Path(tempfile.mkdtemp()))
    d = np.load(ref / "eloftr" / index["pairs"][next(iter(index["pairs"]))]["file"])
    img0, img1 = d["input_image0_rgb_u8"], d["input_image1_rgb_u8"]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    lines = []

    # 1. product-path phases
    report["phases"] = []
    for w, h in ((832, 832), (640, 480)):
        for prec in ("fp16", "fp32"):
            cfg = MatcherConfig.from_params({"checkpoint_path": str(ckpt), "backend": "torch", "device": "cuda",
                                             "precision": prec, "force_resize_width": w, "force_resize_height": h,
                                             "threshold": 0.1})
            with Matcher(cfg) as m:
                row = {"canvas": [w, h], "precision": prec, **phases(m, img0, img1)}
            report["phases"].append(row)
            lines.append(f"phases {w}x{h} {prec}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else
                                                               f"{k} {v}" for k, v in row.items()
                                                               if k not in ("canvas", "precision")))
            print(lines[-1], flush=True)

    # 2 + 3 on the 832 fp16 graphs
    cfg = MatcherConfig.from_params({"checkpoint_path": str(ckpt), "backend": "torch", "device": "cuda",
                                     "precision": "fp16", "force_resize_width": 832, "force_resize_height": 832,
                                     "threshold": 0.1})
    with Matcher(cfg) as m, torch.inference_mode():
        coarse = m.backend.graphs["coarse"]
        inputs, meta = m.pipeline.preprocess(img0, img1)
        t = {k: m.backend._to_tensor(v) for k, v in inputs.items()}
        ac = torch.autocast("cuda", dtype=torch.float16)
        with ac:
            feats = coarse.net.features(t["image0"], t["image1"], t["mask0"], t["mask1"])
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                with ac:
                    with torch.profiler.record_function("part:features"):
                        f = coarse.net.features(t["image0"], t["image1"], t["mask0"], t["mask1"])
                    with torch.profiler.record_function("part:head"):
                        coarse.head(f, t["mask0"], t["mask1"])
            torch.cuda.synchronize()
        ka = prof.key_averages()
        parts = {e.key: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 3e3
                 for e in ka if e.key.startswith("part:")}
        table = ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        Path(args.out, "eloftr_head_profile.txt").write_text(f"{report['gpu']}\nparts (device ms): {parts}\n{table}\n")
        report["profile_parts_ms"] = parts
        lines.append(f"profile 832 fp16 eager, device ms per forward: {parts}")
        print(lines[-1], flush=True)

        cfgm = coarse.cfg
        k = cfgm.candidates_per_cell
        m0, m1 = t["mask0"], t["mask1"]
        t0, t1 = feats["transformer0"], feats["transformer1"]
        variants: dict[str, Callable[[], Any]] = {
            "current": lambda: current_head(coarse, feats, m0, m1),
            "lse": lambda: lse_head(t0, t1, m0, m1, cfgm.dsmax_temperature, cfgm.d_model, cfgm.border_rm, k),
        }

        def tf32(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = True
                try:
                    return fn()
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
            return run

        variants["current+tf32"] = tf32(variants["current"])
        variants["lse+tf32"] = tf32(variants["lse"])
        try:
            compiled = torch.compile(lse_head, dynamic=False)
            t_c = time.perf_counter()
            compiled(t0, t1, m0, m1, cfgm.dsmax_temperature, cfgm.d_model, cfgm.border_rm, k)
            report["compile_s"] = time.perf_counter() - t_c
            variants["lse+compile"] = lambda: compiled(t0, t1, m0, m1, cfgm.dsmax_temperature, cfgm.d_model,
                                                       cfgm.border_rm, k)
            variants["lse+compile+tf32"] = tf32(variants["lse+compile"])
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
            report["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
        ref_out = variants["current"]()
        report["heads"] = {}
        for name, fn in variants.items():
            try:
                torch.cuda.reset_peak_memory_stats()
                ms = median_ms(fn)
                row = {"median_ms": ms, "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                       **agreement(ref_out, fn())}
            except Exception as exc:  # noqa: BLE001
                row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            report["heads"][name] = row
            lines.append(f"head {name:18s}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                                          for a, b in row.items()))
            print(lines[-1], flush=True)
    Path(args.out, "eloftr_head_gpu.json").write_text(json.dumps(report, indent=1))
    print("\n".join(["=== summary", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
