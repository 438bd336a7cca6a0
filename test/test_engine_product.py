"""One engine per ELoFTR variant, as far as it runs without TensorRT: `build-engine` on a product export
plans one engine with a static profile (the export's image shapes), the lookup expects that one engine and
prints the command that builds it, and the sidecar carries the constants the runtime checks (threshold, cap,
image shapes). Real product export of the bundled model; a stated GPU and TensorRT version (ORIN)."""
from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from matchanything_ros.cli import build_parser, main, param_values
from matchanything_ros.cli.build_engine import BUILD_PARAMS
from matchanything_ros.core.engines import build as engine_build
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.engines.build import (TensorRTSystem, build_engine_set, engine_settings, find_engines,
                                                 plan_engine_set)
from matchanything_ros.core.engines.cache import META_PREFIX, read_sidecar
from matchanything_ros.core.matcher import MatcherConfig

ORIN = TensorRTSystem("Orin", "8.7", "10.3.0.30")


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHANYTHING_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def product_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("product")
    assert main(["export", "--model-file-path", str(d), "--image-size", "320x256", "--image-size", "256x320"]) == 0
    return d


def test_the_product_export_is_one_engine_with_a_static_profile(product_export: Path) -> None:
    manifest = json.loads((product_export / "export.json").read_text())
    assert manifest["graphs"] == ["product"] and manifest["dynamic"] is False
    plan = plan_engine_set(product_export, precision="fp32", system=ORIN)
    assert plan.graphs == ["product"] and list(plan.engines) == ["product"]
    # fixed-shape per camera size: min = opt = max, whatever --engine-*-size say
    assert plan.profiles["product"] == {"rgb0": [[256, 320, 3]] * 3, "rgb1": [[320, 256, 3]] * 3}


def test_the_lookup_expects_the_one_engine_and_names_its_build_command(product_export: Path) -> None:
    params = MatcherConfig(model_file_path=str(product_export)).to_params()
    found = find_engines(params, EloftrPipeline({}), ORIN)
    assert list(found.engines) == ["product"] and found.onnx_paths == {"product": product_export / "product.onnx"}
    assert found.problem is not None and f"no TensorRT engine at {found.engines['product']}" in found.problem
    # the printed command builds exactly the engine the lookup expects
    args = build_parser().parse_args(["build-engine", *shlex.split(found.command.split(" ", 2)[2])])
    plan = plan_engine_set(product_export, system=ORIN, **engine_settings(param_values(args, BUILD_PARAMS)))
    assert plan.engines == found.engines


def test_the_sidecar_carries_the_graph_constants(product_export: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT cannot build here: build_engine (the one function that calls it) writes a stand-in file."""
    def stand_in_build(onnx_path: Any, engine_path: Any, profile: Any, **kw: Any) -> dict[str, Any]:
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"serialized engine")
        return {"build_seconds": 0.0, "fp32_layers": 0, "network_typing": "strong"}

    monkeypatch.setattr(engine_build, "build_engine", stand_in_build)
    params = MatcherConfig(model_file_path=str(product_export), engine_file_path=str(tmp_path / "eng")).to_params()
    engines = build_engine_set(product_export, system=ORIN, log=io.StringIO(), **engine_settings(params))
    assert list(engines) == ["product"]
    constants = {k: json.loads(v) for k, v in read_sidecar(engines["product"])["onnx_metadata"].items()}
    assert constants == {META_PREFIX + "threshold": 0.1, META_PREFIX + "max_matches": 20000,
                         META_PREFIX + "image_shapes": [[256, 320, 3], [320, 256, 3]]}
    assert find_engines(params, EloftrPipeline({}), ORIN).problem is None
