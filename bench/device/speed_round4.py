#!/usr/bin/env python3
"""Issue 13, fourth round: RoMa end to end after (1) the balanced sampler replayed as one CUDA graph
(`sampling.DeviceSampler`), (2) the leaner decoder (every scale projected up front, the refiners' input handed
over and each block's input freed before its 1x1 conv), (3) a 2 GiB warm-up bound for the fp32 graph
(`device_graph.FP32_WARMUP_HEADROOM_GIB`; cuDNN's autotuning took 6.8 GB on a process's first fp32 frame).

One device call (seeded weights of the fixtures, the rocket photos at 640x480, `Matcher.match` as
roma_e2e.e2e: wall with a synchronize before the clock stops, host CPU by process_time, peaks by
max_memory_allocated):
* fresh processes, one per fp32 warm-up bound (the default and the backend's 6 GiB): fp32 first, then fp16,
  then fp32 again — the first frame's peak of a process's first fp32 matcher, and of each after another;
* in this process: fp16 with the captured sampler against the eager one, alternating blocks on one matcher;
* the sampler alone: captured vs eager on the same dense output (seeded: the same draws bit for bit;
  unseeded: fresh draws each replay), GPU time by CUDA events and host CPU per call;
* CUDA fp32 and fp16 vs the fixtures (pair 0): the decoder changes must leave every number as it was;
* the top CUDA kernels of the fp16 graph (what is left).
Usage (repo root, GPU machine): python3 bench/device/speed_round4.py --part first|final|check --out DIR
(first: the first call's sections; final: the kernel choices, e2e, parity, top kernels; check: the committed
defaults in a fresh process, the sampler, parity)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the report, its sections and the printing: the third round's (one definition)
from speed_round3 import REPORT, SAVE_TO, guarded, say  # noqa: E402


def row_line(row: dict[str, Any]) -> str:
    return (f"{row['precision']} {row['median_ms']:7.2f} / p90 {row['p90_ms']:7.2f} ms, cpu "
            f"{row['host_cpu_ms_median']:5.2f}, peak first {row['peak_mb_setup']:6.0f} MB, timed "
            f"{row['peak_mb_timed']:6.0f} MB, split {({k: round(v, 2) for k, v in row['stage_median_ms'].items()})}, "
            f"{row['matches_median']} matches")


def apply_choices() -> None:
    """The kernel settings the final part's micro-benchmarks chose (R4_CHOICES, JSON), in a child too."""
    from matchanything_ros.core.roma import refiner_kernel, sampling

    for name, value in json.loads(os.environ.get("R4_CHOICES", "{}")).items():
        module = sampling if name.startswith("KDE") else refiner_kernel
        setattr(module, name, value)


# --- a fresh process: fp32, fp16, fp32 -------------------------------------------------------------------

def child(files: Path, out: Path) -> int:
    import roma_e2e

    import matchanything_ros.core.roma.device_graph as dg

    headroom = os.environ.get("R4_HEADROOM", "")
    if headroom:
        dg.FP32_WARMUP_HEADROOM_GIB = float(headroom)
    apply_choices()
    images = (np.load(files / "image0.npy"), np.load(files / "image1.npy"))
    dev = torch.device("cuda")
    rows = []
    for prec in ("fp32", "fp16", "fp32"):
        row = roma_e2e.e2e(files / "matchanything_roma.ckpt", files / "dinov2_vitl14_pretrain.pth", prec, images,
                           10, 3, dev, f"fresh process, fp32 warm-up bound {dg.FP32_WARMUP_HEADROOM_GIB} GiB")
        rows.append(row)
        say("  " + row_line(row))
        out.write_text(json.dumps(rows, indent=1, default=str))
    return 0


def fresh_processes(files: Path, bounds: tuple[str, ...] = ("", "6")) -> list[dict[str, Any]]:
    runs = []
    for headroom in bounds:
        target = files / f"child_{headroom or 'default'}.json"
        env = dict(os.environ, R4_HEADROOM=headroom)
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", str(files), "--out", str(target)], env=env,
                              capture_output=True, text=True, timeout=240)
        say(proc.stdout[-3000:] + proc.stderr[-3000:])
        rows = json.loads(target.read_text()) if target.is_file() else []
        runs.append({"fp32_warmup_bound": headroom or "default", "rc": proc.returncode, "rows": rows,
                     "seconds": time.time() - t, "stderr_tail": proc.stderr[-1500:]})
    return runs


# --- this process --------------------------------------------------------------------------------------

