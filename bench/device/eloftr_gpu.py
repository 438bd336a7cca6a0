#!/usr/bin/env python3
"""ELoFTR on the GPU: parity of CUDA fp32/fp16 with the golden fixtures, and model-forward latency.

Usage (repo root): python3 bench/device/eloftr_gpu.py [--out DIR] [--device cuda|cpu] [--quick] [--compile]

1. Accuracy, per fixture pair (the fixtures' own canvases + masks, so no OpenCV/Pillow is needed):
   * fp32 (exact form, TF32 off) vs the official outputs: same coarse match list?, max keypoint
     error (canvas px), max relative confidence error, max transformer/conf error;
   * fp16 (speed form: fused RepVGG + SDPA + channels-last, autocast, fp32 softmax/similarity)
     vs fp32 on the same device: match-set Jaccard, mean/max keypoint error and % within 1 px
     over the common matches, confidence correlation; also vs the official list.
2. Latency: model forward = "coarse" graph (top-K form) + host selection + "fine" graph for the
   matches at the UI threshold (at least --min-matches cell pairs, default 2000), at an 832x832
   canvas (all valid) and at the HF 640x640 canvas (640x480 valid), for
   fp32 exact, fp32 speed form, fp16 autocast (exact form), fp16 speed form, fp16 speed form with
   half weights, and (--compile) the latter under torch.compile. Median/min/max of >= 20 runs after
   warm-up, CUDA events; peak memory from torch.cuda.max_memory_allocated.

Prints a table and writes eloftr_gpu.json to --out (default $OUT). `--device cpu --quick` runs a
small version here (one pair, small canvases, 2 runs) to check the script itself.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))  # parity_rules: the parity definitions the test suite uses

from matchanything_ros.core.eloftr.config import EloftrConfig  # noqa: E402
from matchanything_ros.core.eloftr.model import (EloftrCoarse, EloftrFine, EloftrNet, fine_similarities,  # noqa: E402
                                                 gather_windows)
from matchanything_ros.core.eloftr.postprocess import border_keep, select_coarse_matches  # noqa: E402
import parity_rules as pr  # noqa: E402


def reference_dir() -> Path:
    return Path(os.environ.get("MATCHANYTHING_REFERENCE_DIR") or REPO / "test" / "fixtures" / "reference")


def load_weights(ref_root: Path, seed: int) -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("seeded_weights", ref_root / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    state = mod.seeded_state_dict(ref_root / "eloftr" / "manifest.json", seed)
    return {k.removeprefix("matcher."): v for k, v in state.items()}


def seeded_checkpoint(ref_root: Path, out_dir: Path) -> tuple[dict[str, Any], Path]:
    """(the fixtures' index.json, a Lightning-style .ckpt of the fixtures' seeded weights in out_dir)."""
    index = json.loads((ref_root / "eloftr" / "index.json").read_text())
    state = load_weights(ref_root, index["seed"])
    ckpt = out_dir / "seeded.ckpt"
    torch.save({"state_dict": {"matcher." + k: v for k, v in state.items()}}, ckpt)
    return index, ckpt


class Variant:
    """One way of running the graphs: precision, form (exact/speed), half weights, compile."""

    def __init__(self, name: str, state: dict[str, torch.Tensor], device: str, fp16: bool, speed: bool,
                 half_weights: bool = False, compile_: bool = False) -> None:
        self.name, self.device, self.fp16, self.half = name, device, fp16, half_weights
        net = EloftrNet(EloftrConfig())
        net.load_state_dict(state, strict=True)
        net = net.eval().to(device)
        if speed:
            net.to_speed_form()
        if half_weights:
            net = net.half()
        self.net = net
        self.coarse_full = EloftrCoarse(net, exact_full_conf=True)
        self.coarse_topk = EloftrCoarse(net, exact_full_conf=False)
        self.fine = EloftrFine(net.cfg)
        self.compiled = compile_
        if compile_:
            net.backbone = torch.compile(net.backbone)  # type: ignore[assignment]
            net.fine_preprocess = torch.compile(net.fine_preprocess)  # type: ignore[assignment]

    def ctx(self) -> Any:
        if self.fp16 and not self.half and self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def images(self, *ims: torch.Tensor) -> list[torch.Tensor]:
        return [im.to(self.device).half() if self.half else im.to(self.device) for im in ims]


def set_fp32_strict() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def run_pair(v: Variant, ref: dict[str, np.ndarray], thr: float) -> dict[str, Any]:
    im0, im1 = (torch.from_numpy(ref[f"model_input{k}_gray_u8"]).float()[None, None] / 255 for k in (0, 1))
    m0, m1 = (torch.from_numpy(ref[f"model_mask{k}_coarse"])[None] for k in (0, 1))
    im0, im1 = v.images(im0, im1)
    m0d, m1d = m0.to(v.device), m1.to(v.device)
    with torch.inference_mode(), v.ctx():
        feats = v.net.features(im0, im1, m0d, m1d)
        conf, ff0, ff1 = v.coarse_full.head(feats, m0d, m1d)
        cm = select_coarse_matches({"conf": conf.float().cpu().numpy()}, ref["model_mask0_coarse"],
                                   ref["model_mask1_coarse"], thr, v.net.cfg.border_rm)
        if cm.i_ids.size:
            k0, k1 = v.fine(ff0, ff1, torch.from_numpy(cm.i_ids).to(v.device), torch.from_numpy(cm.j_ids).to(v.device))
            kp0, kp1 = k0.float().cpu().numpy(), k1.float().cpu().numpy()
            cfg = v.net.cfg
            ids_i, ids_j = torch.from_numpy(cm.i_ids).to(v.device), torch.from_numpy(cm.j_ids).to(v.device)
            p, _ = fine_similarities(gather_windows(ff0, ids_i, cfg.fine_window_size, 0, cfg.coarse_stride),
                                     gather_windows(ff1, ids_j, cfg.fine_window_size, 1, cfg.coarse_stride), cfg)
            fine_margin = pr.relative_margin(p.float().reshape(p.shape[0], -1).cpu().numpy())
        else:
            kp0 = kp1 = np.zeros((0, 2), np.float32)
            fine_margin = np.zeros(0)
        # our confidence at the official matches' cells (to tell a threshold near-tie from a lost match)
        conf_at_official = conf[0][torch.from_numpy(ref["coarse_i_ids"]).to(v.device),
                                   torch.from_numpy(ref["coarse_j_ids"]).to(v.device)].float().cpu().numpy()
    t0 = feats["transformer0"].float().cpu().numpy()
    return {"i": cm.i_ids, "j": cm.j_ids, "conf": cm.mconf, "kp0": kp0, "kp1": kp1, "t0": t0,
            "conf_row_max": conf[0].float().max(1).values.cpu().numpy(), "fine_margin": fine_margin,
            "conf_at_official": conf_at_official}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Matches of `a` vs `b` keyed by (i, j): Jaccard, keypoint errors and confidence on the common ones."""
    ka = {(int(i), int(j)): n for n, (i, j) in enumerate(zip(a["i"], a["j"]))}
    kb = {(int(i), int(j)): n for n, (i, j) in enumerate(zip(b["i"], b["j"]))}
    common = sorted(set(ka) & set(kb))
    union = set(ka) | set(kb)
    out: dict[str, Any] = {"n_a": len(ka), "n_b": len(kb), "n_common": len(common),
                           "jaccard": len(common) / len(union) if union else 1.0,
                           "same_list": bool(np.array_equal(a["i"], b["i"]) and np.array_equal(a["j"], b["j"]))}
    if common:
        ia = [ka[c] for c in common]
        ib = [kb[c] for c in common]
        err = np.concatenate([np.linalg.norm(a["kp0"][ia] - b["kp0"][ib], axis=1),
                              np.linalg.norm(a["kp1"][ia] - b["kp1"][ib], axis=1)])
        ca, cb = a["conf"][ia].astype(np.float64), b["conf"][ib].astype(np.float64)
        out.update(kp_err_mean_px=float(err.mean()), kp_err_max_px=float(err.max()),
                   pct_within_1px=float((err <= 1.0).mean() * 100),
                   conf_rel_err_max=float(np.max(np.abs(ca - cb) / np.maximum(np.abs(cb), 1e-12))),
                   conf_corr=float(np.corrcoef(ca, cb)[0, 1]) if len(common) > 1 and ca.std() > 0 else 1.0)
    return out


