"""`matchanything demo`: the README's main job, end to end through ROS.

Starts the matcher node (bundled demo model, torch on the CPU, sim time) and the bag replayer
(`matchanything replay --clock`) on the bundled Middlebury "Motorcycle" stereo bag, collects the
KeypointMatches the node publishes, writes a PNG of the matches and prints one summary line:
matches, share correct against the ground-truth disparity, time. Everything runs on a DDS domain
of its own with loopback-only discovery, so it neither sees nor disturbs other ROS processes.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.bundled import DATA_DIR, DEMO_MODEL_NOTICE
from . import add_param_args, param_values

DEMO_BAG = DATA_DIR / "demo_stereo"
LEFT_TOPIC = "/stereo/left/image_rect"
RIGHT_TOPIC = "/stereo/right/image_rect"
MATCHER_PARAMS = ("checkpoint_path", "threshold", "preset")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the matcher node on the bundled stereo bag; write a PNG and a summary line",
        description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("out/demo_matches.png"), help="PNG to write")
    parser.add_argument("--bag", type=Path, default=DEMO_BAG, help="stereo bag (default: the bundled demo bag)")
    parser.add_argument("--left-topic", default=LEFT_TOPIC)
    parser.add_argument("--right-topic", default=RIGHT_TOPIC)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the node's matches")
    add_param_args(parser, MATCHER_PARAMS)
    parser.set_defaults(func=run)


def ros_env(domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               RCUTILS_LOGGING_BUFFERED_STREAM="0")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return env


def node_command(params: dict[str, Any], left: str, right: str) -> list[str]:
    cmd = [sys.executable, "-m", "matchanything_ros.ros.matcher_node", "--ros-args",
           "-p", "backend:=torch", "-p", "device:=cpu", "-p", "use_sim_time:=true",
           # the CPU may take longer per pair than the bag's frame period: keep every pair
           "-p", "max_input_age:=0.0",
           "-r", f"image0:={left}", "-r", f"image1:={right}"]
    for name, value in params.items():
        if name == "checkpoint_path" and not value:
            continue  # empty = the bundled demo model (and an empty string is not a valid ROS argument)
        cmd += ["-p", f"{name}:={value}"]
    return cmd


def stereo_images_from_bag(bag: Path, left: str, right: str) -> dict[tuple[str, int], np.ndarray]:
    """{(topic, header stamp ns): RGB image} of the bag's two image topics."""
    from rosbags.highlevel import AnyReader

    from ..ros.bag import header_stamp_ns, make_typestore
    from ..ros.image_conv import image_msg_to_array, to_rgb

    out = {}
    with AnyReader([bag], default_typestore=make_typestore()) as reader:
        conns = [c for c in reader.connections if c.topic in (left, right)]
        for conn, _t, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            out[(conn.topic, header_stamp_ns(msg))] = to_rgb(image_msg_to_array(msg, conn.topic))
    return out


