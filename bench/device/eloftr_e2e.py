#!/usr/bin/env python3
"""ELoFTR end to end on the GPU: what a user gets from `Matcher.match`, and the parity it keeps.

One script, one device call (issue 12). Every figure: `Matcher.match` wall time from uint8 image
arrays to matches (match() synchronises before it returns; `torch.cuda.synchronize()` is called again
before the clock stops), median and p90 of 30 after warm-up, host CPU ms per pair (time.process_time),
peak GPU memory (max_memory_allocated after reset_peak_memory_stats), match count, per-stage split.

Sections (each guarded: an error is recorded and the next runs):
  timing    the issue's table rows (seeded weights of the fixtures, threshold 0.1, real photos) for the
            product graph with each matching head, and for the previous host path (before/after)
  parity    CUDA fp32 product graph vs the official fixture outputs (hf_space, the fixtures' threshold)
  fp16      demo model on held-out real pairs (bench/device/eloftr_heldout_pairs.py): fp16 vs fp32 per
            pair, fine FPN in fp32 and in fp16; CUDA fp32 vs the CPU host path (same lists)
  memory    fp16 and fp32 matchers created in both orders in one process: peak memory of each, and
            torch's global switches unchanged after
Usage (repo root, GPU machine): python3 bench/device/eloftr_e2e.py --out DIR [--pairs heldout.npz]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eloftr_gpu import reference_dir, seeded_checkpoint  # noqa: E402

from matchanything_ros.core.backends import torch_backend  # noqa: E402
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline  # noqa: E402
from matchanything_ros.core.matcher import Matcher, MatcherConfig  # noqa: E402

REPORT: dict[str, Any] = {}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"nvidia-smi failed: {exc}"


def flags() -> tuple[Any, ...]:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.is_grad_enabled(), torch.get_num_threads())


def pctl(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_matcher(m: Matcher, pairs: list[tuple[np.ndarray, np.ndarray]], runs: int = 30, warmup: int = 5
                 ) -> dict[str, Any]:
    for k in range(warmup):
        m.match(*pairs[k % len(pairs)])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    wall, cpu, counts = [], [], []
    stages: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": []}
    capped = 0
    for k in range(runs):
        a, b = pairs[k % len(pairs)]
        c0, t0 = time.process_time(), time.perf_counter()
        r = m.match(a, b)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        counts.append(len(r))
        capped += bool(r.extras.get("matches_capped", False))
        for s in stages:
            stages[s].append(r.timings_ms[s])
    return {"median_ms": statistics.median(wall), "p90_ms": pctl(wall, 90), "min_ms": min(wall),
            "host_cpu_ms_median": statistics.median(cpu),
            "stages_median_ms": {s: statistics.median(v) for s, v in stages.items()},
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "matches_median": statistics.median(counts),
            "frames_capped": capped, "graph": r.extras.get("graph", "host")}


def square(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[1] >= w else cv2.INTER_LINEAR)


def row_pairs(photos: list[np.ndarray], demo: tuple[np.ndarray, np.ndarray]) -> tuple[list[Any], list[Any], list[Any]]:
    """The issue's rows' inputs: the photos as 832x832 and 640x480 pairs, the demo pair at 832x832."""
    p832 = [(square(photos[i], 832, 832), square(photos[i + 1], 832, 832)) for i in range(0, len(photos) - 1, 2)]
    p640 = [(square(photos[i], 640, 480), square(photos[i + 1], 640, 480)) for i in range(0, len(photos) - 1, 2)]
    return p832, p640, [(square(demo[0], 832, 832), square(demo[1], 832, 832))]


def section(name: str):
    def wrap(fn):
        def run(*a, **kw):
            t = time.time()
            try:
                REPORT[name] = fn(*a, **kw)
            except Exception:  # noqa: BLE001
                REPORT[name] = {"error": traceback.format_exc()}
                print(f"[{name}] FAILED\n{REPORT[name]['error']}", flush=True)
            print(f"[{name}] {time.time() - t:.0f} s", flush=True)
        return run
    return wrap


def matcher(ckpt: str, precision: str, preset: str, threshold: float = 0.1, **kw: Any) -> Matcher:
    return Matcher(MatcherConfig.from_params({"checkpoint_path": ckpt, "backend": "torch", "device": "cuda",
                                              "precision": precision, "preset": preset, "threshold": threshold,
                                              **kw}))


def configure(product: bool = True, head: str = "lse_compiled", island: str = "fpn", cap: int | None = None,
              fp32_benchmark: bool = False) -> None:
    EloftrPipeline.use_product_graph = product
    EloftrPipeline.product_head = head
    EloftrPipeline.fp32_island = island
    EloftrPipeline.max_matches_override = cap
    torch_backend.CUDA_NUMERICS["fp32"]["cudnn_benchmark"] = fp32_benchmark


@section("timing")
def timing(ckpt: str, photos: list[np.ndarray], demo: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    p832, p640, d832 = row_pairs(photos, demo)
    rows = []
    # variant: (name, configure kwargs)
    host = ("host", {"product": False})
    lse = ("lse_compiled", {})
    plan = [  # (row, pairs, checkpoint, precision, preset, variants)
        ("832x832 robot fp16", p832, ckpt, "fp16", "robot",
         [host, ("dsmax", {"head": "dsmax"}), lse, ("island_none", {"island": "none"}),
          ("island_fpn_backbone12", {"island": "fpn_backbone12"}), ("cap_10240", {"cap": 10240}),
          ("cap_4096", {"cap": 4096})]),
        ("832x832 robot fp32", p832, ckpt, "fp32", "robot",
         [host, lse, ("cudnn_benchmark", {"fp32_benchmark": True}),
          ("cudnn_benchmark_cap_10240", {"fp32_benchmark": True, "cap": 10240})]),
        ("640x480 hf_space fp16", p640, ckpt, "fp16", "hf_space", [host, lse, ("cap_10240", {"cap": 10240})]),
        ("640x480 hf_space fp32", p640, ckpt, "fp32", "hf_space",
         [host, lse, ("cudnn_benchmark", {"fp32_benchmark": True})]),
        ("demo model 832x832 fp16", d832, "", "fp16", "robot",
         [host, lse, ("cap_10240", {"cap": 10240}), ("island_fpn_backbone12", {"island": "fpn_backbone12"})]),
    ]
    for row, pairs, path, prec, preset, variants in plan:
        for v, kw in variants:
            configure(**kw)
            t = time.time()
            with matcher(path, prec, preset) as m:
                res = time_matcher(m, pairs)
                if v == "lse_compiled" and prec == "fp16":
                    res["stage_breakdown_ms"] = stage_breakdown(m, *pairs[0])
            res.update(row=row, variant=v, setup_s=time.time() - t)
            rows.append(res)
            print(f"{row:26s} {v:13s} {res['median_ms']:7.2f} ms p90 {res['p90_ms']:7.2f} cpu "
                  f"{res['host_cpu_ms_median']:6.2f} peak {res['peak_gpu_mb']:6.0f} MB n {res['matches_median']:.0f} "
                  f"stages {res['stages_median_ms']} {res.get('stage_breakdown_ms', '')}", flush=True)
    configure()
    return rows


@section("parity")
def parity(ckpt: str, index: dict[str, Any], ref: Path, heads: tuple[str, ...] = ("dsmax", "lse_compiled")
           ) -> list[dict[str, Any]]:
    out = []
    for head in heads:
        configure(head=head)
        with matcher(ckpt, "fp32", "hf_space", threshold=index["threshold"]) as m:
            for name, pair in index["pairs"].items():
                d = np.load(ref / "eloftr" / pair["file"])
                r = m.match(d["input_image0_rgb_u8"], d["input_image1_rgb_u8"])
                r = m.match(d["input_image0_rgb_u8"], d["input_image1_rgb_u8"])  # the replay path
                row: dict[str, Any] = {"head": head, "pair": name, "n": len(r), "n_ref": len(d["confidence"])}
                if len(r) == len(d["confidence"]) and len(r):
                    err = np.abs(np.concatenate([r.keypoints0 - d["keypoints0"], r.keypoints1 - d["keypoints1"]], 1))
                    row.update(same_count=True, kp_max_px=float(err.max()),
                               pct_within_1px=float((err.max(1) <= 1).mean() * 100),
                               conf_max_rel=float(np.abs(r.confidence - d["confidence"]).max()
                                                  / max(float(np.abs(d["confidence"]).max()), 1e-12)))
                out.append(row)
                print("parity", row, flush=True)
    configure()
    return out


def keyed(m: Matcher, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
    r = m.match(a, b)
    r = m.match(a, b)
    cm = m.pipeline.last_coarse
    return cm.i_ids.astype(np.int64) * (1 << 32) + cm.j_ids.astype(np.int64), r


def compare(ka: np.ndarray, ra: Any, kb: np.ndarray, rb: Any) -> dict[str, Any]:
    common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
    err = np.maximum(np.linalg.norm(ra.keypoints0[ia] - rb.keypoints0[ib], axis=1),
                     np.linalg.norm(ra.keypoints1[ia] - rb.keypoints1[ib], axis=1))
    within = float((err <= 1.0).sum() / max(len(ka), 1) * 100)  # of the reference's matches
    return {"n_ref": int(len(ka)), "n_test": int(len(kb)), "n_common": int(len(common)),
            "same_list_same_order": bool(np.array_equal(ka, kb)),
            "pct_ref_reproduced_within_1px": within, "mean_err_px": float(err.mean()) if len(err) else 0.0,
            "max_err_px": float(err.max()) if len(err) else 0.0}


@section("fp16")
def fp16_parity(pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    res: dict[str, Any] = {"pairs": [p[0] for p in pairs]}
    configure()
    ref32 = {}
    with matcher("", "fp32", "robot") as m:
        for name, a, b in pairs:
            ref32[name] = keyed(m, a, b)
    configure(product=False)
    with Matcher(MatcherConfig.from_params({"backend": "torch", "device": "cpu", "precision": "fp32",
                                            "preset": "robot", "threshold": 0.1})) as cpu:
        res["cuda_fp32_vs_cpu_fp32"] = {name: compare(*keyed(cpu, a, b), *ref32[name]) for name, a, b in pairs}
    for island in ("none", "fpn", "fpn_backbone12", "fpn_backbone"):
        configure(island=island)
        with matcher("", "fp16", "robot") as m:
            key = f"fp16_island_{island}_vs_cuda_fp32"
            res[key] = {name: compare(*ref32[name], *keyed(m, a, b)) for name, a, b in pairs}
    configure()
    for k, v in res.items():
        print("fp16", k, json.dumps(v), flush=True)
    return res


@section("memory")
def memory(ckpt: str, photos: list[np.ndarray]) -> dict[str, Any]:
    a, b = square(photos[0], 832, 832), square(photos[1], 832, 832)
    before = flags()
    out: dict[str, Any] = {}
    for order in (("fp16", "fp32"), ("fp32", "fp16")):
        ms = []
        for prec in order:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            # memory the other matcher already holds counts in the peak: recorded to subtract
            out[f"{'_then_'.join(order)}:{prec}_held_before_mb"] = torch.cuda.memory_allocated() / 2**20
            m = matcher(ckpt, prec, "robot")
            torch.cuda.synchronize()
            out[f"{'_then_'.join(order)}:{prec}_after_create_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            m.match(a, b)
            torch.cuda.synchronize()
            out[f"{'_then_'.join(order)}:{prec}_after_first_match_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                m.match(a, b)
            torch.cuda.synchronize()
            out[f"{'_then_'.join(order)}:{prec}_steady_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out[f"{'_then_'.join(order)}:{prec}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            ms.append(m)
        for m in ms:
            m.close()
    out["global_flags_unchanged"] = flags() == before
    print("memory", out, flush=True)
    return out


def stage_breakdown(m: Matcher, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Device ms of the product graph's parts, each captured in its own CUDA graph (median of 20 replays)."""
    prod = m.backend.graphs["product"]
    cfg = prod.cfg
    stream = m.backend.stream
    rgb0, rgb1 = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    st: dict[str, Any] = {}
    cap = prod.cap_of(tuple(a.shape))  # the fine figure: every row up to the cap (no row bucket)

    def pre() -> None:
        st["i0"], st["m0"] = prod.model_input(rgb0)
        st["i1"], st["m1"] = prod.model_input(rgb1)

    def feats() -> None:
        st["f"] = prod._features(st["i0"], st["i1"], st["m0"], st["m1"],  # compiled where the product is
                                 valid=prod.crop_sizes(tuple(rgb0.shape), tuple(rgb1.shape)))

    def head() -> None:
        from matchanything_ros.core.eloftr.model import tf32_head
        f = st["f"]
        with tf32_head(f["transformer0"]) as split:
            if prod._passing is not None:  # the mask + nonzero head: its selection is part of it
                st["mask"] = prod._passing(f["transformer0"], f["transformer1"], st["m0"], st["m1"],
                                           cfg.dsmax_temperature, cfg.d_model, cfg.border_rm, prod.threshold, split)
            else:
                st["cj"], st["cc"] = prod._lse(f["transformer0"], f["transformer1"], st["m0"], st["m1"],
                                               cfg.dsmax_temperature, cfg.d_model, cfg.border_rm,
                                               cfg.candidates_per_cell, split)

    def select() -> None:
        from matchanything_ros.core.eloftr.model import select_on_device, select_passing
        if prod._passing is not None:
            st["sel"] = select_passing(*st["mask"], cap)
        else:
            st["sel"] = select_on_device(st["cj"], st["cc"], st["m0"], st["m1"], prod.threshold, cfg.border_rm, cap)

    def fine() -> None:
        from matchanything_ros.core.eloftr.model import FINE_CHUNK
        i_ids, j_ids = st["sel"][0], st["sel"][1]
        st["fine"] = [prod.fine(st["f"]["feat_f0"], st["f"]["feat_f1"], i_ids[k:k + FINE_CHUNK],
                                j_ids[k:k + FINE_CHUNK]) for k in range(0, cap, FINE_CHUNK)]

    out: dict[str, float] = {}
    autocast = torch.autocast("cuda", dtype=torch.float16, cache_enabled=False)
    with torch_backend.numeric_flags("cuda", "fp16"), torch.inference_mode():
        for name, fn in (("preprocess", pre), ("backbone_transformer_fpn", feats), ("head", head),
                         ("select", select), ("fine", fine)):
            with torch.cuda.stream(stream), autocast:
                fn()
                fn()
            stream.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream), autocast:
                fn()
            ts = []
            for _ in range(20):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    e0.record()
                    g.replay()
                    e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            out[name] = statistics.median(ts)
    out["cap"] = cap
    return out


