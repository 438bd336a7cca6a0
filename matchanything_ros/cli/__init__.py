"""`matchanything` command line: one console script, one module per subcommand.

Each module in this package that defines `register(subparsers)` adds its subcommand; the
module's parser sets `func` (args -> exit code). Flags for settings are generated from
`core.params.PARAMS` by `add_param_args`, so the CLI and the ROS node share names and defaults.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Any, Iterable

from ..core.errors import MatchAnythingError
from ..core.params import PARAMS_BY_NAME


def add_param_args(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add `--flag` options for the named parameters (defaults and help from PARAMS)."""
    for name in names:
        spec = PARAMS_BY_NAME[name]
        kw: dict[str, Any] = {"dest": name, "default": spec.default,
                              "help": f"{spec.description} (default: {spec.default!r})"}
        if spec.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = spec.type
            if spec.choices:
                kw["choices"] = spec.choices
        parser.add_argument(spec.cli_flag, **kw)


def param_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The validated parameter values from parsed args."""
    return {n: PARAMS_BY_NAME[n].validate(getattr(args, n)) for n in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matchanything", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # __main__ would run the CLI on import
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MatchAnythingError as exc:
        print(f"matchanything {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
