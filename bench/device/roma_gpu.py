#!/usr/bin/env python3
"""RoMa on the GPU: parity of CUDA fp32 / AMP / half weights with the golden fixtures, and end-to-end latency.

Usage (repo root): python3 bench/device/roma_gpu.py [--out DIR] [--device cuda|cpu] [--quick] [--compile]

1. Accuracy, per fixture pair (fixture images through our numpy preprocessing, no OpenCV needed),
   per mode: max |error| of the DINOv2 features (relative), every per-scale flow (normalised units)
   and certainty logit, the final warp and certainty, against the official CPU fp32 outputs.
2. Latency at 480x640 -> 560 / 864 (the web UI's model input; random images as the official
   baseline of the original code on the same card): GPU stretch-resize (antialiased bicubic, as the original
   does inside its forward) + dense network + balanced sampling (5000 matches, KDE on the GPU) +
   pixel conversion, i.e. what the official "forward incl. sampling" covers. Median/min/max of
   >= 10 runs after warm-up, CUDA events; peak memory = torch.cuda.max_memory_allocated (weights included).

Modes: fp32 (exact default: TF32 off, linalg.inv GP), amp (autocast fp16 with fp32 weights: the HF
space's GPU mode), fp16 / bf16 (half weights; GP and refiner output convs stay fp32, as under AMP),
fp16_ns (fp16 + the export-ready Newton-Schulz GP), and with --compile fp16 under torch.compile.
Prints a table and writes roma_gpu.json to --out (default $OUT). `--device cpu --quick` runs a
small version (smallest fixture, its sizes, fp32 only, 2 runs) to check the script itself.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))  # parity_rules: the parity definitions the test suite uses

from matchanything_ros.core.roma.model import RomaNet  # noqa: E402
from matchanything_ros.core.roma.preprocess import prepare_image  # noqa: E402
from matchanything_ros.core.roma.sampling import balanced_sample, seeded_generator, to_pixels, valid_mask  # noqa: E402
from matchanything_ros.core.roma.weights import load_state_dicts_into  # noqa: E402
import parity_rules as pr  # noqa: E402

OFFICIAL = {"amp": {"median_ms": 186.5, "peak_mb": 4414}, "fp32": {"median_ms": 273.5, "peak_mb": 5803}}
TARGET = {"median_ms": 60.0, "peak_mb": 2560}


def reference_dir() -> Path:
    return Path(os.environ.get("MATCHANYTHING_REFERENCE_DIR") or REPO / "test" / "fixtures" / "reference")


def seeded_states(ref: Path, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    spec = importlib.util.spec_from_file_location("seeded_weights", ref / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return (mod.seeded_state_dict(ref / "roma" / "manifest.json", seed),
            mod.seeded_state_dict(ref / "roma" / "dinov2_manifest.json", seed))


class Mode:
    def __init__(self, name: str, weights: torch.dtype = torch.float32, autocast: bool = False,
                 solver: str = "inverse", compile_: bool = False) -> None:
        self.name, self.weights, self.autocast, self.solver, self.compile = name, weights, autocast, solver, compile_

    def context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()


def build(roma: dict[str, torch.Tensor], dino: dict[str, torch.Tensor], mode: Mode, device: torch.device,
          coarse_res: int) -> RomaNet:
    net = RomaNet(mode.solver)  # type: ignore[arg-type]
    load_state_dicts_into(net, roma, dino)
    net.eval().to(device)
    if mode.weights != torch.float32:
        net.half_weights(mode.weights)
    net.dinov2.freeze_pos_embed(coarse_res // 14, coarse_res // 14)
    return net


def accuracy(net: RomaNet, mode: Mode, device: torch.device, ref: Path, meta: dict[str, Any],
             pairs: list[str], roma: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for name in pairs:
        pm = next(p for p in meta["pairs"] if p["name"] == name)
        with np.load(ref / "roma" / f"{name}.npz") as zf:
            z = {k: zf[k] for k in zf.files}
        c, u = int(z["coarse_res"][0]), int(z["upsample_res"][0])
        pa = prepare_image(z["img0_uint8"], c, u, False)
        pb = prepare_image(z["img1_uint8"], c, u, False)
        coarse = torch.from_numpy(np.stack([pa.coarse, pb.coarse])).to(device)
        fine = torch.from_numpy(np.stack([pa.fine, pb.fine])).to(device)
        override = pm.get("weight_override")
        saved = None
        if override:
            key = override["key"].removeprefix("matcher.").removeprefix("model.")
            param = dict(net.checkpoint_modules().named_parameters())[key]
            saved = param.data[override["index"]].clone()
            param.data[override["index"]] = float(z["override_to_out_bias_last"])
        rec: dict[str, Any] = {}
        with torch.inference_mode(), mode.context(device):
            warp, cert = net.forward_dense(coarse, fine, rec)
        if override and saved is not None:
            param.data[override["index"]] = saved
        strides = pm.get("strides", {})

        def sub(key: str, full: np.ndarray) -> np.ndarray:
            s = int(strides.get(key, 1))
            return full[..., ::s, ::s]

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        dkey = next(k for k in z if k.startswith("dino_feat16_ch_every"))
        k = int(dkey.rsplit("every", 1)[1])
        dino_rel = float(np.abs(np_(rec["dino_feat16"])[:, ::k] - z[dkey]).max() / np.abs(z[dkey]).max())
        flow_err = max(float(np.abs(sub(key, np_(rec[key])) - z[key]).max()) for key in z
                       if key.startswith("pass") and key.endswith("_flow"))
        logit_err = max(float(np.abs(sub(key, np_(rec[key])) - z[key]).max()) for key in z
                        if key.startswith("pass") and key.endswith("_certainty"))
        w = np_(warp)
        half = w.shape[1] // 2
        warp_err = max(float(np.abs(sub("final_warp_A_to_B", w[:, :half, 2:].transpose(2, 0, 1))
                                    - z["final_warp_A_to_B"]).max()),
                       float(np.abs(sub("final_warp_B_to_A", w[:, half:, :2].transpose(2, 0, 1))
                                    - z["final_warp_B_to_A"]).max()))
        cert_err = float(np.abs(sub("final_certainty", np_(cert)) - z["final_certainty"]).max())
        cls = np_(rec["pass1_s16_gm_cls"])
        rules = pr.verdict(lambda: {"anchor_near_ties": pr.compare_argmax(
            cls.argmax(1), z["pass1_s16_gm_cls_argmax"], pr.absolute_margin(cls, axis=1), pr.ANCHOR_TIE_ATOL,
            "anchor classification").count})
        if rules["holds"] and all(int(strides.get(k, 1)) == 1 for k in ("final_warp_A_to_B", "final_certainty")):
            rules = pr.verdict(lambda: {**rules, **replayed_matches(w, np_(cert), z)})
        rows.append({"mode": mode.name, "pair": name, "sizes": [c, u], "dino_rel": dino_rel, "flow_max": flow_err,
                     "logit_max": logit_err, "final_warp_max": warp_err, "final_cert_max": cert_err,
                     "parity_rules": rules})
    return rows


def replayed_matches(warp: np.ndarray, cert: np.ndarray, z: dict[str, np.ndarray]) -> dict[str, Any]:
    """The original's stored sampler draws replayed on our dense output (the parity suite's comparison of
    sampled matches): keypoints within 1e-3 px and confidences within 1e-4 of the official ones."""
    cells = z["sample_stage1_idx"][z["sample_stage2_idx"]]
    conf = cert.reshape(-1)[cells]
    conf = np.where(conf > 0.05, np.float32(1), conf)
    (h0, w0), (h1, w1) = z["img0_uint8"].shape[:2], z["img1_uint8"].shape[:2]
    k0, k1 = to_pixels(warp.reshape(-1, 4)[cells], (w0, h0), (w1, h1))
    keep = valid_mask(k0, k1, conf, (w0, h0), (w1, h1))
    assert keep.sum() == len(z["mkpts0_f"]), f"replayed draws keep {keep.sum()} matches, not {len(z['mkpts0_f'])}"
    kp_err = float(max(np.abs(k0[keep] - z["mkpts0_f"]).max(), np.abs(k1[keep] - z["mkpts1_f"]).max()))
    conf_err = float(np.abs(conf[keep] - z["mconf"]).max())
    assert kp_err <= pr.KEYPOINT_ATOL_PX, f"replayed keypoints off by {kp_err:.3g} px"
    assert conf_err <= pr.CONF_ATOL, f"replayed confidences off by {conf_err:.3g}"
    return {"replayed_kp_err_max_px": kp_err, "replayed_conf_err_max": conf_err}


def latency(net: RomaNet, mode: Mode, device: torch.device, coarse_res: int, upsample_res: int, runs: int,
            warmup: int) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    imgs = (torch.randint(0, 256, (2, 3, 480, 640), generator=g).float() / 255).to(device)
    gen = seeded_generator(0, device)
    forward: Callable[..., Any] = net.forward_dense
    if mode.compile:
        forward = torch.compile(net.forward_dense)

    def step() -> int:
        with torch.inference_mode(), mode.context(device):
            coarse = F.interpolate(imgs, size=(coarse_res, coarse_res), mode="bicubic", align_corners=False,
                                   antialias=True)
            fine = F.interpolate(imgs, size=(upsample_res, upsample_res), mode="bicubic", align_corners=False,
                                 antialias=True)
            warp, cert = forward(coarse, fine)
            sparse = balanced_sample(warp.float(), cert.float(), 5000, gen)
        k0, k1 = to_pixels(sparse.matches, (640, 480), (640, 480))
        return int(valid_mask(k0, k1, sparse.confidence, (640, 480), (640, 480)).sum())

    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            n = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            n = step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"mode": mode.name, "sizes": [coarse_res, upsample_res], "runs": runs, "median_ms": statistics.median(times),
            "min_ms": min(times), "max_ms": max(times), "peak_mb": peak, "matches": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small run to check the script (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time fp16 under torch.compile (slow first call)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 reference; half modes are unaffected
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    t_start = time.time()
    roma, dino = seeded_states(ref, meta["weights_seed"])
    print(f"seeded weights: {time.time() - t_start:.1f} s", flush=True)
    pairs = [p["name"] for p in meta["pairs"]]
    if args.quick:
        small = min(meta["pairs"], key=lambda p: p.get("forward_seconds_cpu", 0))
        pairs = [small["name"]]
        with np.load(ref / "roma" / f"{small['name']}.npz") as zf:
            sizes = (int(zf["coarse_res"][0]), int(zf["upsample_res"][0]))
        runs, warmup = 2, 0
        modes = [Mode("fp32")]
    else:
        sizes, runs, warmup = (560, 864), max(10, args.runs), 3
        modes = [Mode("fp32"), Mode("amp", autocast=True), Mode("fp16", torch.float16),
                 Mode("bf16", torch.bfloat16), Mode("fp16_ns", torch.float16, solver="newton_schulz")]
        if args.compile:
            modes.append(Mode("fp16_compiled", torch.float16, compile_=True))
    report: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "official_baseline": OFFICIAL, "target": TARGET, "accuracy": [], "latency": []}
    report["errors"] = []
    for mode in modes:
        t0 = time.time()
        net = None
        try:  # one failing mode (e.g. an op without a bf16 kernel) must not cost the others' figures
            net = build(roma, dino, mode, device, sizes[0])
            if not args.skip_accuracy and not mode.compile:
                report["accuracy"] += accuracy(net, mode, device, ref, meta, pairs, roma)
            report["latency"].append(latency(net, mode, device, sizes[0], sizes[1], runs, warmup))
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            report["errors"].append({"mode": mode.name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"!!! {mode.name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"{mode.name}: {time.time() - t0:.1f} s", flush=True)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nRoMa on {report['device']} (torch {report['torch']})")
    print(f"{'mode':14s} {'pair':32s} {'dino rel':>9s} {'flow max':>9s} {'logit max':>9s} {'warp max':>9s} "
          f"{'cert max':>9s}  parity rules (test/parity_rules.py)")
    for r in report["accuracy"]:
        rules = r["parity_rules"]
        print(f"{r['mode']:14s} {r['pair']:32s} {r['dino_rel']:9.2e} {r['flow_max']:9.2e} {r['logit_max']:9.2e} "
              f"{r['final_warp_max']:9.2e} {r['final_cert_max']:9.2e}  "
              + (f"hold ({rules['anchor_near_ties']} anchor near-ties)" if rules["holds"] else f"FAIL: {rules['why']}"))
    print(f"\n{'mode':14s} {'sizes':>9s} {'median ms':>10s} {'min-max ms':>15s} {'peak MB':>9s} {'matches':>8s}")
    for r in report["latency"]:
        print(f"{r['mode']:14s} {r['sizes'][0]:>4d}/{r['sizes'][1]:<4d} {r['median_ms']:10.1f} "
              f"{r['min_ms']:7.1f}-{r['max_ms']:<7.1f} {r['peak_mb']:9.0f} {r['matches']:8d}")
    print(f"official (H100): AMP {OFFICIAL['amp']['median_ms']} ms / {OFFICIAL['amp']['peak_mb']} MB, "
          f"fp32 {OFFICIAL['fp32']['median_ms']} ms / {OFFICIAL['fp32']['peak_mb']} MB; "
          f"target <= {TARGET['median_ms']} ms, <= {TARGET['peak_mb']} MB")
    for e in report["errors"]:
        print(f"FAILED {e['mode']}: {e['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roma_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'roma_gpu.json'} ({time.time() - t_start:.0f} s total)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
