"""Every command starts from its console script, as a user runs it (a subprocess, from another folder).

A command whose module imports a name that moved fails at its first line: `build-engine` did, and tests that
rebuilt its body instead of calling it did not see it. Here each subcommand's module is imported and run
through `matchanything`, `build-engine` up to its answer on a machine without TensorRT, and the command
line `launch/build_engine.launch.py` builds is run as is.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matchanything_ros.cli import build_parser

HERE = Path(__file__).resolve().parent
SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which(argv[0])
    assert exe is not None, f"console script {argv[0]} is not installed (make setup)"
    return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, cwd="/")


def test_the_cli_has_every_documented_command() -> None:
    for name in ("info", "match", "export", "build-engine", "validate", "benchmark", "bag", "replay", "demo",
                 "train-demo", "param"):
        assert name in SUBCOMMANDS


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_starts_from_the_console_script(command: str) -> None:
    proc = run("matchanything", command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: matchanything {command}" in proc.stdout


def test_node_tests_start_the_matcher_node_console_script() -> None:
    from matcher_node_util import NODE_CMD  # every node test starts the node this way

    assert NODE_CMD == [shutil.which("matcher_node")] and NODE_CMD[0] is not None


def tensorrt_answer(proc: subprocess.CompletedProcess) -> str:
    """The one line build-engine answers with here (no TensorRT on this machine), and nothing else."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_build_engine_answers_that_tensorrt_is_not_installed(tmp_path: Path) -> None:
    line = tensorrt_answer(run("matchanything", "build-engine", "--model-file-path", str(tmp_path / "ma_onnx"),
                               "--engine-file-path", str(tmp_path / "ma_engine"), "--precision", "fp16"))
    assert line.startswith("matchanything build-engine: error: TensorRT's Python package is not installed")
    assert "python3-libnvinfer" in line  # names the fix


def test_the_build_engine_launch_command_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The command the launch file starts (its own build_command, real ROS launch aside) runs as is."""
    spec = importlib.util.spec_from_file_location("build_engine_launch", HERE.parent / "launch" /
                                                  "build_engine.launch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(HERE / "launch_standin"))
    spec.loader.exec_module(module)
    for name in [m for m in sys.modules if m == "launch" or m.startswith("launch.")]:
        monkeypatch.delitem(sys.modules, name)
    given = {name: "" for name in module.ARGUMENTS}
    given.update(model_file_path=str(tmp_path / "onnx"), precision="fp16", engine_opt_size="640")
    cmd = module.build_command(given)
    assert cmd[:2] == ["matchanything", "build-engine"]
    line = tensorrt_answer(run(*cmd))
    assert "TensorRT's Python package is not installed" in line
