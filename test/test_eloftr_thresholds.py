"""Every threshold a user can set: refused where it would cost without bound, capped to the most confident
matches where a frame passes more than `engine_max_matches`, and changed at run time without a rebuild,
a recompile or a silent fall-back to eager code. Real photos (the bundled demo pair), the bundled demo model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.compiled import CompiledOrEager
from matchanything_ros.core.eloftr.product import EloftrProduct, lse_passing_mask
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.eloftr.preprocess import stage2_rgb
from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.matcher import DATA_DIR, Matcher, MatcherConfig, resolve_eloftr_checkpoint


@pytest.fixture(scope="module")
def demo_pair() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        return z["image0"], z["image1"]  # 600x400 real photos


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5])
def test_a_threshold_outside_0_1_is_refused_with_one_line(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        MatcherConfig(threshold=value)
    text = str(err.value)
    assert text.startswith("threshold: ") and "\n" not in text
    if value == 0:
        assert "must be above 0" in text and "every pair of coarse cells passes" in text


def test_the_cli_refuses_threshold_0_before_loading_anything(tmp_path: Path) -> None:
    pair = tmp_path / "a.png"
    proc = subprocess.run(["matchanything", "match", str(pair), str(pair), "--threshold", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "threshold: 0.0 is not allowed, it must be above 0" in lines[0], proc.stderr


def test_a_frame_over_the_cap_keeps_the_most_confident_matches(demo_pair: Any) -> None:
    a, b = demo_pair
    params = {"device": "cpu", "backend": "torch", "resize_max": 416, "threshold": 0.02}
    with Matcher(MatcherConfig(**params)) as full:
        ref = full.match(a, b)
    assert ref.extras["matches_capped"] is False and len(ref) > 400
    with Matcher(MatcherConfig(**params, engine_max_matches=300)) as capped:
        out = capped.match(a, b)
    assert out.extras["matches_capped"] is True and out.extras["coarse_matches_total"] == len(ref)
    keep = ref.confidence > np.sort(ref.confidence)[::-1][300]
    assert len(out) == int(keep.sum()) == 300
    np.testing.assert_array_equal(out.confidence, ref.confidence[keep])  # same order: row-major
    np.testing.assert_array_equal(out.keypoints0, ref.keypoints0[keep])


def test_the_smallest_thresholds_run_in_bounded_memory_on_the_cpu(tmp_path: Path) -> None:
    """Threshold 1e-30 lets (nearly) every pair of coarse cells pass: the frame is capped at engine_max_matches
    and its memory stays bounded (before the cap, 0 asked for 15.5 GB here and failed). Peak RSS measured:
    1.3 GiB on this machine alone, 6.3 GiB in a CI run beside a second pytest worker (2026-12-06; not traced:
    the allocator's arenas under two busy processes is the likely cause), hence the 8 GiB bound."""
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        from PIL import Image

        Image.fromarray(z["image0"]).save(tmp_path / "a.png")
        Image.fromarray(z["image1"]).save(tmp_path / "b.png")
    code = ("import resource, sys; from matchanything_ros.cli import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "match", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                           "--device", "cpu", "--backend", "torch", "--threshold", "1e-30",
                           "--engine-max-matches", "5000",
                           "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_matches"] <= 5000 and result["num_matches"] > 1000
    peak_gib = int(proc.stdout.split("maxrss_kib")[1].split()[0]) / 2**20
    assert peak_gib < 8.0, f"peak RSS {peak_gib:.2f} GiB"


def test_a_new_threshold_is_taken_in_place_with_the_same_matches_as_a_new_matcher(demo_pair: Any) -> None:
    a, b = demo_pair
    base = {"device": "cpu", "backend": "torch", "resize_max": 416}
    with Matcher(MatcherConfig(**base, threshold=0.2)) as matcher:
        graphs_before = dict(matcher.backend.graphs)
        assert matcher.update(MatcherConfig(**base, threshold=0.3)) is True  # top-K stays exact above 1/(K+1)
        assert matcher.backend.graphs == graphs_before and matcher.info["threshold"] == 0.3
        out = matcher.match(a, b)
        # below 1/(K+1) the top-K coarse graph would miss matches: a new matcher (full matrix) is needed
        assert matcher.update(MatcherConfig(**base, threshold=0.05)) is False
        assert matcher.config.threshold == 0.3
        assert matcher.update(MatcherConfig(**{**base, "resize_max": 832}, threshold=0.3)) is False  # not live
    with Matcher(MatcherConfig(**base, threshold=0.3)) as fresh:
        ref = fresh.match(a, b)
    assert len(ref) > 50 and (out.confidence > 0.3).all()
    np.testing.assert_array_equal(out.keypoints1, ref.keypoints1)


def test_the_product_graph_reads_its_threshold_as_an_input(demo_pair: Any) -> None:
    """One product module (the CUDA form's log-space head) serves every threshold: after set_threshold it
    gives the matches of a module built for that threshold, across 1/(K+1) and down to 0.01."""
    path, cfg, _ = resolve_eloftr_checkpoint("")
    state = load_state_dict(str(path), "eloftr")
    pipe = EloftrPipeline({"resize_max": 416}, cfg)
    rgb0, _ = stage2_rgb(demo_pair[0], pipe.settings)
    rgb1, _ = stage2_rgb(demo_pair[1], pipe.settings)
    inputs = (torch.from_numpy(rgb0), torch.from_numpy(rgb1))
    live = EloftrProduct(pipe.build_net(state), 0.2, 20000, "lse_nonzero", "fast").eval()
    with torch.inference_mode():
        for thr in (0.2, 0.05, 0.01):
            live.set_threshold(thr)
            got = live(*inputs)
            built = EloftrProduct(pipe.build_net(state), thr, 20000, "lse_nonzero", "fast").eval()(*inputs)
            assert int(got[0, 0]) == int(built[0, 0]) > 0
            torch.testing.assert_close(got, built, rtol=0, atol=0)
        # over the cap, the lse head selects the most confident too (the backend's step for such frames)
        capped = EloftrProduct(pipe.build_net(state), 0.01, 100, "lse_nonzero", "fast").eval()(*inputs)
    n = int(built[0, 0])
    conf = built[1:1 + n, 6]
    keep = conf > torch.sort(conf, descending=True).values[100]
    assert int(capped[0, 0]) == n > 100 and int(keep.sum()) == 100
    torch.testing.assert_close(capped[1:, :2], built[1:1 + n][keep][:, :2], rtol=0, atol=0)
    assert compile_fallbacks_of(live) == []


def compile_fallbacks_of(module: Any) -> list[str]:
    from matchanything_ros.core.compiled import compile_fallbacks

    return compile_fallbacks(module)


def test_twelve_thresholds_compile_once_and_a_recompile_limit_is_reported() -> None:
    """The threshold as a tensor: twelve values, one compiled graph, no fall-back. The same function given
    the threshold as a Python float (a constant of the compiled code, as before) recompiles per value and,
    at torch's recompile limit, falls back to eager: that is now said (`fallback`, Matcher.info), not silent."""
    # TorchDynamo counts compilations per code object for the whole process: start from none, so that the
    # product graphs other tests compiled here (lse_passing_mask at their sizes) do not count toward the limit
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    t0, t1 = torch.randn(1, 64, 8, 8, generator=g), torch.randn(1, 64, 8, 8, generator=g)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    as_input = CompiledOrEager(lse_passing_mask, dynamic=False)
    as_constant = CompiledOrEager(lambda *a: lse_passing_mask(*a), dynamic=False)
    counts = []
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=4):
        for k in range(12):
            thr = 0.01 + 0.015 * k
            _, _, _, _, count = as_input(t0, t1, mask, mask, 0.1, 64, 1, torch.tensor(thr))
            counts.append(int(count))
            _, _, _, _, count_c = as_constant(t0, t1, mask, mask, 0.1, 64, 1, thr)
            assert int(count_c) == counts[-1]
    assert as_input.fallback == "" and as_input.compiled is not None
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert as_constant.compiled is None and "recompile" in as_constant.fallback.lower()


def test_a_part_compiled_per_camera_size_keeps_compiling_past_torchs_limit() -> None:
    """The product graph's feature stack and head compile once per camera size and precision, and TorchDynamo
    counts the compilations of a function for the whole process: a process serving several sizes passes
    torch's limit. With its own limit (compiled.FIXED_SHAPE_COMPILES) such a part stays compiled; without, it
    falls back to eager at torch's limit and says so. (Torch's limit is lowered to 2 here to keep this fast.)"""
    def own_limit(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    def torchs_limit(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    per_size = CompiledOrEager(own_limit, dynamic=False, recompile_limit=4)
    default = CompiledOrEager(torchs_limit, dynamic=False)
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=2):
        for side in (3, 5, 7):  # three "camera sizes"
            x = torch.arange(float(side))
            assert torch.equal(per_size(x), x * 2 + 1) and torch.equal(default(x), x * 2 + 1)
    assert per_size.fallback == "" and per_size.compiled is not None
    assert default.compiled is None and "recompile" in default.fallback.lower()
