"""`matchanything info` tells a user what can run here and where the package's ROS files are."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_info(*args: str, env: dict[str, str] | None = None, console_script: bool = True) -> subprocess.CompletedProcess:
    if console_script:
        exe = shutil.which("matchanything", path=(env or os.environ).get("PATH"))
        assert exe, "the `matchanything` console script is not on PATH (make setup installs it)"
        cmd = [exe, "info", *args]
    else:
        cmd = [sys.executable, "-m", "matchanything_ros.cli", "info", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_info_reports_versions_backends_devices_and_share_dir():
    info = json.loads(run_info("--json").stdout)

    from matchanything_ros import __version__
    assert info["package"]["version"] == __version__
    backends = info["backends"]
    assert set(backends) == {"torch", "onnxruntime", "tensorrt", "pycuda"}
    # torch and onnxruntime are pinned requirements: they must be found, at the installed versions
    assert backends["torch"]["importable"] and backends["torch"]["version"] == dist_version("torch")
    assert backends["onnxruntime"]["importable"] and backends["onnxruntime"]["version"] == dist_version("onnxruntime")
    assert "CPUExecutionProvider" in backends["onnxruntime"]["providers"]
    if all(dist_version(d) is None for d in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")):
        # only tensorrt-stubs (for mypy) is installed: `import tensorrt` succeeds as an empty
        # namespace package, which must not be reported as a usable TensorRT
        assert not backends["tensorrt"]["importable"] and backends["tensorrt"]["error"]
    if dist_version("pycuda") is None:
        assert not backends["pycuda"]["importable"] and "pycuda" in backends["pycuda"]["error"]

    assert info["devices"][0]["device"] == "cpu" and info["devices"][0]["cores"] == os.cpu_count()
    cuda_devices = [d for d in info["devices"] if d["device"].startswith("cuda")]
    assert len(cuda_devices) == len(backends["torch"]["cuda_devices"])

    ros = info["ros"]
    assert ros["rclpy"]["importable"]
    assert ros["messages"]["importable"] and ros["messages"]["types"] == ["KeypointMatches", "MatcherInfo"]
    share = Path(ros["share_dir"])
    assert (share / "package.xml").is_file() and (share / "msg" / "KeypointMatches.msg").is_file()
    assert (share / "launch").is_dir() and (share / "config").is_dir()
    assert ros["env"]["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_info_text_names_each_backend_with_its_status():
    out = run_info().stdout
    lines = out.splitlines()
    from matchanything_ros import __version__
    assert lines[0].startswith(f"matchanything_ros {__version__}")
    for backend in ("torch", "onnxruntime", "tensorrt", "pycuda"):
        line = next(ln for ln in lines if ln.split()[:1] == [backend])
        assert line.split()[1] in ("yes", "no"), line
    torch_line = next(ln for ln in lines if ln.split()[:1] == ["torch"])
    assert torch_line.split()[1:3] == ["yes", dist_version("torch")]
    share_line = next(ln for ln in lines if ln.strip().startswith("share dir"))
    assert Path(share_line.split(None, 2)[2]).is_dir(), share_line


def test_info_without_the_ros_environment_says_what_is_missing():
    # a pip-only user (no env.sh, nothing built): info still runs and explains instead of crashing
    env = {k: v for k, v in os.environ.items()
           if k not in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "LD_LIBRARY_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = run_info("--json", env=env, console_script=False)
    ros = json.loads(proc.stdout)["ros"]
    assert not ros["messages"]["importable"] and ros["messages"]["error"]
    assert ros["share_dir"] is None and ros["share_error"]
    text = run_info(env=env, console_script=False).stdout
    assert "messages     no" in text and "make setup" in text
    assert "share dir    not found" in text
