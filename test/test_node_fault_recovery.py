"""Inference that fails and then works again: the node logs each failure, counts it, and matches the next pair.

The node under test is the real matcher node in its own process (`matcher_node.main` with a subclass,
`FaultyMatcherNode`, run by this file as a program): its matcher's backend is the real torch backend
wrapped so that the next runs raise the faults a test queues through the node's extra `inject_faults`
parameter (real SetParameters over DDS). The faults are the exceptions a GPU run raises and a CPU
cannot produce on demand: torch's OutOfMemoryError, a CUDA error (a RuntimeError), NumPy's MemoryError.
A real out-of-memory of the node's process is in test_bad_input_catalogue.py.
"""
from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import pytest

FAULTS = {
    "oom": lambda: __import__("torch").OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 11.80 GiB. GPU 0 has a total capacity of 7.60 GiB"),
    "cuda_error": lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    "host_memory": lambda: MemoryError("Unable to allocate 11.8 GiB for an array with shape (1, 10816, 10816)"),
}
NS = "/fault"


# ----------------------------------------------------------------------------- the node program
class FaultInjectingBackend:
    """A real backend whose next `run`s raise the queued faults (one per run), then run again."""

    def __init__(self, backend: Any, faults: deque[str]) -> None:
        self._backend, self._faults = backend, faults

    def run(self, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if self._faults:
            raise FAULTS[self._faults.popleft()]()
        return self._backend.run(graph, inputs)

    def __getattr__(self, name: str) -> Any:  # name, device, precision, graphs, close, ...
        return getattr(self._backend, name)


def faulty_node_main(argv: list[str]) -> int:
    from rclpy.parameter import Parameter

    from matchanything_ros.ros import matcher_node

    class FaultyMatcherNode(matcher_node.MatcherNode):
        def __init__(self) -> None:
            self.faults: deque[str] = deque()
            super().__init__()
            self.declare_parameter("inject_faults", "")  # e.g. "oom,oom,cuda_error": the next runs raise these
            self.add_post_set_parameters_callback(self._queue_faults)

        def _queue_faults(self, params: list[Parameter]) -> None:
            for p in params:
                if p.name == "inject_faults":
                    self.faults.extend(f for f in str(p.value).split(",") if f)

        def _build_matcher(self, params: dict[str, Any]) -> Any:
            matcher = super()._build_matcher(params)
            matcher.backend = FaultInjectingBackend(matcher.backend, self.faults)
            return matcher

    return matcher_node.main(argv, node_class=FaultyMatcherNode)


if __name__ == "__main__":
    sys.exit(faulty_node_main(sys.argv))


# ----------------------------------------------------------------------------- the tests
pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402
    NODE_ENV,
    NodeClient,
    StereoIO,
    image_msg,
    make_test_images,
    node_params,
    ros_args_for,
)

pytest_plugins = ("matcher_node_util",)


@pytest.fixture(scope="module")
def faulty(module_ros_env, seeded_checkpoint):
    # backend and device auto, as a user starts it: TensorRT is not taken here, and the node says why
    params = node_params(seeded_checkpoint, backend="auto", device="auto")
    node = module_ros_env.start_node([sys.executable, __file__], ros_args_for(params) + ["-r", f"__ns:={NS}"],
                                     name="faulty_node", env=NODE_ENV)
    node.wait_for_output(r"matcher ready", timeout=90)
    probe = module_ros_env.probe("fault_probe")
    io = StereoIO(probe, make_test_images(), prefix=NS)
    io.pairs_until_matched()
    return node, io, NodeClient(probe, f"{NS}/matcher_node")


def diagnostics_after(client: NodeClient, name: str, at_least: int) -> dict[str, str]:
    return client.wait_diagnostics(lambda v: int(v[name]) >= at_least, node_name=client.fqn)


