"""`matchanything benchmark` reports what a user gets: Matcher.match end to end, host CPU time, match count."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from matchanything_ros.core.benchmark import benchmark_config, format_table
from matchanything_ros.core.matcher import DATA_DIR, Matcher, MatcherConfig


def test_benchmark_reports_end_to_end_host_cpu_and_matches() -> None:
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        pairs = [("demo", z["image0"], z["image1"])]
    with Matcher(MatcherConfig(backend="torch", device="cpu", resize_max=320)) as m:
        expected = len(m.match(*pairs[0][1:]))
        cfg = benchmark_config(m.pipeline, m.backend, pairs, warmup=1, runs=3, label="torch cpu fp32 @320")
    st = cfg["stages_ms"]
    assert expected > 0 and cfg["matches_median"] == expected
    assert len(cfg["samples_ms"]["host_cpu"]) == 3 and st["host_cpu"]["median"] > 0
    # end to end covers the three stages; the CPU backend computes on the host: its CPU time is real work
    # (run by run: medians of separate stages need not add up)
    samples = cfg["samples_ms"]
    for total, pre, infer in zip(samples["total"], samples["preprocess"], samples["inference"]):
        assert total >= (pre + infer) * 0.999
    assert st["total"]["p90"] >= st["total"]["median"]
    table = format_table([cfg])
    assert "CPU ms" in table and "matches" in table and f"{expected:7d}" in table


def test_the_benchmark_matrix_runs_its_cells_with_the_options_it_is_given(tmp_path: Path) -> None:
    """bench/matrix.py, as the device call runs it, on the CPU at one small size: every threshold in place and
    the verified cell, each with matches and its stage split; `--option` reaches the matcher (an unknown option
    name fails the run: the options are validated, not ignored)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "matrix.py"
    common = [sys.executable, str(script), "--out", str(tmp_path), "--models", "demo", "--precisions", "fp32",
              "--sizes", "320x240", "--runs", "1", "--warmup", "0", "--device", "cpu", "--no-rebuilds"]
    done = subprocess.run([*common, "--option", "fine=fast", "--tag", "_fast"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "cells_demo_fp32_fast.json").read_text())
    assert report["options"] == ["fine=fast"] and "rebuilds" not in report
    cells = report["cells"]
    assert [(c["threshold"], c["geometry"]) for c in cells] == [(0.1, "none"), (0.2, "none"), (0.05, "none"),
                                                               (0.01, "none"), (0.1, "homography")]
    assert all(c["matches"] > 0 and c["median_ms"] > 0 for c in cells)
    assert "verify" in cells[-1]["stages_ms"] and "verify" not in cells[0]["stages_ms"]
    counts = [c["matches"] for c in cells[:4]]
    assert counts[1] < counts[0] < counts[2] < counts[3]  # the threshold really changed in place
    bad = subprocess.run([*common, "--option", "no_such_option=1", "--tag", "_bad"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "no_such_option" in bad.stdout + bad.stderr
