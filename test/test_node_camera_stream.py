"""A stereo camera the way drivers publish: best-effort SensorDataQoS, each frame once, 1280x720 rgb8 at
30 Hz for 20 s, from another process, into the node with its default parameters (CPU matching).

The node may drop pairs it has no time to match (by design, counted), but its receive counters must
account for >= 95 % of the frames: nothing may be lost in transport. With Fast DDS's built-in
transports most of these 2.76 MB samples are lost (docs/node.md, "Transport"); the shipped profile
(config/fastdds_large_images.xml, which rosutil puts in every process's environment as env.sh does)
fixes that.

Run as a program (`python test_node_camera_stream.py --publish ...`) it is the camera.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import NODE_CMD, NODE_ENV, NodeClient  # noqa: E402

pytestmark = pytest.mark.ros
pytest_plugins = ("matcher_node_util",)

WIDTH, HEIGHT, RATE_HZ, DURATION_S = 1280, 720, 30.0, 20.0
FRAMES = int(RATE_HZ * DURATION_S)
REQUIRED_RATIO = 0.95


def camera_images() -> tuple[np.ndarray, np.ndarray]:
    """A real photograph at 1280x720 and a shifted copy (a stereo-like pair)."""
    import cv2
    from skimage import data

    left = cv2.resize(data.astronaut(), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    right = np.ascontiguousarray(np.roll(left, -24, axis=1))
    return left, right


def publish_camera(frames: int, rate_hz: float, wait_s: float) -> int:
    """Publish `frames` stereo pairs once each, best effort, stamped with the wall clock; print the count."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("fake_stereo_camera")
    pubs = [node.create_publisher(Image, f"image{i}", qos_profile_sensor_data) for i in range(2)]
    msgs = []
    for i, array in enumerate(camera_images()):
        msg = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", is_bigendian=0, step=WIDTH * 3)
        msg.data = array.tobytes()
        msg.header.frame_id = f"camera{i}"
        msgs.append(msg)
    deadline = time.monotonic() + wait_s
    while min(p.get_subscription_count() for p in pubs) < 1:  # a driver publishes anyway; the test waits
        if time.monotonic() > deadline:
            print("no subscriber", flush=True)
            return 1
        time.sleep(0.1)
    time.sleep(1.0)  # discovery is two-way: let the node's side match us too
    print("publishing", flush=True)
    period = 1.0 / rate_hz
    start = time.monotonic()
    for n in range(frames):
        target = start + n * period
        time.sleep(max(0.0, target - time.monotonic()))
        stamp = time.time_ns()
        for pub, msg in zip(pubs, msgs):
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            pub.publish(msg)
    elapsed = time.monotonic() - start
    print(f"published {frames} pairs in {elapsed:.1f} s", flush=True)
    time.sleep(1.0)  # let the last samples leave before the participant goes away
    node.destroy_node()
    rclpy.shutdown()
    return 0


def test_camera_like_stereo_stream_is_received(module_ros_env):
    node = module_ros_env.start_node(NODE_CMD, name="matcher_node", env=NODE_ENV)  # default parameters
    node.wait_for_output(r"matcher ready", timeout=120)
    assert "fastdds_large_images.xml" in node.wait_for_output(r"transport: .*").group(0)
    camera = module_ros_env.start_node([sys.executable, str(Path(__file__).resolve()), "--publish",
                                        str(FRAMES), str(RATE_HZ)], name="camera", env=NODE_ENV)
    camera.wait_for_output(r"publishing", timeout=60)
    assert camera.wait(timeout=DURATION_S + 60) == 0, camera.log()
    report = camera.log()
    assert f"published {FRAMES} pairs" in report
    probe = module_ros_env.probe("camera_stream_probe")
    client = NodeClient(probe)
    diag = client.latest_diagnostics(timeout=15)
    received = int(diag["image0_received"]) + int(diag["image1_received"])
    ratio = received / (2 * FRAMES)
    print(f"camera stream: {report.strip().splitlines()[-1]}; node received {diag['image0_received']} + "
          f"{diag['image1_received']} of {2 * FRAMES} frames ({100 * ratio:.1f} %), matched {diag['pairs_matched']}, "
          f"dropped {diag['pairs_dropped']}, stale {diag['pairs_stale']}")
    assert ratio >= REQUIRED_RATIO, diag
    # it was matching on the CPU meanwhile (a 1280x720 pair takes seconds on one busy core): the pair in
    # progress comes out, and every pair is accounted for
    diag = client.wait_diagnostics(lambda v: int(v["pairs_matched"]) >= 1 and v["worker_busy"] == "False",
                                   timeout=120)
    accounted = sum(int(diag[k]) for k in ("pairs_matched", "pairs_dropped", "pairs_stale", "pairs_rejected",
                                           "match_errors", "pairs_without_matcher"))
    assert accounted == int(diag["pairs_synchronized"]), diag
    node.assert_running()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--publish", nargs=2, metavar=("FRAMES", "RATE_HZ"), required=True)
    parser.add_argument("--wait", type=float, default=60.0)
    args = parser.parse_args()
    sys.exit(publish_camera(int(args.publish[0]), float(args.publish[1]), args.wait))
