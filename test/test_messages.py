"""Our messages travel between two real processes over Fast DDS (loopback) unchanged.

The publishing side is this same file run as a program (see `peer_main` at the bottom):
`python test_messages.py publish-matches|publish-info --ros-args ...`.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

N_MATCHES = 20_000
F32 = np.float32

# Field values that survive only if nothing on the way converts, rounds or truncates:
# stamps at the ends of their ranges, float32 extremes, a denormal, negative zero, long strings.
IMAGE0_STAMP = (1_764_000_000, 999_999_999)
IMAGE1_STAMP = (1_764_000_001, 1)
IMAGE0_FRAME = "stereo/left_camera_optical_frame"
IMAGE1_FRAME = "stereo/right_camera_optical_frame_" + "x" * 200
SIZES = {"image0_width": 4096, "image0_height": 3000, "image1_width": 1920, "image1_height": 1080}
TIMINGS = {"preprocess_ms": 1.25, "inference_ms": 123.5, "postprocess_ms": 0.0625}  # exact in float32
STRINGS = {"variant": "eloftr", "backend": "onnxruntime", "precision": "fp16"}
# the geometric verification's verdict: a homography with values float32 would round (1/3, 1e-300, ...)
GEOMETRY_MATRIX = np.array([1.0 / 3.0, -2.5e-7, 1234.5678901234567, 1e-300, -0.0, np.pi, 5e-17, -np.e, 1.0])
GEOMETRY = {"geometry_model": "homography", "num_inliers": 0, "geometry_reason": "", "verify_ms": 0.75}

INFO_FIELDS: dict[str, Any] = {
    "variant": "roma", "backend": "tensorrt", "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "precision": "fp16",
    "checkpoint": "/models/matchanything_roma.ckpt", "checkpoint_sha256": "0123456789abcdef" * 4,
    "engine_file": "/models/roma_dense_560_864_fp16.engine", "is_demo_model": True, "preset": "hf_space",
    "resize_max": 832, "force_resize_width": 640, "force_resize_height": 480, "coarse_res": 560,
    "upsample_res": 864, "threshold": 0.25, "package_version": "0.1.0",
}


def expected_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(N_MATCHES)
    kp0 = rng.uniform(-0.5, 4095.5, size=(N_MATCHES, 2)).astype(F32)
    kp1 = rng.uniform(-0.5, 1919.5, size=(N_MATCHES, 2)).astype(F32)
    conf = rng.random(N_MATCHES, dtype=F32)
    kp0[0] = (-0.0, np.finfo(F32).max)
    kp0[-1] = (np.finfo(F32).smallest_subnormal, np.finfo(F32).tiny)
    kp1[N_MATCHES // 2] = (-np.finfo(F32).max, np.inf)
    conf[[0, -1]] = (0.0, np.nextafter(F32(1.0), F32(0.0)))
    return {"keypoints0": kp0.ravel(), "keypoints1": kp1.ravel(), "confidence": conf}


def expected_inliers() -> np.ndarray:
    """One flag per match, irregular (not a repeating pattern a truncation or shift would keep)."""
    return np.random.default_rng(7).random(N_MATCHES) < 0.7


def make_keypoint_matches() -> Any:
    from matchanything_ros.msg import KeypointMatches

    msg = KeypointMatches()
    msg.header.stamp.sec, msg.header.stamp.nanosec = IMAGE0_STAMP
    msg.header.frame_id = IMAGE0_FRAME
    msg.image1_stamp.sec, msg.image1_stamp.nanosec = IMAGE1_STAMP
    msg.image1_frame_id = IMAGE1_FRAME
    for name, value in {**SIZES, **TIMINGS, **STRINGS}.items():
        setattr(msg, name, value)
    for name, arr in expected_arrays().items():
        setattr(msg, name, arr)
    inliers = expected_inliers()
    msg.inliers = inliers.tolist()
    msg.geometry_matrix = GEOMETRY_MATRIX
    for name, value in {**GEOMETRY, "num_inliers": int(inliers.sum())}.items():
        setattr(msg, name, value)
    return msg


def make_matcher_info() -> Any:
    from matchanything_ros.msg import MatcherInfo

    msg = MatcherInfo(**INFO_FIELDS)
    msg.header.stamp.sec, msg.header.stamp.nanosec = IMAGE0_STAMP
    msg.header.frame_id = IMAGE0_FRAME
    return msg


def latched_qos() -> Any:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.mark.ros
def test_20000_matches_arrive_bit_exact_in_another_process(ros_env):
    from matchanything_ros.msg import KeypointMatches

    publisher = ros_env.start_node([sys.executable, __file__, "publish-matches"], ros_args=["-r", "__ns:=/stereo"])
    probe = ros_env.probe()
    inbox = probe.subscribe(KeypointMatches, "/stereo/matches")
    probe.wait_for_messages(inbox, 1, timeout=60, what="KeypointMatches from the publisher process")
    msg = inbox[0]

    for name, want in expected_arrays().items():
        got = np.frombuffer(getattr(msg, name), dtype=F32)
        assert got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), f"{name} differs in {np.count_nonzero(got != want)} values"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == IMAGE0_STAMP
    assert (msg.image1_stamp.sec, msg.image1_stamp.nanosec) == IMAGE1_STAMP
    assert (msg.header.frame_id, msg.image1_frame_id) == (IMAGE0_FRAME, IMAGE1_FRAME)
    assert {k: getattr(msg, k) for k in SIZES} == SIZES
    assert {k: getattr(msg, k) for k in TIMINGS} == TIMINGS
    assert {k: getattr(msg, k) for k in STRINGS} == STRINGS
    # the verdict: one flag per match in order, the matrix in float64 bit for bit, name, count, time
    inliers = expected_inliers()
    assert len(msg.inliers) == N_MATCHES and np.array_equal(np.asarray(msg.inliers, bool), inliers)
    assert np.asarray(msg.geometry_matrix, np.float64).tobytes() == GEOMETRY_MATRIX.tobytes()
    assert {k: getattr(msg, k) for k in GEOMETRY} == {**GEOMETRY, "num_inliers": int(inliers.sum())}
    assert publisher.stop() == 0, publisher.log()


@pytest.mark.ros
def test_matcher_info_is_latched_for_late_subscribers(ros_env):
    from matchanything_ros.msg import MatcherInfo

    publisher = ros_env.start_node([sys.executable, __file__, "publish-info"], ros_args=["-r", "__ns:=/stereo"])
    publisher.wait_for_output(r"published MatcherInfo", timeout=60)
    # subscribe only after the one and only publish: transient_local must replay it
    probe = ros_env.probe()
    inbox = probe.subscribe(MatcherInfo, "/stereo/matcher_info", latched_qos())
    probe.wait_for_messages(inbox, 1, timeout=30, what="the latched MatcherInfo")
    probe.spin_for(1.0)
    assert len(inbox) == 1
    got = inbox[0]
    assert {name: getattr(got, name) for name in INFO_FIELDS} == INFO_FIELDS  # threshold 0.25 is exact in float32
    assert (got.header.stamp.sec, got.header.stamp.nanosec, got.header.frame_id) == (*IMAGE0_STAMP, IMAGE0_FRAME)
    assert publisher.stop() == 0, publisher.log()


# ----------------------------------------------------------------------------------------- peer
def peer_main(argv: list[str]) -> int:
    """The other process: publish-matches (every 0.2 s until interrupted) or publish-info (once, latched)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from matchanything_ros.msg import KeypointMatches, MatcherInfo

    rclpy.init(args=argv)
    node = rclpy.create_node("message_test_peer")
    try:
        if argv[1] == "publish-matches":
            pub = node.create_publisher(KeypointMatches, "matches", 10)
            msg = make_keypoint_matches()
            node.create_timer(0.2, lambda: pub.publish(msg))
        elif argv[1] == "publish-info":
            info_pub = node.create_publisher(MatcherInfo, "matcher_info", latched_qos())
            info_pub.publish(make_matcher_info())
            print("published MatcherInfo", flush=True)
        else:
            raise SystemExit(f"unknown mode {argv[1]!r}")
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(peer_main(sys.argv))
