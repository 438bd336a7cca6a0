"""`python -m matchanything_ros.training`: the demo-model training without the CLI's other subcommands.

Used on the GPU machine, which has torch but not the ROS/OpenCV stack the CLI discovery imports.
"""
import argparse
import sys

from .config import add_train_args
from .train import run_from_args

parser = argparse.ArgumentParser(prog="python -m matchanything_ros.training", description=__doc__.splitlines()[0])
add_train_args(parser)
sys.exit(run_from_args(parser.parse_args()))
