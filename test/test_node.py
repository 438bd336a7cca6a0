"""The matcher node as users run it: a separate process on real DDS, fed from this process.

One node (exact sync, CPU torch, seeded ELoFTR weights, 320x256 images) serves the whole module;
tests that change parameters restore them. The burst test runs last: it floods the node.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402  (after register_assert_rewrite)
    NODE_CMD,
    NODE_ENV,
    HEIGHT,
    WIDTH,
    NodeClient,
    StereoIO,
    keypoints,
    library_match,
    node_params,
    ros_args_for,
    stamp_ns,
    make_test_images,
)

pytestmark = pytest.mark.ros
pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

IMAGES = make_test_images()
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
@pytest.fixture(scope="module")
def params(seeded_checkpoint):
    return node_params(seeded_checkpoint)


@pytest.fixture(scope="module")
def node(module_ros_env, params):
    proc = module_ros_env.start_node(NODE_CMD, ros_args_for(params), name="matcher_node", env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    return proc


@pytest.fixture(scope="module")
def probe(module_ros_env, node):
    return module_ros_env.probe("node_test_probe")


@pytest.fixture(scope="module")
def client(probe):
    return NodeClient(probe)


@pytest.fixture(scope="module")
def io(probe):
    return StereoIO(probe, IMAGES)


def test_stereo_pair_gives_matches_equal_to_the_library(probe, io, node, params):
    msg = io.pairs_until_matched()
    # header is image0's; image1's stamp and frame are explicit
    assert msg.header.frame_id == "left"
    assert stamp_ns(msg.image1_stamp) == stamp_ns(msg.header.stamp)
    assert msg.image1_frame_id == "right"
    assert (msg.image0_width, msg.image0_height, msg.image1_width, msg.image1_height) == (WIDTH, HEIGHT) * 2
    assert (msg.variant, msg.backend, msg.precision) == ("eloftr", "torch", "fp32")
    k0, k1, conf = keypoints(msg)
    (expected,) = library_match(params, [IMAGES])
    assert len(expected) > 10, "the test images should give matches at this threshold"
    assert k0.shape == expected.keypoints0.shape
    np.testing.assert_allclose(k0, expected.keypoints0, atol=1e-3)
    np.testing.assert_allclose(k1, expected.keypoints1, atol=1e-3)
    np.testing.assert_allclose(conf, expected.confidence, atol=1e-5)
    assert (conf > params["threshold"]).all()
    assert msg.inference_ms > 0
    node.assert_running()


def test_matcher_info_reaches_a_late_subscriber(module_ros_env, node, seeded_checkpoint):
    from matchanything_ros.msg import MatcherInfo

    late = module_ros_env.probe("late_info_subscriber")  # subscribes long after the node published
    inbox = late.subscribe(MatcherInfo, "/matcher_info", LATCHED)
    late.wait_for_messages(inbox, 1, timeout=15, what="the latched MatcherInfo")
    info = inbox[0]
    assert (info.variant, info.backend, info.precision) == ("eloftr", "torch", "fp32")
    assert "cpu" in info.device
    assert info.checkpoint.endswith(seeded_checkpoint.name)
    assert len(info.checkpoint_sha256) == 64
    assert info.threshold == pytest.approx(0.001)
    assert not info.is_demo_model


def test_parameters_are_declared_with_ranges_and_invalid_values_are_refused(client):
    from matchanything_ros.core.params import PARAMS

    names = set(client.list_names())
    assert {p.name for p in PARAMS} <= names
    assert "qos_overrides./image0.subscription.reliability" in names  # QoS overridable by parameters
    assert client.get("threshold", "backend", "mode") == [pytest.approx(0.001), "torch", "stereo"]
    (too_high,) = client.set(threshold=1.5)
    assert not too_high.successful and "out of range" in too_high.reason
    (bad_choice,) = client.set(preset="fisheye")
    assert not bad_choice.successful and "preset: 'fisheye' is not one of robot, hf_space" in bad_choice.reason
    (read_only,) = client.set(mode="sequential")
    assert not read_only.successful
    assert client.get("threshold", "preset", "mode") == [pytest.approx(0.001), "robot", "stereo"]


def test_threshold_reconfiguration_republishes_matcher_info(module_ros_env, probe, io, client, node):
    from matchanything_ros.msg import MatcherInfo

    inbox = probe.subscribe(MatcherInfo, "/matcher_info", LATCHED)
    probe.wait_for_messages(inbox, 1, timeout=15)
    try:
        client.set_ok(threshold=0.05)
        probe.spin_until(lambda: inbox[-1].threshold == pytest.approx(0.05), 30, "MatcherInfo with threshold 0.05")
        msg = io.pairs_until_matched()
        _, _, conf = keypoints(msg)
        assert (conf > 0.05).all()
    finally:
        client.set_ok(threshold=0.001)
        probe.spin_until(lambda: inbox[-1].threshold == pytest.approx(0.001), 30, "MatcherInfo back at 0.001")


def test_a_frame_over_the_cap_is_said_in_the_message_and_the_diagnostics(client, io):
    client.set_ok(engine_max_matches=5)  # a rebuild (the cap is no live input); thresholds stay as they were
    try:
        client.wait_diagnostics(lambda v: v["matcher_state"] == "ready")
        msg = io.pairs_until_matched()
        _, _, conf = keypoints(msg)
        assert msg.matches_capped and msg.matches_before_cap > 5 >= len(conf) > 0, (msg.matches_before_cap, len(conf))
        values = client.wait_diagnostics(lambda v: int(v["frames_capped"]) >= 1)
        assert values["_level"] == 1 and "frames over engine_max_matches" in values["_message"], values
    finally:
        client.set_ok(engine_max_matches=20000)
        client.wait_diagnostics(lambda v: v["matcher_state"] == "ready")
    msg = io.pairs_until_matched()
    assert not msg.matches_capped and msg.matches_before_cap == len(keypoints(msg)[2])


def test_diagnostics_report_rates_counters_and_backend(client, probe, io):
    io.pairs_until_matched()
    # means are over the diagnostics window: present while pairs are matched in it (levels: test_node_lifecycle)
    values = client.wait_diagnostics(lambda v: int(v["pairs_matched"]) >= 1 and "latency_ms_mean" in v)
    for key in ("image0_rate_hz", "image1_rate_hz", "pair_rate_hz", "output_rate_hz", "pairs_dropped",
                "pairs_stale", "sync_failures", "latency_ms_mean", "latency_ms_max", "inference_ms_mean"):
        float(values[key])  # present and numeric
    assert values["backend"] == "torch" and "cpu" in values["device"]
    assert values["matcher_state"] == "ready"
    assert values["_level"] != 2  # not ERROR (WARN when a pair was dropped in the window)
    assert values["_hardware_id"].startswith("cpu")


def test_debug_image_is_built_only_while_subscribed(probe, io, client):
    from sensor_msgs.msg import Image

    io.pairs_until_matched()
    before = client.latest_diagnostics()
    assert before["debug_images_built"] == "0", "nobody subscribed to debug_image yet"
    debug = []
    sub = probe.node.create_subscription(Image, "/debug_image", debug.append, 1)
    try:
        deadline = time.monotonic() + 30
        while not debug:
            assert time.monotonic() < deadline, "no debug image while subscribed"
            io.publish_pair(io.next_stamp())
            probe.spin_for(0.4)
        img = debug[0]
        assert (img.width, img.encoding) == (2 * WIDTH, "rgb8")  # side by side
        assert img.height >= HEIGHT  # (core.viz may add a caption strip)
        assert img.header.frame_id == "left"
    finally:
        probe.node.destroy_subscription(sub)
    probe.spin_for(1.5)  # the node learns that the subscriber left
    built = int(client.latest_diagnostics()["debug_images_built"])
    assert built >= 1
    io.pairs_until_matched()
    io.pairs_until_matched()
    assert int(client.latest_diagnostics()["debug_images_built"]) == built


def test_exact_sync_rejects_skew_and_hints_at_approximate_sync(probe, io, client):
    sent = []
    deadline = time.monotonic() + 20
    found = None
    while found is None:
        assert time.monotonic() < deadline, "no diagnostics hint about approximate_sync"
        stamp = io.next_stamp()
        sent.append(stamp)
        io.publish_pair(stamp, stamp + 20_000_000)  # image1 20 ms later
        probe.spin_for(0.1)
        for msg in client.diagnostics:
            status = [s for s in msg.status if s.name == "/matcher_node"]  # the node's fully qualified name
            if status and "try approximate_sync" in status[0].message:
                found = status[0]
    assert found.level == b"\x01" or found.level == 1  # WARN
    assert not any(io.match_for(s) for s in sent)


def test_approximate_sync_pairs_within_tolerance_and_rejects_beyond(probe, io, client):
    client.set_ok(approximate_sync=True, approximate_sync_tolerance_seconds=0.05)
    try:
        msg = io.pairs_until_matched(skew_ns=20_000_000)
        assert stamp_ns(msg.image1_stamp) - stamp_ns(msg.header.stamp) == 20_000_000
        failures = int(client.latest_diagnostics()["sync_failures"])
        far = []
        for _ in range(8):  # 200 ms apart: beyond the 50 ms tolerance (frames are 1 s apart)
            stamp = io.next_stamp()
            far.append(stamp)
            io.publish_pair(stamp, stamp + 200_000_000)
            probe.spin_for(0.15)
        probe.spin_for(1.0)
        assert not any(io.match_for(s) for s in far)
        assert int(client.latest_diagnostics()["sync_failures"]) > failures
    finally:
        client.set_ok(approximate_sync=False, approximate_sync_tolerance_seconds=0.0)


def test_burst_faster_than_inference_keeps_the_node_responsive(probe, io, client, node):
    io.pairs_until_matched()
    before = client.latest_diagnostics()
    burst = [io.next_stamp() for _ in range(100)]
    for stamp in burst:
        io.publish_pair(stamp)
    # while the node works through the burst: parameters and diagnostics still answer
    t0 = time.monotonic()
    assert client.get("threshold") == [pytest.approx(0.001)]
    during = client.latest_diagnostics(timeout=5)
    answer_s = time.monotonic() - t0
    final = io.next_stamp()
    io.publish_pair(final)
    final_sent_at = len(io.matches)
    deadline = time.monotonic() + 60
    while io.match_for(final) is None:  # the newest pair is always processed: no queue in front of it
        assert time.monotonic() < deadline, "the pair sent after the burst was never matched"
        probe.spin_for(0.2)
    burst_set = set(burst)
    matched_from_burst = [m for m in io.matches if stamp_ns(m.header.stamp) in burst_set]
    late = [m for m in io.matches[final_sent_at:] if stamp_ns(m.header.stamp) in burst_set]
    after = client.wait_diagnostics(lambda v: int(v["pairs_matched"]) >= int(before["pairs_matched"]) + 2)
    print(f"\nburst: {len(matched_from_burst)}/100 pairs matched, {len(late)} after the final pair was sent; "
          f"dropped {int(after['pairs_dropped']) - int(before['pairs_dropped'])}; parameter+diagnostics answered "
          f"in {answer_s:.2f} s; latency max {after['latency_ms_max']} ms")
    assert len(matched_from_burst) < 50  # no queue growth: most of the burst was dropped, not queued
    assert len(late) <= 2  # at most the pair in progress and the one in the slot
    assert int(after["pairs_dropped"]) > int(before["pairs_dropped"])
    assert during["matcher_state"] == "ready"
    node.assert_running()
