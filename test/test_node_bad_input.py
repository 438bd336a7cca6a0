"""A node started with a checkpoint that does not exist stays up, says why, and recovers by a parameter
change. (Bad input to a running node: test_bad_input_catalogue.py, one test per docs/node.md row.)"""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402  (after register_assert_rewrite)
    NODE_CMD,
    NODE_ENV,
    NodeClient,
    StereoIO,
    make_test_images,
    node_params,
    ros_args_for,
)

pytestmark = pytest.mark.ros
pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

IMAGES = make_test_images()


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
    # WARN while the unmatched pairs are in the diagnostics window, then OK
    client.wait_diagnostics(lambda v: v["matcher_state"] == "ready" and v["_level"] == 0, timeout=30)
