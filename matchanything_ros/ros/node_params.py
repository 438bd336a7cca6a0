"""Generated views of `core.params.PARAMS` for the node: config/matcher.yaml and the docs table.

Both files are written from here (`python -m matchanything_ros.ros.node_params yaml|markdown`)
and tests compare them with this output, so no default is maintained twice by hand.
"""
from __future__ import annotations

import sys
import textwrap
from typing import Any

from ..core.params import PARAMS, ParamSpec

GROUP_TITLES = {"matcher": "model and matching", "engine": "ONNX / TensorRT engines",
                "build": "TensorRT engine build", "node": "node only"}


def yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # always with a decimal point: a ROS double parameter rejects `0`
    if isinstance(value, int):
        return str(value)
    return '""' if value == "" else f'"{value}"'


def params_yaml() -> str:
    lines = [
        "# matcher_node parameters (generated from matchanything_ros/core/params.py by",
        "# `python -m matchanything_ros.ros.node_params yaml`; edit a copy, or pass overrides).",
        "# `/**` applies them to the node under any namespace and name.",
        "/**:",
        "  ros__parameters:",
    ]
    for group in dict.fromkeys(p.group for p in PARAMS):  # groups in PARAMS order
        lines.append(f"    # --- {GROUP_TITLES.get(group, group)}")
        for spec in (p for p in PARAMS if p.group == group):
            for chunk in textwrap.wrap(_describe(spec), 100):
                lines.append(f"    # {chunk}")
            lines.append(f"    {spec.name}: {yaml_scalar(spec.default)}")
    return "\n".join(lines) + "\n"


def _describe(spec: ParamSpec) -> str:
    extra = []
    if spec.choices:
        extra.append("one of " + ", ".join(map(str, spec.choices)))
    if spec.min is not None or spec.max is not None:
        extra.append(f"range {_range(spec)}")
    return spec.description + (f" ({'; '.join(extra)})" if extra else "")


def _range(spec: ParamSpec) -> str:
    return f"{'(' if spec.min_exclusive else '['}{_num(spec.min)}, {_num(spec.max)}]"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else str(x)


def params_markdown() -> str:
    from .matcher_node import READ_ONLY_PARAMS  # the node's own list (imports rclpy)

    rows = ["| parameter | type | default | range / choices | live | description |",
            "| --- | --- | --- | --- | --- | --- |"]
    for spec in PARAMS:
        if spec.choices:
            constraint = " \\| ".join(map(str, spec.choices))
        elif spec.min is not None or spec.max is not None:
            constraint = _range(spec)
        else:
            constraint = ""
        live = "no (restart)" if spec.name in READ_ONLY_PARAMS else "yes"
        rows.append(f"| `{spec.name}` | {spec.type.__name__} | `{yaml_scalar(spec.default)}` | {constraint} | {live} "
                    f"| {spec.description.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "yaml"
    sys.stdout.write(params_yaml() if what == "yaml" else params_markdown())
