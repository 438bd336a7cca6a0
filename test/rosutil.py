"""Harness for ROS 2 tests: real rclpy + Fast DDS between real processes, one DDS domain per test.

How to use it (fixtures are in conftest.py; mark such tests ``@pytest.mark.ros``)::

    @pytest.mark.ros
    def test_node_answers(ros_env):
        # ros_env: RosEnv holding a ROS_DOMAIN_ID no other test (or pytest run) on this machine
        # uses, discovery on loopback only; everything it started is stopped at teardown.
        node = ros_env.start_node(["matcher_node"], ros_args=["-r", "__ns:=/stereo", "-p", "variant:=eloftr"])
        probe = ros_env.probe("probe")            # an rclpy node in THIS process, on the same domain
        inbox = probe.subscribe(KeypointMatches, "/stereo/matches")
        pub = probe.publisher(Image, "/stereo/left/image_raw")
        probe.publish_until(pub, make_image(), lambda: len(inbox) > 0, timeout=30, what="first matches")
        node.assert_running()
        ...

* ``start_node(cmd, ros_args=..., name=...)`` runs ``cmd + ["--ros-args", *ros_args]`` as a
  subprocess with the test's domain in its environment; stdout+stderr go to a log file.
  ``NodeProcess.stop()`` sends SIGINT (rclpy's clean shutdown), then SIGTERM, then SIGKILL, and
  returns the exit code; ``wait_for_output(regex)`` waits for a log line; ``log()`` reads it.
  When a test fails, the logs of every process it started are printed in the teardown report.
* ``probe(name)`` gives a ``Probe``: an rclpy node in its own ``Context`` (no global rclpy state
  leaks between tests) with ``subscribe`` (returns a list that fills with messages),
  ``publisher``, ``spin_until(condition)``, ``publish_until(pub, msg, condition)`` (publishes
  repeatedly: DDS discovery takes about a second, a single early publish is lost) and
  ``wait_for_messages(inbox, count)``. Every wait has a timeout and raises ``TimeoutError``
  saying what it waited for.
* ``ros_env.env`` is the environment for any other subprocess that must be on the test's domain.

Helper programs a test needs can live in the test file itself (run it with ``sys.executable``
and a flag, see test_messages.py): the harness cares only about the command line.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_TIMEOUT_S = 30.0
SPIN_STEP_S = 0.05


def ros_environment(domain_id: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a ROS process on `domain_id` with loopback-only discovery."""
    env = dict(os.environ if base is None else base)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    use_shipped_dds_profile(env)
    env["PYTHONUNBUFFERED"] = "1"  # so a node's log file is complete when a test reads it
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    return env


def use_shipped_dds_profile(env: dict[str, str] | os._Environ[str]) -> None:
    """The shipped Fast DDS profile, as env.sh and the launch file set it (camera-sized best-effort images),
    unless the environment names one (an empty value measures the built-in transports)."""
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in env:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(Path(__file__).resolve().parents[1] / "config"
                                                   / "fastdds_large_images.xml")


