#!/usr/bin/env python3
"""RoMa end to end on the GPU: CUDA parity of the speed form, and `Matcher.match` as users get it.

Usage (repo root): python3 bench/device/roma_e2e.py [--out DIR] [--runs 20] [--quick]

1. GP check: the CUDA speed form's Cholesky GP is captured in a CUDA graph on its own first; if that
   fails the run falls back to the Newton-Schulz solve (recorded in the JSON).
2. Parity, per fixture pair (seeded weights, the fixtures' images and sizes, no web-UI stage): the
   graph the torch backend builds on CUDA (stage-1 images in, the stretch-resize as MatMuls, Cholesky
   GP, channels_last; fp16 also half weights + folded BatchNorms) vs the official CPU fp32 outputs:
   the device resize vs the bit-exact numpy resize, DINOv2 features (relative), every per-scale flow
   and certainty logit (eager forward with recording), and the final warp/certainty through the
   torch backend's CUDA graph (plus captured vs eager).
3. End to end: `Matcher(MatcherConfig(variant="roma", backend="torch", device="cuda", precision=P))
   .match(image0, image1)` on two 640x480 RGB photos (the fixtures' photos stretched to 640x480 with
   OpenCV beforehand; default settings: web-UI stage, 560 / 864, balanced sampling of 5000): wall
   time with torch.cuda.synchronize() before the clock stops, median / p90 of --runs after warm-up,
   the per-stage split, host CPU ms per pair (time.process_time), peak GPU memory
   (max_memory_allocated, reset before the timed runs; also over creation + warm-up, where the eager
   warm-up forwards hold the activations, and max reserved). fp16 first, then fp32 in the same
   process (the fp16 matcher's process-wide cuDNN autotuning switch must not change the fp32 one).
   Plus one fp16 run on a photo that is not 640x480 (the web-UI stage's resize on the host).
   And fp16 with the torch backend's stream wait made a blocking event (host CPU without spin-waiting).
4. Where the fp16 time goes: inference-only variants (no CUDA graph, cuDNN autotuning, channels_last,
   grid_sample correlation, BatchNorms kept, Newton-Schulz GP), the eager per-part split (CUDA events on
   module hooks), the GPU time per kernel (torch.profiler) and the sampling.

Writes roma_e2e.json to --out (default $OUT) after every section, prints a short table last.
`--device cpu --quick` checks the script here (smallest pair, fp32, 1 run, no variants).
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import matchanything_ros.core.roma.pipeline as roma_pipeline  # noqa: E402
from matchanything_ros.core.backends.torch_backend import TorchBackend  # noqa: E402
from matchanything_ros.core.matcher import Matcher, MatcherConfig  # noqa: E402
from matchanything_ros.core.roma.device_graph import RomaImageGraph, fp32_math  # noqa: E402
from matchanything_ros.core.roma.gp import GaussianProcessMatch  # noqa: E402
from matchanything_ros.core.roma.pipeline import RomaPipeline  # noqa: E402
from matchanything_ros.core.roma.preprocess import prepare_image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roma_gpu import reference_dir, seeded_states  # noqa: E402  (the fixtures' seeded weights, one definition)

ISSUE = {"fp16": {"e2e_ms": 424.0, "peak_mb": 3600}, "fp32": {"e2e_ms": 603.0},
         "original_fp32_forward_ms": 259.0, "original_amp_forward_ms": 174.3}
TARGET = {"fp16_e2e_ms": 60.0, "fp16_peak_mb": 2048, "fp32_e2e_ms": 259.0, "fp32_peak_mb": 4096, "host_cpu_ms": 5.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- 1. GP capture check ------------------------------------------------------------------------------

def gp_capture_check(device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    gp = GaussianProcessMatch(512, "cholesky").to(device).eval()
    x, y = (torch.randn(2, 512, 40, 40, generator=gen).to(device) for _ in range(2))
    with torch.inference_mode():
        eager = gp(x, y)
        ref = GaussianProcessMatch(512, "inverse_fp64").to(device).eval()
        ref.load_state_dict(gp.state_dict())
        exact = ref(x, y)
        if device.type != "cuda":
            return {"captured": False, "rel_err_vs_fp64": float((eager - exact).abs().max() / exact.abs().max())}
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            gp(x, y)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = gp(x, y)
        graph.replay()
        sync(device)
    return {"captured": True, "replay_vs_eager": float((out - eager).abs().max()),
            "rel_err_vs_fp64": float((eager - exact).abs().max() / exact.abs().max())}


# --- 2. parity --------------------------------------------------------------------------------------------

def parity(roma: dict[str, torch.Tensor], dino: dict[str, torch.Tensor], name: str, pm: dict[str, Any],
           z: dict[str, np.ndarray], precision: str, device: torch.device) -> dict[str, Any]:
    c, u = int(z["coarse_res"][0]), int(z["upsample_res"][0])
    pipe = RomaPipeline({"coarse_res": c, "upsample_res": u, "roma_webui_resize": False, "sample_mode": "topk"})
    graph = pipe.torch_graphs(roma, str(device), dinov2_state=dino, precision=precision, resize_on_device=True)["dense"]
    assert isinstance(graph, RomaImageGraph)
    net = graph.net
    override = pm.get("weight_override")
    if override:
        key = override["key"].removeprefix("matcher.").removeprefix("model.")
        param = dict(net.checkpoint_modules().named_parameters())[key]
        param.data[override["index"]] = float(z["override_to_out_bias_last"])
    inputs, meta = pipe.preprocess(z["img0_uint8"], z["img1_uint8"])
    strides = pm.get("strides", {})

    def sub(key: str, full: np.ndarray) -> np.ndarray:
        s = int(strides.get(key, 1))
        return full[..., ::s, ::s]

    def np_(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    rec: dict[str, Any] = {}
    with torch.inference_mode(), torch.autocast(device.type, enabled=False), fp32_math(False):
        x0, x1 = (torch.from_numpy(inputs[k]).to(device) for k in ("image0", "image1"))
        c0, f0 = graph.stretch(x0)
        c1, f1 = graph.stretch(x1)
        warp_e, cert_e = net.forward_dense(torch.cat((c0, c1)), torch.cat((f0, f1)), rec)
    resize_dev = 0.0
    for img, (co, fi) in ((z["img0_uint8"], (c0, f0)), (z["img1_uint8"], (c1, f1))):
        ref = prepare_image(img, c, u, False)
        assert ref.coarse is not None and ref.fine is not None
        resize_dev = max(resize_dev, float(np.abs(np_(co[0]) - ref.coarse).max()),
                         float(np.abs(np_(fi[0]) - ref.fine).max()))
    dkey = next(k for k in z if k.startswith("dino_feat16_ch_every"))
    k = int(dkey.rsplit("every", 1)[1])
    dino_rel = float(np.abs(np_(rec["dino_feat16"])[:, ::k] - z[dkey]).max() / np.abs(z[dkey]).max())
    flow_err = max(float(np.abs(sub(key, np_(rec[key])) - z[key]).max()) for key in z
                   if key.startswith("pass") and key.endswith("_flow"))
    logit_err = max(float(np.abs(sub(key, np_(rec[key])) - z[key]).max()) for key in z
                    if key.startswith("pass") and key.endswith("_certainty"))

    def final_errs(w: np.ndarray, ce: np.ndarray) -> tuple[float, float]:
        half = w.shape[1] // 2
        we = max(float(np.abs(sub("final_warp_A_to_B", w[:, :half, 2:].transpose(2, 0, 1))
                              - z["final_warp_A_to_B"]).max()),
                 float(np.abs(sub("final_warp_B_to_A", w[:, half:, :2].transpose(2, 0, 1))
                              - z["final_warp_B_to_A"]).max()))
        return we, float(np.abs(sub("final_certainty", ce) - z["final_certainty"]).max())

    eager_warp, eager_cert = final_errs(np_(warp_e), np_(cert_e))
    backend = TorchBackend({"dense": graph}, str(device), precision)
    outs = pipe.infer(backend, inputs, meta)
    cap_warp, cap_cert = final_errs(np.asarray(outs["warp"][0]), np.asarray(outs["certainty"][0]))
    cap_vs_eager = float(np.abs(np.asarray(outs["warp"][0]) - np_(warp_e)).max())
    backend.close()
    del graph, net, backend
    return {"precision": precision, "pair": name, "sizes": [c, u], "resize_max_dev": resize_dev,
            "dino_rel": dino_rel, "flow_max": flow_err, "logit_max": logit_err, "final_warp_max": cap_warp,
            "final_cert_max": cap_cert, "eager_final_warp_max": eager_warp, "eager_final_cert_max": eager_cert,
            "captured_vs_eager_warp": cap_vs_eager}


# --- 3. end to end ----------------------------------------------------------------------------------------

def e2e(ckpt: Path, dino: Path, precision: str, images: tuple[np.ndarray, np.ndarray], runs: int, warmup: int,
        device: torch.device, label: str, sizes: tuple[int, int] = (560, 864)) -> dict[str, Any]:
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    t0 = time.perf_counter()
    matcher = Matcher(MatcherConfig(variant="roma", checkpoint_path=str(ckpt), dinov2_path=str(dino),
                                    backend="torch", device=device.type, precision=precision,
                                    coarse_res=sizes[0], upsample_res=sizes[1]))
    create_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = matcher.match(*images)
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        matcher.match(*images)
    sync(device)
    setup_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu, stages, counts = [], [], [], []
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        result = matcher.match(*images)
        sync(device)
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        stages.append(dict(result.timings_ms))
        counts.append(len(result))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else float("nan")
    info = {k: matcher.info[k] for k in ("backend", "device", "precision", "coarse_res", "upsample_res")}
    matcher.close()
    del matcher
    split = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return {"label": label, "precision": precision, "image_wh": [int(images[0].shape[1]), int(images[0].shape[0])],
            "runs": runs, "warmup": warmup, "median_ms": statistics.median(wall), "p90_ms": pct(wall, 90),
            "min_ms": min(wall), "max_ms": max(wall), "stage_median_ms": split,
            "host_cpu_ms_median": statistics.median(cpu), "host_cpu_ms_p90": pct(cpu, 90),
            "peak_mb_timed": peak, "peak_mb_setup": setup_peak, "max_reserved_mb": reserved,
            "allocated_before_mb": base_mb, "create_s": create_s, "first_match_s": first_s,
            "matches_median": statistics.median(counts), "first_matches": len(first), "info": info}


def weight_files_and_photos(roma: dict[str, torch.Tensor], dino: dict[str, torch.Tensor],
                            npz: dict[str, dict[str, np.ndarray]]) -> tuple[Path, Path, tuple[np.ndarray, ...]]:
    """The two weight files a user passes (Matcher reads files) and the timed pair: the rocket fixture's photos
    at 640x480."""
    import cv2

    tmp = Path(tempfile.mkdtemp(prefix="roma_e2e_"))
    ckpt, dino_file = tmp / "matchanything_roma.ckpt", tmp / "dinov2_vitl14_pretrain.pth"
    torch.save({"state_dict": roma, "epoch": 0, "global_step": 0}, ckpt)
    torch.save(dino, dino_file)
    photo = npz["pair1_rocket_crossmodal"]
    return ckpt, dino_file, tuple(np.ascontiguousarray(cv2.resize(photo[k], (640, 480), interpolation=cv2.INTER_AREA))
                                  for k in ("img0_uint8", "img1_uint8"))


# --- 4. where the fp16 time goes ------------------------------------------------------------------------

def build_graph(roma: dict[str, torch.Tensor], dino: dict[str, torch.Tensor], device: torch.device, *,
                half: bool = True, fold: bool = True, channels_last: bool = False, gathered: bool = True,
                solver: str = "cholesky", cudnn_benchmark: bool = False, c: int = 560,
                u: int = 864) -> RomaImageGraph:
    pipe = RomaPipeline({"coarse_res": c, "upsample_res": u})
    net = pipe.build_net(roma, dino, solver)  # type: ignore[arg-type]
    if fold:
        net.fold_batchnorms()
    if half:
        net.half_weights()
    if channels_last:
        net.use_channels_last()
    if gathered:
        net.use_gathered_correlation()
    net.to(device)
    net.dinov2.freeze_pos_embed(c // 14, c // 14)
    return RomaImageGraph(net, c, u, cudnn_benchmark=cudnn_benchmark).eval()


def time_backend(graph: RomaImageGraph, inputs: dict[str, np.ndarray], device: torch.device, precision: str,
                 cuda_graphs: bool, runs: int = 10) -> dict[str, Any]:
    backend = TorchBackend({"dense": graph}, str(device), precision, cuda_graphs=cuda_graphs,
                           keep_on_device={"warp", "certainty"})
    for _ in range(3):
        backend.run("dense", inputs)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run("dense", inputs)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"median_ms": statistics.median(times), "min_ms": min(times),
           "peak_mb_timed": torch.cuda.max_memory_allocated(device) / 2**20}
    backend.close()
    return out


def part_split(graph: RomaImageGraph, inputs: dict[str, np.ndarray], device: torch.device) -> dict[str, float]:
    """Eager forward, CUDA events around the named parts (GPU time incl. launch gaps), mean of 5 after 2."""
    net = graph.net
    parts: dict[str, torch.nn.Module] = {"vgg": net.encoder.cnn, "dinov2": net.dinov2, "gp": net.decoder.gps["16"],
                                         "embedding_decoder": net.decoder.embedding_decoder,
                                         "stretch": graph.stretch}
    for s, m in net.decoder.conv_refiner.items():
        parts[f"refiner_{s}"] = m
    for s, m in net.decoder.proj.items():
        parts[f"proj_{s}"] = m
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {k: [] for k in parts}
    handles = []
    for name, mod in parts.items():
        def pre(_m: Any, _a: Any, name: str = name) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events[name].append((ev, ev))

        def post(_m: Any, _a: Any, _o: Any, name: str = name) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            start, _ = events[name][-1]
            events[name][-1] = (start, ev)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    x0, x1 = (torch.from_numpy(inputs[k]).to(device) for k in ("image0", "image1"))
    totals: dict[str, float] = {}
    whole = []
    with torch.inference_mode():
        for it in range(7):
            for v in events.values():
                v.clear()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph(x0, x1)
            e.record()
            sync(device)
            if it >= 2:
                whole.append(s.elapsed_time(e))
                for k, v in events.items():
                    totals[k] = totals.get(k, 0.0) + sum(a.elapsed_time(b) for a, b in v) / 5
    for h in handles:
        h.remove()
    totals["whole_eager_forward"] = statistics.median(whole)
    return totals


def top_kernels(graph: RomaImageGraph, inputs: dict[str, np.ndarray], device: torch.device,
                n: int = 20) -> list[tuple[str, float, int]]:
    """GPU time per kernel name over one eager forward (torch.profiler): (name, ms, calls), largest first."""
    from torch.profiler import ProfilerActivity, profile

    x0, x1 = (torch.from_numpy(inputs[k]).to(device) for k in ("image0", "image1"))
    with torch.inference_mode():
        graph(x0, x1)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph(x0, x1)
            sync(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t:
            rows.append((str(e.key)[:110], float(t) / 1e3, int(e.count)))
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


@contextlib.contextmanager
def blocking_stream_sync() -> Iterator[None]:
    """Stream.synchronize() through a blocking event (the CPU sleeps instead of spinning): what the torch
    backend's wait would cost in host CPU with that change (core/backends/torch_backend.py, not RoMa's)."""
    original = torch.cuda.Stream.synchronize

    def synchronize(self: torch.cuda.Stream) -> None:
        done = torch.cuda.Event(blocking=True)
        done.record(self)
        done.synchronize()

    torch.cuda.Stream.synchronize = synchronize  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.cuda.Stream.synchronize = original  # type: ignore[method-assign]


# --- main ---------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small CPU check of the script itself")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: parity,e2e,variants")
    args = ap.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "issue_before": ISSUE, "target": TARGET, "errors": [],
        "gp_solver": roma_pipeline.GPU_GP_SOLVER}
    if device.type == "cuda":
        try:
            report["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            report["nvidia_smi"] = f"unavailable: {exc}"

    def save() -> None:
        (out_dir / "roma_e2e.json").write_text(json.dumps(report, indent=1, default=str))

    def section(name: str, fn: Any) -> Any:
        t0 = time.time()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing section must not cost the others' figures
            report["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"[:800],
                                     "trace": traceback.format_exc()[-2000:]})
            print(f"!!! {name} failed: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            print(f"[{name}: {time.time() - t0:.1f} s, total {time.time() - t_start:.0f} s]", flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    roma, dino = seeded_states(ref, meta["weights_seed"])
    print(f"seeded weights: {time.time() - t_start:.1f} s", flush=True)

    gp = section("gp_capture", lambda: gp_capture_check(device))
    report["gp_capture"] = gp
    if device.type == "cuda" and not (gp and gp.get("captured")):
        roma_pipeline.GPU_GP_SOLVER = "newton_schulz"  # capturable for sure: MatMuls only
        report["gp_solver"] = "newton_schulz (Cholesky capture failed)"

    npz: dict[str, dict[str, np.ndarray]] = {}
    for p in meta["pairs"]:
        with np.load(ref / "roma" / f"{p['name']}.npz") as zf:
            npz[p["name"]] = {k: zf[k] for k in zf.files}
    pairs = [p for p in meta["pairs"]]
    if args.quick:
        pairs = [min(meta["pairs"], key=lambda p: p.get("forward_seconds_cpu", 0))]

    report["parity"] = []
    if "parity" not in skip:
        modes = ["fp32"] if device.type == "cpu" else ["fp32", "fp16"]
        for precision in modes:
            for p in pairs if precision == "fp32" else pairs[:2]:
                row = section(f"parity {precision} {p['name']}",
                              lambda p=p, precision=precision: parity(roma, dino, p["name"], p, npz[p["name"]],
                                                                      precision, device))
                if row:
                    report["parity"].append(row)

    ckpt, dino_file, images = weight_files_and_photos(roma, dino, npz)
    report["e2e"] = []
    if "e2e" not in skip:
        runs, warmup = (1, 0) if args.quick else (args.runs, args.warmup)
        modes = ["fp32"] if device.type == "cpu" else ["fp16", "fp32"]
        sizes = (168, 224) if args.quick else (560, 864)
        for precision in modes:
            row = section(f"e2e {precision}", lambda precision=precision: e2e(
                ckpt, dino_file, precision, images, runs, warmup, device, "640x480 photos",  # type: ignore[arg-type]
                sizes))
            if row:
                report["e2e"].append(row)
        if device.type == "cuda":
            def fp16_blocking() -> dict[str, Any]:
                with blocking_stream_sync():
                    return e2e(ckpt, dino_file, "fp16", images, runs, warmup, device,  # type: ignore[arg-type]
                               "640x480, backend waits on a blocking event")
            row = section("e2e fp16 blocking sync", fp16_blocking)
            if row:
                report["e2e"].append(row)
            report["cudnn_benchmark_after_matchers"] = torch.backends.cudnn.benchmark
            other = (npz["pair0_coffee_homography"]["img0_uint8"], npz["pair0_coffee_homography"]["img1_uint8"])
            row = section("e2e fp16 600x400", lambda: e2e(ckpt, dino_file, "fp16", other, max(10, runs // 2), warmup,
                                                          device, "600x400 photos (web-UI resize on the host)"))
            if row:
                report["e2e"].append(row)

    report["variants"] = {}
    if "variants" not in skip and device.type == "cuda" and not args.quick:
        pipe = RomaPipeline({})
        pipe.resize_on_device = True
        inputs, _ = pipe.preprocess(*images)
        solver = roma_pipeline.GPU_GP_SOLVER
        configs: dict[str, dict[str, Any]] = {
            "fp16 speed form, CUDA graph": dict(solver=solver),
            "fp16 speed form, eager": dict(solver=solver, _eager=True),
            "fp16 + cuDNN autotuning": dict(solver=solver, cudnn_benchmark=True),
            "fp16 + channels_last": dict(solver=solver, channels_last=True),
            "fp16 grid_sample correlation": dict(solver=solver, gathered=False),
            "fp16 BatchNorms not folded": dict(solver=solver, fold=False),
            "fp16 Newton-Schulz GP": dict(solver="newton_schulz"),
        }
        for name, cfg in configs.items():
            eager = bool(cfg.pop("_eager", False))

            def run_variant(cfg: dict[str, Any] = cfg, eager: bool = eager) -> dict[str, Any]:
                graph = build_graph(roma, dino, device, **cfg)
                res = time_backend(graph, inputs, device, "fp16", cuda_graphs=not eager)
                del graph
                return res
            res = section(f"variant {name}", run_variant)
            if res:
                report["variants"][name] = res

        def split() -> dict[str, Any]:
            graph = build_graph(roma, dino, device, solver=solver)
            parts = part_split(graph, inputs, device)
            report["fp16_top_kernels_ms"] = top_kernels(graph, inputs, device)
            backend = TorchBackend({"dense": graph}, str(device), "fp16", keep_on_device={"warp", "certainty"})
            pipe_s = RomaPipeline({})
            outs = backend.run("dense", inputs)
            _, meta_s = pipe.preprocess(*images)
            times = []
            for _ in range(12):
                t0 = time.perf_counter()
                pipe_s.postprocess(outs, meta_s)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            parts["postprocess_balanced_sampling"] = statistics.median(times[2:])
            backend.close()
            return parts
        report["fp16_part_split_ms"] = section("fp16 part split", split)

    # --- table ---
    print(f"\nRoMa end to end on {report['device']} ({report.get('nvidia_smi', '')}), torch {report['torch']}, "
          f"{report['when']}; GP solver {report['gp_solver']}; gp check {report.get('gp_capture')}")
    print(f"{'parity':6s} {'pair':30s} {'resize':>8s} {'dino rel':>9s} {'flow':>9s} {'logit':>9s} {'warp':>9s} "
          f"{'cert':>9s} {'cap-eager':>9s}")
    for r in report["parity"]:
        print(f"{r['precision']:6s} {r['pair']:30s} {r['resize_max_dev']:8.1e} {r['dino_rel']:9.2e} "
              f"{r['flow_max']:9.2e} {r['logit_max']:9.2e} {r['final_warp_max']:9.2e} {r['final_cert_max']:9.2e} "
              f"{r['captured_vs_eager_warp']:9.1e}")
    print(f"\n{'e2e':34s} {'median':>7s} {'p90':>7s} {'pre':>6s} {'infer':>6s} {'post':>6s} {'cpu ms':>7s} "
          f"{'peak MB':>8s} {'setup MB':>8s} {'resv MB':>8s} {'matches':>7s}")
    for r in report["e2e"]:
        s = r["stage_median_ms"]
        print(f"{r['precision'] + ' ' + r['label']:34s} {r['median_ms']:7.1f} {r['p90_ms']:7.1f} "
              f"{s['preprocess']:6.1f} {s['inference']:6.1f} {s['postprocess']:6.1f} {r['host_cpu_ms_median']:7.1f} "
              f"{r['peak_mb_timed']:8.0f} {r['peak_mb_setup']:8.0f} {r['max_reserved_mb']:8.0f} "
              f"{r['matches_median']:7.0f}")
    for name, r in report["variants"].items():
        print(f"variant {name:40s} {r['median_ms']:7.1f} ms (min {r['min_ms']:.1f}), peak {r['peak_mb_timed']:.0f} MB")
    for name_, ms, calls in report.get("fp16_top_kernels_ms") or []:
        print(f"  kernel {ms:7.2f} ms {calls:5d}x  {name_}")
    if report.get("fp16_part_split_ms"):
        print("fp16 eager part split (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                        report["fp16_part_split_ms"].items()))
    print(f"targets: {TARGET}; before (issue 13): {ISSUE}")
    for e in report["errors"]:
        print(f"FAILED {e['section']}: {e['error']}\n{e['trace']}")
    report["total_s"] = time.time() - t_start
    save()
    print(f"wrote {out_dir / 'roma_e2e.json'} ({report['total_s']:.0f} s total)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
