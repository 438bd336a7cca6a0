"""Docs that cannot drift: the commands, sample output lines and paths of README.md and docs/*.md.

* every path the docs name in code exists (relative to the repository, to the doc, or to the package for
  modules named `core/...`), and every relative link resolves;
* every `matchanything` command in a code block parses with the real argument parser (flags, choices,
  types), every `matchanything` command in running text uses flags its subcommand has; `matcher_node`
  parameters are declared ones with values the node takes (floats with a decimal point); `ros2 launch`
  arguments are the launch file's; `make` targets exist; `python -m` modules exist;
* sample output is compared with what the command prints: the demo's summary line against a real match
  of the demo pair (figures equal, times inside the range the doc gives for its machine), the
  `matchanything param` transcript against the CLI's own formatting of the defaults and refusals;
* `benchmark` labels each row with the canvas that row ran at.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# paths of other projects that the docs quote: not ours to have
FOREIGN_PATHS = {"docs/operators.md"}  # onnx-tensorrt's operator list (docs/engines.md)
# The docs name modules by their path in the package (`core/params.py`); every other path is from the
# repository's root (what a user types in a shell there; `data/demo_stereo/` was not one) or the doc's folder.
PACKAGE_MODULE_DIRS = ("core/", "ros/", "cli/", "training/")
SKIP_DIRS = {".git", ".venv", "build", "install", "log", "out", "__pycache__", ".pytest_cache", ".mypy_cache",
             ".ruff_cache"}


def rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


# ----------------------------------------------------------------------------- code in the docs
def fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of each ``` block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        yield m.group(1), m.group(2)


def inline_code(text: str) -> list[str]:
    """The `code spans` outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def block_commands(text: str) -> Iterator[str]:
    """Shell commands of the fenced blocks: every line of bash blocks, `$ ` lines of any block;
    continuation lines joined, comments dropped, `&&`, `;`, `|` and a trailing `&` split."""
    for lang, body in fenced_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            if line.startswith("$ "):
                line = line[2:]
            elif lang not in ("bash", "sh"):
                continue
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in re.split(r"&&|;|\|", line):
                part = part.strip().rstrip("&").strip()
                if part:
                    yield part


# ----------------------------------------------------------------------------- paths
def repo_names() -> set[str]:
    """Every file and folder name in the repository (its sources, not build outputs)."""
    names: set[str] = set()
    for _root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names.update(dirs)
        names.update(files)
    return names


def path_tokens(text: str) -> Iterator[str]:
    """Words of the doc's code that look like paths of this repository (see `test_paths_in_the_docs_exist`)."""
    code = " ".join(inline_code(text)) + " " + " ".join(body for _lang, body in fenced_blocks(text))
    for word in code.split():
        word = word.strip("()[],;'\"`")
        if "=" in word and ":=" not in word:
            word = word.split("=", 1)[1].strip("'\"")  # TESTS=test/x.py, FASTDDS_...=path
        word = word.split("::", 1)[0]  # a pytest node id
        if "/" not in word or word.startswith(("/", "~", "$", "-", "http")) or any(c in word for c in "<>:"):
            continue
        if "..." in word:
            continue
        yield word


def test_paths_in_the_docs_exist() -> None:
    """A word with a slash whose first part is a name in this repository must be a path that exists (globs: match
    something); relative links must resolve. (`data/demo_stereo/` was given for matchanything_ros/data/demo_stereo/.)"""
    names = repo_names() | {"."}
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for word in sorted(set(path_tokens(text))):
            first = word.split("/", 1)[0]
            if first not in names or word in FOREIGN_PATHS or re.fullmatch(r"matchanything_ros/[A-Z]\w*", word):
                continue  # not one of ours (a ROS type name is `package/Type`)
            bases = [REPO, doc.parent] + ([REPO / "matchanything_ros"] if word.startswith(PACKAGE_MODULE_DIRS) else [])
            if word.startswith("matchanything_ros/") and (REPO / word.removeprefix("matchanything_ros/")).exists():
                continue  # from a colcon workspace's src/ (README): the clone's own folder is matchanything_ros/
            if not any(list(base.glob(word)) if "*" in word else (base / word).exists() for base in bases):
                missing.append(f"{rel(doc)}: {word}")
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            target = link.split("#", 1)[0]
            if target and not target.startswith(("http://", "https://", "mailto:")) \
                    and not (doc.parent / target).exists():
                missing.append(f"{rel(doc)}: link {link}")
    assert not missing, "paths in the docs that do not exist:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- commands
def cli_parser() -> argparse.ArgumentParser:
    from matchanything_ros.cli import build_parser

    return build_parser()