def summary_line(matches: int, score: Any, node_s: float, what_ran: str, total_s: float, out_png: Path) -> str:
    """The line the demo ends with (README.md and docs/demo.md show one; test/test_docs.py compares them)."""
    accuracy = "" if score is None else (f", {100 * score.precision:.1f} % correct vs ground-truth disparity "
                                         f"(|dy|<=1, |dx-d|<=2 px; {score.with_gt} checkable)")
    return (f"matchanything demo: {matches} matches{accuracy}; matching {node_s:.2f} s in the node ({what_ran}), "
            f"{total_s:.1f} s in all; wrote {out_png}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def collect_matches(domain_id: int, node_proc: subprocess.Popen[bytes], start_replay: Any, timeout: float,
                    node_log: Path) -> tuple[Any, Any]:
    """Wait for the node's MatcherInfo, start the replay, return (first KeypointMatches, MatcherInfo)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from ..core.errors import MatchAnythingError
    from ..msg import KeypointMatches, MatcherInfo

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node("demo_collector", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    got: dict[str, Any] = {}
    node.create_subscription(KeypointMatches, "/matches", lambda m: got.setdefault("matches", m),
                             QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    node.create_subscription(MatcherInfo, "/matcher_info", lambda m: got.setdefault("info", m),
                             QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    deadline = time.monotonic() + timeout
    replay_started = False
    try:
        while "matches" not in got:
            executor.spin_once(timeout_sec=0.1)
            if node_proc.poll() is not None:
                raise MatchAnythingError(f"the matcher node exited (code {node_proc.returncode}); its log "
                                         f"{node_log}:\n{_log_tail(node_log)}")
            if "info" in got and not replay_started:
                start_replay()
                replay_started = True
            if time.monotonic() > deadline:
                what = "matches" if replay_started else "the matcher to be ready"
                raise MatchAnythingError(f"no {what} after {timeout:.0f} s; node log {node_log}:\n"
                                         f"{_log_tail(node_log)}")
        return got["matches"], got.get("info")
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()


def run(args: argparse.Namespace) -> int:
    import cv2
    import domain_coordinator

    from ..core.errors import ConfigError
    from ..core.viz import draw_matches
    from ..training.metrics import stereo_correct_mask, stereo_score

    t_start = time.monotonic()
    if not args.bag.exists():
        raise ConfigError(f"bag not found: {args.bag}")
    params = param_values(args, MATCHER_PARAMS)
    out_png: Path = args.out
    out_png.parent.mkdir(parents=True, exist_ok=True)
    node_log = out_png.with_name("demo_node.log")
    replay_log = out_png.with_name("demo_replay.log")
    procs: list[subprocess.Popen[bytes]] = []
    with domain_coordinator.domain_id() as domain:
        env = ros_env(domain)

        def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
            with open(log, "wb") as f:
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc

        def start_replay() -> None:
            # --loop: sensor-data QoS is best effort, so a lost frame comes round again; stopped once matched
            start([sys.executable, "-m", "matchanything_ros.cli", "replay", str(args.bag), "--clock", "--loop",
                   "--topics", args.left_topic, args.right_topic, "--wait-for-subscribers", "10"], replay_log)

        try:
            node_proc = start(node_command(params, args.left_topic, args.right_topic), node_log)
            msg, info = collect_matches(domain, node_proc, start_replay, args.timeout, node_log)
        finally:
            for p in reversed(procs):
                _stop(p)
    k0 = np.frombuffer(bytes(msg.keypoints0), np.float32).reshape(-1, 2)
    k1 = np.frombuffer(bytes(msg.keypoints1), np.float32).reshape(-1, 2)
    conf = np.frombuffer(bytes(msg.confidence), np.float32)
    stamp0 = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    stamp1 = int(msg.image1_stamp.sec) * 1_000_000_000 + int(msg.image1_stamp.nanosec)
    images = stereo_images_from_bag(args.bag, args.left_topic, args.right_topic)
    left, right = images[(args.left_topic, stamp0)], images[(args.right_topic, stamp1)]
    score = None
    import skimage.data

    gt_left, _gt_right, disparity = skimage.data.stereo_motorcycle()
    model = DEMO_MODEL_NOTICE if getattr(info, "is_demo_model", False) else "checkpoint"
    if left.shape == gt_left.shape and np.array_equal(left, gt_left):  # the bundled Middlebury pair
        score = s = stereo_score(k0, k1, disparity)
        # the matches the ground truth can check (unbounded tolerances: only "has a ground truth" is left),
        # green = correct, red = wrong; draw_matches keeps the picture readable (an even sample of them)
        checkable = stereo_correct_mask(k0, k1, disparity, y_tol=np.inf, d_tol=np.inf)
        correct = stereo_correct_mask(k0, k1, disparity)[checkable]
        canvas = draw_matches(left, right, k0[checkable], k1[checkable], conf[checkable], inliers=correct,
                              labels=("correct", "wrong"), demo_model=getattr(info, "is_demo_model", False),
                              title=f"the {s.with_gt} of {len(conf)} matches with a ground-truth disparity")
    else:
        canvas = draw_matches(left, right, k0, k1, conf, demo_model=getattr(info, "is_demo_model", False))
    cv2.imwrite(str(out_png), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    node_s = (msg.preprocess_ms + msg.inference_ms + msg.postprocess_ms) / 1e3
    print(summary_line(len(conf), score, node_s, f"{model}, {msg.backend} {getattr(info, 'device', 'cpu')}",
                       time.monotonic() - t_start, out_png))
    return 0 if len(conf) else 1
