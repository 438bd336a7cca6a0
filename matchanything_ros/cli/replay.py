"""`matchanything replay BAG`: publish a bag's messages in time order (with /clock), like `ros2 bag play`."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay", help="publish a bag's messages in time order, optionally with /clock",
        description="A small `ros2 bag play` for machines without ros2cli: publishes every message of BAG "
                    "(rosbag2, sqlite3 or mcap) at its recorded time, scaled by --rate. With --clock it "
                    "publishes /clock, so nodes started with use_sim_time:=true run on bag time.")
    parser.add_argument("bag", metavar="BAG", help="bag directory or .mcap/.db3 file")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--clock", action="store_true", help="publish /clock with the bag time")
    parser.add_argument("--clock-hz", type=float, default=100.0, help="/clock rate between messages (default 100)")
    parser.add_argument("--loop", action="store_true", help="start over at the end (the clock jumps back)")
    parser.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="replay only these topics")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO", help="publish FROM on TO")
    parser.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS until every topic has a subscriber before starting")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.node import Node

    from ..ros.replay import parse_remaps, replay_bag

    remap = parse_remaps(args.remap)
    rclpy.init(args=[sys.argv[0]])
    node = Node("bag_replayer")
    try:
        stats = replay_bag(args.bag, node, rate=args.rate, publish_clock=args.clock, loop=args.loop,
                           topics=args.topics, remap=remap, wait_for_subscribers_s=args.wait_for_subscribers,
                           clock_hz=args.clock_hz, should_stop=lambda: not rclpy.ok(),
                           log=lambda text: print(text, file=sys.stderr))
        print(f"replayed {stats.published} messages ({stats.bag_duration_s:.2f} s of bag time, "
              f"{stats.loops} pass(es))", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
