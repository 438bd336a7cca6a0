#!/usr/bin/env python3
"""RoMa's device work around its network, per camera size: the web-UI stage + stretch-resize of one camera image
to 560 and 864 (the band by the resample kernel, `RomaOptions.stage1_kernel`, against the two MatMuls per size) and
the sampler's KDE at its size (4 x 5000 points) by kernel tile. Each captured in a CUDA graph as the dense graph
runs it and timed with CUDA events over back-to-back replays; the resize's deviation from the numpy path beside
it. Prints a table; needs CUDA.

    . ./env.sh && python bench/roma_stages.py [--replays 200]
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
sys.path.insert(0, str(REPO / "bench"))

from matchanything_ros.core.roma.device_graph import StretchResize, fp32_math  # noqa: E402
from matchanything_ros.core.roma.preprocess import prepare_image  # noqa: E402
from matchanything_ros.core.roma.sampling import KDE_BLOCK_I, KDE_BLOCK_J, kde_density_triton  # noqa: E402
from stage1_device import replay_ms  # noqa: E402
from test_eloftr_device_stage1 import CAMERA_SIZES, camera_photo  # noqa: E402

KDE_TILES = [(KDE_BLOCK_I, KDE_BLOCK_J), (16, 64), (32, 64), (32, 128), (8, 256), (64, 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("roma_stages.py times CUDA graphs: it needs a CUDA GPU (none here)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device ms per CUDA-graph replay "
          f"(mean of {args.replays})")
    print("web-UI stage + stretch of one camera image to 560 and 864:")
    print(f"{'size':>10s} {'MatMuls':>8s} {'banded':>8s} {'max |diff| vs numpy (MatMuls, banded)':>40s}")
    forms = {banded: StretchResize((560, 864), webui=True, banded=banded) for banded in (False, True)}
    with torch.inference_mode(), fp32_math(cudnn_benchmark=False):
        for width, height in [*CAMERA_SIZES, (832, 832)]:
            photo = camera_photo(width, height)
            image = torch.from_numpy(photo).cuda()[None]
            ref = prepare_image(photo, 560, 864, webui_resize=True)
            errs = []
            for form in forms.values():
                coarse, fine = (t[0].cpu().numpy() for t in form(image))
                errs.append(max(float(np.abs(coarse - ref.coarse).max()), float(np.abs(fine - ref.fine).max())))
            ms = {banded: replay_ms(form, image, args.replays) for banded, form in forms.items()}
            print(f"{width}x{height:<5d} {ms[False]:8.3f} {ms[True]:8.3f} {errs[0]:19.2e} {errs[1]:10.2e}")
        print("the sampler's KDE, 20,000 points (4 x 5000 samples; a seeded draw of real-like points):")
        g = torch.Generator().manual_seed(0)
        points = torch.cat((torch.rand(15_000, 4, generator=g) * 2 - 1,
                            torch.randn(5_000, 4, generator=g) * 0.05)).cuda()
        for tile in KDE_TILES:
            ms_kde = replay_ms(lambda x, t=tile: kde_density_triton(x, block_i=t[0], block_j=t[1]), points,
                               args.replays)
            print(f"  tile {tile[0]:3d} x {tile[1]:3d}{' (default)' if tile == KDE_TILES[0] else '':10s} "
                  f"{ms_kde:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
