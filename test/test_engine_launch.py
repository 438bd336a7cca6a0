"""launch/build_engine.launch.py, executed: what it declares and the process it starts.

The real `launch` package is not on PyPI (`pip index versions ros-launch`/`ros-launch-ros`: none),
so `generate_launch_description()` runs against test/launch_standin/, which records what the
file hands to each launch class. The command it builds is parsed by the real CLI.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from matchanything_ros.cli import build_parser
from matchanything_ros.cli.build_engine import BUILD_PARAMS
from matchanything_ros.core.params import PARAMS_BY_NAME

HERE = Path(__file__).resolve().parent
LAUNCH_FILE = HERE.parent / "launch" / "build_engine.launch.py"


@pytest.fixture
def launch_module(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(HERE / "launch_standin"))
    for name in [m for m in sys.modules if m == "launch" or m.startswith("launch.")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location("build_engine_launch", LAUNCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in [m for m in sys.modules if m == "launch" or m.startswith("launch.")]:
        del sys.modules[name]


def test_launch_declares_every_build_engine_parameter(launch_module) -> None:
    import launch.actions as actions

    description = launch_module.generate_launch_description()
    declared = [e for e in description.entities if isinstance(e, actions.DeclareLaunchArgument)]
    names = [e.args[0] for e in declared]
    assert sorted(names) == sorted(BUILD_PARAMS)  # the launch passes on every flag the build takes
    for arg in declared:
        assert arg.kwargs["default_value"] == "", arg.args[0]  # empty = the CLI's default
        assert PARAMS_BY_NAME[arg.args[0]].description in arg.kwargs["description"]


def test_launch_runs_the_build_then_shuts_down(launch_module) -> None:
    import launch
    import launch.actions as actions
    import launch.event_handlers as handlers
    import launch.events as events

    description = launch_module.generate_launch_description()
    opaque = [e for e in description.entities if isinstance(e, actions.OpaqueFunction)]
    assert len(opaque) == 1
    given = {name: "" for name in launch_module.ARGUMENTS}
    given.update(model_file_path="/data/eloftr_onnx", precision="fp16", engine_opt_size="640",
                 force_engine_update="true", timing_cache_path="/data/trt.cache")
    started = opaque[0].kwargs["function"](launch.LaunchContext(given))
    process, handler = started
    assert isinstance(process, actions.ExecuteProcess) and isinstance(handler, actions.RegisterEventHandler)
    cmd = process.kwargs["cmd"]
    assert cmd[:2] == ["matchanything", "build-engine"]
    args = build_parser().parse_args(cmd[1:])
    assert (args.model_file_path, args.precision, args.engine_opt_size, args.force_engine_update,
            args.timing_cache_path) == ("/data/eloftr_onnx", "fp16", 640, True, "/data/trt.cache")
    assert args.engine_max_size == PARAMS_BY_NAME["engine_max_size"].default  # not given: the default
    on_exit = handler.args[0]
    assert isinstance(on_exit, handlers.OnProcessExit) and on_exit.kwargs["target_action"] is process
    (emit,) = on_exit.kwargs["on_exit"]
    assert isinstance(emit, actions.EmitEvent) and isinstance(emit.kwargs["event"], events.Shutdown)


def test_a_bad_launch_value_is_refused_with_the_parameter_name(launch_module) -> None:
    import launch
    import launch.actions as actions

    description = launch_module.generate_launch_description()
    opaque = next(e for e in description.entities if isinstance(e, actions.OpaqueFunction))
    given = {name: "" for name in launch_module.ARGUMENTS}
    given["engine_opt_size"] = "big"
    with pytest.raises(ValueError, match="engine_opt_size: expected an integer"):
        opaque.kwargs["function"](launch.LaunchContext(given))
