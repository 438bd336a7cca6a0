"""ELoFTR's stage 1 on the GPU (a camera pair shrunk to the model size, `EloftrProduct.stage1_rgb`): the torch
ops' tap-by-tap form against the Triton kernels (EloftrOptions.stage1_kernel), each captured in a CUDA graph as
the product graph runs it and timed with CUDA events over back-to-back replays; and whether the two give the same
bytes (on the device, and against the torch form on the CPU). Prints a table; needs CUDA.

    . ./env.sh && python bench/stage1_device.py [--replays 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from matchanything_ros.core.checkpoint import load_state_dict  # noqa: E402
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline  # noqa: E402
from matchanything_ros.core.eloftr.preprocess import PreprocessSettings, plan_stage1  # noqa: E402
from matchanything_ros.core.eloftr.product import EloftrProduct  # noqa: E402
from matchanything_ros.core.matcher import resolve_eloftr_checkpoint  # noqa: E402
from test_eloftr_device_stage1 import CAMERA_SIZES, camera_photo  # noqa: E402


def replay_ms(fn, pair: torch.Tensor, replays: int) -> float:  # type: ignore[no-untyped-def]
    """Device milliseconds of fn(pair) captured in a CUDA graph, per replay."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: Triton's compilation, the tap tables
            fn(pair)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn(pair)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    path, cfg, _ = resolve_eloftr_checkpoint("")
    net = EloftrPipeline({}, cfg).build_net(load_state_dict(str(path), "eloftr"))
    settings = PreprocessSettings()
    forms = {kernel: EloftrProduct(net, 0.1, 100, stage1=settings, stage1_kernel=kernel).cuda()
             for kernel in (False, True)}
    cpu = EloftrProduct(net, 0.1, 100, stage1=settings)
    fma = forms[True].stage1_fma
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; stage 1 of a stacked camera pair, device ms "
          f"per CUDA-graph replay (mean of {args.replays}); the antialiased step with FMA: {fma}")
    print(f"{'size':>10s} {'steps':>9s} {'torch ops':>9s} {'kernels':>8s} {'same bytes (device, cpu)':>26s}")
    for width, height in CAMERA_SIZES:
        plan = plan_stage1(width, height, settings)
        if not plan.steps or not plan.device:
            print(f"{width}x{height:<5d} {'-':>9s}  (no device resampling at this size)")
            continue
        photo = camera_photo(width, height)
        pair = torch.from_numpy(np.stack([photo, np.ascontiguousarray(photo[::-1])])).cuda()
        outs = {k: f.stage1_rgb(pair).cpu() for k, f in forms.items()}
        on_cpu = cpu.stage1_rgb(pair.cpu())
        same = (torch.equal(outs[True], outs[False]), torch.equal(outs[True], on_cpu))
        ms = {k: replay_ms(f.stage1_rgb, pair, args.replays) for k, f in forms.items()}
        print(f"{width}x{height:<5d} {'+'.join(k for _, _, k in plan.steps):>9s} {ms[False]:9.3f} {ms[True]:8.3f} "
              f"{str(same):>26s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
