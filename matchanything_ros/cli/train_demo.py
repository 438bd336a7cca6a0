"""`matchanything train-demo`: train (or resume, or export) the bundled demo ELoFTR model.

Self-supervised pairs from scikit-image photos (random homographies, photometric and
cross-modality augmentation), the coarse and fine losses from the known warps. Meant for a GPU;
it stops itself after --time-budget seconds and always saves a checkpoint it can resume from.
See docs/demo.md for the recipe used for the shipped weights.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-demo", help="train the bundled demo ELoFTR model (time-boxed, resumable)",
        description=__doc__.splitlines()[0] if __doc__ else None)
    from ..training.config import add_train_args

    add_train_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.train import run_from_args

    return run_from_args(args)
