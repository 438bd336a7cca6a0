"""`matchanything param list|get|set|describe NODE [NAME [VALUE]]`: a running node's parameters over its ROS
parameter services, for machines without the `ros2` CLI (`ros2 param` does the same on a ROS install).

  matchanything param list /matcher_node                  every parameter with its value (`name: value`)
  matchanything param get /matcher_node threshold          the value
  matchanything param set /matcher_node threshold 0.2      typed as the node declared it (1 -> 1.0 for a double)
  matchanything param describe /matcher_node threshold     type, range or choices, description, read-only

A refused value exits with status 1 and one line giving the node's reason. The node is found on this
shell's ROS_DOMAIN_ID (and discovery range, which env.sh sets to LOCALHOST).
"""
from __future__ import annotations

import argparse
import difflib
import os
import time
from typing import Any

from ..core.errors import MatchAnythingError

DEFAULT_TIMEOUT_S = 10.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "param", help="list, get, set or describe a running node's parameters (no ros2 CLI needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="param_action", metavar="ACTION", required=True)
    for action, names, helptext in (
            ("list", (), "every parameter of NODE with its value"),
            ("get", ("name",), "the value of parameter NAME"),
            ("set", ("name", "value"), "set NAME to VALUE (typed as the node declared NAME)"),
            ("describe", ("name",), "type, range or choices, description and whether NAME can change at run time")):
        sub = actions.add_parser(action, help=helptext, description=helptext)
        sub.add_argument("node", metavar="NODE", help="the node's name with its namespace, e.g. /stereo/matcher_node")
        for name in names:
            sub.add_argument(name, metavar=name.upper())
        sub.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                         help="seconds to wait for the node's parameter services (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    node = args.node if args.node.startswith("/") else "/" + args.node
    with ParamClient(node, args.timeout) as client:
        if args.param_action == "list":
            for name, value in client.values(client.names()).items():
                print(f"{name}: {yaml_text(value)}")
        elif args.param_action == "get":
            print(plain_text(client.values([client.checked_name(args.name)])[args.name]))
        elif args.param_action == "describe":
            print(describe_text(client.descriptor(client.checked_name(args.name))))
        else:
            old = client.values([client.checked_name(args.name)])[args.name]
            value = typed_value(args.name, args.value, client.descriptor(args.name).type)
            client.set(args.name, value)
            print(set_line(node, args.name, value, old))
    return 0


def set_line(node: str, name: str, value: Any, old: Any) -> str:
    """What `set` prints when the node took the value."""
    return f"{node}: {name} = {plain_text(value)} (was {plain_text(old)})"


def refusal(node: str, name: str, value: Any, reason: str) -> str:
    """The error of a refused `set` (one line: the CLI prints it after `matchanything param: error: `)."""
    return f"{node} refused {name} = {plain_text(value)}: {' '.join(reason.split()) or 'no reason given'}"


