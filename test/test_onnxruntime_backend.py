"""ONNX Runtime backend: honest provider reporting, clear errors, and parity with torch fp32.

The parity test runs the exported ELoFTR graphs in real ONNX Runtime sessions on every reference
fixture pair at three canvas sizes and compares them with the torch fp32 backend running the same
(top-K) graphs, correspondence by correspondence, under the parity rules of test/parity_rules.py:
the same match list except threshold near-ties, keypoints within 1e-3 px except fine-argmax
near-ties, confidences within 1e-4.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import parity_rules as pr
import pytest
import torch
from test_export_onnx import REF, exported_eloftr, seeded_eloftr_state

from matchanything_ros.core.eloftr.postprocess import CoarseMatches
from matchanything_ros.core.engines.onnxruntime_backend import OnnxRuntimeBackend, choose_provider
from matchanything_ros.core.errors import BackendUnavailableError, ConfigError

PARITY_SIZES = (416, 480, 512)  # canvas sides (resize_max of the robot preset); the fixtures' own is 640


def _ort(device: str = "cpu") -> OnnxRuntimeBackend:
    d = exported_eloftr()
    return OnnxRuntimeBackend({"coarse": d / "coarse.onnx", "fine": d / "fine.onnx"}, device, "fp32",
                              intra_op_threads=2)


def test_reports_the_provider_that_runs() -> None:
    backend = _ort("cpu")
    try:
        assert backend.name == "onnxruntime"
        assert backend.device == "CPUExecutionProvider"
        assert backend.graphs == ("coarse", "fine")
        assert backend.metadata("coarse")["matchanything.variant"] == "eloftr"
    finally:
        backend.close()


def test_cuda_without_cuda_provider_is_an_error_not_a_fallback() -> None:
    # the provider choice, for an onnxruntime without and with a CUDA provider
    cpu_only = ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match="no CUDA execution provider"):
        choose_provider("cuda", cpu_only)
    assert choose_provider("auto", cpu_only) == ("CPUExecutionProvider", 0)
    assert choose_provider("cuda:1", ["CUDAExecutionProvider", *cpu_only]) == ("CUDAExecutionProvider", 1)
    # and the backend built on this machine's onnxruntime: CUDA runs on CUDA or is refused, never falls back
    if "CUDAExecutionProvider" in ort.get_available_providers():
        backend = _ort("cuda")
        try:
            assert backend.device == "CUDAExecutionProvider"
        finally:
            backend.close()
    else:
        with pytest.raises(BackendUnavailableError, match="no CUDA execution provider"):
            _ort("cuda")


def test_precision_and_missing_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is an fp32 export, and precision 'fp16' was asked for"):
        OnnxRuntimeBackend({"coarse": exported_eloftr() / "coarse.onnx"}, "cpu", "fp16")
    with pytest.raises(ConfigError, match="matchanything export"):
        OnnxRuntimeBackend({"coarse": tmp_path / "nope.onnx"}, "cpu")


def test_images_on_different_canvases_are_refused_with_a_reason() -> None:
    backend = _ort()
    try:
        feeds = {"image0": np.zeros((1, 1, 416, 416), np.float32), "image1": np.zeros((1, 1, 448, 448), np.float32),
                 "mask0": np.ones((1, 52, 52), bool), "mask1": np.ones((1, 56, 56), bool)}
        with pytest.raises(ConfigError, match="same canvas size"):
            backend.run("coarse", feeds)
        with pytest.raises(ConfigError, match="needs inputs"):
            backend.run("coarse", {"image0": feeds["image0"]})
    finally:
        backend.close()


def _fixture_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    pairs = []
    for f in sorted((REF / "eloftr").glob("*.npz")):
        with np.load(f) as z:
            if "input_image0_rgb_u8" in z:
                pairs.append((f.stem, z["input_image0_rgb_u8"], z["input_image1_rgb_u8"]))
    assert len(pairs) >= 3, f"expected the ELoFTR fixture pairs under {REF / 'eloftr'}"
    return pairs


class Recording:
    """Passes graph calls through to a backend and keeps the last inputs of each graph."""

    def __init__(self, backend) -> None:  # noqa: ANN001
        self.backend, self.inputs = backend, {}
        self.name, self.device, self.precision = backend.name, backend.device, backend.precision

    def run(self, graph: str, inputs: dict) -> dict:
        self.inputs[graph] = {k: np.asarray(v) for k, v in inputs.items()}
        return self.backend.run(graph, inputs)


def _fine_margins(fine_inputs: dict[str, np.ndarray], cfg) -> np.ndarray:  # noqa: ANN001
    """Each match's fine-argmax margin (parity_rules.relative_margin) from the fine graph's inputs."""
    from matchanything_ros.core.eloftr.graphs import fine_similarities, gather_windows

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in fine_inputs.items()}
    with torch.inference_mode():
        w0 = gather_windows(t["feat_f0"], t["i_ids"], cfg.fine_window_size, 0, cfg.coarse_stride)
        w1 = gather_windows(t["feat_f1"], t["j_ids"], cfg.fine_window_size, 1, cfg.coarse_stride)
        p, _ = fine_similarities(w0.float(), w1.float(), cfg)
    return pr.relative_margin(p.reshape(p.shape[0], -1).numpy())


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("size", PARITY_SIZES)
def test_ort_matches_torch_fp32_on_every_fixture_pair(size: int) -> None:
    """End to end (both graphs on each backend), under the parity rules: the same match list except
    threshold near-ties, the same confidences, keypoints within 1e-3 px except where the fine level's argmax
    meets a near-tie (ONNX Runtime's and torch's kernels round differently, ~1e-6). The fine graph on
    identical inputs: the same keypoints, under the same rule."""

    from matchanything_ros.core.backends.torch_backend import TorchBackend
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.validate import run_pair

    # threshold 0.001 (the fixtures'): many matches per pair; both backends run the same top-K coarse graph
    threshold = 0.001
    cfg = {"threshold": threshold, "resize_max": size}
    ref_pipe, ort_pipe = EloftrPipeline(cfg, coarse_mode="topk"), EloftrPipeline(cfg, coarse_mode="topk")
    ref_backend = Recording(TorchBackend(ref_pipe.torch_graphs(seeded_eloftr_state(), "cpu"), "cpu", "fp32"))
    ort_backend = _ort()
    try:
        for name, im0, im1 in _fixture_pairs():
            ref = run_pair(ref_pipe, ref_backend, im0, im1)
            got = run_pair(ort_pipe, ort_backend, im0, im1)
            ref_coarse, got_coarse = (CoarseMatches(r.result.extras["coarse_i_ids"], r.result.extras["coarse_j_ids"],
                                                    r.result.confidence) for r in (ref, got))
            assert ref.result.extras["canvas0"] == size, name
            where = f"{name}@{size}"
            assert len(ref.result) >= 10, f"{where}: too few matches for a meaningful comparison"
            conf_of = {(int(i), int(j)): float(c) for cm in (got_coarse, ref_coarse)
                       for i, j, c in zip(cm.i_ids, cm.j_ids, cm.mconf)}
            ri, ti, coarse = pr.compare_match_lists(
                ref_coarse.i_ids, ref_coarse.j_ids, got_coarse.i_ids, got_coarse.j_ids,
                lambda i, j: bool(pr.is_threshold_tie(conf_of[(i, j)], threshold)), f"{where} coarse list")
            pr.assert_conf_close(got.result.confidence[ti], ref.result.confidence[ri], f"{where} confidence")
            margins = _fine_margins(ref_backend.inputs["fine"], ref_pipe.model_config)
            # keypoints in original pixels (the canvas-to-original scale of these pairs is ~1)
            _, fine = pr.compare_keypoints(got.result.keypoints0[ti], ref.result.keypoints0[ri],
                                           got.result.keypoints1[ti], ref.result.keypoints1[ri], margins[ri],
                                           f"{where} keypoints")
            # the fine graph alone, fed exactly what torch's fine graph got
            fine_in = ref_backend.inputs["fine"]
            want = ref_backend.backend.run("fine", fine_in)
            have = ort_backend.run("fine", fine_in)
            _, fine_alone = pr.compare_keypoints(np.asarray(have["mkpts0_c"]), np.asarray(want["mkpts0_c"]),
                                                 np.asarray(have["mkpts1_c"]), np.asarray(want["mkpts1_c"]), margins,
                                                 f"{where} fine graph on torch's inputs")
            pr.report(coarse, fine, fine_alone)
    finally:
        ort_backend.close()
        ref_backend.backend.close()