def parity_rules_verdict(r: dict[str, Any], ref: dict[str, np.ndarray], thr: float) -> dict[str, Any]:
    """The test suite's parity rules (test/parity_rules.py) on one run against the official outputs: the same
    match list except threshold near-ties, keypoints within 1e-3 px except fine-argmax near-ties,
    confidences within 1e-4 (+ 1e-3 relative); how many near-ties it took, or which rule failed."""
    ours = {(int(i), int(j)): float(c) for i, j, c in zip(r["i"], r["j"], r["conf"])}
    theirs = {(int(i), int(j)): float(c) for i, j, c in zip(ref["coarse_i_ids"], ref["coarse_j_ids"],
                                                             r["conf_at_official"])}

    def check() -> dict[str, Any]:
        def is_tie(i: int, j: int) -> bool:
            return bool(pr.is_threshold_tie(ours.get((i, j), theirs.get((i, j), np.nan)), thr))

        ri, gi, coarse = pr.compare_match_lists(ref["coarse_i_ids"], ref["coarse_j_ids"], r["i"], r["j"], is_tie,
                                                "coarse list")
        conf_abs, conf_rel = pr.assert_conf_close(r["conf"][gi], ref["coarse_mconf"][ri], "confidence")
        _, fine = pr.compare_keypoints(r["kp0"][gi], ref["model_mkpts0_f"][ri], r["kp1"][gi],
                                       ref["model_mkpts1_f"][ri], r["fine_margin"][gi], "fine keypoints")
        return {"coarse_near_ties": coarse.count, "fine_near_ties": fine.count, "conf_abs_max": conf_abs,
                "conf_rel_max": conf_rel}

    return pr.verdict(check)


