#!/usr/bin/env python3
"""Accuracy benchmark of the bundled demo model (or any ELoFTR checkpoint): reported, not timed.

  python tools/eval_demo.py                       # the bundled demo model, default preset/threshold
  python tools/eval_demo.py --checkpoint-path W.safetensors   (W.json beside it = its EloftrConfig)

Prints the Middlebury "Motorcycle" stereo figures (matches, % with |y0-y1| <= 1 px and
|(x0-x1) - d_gt| <= 2 px) and the held-out homography AUCs (corner error after RANSAC, 3/5/10 px;
plain, inverted, edge map), and with --json writes them to a file. Runs on the CPU with the torch
backend so the figures do not depend on which engines are installed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matchanything_ros.core.matcher import Matcher, MatcherConfig  # noqa: E402
from matchanything_ros.core.params import PARAMS_BY_NAME  # noqa: E402
from matchanything_ros.training.evaluate import MODALITIES, eval_homographies, eval_stereo, homography_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-path", default="", help="empty = the bundled demo model")
    parser.add_argument("--threshold", type=float, default=PARAMS_BY_NAME["threshold"].default)
    parser.add_argument("--preset", default=PARAMS_BY_NAME["preset"].default, choices=PARAMS_BY_NAME["preset"].choices)
    parser.add_argument("--pairs-per-image", type=int, default=5, help="random homographies per held-out photo")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    cfg = MatcherConfig(checkpoint_path=args.checkpoint_path, threshold=args.threshold, preset=args.preset,
                        backend="torch", device="cpu")
    report: dict = {"checkpoint": args.checkpoint_path or "bundled demo model", "threshold": args.threshold,
                    "preset": args.preset}
    with Matcher(cfg) as matcher:
        report["is_demo_model"] = matcher.is_demo_model
        st = eval_stereo(matcher.match)
        s = st.score
        report["motorcycle"] = {"matches": s.matches, "with_gt": s.with_gt, "correct": s.correct,
                                "precision": round(s.precision, 4), "seconds_cpu": round(st.seconds, 2)}
        print(f"motorcycle stereo: {s.matches} matches, {s.with_gt} with ground truth, "
              f"{100 * s.precision:.1f} % correct (|dy|<=1, |dx-d|<=2), {st.seconds:.2f} s on CPU")
        pairs = homography_pairs(args.pairs_per_image)
        report["homography"] = []
        for modality in args.modalities:
            r = eval_homographies(matcher.match, pairs, modality)
            report["homography"].append(r)
            print(f"held-out homographies ({r['pairs']} pairs, {modality:8s}): AUC@3/5/10 px = "
                  f"{100 * r['auc3']:.1f} / {100 * r['auc5']:.1f} / {100 * r['auc10']:.1f}, "
                  f"median {r['median_matches']:.0f} matches, median corner error {r['median_corner_error']:.2f} px")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
