#!/usr/bin/env python3
"""ELoFTR speed on the GPU, second round (issue 12): what each remaining change buys, in one device call.

Every figure is `Matcher.match` end to end (eloftr_e2e.time_matcher: uint8 arrays in, matches out, median
and p90 of 30 after warm-up, host CPU ms, peak GPU memory, match count). `configure()` sets one knob at a
time against the defaults (the timing plan holds the defaults and fp32 with cuDNN's TF32 convolutions, torch's
default, which the original's "fp32" ran with; the knobs measured in the day's earlier calls — row buckets,
the fine-level form, compiled parts, cuDNN autotuning, fp32 islands, the heads — are in their logs under
bench/results/h200_2026-12-01/eloftr_speed_*).
Sections: memory (both orders of creation), memcap (a process capped at 2.5 GB), timing, parity (CUDA fp32 vs
the fixtures), buckets / heads (row buckets vs all rows, top-K vs nonzero head: same matches), fp16 (held-out
pairs, the promise), profile (top CUDA kernels of an eager fp16 forward).
Usage (repo root, GPU machine): python3 bench/device/eloftr_speed.py --out DIR [--pairs heldout.npz]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eloftr_e2e as e2e  # noqa: E402
from eloftr_e2e import REPORT, compare, keyed, matcher, section, square, stage_breakdown, time_matcher  # noqa: E402

from matchanything_ros.core.backends import torch_backend  # noqa: E402
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline  # noqa: E402

DEFAULTS = {"head": EloftrPipeline.product_head, "fine": EloftrPipeline.product_fine,
            "compiled": EloftrPipeline.product_compiled,
            "island": EloftrPipeline.fp32_island,
            "numerics": json.loads(json.dumps(torch_backend.CUDA_NUMERICS)),
            }


def configure(fine: str | None = None, compiled: str | None = None, island: str | None = None,
              buckets: bool = True, fp16_benchmark: bool | None = None,
              fp32_cudnn_tf32: bool | None = None, head: str | None = None) -> None:
    """Set the knobs (None = default); every call starts from the defaults."""
    EloftrPipeline.use_product_graph = True
    EloftrPipeline.product_head = head or DEFAULTS["head"]
    EloftrPipeline.max_matches_override = None
    EloftrPipeline.product_fine = fine or DEFAULTS["fine"]
    EloftrPipeline.product_compiled = compiled or DEFAULTS["compiled"]
    EloftrPipeline.fp32_island = island or DEFAULTS["island"]
    torch_backend.TorchBackend.use_row_buckets = buckets
    for prec, flags in DEFAULTS["numerics"].items():
        torch_backend.CUDA_NUMERICS[prec] = dict(flags)
    if fp16_benchmark is not None:
        torch_backend.CUDA_NUMERICS["fp16"]["cudnn_benchmark"] = fp16_benchmark
    if fp32_cudnn_tf32 is not None:
        torch_backend.CUDA_NUMERICS["fp32"]["cudnn_tf32"] = fp32_cudnn_tf32


@section("timing")
def timing(ckpt: str, photos: list[np.ndarray], demo: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    p832, p640, d832 = e2e.row_pairs(photos, demo)
    d = ("default", {})
    plan = [
        ("832x832 robot fp16", p832, ckpt, "fp16", "robot", [d]),
        ("832x832 robot fp32", p832, ckpt, "fp32", "robot", [d, ("cudnn_tf32", {"fp32_cudnn_tf32": True})]),
        ("640x480 hf_space fp16", p640, ckpt, "fp16", "hf_space", [d]),
        ("640x480 hf_space fp32", p640, ckpt, "fp32", "hf_space", [d]),
        ("demo model 832x832 fp16", d832, "", "fp16", "robot", [d]),
        ("demo model 832x832 fp32", d832, "", "fp32", "robot", [d]),
    ]
    rows = []
    for row, pairs, path, prec, preset, variants in plan:
        for v, kw in variants:
            configure(**kw)
            t = time.time()
            try:
                with matcher(path, prec, preset) as m:
                    res = time_matcher(m, pairs)
                    if v == "default" and prec == "fp16":
                        res["stage_breakdown_ms"] = stage_breakdown(m, *pairs[0])
            except Exception as exc:  # noqa: BLE001  (one variant failing must not hide the others)
                res = {"error": repr(exc)[:800], "median_ms": float("nan"), "p90_ms": float("nan"),
                       "host_cpu_ms_median": float("nan"), "peak_gpu_mb": float("nan"), "matches_median": -1}
            res.update(row=row, variant=v, setup_s=time.time() - t)
            rows.append(res)
            print(f"{row:26s} {v:22s} {res['median_ms']:7.2f} ms p90 {res['p90_ms']:7.2f} cpu "
                  f"{res['host_cpu_ms_median']:6.2f} peak {res['peak_gpu_mb']:6.0f} MB n {res['matches_median']:.0f} "
                  f"setup {res['setup_s']:.0f} s {res.get('stages_median_ms', '')} {res.get('stage_breakdown_ms', '')}"
                  f" {res.get('error', '')}", flush=True)
    configure()
    return rows


@section("buckets")
def buckets(ckpt: str, photos: list[np.ndarray], demo: tuple[np.ndarray, np.ndarray], with_buckets: bool = True
            ) -> list[dict[str, Any]]:
    """Row buckets vs all rows on the same frames (the same lists, keypoints to float rounding); the two
    CUDA heads on the same frames."""
    out = []
    cases = [("demo 832 fp16", "", "fp16", square(demo[0], 832, 832), square(demo[1], 832, 832)),
             ("demo 600x400 fp32", "", "fp32", demo[0], demo[1]),
             ("seeded 832 fp32", ckpt, "fp32", square(photos[0], 832, 832), square(photos[1], 832, 832))]
    for name, path, prec, a, b in cases if with_buckets else []:
        res = {}
        for on in (True, False):
            configure(buckets=on)
            with matcher(path, prec, "robot") as m:
                res[on] = keyed(m, a, b)
        row = {"case": name, **compare(*res[False], *res[True])}
        out.append(row)
        print("buckets", row, flush=True)
    for name, path, prec, a, b in cases[:2]:  # the two CUDA heads: top-K + selection vs mask + nonzero
        res = {}
        for head in ("lse_compiled", "lse_nonzero"):
            configure(head=head)
            with matcher(path, prec, "robot") as m:
                res[head] = keyed(m, a, b)
        row = {"case": f"heads {name}", **compare(*res["lse_compiled"], *res["lse_nonzero"])}
        out.append(row)
        print("heads", row, flush=True)
    configure()
    return out


@section("fp16")
def fp16_promise(pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Demo model, held-out pairs: fp16 (new default) vs CUDA fp32, per pair."""
    configure()
    res: dict[str, Any] = {}
    with matcher("", "fp32", "robot") as m:
        ref32 = {name: keyed(m, a, b) for name, a, b in pairs}
    for label, kw in (("default", {}),):
        configure(**kw)
        with matcher("", "fp16", "robot") as m:
            res[label] = {name: compare(*ref32[name], *keyed(m, a, b)) for name, a, b in pairs}
        print("fp16", label, json.dumps(res[label]), flush=True)
    configure()
    return res