def subparser_for(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (nested) subcommand parser the words name, and the words after the subcommands."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


def synopsis_words(command: str) -> list[str]:
    """A command's words; a synopsis's optional [--flag VALUE] groups kept, [words like these] and ... dropped."""
    command = re.sub(r"\[(?!-)[^\]]*\]", " ", command)
    return [w for w in shlex.split(command.replace("[", " ").replace("]", " ")) if w != "..."]


def parse_problem(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's complaint about `args`, or None."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exit"
    return None


def launch_arguments(path: Path) -> set[str]:
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = set(getattr(module, "ARGUMENTS", ()))
    for table in ("PARAMETER_ARGUMENTS", "REMAP_ARGUMENTS", "OTHER_ARGUMENTS"):
        names |= set(getattr(module, table, {}))
    return names


def node_parameter_problem(name: str, value: str) -> str | None:
    """Why `-p name:=value` would not be taken by the node (None: it would)."""
    from matchanything_ros.core.errors import ConfigError
    from matchanything_ros.core.params import PARAMS_BY_NAME

    if name == "use_sim_time" or name.startswith("qos_overrides."):
        return None
    spec = PARAMS_BY_NAME.get(name)
    if spec is None:
        return f"no parameter {name!r}"
    if "..." in value or "$" in value:
        return None  # a placeholder
    if spec.type is float and not re.search(r"[.eE]|nan|inf", value):
        return f"{name}:={value} is an integer to ROS; the parameter is a double (write {value}.0)"
    try:
        spec.validate(value)
    except ConfigError as exc:
        return str(exc)
    return None


def command_problems(command: str, parser: argparse.ArgumentParser, full_parse: bool) -> list[str]:
    words = synopsis_words(command)
    if words[:2] == ["ros2", "run"] and len(words) > 3:
        words = words[3:]  # ros2 run matchanything_ros matcher_node ... = matcher_node ...
    program = words[0]
    problems: list[str] = []
    if program == "matchanything":
        sub, rest = subparser_for(parser, words[1:])
        if sub is parser:
            return [f"no subcommand {words[1] if len(words) > 1 else ''!r}"]
        if full_parse:
            problem = parse_problem(parser, words[1:])
            if problem:
                problems.append(problem)
        else:
            known = {s for a in sub._actions for s in a.option_strings}
            problems += [f"no flag {w}" for w in rest if w.startswith("--") and w.split("=")[0] not in known]
    elif program == "matcher_node":
        ros = words[words.index("--ros-args") + 1:] if "--ros-args" in words else []
        for flag, arg in zip(ros, ros[1:]):
            if flag == "-p":
                name, _, value = arg.partition(":=")
                problem = node_parameter_problem(name, value)
                if problem:
                    problems.append(problem)
    elif words[:2] == ["ros2", "launch"] and len(words) > 3 and words[2] == "matchanything_ros":
        allowed = launch_arguments(REPO / "launch" / words[3])
        problems += [f"no launch argument {w.split(':=')[0]!r}" for w in words[4:]
                     if ":=" in w and w.split(":=")[0] not in allowed]
    elif program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        problems += [f"no make target {w!r}" for w in words[1:] if "=" not in w and w not in targets]
    elif program in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        if importlib.util.find_spec(words[2]) is None:
            problems.append(f"no module {words[2]}")
    return problems


def test_commands_in_the_docs_are_what_the_programs_take() -> None:
    parser = cli_parser()
    problems = []
    checked = 0
    for doc in DOCS:
        text = doc.read_text()
        commands = [(c, True) for c in block_commands(text)]
        commands += [(c, False) for c in inline_code(text) if c.startswith(("matchanything ", "matcher_node "))]
        for command, full in commands:
            if command.split()[0] not in ("matchanything", "matcher_node", "ros2", "make", "python", "python3"):
                continue
            checked += 1
            problems += [f"{rel(doc)}: `{command}`: {p}" for p in command_problems(command, parser, full)]
    assert checked > 40, f"only {checked} commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- sample output: the demo
# values the demo's line is formatted with, each printed one way, and the group that stands for it in the regex
SENTINELS = {"111111": r"(\d+)", "22.2": r"(\d+\.\d)", "333333": r"(\d+)", "44.44": r"(\d+\.\d\d)", "WHAT": r"(.+)",
             "55.5": r"(\d+\.\d)", "OUT.png": r"(\S+)"}


def demo_line_regex() -> re.Pattern[str]:
    """The demo's summary line as a regex, from the very function that prints it (figures as groups)."""
    from matchanything_ros.cli.demo import summary_line

    line = re.escape(summary_line(111111, SimpleNamespace(precision=0.222, with_gt=333333), 44.44, "WHAT", 55.5,
                                  Path("OUT.png")))
    for sentinel, group in SENTINELS.items():
        line = line.replace(re.escape(sentinel), group)
    return re.compile(line)


@pytest.fixture(scope="module")
def demo_pair_result() -> tuple[int, Any]:
    """The bundled demo model on the demo bag's stereo pair (the Middlebury "Motorcycle" pair it carries),
    matched as the demo's node does (torch, CPU, default parameters), scored as the demo scores it."""
    import skimage.data

    from matchanything_ros.core.matcher import Matcher, MatcherConfig
    from matchanything_ros.training.metrics import stereo_score

    left, right, disparity = skimage.data.stereo_motorcycle()
    with Matcher(MatcherConfig(backend="torch", device="cpu")) as matcher:
        result = matcher.match(left, right)
    return len(result), stereo_score(result.keypoints0, result.keypoints1, disparity)


@pytest.mark.parametrize("doc", ["README.md", "docs/demo.md"])
def test_the_demo_line_in_the_docs_is_what_the_demo_prints(doc: str, demo_pair_result: tuple[int, Any]) -> None:
    from matchanything_ros.core.matcher import DEMO_MODEL_NOTICE

    text = (REPO / doc).read_text()
    lines = [line for line in text.splitlines() if line.startswith("matchanything demo: ")]
    assert len(lines) == 1, lines
    found = demo_line_regex().fullmatch(lines[0])
    assert found, f"{doc}: the sample line is not in the demo's format:\n{lines[0]}\n{demo_line_regex().pattern}"
    matches, percent, checkable, node_s, what_ran, total_s, out = found.groups()
    real_matches, score = demo_pair_result
    # the same on every x86 CPU up to a near-tie or two (docs/parity.md)
    assert abs(int(matches) - real_matches) <= max(2, real_matches // 500), (matches, real_matches)
    assert abs(float(percent) - 100 * score.precision) <= 0.2, (percent, score)
    assert abs(int(checkable) - score.with_gt) <= max(2, score.with_gt // 500), (checkable, score)
    assert what_ran == f"{DEMO_MODEL_NOTICE}, torch cpu" and out == "out/demo_matches.png"
    # times: a figure of one run, inside the range the doc gives with its machine
    for figure, what in ((node_s, "in the node"), (total_s, "in all")):
        words = r"\s+".join(what.split())  # the doc may wrap the line anywhere
        ranges = re.findall(rf"(\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)\s+s\s+{words}", text)
        assert ranges, f"{doc} gives no range of the time {what}"
        low, high = map(float, ranges[0])
        assert low <= float(figure) <= high, (doc, what, figure, ranges[0])
    assert "2-core x86 VMs" in text


# ----------------------------------------------------------------------------- sample output: matchanything param
def test_the_param_transcript_in_node_md_is_what_the_cli_prints() -> None:
    """docs/node.md's `$ matchanything param ...` lines and their output, against the CLI's own formatting of the
    node's defaults and of the node's reason for refusing (test_param_cli.py checks the CLI prints these)."""
    from rcl_interfaces.msg import ParameterType

    from matchanything_ros.cli.param import plain_text, refusal, set_line, typed_value, yaml_text
    from matchanything_ros.core.errors import ConfigError
    from matchanything_ros.core.params import PARAMS_BY_NAME

    ros_type = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}
    text = (REPO / "docs" / "node.md").read_text()
    transcript = [body for _lang, body in fenced_blocks(text) if body.startswith("$ matchanything param")]
    assert len(transcript) == 1
    steps = re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", transcript[0], re.M)
    assert len(steps) >= 4
    for command, output in steps:
        words = command.split()
        action, node = words[2], words[3]
        shown = output.splitlines()
        if action == "get":
            assert shown == [plain_text(PARAMS_BY_NAME[words[4]].default)], (command, shown)
        elif action == "set":
            spec = PARAMS_BY_NAME[words[4]]
            value = typed_value(spec.name, words[5], ros_type[spec.type])
            try:
                spec.validate(value)
                expected = set_line(node, spec.name, value, spec.default)
            except ConfigError as exc:
                expected = "matchanything param: error: " + refusal(node, spec.name, value, str(exc))
            assert shown == [expected], (command, shown)
        elif action == "list":
            assert shown[-1] == "..." and len(shown) > 1
            for line in shown[:-1]:
                name, _, value = line.partition(": ")
                assert value == yaml_text(PARAMS_BY_NAME[name].default), line
        else:
            raise AssertionError(f"no check for `{command}`")


# ----------------------------------------------------------------------------- benchmark labels
def test_benchmark_rows_are_labelled_with_the_canvas_they_ran(tmp_path: Path) -> None:
    """A 320x240 pair at resize_max 832 runs on a 320 canvas: the row says @320 (and the size asked for)."""
    import cv2
    from skimage import data

    pair = cv2.resize(data.astronaut(), (320, 240))
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), pair[:, :, ::-1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "benchmark", "--backend", "torch", "--device",
                           "cpu", "--sizes", "832", "--runs", "1", "--warmup", "0", "--pair", "a.png", "b.png",
                           "--json", "b.json", "--png", "b.png.png"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("torch cpu"))
    label, canvas = row[:48].strip(), row[48:].split()[0]
    assert canvas == "320" and label == "torch cpu fp32 @320 (resize_max 832)", row
    assert np.isfinite(float(row[48:].split()[1]))