def timed_blocks(matcher: Any, images: tuple[np.ndarray, ...], dev: torch.device) -> dict[str, Any]:
    """fp16, one matcher, the captured sampler vs the eager one in alternating blocks of 15."""
    import matchanything_ros.core.roma.sampling as sampling

    for _ in range(3):
        matcher.match(*images)
    out: dict[str, Any] = {}
    for block in range(4):
        captured = block % 2 == 0
        sampling.CAPTURE_DEVICE_SAMPLER = captured
        matcher.match(*images)  # the first of a block may capture
        wall, cpu, stages = [], [], []
        for _ in range(15):
            torch.cuda.synchronize(dev)
            c0, w0 = time.process_time(), time.perf_counter()
            r = matcher.match(*images)
            torch.cuda.synchronize(dev)
            wall.append((time.perf_counter() - w0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            stages.append(r.timings_ms)
        key = "captured" if captured else "eager"
        entry = out.setdefault(key, {"wall": [], "cpu": [], "postprocess": [], "inference": []})
        entry["wall"] += wall
        entry["cpu"] += cpu
        entry["postprocess"] += [s["postprocess"] for s in stages]
        entry["inference"] += [s["inference"] for s in stages]
    sampling.CAPTURE_DEVICE_SAMPLER = True
    summary = {}
    for key, e in out.items():
        summary[key] = {k: statistics.median(v) for k, v in e.items()}
        summary[key]["wall_p90"] = float(np.percentile(e["wall"], 90))
        say(f"  sampler {key:9s}: wall {summary[key]['wall']:6.2f} (p90 {summary[key]['wall_p90']:6.2f}) ms, "
            f"cpu {summary[key]['cpu']:5.2f}, inference {summary[key]['inference']:6.2f}, "
            f"postprocess {summary[key]['postprocess']:5.2f}")
    return summary


def sampler_alone(matcher: Any, images: tuple[np.ndarray, ...], dev: torch.device) -> dict[str, Any]:
    from matchanything_ros.core.roma.sampling import DeviceSampler, balanced_sample, seeded_generator

    pipe, backend = matcher.pipeline, matcher.backend
    inputs, meta = pipe.preprocess(*images)
    outs = pipe.infer(backend, inputs, meta)
    warp = outs["warp"].float().reshape(-1, 4).clone()
    cert = outs["certainty"].float().reshape(-1).clone()
    res: dict[str, Any] = {"cells": int(warp.shape[0])}
    sampler = DeviceSampler()
    a = sampler(warp, cert, 5000, 7)
    b = balanced_sample(warp, cert, 5000, seeded_generator(7, dev))
    res["seeded_same_as_eager"] = {k: bool(np.array_equal(getattr(a, k), getattr(b, k)))
                                   for k in ("matches", "confidence", "stage1_index", "stage2_index", "density")}
    u1, u2 = sampler(warp, cert, 5000, -1), sampler(warp, cert, 5000, -1)
    res["unseeded_replays_differ"] = not np.array_equal(u1.stage1_index, u2.stage1_index)
    res["unseeded_mean_conf"] = [float(u1.confidence.mean()), float(b.confidence.mean())]

    def timing(fn: Callable[[], Any]) -> dict[str, float]:
        for _ in range(3):
            fn()
        walls, cpus = [], []
        for _ in range(20):
            torch.cuda.synchronize(dev)
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            walls.append((time.perf_counter() - w0) * 1e3)
            cpus.append((time.process_time() - c0) * 1e3)
        return {"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus)}

    res["captured_unseeded"] = timing(lambda: sampler(warp, cert, 5000, -1))
    res["eager_unseeded"] = timing(lambda: balanced_sample(warp, cert, 5000, None))
    res["captured_seeded"] = timing(lambda: sampler(warp, cert, 5000, 7))
    # the parts of the eager form on the GPU (CUDA events)
    from matchanything_ros.core.roma.sampling import (_device_kde, _stage2_weights, draw_counts, race_noise,
                                                      thresholded_weights)
    n1, n2 = draw_counts(warp.shape[0], 5000)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
    parts: dict[str, list[float]] = {k: [] for k in ("noise", "stage1_topk", "kde", "stage2_topk", "gather")}
    for _ in range(10):
        ev[0].record()
        q1, q2 = race_noise(warp.shape[0], n1, None, dev)
        ev[1].record()
        c = thresholded_weights(cert)
        idx1 = torch.topk(c / q1, n1).indices
        ev[2].record()
        m1 = warp[idx1]
        d = _device_kde(m1)
        ev[3].record()
        idx2 = torch.topk(_stage2_weights(d) / q2, n2).indices
        ev[4].record()
        _ = (m1[idx2], c[idx1][idx2])
        ev[5].record()
        torch.cuda.synchronize(dev)
        for i, k in enumerate(parts):
            parts[k].append(ev[i].elapsed_time(ev[i + 1]))
    res["eager_gpu_parts_ms"] = {k: statistics.median(v) for k, v in parts.items()}
    say(f"  {res}")
    return res


def top_kernels(roma_sd: Any, dino: Any, images: Any, dev: torch.device) -> None:
    """The GPU time per kernel of one eager fp16 forward (what is left)."""
    import roma_e2e

    import matchanything_ros.core.roma.pipeline as rp
    pipe = rp.RomaPipeline({})

    def top() -> list[Any]:
        graph = pipe.torch_graphs(roma_sd, "cuda", dinov2_state=dino, precision="fp16")["dense"]
        inputs, _ = pipe.preprocess(*images)
        return roma_e2e.top_kernels(graph, inputs, dev, n=25)  # type: ignore[arg-type]
    for r in guarded("top_kernels fp16", top) or []:
        say(f"  {r}")


# --- the final part ----------------------------------------------------------------------------------------

def cuda_ms(fn: Callable[[], Any], reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def window_dots_micro(dev: torch.device) -> dict[str, Any]:
    """The refiners' local correlation at the default sizes (pass 1 s16/s8/s4 at 560, pass 2 s8/s4 at 864):
    gathered windows vs window_dots per tile size, fp16 and fp32, GPU ms and max |delta|."""
    from matchanything_ros.core.roma import refiner_kernel
    from matchanything_ros.core.roma.model import local_correlation_gathered

    shapes = [("p1 s16", 512, 40, 7), ("p1 s8", 512, 70, 3), ("p1 s4", 256, 140, 2), ("p2 s8", 512, 108, 3),
              ("p2 s4", 256, 216, 2)]
    res: dict[str, Any] = {"rows": []}
    totals: dict[str, float] = {}
    for dtype in (torch.float16, torch.float32):
        for name, c, side, r in shapes:
            g = torch.Generator(device=dev).manual_seed(side)
            f1 = torch.randn(2, c, side, side, device=dev, generator=g).to(dtype)
            f2 = torch.randn(2, c, side, side, device=dev, generator=g).to(dtype)
            flow = torch.rand(2, 2, side, side, device=dev, generator=g) * 2.2 - 1.1
            with torch.inference_mode():
                ref = local_correlation_gathered(f1, f2, flow, r, fused=False)
                row: dict[str, Any] = {"shape": name, "dtype": str(dtype),
                                       "gathered_ms": cuda_ms(lambda: local_correlation_gathered(f1, f2, flow, r,
                                                                                                 fused=False))}
                totals[f"{dtype} gathered"] = totals.get(f"{dtype} gathered", 0.0) + row["gathered_ms"]
                for tile in (4096, 8192, 16384):
                    refiner_kernel.WINDOW_DOTS_TILE = tile
                    got = local_correlation_gathered(f1, f2, flow, r, fused=True)
                    row[f"fused_{tile}_ms"] = cuda_ms(lambda: local_correlation_gathered(f1, f2, flow, r, fused=True))
                    row[f"fused_{tile}_max_delta"] = float((got - ref).abs().max())
                    totals[f"{dtype} {tile}"] = totals.get(f"{dtype} {tile}", 0.0) + row[f"fused_{tile}_ms"]
                row["scale"] = float(ref.abs().max())
            res["rows"].append(row)
            say(f"  {row}")
    res["totals_ms"] = totals
    best = min((4096, 8192, 16384), key=lambda t: totals[f"torch.float16 {t}"] + totals[f"torch.float32 {t}"])
    res["chosen_tile"] = best
    refiner_kernel.WINDOW_DOTS_TILE = 8192
    say(f"  totals {totals}, chosen tile {best}")
    return res


def kde_micro(dev: torch.device) -> dict[str, Any]:
    from matchanything_ros.core.roma import sampling

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(20000, 4, device=dev, generator=g) * 2 - 1
    x[:8000] = x[:8000] * 0.05  # a dense cluster, as real matches
    exact = sampling.kde_density(x.double()).float()
    res: dict[str, Any] = {}
    for block in (16, 32, 64, 128):
        sampling.KDE_BLOCK_I = block
        got = sampling.kde_density_triton(x)
        res[block] = {"ms": cuda_ms(lambda: sampling.kde_density_triton(x)),
                      "max_rel": float(((got - exact).abs() / exact).max())}
    res["chosen"] = min((16, 32, 64, 128), key=lambda b: res[b]["ms"])
    sampling.KDE_BLOCK_I = 64
    say(f"  {res}")
    return res


def final(files: Path, roma_sd: Any, dino: Any, meta: Any, npz: Any, images: Any, dev: torch.device) -> int:
    import roma_e2e

    from matchanything_ros.core.roma import refiner_kernel

    wd = guarded("window_dots_micro", lambda: window_dots_micro(dev)) or {}
    kd = guarded("kde_micro", lambda: kde_micro(dev)) or {}
    choices = {"WINDOW_DOTS_TILE": wd.get("chosen_tile", 8192), "KDE_BLOCK_I": kd.get("chosen", 64)}
    REPORT["choices"] = choices
    os.environ["R4_CHOICES"] = json.dumps(choices)
    apply_choices()
    guarded("fresh_processes", lambda: fresh_processes(files, ("",)))
    ckpt, dino_file = files / "matchanything_roma.ckpt", files / "dinov2_vitl14_pretrain.pth"
    rows = []
    for fused in (True, False, True):
        refiner_kernel.FUSED_WINDOW_DOTS = fused
        row = guarded(f"e2e fp16 window_dots={fused}", lambda fused=fused: roma_e2e.e2e(
            ckpt, dino_file, "fp16", images, 20, 3, dev, f"window_dots={fused}"))
        if row:
            rows.append(row)
            say("  " + row_line(row))
    refiner_kernel.FUSED_WINDOW_DOTS = True
    parity(roma_sd, dino, meta["pairs"], meta["pairs"][:1], npz, dev)
    top_kernels(roma_sd, dino, images, dev)
    SAVE_TO[0].write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    return 1 if REPORT["errors"] else 0


def parity(roma_sd: Any, dino: Any, fp32_pairs: list[dict[str, Any]], fp16_pairs: list[dict[str, Any]],
           npz: dict[str, dict[str, np.ndarray]], dev: torch.device) -> None:
    """CUDA fp32 and fp16 vs the fixtures (roma_e2e.parity), one section per precision and pair."""
    import roma_e2e
    from roma_gpu import reference_dir

    for prec, pairs in (("fp32", fp32_pairs), ("fp16", fp16_pairs)):
        for p in pairs:
            if p["name"] not in npz:
                with np.load(reference_dir() / "roma" / f"{p['name']}.npz") as zf:
                    npz[p["name"]] = {k: zf[k] for k in zf.files}
            row = guarded(f"parity {prec} {p['name']}", lambda prec=prec, p=p: roma_e2e.parity(
                roma_sd, dino, p["name"], p, npz[p["name"]], prec, dev))
            if row:
                say(f"  {row}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", default="")
    ap.add_argument("--part", choices=("first", "final", "check"), default="first")
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)  # fallbacks say so
    if args.child:
        return child(Path(args.child), Path(args.out))

    import roma_e2e
    from roma_gpu import reference_dir, seeded_states

    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    REPORT["environment"] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    say(str(REPORT["environment"]))
    SAVE_TO.append(out / f"round4_{args.part}.json")
    dev = torch.device("cuda")
    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    roma_sd, dino = seeded_states(ref, meta["weights_seed"])
    npz: dict[str, dict[str, np.ndarray]] = {}
    for p in meta["pairs"][:2]:
        with np.load(ref / "roma" / f"{p['name']}.npz") as zf:
            npz[p["name"]] = {k: zf[k] for k in zf.files}
    ckpt, dino_file, images = roma_e2e.weight_files_and_photos(roma_sd, dino, npz)
    files = ckpt.parent
    np.save(files / "image0.npy", images[0])
    np.save(files / "image1.npy", images[1])

    if args.part == "final":
        return final(files, roma_sd, dino, meta, npz, images, dev)
    if args.part == "check":  # the committed defaults as they are: a fresh process, the sampler, parity
        guarded("fresh_processes", lambda: fresh_processes(files, ("",)))
        with Matcher(MatcherConfig(variant="roma", checkpoint_path=str(ckpt), dinov2_path=str(dino_file),
                                   backend="torch", device="cuda", precision="fp16")) as matcher:
            guarded("sampler_alone", lambda: sampler_alone(matcher, images, dev))
        parity(roma_sd, dino, meta["pairs"][:2], meta["pairs"][:1], npz, dev)
        SAVE_TO[0].write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
        return 1 if REPORT["errors"] else 0
    guarded("fresh_processes", lambda: fresh_processes(files))

    matcher = Matcher(MatcherConfig(variant="roma", checkpoint_path=str(ckpt), dinov2_path=str(dino_file),
                                    backend="torch", device="cuda", precision="fp16"))
    guarded("fp16_sampler_blocks", lambda m=matcher: timed_blocks(m, images, dev))
    guarded("sampler_alone", lambda m=matcher: sampler_alone(m, images, dev))
    matcher.close()

    parity(roma_sd, dino, meta["pairs"][:1], meta["pairs"][:1], npz, dev)

    top_kernels(roma_sd, dino, images, dev)
    SAVE_TO[0].write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    return 1 if REPORT["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
