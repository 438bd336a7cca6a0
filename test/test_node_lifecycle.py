"""What a robot operator relies on: diagnostics whose level means something (OK / WARN / ERROR, each
tested), windowed rates and means that are never nan, and a clean exit on SIGINT/SIGTERM even while a
slow inference runs."""
from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402
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
pytest_plugins = ("matcher_node_util",)

IMAGES = make_test_images()
NAMESPACE = "/robot1/stereo"
FQN = f"{NAMESPACE}/matcher_node"
RECORDED_NAMESPACE = "/robot1/recorded"
OK, WARN, ERROR = 0, 1, 2


@pytest.fixture(scope="module")
def node(module_ros_env, seeded_checkpoint):
    params = node_params(seeded_checkpoint, max_input_age=5.0)  # the default
    proc = module_ros_env.start_node(NODE_CMD, ros_args_for(params) + ["-r", f"__ns:={NAMESPACE}"], env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    return proc


@pytest.fixture
def recorded_node(module_ros_env, seeded_checkpoint):
    """A node of its own for recorded-looking stamps: a node that has seen live stamps drops hours-old
    ones as out of order (correctly), so sharing the module's node would make the test order matter."""
    params = node_params(seeded_checkpoint, max_input_age=5.0)  # the default
    proc = module_ros_env.start_node(NODE_CMD, ros_args_for(params) + ["-r", f"__ns:={RECORDED_NAMESPACE}"],
                                     env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def probe(module_ros_env, node):
    return module_ros_env.probe("lifecycle_probe")


@pytest.fixture(scope="module")
def client(probe):
    return NodeClient(probe, FQN)


@pytest.fixture(scope="module")
def io(probe):
    io = StereoIO(probe, IMAGES, prefix=NAMESPACE, wall_clock=True)
    io.pairs_until_matched(period=1.0)
    return io


def quiet_ok(client):
    """Diagnostics once the last problem has left the window: OK."""
    return client.wait_diagnostics(lambda v: v["_level"] == OK, timeout=30, node_name=FQN)


def test_stale_pairs_warn_with_a_bag_hint_only_for_recorded_stamps(probe, recorded_node):
    node, fqn = recorded_node, f"{RECORDED_NAMESPACE}/matcher_node"
    client = NodeClient(probe, fqn)
    io = StereoIO(probe, IMAGES, prefix=RECORDED_NAMESPACE)
    io._next = time.time_ns() - 7200 * 1_000_000_000  # two hours behind: a recording played without sim time
    deadline = time.monotonic() + 30
    pattern = r"7\d{3}\.\d+ s old .*stamps 7\d{3} s behind the wall clock look recorded: replaying a bag\?"
    while not re.search(pattern, node.log()):
        assert time.monotonic() < deadline, node.log()
        io.publish_pair(io.next_stamp())
        probe.spin_for(0.3)
    diag = client.wait_diagnostics(lambda v: v["_level"] == WARN, node_name=fqn)
    assert "stale pairs" in diag["_message"], diag
    # 20 s behind (each next stamp 1 s later): a camera whose clock is off, or a slow link; not a bag
    io._next = time.time_ns() - 20 * 1_000_000_000
    for _ in range(3):
        io.publish_pair(io.next_stamp())
        probe.spin_for(0.3)
    log = node.wait_for_output(r"dropping a pair stamped .*: 1\d\.\d+ s old .*max_input_age 5.0 s\); (.*)").group(1)
    assert "camera's clock" in log and "bag" not in log


def test_ok_with_windowed_rates_means_fqn_and_device(client, io, probe):
    # each pair is published once the previous one came back matched (then 0.5 s): slower than inference on
    # any machine, so nothing is dropped and the status turns OK once the warm-up's drops left the window
    deadline = time.monotonic() + 90
    diag: dict = {}

    def count_in_window(values: dict, rate_key: str) -> float:
        return float(values.get(rate_key, 0)) * float(values.get("window_s", 0))

    # until OK with at least two matches in the window (a quiet node is OK after its first)
    while not (diag.get("_level") == OK and count_in_window(diag, "output_rate_hz") > 1.5):
        assert time.monotonic() < deadline, (diag.get("_message"), diag)
        stamp = io.next_stamp()
        io.publish_pair(stamp)
        try:
            io.wait_match(stamp, timeout=30)
        except TimeoutError:
            continue  # an image lost on the way (best effort): its pair never formed; send the next
        probe.spin_for(0.5)
        diag = client.newest_diagnostics(node_name=FQN) or {}
    assert diag["_message"] == "matching"
    assert diag["_hardware_id"].startswith("cpu")  # the device inference runs on
    # rates are per second over the window (a whole number of images in it); paced at most one pair per 0.5 s,
    # each matched before the next
    window = float(diag["window_s"])
    images_in_window = count_in_window(diag, "image0_rate_hz")
    assert images_in_window > 1.5 and abs(images_in_window - round(images_in_window)) < 0.15, diag
    assert float(diag["image0_rate_hz"]) < 2.5, diag
    # matched and synchronised agree up to the pair in flight when the status was made (rates have 2 decimals)
    assert abs(float(diag["output_rate_hz"]) - float(diag["pair_rate_hz"])) <= 1 / window + 0.011, diag
    assert float(diag["latency_ms_mean"]) > 0 and float(diag["inference_ms_mean"]) > 0
    assert not [k for k, v in diag.items() if "nan" in str(v).lower()], diag
    # nothing matched in the window: the means are left out with a reason, never nan
    idle = client.wait_diagnostics(lambda v: "timing" in v, timeout=20, node_name=FQN)
    assert "latency_ms_mean" not in idle and idle["timing"].startswith("no pair matched in the last")
    assert float(idle["output_rate_hz"]) == 0.0
    assert not [k for k, v in idle.items() if "nan" in str(v).lower()], idle


def test_warn_while_bad_inputs_occur_then_ok_again(client, io, node):
    quiet_ok(client)
    stamp = io.next_stamp()
    bad = image_msg(IMAGES[0], stamp, "left")
    bad.data = bytes(1000)  # truncated
    io.image1.publish(image_msg(IMAGES[1], stamp, "right"))
    io.image0.publish(bad)
    diag = client.wait_diagnostics(lambda v: v["_level"] == WARN, node_name=FQN)
    assert "1 bad input images" in diag["_message"] and "image0: data has 1000 bytes" in diag["_message"], diag
    node.wait_for_output(r"image stamped \d+\.\d+ s skipped: image0: data has 1000 bytes")
    quiet_ok(client)


def test_warn_while_pairs_are_dropped(client, io, probe):
    quiet_ok(client)
    for _ in range(20):  # 50 Hz, faster than inference: the latest-only slot drops (by design, counted)
        io.publish_pair(io.next_stamp())
        probe.spin_for(0.02)
    diag = client.wait_diagnostics(lambda v: v["_level"] == WARN, node_name=FQN)
    assert "pairs dropped (the matcher is slower than the input)" in diag["_message"], diag


def test_error_while_the_backend_cannot_run_then_ok(client, io, node, seeded_checkpoint, tmp_path):
    vanished = tmp_path / "deleted.ckpt"
    vanished.write_bytes(seeded_checkpoint.read_bytes())
    vanished.with_suffix(".json").write_text(seeded_checkpoint.with_suffix(".json").read_text())
    vanished.unlink()  # deleted before the node loads it
    client.set_ok(checkpoint_path=str(vanished))
    diag = client.wait_diagnostics(lambda v: v["_level"] == ERROR, node_name=FQN)
    assert diag["_message"].startswith("matcher unavailable: CheckpointError") and str(vanished) in diag["_message"]
    client.set_ok(checkpoint_path=str(seeded_checkpoint))
    io.pairs_until_matched(period=1.0)
    quiet_ok(client)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_slow_inference_exits_cleanly_within_2_s(module_ros_env, sig):
    # the bundled demo model on a 1280x720 pair with one CPU thread: seconds per inference
    proc = module_ros_env.start_node(NODE_CMD, ["-p", "backend:=torch", "-p", "device:=cpu", "-r",
                                                f"__ns:=/slow_{sig.name.lower()}"], env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    probe = module_ros_env.probe(f"slow_probe_{sig.name.lower()}")
    client = NodeClient(probe, f"/slow_{sig.name.lower()}/matcher_node")
    big = tuple(np.ascontiguousarray(np.tile(img, (3, 4, 1))[:720, :1280]) for img in IMAGES)
    io = StereoIO(probe, big, prefix=f"/slow_{sig.name.lower()}", wall_clock=True)
    deadline = time.monotonic() + 60
    while client.latest_diagnostics(node_name=client.fqn)["worker_busy"] != "True":
        assert time.monotonic() < deadline, "the node never started an inference"
        io.publish_pair(io.next_stamp())
    t0 = time.monotonic()
    proc.popen.send_signal(sig)
    code = proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    log = proc.log()
    assert code == 0, log
    assert elapsed < 2.0, f"exit took {elapsed:.2f} s\n{log}"
    for noise in ("terminate called", "context is invalid", "Traceback", "did not finish"):
        assert noise not in log, log