def memcap_child(ckpt: str, precision: str, gb: float) -> int:
    """A fresh process limited to `gb` GB of GPU memory: does an 832x832 matcher create and run there?"""
    torch.cuda.set_per_process_memory_fraction(gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    photos = np.random.default_rng(0).integers(0, 255, (832, 832, 3), dtype=np.uint8)
    with matcher(ckpt, precision, "robot") as m:
        for _ in range(3):
            m.match(photos, photos[::-1].copy())
        torch.cuda.synchronize()
        print(json.dumps({"precision": precision, "ok": True, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}))
    return 0


@section("memcap")
def memcap(ckpt: str) -> list[dict[str, Any]]:
    out = []
    for prec in ("fp16", "fp32"):
        p = subprocess.run([sys.executable, __file__, "--memcap-child", prec, "--memcap-ckpt", ckpt],
                           capture_output=True, text=True, timeout=150)
        row = {"precision": prec, "cap_gb": 2.5, "rc": p.returncode, "stdout": p.stdout[-600:],
               "stderr_tail": p.stderr[-1500:]}
        out.append(row)
        print("memcap", prec, p.returncode, p.stdout[-300:], p.stderr[-800:], flush=True)
    return out


def load_inputs(pairs_path: str) -> tuple[Path, dict[str, Any], Path, list[np.ndarray], tuple[np.ndarray, np.ndarray],
                                          list[tuple[str, np.ndarray, np.ndarray]]]:
    """-> (fixtures folder, their index, seeded checkpoint, the fixtures' photos, the bundled demo pair,
    held-out pairs from `pairs_path` (eloftr_heldout_pairs.py; none when empty))."""
    ref = reference_dir()
    index, ckpt = seeded_checkpoint(ref, Path(tempfile.mkdtemp()))
    photos = []
    for pair in index["pairs"].values():
        d = np.load(ref / "eloftr" / pair["file"])
        photos += [d["input_image0_rgb_u8"], d["input_image1_rgb_u8"]]
    with np.load(Path(__file__).resolve().parents[2] / "matchanything_ros" / "data" / "demo_homography.npz") as z:
        demo = (z["image0"], z["image1"])
    held: list[tuple[str, np.ndarray, np.ndarray]] = []
    if pairs_path:
        with np.load(pairs_path) as z:
            names = sorted({k.rsplit("_", 1)[0] for k in z.files})
            held = [(n, z[f"{n}_0"], z[f"{n}_1"]) for n in names]
    return ref, index, ckpt, photos, demo, held


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--pairs", default="", help="held-out pairs .npz (eloftr_heldout_pairs.py)")
    ap.add_argument("--sections", default="memory,memcap,timing,parity,fp16")
    ap.add_argument("--memcap-child", default="")
    ap.add_argument("--memcap-ckpt", default="")
    args = ap.parse_args()
    if args.memcap_child:
        return memcap_child(args.memcap_ckpt, args.memcap_child, 2.5)
    REPORT["environment"] = {"gpu": gpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(REPORT["environment"], flush=True)
    ref, index, ckpt, photos, demo, held = load_inputs(args.pairs)
    sections = args.sections.split(",")
    if "memory" in sections:  # first: a fresh process, nothing cached by other sections
        memory(str(ckpt), photos)
    if "memcap" in sections:
        memcap(str(ckpt))
    if "timing" in sections:
        timing(str(ckpt), photos, demo)
    if "parity" in sections:
        parity(str(ckpt), index, ref)
    if "fp16" in sections and held:
        fp16_parity(held)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "eloftr_e2e.json").write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    print("\n=== summary (median ms / p90 / host CPU ms / peak MB / matches) ===")
    for r in REPORT.get("timing", []) if isinstance(REPORT.get("timing"), list) else []:
        print(f"{r['row']:26s} {r['variant']:13s} {r['median_ms']:7.2f} {r['p90_ms']:7.2f} "
              f"{r['host_cpu_ms_median']:6.2f} {r['peak_gpu_mb']:6.0f} {r['matches_median']:6.0f}")
    for r in REPORT.get("timing", []) if isinstance(REPORT.get("timing"), list) else []:
        if "stage_breakdown_ms" in r:
            print(r["row"], "stages (device ms)", r["stage_breakdown_ms"])
    for k in ("memory",):
        print(k, REPORT.get(k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