# ----------------------------------------------------------------------------- values as text
def plain_text(value: Any) -> str:
    """A value as a user types it: true/false, numbers, strings unquoted, lists as [a, b]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(plain_text(v) for v in value) + "]"
    if value is None:
        return "(not set)"
    return str(value)


def yaml_text(value: Any) -> str:
    """A value as a parameters file writes it (strings quoted), so `list` output can go into one."""
    if isinstance(value, str):
        return '""' if value == "" else f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return plain_text(value)


def typed_value(name: str, text: str, param_type: int) -> Any:
    """`text` as a value of the declared ROS parameter type (rcl_interfaces/ParameterType)."""
    from rcl_interfaces.msg import ParameterType as T

    def fail(what: str) -> MatchAnythingError:
        return MatchAnythingError(f"{name} is {what}; got {text!r}")

    if param_type == T.PARAMETER_BOOL:
        if text.lower() not in ("true", "false", "1", "0"):
            raise fail("true or false")
        return text.lower() in ("true", "1")
    if param_type == T.PARAMETER_INTEGER:
        try:
            return int(text)
        except ValueError:
            raise fail("an integer") from None
    if param_type == T.PARAMETER_DOUBLE:
        try:
            return float(text)
        except ValueError:
            raise fail("a number") from None
    if param_type == T.PARAMETER_STRING:
        return text
    import yaml  # arrays, and parameters declared without a type: the value as YAML reads it, like `ros2 param set`

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise fail("not a YAML value") from None


TYPE_NAMES = {1: "bool", 2: "integer", 3: "double", 4: "string", 5: "byte array", 6: "bool array",
              7: "integer array", 8: "double array", 9: "string array"}


def describe_text(d: Any) -> str:
    lines = [f"{d.name} ({TYPE_NAMES.get(d.type, 'not set')}{', read-only: set at start-up' if d.read_only else ''})"]
    if d.description:
        lines.append(f"  {d.description}")
    for r in d.floating_point_range or d.integer_range:
        lines.append(f"  range: {r.from_value} .. {r.to_value}" + (f", step {r.step}" if r.step else ""))
    if d.additional_constraints:
        lines.append(f"  constraints: {d.additional_constraints}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the client
class ParamClient:
    """An rclpy node of its own (own context) that calls another node's parameter services."""

    def __init__(self, target: str, timeout: float) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.target, self.timeout = target, timeout
        self.context = Context()
        rclpy.init(args=[], context=self.context)  # this process's argv is not for ROS
        self.node = rclpy.create_node(f"matchanything_param_{os.getpid()}", context=self.context,
                                      start_parameter_services=False, enable_rosout=False)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._clients: dict[str, Any] = {}
        self._names: list[str] | None = None

    def __enter__(self) -> "ParamClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()

    def _call(self, srv_type: Any, service: str, request: Any) -> Any:
        name = f"{self.target}/{service}"
        client = self._clients.get(name) or self._clients.setdefault(name, self.node.create_client(srv_type, name))
        deadline = time.monotonic() + self.timeout
        if not client.wait_for_service(timeout_sec=self.timeout):
            raise MatchAnythingError(f"no node {self.target} answers after {self.timeout:g} s "
                                     f"({self._nodes_seen()}; ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')})")
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=max(deadline - time.monotonic(), 1.0))
        if not future.done():
            raise MatchAnythingError(f"{self.target} did not answer {service} within {self.timeout:g} s")
        return future.result()

    def _nodes_seen(self, wait_s: float = 1.0) -> str:
        """The other nodes discovery found (a wrong namespace shows here), waiting up to `wait_s` for one."""
        deadline = time.monotonic() + wait_s
        while True:
            names = sorted(ns.rstrip("/") + "/" + n for n, ns in self.node.get_node_names_and_namespaces()
                           if not n.startswith("matchanything_param_"))
            if names or time.monotonic() > deadline:
                return "nodes seen: " + ", ".join(names) if names else "no ROS nodes seen"
            self.executor.spin_once(timeout_sec=0.1)

    def names(self) -> list[str]:
        from rcl_interfaces.srv import ListParameters

        if self._names is None:
            self._names = sorted(self._call(ListParameters, "list_parameters", ListParameters.Request()).result.names)
        return self._names

    def checked_name(self, name: str) -> str:
        """`name` if the node has that parameter, else an error naming the closest ones."""
        names = self.names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"`matchanything param list {self.target}`"
            raise MatchAnythingError(f"{self.target} has no parameter {name!r} ({hint})")
        return name

    def values(self, names: list[str]) -> dict[str, Any]:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        reply = self._call(GetParameters, "get_parameters", GetParameters.Request(names=names))
        return {n: parameter_value_to_python(v) for n, v in zip(names, reply.values)}

    def descriptor(self, name: str) -> Any:
        from rcl_interfaces.srv import DescribeParameters

        reply = self._call(DescribeParameters, "describe_parameters", DescribeParameters.Request(names=[name]))
        if not reply.descriptors:
            raise MatchAnythingError(f"{self.target} has no parameter {name!r}")
        return reply.descriptors[0]

    def set(self, name: str, value: Any) -> None:
        """Set one parameter; a refusal raises with the node's reason on one line."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        (result,) = self._call(SetParameters, "set_parameters", request).results
        if not result.successful:
            raise MatchAnythingError(refusal(self.target, name, value, result.reason))
