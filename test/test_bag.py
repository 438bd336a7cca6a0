"""`matchanything bag` on real rosbag2 files (sqlite3 and mcap), and bag replay with /clock
through the real node under use_sim_time."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402  (after register_assert_rewrite)
    NODE_CMD,
    NODE_ENV,
    NodeClient,
    image_msg,
    library_match,
    make_test_images,
    node_params,
    ros_args_for,
    stamp_ns,
)

from matchanything_ros.core.params import defaults  # noqa: E402
from matchanything_ros.ros.bag import make_typestore, process_bag, read_matches  # noqa: E402

pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

IMAGES = make_test_images()
S = 1_000_000_000


def write_image_bag(path: Path, frames: list[tuple[str, int, np.ndarray, str]], storage: str = "sqlite3") -> Path:
    """A rosbag2 with sensor_msgs/Image messages: (topic, stamp_ns, rgb array, encoding); recorded at the stamp."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = make_typestore()
    types = store.types
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for topic, stamp, array, encoding in frames:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, "sensor_msgs/msg/Image", typestore=store)
            sec, nsec = divmod(stamp, S)
            header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                                  frame_id=topic.strip("/").split("/")[0])
            data = array[:, :, ::-1] if encoding == "bgr8" else array
            msg = types["sensor_msgs/msg/Image"](
                header=header, height=array.shape[0], width=array.shape[1], encoding=encoding, is_bigendian=0,
                step=array.shape[1] * 3, data=np.ascontiguousarray(data).reshape(-1))
            writer.write(conns[topic], stamp, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    return path


def stereo_frames() -> list[tuple[str, int, np.ndarray, str]]:
    """3 exact pairs (one camera bgr8), an image without a partner, and a pair with a bad encoding."""
    img0, img1 = IMAGES
    frames = []
    for k in range(3):
        t = (100 + k) * S
        frames += [("/cam_left/image", t, img0, "rgb8"), ("/cam_right/image", t, img1, "bgr8")]
    frames.append(("/cam_left/image", 103 * S, img0, "rgb8"))  # no partner
    frames += [("/cam_left/image", 104 * S, img0, "rgb10_packed"), ("/cam_right/image", 104 * S, img1, "rgb8")]
    return sorted(frames, key=lambda f: f[1])


@pytest.fixture(scope="module")
def params(seeded_checkpoint):
    return {**defaults(), **node_params(seeded_checkpoint)}


@pytest.fixture(scope="module")
def expected(params):
    (result,) = library_match(params, [IMAGES])
    return result


def check_output(matches: list[dict], expected) -> None:
    assert [m["stamp0"] for m in matches] == [100 * S, 101 * S, 102 * S]  # input stamps, in order
    assert [m["stamp1"] for m in matches] == [100 * S, 101 * S, 102 * S]
    assert {(m["frame_id0"], m["frame_id1"]) for m in matches} == {("cam_left", "cam_right")}
    assert all(m["timestamp"] == m["stamp0"] for m in matches)
    for m in matches:
        assert m["size0"] == m["size1"] == (IMAGES[0].shape[1], IMAGES[0].shape[0])
        np.testing.assert_allclose(m["keypoints0"], expected.keypoints0, atol=1e-3)
        np.testing.assert_allclose(m["keypoints1"], expected.keypoints1, atol=1e-3)
        np.testing.assert_allclose(m["confidence"], expected.confidence, atol=1e-5)


def test_bag_command_on_sqlite3_with_debug_images(tmp_path, params, expected, seeded_checkpoint):
    src = write_image_bag(tmp_path / "in", stereo_frames())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "matchanything_ros.cli", "bag", str(src), str(out), "--debug-images",
           "--checkpoint-path", str(seeded_checkpoint), "--backend", "torch", "--device", "cpu",
           "--threshold", str(params["threshold"])]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **NODE_ENV})
    assert run.returncode == 0, run.stderr
    assert "pairs: 4 synchronized, 3 matched, 1 skipped (bad input); 1 images without a partner" in run.stdout
    assert "image0: unsupported encoding 'rgb10_packed'" in run.stderr
    assert "100.0%" in run.stderr  # progress reached the end
    check_output(read_matches(out), expected)
    from rosbags.highlevel import AnyReader

    with AnyReader([out], default_typestore=make_typestore()) as reader:
        topics = {c.topic: c.msgcount for c in reader.connections}
        debug = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()
                 if c.topic == "/debug_image"]
    assert topics == {"/matches": 3, "/debug_image": 3, "/matcher_info": 1}
    assert debug[0].width == 2 * IMAGES[0].shape[1] and debug[0].encoding == "rgb8"


