"""Bad input to a running matcher node: each case is logged with a specific message, and the node
keeps running and matches the next good pair. Also a checkpoint that does not exist."""
from __future__ import annotations

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402  (after register_assert_rewrite)
    NODE_CMD,
    NODE_ENV,
    NodeClient,
    StereoIO,
    image_msg,
    make_test_images,
    node_params,
    ros_args_for,
)

pytestmark = pytest.mark.ros
pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

IMAGES = make_test_images()


@pytest.fixture(scope="module")
def node(module_ros_env, seeded_checkpoint):
    proc = module_ros_env.start_node(NODE_CMD, ros_args_for(node_params(seeded_checkpoint)), env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    return proc


@pytest.fixture(scope="module")
def io(module_ros_env, node):
    io = StereoIO(module_ros_env.probe("bad_input_probe"), IMAGES)
    io.pairs_until_matched()  # discovery done: single messages from here on arrive
    return io


def send_bad_then_good(io, node, bad0, bad1, expected_log: str):
    """Publish one bad pair, then a good one; the log names the problem and the good pair is matched."""
    io.image1.publish(bad1)
    io.image0.publish(bad0)
    node.wait_for_output(expected_log, timeout=20)
    good = io.next_stamp()
    io.publish_pair(good)
    io.wait_match(good)
    node.assert_running()


def test_unsupported_encoding(io, node):
    stamp = io.next_stamp()
    bad0 = image_msg(IMAGES[0], stamp, "left")
    bad0.encoding = "yuv422"
    send_bad_then_good(io, node, bad0, image_msg(IMAGES[1], stamp, "right"),
                       r"skipped: image0: unsupported encoding 'yuv422' \(supported: mono8, mono16, rgb8")


def test_zero_size_image(io, node):
    stamp = io.next_stamp()
    empty = image_msg(np.zeros((0, 0, 3), np.uint8), stamp, "right")
    send_bad_then_good(io, node, image_msg(IMAGES[0], stamp, "left"), empty,
                       r"skipped: image1: zero-size image \(0x0\)")


def test_step_smaller_than_a_row(io, node):
    stamp = io.next_stamp()
    bad0 = image_msg(IMAGES[0], stamp, "left")
    bad0.step = IMAGES[0].shape[1] * 3 - 4
    send_bad_then_good(io, node, bad0, image_msg(IMAGES[1], stamp, "right"),
                       r"skipped: image0: step 956 is smaller than width\*bytes_per_pixel = 320\*3 = 960")


def test_data_not_step_times_height(io, node):
    stamp = io.next_stamp()
    bad1 = image_msg(IMAGES[1], stamp, "right")
    bad1.step = IMAGES[1].shape[1] * 3 + 8  # claims padding the data does not have
    send_bad_then_good(io, node, image_msg(IMAGES[0], stamp, "left"), bad1,
                       r"skipped: image1: data has 245760 bytes but step\*height = 968\*256 = 247808")


def test_images_of_different_sizes(io, node):
    stamp = io.next_stamp()
    small = np.ascontiguousarray(IMAGES[1][::2, ::2])
    send_bad_then_good(io, node, image_msg(IMAGES[0], stamp, "left"), image_msg(small, stamp, "right"),
                       r"image0 is 320x256 but image1 is 160x128: matching images of different sizes")
    # matched all the same, each image's keypoints in its own pixels
    msg = io.wait_match(stamp)
    assert (msg.image1_width, msg.image1_height) == (160, 128)
    k1 = np.frombuffer(msg.keypoints1, np.float32).reshape(-1, 2)
    assert (k1 < [160, 128]).all()


def test_duplicate_and_out_of_order_stamps(io, node):
    stamp = io.next_stamp()
    io.publish_pair(stamp)
    io.wait_match(stamp)
    io.image0.publish(image_msg(IMAGES[0], stamp, "left"))  # same stamp again
    node.wait_for_output(r"image0: duplicate stamp \(1\d+\.000000000 s after 1\d+\.000000000 s\); message dropped",
                         timeout=20)
    io.image1.publish(image_msg(IMAGES[1], stamp - 500_000_000, "right"))  # older than the last image1
    node.wait_for_output(r"image1: stamp older than the previous one", timeout=20)
    good = io.next_stamp()
    io.publish_pair(good)
    io.wait_match(good)
    assert sum(1 for m in io.matches if m.header.stamp.sec == stamp // 1_000_000_000) == 1


def test_missing_checkpoint_keeps_the_node_alive_and_a_fixed_path_recovers(module_ros_env, seeded_checkpoint):
    missing = "/nonexistent/matchanything_eloftr.ckpt"
    proc = module_ros_env.start_node(
        NODE_CMD, ros_args_for(node_params(seeded_checkpoint, checkpoint_path=missing)) + ["-r", "__ns:=/broken"],
        name="broken_node", env=NODE_ENV)
    proc.wait_for_output(r"the matcher could not be created: CheckpointError: .*" + missing, timeout=60)
    probe = module_ros_env.probe("broken_probe")
    client = NodeClient(probe, "/broken/matcher_node")
    io = StereoIO(probe, IMAGES, prefix="/broken")
    diag = client.wait_diagnostics(lambda v: v["_level"] == 2)  # ERROR
    assert missing in diag["_message"] and diag["matcher_state"] == "error"
    assert client.get("checkpoint_path") == [missing]  # parameters still answer
    # pairs arrive but cannot be matched: counted, not silently lost
    for _ in range(5):
        io.publish_pair(io.next_stamp())
        probe.spin_for(0.3)
    client.wait_diagnostics(lambda v: int(v["pairs_without_matcher"]) >= 1)
    proc.assert_running()
    # the fix is a parameter change, no restart
    client.set_ok(checkpoint_path=str(seeded_checkpoint))
    proc.wait_for_output(r"matcher ready", timeout=60)
    io.pairs_until_matched()
    assert client.wait_diagnostics(lambda v: v["matcher_state"] == "ready")["_level"] == 0
