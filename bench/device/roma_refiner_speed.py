#!/usr/bin/env python3
"""RoMa's refiner blocks and sampling on the GPU: the fused depthwise kernel vs cuDNN, end to end.

Usage (repo root): python3 bench/device/roma_refiner_speed.py [--out DIR] [--runs 10] [--budget-s 180]
                   python3 bench/device/roma_refiner_speed.py --dry-run   (CPU: tiny shapes, checks the script)

Sections (each guarded: a failure prints its traceback, the next one runs; JSON + log after each):
1. kernels: per refiner scale's largest real shape (batch 2; channels 1377/1137/569/144/24 at
   35²/108²/216²/432²/864²), fp16 and fp32: max |delta| of the Triton kernel (and the shift-and-add
   form) vs F.conv2d + biases + ReLU in fp32; median GPU time (CUDA events, 25 x 2 calls after warm-up)
   of cuDNN NCHW, cuDNN channels_last and the Triton kernel, alone and as a whole block (+ the 1x1 conv).
   Also cls_to_flow_refine's softmax over dim 1 (the original's order) vs the last dimension (CUDA's form).
2. end to end: `Matcher.match` on two 640x480 photos (roma_e2e.e2e: wall median/p90, stage split, host
   CPU, peak memory): fp16 as the speed form now is (Triton kernel, channels padded to multiples of 8), with
   cuDNN's depthwise conv instead, and the previous form (cuDNN, unpadded); fp16 inference-only variants
   (each switch on its own, CUDA graph, roma_e2e.time_backend); fp32 strict
   (cuDNN TF32 off, the parity form) and fp32 with cuDNN TF32 allowed (torch's default, the hypothesis
   for the original's 259 ms), plus the TF32 run's warp/certainty deviation from the strict one, and the
   fp16 Triton graph's deviation from fp16 cuDNN and from fp32 strict.
3. fp16 eager part split with and without the kernel; torch.profiler: the 15 most expensive CUDA kernels
   of one fp16 (Triton) and one fp32 (strict) dense forward.
4. sampling: `balanced_sample` on the dense output of the fp16 graph, the current CUDA path (exponential
   race, Triton KDE, one wait) vs the previous one (torch.multinomial with its host checks, cdist KDE,
   a wait between the draws), each step timed; whether the exponential race draws torch.multinomial's
   indices on CUDA; Triton KDE vs cdist KDE.
5. (while --budget-s allows) fp32 inference with folded BatchNorms + the Triton kernel (strict and TF32);
   the "inductor" mode (torch.compile of the shift-and-add form): kernels and fp16 end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import roma_e2e  # noqa: E402  (its e2e / build_graph / time_backend / part_split / top_kernels helpers)
from roma_gpu import reference_dir, seeded_states  # noqa: E402

import matchanything_ros.core.roma.device_graph as device_graph  # noqa: E402
import matchanything_ros.core.roma.pipeline as roma_pipeline  # noqa: E402
from matchanything_ros.core.roma import refiner_kernel, sampling  # noqa: E402
from matchanything_ros.core.roma.config import BALANCED_EXPANSION, SAMPLE_THRESH  # noqa: E402
from matchanything_ros.core.roma.model import REFINER_DIMS, cls_to_flow_refine  # noqa: E402
from matchanything_ros.core.roma.pipeline import RomaPipeline  # noqa: E402

# (scale, channels, side) of each refiner's largest input (pass 2 at 864, scale 16 in pass 1 at 560)
REAL_SHAPES = [("16", REFINER_DIMS["16"][0], 35), ("8", REFINER_DIMS["8"][0], 108), ("4", REFINER_DIMS["4"][0], 216),
               ("2", REFINER_DIMS["2"][0], 432), ("1", REFINER_DIMS["1"][0], 864)]
# the same with the speed form's channel padding to a multiple of 8 (scales 2 and 1 need none)
PADDED_SHAPES = [(s + " pad8", c + (-c) % 8, side) for s, c, side in REAL_SHAPES if c % 8]
DRY_SHAPES = [("16", 6, 5), ("4", 5, 9), ("1", 4, 37)]  # --dry-run: few channels (Triton's interpreter is slow)
BEFORE = {"fp16_e2e_ms": 91.7, "fp32_e2e_ms": 738.3, "original_fp32_forward_ms": 259.0,
          "fp16_refiners_ms": {"16": 9.4, "8": 29.5, "4": 32.6, "2": 9.4, "1": 6.9}, "sampling_ms": 8.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int = 25, inner: int = 2, warmup: int = 3) -> float:
    """Median ms per call: CUDA events around `inner` calls, `reps` times, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


