"""`matchanything param`: a running node's parameters from the command line, without the ros2 CLI.

One node (real process, real DDS) for the module; each `matchanything param` runs as its own process on
the test's domain, as a user runs it from a shell: a threshold set this way changes the node's matches,
and a refused value is one line with the node's reason and a non-zero exit.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402
    NODE_CMD,
    NODE_ENV,
    TEST_THRESHOLD,
    StereoIO,
    keypoints,
    make_test_images,
    node_params,
    ros_args_for,
)

pytest_plugins = ("matcher_node_util",)

NS = "/param_cli"
NODE = f"{NS}/matcher_node"
HIGHER_THRESHOLD = 0.005  # the seeded model keeps 20 matches of the test pair at 0.001, 9 at this


@pytest.fixture(scope="module")
def running(module_ros_env, seeded_checkpoint):
    node = module_ros_env.start_node(NODE_CMD, ros_args_for(node_params(seeded_checkpoint)) + ["-r", f"__ns:={NS}"],
                                     name="param_cli_node", env=NODE_ENV)
    node.wait_for_output(r"matcher ready", timeout=90)
    io = StereoIO(module_ros_env.probe("param_cli_probe"), make_test_images(), prefix=NS)
    return module_ros_env, node, io


def param_cli(env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "matchanything_ros.cli", "param", *args], env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.mark.ros
def test_a_threshold_set_from_the_command_line_changes_the_matches(running):
    env, node, io = running
    before = io.pairs_until_matched()
    k0_before, _, conf_before = keypoints(before)
    assert conf_before.min() > TEST_THRESHOLD

    code, out, err = finished(param_cli(env, "set", NODE, "threshold", str(HIGHER_THRESHOLD)))
    assert code == 0, err
    assert out.strip() == f"{NODE}: threshold = {HIGHER_THRESHOLD} (was {TEST_THRESHOLD})", out

    stamp = io.next_stamp()
    io.publish_pair(stamp)
    k0_after, _, conf_after = keypoints(io.wait_match(stamp))
    # the same pair, the same model: exactly the earlier matches above the new threshold
    kept = conf_before > HIGHER_THRESHOLD
    assert 0 < len(conf_after) < len(conf_before)
    np.testing.assert_array_equal(k0_after, k0_before[kept])
    node.assert_running()


@pytest.mark.ros
def test_refused_values_are_one_line_with_the_reason_and_exit_non_zero(running):
    env, node, io = running
    # four commands at once: each is a process that discovers the node (a second or two)
    procs = {"zero": param_cli(env, "set", NODE, "threshold", "0"),
             "two": param_cli(env, "set", NODE, "threshold", "2"),
             "read_only": param_cli(env, "set", NODE, "mode", "sequential"),
             "typo": param_cli(env, "get", NODE, "treshold")}
    results = {name: finished(proc) for name, proc in procs.items()}
    expected = {
        "zero": rf"^matchanything param: error: {NODE} refused threshold = 0\.0: .*threshold.*0",
        "two": rf"^matchanything param: error: {NODE} refused threshold = 2\.0: .*out of range.*Max: 1\.0",
        "read_only": rf"^matchanything param: error: {NODE} refused mode = sequential: .*read-only",
        "typo": rf"^matchanything param: error: {NODE} has no parameter 'treshold' \(did you mean threshold\?\)",
    }
    for name, (code, out, err) in results.items():
        assert code == 1 and out == "", (name, code, out, err)
        assert len(err.strip().splitlines()) == 1 and re.search(expected[name], err), (name, err)
    # the node kept its values and still matches
    listing = param_cli(env, "list", NODE)
    description = param_cli(env, "describe", NODE, "threshold")
    code, out, err = finished(listing)
    assert code == 0, err
    assert 'mode: "stereo"' in out.splitlines() and re.search(r"^threshold: 0\.\d+$", out, re.M), out
    code, out, err = finished(description)
    assert code == 0, err
    assert out.startswith("threshold (double)") and "range: 0.0 .. 1.0" in out, out
    stamp = io.next_stamp()
    io.publish_pair(stamp)
    io.wait_match(stamp)
    node.assert_running()


@pytest.mark.ros
def test_a_node_that_is_not_there_is_named_with_the_nodes_that_are():
    """No node on the domain: one line naming what was asked and what discovery saw, after --timeout."""
    import os

    env = dict(os.environ, ROS_DOMAIN_ID="0", ROS_AUTOMATIC_DISCOVERY_RANGE="OFF")  # sees nothing at all
    proc = subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "param", "get", "nowhere/matcher_node",
                           "threshold", "--timeout", "0.5"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == ("matchanything param: error: no node /nowhere/matcher_node answers after 0.5 s "
                                   "(no ROS nodes seen; ROS_DOMAIN_ID=0)"), proc.stderr
