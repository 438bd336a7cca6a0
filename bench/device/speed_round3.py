#!/usr/bin/env python3
"""Issues 12 and 13, third round: ELoFTR end to end with where its wall time goes, RoMa's refiner forms — one
device call per part, each variant against the default in the same process.

ELoFTR (`--part eloftr`, seeded weights of the fixtures, real photos, `Matcher.match` as eloftr_e2e.time_matcher;
sections chosen by ROUND3_ELOFTR, default all):
* timing: the issue's rows (832² / 640x480 fp16 and fp32, the demo model at 832² fp16);
* timeline: host stamps and CUDA events around preprocessing, the pinned upload, front and back replays and
  the wait, per frame: how much of the wall time the GPU is busy;
* buckets: the back half on the previous frame's row bucket (TorchBackend.predict_rows) vs waiting for the
  count, over frames whose bucket changes (demo model, a textured and a blank pair): the same lists;
* parity: CUDA fp32 vs the original's fixture outputs; fp16: the fp16 promise on held-out pairs (--pairs);
* trace: a torch.profiler Chrome trace of 5 frames at 832² fp16 (host and device rows), read offline;
* memory: first-match and steady peaks, fp16 and fp32 matchers in both orders (run it in a fresh process:
  earlier sections leave allocations behind).
RoMa (`--part roma`, seeded weights, two 640x480 photos, roma_e2e.e2e): the refiner forms end to end in fp16 and
fp32 (wall, host CPU, peaks), CUDA fp32 and fp16 vs the fixtures (roma_e2e.parity), the top CUDA kernels of the
fastest fp16 form.
Usage (repo root, GPU machine): python3 bench/device/speed_round3.py --part eloftr|roma --out DIR [--pairs NPZ]
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPORT: dict[str, Any] = {"errors": []}
T0 = time.time()
SAVE_TO: list[Path] = []  # the JSON report, rewritten after every section (a timeout keeps what was measured)


def say(msg: str) -> None:
    print(msg, flush=True)


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    t = time.time()
    say(f"--- {name}")
    try:
        REPORT[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one failing section must not cost the others' figures
        REPORT["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"[:800],
                                 "trace": traceback.format_exc()[-3000:]})
        say(f"!!! {name} failed\n{traceback.format_exc()}")
    say(f"[{name}: {time.time() - t:.1f} s, total {time.time() - T0:.0f} s]")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for path in SAVE_TO:
        path.write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    return REPORT.get(name)


# --- ELoFTR ---------------------------------------------------------------------------------------------

def eloftr(out: Path, pairs_path: str) -> None:
    import eloftr_e2e as e2e
    import eloftr_speed
    from eloftr_e2e import matcher, time_matcher

    from matchanything_ros.core.backends.torch_backend import TorchBackend, graph_input_names, numeric_flags
    from matchanything_ros.core.images import to_rgb_u8

    torch._dynamo.config.recompile_limit = 256  # many matchers in one process (eloftr_speed.py says why)
    ref, index, ckpt, photos, demo, held = e2e.load_inputs(pairs_path)
    p832, p640, d832 = e2e.row_pairs(photos, demo)
    plan = [("832x832 robot fp16", p832, str(ckpt), "fp16", "robot"),
            ("640x480 hf_space fp16", p640, str(ckpt), "fp16", "hf_space"),
            ("demo model 832x832 fp16", d832, "", "fp16", "robot"),
            ("832x832 robot fp32", p832, str(ckpt), "fp32", "robot"),
            ("640x480 hf_space fp32", p640, str(ckpt), "fp32", "hf_space")]

    def timing() -> list[dict[str, Any]]:
        rows = []
        for row, pairs, path, prec, preset in plan:
            with matcher(path, prec, preset) as m:
                r = time_matcher(m, pairs)
                first = m.match(*pairs[0])
            r.update(row=row, first_pair_matches=len(first),
                     first_pair_keypoints_sum=float(first.keypoints0.sum() + first.keypoints1.sum()))
            rows.append(r)
            say(f"{row:26s} {r['median_ms']:7.2f} / p90 {r['p90_ms']:7.2f} ms, cpu {r['host_cpu_ms_median']:5.2f} ms, "
                f"peak {r['peak_gpu_mb']:6.0f} MB, {r['matches_median']} matches, stages {r['stages_median_ms']}")
        return rows

    def bucket_changes() -> dict[str, Any]:
        """Frames whose row bucket differs from the previous frame's: same lists as the waiting form."""
        textured = d832[0]
        blank = (np.full_like(textured[0], 90), np.full_like(textured[1], 170))
        seq = [textured, blank, textured, textured, blank, blank, textured]
        lists: dict[bool, list[tuple[int, float]]] = {}
        for predict in (False, True):
            TorchBackend.predict_rows = predict
            with matcher("", "fp16", "robot") as m:
                res = [m.match(*p) for p in seq]
            lists[predict] = [(len(r), float(np.abs(r.keypoints0).sum() + np.abs(r.keypoints1).sum())) for r in res]
        TorchBackend.predict_rows = True
        return {"wait": lists[False], "predict": lists[True], "same": lists[False] == lists[True]}

    def timeline() -> dict[str, Any]:
        result = {}
        for row, pairs, path, prec, preset in plan[:3]:
            with matcher(path, prec, preset) as m:
                be, pipe = m.backend, m.pipeline
                module = be.graphs["product"]
                names = graph_input_names(module)
                for _ in range(3):
                    m.match(*pairs[0])
                torch.cuda.synchronize()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                recs = []
                for k in range(30):
                    a, b = pairs[k % len(pairs)]
                    t0 = time.perf_counter()
                    inputs, meta = pipe.preprocess(to_rgb_u8(a), to_rgb_u8(b))
                    t1 = time.perf_counter()
                    with numeric_flags("cuda", be.precision), torch.inference_mode():
                        front, static, rb = be._entry("product", module, names, inputs, None)
                        with torch.cuda.stream(be.stream):
                            ev[0].record()
                            be._upload("product", static, names, inputs)
                            ev[1].record()
                            t2 = time.perf_counter()
                            front.replay()
                            ev[2].record()
                            t3 = time.perf_counter()
                            host = be._replay_back(rb, rb.rows)
                            ev[3].record()
                            t4 = time.perf_counter()
                        be._done.synchronize()
                        t5 = time.perf_counter()
                        matches = host.numpy().copy()
                    t6 = time.perf_counter()
                    del matches
                    recs.append({"preprocess": (t1 - t0) * 1e3, "upload_host": (t2 - t1) * 1e3,
                                 "front_launch": (t3 - t2) * 1e3, "back_launch": (t4 - t3) * 1e3,
                                 "wait": (t5 - t4) * 1e3, "copy_out": (t6 - t5) * 1e3, "wall": (t6 - t0) * 1e3,
                                 "gpu_upload": ev[0].elapsed_time(ev[1]), "gpu_front": ev[1].elapsed_time(ev[2]),
                                 "gpu_back": ev[2].elapsed_time(ev[3]), "gpu_total": ev[0].elapsed_time(ev[3])})
                med = {k: round(statistics.median(r[k] for r in recs), 3) for k in recs[0]}
                med["rows_bucket"] = rb.rows
                result[row] = med
                say(f"{row}: {med}")
        return result

    def trace() -> str:
        from torch.profiler import ProfilerActivity, profile

        a, b = p832[0]
        with matcher(str(ckpt), "fp16", "robot") as m:
            for _ in range(3):
                m.match(a, b)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    with torch.profiler.record_function("Matcher.match"):
                        m.match(a, b)
                torch.cuda.synchronize()
        raw = Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(out / "eloftr_832_fp16_trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        return "eloftr_832_fp16_trace.json.gz"

    def parity() -> Any:
        e2e.REPORT.clear()
        e2e.parity(str(ckpt), index, ref, heads=(eloftr_speed.DEFAULTS["head"],))  # CUDA fp32 vs the fixtures
        eloftr_speed.configure()  # e2e's configure() leaves its own defaults behind
        return e2e.REPORT.get("parity")

    def fp16() -> Any:
        e2e.REPORT.clear()
        eloftr_speed.fp16_promise(held)
        return e2e.REPORT.get("fp16")

    def memory() -> Any:
        e2e.REPORT.clear()
        e2e.memory(str(ckpt), photos)
        return e2e.REPORT.get("memory")

    sections = os.environ.get("ROUND3_ELOFTR", "timing,timeline,buckets,parity,fp16,trace,memory").split(",")
    for name, fn in (("timing", timing), ("timeline", timeline), ("buckets", bucket_changes),
                     ("parity", parity), ("fp16", fp16), ("trace", trace), ("memory", memory)):
        if name in sections and (name != "fp16" or held):
            guarded(f"eloftr_{name}", fn)


# --- RoMa -----------------------------------------------------------------------------------------------

def roma(out: Path) -> None:
    import roma_e2e
    from roma_gpu import reference_dir, seeded_states

    import matchanything_ros.core.roma.pipeline as rp

    dev = torch.device("cuda")

    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    roma_sd, dino = seeded_states(ref, meta["weights_seed"])
    npz: dict[str, dict[str, np.ndarray]] = {}
    for p in meta["pairs"]:
        with np.load(ref / "roma" / f"{p['name']}.npz") as zf:
            npz[p["name"]] = {k: zf[k] for k in zf.files}
    ckpt, dino_file, images = roma_e2e.weight_files_and_photos(roma_sd, dino, npz)
    defaults = {k: getattr(rp, k) for k in ("GPU_FUSED_DEPTHWISE",)}

    def knobs(**kw: Any) -> None:
        for k, v in defaults.items():
            setattr(rp, k, kw.get(k, v))

    variants = [
        ("fp16", "default (cudnn_nhwc blocks)", {}),
        # (measured once and dropped: cuDNN's fused conv + bias + ReLU, 253 ms; round3_call5_roma.log)
        ("fp16", "previous form (cuDNN modules, NCHW)", {"GPU_FUSED_DEPTHWISE": None}),
        ("fp32", "default (cudnn_nhwc blocks)", {}),
        ("fp32", "previous form (cuDNN modules, NCHW)", {"GPU_FUSED_DEPTHWISE": None}),
    ]
    rows = []
    for prec, label, kw in variants:
        knobs(**kw)
        row = guarded(f"roma_e2e {prec} {label}", lambda prec=prec, label=label: roma_e2e.e2e(
            ckpt, dino_file, prec, images, 10, 3, dev, label))  # type: ignore[arg-type]
        if row:
            row["knobs"] = kw
            rows.append(row)
            say(f"  {prec} {label:34s} {row['median_ms']:7.2f} / p90 {row['p90_ms']:7.2f} ms, cpu "
                f"{row['host_cpu_ms_median']:5.2f}, peak first {row['peak_mb_setup']:6.0f} MB, timed "
                f"{row['peak_mb_timed']:6.0f} MB, {row['matches_median']} matches")
    REPORT["roma_e2e"] = rows
    knobs()

    parity_rows = []
    for label, prec, pairs in (("default", "fp32", meta["pairs"]), ("default", "fp16", meta["pairs"][:1])):
        for p in pairs:
            knobs()
            row = guarded(f"roma_parity {prec} {label} {p['name']}", lambda p=p, prec=prec: roma_e2e.parity(
                roma_sd, dino, p["name"], p, npz[p["name"]], prec, dev))
            if row:
                row["variant"] = label
                parity_rows.append(row)
                say(f"  {row}")
    REPORT["roma_parity"] = parity_rows
    knobs()

    fp16 = [r for r in rows if r["precision"] == "fp16"]
    if fp16:
        best = min(fp16, key=lambda r: r["median_ms"])
        knobs(**best["knobs"])
        pipe = rp.RomaPipeline({})

        def top() -> list[Any]:
            graph = pipe.torch_graphs(roma_sd, "cuda", dinov2_state=dino, precision="fp16")["dense"]
            inputs, _ = pipe.preprocess(*images)
            return roma_e2e.top_kernels(graph, inputs, dev, n=25)  # type: ignore[arg-type]
        for r in guarded(f"roma_top_kernels fp16 {best['label']}", top) or []:
            say(f"  {r}")
        knobs()


def roma_final(out: Path) -> None:
    """A process's first fp32 RoMa matcher with a bounded warm-up (the first frame's peak), then fp16; parity
    of both against one fixture pair."""
    import roma_e2e
    from roma_gpu import reference_dir, seeded_states

    from matchanything_ros.core.backends import torch_backend

    dev = torch.device("cuda")
    ref = reference_dir()
    meta = json.loads((ref / "roma" / "fixtures_meta.json").read_text())
    roma_sd, dino = seeded_states(ref, meta["weights_seed"])
    pair = meta["pairs"][0]
    with np.load(ref / "roma" / f"{pair['name']}.npz") as zf:
        npz = {pair["name"]: {k: zf[k] for k in zf.files}}
    ckpt, dino_file, images = roma_e2e.weight_files_and_photos(roma_sd, dino, {"pair1_rocket_crossmodal": {
        k: np.asarray(v) for k, v in np.load(ref / "roma" / "pair1_rocket_crossmodal.npz").items()}})
    headroom = float(os.environ.get("ROUND3_FP32_HEADROOM", "2"))
    default_headroom = torch_backend.WARMUP_MEMORY_HEADROOM_GIB
    for prec in ("fp32", "fp16"):
        # the bound for the fp32 matcher only (the call of 2026-12-01 22:50 set it on the fp32 graph alone)
        torch_backend.WARMUP_MEMORY_HEADROOM_GIB = headroom if prec == "fp32" else default_headroom
        row = guarded(f"roma_final_e2e {prec}", lambda prec=prec: roma_e2e.e2e(
            ckpt, dino_file, prec, images, 10, 3, dev, f"final, fp32 warm-up headroom {headroom} GiB"))
        if row:
            say(f"  {prec} {row['median_ms']:7.2f} / p90 {row['p90_ms']:7.2f} ms, "
                f"cpu {row['host_cpu_ms_median']:5.2f}, peak first {row['peak_mb_setup']:6.0f} MB, "
                f"timed {row['peak_mb_timed']:6.0f} MB, {row['matches_median']} matches")
    for prec in ("fp32", "fp16"):
        row = guarded(f"roma_final_parity {prec}", lambda prec=prec: roma_e2e.parity(
            roma_sd, dino, pair["name"], pair, npz[pair["name"]], prec, dev))
        if row:
            say(f"  {row}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("eloftr", "roma", "roma_final"), required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--pairs", default="", help="ELoFTR: held-out pairs .npz (eloftr_heldout_pairs.py)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)  # a fused kernel falling back to cuDNN says so
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    REPORT["environment"] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    say(str(REPORT["environment"]))
    SAVE_TO.append(out / f"round3_{args.part}.json")
    if args.part == "eloftr":
        eloftr(out, args.pairs)
    elif args.part == "roma":
        roma(out)
    else:
        roma_final(out)
    SAVE_TO[0].write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    return 1 if REPORT["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
