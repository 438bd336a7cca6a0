"""Build the TensorRT engine once, then exit (run it on the robot's GPU before the node):

    ros2 launch matchanything_ros build_engine.launch.py model_file_path:=/data/eloftr_onnx \
        engine_file_path:=/data/eloftr_fp16 precision:=fp16

(model_file_path: the directory `matchanything export --image-size WxH` wrote for your camera — one graph,
so one engine, `product.engine` — which can run on a desktop with torch; engine_file_path: where
`<graph>.engine` + `<graph>.engine.json` go; both empty = the cache defaults.)
The launch shuts down when the build process exits.

Runs `matchanything build-engine` with a flag for every argument given; an argument left empty
uses the CLI's default (the same defaults as the node's parameters, core/params.py). Engine
builds take minutes on a Jetson; the command prints progress, it is not hung.

As in matcher.launch.py, the launch imports are inside `generate_launch_description`, so the
argument table and `build_command` import (and are tested) without the launch packages.
"""
from __future__ import annotations

COMMAND = ["matchanything", "build-engine"]
# launch argument = the parameter (and CLI flag --name-with-dashes) it sets
# (every flag of `matchanything build-engine`; coarse_res/upsample_res find a RoMa export by its sizes)
ARGUMENTS: tuple[str, ...] = (
    "variant", "checkpoint_path", "coarse_res", "upsample_res", "model_file_path", "engine_file_path", "precision",
    "max_workspace_size", "force_engine_update", "engine_min_size", "engine_opt_size", "engine_max_size",
    "engine_max_matches", "timing_cache_path",
)


def build_command(values: dict[str, str]) -> list[str]:
    """The command line for these launch-argument values (empty = CLI default)."""
    from matchanything_ros.core.params import PARAMS_BY_NAME

    cmd = list(COMMAND)
    for name in ARGUMENTS:
        value = values.get(name, "")
        if value == "":
            continue
        spec = PARAMS_BY_NAME[name]
        typed = spec.validate(value)
        if spec.type is bool:
            cmd.append(spec.cli_flag if typed else "--no-" + spec.cli_flag[2:])
        else:
            cmd += [spec.cli_flag, str(typed)]
    return cmd


def generate_launch_description():  # type: ignore[no-untyped-def]
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.events import Shutdown
    from launch.substitutions import LaunchConfiguration

    from matchanything_ros.core.params import PARAMS_BY_NAME

    def launch_setup(context, *_args, **_kwargs):  # type: ignore[no-untyped-def]
        values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
        build = ExecuteProcess(cmd=build_command(values), output="screen", emulate_tty=True)
        # build, then end the launch (whatever the exit code; the CLI prints why it failed)
        done = RegisterEventHandler(OnProcessExit(
            target_action=build, on_exit=[EmitEvent(event=Shutdown(reason="matchanything build-engine finished"))]))
        return [build, done]

    arguments = [DeclareLaunchArgument(name, default_value="",
                                       description=f"{PARAMS_BY_NAME[name].description} (empty: CLI default)")
                 for name in ARGUMENTS]
    return LaunchDescription([*arguments, OpaqueFunction(function=launch_setup)])