def _kernel_table(prof: Any) -> str:
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return str(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70))
        except Exception:  # noqa: BLE001  (the sort key's name changed across torch versions)
            continue
    return "no table"


@section("profile")
def profile(ckpt: str, photos: list[np.ndarray]) -> dict[str, str]:
    """Top CUDA kernels of the product forward, eager (no CUDA graph, so every kernel is its own row)."""
    a, b = square(photos[0], 832, 832), square(photos[1], 832, 832)
    out = {}
    for label, prec, kw in (("fp16", "fp16", {}),):
        configure(**kw)
        with matcher(ckpt, prec, "robot") as m:
            m.backend.cuda_graphs = False
            for _ in range(2):
                m.match(a, b)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    m.match(a, b)
                torch.cuda.synchronize()
            out[label] = _kernel_table(prof)
        print(f"=== profile {label} (2 matches, eager)\n{out[label]}", flush=True)
    configure()
    return out


def main() -> int:
    # one process builds ~30 matchers: each is a new guard set for the same compiled functions, past the
    # default recompile limit (8) after which dynamo runs them uncompiled and later variants would be slow
    torch._dynamo.config.recompile_limit = 256
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--pairs", default="", help="held-out pairs .npz (eloftr_heldout_pairs.py)")
    ap.add_argument("--sections", default="memory,memcap,timing,parity,buckets,fp16,profile")
    args = ap.parse_args()
    REPORT["environment"] = {"gpu": e2e.gpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "defaults": DEFAULTS}
    print(REPORT["environment"], flush=True)
    ref, index, ckpt, photos, demo, held = e2e.load_inputs(args.pairs)
    sections = args.sections.split(",")
    t0 = time.time()
    if "memory" in sections:  # first: a fresh process, nothing cached by other sections
        configure()
        e2e.memory(str(ckpt), photos)
    if "memcap" in sections:
        e2e.memcap(str(ckpt))
    if "timing" in sections:
        timing(str(ckpt), photos, demo)
    if "parity" in sections:  # CUDA fp32 vs the original's outputs (the fixtures), with the default knobs
        configure()
        e2e.parity(str(ckpt), index, ref)
    if "buckets" in sections or "heads" in sections:
        buckets(str(ckpt), photos, demo, with_buckets="buckets" in sections)
    if "fp16" in sections and held:
        fp16_promise(held)
    if "profile" in sections:
        profile(str(ckpt), photos)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "eloftr_speed.json").write_text(json.dumps(REPORT, indent=1, default=str) + "\n")
    print(f"\n=== summary ({time.time() - t0:.0f} s; median ms / p90 / host CPU ms / peak MB / matches) ===")
    for r in REPORT.get("timing", []) if isinstance(REPORT.get("timing"), list) else []:
        print(f"{r['row']:26s} {r['variant']:22s} {r['median_ms']:7.2f} {r['p90_ms']:7.2f} "
              f"{r['host_cpu_ms_median']:6.2f} {r['peak_gpu_mb']:6.0f} {r['matches_median']:6.0f}")
    for r in REPORT.get("timing", []) if isinstance(REPORT.get("timing"), list) else []:
        if "stage_breakdown_ms" in r:
            print(r["row"], "stages (device ms)", r["stage_breakdown_ms"])
    for k in ("memory", "memcap", "buckets", "parity"):
        print(k, json.dumps(REPORT.get(k), default=str)[:1500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
