"""Shared pytest set-up: paths, the reference fixtures' location, and the ROS harness fixture.

Run the suite with `make test` (sets up, then runs pytest inside env.sh's environment).
ROS tests (marker `ros`) use the `ros_env` fixture; see rosutil.py for the harness.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from reference import REFERENCE_ROOT, REPO_ROOT


# Before anything imports rclpy: loopback-only discovery, the one RMW we ship, and rcl's log
# files out of ~/.ros. (env.sh sets the first two too; this covers a bare `pytest`.)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
if "ROS_LOG_DIR" not in os.environ:
    os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="matchanything_test_roslog_")
    atexit.register(shutil.rmtree, os.environ["ROS_LOG_DIR"], True)


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
