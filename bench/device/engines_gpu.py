#!/usr/bin/env python3
"""Engines on the GPU machine: export, `validate` and `benchmark` with torch CUDA and ONNX Runtime.

There is no TensorRT on that machine and its ONNX Runtime is CPU-only, so this runs what can run:
  1. `export` of the seeded ELoFTR (reference weights) to ONNX, with the ORT-vs-torch check;
  2. validation against the torch fp32 reference on CUDA (TF32 off), correspondence level, on the
     reference fixture pairs: torch CUDA fp16 and ONNX Runtime (CPU) at threshold 0.001 with the
     top-K coarse graph on both sides (many matches), plus the `matchanything validate` CLI at the
     default threshold;
  3. `matchanything benchmark` (the CLI) for torch CUDA fp32, torch CUDA fp16 and ONNX Runtime CPU
     at canvas 416 / 640 / 832 on the bundled demo pair; one combined JSON + PNG.
Prints short tables; writes engines_gpu.json, engines_validate*.json, engines_benchmark.json/.png
to --out (default $OUT). Designed to finish in under 3 minutes on an H100 machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from matchanything_ros.cli import main as cli  # noqa: E402
from matchanything_ros.core.engines.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from matchanything_ros.core.backends.torch_backend import TorchBackend  # noqa: E402
from matchanything_ros.core.benchmark import format_table, plot_latencies  # noqa: E402
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline  # noqa: E402
from matchanything_ros.core.engines.export import export_eloftr  # noqa: E402
from matchanything_ros.core.validate import format_table as validate_table  # noqa: E402
from matchanything_ros.core.validate import load_pairs, validate_pairs  # noqa: E402


def reference_dir() -> Path:
    return Path(os.environ.get("MATCHANYTHING_REFERENCE_DIR") or REPO.parent / "shared" / "reference")


def seeded_state(ref: Path, seed: int = 1234) -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("seeded_weights", ref / "seeded_weights.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.seeded_state_dict(ref / "eloftr" / "manifest.json", seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes and few runs (checks the script on a CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict[str, Any] = {"torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    import onnxruntime as ort

    report["onnxruntime"] = ort.__version__
    report["ort_providers"] = ort.get_available_providers()
    ref_dir = reference_dir()
    work = Path(tempfile.mkdtemp(prefix="engines_gpu_"))

    # 1. export
    state = seeded_state(ref_dir)
    ckpt = work / "seeded_eloftr.ckpt"
    torch.save({"state_dict": state}, ckpt)
    plain = {k.removeprefix("matcher."): v for k, v in state.items()}
    t0 = time.monotonic()
    log = io.StringIO()
    with torch.no_grad():
        export_eloftr(EloftrPipeline(), plain, work / "onnx", checkpoint_sha256="seeded-1234",
                      verify_sizes=[416, 512], log=log)
    report["export_seconds"] = time.monotonic() - t0
    report["export_log"] = log.getvalue().splitlines()
    print(log.getvalue().strip())
    onnx_dir = work / "onnx"

    # 2. validation (programmatic: top-K coarse graph on both sides at threshold 0.001)
    pairs = load_pairs(None, str(ref_dir / "eloftr"))
    if args.quick:
        pairs = pairs[:1]
    cfg = {"threshold": 0.001}
    ref = (EloftrPipeline(cfg, coarse_mode="topk"),
           TorchBackend(EloftrPipeline(cfg, coarse_mode="topk").torch_graphs(plain, args.device), args.device,
                        "fp32"))
    tests: list[tuple[str, Any]] = []
    if args.device == "cuda":
        tests.append(("torch_cuda_fp16", TorchBackend(EloftrPipeline(cfg, coarse_mode="topk").torch_graphs(
            plain, "cuda"), "cuda", "fp16")))
    tests.append(("onnxruntime_cpu", OnnxRuntimeBackend({g: onnx_dir / f"{g}.onnx" for g in ("coarse", "fine")},
                                                        "cpu")))
    report["validation"] = {}
    for name, backend in tests:
        rep = validate_pairs(ref, (EloftrPipeline(cfg, coarse_mode="topk"), backend), pairs)
        rep["reference"] = {"backend": "torch", "device": args.device, "precision": "fp32"}
        rep["test"] = {"backend": backend.name, "device": backend.device, "precision": backend.precision}
        report["validation"][name] = rep["summary"]
        (out / f"engines_validate_{name}.json").write_text(json.dumps(rep, indent=1))
        print(f"\nvalidate {name} vs torch fp32 {args.device} (threshold 0.001, top-K coarse graph):")
        print(validate_table(rep))
        backend.close()
    ref[1].close()

    # ... and the CLI at the default threshold, reference on the same device
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(["validate", "--backend", "onnxruntime", "--device", "cpu", "--checkpoint-path", str(ckpt),
                    "--model-file-path", str(onnx_dir), "--fixtures", str(ref_dir / "eloftr"),
                    *(["--resize-max", "416"] if args.quick else []),
                    "--reference-device", args.device, "--report", str(out / "engines_validate_cli.json")])
    report["validate_cli"] = {"exit_code": code, "output": buf.getvalue().splitlines()}
    print("\n`matchanything validate --backend onnxruntime` (default threshold):\n" + buf.getvalue().strip())

    # 3. benchmark through the CLI
    sizes = "416" if args.quick else "416,640,832"
    runs = ["--warmup", "1", "--runs", "2"] if args.quick else ["--warmup", "3", "--runs", "10"]
    configs: list[dict[str, Any]] = []
    plan = [("torch", args.device, "fp32"), ("onnxruntime", "cpu", "fp32")]
    if args.device == "cuda":
        plan.insert(1, ("torch", "cuda", "fp16"))
    for backend, device, precision in plan:
        js = work / f"bench_{backend}_{device}_{precision}.json"
        r = runs if backend == "torch" else (["--warmup", "1", "--runs", "4"] if not args.quick else runs)
        code = cli(["benchmark", "--backends", backend, "--device", device, "--precision", precision,
                    "--sizes", sizes, *r, "--checkpoint-path", str(ckpt), "--model-file-path", str(onnx_dir),
                    "--json", str(js), "--png", str(work / "tmp.png")])
        if code == 0:
            configs += json.loads(js.read_text())["configs"]
    bench = {"environment": report | {"cpu_count": os.cpu_count()}, "configs": configs}
    (out / "engines_benchmark.json").write_text(json.dumps(bench, indent=1, default=str))
    plot_latencies(configs, out / "engines_benchmark.png")
    print("\nbenchmark (demo pair, ms; host MB = peak RSS over the timed runs):")
    print(format_table(configs))
    report["benchmark"] = [{"label": c["label"], "canvas": c["canvas"], "total_median_ms": c["stages_ms"]["total"]
                            ["median"], "inference_median_ms": c["stages_ms"]["inference"]["median"],
                            "pairs_per_s": c["pairs_per_s"], "peak_device_mb": c["peak_device_mb"]}
                           for c in configs]
    shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.monotonic() - t_start
    (out / "engines_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    # fp16 is measured, not required to pass (that is what the report is for); ONNX Runtime must match
    ok = report["validation"]["onnxruntime_cpu"]["passed"] and report["validate_cli"]["exit_code"] == 0
    print(f"\ntotal {report['seconds']:.0f} s; " + ", ".join(
        f"{k}: {'PASS' if v['passed'] else 'FAIL'}" for k, v in report["validation"].items())
        + f"; validate CLI exit {report['validate_cli']['exit_code']}")
    return 0 if ok and configs else 1


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