@pytest.mark.ros
def test_inference_that_raises_n_times_is_logged_counted_and_the_node_recovers(faulty):
    node, io, client = faulty
    # the node idle first: the fixture's last pairs may still be in flight and would take the first faults
    # (a pair waits in the worker's one slot; once the newest pair is matched, none older is left)
    stamp = io.next_stamp()
    io.publish_pair(stamp)
    io.wait_match(stamp)
    errors = int(client.latest_diagnostics(node_name=client.fqn)["match_errors"])
    plan = ["oom"] * 3 + ["cuda_error"] * 3 + ["host_memory"] * 2
    client.set_ok(inject_faults=",".join(plan))
    for k, fault in enumerate(plan, 1):  # one pair at a time: each failure is counted before the next pair
        stamp = io.next_stamp()
        io.publish_pair(stamp)
        diag = diagnostics_after(client, "match_errors", errors + k)
        assert io.match_for(stamp) is None
    assert int(diag["match_errors"]) == errors + len(plan)
    assert diag["_level"] == 1 and "matching errors" in diag["_message"], diag  # WARN: in the last 5 s
    log = node.log()
    # each kind once at ERROR with its traceback; its repeats within 5 s are counted, not logged again
    for kind, text in (("OutOfMemoryError", "CUDA out of memory"), ("RuntimeError", "illegal memory access"),
                       ("MemoryError", "Unable to allocate 11.8 GiB")):
        lines = re.findall(rf"^\[ERROR\] \[[\d.]+\] \[fault\.matcher_node\]: matching failed: {kind}: .*$", log, re.M)
        assert len(lines) == 1 and text in lines[0], (kind, lines)
    assert "Traceback (most recent call last)" in log and "in run" in log
    # a warning after the errors (this used to raise "Logger severity cannot be changed between calls")
    stamp = io.next_stamp()
    small = np.ascontiguousarray(io.images[1][::4, ::4])
    io.image1.publish(image_msg(small, stamp, "right"))
    io.image0.publish(image_msg(io.images[0], stamp, "left"))
    io.wait_match(stamp)
    node.wait_for_output(r"\[WARN\] \[[\d.]+\] \[fault\.matcher_node\]: image0 is 320x256 but image1 is 80x64")
    # and good pairs match again: the same matches as before the faults
    first = io.matches[0]
    for _ in range(2):
        stamp = io.next_stamp()
        io.publish_pair(stamp)
        again = io.wait_match(stamp)
        assert bytes(again.keypoints0) == bytes(first.keypoints0)
    node.assert_running()
    # diagnostics return to OK once the failures leave the 5 s window
    recovered = client.wait_diagnostics(lambda v: v["_level"] == 0, timeout=30, node_name=client.fqn)
    assert int(recovered["match_errors"]) == errors + len(plan) and int(recovered["pairs_matched"]) >= 4


@pytest.mark.ros
def test_the_cores_log_lines_go_through_the_ros_logger(faulty):
    """Python logging of the matcher core (here: why backend auto did not take TensorRT) in the ROS log format."""
    node, _io, _client = faulty
    log = node.log()
    ros_line = r"^\[{level}\] \[[\d.]+\] \[fault\.matcher_node\]: {text}"
    assert re.search(ros_line.format(level="WARN", text=r"backend auto: not using TensorRT: \S"), log, re.M), log
    assert re.search(ros_line.format(level="INFO", text=r"backend: torch on cpu, fp32$"), log, re.M), log
    bare = [line for line in log.splitlines() if line.startswith("backend")]
    assert not bare, bare


def test_a_reporting_callback_that_raises_does_not_end_the_worker(caplog):
    """The worker thread survives a failing report (as the node's logger once raised) and runs the next pair."""
    from matchanything_ros.ros.worker import MatcherWorker

    done: list[str] = []
    taken = threading.Event()

    def process(matcher: Any, item: str) -> None:
        taken.set()
        if item == "bad":
            raise RuntimeError("inference failed")
        done.append(item)

    def on_error(exc: BaseException, trace: str) -> None:
        raise ValueError("Logger severity cannot be changed between calls.")

    worker: MatcherWorker[str] = MatcherWorker(build=lambda config: object(), process=process,
                                               on_state=lambda matcher, error: None, on_error=on_error,
                                               close=lambda matcher: None)
    worker.start({})
    try:
        worker.submit("bad")
        assert taken.wait(10)
        worker.submit("good")
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done == ["good"] and worker.thread.is_alive()
    finally:
        assert worker.stop()
    assert "matcher worker: a callback raised; the worker goes on" in caplog.text
    assert "Logger severity cannot be changed" in caplog.text
