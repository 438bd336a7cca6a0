"""ROS overhead of the matcher node per image pair, beyond inference (prints figures; not a test).

Measured with the node's own code on real rclpy messages and real DDS between two processes:
  * Image -> array   : `image_msg_to_array` for both images (rgb8 and bgr8, 640x480)
  * result -> msg    : `build_matches_msg` for a MatchResult with N matches (default 10,000)
  * publish          : `Publisher.publish` of that KeypointMatches (serialization + DDS write)
  * receive          : a subscriber in another process (deserialize + callback); the one-way
                       latency is publish start -> callback, on this host's clock
  * images in        : one-way latency of a 640x480 rgb8 Image, which the node receives twice per pair

    . ./env.sh && python bench/ros_overhead.py [--matches 10000] [--pairs 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

WIDTH, HEIGHT = 640, 480


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return f"median {statistics.median(xs):7.3f} ms  p90 {p(0.9):7.3f} ms  max {xs[-1]:7.3f} ms"


def receiver(topic_type: str, count: int, domain: int) -> None:
    """Child process: subscribe, record one-way latency (receive wall time - header stamp), print JSON."""
    import rclpy
    from rclpy.qos import QoSProfile

    if topic_type == "matches":
        from matchanything_ros.msg import KeypointMatches as Msg
    else:
        from sensor_msgs.msg import Image as Msg
    rclpy.init(domain_id=domain)
    node = rclpy.create_node("overhead_receiver")
    lat: list[float] = []

    def on_msg(msg: object) -> None:
        stamp = msg.header.stamp  # type: ignore[attr-defined]
        lat.append((time.time_ns() - (stamp.sec * 1_000_000_000 + stamp.nanosec)) / 1e6)

    node.create_subscription(Msg, "overhead", on_msg, QoSProfile(depth=100))
    deadline = time.monotonic() + 120
    while len(lat) < count and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    print(json.dumps(lat))
    node.destroy_node()
    rclpy.shutdown()


def measure_transport(kind: str, make_msg, pairs: int, domain: int) -> tuple[list[float], list[float]]:
    """Publish `pairs` messages to a receiver process; returns (publish call ms, one-way latency ms)."""
    import rclpy
    from rclpy.qos import QoSProfile

    child = subprocess.Popen([sys.executable, __file__, "--receiver", kind, "--pairs", str(pairs),
                              "--domain", str(domain)], stdout=subprocess.PIPE, text=True)
    rclpy.init(domain_id=domain)
    node = rclpy.create_node("overhead_sender")
    msg = make_msg()
    pub = node.create_publisher(type(msg), "overhead", QoSProfile(depth=100))
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    publish_ms = []
    for _ in range(pairs):
        now = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
        t0 = time.perf_counter()
        pub.publish(msg)
        publish_ms.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.01)  # 100 Hz: measure latency, not throughput
    out, _ = child.communicate(timeout=120)
    node.destroy_node()
    rclpy.shutdown()
    return publish_ms, json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matches", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "0")) or 91)
    parser.add_argument("--receiver", choices=("matches", "image"))
    args = parser.parse_args()
    if args.receiver:
        receiver(args.receiver, args.pairs, args.domain)
        return 0

    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from matchanything_ros.core.result import MatchResult
    from matchanything_ros.msg import KeypointMatches
    from matchanything_ros.ros.image_conv import array_to_image_msg, image_msg_to_array
    from matchanything_ros.ros.matcher_node import build_matches_msg

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    img_rgb = deserialize_message(serialize_message(array_to_image_msg(rgb)), Image)
    img_bgr = deserialize_message(serialize_message(array_to_image_msg(rgb)), Image)
    img_bgr.encoding = "bgr8"
    n = args.matches
    result = MatchResult(keypoints0=rng.random((n, 2), dtype=np.float32) * WIDTH,
                         keypoints1=rng.random((n, 2), dtype=np.float32) * WIDTH,
                         confidence=rng.random(n, dtype=np.float32), image0_size=(WIDTH, HEIGHT),
                         image1_size=(WIDTH, HEIGHT), timings_ms={"inference": 1.0})
    info = {"variant": "eloftr", "backend": "torch", "precision": "fp32"}

    conv_ms, build_ms = [], []
    for _ in range(args.pairs):
        t0 = time.perf_counter()
        a0 = image_msg_to_array(img_rgb)
        a1 = image_msg_to_array(img_bgr)
        t1 = time.perf_counter()
        msg = build_matches_msg(KeypointMatches, img_rgb.header, img_bgr.header, a0.shape, a1.shape, result, info)
        t2 = time.perf_counter()
        conv_ms.append((t1 - t0) * 1e3)
        build_ms.append((t2 - t1) * 1e3)

    def make_matches():
        return build_matches_msg(KeypointMatches, img_rgb.header, img_bgr.header, (HEIGHT, WIDTH), (HEIGHT, WIDTH),
                                 result, info)

    pub_ms, lat_ms = measure_transport("matches", make_matches, args.pairs, args.domain)
    img_pub_ms, img_lat_ms = measure_transport("image", lambda: array_to_image_msg(rgb), args.pairs, args.domain)
    size_kb = len(serialize_message(msg)) / 1024

    print(f"ROS overhead per pair, {n} matches ({size_kb:.0f} KiB KeypointMatches), {args.pairs} samples each")
    print(f"  Image -> array (rgb8 + bgr8 {WIDTH}x{HEIGHT}) : {percentiles(conv_ms)}")
    print(f"  MatchResult -> KeypointMatches         : {percentiles(build_ms)}")
    print(f"  publish KeypointMatches (call)         : {percentiles(pub_ms)}")
    print(f"  KeypointMatches one-way to a subscriber: {percentiles(lat_ms)}")
    print(f"  Image {WIDTH}x{HEIGHT} rgb8 one-way (x2/pair) : {percentiles(img_lat_ms)}")
    node_side = statistics.median(conv_ms) + statistics.median(build_ms) + statistics.median(pub_ms)
    print(f"  node-side total (convert + build + publish), median: {node_side:.3f} ms per pair "
          f"(target <= 1 ms beyond inference)")
    print(f"  end to end incl. delivery of the result, median: "
          f"{statistics.median(conv_ms) + statistics.median(build_ms) + statistics.median(lat_ms):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