@contextlib.contextmanager
def settings(fused: str | None = "triton", cudnn_tf32: bool = False, multiple: int | None = 8) -> Iterator[None]:
    """The speed form's module switches for one measurement, restored after."""
    saved = roma_pipeline.GPU_FUSED_DEPTHWISE, device_graph.FP32_CUDNN_TF32, roma_pipeline.GPU_REFINER_CHANNEL_MULTIPLE
    roma_pipeline.GPU_FUSED_DEPTHWISE, device_graph.FP32_CUDNN_TF32 = fused, cudnn_tf32
    roma_pipeline.GPU_REFINER_CHANNEL_MULTIPLE = multiple
    try:
        yield
    finally:
        (roma_pipeline.GPU_FUSED_DEPTHWISE, device_graph.FP32_CUDNN_TF32,
         roma_pipeline.GPU_REFINER_CHANNEL_MULTIPLE) = saved


# --- 1. kernels -------------------------------------------------------------------------------------------------

def kernel_rows(shapes: list[tuple[str, int, int]], dtype: torch.dtype, device: torch.device,
                modes: tuple[str, ...], reps: int) -> list[dict[str, Any]]:
    rows = []
    for scale, c, side in shapes:
        g = torch.Generator().manual_seed(c * 1000 + side)
        x = torch.randn(2, c, side, side, generator=g).to(device, dtype)
        w = (torch.randn(c, 1, 5, 5, generator=g) / 5).to(device, dtype)
        b, ib = (torch.randn(c, generator=g).to(device, dtype) for _ in range(2))
        pw = (torch.randn(c, c, 1, 1, generator=g) / c**0.5).to(device, dtype)
        pb = torch.randn(c, generator=g).to(device, dtype)
        row: dict[str, Any] = {"scale": scale, "shape": [2, c, side, side], "dtype": str(dtype).removeprefix("torch."),
                               "tensor_mb": x.numel() * x.element_size() / 2**20}
        with torch.inference_mode(), device_graph.fp32_math(cudnn_benchmark=dtype == torch.float32):
            ref = torch.relu(F.conv2d(x.float() + ib.float().view(1, c, 1, 1), w.float(), b.float(), padding=2,
                                      groups=c))
            scale_ref = float(ref.abs().max())
            for mode in modes:
                got = refiner_kernel.fused_depthwise_bias_relu(mode, x, w, b, ib)
                assert got.dtype == dtype and got.shape == x.shape
                row[f"max_abs_delta_{mode}"] = float((got.float() - ref).abs().max())
            row["max_abs_ref"] = scale_ref
            del ref
            if device.type == "cuda":  # cuDNN's own rounding in this dtype, for scale
                cud = torch.relu(F.conv2d(x + ib.view(1, c, 1, 1), w, b, padding=2, groups=c)).float()
                ref = torch.relu(F.conv2d(x.float() + ib.float().view(1, c, 1, 1), w.float(), b.float(), padding=2,
                                          groups=c))
                row["max_abs_delta_cudnn"] = float((cud - ref).abs().max())
                del cud, ref
            xc, wc = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
            pwc = pw.contiguous(memory_format=torch.channels_last)

            def fused(mode: str) -> Callable[[], torch.Tensor]:
                return lambda: refiner_kernel.fused_depthwise_bias_relu(mode, x, w, b, ib)

            def fused_block(mode: str) -> Callable[[], torch.Tensor]:
                return lambda: F.conv2d(refiner_kernel.fused_depthwise_bias_relu(mode, x, w, b, ib), pw, None)

            timed: dict[str, Callable[[], torch.Tensor]] = {
                "cudnn_nchw": lambda: torch.relu(F.conv2d(x, w, b, padding=2, groups=c)),
                "cudnn_channels_last": lambda: torch.relu(F.conv2d(xc, wc, b, padding=2, groups=c)),
                **{mode: fused(mode) for mode in modes},
                # a whole block: depthwise + ReLU + 1x1 conv (cuDNN: each conv adds its bias in a pass of its own)
                "block_cudnn_nchw": lambda: F.conv2d(torch.relu(F.conv2d(x, w, b, padding=2, groups=c)), pw, pb),
                "block_cudnn_channels_last": lambda: F.conv2d(torch.relu(F.conv2d(xc, wc, b, padding=2, groups=c)),
                                                              pwc, pb),
                **{f"block_{mode}": fused_block(mode) for mode in modes}}
            for name, fn in timed.items():
                row[f"ms_{name}"] = time_ms(fn, device, reps)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return rows