def official(ref: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"i": ref["coarse_i_ids"], "j": ref["coarse_j_ids"], "conf": ref["coarse_mconf"],
            "kp0": ref["model_mkpts0_f"], "kp1": ref["model_mkpts1_f"]}


def accuracy(state: dict[str, torch.Tensor], device: str, ref_root: Path, index: dict[str, Any],
             quick: bool) -> dict[str, Any]:
    thr = float(index["threshold"])
    pairs = sorted(index["pairs"])[:1] if quick else sorted(index["pairs"])
    fp32 = Variant("fp32", state, device, fp16=False, speed=False)
    on_gpu = device.startswith("cuda")
    # on the CPU (script check) the "fp16" run is the fp32 speed form: same code path, no autocast
    low = Variant("fp16" if on_gpu else "fp32-speed", state, device, fp16=on_gpu, speed=True)
    results: dict[str, Any] = {}
    for pair in pairs:
        ref = dict(np.load(ref_root / "eloftr" / index["pairs"][pair]["file"]))
        r32 = run_pair(fp32, ref, thr)
        r16 = run_pair(low, ref, thr)
        t_ref = ref["transformer_out0_ch0to8"]
        results[pair] = {
            "fp32_vs_official": compare(r32, official(ref)) | {
                "transformer_max_abs_err": float(np.abs(r32["t0"][:, :8] - t_ref).max()),
                "conf_row_max_max_abs_err": float(np.abs(r32["conf_row_max"] - ref["conf_row_max"]).max()),
                "parity_rules": parity_rules_verdict(r32, ref, thr)},
            f"{low.name}_vs_fp32": compare(r16, r32),
            f"{low.name}_vs_official": compare(r16, official(ref)),
        }
    return results


def cuda_time(fn: Callable[[], Any], device: str, runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        peak = float("nan")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs,
            "peak_mb": peak}


