"""The export-ready GP solve (Newton-Schulz, fixed iteration count) against the reference
(`torch.linalg.inv` in fp32, as the original): matrix level, on the fixtures, and through ONNX Runtime."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import roma_util as ru
from matchanything_ros.core.roma.gp import (SIGMA_NOISE, GaussianProcessMatch, cos_kernel, newton_schulz_inverse,
                                            newton_schulz_iterations)

FLOW_TOL = 1e-3
LOGIT_TOL = 1e-2


def _kernel_system(n_side: int, common: float, seed: int = 0) -> torch.Tensor:
    """K_yy + 0.1 I of features sharing a `common` component (large common part = ill-conditioned)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 512, generator=g)
    feats = common * base + torch.randn(1, n_side * n_side, 512, generator=g)
    k = cos_kernel(feats, feats)
    return k + SIGMA_NOISE * torch.eye(k.shape[-1])


@pytest.mark.parametrize("n_side,common", [(12, 3.0), (40, 30.0)])
def test_newton_schulz_is_as_accurate_as_fp32_inverse(n_side: int, common: float) -> None:
    """Against the float64 inverse, the fixed-count Newton-Schulz fp32 solve is no worse than fp32 linalg.inv
    (up to a small factor), including the 1600x1600 case of the default 560 input and near-singular kernels."""
    a = _kernel_system(n_side, common)
    f = torch.cos(torch.randn(1, a.shape[-1], 512, generator=torch.Generator().manual_seed(1)))
    exact = torch.linalg.solve(a.double(), f.double())
    ref = torch.linalg.inv(a) @ f
    ns = newton_schulz_inverse(a, newton_schulz_iterations(a.shape[-1])) @ f
    err_ref = ((ref.double() - exact).abs().max() / exact.abs().max()).item()
    err_ns = ((ns.double() - exact).abs().max() / exact.abs().max()).item()
    print(f"n={a.shape[-1]} common={common}: rel err inv {err_ref:.2e}, newton-schulz {err_ns:.2e}")
    assert err_ns <= max(4 * err_ref, 1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("name", ru.pair_params())
def test_newton_schulz_gp_on_fixtures(name: str) -> None:
    """The whole model with the export-ready GP stays within the fixture tolerances (flows 1e-3, logits 1e-2)."""
    z = ru.npz(name)
    ref, ns = ru.forward(name, "inverse"), ru.forward(name, "newton_schulz")
    errors = {}
    for key in sorted(k for k in z if k.startswith("pass") and k.endswith(("_flow", "_certainty"))):
        errors[key] = float(np.abs(ru.subsample(name, key, ns[key]) - z[key]).max())
        assert errors[key] <= (FLOW_TOL if key.endswith("flow") else LOGIT_TOL), f"{key}: {errors[key]:.3g}"
    w = ns["warp"].shape[1] // 2
    warp_err = float(np.abs(ns["warp"] - ref["warp"]).max())
    cert_err = float(np.abs(ns["certainty"] - ref["certainty"]).max())
    gp_rel = float(np.abs(ns["gp_posterior16"] - ref["gp_posterior16"]).max() / np.abs(ref["gp_posterior16"]).max())
    a2b = ru.subsample(name, "final_warp_A_to_B", ns["warp"][:, :w, 2:].transpose(2, 0, 1))
    assert np.abs(a2b - z["final_warp_A_to_B"]).max() <= FLOW_TOL
    assert np.abs(ru.subsample(name, "final_certainty", ns["certainty"]) - z["final_certainty"]).max() <= LOGIT_TOL / 4
    print(f"{name}: newton-schulz vs inverse: GP posterior rel {gp_rel:.2e}, warp {warp_err:.2e}, "
          f"certainty {cert_err:.2e}; vs fixture: max flow {max(v for k, v in errors.items() if 'flow' in k):.2e}, "
          f"max logit {max(v for k, v in errors.items() if 'certainty' in k):.2e}")
    assert warp_err <= FLOW_TOL and cert_err <= LOGIT_TOL / 4


def test_newton_schulz_gp_runs_in_onnxruntime() -> None:
    """The export-ready GP exports to plain ONNX ops (no Inverse) and ONNX Runtime reproduces torch."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    gp = GaussianProcessMatch(512, "newton_schulz").eval()
    x, y = torch.randn(2, 512, 12, 12), torch.randn(2, 512, 12, 12)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(gp, (x, y), buf, input_names=["x", "y"], output_names=["mu"], opset_version=17,
                          dynamo=False)
        expected = gp(x, y).numpy()
        gp.solver = "inverse"
        reference = gp(x, y).numpy()
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Inverse" not in ops and not any("Loop" in o or "If" == o for o in ops), sorted(ops)
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "y": y.numpy()})[0]
    scale = np.abs(reference).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.abs(got - reference).max() <= 1e-3 * scale
