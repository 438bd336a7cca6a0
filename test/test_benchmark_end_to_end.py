"""`matchanything benchmark` reports what a user gets: Matcher.match end to end, host CPU time, match count."""
from __future__ import annotations

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
