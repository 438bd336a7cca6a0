"""`matchanything benchmark` with TensorRT among the backends: a TensorRT configuration that cannot run is
a FAIL line of the report-back checklist (and of the JSON), the other backends still run and PASS.

TensorRT is not installed on the machines this suite runs on, which is exactly the failure recorded here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from matchanything_ros.cli import main
from matchanything_ros.core.validate import REPORT_BACK_BEGIN, REPORT_BACK_END


def test_benchmark_records_a_tensorrt_failure_in_the_checklist(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["benchmark", "--backends", "tensorrt,torch", "--device", "cpu", "--sizes", "256",
                 "--warmup", "0", "--runs", "1", "--json", str(js), "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 4, out
    block = out[out.index(REPORT_BACK_BEGIN):out.index(REPORT_BACK_END)]
    (fail,) = [line for line in block.splitlines() if line.startswith("[FAIL]")]
    assert fail.startswith("[FAIL] benchmark tensorrt cpu fp32 @256: ") and len(fail) > 60  # says why
    (ok,) = [line for line in block.splitlines() if line.startswith("[PASS]")]
    assert ok.startswith("[PASS] benchmark torch cpu fp32 @256: canvas 256, total median")
    assert "result: FAILED" in block and "python: " in block
    doc = json.loads(js.read_text())
    assert [c["backend"] for c in doc["configs"]] == ["torch"]
    (failure,) = doc["failures"]
    assert failure["label"] == "tensorrt cpu fp32 @256" and failure["error"] in fail
    assert png.is_file()
