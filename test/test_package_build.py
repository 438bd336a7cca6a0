"""The package builds from a clean copy of the checkout the way a ROS 2 workspace builds it.

A real `colcon build` in a temporary workspace: messages are generated and compiled, our Python
modules land in the same `matchanything_ros` package as the generated `.msg`, and a shell that
sources only the workspace's install/setup.bash finds everything (as after `ros2 run`/`ros2 launch`
on a real install). Also checks that the package's version is the same everywhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
PKG = "matchanything_ros"
NOT_SOURCE = {".venv", "build", "install", "log", ".git", "__pycache__", ".pytest_cache", ".ruff_cache",
              ".mypy_cache", ".cache", "out", ".device"}

# Runs inside the sourced workspace; prints what it found as JSON.
CHECK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ament_index_python.packages import get_package_share_directory, get_package_prefix
    import matchanything_ros
    from matchanything_ros.core import params
    from matchanything_ros.msg import KeypointMatches, MatcherInfo
    from rclpy.serialization import deserialize_message, serialize_message

    msg = KeypointMatches(keypoints0=[1.5, 2.5], confidence=[0.75], variant="eloftr")
    back = deserialize_message(serialize_message(msg), KeypointMatches)
    share = Path(get_package_share_directory("matchanything_ros"))
    print(json.dumps({
        "share": str(share),
        "prefix": get_package_prefix("matchanything_ros"),
        "launch": share.joinpath("launch").is_dir(),
        "config": share.joinpath("config").is_dir(),
        "msg_files": sorted(p.name for p in share.joinpath("msg").glob("*.msg")),
        "package_file": matchanything_ros.__file__,
        "params_file": params.__file__,
        "msg_file": sys.modules[KeypointMatches.__module__].__file__,
        "version": matchanything_ros.__version__,
        "roundtrip": [list(back.keypoints0), list(back.confidence), back.variant],
        "info_fields": sorted(MatcherInfo.get_fields_and_field_types()),
    }))
""")


def checkout_files() -> list[Path]:
    """Files a clean clone would have, plus new files not ignored by git (relative paths)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO_ROOT, capture_output=True, check=True).stdout
        names = [Path(n) for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked archive)
        names = [p.relative_to(REPO_ROOT) for p in REPO_ROOT.rglob("*")
                 if p.is_file() and not NOT_SOURCE.intersection(p.relative_to(REPO_ROOT).parts)]
    return [n for n in names if (REPO_ROOT / n).is_file()]  # tracked files deleted in the tree are gone


def clean_build_env(tmp: Path) -> dict[str, str]:
    """The environment of a shell that has only the (wheel-installed) ROS underlay: nothing of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "MATCHANYTHING_ROOT",
                        "_ROS_WHEELS_BOOTSTRAP_COMPLETE", "COLCON_PREFIX_PATH")}
    env.update(AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV), COLCON_HOME=str(tmp / "colcon_home"),
               PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.mark.ros
@pytest.mark.slow
def test_colcon_build_of_a_clean_copy_generates_messages_and_installs_everything(tmp_path):
    ws = tmp_path / "ws"
    src = ws / "src" / PKG
    files = checkout_files()
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, src / rel)
    env = clean_build_env(tmp_path)

    t0 = time.monotonic()
    build = subprocess.run(
        ["colcon", "build", "--base-paths", "src", "--event-handlers", "console_cohesion+",
         "--cmake-args", f"-DPython3_EXECUTABLE={VENV / 'bin' / 'python'}", "-DBUILD_TESTING=OFF"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    print(f"colcon build: {time.monotonic() - t0:.1f} s")
    assert build.returncode == 0, f"colcon build failed:\n{build.stdout[-8000:]}\n{build.stderr[-4000:]}"
    assert "Finished <<< matchanything_ros" in build.stdout

    prefix = ws / "install" / PKG
    typesupport = sorted(p.name for p in (prefix / "lib").glob(f"lib{PKG}__rosidl_*.so"))
    assert f"lib{PKG}__rosidl_typesupport_c.so" in typesupport and f"lib{PKG}__rosidl_generator_py.so" in typesupport
    node_exe = prefix / "lib" / PKG / "matcher_node"  # where `ros2 run matchanything_ros matcher_node` looks
    assert node_exe.is_file() and os.access(node_exe, os.X_OK)

    # a fresh shell that sources only the workspace (+ the venv underlay, which is no colcon prefix)
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    check = subprocess.run(
        ["bash", "-c", 'set -e; . install/setup.bash; export AMENT_PREFIX_PATH="$AMENT_PREFIX_PATH:$1"; '
                       'python "$2"', "_", str(VENV), str(tmp_path / "check.py")],
        cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    found = json.loads(check.stdout.strip().splitlines()[-1])

    site = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / PKG
    assert Path(found["share"]) == prefix / "share" / PKG
    assert found["launch"] and found["config"]
    assert found["msg_files"] == ["KeypointMatches.msg", "MatcherInfo.msg"]
    # our code and the generated messages come from the one installed package, not from the checkout
    assert Path(found["package_file"]) == site / "__init__.py"
    assert Path(found["params_file"]).is_relative_to(site) and Path(found["msg_file"]).is_relative_to(site)
    assert found["roundtrip"] == [[1.5, 2.5], [0.75], "eloftr"]
    assert {"variant", "backend", "checkpoint_sha256", "is_demo_model", "threshold"} <= set(found["info_fields"])
    assert found["version"] == package_xml_version()

    # every Python file of the source package is installed (nothing silently left out)
    ours = {p.relative_to(PKG) for p in files if p.parts[0] == PKG and p.suffix == ".py"}
    installed = {p.relative_to(site) for p in site.rglob("*.py")}
    assert ours <= installed, sorted(map(str, ours - installed))
    # share/ holds exactly what launch/ and config/ hold in the checkout
    for sub in ("launch", "config"):
        want = {p.name for p in files if p.parts[0] == sub and p.name != ".gitkeep"}
        assert {p.name for p in (prefix / "share" / PKG / sub).iterdir()} == want, sub


def package_xml_version() -> str:
    match = re.search(r"<version>([^<]+)</version>", (REPO_ROOT / "package.xml").read_text())
    assert match, "package.xml has no <version>"
    return match[1]


def test_version_is_the_same_in_package_xml_python_and_pip_metadata():
    from matchanything_ros import __version__

    setup_py = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
    assert setup_py.returncode == 0, setup_py.stderr
    assert package_xml_version() == __version__ == setup_py.stdout.strip().splitlines()[-1]