class NodeProcess:
    """A ROS node (or any program) started by the harness, its output in `log_path`."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log_path: Path, name: str, cwd: Path | None = None):
        self.cmd = list(cmd)
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "wb")
        self.popen = subprocess.Popen(self.cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                      stdout=self._log_file, stderr=subprocess.STDOUT)
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"NodeProcess({self.name!r}, pid={self.popen.pid})"

    def log(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def assert_running(self) -> None:
        if not self.running():
            raise AssertionError(f"{self.name} exited with code {self.popen.returncode}; its output:\n{self.log()}")

    def wait_for_output(self, pattern: str, timeout: float = DEFAULT_TIMEOUT_S) -> re.Match[str]:
        """Wait until the process's output matches the regex `pattern`; fail early if it exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log())
            if found:
                return found
            if not self.running():
                raise AssertionError(f"{self.name} exited (code {self.popen.returncode}) before printing "
                                     f"/{pattern}/; its output:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} printed nothing matching /{pattern}/ in {timeout:.0f} s; "
                                   f"its output:\n{self.log()}")
            time.sleep(0.1)

    def wait(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        try:
            self.returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout:.0f} s; its output:\n{self.log()}") from None
        self._log_file.close()
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL. Returns the exit code."""
        for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        self.returncode = self.popen.wait()
        self._log_file.close()
        return self.returncode


class Probe:
    """An rclpy node inside the test process, in its own Context on the test's domain."""

    def __init__(self, name: str, domain_id: int):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        # this process's participants too: with the built-in 512 KiB shared-memory segment, two images of
        # a few hundred KB published back to back spill into fragmented UDP and best-effort readers lose them
        use_shipped_dds_profile(os.environ)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.subscriptions: dict[int, Any] = {}  # id(inbox) -> its subscription

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        if self.context.ok():
            self.context.shutdown()

    def subscribe(self, msg_type: Any, topic: str, qos: Any = 10) -> list[Any]:
        """Subscribe; the returned list receives every message in arrival order."""
        inbox: list[Any] = []
        self.subscriptions[id(inbox)] = self.node.create_subscription(msg_type, topic, inbox.append, qos)
        return inbox

    def wait_for_publisher(self, inbox: list[Any], timeout: float = 30.0, what: str = "a publisher") -> None:
        """Spin until the subscription behind `inbox` is matched with a publisher, plus a short settle:
        discovery is two-way, and a publisher that has not matched us yet drops what it sends."""
        sub = self.subscriptions[id(inbox)]
        self.spin_until(lambda: sub.get_publisher_count() > 0, timeout, what)
        self.spin_for(0.5)

    def publisher(self, msg_type: Any, topic: str, qos: Any = 10) -> Any:
        return self.node.create_publisher(msg_type, topic, qos)

    def spin_once(self, timeout: float = SPIN_STEP_S) -> None:
        self.executor.spin_once(timeout_sec=timeout)

    def spin_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.spin_once()

    def spin_until(self, condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT_S,
                   what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.spin_once()

    def publish_until(self, publisher: Any, msg: Any | Callable[[], Any], condition: Callable[[], bool],
                      timeout: float = DEFAULT_TIMEOUT_S, period: float = 0.1, what: str = "a reaction") -> int:
        """Publish `msg` (or `msg()`) every `period` s until `condition()`; returns how many were sent."""
        deadline = time.monotonic() + timeout
        sent = 0
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s ({sent} messages published on "
                                   f"{publisher.topic_name}) waiting for {what}")
            publisher.publish(msg() if callable(msg) else msg)
            sent += 1
            next_at = time.monotonic() + period
            while time.monotonic() < next_at and not condition():
                self.spin_once(min(SPIN_STEP_S, period))
        return sent

    def wait_for_messages(self, inbox: list[Any], count: int = 1, timeout: float = DEFAULT_TIMEOUT_S,
                          what: str | None = None) -> list[Any]:
        self.spin_until(lambda: len(inbox) >= count, timeout, what or f"{count} message(s)")
        return inbox


class RosEnv:
    """What the `ros_env` fixture yields: the test's domain, and everything started on it."""

    def __init__(self, domain_id: int, log_dir: Path):
        self.domain_id = domain_id
        self.log_dir = log_dir
        self.env = ros_environment(domain_id)
        self.env["ROS_LOG_DIR"] = str(log_dir / "ros_log")
        self.processes: list[NodeProcess] = []
        self.probes: list[Probe] = []

    def start_node(self, cmd: Sequence[str], ros_args: Sequence[str] = (), name: str | None = None,
                   env: dict[str, str] | None = None, cwd: Path | None = None) -> NodeProcess:
        """Start `cmd --ros-args *ros_args` (no --ros-args when ros_args is empty) on the test's domain."""
        full = list(cmd) + (["--ros-args", *ros_args] if ros_args else [])
        if name is None:
            program = cmd[1] if cmd[0] == sys.executable and len(cmd) > 1 else cmd[0]
            name = Path(program).name
        run_env = dict(self.env, **(env or {}))
        proc = NodeProcess(full, run_env, self.log_dir / f"{len(self.processes):02d}_{name}.log", name, cwd)
        self.processes.append(proc)
        return proc

    def probe(self, name: str = "test_probe") -> Probe:
        p = Probe(name, self.domain_id)
        self.probes.append(p)
        return p

    def close(self, report_logs: bool) -> None:
        for probe in self.probes:
            probe.close()
        codes = {proc: proc.stop() for proc in self.processes}
        if report_logs:
            for proc, code in codes.items():
                print(f"\n===== {proc.name} (exit {code}): {shlex.join(proc.cmd)}\n{proc.log()}", file=sys.stderr)