# --- 2. end to end ---------------------------------------------------------------------------------------------

def dense_outputs(graph: Any, inputs: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x0, x1 = (torch.from_numpy(inputs[k]).to(device) for k in ("image0", "image1"))
    with torch.inference_mode():
        warp, cert = graph(x0, x1)
    return warp.float(), cert.float()


def deviation(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """|a - b| of the flows (warp's target half of each side) and certainties: max, mean, p99, and the share of
    cells whose flow moves more than 1e-3 (normalised units; a pixel at 864 is 2.3e-3)."""
    (wa, ca), (wb, cb) = a, b
    u = wa.shape[-3]
    fa = torch.cat((wa[..., :u, 2:], wa[..., u:, :2]), dim=-2)
    fb = torch.cat((wb[..., :u, 2:], wb[..., u:, :2]), dim=-2)
    df = (fa - fb).abs().amax(-1).flatten()
    dc = (ca - cb).abs().flatten()
    step = max(1, df.numel() // 2_000_000)  # quantile takes at most 16M elements
    return {"flow_max": float(df.max()), "flow_mean": float(df.mean()),
            "flow_p99": float(torch.quantile(df[::step], 0.99)),
            "flow_share_over_1e-3": float((df > 1e-3).float().mean()),
            "cert_max": float(dc.max()), "cert_mean": float(dc.mean()),
            "cert_p99": float(torch.quantile(dc[::step], 0.99))}


# --- 4. sampling -------------------------------------------------------------------------------------------------

def sampling_split(warp: torch.Tensor, cert: torch.Tensor, num: int, device: torch.device, seed: int = 0,
                   runs: int = 10) -> dict[str, Any]:
    """Each step of the balanced sampler, timed on the device (CUDA events, median of `runs`)."""
    w = warp.float().reshape(-1, 4)
    c0 = cert.float().reshape(-1)
    n1 = min(BALANCED_EXPANSION * num, c0.numel())
    out: dict[str, Any] = {"cells": int(c0.numel()), "stage1": n1, "stage2": num}

    def gen() -> torch.Generator | None:
        return sampling.seeded_generator(seed, device)

    def host_ms(fn: Callable[[], Any]) -> float:
        fn()
        sync(device)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def previous() -> Any:  # the sampler before this change, on the same tensors
        c = torch.where(c0 > SAMPLE_THRESH, torch.ones_like(c0), c0)
        c = torch.cat((torch.where(c.sum() == 0, torch.ones_like(c[:1]), c[:1]), c[1:]))
        g = gen()
        idx1 = torch.multinomial(c, n1, replacement=False, generator=g)
        m1, c1 = w[idx1], c[idx1]
        density = sampling.kde_density(m1)
        p = torch.where(density < 10, torch.full_like(density, 1e-7), 1 / (density + 1))
        sampling.wait_without_spinning(p.device)
        idx2 = torch.multinomial(p, min(num, n1), replacement=False, generator=g)
        sampling.wait_without_spinning(w.device)
        return m1[idx2].cpu().numpy(), c1[idx2].cpu().numpy(), idx1.cpu().numpy(), idx2.cpu().numpy()

    out["wall_ms_previous"] = host_ms(previous)
    out["wall_ms_current"] = host_ms(lambda: sampling.balanced_sample(w, c0, num, gen()))
    c = torch.where(c0 > SAMPLE_THRESH, torch.ones_like(c0), c0)
    idx_m = torch.multinomial(c, n1, replacement=False, generator=gen())
    idx_r = sampling.exponential_race(c, n1, gen())
    out["race_equals_multinomial"] = bool((idx_m == idx_r).all())
    m1 = w[idx_r]
    kde_ref = sampling.kde_density(m1)
    steps: dict[str, Callable[[], Any]] = {
        "multinomial_stage1": lambda: torch.multinomial(c, n1, replacement=False, generator=gen()),
        "race_stage1": lambda: sampling.exponential_race(c, n1, gen()),
        "kde_cdist": lambda: sampling.kde_density(m1),
        "gather": lambda: (w[idx_r], c[idx_r]),
        "copy_back_4_arrays": lambda: [t.cpu() for t in (m1[:num], c[:num], idx_r, kde_ref)],
    }
    if refiner_kernel.triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        kde_t = sampling.kde_density_triton(m1)
        out["kde_triton_max_rel_vs_cdist"] = float(((kde_t / kde_ref) - 1).abs().max())
        steps["kde_triton"] = lambda: sampling.kde_density_triton(m1)
    for name, fn in steps.items():
        out[f"ms_{name}"] = time_ms(fn, device, reps=runs, inner=1, warmup=1)
    return out


# --- main -----------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--runs", type=int, default=10, help="timed Matcher.match runs per end-to-end row")
    ap.add_argument("--budget-s", type=float, default=180.0,
                    help="the optional sections (5.) start only while they can end by about this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script itself")
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "roma_refiner_speed.log", "w")
    t_start = time.time()

    def say(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    report: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "triton_available": refiner_kernel.triton_available(), "dry_run": dry, "before": BEFORE, "errors": [],
        "section_s": {}}
    try:
        import triton  # type: ignore[import-not-found, unused-ignore]

        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        report["triton"] = None

    def save() -> None:
        (out_dir / "roma_refiner_speed.json").write_text(json.dumps(report, indent=1, default=str))

    def section(name: str, fn: Callable[[], Any], start_before_s: float | None = None) -> Any:
        """Run one guarded section; one with `start_before_s` only starts before that many seconds."""
        if start_before_s is not None and time.time() - t_start > start_before_s:
            say(f"[{name}: skipped, {time.time() - t_start:.0f} s used, it starts only before {start_before_s:.0f} s]")
            report["section_s"][name] = "skipped (budget)"
            save()
            return None
        t0 = time.time()
        say(f"--- {name}")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing section must not cost the others' figures
            trace = traceback.format_exc()
            report["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"[:800],
                                     "trace": trace[-3000:]})
            say(f"!!! {name} failed: {type(exc).__name__}: {exc}\n{trace}")
            return None
        finally:
            report["section_s"][name] = round(time.time() - t0, 1)
            say(f"[{name}: {time.time() - t0:.1f} s, total {time.time() - t_start:.0f} s]")
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # --- 1. kernels
    modes = ("triton", "shifted") if report["triton_available"] and (not dry or os.environ.get("TRITON_INTERPRET")
                                                                    == "1") else ("shifted",)
    shapes = DRY_SHAPES if dry else REAL_SHAPES + PADDED_SHAPES
    reps = 2 if dry else 25
    report["kernels"] = []
    for dtype in ((torch.float32,) if dry else (torch.float16, torch.float32)):
        def kernels(dtype: torch.dtype = dtype) -> list[dict[str, Any]]:
            return kernel_rows(shapes, dtype, device, modes, reps)
        report["kernels"] += section(f"kernels {dtype}", kernels) or []

    def class_softmax() -> list[dict[str, Any]]:
        """cls_to_flow_refine over dim 1 (the original's order, the CPU's) vs over the last dimension (CUDA)."""
        rows = []
        side = 5 if dry else 35  # 560 / 16
        for dtype in ((torch.float32,) if dry else (torch.float16, torch.float32)):
            cls = (torch.randn(2, 4096, side, side, generator=torch.Generator().manual_seed(1)) * 3).to(device, dtype)
            with torch.inference_mode():
                a = cls_to_flow_refine(cls, classes_last=False)
                b = cls_to_flow_refine(cls, classes_last=True)
                rows.append({"dtype": str(dtype), "max_abs_delta": float((a.float() - b.float()).abs().max()),
                             "ms_dim1": time_ms(lambda: cls_to_flow_refine(cls, classes_last=False), device, reps),
                             "ms_last_dim": time_ms(lambda: cls_to_flow_refine(cls, classes_last=True), device, reps)})
            say(f"  {rows[-1]}")
        return rows
    report["class_softmax"] = section("class softmax (cls_to_flow_refine)", class_softmax)

    # --- weights, photos, matcher files (as roma_e2e's main)
    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    roma, dino = seeded_states(ref, meta["weights_seed"])
    tmp = Path(tempfile.mkdtemp(prefix="roma_refiner_"))
    ckpt, dino_file = tmp / "matchanything_roma.ckpt", tmp / "dinov2_vitl14_pretrain.pth"
    torch.save({"state_dict": roma, "epoch": 0, "global_step": 0}, ckpt)
    torch.save(dino, dino_file)
    import cv2

    with np.load(ref / "roma" / "pair1_rocket_crossmodal.npz") as zf:
        images = tuple(np.ascontiguousarray(cv2.resize(zf[k], (640, 480), interpolation=cv2.INTER_AREA))
                       for k in ("img0_uint8", "img1_uint8"))
    sizes = (168, 224) if dry else (560, 864)
    runs, warmup = (1, 0) if dry else (args.runs, 3)
    say(f"weights and photos: {time.time() - t_start:.1f} s")
    pipe = RomaPipeline({"coarse_res": sizes[0], "upsample_res": sizes[1]})
    pipe.resize_on_device = True
    inputs, _ = pipe.preprocess(*images)
    solver = roma_pipeline.GPU_GP_SOLVER

    def graph_for(precision: str, fused: str | None, fold: bool | None = None, multiple: int | None = None) -> Any:
        """The speed form's graph (roma_e2e.build_graph) with the fused kernel and channel padding as asked
        (multiple None: padded as the speed form pads fp16, 8; 0: unpadded)."""
        half = precision == "fp16"
        g = roma_e2e.build_graph(roma, dino, device, half=half, fold=half if fold is None else fold,
                                 solver=solver, cudnn_benchmark=precision == "fp32", c=sizes[0], u=sizes[1])
        multiple = (8 if half else 0) if multiple is None else multiple
        if multiple:
            g.net.pad_refiner_channels(multiple)
        g.net.use_fused_depthwise(fused)
        return g

    # --- 2. end to end
    report["e2e"] = []
    e2e_rows: list[tuple[str, str, str | None, bool]] = (
        [("fp32 strict (cuDNN)", "fp32", None, False)] if dry else
        [("fp16 Triton kernel + pad 8 (default)", "fp16", "triton", False),
         ("fp16 cuDNN depthwise + pad 8", "fp16", None, False),
         ("fp32 strict (cuDNN TF32 off)", "fp32", None, False), ("fp32 cuDNN TF32 allowed", "fp32", None, True)])
    for label, precision, fused, tf32 in e2e_rows:
        def e2e_row(label: str = label, precision: str = precision, fused: str | None = fused,
                    tf32: bool = tf32) -> dict[str, Any]:
            with settings(fused, tf32):
                return roma_e2e.e2e(ckpt, dino_file, precision, images, runs, warmup, device,  # type: ignore[arg-type]
                                    label, sizes)
        row = section(f"e2e {label}", e2e_row)
        if row:
            report["e2e"].append(row)
    if not dry:
        def e2e_previous() -> dict[str, Any]:
            with settings(None, False, None):
                return roma_e2e.e2e(ckpt, dino_file, "fp16", images, runs, warmup, device,  # type: ignore[arg-type]
                                    "fp16 previous form (cuDNN, no pad)", sizes)
        row = section("e2e fp16 previous form", e2e_previous)
        if row:
            report["e2e"].append(row)

        def fp16_variants() -> dict[str, Any]:
            """Inference only (the torch backend's CUDA graph), each switch on its own."""
            res: dict[str, Any] = {}
            for label, fused, multiple in (("Triton + pad 8 (default)", "triton", 8), ("Triton, no pad", "triton", 0),
                                           ("cuDNN + pad 8", None, 8), ("cuDNN, no pad (previous)", None, 0),
                                           ("Triton + pad 16", "triton", 16)):
                g = graph_for("fp16", fused, multiple=multiple)
                res[label] = roma_e2e.time_backend(g, inputs, device, "fp16", cuda_graphs=True)
                say(f"  fp16 inference {label}: {res[label]}")
                del g
            return res
        report["fp16_variants"] = section("fp16 variants (inference, captured)", fp16_variants)

    def deviations() -> dict[str, Any]:
        res: dict[str, Any] = {}
        g32 = graph_for("fp32", None)
        strict = dense_outputs(g32, inputs, device)
        with settings(None, True):
            tf32 = dense_outputs(g32, inputs, device)
        res["fp32 TF32 vs fp32 strict"] = deviation(tf32, strict)
        del g32, tf32
        if not dry:
            g16 = graph_for("fp16", "triton")
            fused = dense_outputs(g16, inputs, device)
            g16.net.use_fused_depthwise(None)
            plain = dense_outputs(g16, inputs, device)
            del g16
            previous = dense_outputs(graph_for("fp16", None, multiple=0), inputs, device)
            res["fp16 Triton vs fp16 cuDNN (both pad 8)"] = deviation(fused, plain)
            res["fp16 cuDNN pad 8 vs no pad"] = deviation(plain, previous)
            res["fp16 Triton+pad vs fp32 strict"] = deviation(fused, strict)
            res["fp16 previous vs fp32 strict"] = deviation(previous, strict)
        return res
    report["deviations"] = section("deviations", deviations)

    # --- 3. part split and profiles
    if not dry:
        def split() -> dict[str, Any]:
            res: dict[str, Any] = {}
            g = graph_for("fp16", "triton")
            res["fp16 Triton + pad 8"] = roma_e2e.part_split(g, inputs, device)
            report["fp16_triton_top_kernels_ms"] = roma_e2e.top_kernels(g, inputs, device, n=15)
            g.net.use_fused_depthwise(None)
            res["fp16 cuDNN + pad 8"] = roma_e2e.part_split(g, inputs, device)
            return res
        report["part_split_ms"] = section("fp16 part split + profile", split)

        def profile32() -> list[Any]:
            return roma_e2e.top_kernels(graph_for("fp32", None), inputs, device, n=15)
        report["fp32_strict_top_kernels_ms"] = section("fp32 profile", profile32)

    # --- 4. sampling
    def sampling_section() -> dict[str, Any]:
        g = graph_for("fp32" if dry else "fp16", None if dry else "triton")
        warp, cert = dense_outputs(g, inputs, device)
        del g
        return sampling_split(warp, cert, 50 if dry else 5000, device, runs=2 if dry else 10)
    report["sampling"] = section("sampling", sampling_section)

    # --- 5. optional: fp32 with the kernel, the inductor mode
    def fp32_fused() -> dict[str, Any]:
        res: dict[str, Any] = {}
        for label, tf32 in (("fp32 folded BN + Triton + pad 8, strict", False),
                            ("fp32 folded BN + Triton + pad 8, TF32", True)):
            with settings("triton", tf32):
                g = graph_for("fp32", "triton", fold=True, multiple=8)
                res[label] = roma_e2e.time_backend(g, inputs, device, "fp32", cuda_graphs=True)
                del g
        return res
    if not dry and report["triton_available"]:
        report["fp32_fused_inference"] = section("fp32 fused inference", fp32_fused, args.budget_s - 30)
        def kernels_inductor() -> list[dict[str, Any]]:
            return kernel_rows(REAL_SHAPES, torch.float16, device, ("inductor",), 10)
        report["kernels_inductor"] = section("kernels inductor fp16", kernels_inductor, args.budget_s - 30)

        def e2e_inductor() -> dict[str, Any]:
            with settings("inductor", False):
                return roma_e2e.e2e(ckpt, dino_file, "fp16", images, runs, warmup, device,  # type: ignore[arg-type]
                                    "fp16 inductor kernel", sizes)
        row = section("e2e fp16 inductor kernel", e2e_inductor, args.budget_s - 90)  # ~18 compiles
        if row:
            report["e2e"].append(row)

    # --- table
    say(f"\nRoMa refiner kernel on {report['device']}, torch {report['torch']}, triton {report['triton']}, "
        f"{report['when']}")
    say(f"{'scale':9s} {'dtype':8s} {'shape':22s} {'dw cudnn':>9s} {'dw c_last':>9s} {'dw triton':>9s} "
        f"{'blk cudnn':>9s} {'blk c_l':>9s} {'blk trit':>9s} {'|d| trit':>9s} {'|d| cudnn':>9s}  (ms)")
    for r in report["kernels"]:
        say(f"{r['scale']:9s} {r['dtype']:8s} {str(r['shape']):22s} {r['ms_cudnn_nchw']:9.3f} "
            f"{r['ms_cudnn_channels_last']:9.3f} {r.get('ms_triton', float('nan')):9.3f} "
            f"{r['ms_block_cudnn_nchw']:9.3f} {r['ms_block_cudnn_channels_last']:9.3f} "
            f"{r.get('ms_block_triton', float('nan')):9.3f} {r.get('max_abs_delta_triton', float('nan')):9.2e} "
            f"{r.get('max_abs_delta_cudnn', float('nan')):9.2e}")
    for r in report.get("kernels_inductor") or []:
        say(f"inductor scale {r['scale']}: dw {r['ms_inductor']:.3f} ms, block {r['ms_block_inductor']:.3f} ms, "
            f"|d| {r['max_abs_delta_inductor']:.2e}")
    say(f"\n{'e2e':36s} {'median':>7s} {'p90':>7s} {'pre':>6s} {'infer':>6s} {'post':>6s} {'cpu ms':>7s} "
        f"{'peak MB':>8s} {'matches':>7s}")
    for r in report["e2e"]:
        s = r["stage_median_ms"]
        say(f"{r['label']:36s} {r['median_ms']:7.1f} {r['p90_ms']:7.1f} {s.get('preprocess', 0):6.1f} "
            f"{s.get('inference', 0):6.1f} {s.get('postprocess', 0):6.1f} {r['host_cpu_ms_median']:7.1f} "
            f"{r['peak_mb_timed']:8.0f} {r['matches_median']:7.0f}")
    for name, r in (report.get("fp16_variants") or {}).items():
        say(f"fp16 inference {name:28s} {r['median_ms']:7.1f} ms (min {r['min_ms']:.1f}), "
            f"peak {r['peak_mb_timed']:.0f} MB")
    for name, d in (report.get("deviations") or {}).items():
        say(f"deviation {name:40s} " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    for name, parts in (report.get("part_split_ms") or {}).items():
        say(f"part split {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    for key in ("fp16_triton_top_kernels_ms", "fp32_strict_top_kernels_ms"):
        if report.get(key):
            say(key)
            for name_, ms, calls in report[key]:
                say(f"  {ms:8.2f} ms {calls:5d}x  {name_}")
    if report.get("sampling"):
        say("sampling: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in report["sampling"].items()))
    for name, r in (report.get("fp32_fused_inference") or {}).items():
        say(f"{name}: inference {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}), peak {r['peak_mb_timed']:.0f} MB")
    for r in report.get("class_softmax") or []:
        say(f"cls_to_flow_refine {r['dtype']}: dim 1 {r['ms_dim1']:.3f} ms, last dim {r['ms_last_dim']:.3f} ms, "
            f"|d| {r['max_abs_delta']:.1e}")
    say(f"before: {BEFORE}")
    say(f"section seconds: {report['section_s']}")
    for e in report["errors"]:
        say(f"FAILED {e['section']}: {e['error']}")
    report["total_s"] = round(time.time() - t_start, 1)
    save()
    say(f"wrote {out_dir / 'roma_refiner_speed.json'} ({report['total_s']:.0f} s total)")
    log_file.close()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
