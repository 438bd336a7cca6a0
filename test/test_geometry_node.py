"""Verified matches from the node (issue 23): geometry essential takes each camera's camera_info paired with
its image; a missing or unfitting camera_info is a counted, logged reason in the message and the
diagnostics, never a crash; the verdict (model, matrix, one flag per match) rides in KeypointMatches;
the diagnostics give the inlier ratio; geometry settings change live.

One node (exact sync, CPU torch, seeded ELoFTR weights, 320x256 images), a separate process on real DDS.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402  (after register_assert_rewrite)
    HEIGHT,
    NODE_CMD,
    NODE_ENV,
    WIDTH,
    NodeClient,
    StereoIO,
    keypoints,
    make_test_images,
    node_params,
    ros_args_for,
)

pytestmark = pytest.mark.ros
pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

IMAGES = make_test_images()
K_LEFT = [300.0, 0.0, WIDTH / 2, 0.0, 300.0, HEIGHT / 2, 0.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def node(module_ros_env, seeded_checkpoint):  # type: ignore[no-untyped-def]
    params = node_params(seeded_checkpoint, geometry="essential", geometry_threshold_px=4.0)
    proc = module_ros_env.start_node(NODE_CMD, ros_args_for(params), name="matcher_node", env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    return proc


@pytest.fixture(scope="module")
def probe(module_ros_env, node):  # type: ignore[no-untyped-def]
    return module_ros_env.probe("geometry_test_probe")


@pytest.fixture(scope="module")
def client(probe):  # type: ignore[no-untyped-def]
    return NodeClient(probe)


class CameraIO(StereoIO):
    """StereoIO that also publishes each image's camera_info (same stamp) when `infos` is set."""

    def __init__(self, probe, images):  # type: ignore[no-untyped-def]
        from sensor_msgs.msg import CameraInfo

        super().__init__(probe, images)
        self.info0 = probe.publisher(CameraInfo, "/camera_info0")
        self.info1 = probe.publisher(CameraInfo, "/camera_info1")
        self.infos: tuple[tuple[list[float], int, int], ...] | None = None  # (K, width, height) per camera

    def publish_pair(self, stamp0, stamp1=None, frame0="left", frame1="right", images=None):  # type: ignore[no-untyped-def]
        from sensor_msgs.msg import CameraInfo

        if self.infos is not None:
            for publisher, (K, width, height), stamp in zip((self.info0, self.info1), self.infos,
                                                            (stamp0, stamp0 if stamp1 is None else stamp1)):
                msg = CameraInfo(width=width, height=height, k=K)
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), 1_000_000_000)
                publisher.publish(msg)
        super().publish_pair(stamp0, stamp1, frame0, frame1, images)


@pytest.fixture(scope="module")
def io(probe):  # type: ignore[no-untyped-def]
    return CameraIO(probe, IMAGES)


def verdict(msg) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(inlier flags, 3x3 matrix) of a KeypointMatches, checked for consistency with its matches."""
    inliers = np.asarray(msg.inliers, bool)
    assert len(inliers) == len(keypoints(msg)[2]) and msg.num_inliers == int(inliers.sum())
    return inliers, np.asarray(msg.geometry_matrix, np.float64).reshape(3, 3)


def essential_without_camera_info_is_a_counted_reason(io, client, node) -> None:  # type: ignore[no-untyped-def]
    msg = io.pairs_until_matched()
    inliers, matrix = verdict(msg)
    assert msg.geometry_model == "essential" and len(inliers) > 10  # the matches are still published
    assert not inliers.any() and not matrix.any()
    assert msg.geometry_reason.startswith("no camera_info received on /camera_info0")
    values = client.wait_diagnostics(lambda v: int(v["camera_info_missing"]) >= 1)
    assert values["geometry"] == "essential" and "camera_info" in values["last_verification_failure"]
    assert values["_level"] == 1 and "without camera_info" in values["_message"]  # WARN, saying why
    node.assert_running()
    assert "no camera_info received on /camera_info0" in node.log()


def camera_info_for_another_image_size_is_a_counted_reason(io, client, node) -> None:  # type: ignore[no-untyped-def]
    io.infos = ((K_LEFT, 640, 480), (K_LEFT, WIDTH, HEIGHT))
    io.matches.clear()
    msg = io.pairs_until_matched()
    assert "camera_info on /camera_info0 is for 640x480 images but the image is 320x256" in msg.geometry_reason
    assert not verdict(msg)[0].any()
    assert int(client.latest_diagnostics()["camera_info_inconsistent"]) >= 1
    node.assert_running()


def camera_info_gives_the_model_and_settings_change_live(io, client, node) -> None:  # type: ignore[no-untyped-def]
    io.infos = ((K_LEFT, WIDTH, HEIGHT), (K_LEFT, WIDTH, HEIGHT))
    io.matches.clear()
    msg = io.pairs_until_matched()
    assert msg.geometry_model == "essential" and "camera_info" not in msg.geometry_reason, msg.geometry_reason
    inliers, matrix = verdict(msg)
    if msg.geometry_reason == "":  # a model: on the essential manifold (singular values 1, 1, 0)
        assert inliers.any() and np.linalg.svd(matrix, compute_uv=False) == pytest.approx([1, 1, 0], abs=1e-6)

    # live: a homography, then its inliers only; the diagnostics give the inlier ratio
    client.set_ok(geometry="homography", geometry_threshold_px=8.0)
    io.matches.clear()
    msg = io.pairs_until_matched()
    inliers, matrix = verdict(msg)
    assert msg.geometry_model == "homography" and msg.geometry_reason == "" and msg.verify_ms > 0
    assert inliers.any() and matrix[2, 2] == pytest.approx(1.0)
    ratio = msg.num_inliers / len(inliers)
    values = client.wait_diagnostics(lambda v: "inlier_ratio_last" in v)
    assert 0 < float(values["inlier_ratio_mean"]) <= 1 and int(values["pairs_verified"]) >= 1
    client.set_ok(publish_inliers_only=True)
    io.matches.clear()
    msg = io.pairs_until_matched()
    inliers, _ = verdict(msg)
    assert len(inliers) == msg.num_inliers and inliers.all()
    assert float(client.latest_diagnostics()["inlier_ratio_last"]) < 1.0 or ratio == 1.0  # of all the matches
    client.set_ok(geometry="none", publish_inliers_only=False)
    io.matches.clear()
    msg = io.pairs_until_matched()
    assert (msg.geometry_model, len(msg.inliers), msg.num_inliers) == ("", 0, 0)
    node.assert_running()


def test_camera_info_missing_then_wrong_then_right_and_settings_changed_live(io, client, node) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """One node's story in order (the node keeps the newest camera_info, so the steps cannot run in any order):
    no camera_info yet, then one for another image size, then the right one and live setting changes."""
    essential_without_camera_info_is_a_counted_reason(io, client, node)
    camera_info_for_another_image_size_is_a_counted_reason(io, client, node)
    camera_info_gives_the_model_and_settings_change_live(io, client, node)
