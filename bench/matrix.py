#!/usr/bin/env python3
"""The benchmark matrix: `Matcher.match` end to end, from uint8 camera images to original-pixel matches.

Every cell: sizes x thresholds x precisions x models, one matcher per (model, precision, size) whose threshold
changes in place (`Matcher.update`, as the node does), median / p90 wall ms of --runs after warm-up, the stage
split, host CPU ms per pair (process_time), peak GPU memory, matches, whether the cap was reached. Each
(model, precision) runs in a process of its own (a fresh compile cache, as a node has). Also, per model:
twelve thresholds by twelve new matchers in one process (a rebuild must keep the first one's speed, with no
fall-back to eager code), the device stage 1 against this machine's host (bit for bit), and fp16 against fp32
(share of fp32's matches with an fp16 match within 1 px).

Inputs: real photos (the bundled demo pair, a planar scene under a homography) resized to each camera size.
Models: `demo` (the bundled model), `full` (the released ELoFTR's architecture, seeded weights of the
fixtures), `roma` (seeded weights; its threshold is not used: one row per size).

Usage (repo root, GPU machine):  python3 bench/matrix.py --out DIR [--models demo,full,roma] [--runs 10]
On the CPU it runs too (--device cpu, small --sizes): the same code path the tests take.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "test" / "fixtures" / "reference"
SIZES = ["640x480", "848x480", "832x832", "1024x768", "1280x720", "1920x1080"]
THRESHOLDS = [0.1, 0.2, 0.05, 0.01]  # the default first: the matcher is built for it, the rest come in place


def seeded(manifest: Path, seed: int) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("seeded_weights", FIXTURES / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.seeded_state_dict(manifest, seed)


def model_config(model: str, tmp: Path) -> dict[str, Any]:
    """MatcherConfig fields for a model (weights written to tmp as a user's files)."""
    import torch

    if model == "demo":
        return {"variant": "eloftr"}
    if model == "full":
        index = json.loads((FIXTURES / "eloftr" / "index.json").read_text())
        torch.save({"state_dict": seeded(FIXTURES / "eloftr" / "manifest.json", index["seed"])}, tmp / "full.ckpt")
        return {"variant": "eloftr", "checkpoint_path": str(tmp / "full.ckpt")}
    seed = json.loads((FIXTURES / "roma" / "fixtures_meta.json").read_text())["weights_seed"]
    torch.save({"state_dict": seeded(FIXTURES / "roma" / "manifest.json", seed)}, tmp / "roma.ckpt")
    torch.save(seeded(FIXTURES / "roma" / "dinov2_manifest.json", seed), tmp / "dinov2.pth")
    return {"variant": "roma", "checkpoint_path": str(tmp / "roma.ckpt"), "dinov2_path": str(tmp / "dinov2.pth")}


def camera_pair(size: str) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    w, h = (int(v) for v in size.split("x"))
    with np.load(REPO / "matchanything_ros" / "data" / "demo_homography.npz") as z:
        return tuple(np.ascontiguousarray(cv2.resize(z[k], (w, h), interpolation=cv2.INTER_CUBIC))
                     for k in ("image0", "image1"))  # type: ignore[return-value]


def timed(matcher: Any, pair: tuple[np.ndarray, np.ndarray], runs: int, warmup: int) -> dict[str, Any]:
    import torch

    cuda = str(matcher.backend.device).startswith("cuda")
    for _ in range(warmup):
        matcher.match(*pair)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    walls, cpus, stages, out = [], [], [], None
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        out = matcher.match(*pair)
        if cuda:
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
        stages.append(out.timings_ms)
    assert out is not None
    walls.sort()
    return {"median_ms": statistics.median(walls), "p90_ms": walls[int(0.9 * (len(walls) - 1))],
            "host_cpu_ms": statistics.median(cpus), "matches": len(out),
            "capped": bool(out.extras.get("matches_capped", False)),
            "stages_ms": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "canvas": out.extras.get("canvas0"), "_kp": (out.keypoints0, out.keypoints1)}


def worker(args: argparse.Namespace, model: str, precision: str) -> dict[str, Any]:
    """One (model, precision) in this process: every size x threshold, then the rebuild and stage-1 checks."""
    import torch

    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    tmp = Path(tempfile.mkdtemp(prefix="matrix_"))
    base = {**model_config(model, tmp), "device": args.device, "backend": "torch", "precision": precision}
    if args.option:  # another form of the variant (e.g. a default switched off, for a before/after in one call)
        base["options"] = variant_options(base["variant"], args.option)
    cells, keypoints, report = [], {}, {"model": model, "precision": precision}
    thresholds = THRESHOLDS if model != "roma" else [0.1]
    for size in args.sizes:
        pair = camera_pair(size)
        try:
            t0 = time.perf_counter()
            matcher = Matcher(MatcherConfig(**base, threshold=thresholds[0]))
            first = time.perf_counter()
            matcher.match(*pair)
            first_frame_s = time.perf_counter() - first
            # every threshold, then the default one with geometric verification (its `verify` stage: the pair is a
            # planar scene, so a homography)
            for thr, geometry in [(t, "none") for t in thresholds] + [(0.1, "homography")]:
                config = MatcherConfig(**base, threshold=thr, geometry=geometry)
                in_place = matcher.update(config)
                if not in_place:  # the CPU's host path across 1/(K+1): another coarse graph
                    matcher.close()
                    matcher = Matcher(config)
                cell = timed(matcher, pair, args.runs, args.warmup)
                cell["in_place"] = in_place
                kp = cell.pop("_kp")
                if thr == 0.1 and geometry == "none":
                    keypoints[size] = kp
                cells.append({"size": size, "threshold": thr, "geometry": geometry, **cell, "build_s": first - t0,
                              "first_frame_s": first_frame_s,
                              "compile_fallbacks": matcher.info.get("compile_fallbacks", "")})
                print(f"{model:5s}{args.tag} {precision} {size:>9s} thr {thr:<5}{' H' if geometry != 'none' else ''} "
                      f"{cell['median_ms']:8.2f} ms (verify {cell['stages_ms'].get('verify', 0):.2f}) "
                      f"(p90 {cell['p90_ms']:.2f}, cpu {cell['host_cpu_ms']:.2f}, pre "
                      f"{cell['stages_ms']['preprocess']:.2f}) {cell['matches']:6d} matches"
                      f"{' CAPPED' if cell['capped'] else ''} peak {cell['peak_mib'] or 0:.0f} MiB", flush=True)
            matcher.close()
        except Exception as exc:  # noqa: BLE001  (one size's failure is a result; the others still run)
            cells.append({"size": size, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
            print(f"{model} {precision} {size}: FAILED {exc}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report["cells"] = cells
    np.savez(Path(args.out) / f"kp_{model}_{precision}{args.tag}.npz",
             **{f"{s}_{i}": k for s, kk in keypoints.items() for i, k in enumerate(kk)})
    if model != "roma" and args.rebuilds:
        report["rebuilds"] = rebuilds(base, args)
        if args.device == "cuda":
            report["stage1_vs_host"] = stage1_vs_host(args.sizes)
    return report


def variant_options(variant: str, items: list[str]) -> Any:
    """--option NAME=VALUE items -> the variant's options object, each value read as its field's default's type
    (true/false for switches); a name the options do not have stops the run."""
    from matchanything_ros.core.matcher import options_type

    cls = options_type(variant)
    defaults, fields = cls(), {}
    for item in items:
        name, _, text = item.partition("=")
        if not hasattr(defaults, name):
            raise SystemExit(f"--option {item}: {cls.__name__} has no field {name!r}")
        kind = type(getattr(defaults, name))
        fields[name] = text.lower() in ("true", "1") if kind is bool else kind(text)
    return cls(**fields)


def rebuilds(base: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Twelve thresholds, each by a new matcher (a node reconfigured by something that is not live), 832²."""
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    pair, rows = camera_pair("832x832"), []
    for k in range(12):
        thr = round(0.2 - 0.015 * k, 3)
        with Matcher(MatcherConfig(**base, threshold=thr)) as matcher:
            cell = timed(matcher, pair, args.runs, args.warmup)
            rows.append({"threshold": thr, "median_ms": cell["median_ms"], "matches": cell["matches"],
                         "compile_fallbacks": matcher.info.get("compile_fallbacks", "")})
        print(f"rebuild {k + 1:2d} thr {thr}: {rows[-1]['median_ms']:.2f} ms {rows[-1]['matches']} matches "
              f"{rows[-1]['compile_fallbacks'] or 'compiled'}", flush=True)
    return rows


def stage1_vs_host(sizes: list[str]) -> dict[str, int]:
    """Stage-2 values where the device's stage 1 differs from this machine's host (`stage2_rgb`)."""
    import torch

    from matchanything_ros.core.checkpoint import load_state_dict
    from matchanything_ros.core.eloftr.product import EloftrProduct
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.eloftr.preprocess import PreprocessSettings, plan_stage1, stage2_rgb
    from matchanything_ros.core.matcher import resolve_eloftr_checkpoint

    path, cfg, _ = resolve_eloftr_checkpoint("")
    net = EloftrPipeline({}, cfg).build_net(load_state_dict(str(path), "eloftr")).cuda()
    out = {}
    for settings in (PreprocessSettings(), PreprocessSettings(resize_max=640)):
        module = EloftrProduct(net, 0.1, 100, stage1=settings)
        for size in sizes:
            image = camera_pair(size)[0]
            if not plan_stage1(image.shape[1], image.shape[0], settings).device:
                continue
            got = module.stage1_rgb(torch.from_numpy(image).cuda()).cpu().numpy()
            ref = stage2_rgb(image, settings)[0]
            out[f"{size}@{settings.resize_max}"] = int((got != ref).sum()) if got.shape == ref.shape else -1
    print("device stage 1 vs host, differing values:", out, flush=True)
    return out


def fp16_agreement(out: Path, model: str) -> dict[str, float]:
    """Share of fp32's matches (threshold 0.1) that fp16 has within 1 px, per size."""
    try:
        a, b = np.load(out / f"kp_{model}_fp32.npz"), np.load(out / f"kp_{model}_fp16.npz")
    except OSError:
        return {}
    from scipy.spatial import cKDTree

    res = {}
    for size in sorted({k.rsplit("_", 1)[0] for k in a.files}):
        ref = np.concatenate([a[f"{size}_0"], a[f"{size}_1"]], 1)
        got = np.concatenate([b[f"{size}_0"], b[f"{size}_1"]], 1)
        if len(ref) and len(got):
            d, _ = cKDTree(got).query(ref)
            res[size] = float(np.mean(d <= 1.0))  # both keypoints within 1 px (4-D distance <= 1 is stricter)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="demo,full,roma")
    p.add_argument("--precisions", default="fp16,fp32")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--option", action="append", default=[],
                   help="NAME=VALUE of the variant's options (EloftrOptions / RomaOptions), repeatable")
    p.add_argument("--no-rebuilds", dest="rebuilds", action="store_false",
                   help="skip the twelve-matchers check (it times the network twelve more times)")
    p.add_argument("--tag", default="", help="suffix of the result files (a form beside the defaults)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # MODEL:PRECISION, run in this process
    args = p.parse_args()
    args.sizes = args.sizes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        model, precision = args.worker.split(":")
        report = worker(args, model, precision)
        report["options"] = args.option
        (out / f"cells_{model}_{precision}{args.tag}.json").write_text(json.dumps(report, indent=1))
        return 0
    reports, failed = [], 0
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--worker", f"{model}:{precision}", "--out", str(out), "--runs",
                   str(args.runs), "--warmup", str(args.warmup), "--device", args.device, "--sizes",
                   ",".join(args.sizes), "--tag", args.tag, *[f"--option={o}" for o in args.option],
                   *([] if args.rebuilds else ["--no-rebuilds"])]
            rc = subprocess.run(cmd).returncode
            path = out / f"cells_{model}_{precision}{args.tag}.json"
            failed += rc != 0
            reports.append(json.loads(path.read_text()) if path.exists() else {"model": model, "precision": precision,
                                                                                "error": f"exit {rc}"})
        reports.append({"model": model, "fp16_within_1px_of_fp32": fp16_agreement(out, model)})
    device = "cpu"
    if args.device == "cuda":
        device = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / f"matrix{args.tag}.json").write_text(json.dumps({"device": device, "date": stamp, "reports": reports},
                                                           indent=1))
    print(json.dumps([r for r in reports if "fp16_within_1px_of_fp32" in r]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
