"""Shared pytest set-up: paths, the reference fixtures' location, and the ROS harness fixture.

Run the suite with `make test` (sets up, then runs pytest inside env.sh's environment).
ROS tests (marker `ros`) use the `ros_env` fixture; see rosutil.py for the harness.
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from reference import REFERENCE_ROOT, REPO_ROOT


# Before anything imports rclpy: loopback-only discovery, the one RMW we ship, and rcl's log
# files out of ~/.ros. (env.sh sets the first two too; this covers a bare `pytest`.)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
if "ROS_LOG_DIR" not in os.environ:
    os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="matchanything_test_roslog_")
    atexit.register(shutil.rmtree, os.environ["ROS_LOG_DIR"], True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle-seed", type=int, default=None,
                     help="run the test modules, and the tests inside each module, in an order shuffled with "
                          "this seed (finds tests that depend on what an earlier test left behind)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle-seed")
    if seed is None:
        return
    # shuffle whole modules, then the tests inside each: module-scoped fixtures (a node process, an
    # export) are still built once per module, so a shuffled run costs what a plain one does
    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(modules)
    rng.shuffle(order)
    items[:] = []
    for name in order:
        group = modules[name]
        rng.shuffle(group)
        items.extend(group)


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--shuffle-seed")
    return None if seed is None else f"test order shuffled with --shuffle-seed={seed}"


# OpenCV prepends to LD_LIBRARY_PATH when first imported: import it before any test takes a snapshot
import cv2  # noqa: E402,F401

# set by pytest itself, and by torch's inductor the first time it is used (it memoises its cache folder and
# a pointer for its compiled C++ wrappers there)
ENVIRON_OWNED_BY_TOOLS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
                          "TRITON_CACHE_DIR"}


def global_state() -> dict[str, Any]:
    """Process-wide settings a test or a library call could leave changed for the tests after it."""
    import torch

    return {
        "cwd": os.getcwd(),
        "environ": {k: v for k, v in os.environ.items() if k not in ENVIRON_OWNED_BY_TOOLS},
        "torch.grad_enabled": torch.is_grad_enabled(),
        "torch.inference_mode": torch.is_inference_mode_enabled(),
        "torch.num_threads": torch.get_num_threads(),
        "torch.default_dtype": torch.get_default_dtype(),
        "torch.deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes = []
    for key in before:
        if key == "environ":
            env0, env1 = before[key], after[key]
            for name in sorted(set(env0) | set(env1)):
                if env0.get(name) != env1.get(name):
                    changes.append(f"os.environ[{name!r}]: {env0.get(name)!r} -> {env1.get(name)!r}")
        elif before[key] != after[key]:
            changes.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    return changes


@pytest.fixture(autouse=True)
def no_global_state_left_changed() -> Iterator[None]:
    """Every test leaves the process as it found it (grad mode, torch threads and flags, environment,
    working directory, ROS domain), so no test depends on the order the suite runs in."""
    before = global_state()
    yield
    changes = state_changes(before, global_state())
    if changes:
        pytest.fail("the test left process-wide state changed: " + "; ".join(changes), pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = REFERENCE_ROOT
    if not path.is_dir():
        pytest.fail(f"reference fixtures not found at {path}; set MATCHANYTHING_REFERENCE_DIR")
    return path


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # keep each phase's report on the item, so fixtures can tell at teardown whether the test failed
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


_ros_checked: list[str] = []


def _require_ros_environment() -> None:
    """Fail (not skip) with the fix when rclpy or our generated messages cannot be imported."""
    if _ros_checked:
        return
    try:
        import rclpy  # noqa: F401

        from matchanything_ros.msg import KeypointMatches  # noqa: F401
    except Exception as exc:  # ImportError, rosidl's UnsupportedTypeSupport, missing libraries ...
        pytest.fail(f"the ROS environment is not set up ({type(exc).__name__}: {exc}). "
                    "Run the tests with `make test`, or `make setup && . ./env.sh` before pytest.", pytrace=False)
    _ros_checked.append("ok")


@pytest.fixture
def ros_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator["rosutil.RosEnv"]:  # noqa: F821
    """A ROS_DOMAIN_ID of the test's own (held until teardown), loopback discovery, started nodes stopped."""
    import domain_coordinator
    import rosutil

    _require_ros_environment()
    with domain_coordinator.domain_id() as domain:
        env = rosutil.RosEnv(domain, tmp_path / "ros")
        try:
            yield env
        finally:
            call_report = getattr(request.node, "rep_call", None)
            setup_report = getattr(request.node, "rep_setup", None)
            failed = (call_report is None or call_report.failed) or (setup_report is not None and setup_report.failed)
            env.close(report_logs=failed)