def latency(state: dict[str, torch.Tensor], device: str, canvases: list[tuple[int, int]], runs: int, warmup: int,
            with_compile: bool, thr: float, min_matches: int) -> list[dict[str, Any]]:
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    specs = [("fp32 exact", False, False, False, False), ("fp32 speed form", False, True, False, False)]
    if on_gpu:
        specs += [("fp16 autocast (exact form)", True, False, False, False),
                  ("fp16 autocast speed form", True, True, False, False),
                  ("fp16 speed form, half weights", True, True, True, False)]
        if with_compile:
            specs += [("fp16 half weights + torch.compile", True, True, True, True)]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for canvas, valid_h in canvases:
        im0 = torch.rand(1, 1, canvas, canvas, generator=gen)
        im1 = torch.rand(1, 1, canvas, canvas, generator=gen)
        im0[..., valid_h:, :] = 0
        im1[..., valid_h:, :] = 0
        cells = canvas // 8
        mask = torch.zeros(1, cells, cells, dtype=torch.bool)
        mask[:, : valid_h // 8] = True
        keep_cells = np.nonzero(border_keep(mask[0].numpy(), 2))[0].astype(np.int64)
        for name, fp16, speed, half, comp in specs:
            if on_gpu:
                torch.cuda.empty_cache()
            try:
                rows.append(time_variant(name, state, device, fp16, speed, half, comp, canvas, valid_h, im0, im1,
                                         mask, keep_cells, runs, warmup, thr, min_matches))
            except Exception as exc:  # one failing variant (e.g. torch.compile) must not lose the others
                print(f"  {canvas}x{canvas} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                rows.append({"canvas": canvas, "variant": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def time_variant(name: str, state: dict[str, torch.Tensor], device: str, fp16: bool, speed: bool, half: bool,
                 comp: bool, canvas: int, valid_h: int, im0: torch.Tensor, im1: torch.Tensor, mask: torch.Tensor,
                 keep_cells: np.ndarray, runs: int, warmup: int, thr: float, min_matches: int) -> dict[str, Any]:
    v = Variant(name, state, device, fp16=fp16, speed=speed, half_weights=half, compile_=comp)
    if not fp16:
        set_fp32_strict()
    a, b = v.images(im0, im1)
    m = mask.to(device)

    def forward() -> int:
        with torch.inference_mode(), v.ctx():
            cand_j, cand_conf, ff0, ff1 = v.coarse_topk(a, b, m, m)
            cand_j_np = cand_j.cpu().numpy()
            cm = select_coarse_matches({"cand_j": cand_j_np, "cand_conf": cand_conf.float().cpu().numpy()},
                                       mask[0].numpy(), mask[0].numpy(), thr, 2)
            i_ids, j_ids = cm.i_ids, cm.j_ids
            if i_ids.size < min_matches:  # random weights/images match little: time a realistic M
                i_ids = keep_cells[:min_matches]
                j_ids = cand_j_np[0, i_ids, 0]
            v.fine(ff0, ff1, torch.from_numpy(i_ids).to(device), torch.from_numpy(j_ids).to(device))
            return int(i_ids.size)

    def coarse_only() -> None:
        with torch.inference_mode(), v.ctx():
            v.coarse_topk(a, b, m, m)

    t_comp = time.perf_counter()
    n_matches = forward()  # first call: compile / cudnn autotune
    first_s = time.perf_counter() - t_comp
    stats = cuda_time(forward, device, runs, warmup)
    stats_c = cuda_time(coarse_only, device, max(3, runs // 2), 1)
    row = {"canvas": canvas, "valid_hw": [valid_h, canvas], "variant": name, "matches": n_matches,
           "first_call_s": first_s, **stats, "coarse_graph_median_ms": stats_c["median_ms"]}
    print(f"  {canvas}x{canvas} (valid {canvas}x{valid_h}) {name:36s} median {stats['median_ms']:8.2f} ms "
          f"[{stats['min_ms']:.2f}-{stats['max_ms']:.2f}]  coarse {stats_c['median_ms']:8.2f} ms  "
          f"peak {stats['peak_mb']:.0f} MB  M={n_matches}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small run to check the script (CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a torch.compile variant on CUDA (first call compiles: ~1 min)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--min-matches", type=int, default=2000,
                    help="fine graph runs on at least this many cell pairs (random inputs match little)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA not available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ref_root = reference_dir()
    index = json.loads((ref_root / "eloftr" / "index.json").read_text())
    state = load_weights(ref_root, index["seed"])
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "quick": args.quick,
        "official_baseline_832_ms": {"fp32": 72.5, "autocast_fp16": 42.1},
        "official_baseline_640_ms": {"fp32": 38.5, "autocast_fp16": 34.0},
    }
    print(f"device: {report['device']}  torch {torch.__version__}", flush=True)
    if not args.skip_accuracy:
        t = time.perf_counter()
        set_fp32_strict()
        report["accuracy"] = accuracy(state, args.device, ref_root, index, args.quick)
        print(f"accuracy ({time.perf_counter() - t:.1f} s):")
        for pair, r in report["accuracy"].items():
            for k, c in r.items():
                print(f"  {pair:24s} {k:26s} " + " ".join(
                    f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}" for n, v in c.items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eloftr_gpu.json").write_text(json.dumps(report, indent=1))  # accuracy kept even if timing fails
    canvases = [(128, 128), (128, 96)] if args.quick else [(832, 832), (640, 480)]
    runs = 2 if args.quick else max(20, args.runs)
    warmup = 1 if args.quick else 5
    print("latency (model forward: coarse top-K graph + host selection + fine graph):", flush=True)
    report["latency"] = latency(state, args.device, canvases, runs, warmup, args.compile,
                                float(index.get("threshold2", 0.1)), args.min_matches)
    (out / "eloftr_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'eloftr_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