def test_bag_on_mcap_is_deterministic(tmp_path, params, expected):
    src = write_image_bag(tmp_path / "in", stereo_frames(), storage="mcap")
    runs = []
    for name in ("a", "b"):
        summary = process_bag(src, tmp_path / name, params, log=lambda text: None)
        assert (summary.pairs_matched, summary.pairs_skipped, summary.sync_failures) == (3, 1, 1)
        assert (summary.image0_topic, summary.image1_topic) == ("/cam_left/image", "/cam_right/image")
        assert any((tmp_path / name).glob("*.mcap"))  # same storage as the input
        runs.append(read_matches(tmp_path / name))
    check_output(runs[0], expected)
    assert [m["raw"] for m in runs[0]] == [m["raw"] for m in runs[1]]  # byte-identical messages


def test_bag_of_compressed_images_matches_like_raw(tmp_path, params, expected):
    """image_transport's compressed topics (PNG: lossless, so the matches equal the raw images')."""
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = make_typestore()
    types = store.types
    src = tmp_path / "in"
    with Writer(src, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conns = {t: writer.add_connection(t, "sensor_msgs/msg/CompressedImage", typestore=store)
                 for t in ("/cam_left/image/compressed", "/cam_right/image/compressed")}
        for k in range(3):
            t = (100 + k) * S
            for (topic, conn), img in zip(conns.items(), IMAGES):
                header = types["std_msgs/msg/Header"](
                    stamp=types["builtin_interfaces/msg/Time"](sec=t // S, nanosec=0),
                    frame_id=topic.strip("/").split("/")[0])
                png = np.frombuffer(cv2.imencode(".png", img[:, :, ::-1])[1].tobytes(), np.uint8)
                msg = types["sensor_msgs/msg/CompressedImage"](header=header, format="rgb8; png compressed bgr8",
                                                               data=png)
                writer.write(conn, t, store.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))
    summary = process_bag(src, tmp_path / "out", params, log=lambda text: None)
    assert (summary.image0_topic, summary.image1_topic) == ("/cam_left/image/compressed",
                                                            "/cam_right/image/compressed")
    assert (summary.pairs_matched, summary.pairs_skipped) == (3, 0)
    check_output(read_matches(tmp_path / "out"), expected)


def test_bag_sync_settings_are_the_nodes(tmp_path, params):
    img0, img1 = IMAGES
    frames = [("/l", (10 + k) * S, img0, "rgb8") for k in range(3)]
    frames += [("/r", (10 + k) * S + 30_000_000, img1, "rgb8") for k in range(3)]  # 30 ms skew
    src = write_image_bag(tmp_path / "in", sorted(frames, key=lambda f: f[1]))
    exact = process_bag(src, tmp_path / "exact", params, log=lambda text: None)
    assert exact.pairs_synchronized == 0 and "try --approximate-sync" in exact.text()
    approx = process_bag(src, tmp_path / "approx", {**params, "approximate_sync": True,
                                                    "approximate_sync_tolerance_seconds": 0.05},
                         log=lambda text: None)
    assert approx.pairs_matched == 3
    stamps = [(m["stamp0"], m["stamp1"]) for m in read_matches(tmp_path / "approx")]
    assert stamps == [((10 + k) * S, (10 + k) * S + 30_000_000) for k in range(3)]
    seq = process_bag(src, tmp_path / "seq", {**params, "mode": "sequential"}, image0_topic="/l",
                      log=lambda text: None)
    assert [(m["stamp0"], m["stamp1"]) for m in read_matches(tmp_path / "seq")] == [(11 * S, 10 * S), (12 * S, 11 * S)]
    assert seq.pairs_matched == 2


@pytest.mark.ros
def test_replay_with_clock_through_the_node_under_sim_time(module_ros_env, seeded_checkpoint, tmp_path):
    """Sequential (VO) node, use_sim_time: output stamps are the bag's, each frame paired with the previous."""
    from rosgraph_msgs.msg import Clock

    from matchanything_ros.msg import KeypointMatches

    stamps = [(200 + k) * S for k in range(4)]
    bag = write_image_bag(tmp_path / "vo", [("/camera/image", t, IMAGES[k % 2], "rgb8")
                                            for k, t in enumerate(stamps)], storage="mcap")
    # A reliable subscription (as a user replaying a bag for VO sets it): a best-effort reader drops
    # the first frame whenever its half of DDS discovery finishes after the replayer starts.
    node = module_ros_env.start_node(
        NODE_CMD, ros_args_for(node_params(seeded_checkpoint, mode="sequential", max_input_age=30.0,
                                           use_sim_time=True,
                                           **{"qos_overrides./camera/image.subscription.reliability": "reliable"}))
        + ["-r", "image0:=/camera/image"],
        env=NODE_ENV)
    node.wait_for_output(r"matcher ready", timeout=90)
    probe = module_ros_env.probe("replay_probe")
    matches = probe.subscribe(KeypointMatches, "/matches")
    probe.wait_for_publisher(matches, what="the node's /matches publisher")
    client = NodeClient(probe)
    replay = module_ros_env.start_node(
        [sys.executable, "-m", "matchanything_ros.cli", "replay", str(bag), "--clock", "--rate", "1.0",
         "--wait-for-subscribers", "20"], name="replay")
    assert replay.wait(timeout=60) == 0
    try:
        probe.wait_for_messages(matches, 3, timeout=60, what="3 KeypointMatches from the replayed bag")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the node's counters: {client.latest_diagnostics()}") from exc
    assert [(stamp_ns(m.header.stamp), stamp_ns(m.image1_stamp)) for m in matches] == list(
        zip(stamps[1:], stamps[:-1]))
    assert all(m.header.frame_id == "camera" for m in matches)
    # A looping replay sets the clock back: the node starts over instead of rejecting every frame.
    looping = module_ros_env.start_node(
        [sys.executable, "-m", "matchanything_ros.cli", "replay", str(bag), "--clock", "--rate", "2.0", "--loop",
         "--wait-for-subscribers", "20"], name="replay_loop")
    first_pair = (stamps[1], stamps[0])
    probe.spin_until(lambda: sum((stamp_ns(m.header.stamp), stamp_ns(m.image1_stamp)) == first_pair
                                 for m in matches) >= 3, 60, "the first pair matched again on two more passes")
    looping.stop()
    assert "clock jumped back" in node.log()
    assert "stamp older than the previous one" not in node.log()
    # The node's clock is the bag's: a frame far older than /clock is dropped as stale.
    clock_pub = probe.publisher(Clock, "/clock")
    late = Clock()
    late.clock.sec = 1000
    image_pub = probe.publisher(type(image_msg(IMAGES[0], 0)), "/camera/image")
    before = int(client.latest_diagnostics()["pairs_stale"])
    old_stamps = [(205 + k) * S for k in range(3)]
    for t in old_stamps:
        clock_pub.publish(late)
        image_pub.publish(image_msg(IMAGES[0], t, "camera"))
        probe.spin_for(0.3)
    values = client.wait_diagnostics(lambda v: int(v["pairs_stale"]) > before)
    assert int(values["pairs_stale"]) > before
    assert not any(stamp_ns(m.header.stamp) in old_stamps for m in matches)
    node.assert_running()
