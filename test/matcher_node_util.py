"""Helpers for the matcher-node tests (test_node*.py, test_bag.py, test_launch_config.py).

Real parts only: a checkpoint written from the shared seeded weights, real photographs from
scikit-image, the real node as a subprocess, rclpy service calls for parameters.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pytest
from reference import seeded_weights_module  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# the node's console script, as a user starts it (test_entry_points.py: every command from its entry point)
NODE_CMD = [shutil.which("matcher_node") or "matcher_node (not installed: make setup)"]
# One torch thread per process: the tests share 2 cores with other processes, and oversubscribed
# OpenMP threads make inference 5-10x slower than a single thread.
NODE_ENV = {"OMP_NUM_THREADS": "1"}
WIDTH, HEIGHT = 320, 256  # small: CPU inference stays well under a second
# Seeded weights give low dual-softmax confidences; the UI default 0.1 would keep almost nothing.
TEST_THRESHOLD = 0.001
SEED = 1234


def make_test_images() -> tuple[np.ndarray, np.ndarray]:
    """A real photograph and a homography-warped copy, RGB uint8, HEIGHT x WIDTH."""
    import cv2
    from skimage import data

    img0 = cv2.resize(data.astronaut(), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    h = np.array([[0.95, 0.05, 10.0], [-0.04, 0.97, 6.0], [1e-5, -2e-5, 1.0]])
    img1 = cv2.warpPerspective(img0, h, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
    return img0, img1


def write_seeded_checkpoint(path: Path, reference_dir: Path) -> Path:
    """A reduced ELoFTR (checkpoint + sidecar .json config) with the shared seeded weights.

    Same code as the released model, fewer/narrower layers: a pair takes well under a second on
    one CPU thread, so the node tests can send many. Weights: `seeded_tensor(key, shape, seed)`
    of the reference generator, saved as a Lightning-style {"state_dict": {"matcher.*": ...}}.
    """
    import json

    import torch

    from matchanything_ros.core.eloftr.config import EloftrConfig
    from matchanything_ros.core.eloftr.model import EloftrNet

    if path.exists():
        return path
    module = seeded_weights_module(reference_dir)
    cfg = EloftrConfig(block_dims=(32, 64, 128), layer_depths=(1, 2, 2), d_model=128, nhead=4,
                       layer_names=("self", "cross") * 2, fine_d_model=32)
    state = {f"matcher.{k}": module.seeded_tensor(f"matcher.{k}", tuple(v.shape), str(v.dtype).split(".")[-1], SEED)
             for k, v in EloftrNet(cfg).state_dict().items()}
    path.with_suffix(".json").write_text(json.dumps(cfg.to_dict()))
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state}, tmp)
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def seeded_checkpoint(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    return write_seeded_checkpoint(tmp_path_factory.getbasetemp() / "seeded_small_eloftr.ckpt", reference_dir)


def node_params(checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """Parameters of the nodes under test: CPU torch, the seeded checkpoint, a low threshold."""
    params: dict[str, Any] = {"checkpoint_path": str(checkpoint), "backend": "torch", "device": "cpu",
                              "threshold": TEST_THRESHOLD, "max_input_age": 0.0}
    params.update(overrides)
    return params


def ros_args_for(params: dict[str, Any]) -> list[str]:
    out = []
    for name, value in params.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        out += ["-p", f"{name}:={text}"]
    return out


def _library_match_in_child(params: dict[str, Any], pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[Any]:
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    with Matcher(MatcherConfig.from_params(params)) as matcher:
        return [matcher.match(a, b) for a, b in pairs]


def library_match(params: dict[str, Any], pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[Any]:
    """`Matcher.match` of the library with the node's settings, in a child process with one torch thread
    like the nodes (NODE_ENV). Not by calling torch.set_num_threads here: after any such call MKL's LU
    in torch 2.13 (RoMa's GP inverse) fails or goes wrong later in this test process."""
    ctx = multiprocessing.get_context("spawn")
    saved = {k: os.environ.get(k) for k in NODE_ENV}
    os.environ.update(NODE_ENV)  # a spawned child starts from this environment
    try:
        with ctx.Pool(1) as pool:
            return pool.apply(_library_match_in_child, (params, pairs))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def image_msg(array: np.ndarray, stamp_ns: int, frame_id: str = "cam0", encoding: str = "rgb8") -> Any:
    from sensor_msgs.msg import Image

    msg = Image(height=array.shape[0], width=array.shape[1], encoding=encoding, is_bigendian=0,
                step=array.strides[0])
    msg.data = np.ascontiguousarray(array).tobytes()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return msg


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def keypoints(msg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k0 = np.frombuffer(msg.keypoints0, dtype=np.float32).reshape(-1, 2)
    k1 = np.frombuffer(msg.keypoints1, dtype=np.float32).reshape(-1, 2)
    return k0, k1, np.frombuffer(msg.confidence, dtype=np.float32)


def diag_values(array_msg: Any, node_name: str = "matcher_node") -> dict[str, str] | None:
    """The values of the node's status: its name is the node's fully qualified name; `node_name` is that
    name or its last part."""
    for status in array_msg.status:
        if status.name == node_name or status.name.rsplit("/", 1)[-1] == node_name:
            values = {kv.key: kv.value for kv in status.values}
            values["_level"] = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) \
                else int(status.level)
            values["_message"] = status.message
            values["_hardware_id"] = status.hardware_id
            return values
    return None


def _first_values(messages: Iterable[Any], node_name: str) -> dict[str, str] | None:
    """The node's status values from the first of `messages` that carries them."""
    return next((v for v in (diag_values(m, node_name) for m in messages) if v is not None), None)


class NodeClient:
    """Parameter services and diagnostics of one matcher node, from a test Probe."""

    def __init__(self, probe: Any, node_fqn: str = "/matcher_node"):
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import GetParameters, ListParameters, SetParameters

        self.probe, self.fqn = probe, node_fqn
        self.get_client = probe.node.create_client(GetParameters, f"{node_fqn}/get_parameters")
        self.set_client = probe.node.create_client(SetParameters, f"{node_fqn}/set_parameters")
        self.list_client = probe.node.create_client(ListParameters, f"{node_fqn}/list_parameters")
        self.diagnostics = probe.subscribe(DiagnosticArray, "/diagnostics")

    def _call(self, client: Any, request: Any, timeout: float = 10.0) -> Any:
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {client.srv_name} not available after {timeout} s")
        future = client.call_async(request)
        self.probe.spin_until(future.done, timeout, f"a reply from {client.srv_name}")
        return future.result()

    def get(self, *names: str, timeout: float = 10.0) -> list[Any]:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        reply = self._call(self.get_client, GetParameters.Request(names=list(names)), timeout)
        return [parameter_value_to_python(v) for v in reply.values]

    def get_typed(self, *names: str) -> list[Any]:
        from rcl_interfaces.srv import GetParameters

        return list(self._call(self.get_client, GetParameters.Request(names=list(names))).values)

    def list_names(self) -> list[str]:
        from rcl_interfaces.srv import ListParameters

        return list(self._call(self.list_client, ListParameters.Request()).result.names)

    def set(self, **values: Any) -> list[Any]:
        """Set parameters; returns the SetParametersResult list (successful, reason)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in values.items()])
        return list(self._call(self.set_client, request).results)

    def set_ok(self, **values: Any) -> None:
        for result in self.set(**values):
            assert result.successful, result.reason

    def latest_diagnostics(self, since: float | None = None, timeout: float = 10.0,
                           node_name: str = "matcher_node") -> dict[str, str]:
        """The first diagnostics of the node received after now (or after `since`, a monotonic time)."""
        start = len(self.diagnostics)
        found: list[dict[str, str]] = []

        def check() -> bool:
            values = _first_values(self.diagnostics[start:], node_name)
            if values is not None:
                found.append(values)
            return values is not None

        self.probe.spin_until(check, timeout, "diagnostics from the node")
        return found[0]

    def newest_diagnostics(self, node_name: str = "matcher_node") -> dict[str, str] | None:
        """The node's newest diagnostics received so far (None before the first), without waiting."""
        return _first_values(reversed(self.diagnostics), node_name)

    def wait_diagnostics(self, predicate: Any, timeout: float = 20.0, node_name: str = "matcher_node") -> dict:
        """Wait for diagnostics satisfying predicate(values)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.latest_diagnostics(timeout=max(deadline - time.monotonic(), 0.1), node_name=node_name)
            if predicate(last):
                return last
        raise TimeoutError(f"diagnostics never satisfied the condition; last: {last}")


@pytest.fixture(scope="module")
def module_ros_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Like conftest's ros_env, for a whole module: one domain and one node start shared by its tests."""
    import domain_coordinator
    import rosutil
    from conftest import _require_ros_environment

    _require_ros_environment()
    failed_before = request.session.testsfailed
    with domain_coordinator.domain_id() as domain:
        env = rosutil.RosEnv(domain, tmp_path_factory.mktemp("ros"))
        try:
            yield env
        finally:
            env.close(report_logs=request.session.testsfailed > failed_before)


class StereoIO:
    """Image publishers and the matches subscription of one node, with unique increasing stamps."""

    def __init__(self, probe: Any, images: tuple[np.ndarray, np.ndarray], prefix: str = "", base_s: int = 1000,
                 wall_clock: bool = False):
        from sensor_msgs.msg import Image

        from matchanything_ros.msg import KeypointMatches

        self.probe, self.images = probe, images
        self.image0 = probe.publisher(Image, f"{prefix}/image0")
        self.image1 = probe.publisher(Image, f"{prefix}/image1")
        self.matches: list[Any] = probe.subscribe(KeypointMatches, f"{prefix}/matches")
        self._next = base_s * 1_000_000_000
        self.wall_clock = wall_clock

    def next_stamp(self) -> int:
        """Stamps 1 s apart (or now, for a node that checks max_input_age): never repeated, never older."""
        if self.wall_clock:
            self._next = max(self._next + 1_000_000, time.time_ns())
        else:
            self._next += 1_000_000_000
        return self._next

    def publish_pair(self, stamp0: int, stamp1: int | None = None, frame0: str = "left", frame1: str = "right",
                     images: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        img0, img1 = images or self.images
        self.image1.publish(image_msg(img1, stamp0 if stamp1 is None else stamp1, frame1))
        self.image0.publish(image_msg(img0, stamp0, frame0))

    def match_for(self, stamp0: int) -> Any:
        for msg in self.matches:
            if stamp_ns(msg.header.stamp) == stamp0:
                return msg
        return None

    def pairs_until_matched(self, timeout: float = 60.0, skew_ns: int = 0, period: float = 0.3) -> Any:
        """Publish fresh pairs until one comes back matched (DDS discovery loses the first ones)."""
        sent: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.matches:
                if stamp_ns(msg.header.stamp) in sent:
                    return msg
            assert time.monotonic() < deadline, f"no KeypointMatches for any of {len(sent)} pairs in {timeout} s"
            stamp = self.next_stamp()
            sent.add(stamp)
            self.publish_pair(stamp, stamp + skew_ns)
            self.probe.spin_for(period)

    def wait_match(self, stamp0: int, timeout: float = 60.0) -> Any:
        self.probe.spin_until(lambda: self.match_for(stamp0) is not None, timeout,
                              f"KeypointMatches stamped {stamp0}")
        return self.match_for(stamp0)
