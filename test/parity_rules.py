"""The parity rules, defined once: the tolerances of "same results as the original" and the near-ties that
a CPU's rounding may legitimately flip, each one counted so that every test says how many it excused.

Why near-ties exist: PyTorch's CPU kernels (ATen, oneDNN, MKL) take other code paths on other instruction
sets (AVX-512, AVX2, the generic path) and thread counts, and round differently: features move by ~1e-6
relative. A decision on a value that lies within such a distance of its boundary can then go the other
way, and the fixtures' seeded random weights make a few of them. Everything else keeps the promise: the
same match lists except near-ties, keypoints within 1e-3 px, confidences within 1e-4. The figures behind
each constant are in docs/parity.md; `tools/measure_cpu_spread.py` regenerates them.

Numpy at import (torch only inside the sampler's functions): the tests (the GPU ones included) and the spread
script import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# --- the promise ------------------------------------------------------------------------------------------
KEYPOINT_ATOL_PX = 1e-3  # every keypoint of a match both lists hold, absolute, in pixels
# Confidences, absolute: |ours - original| <= 1e-4, the promise itself. A confidence is a score in [0, 1]
# that users threshold; no relative form of 1e-4 holds: with the fixtures' seeded weights the dual-softmax
# logits are ~1e2, so rounding moves every confidence by up to ~3.6e-4 OF ITSELF whatever its size
# (docs/parity.md), while the absolute error stays <= 1.2e-5 (8x margin).
CONF_ATOL = 1e-4
# ... and relative per element, 1e-3 (measured <= 3.6e-4: ~3x margin), so the fixtures' small confidences
# (1e-8 .. 1e-3, where an absolute 1e-4 says nothing) are checked too. Subnormal values (< float32's
# smallest normal) carry no relative precision and are left to the absolute bound.
CONF_RTOL = 1e-3

# --- near-ties: each epsilon is the measured spread with margin (docs/parity.md) ----------------------------
# A coarse match whose confidence lies within this relative distance of the threshold (conf = thr (1 +- eps)).
COARSE_THRESHOLD_TIE_RTOL = 1e-3
# A row of the coarse confidence matrix whose two best cells lie within this relative distance.
CONF_ARGMAX_TIE_RTOL = 1e-3
# A fine-level match whose two best dual-softmax scores (8x8 x 8x8 window pairs) lie within this relative distance.
FINE_ARGMAX_TIE_RTOL = 1e-5
# A RoMa cell whose anchor classification (64x64 anchors) has its two best logits within this absolute distance.
ANCHOR_TIE_ATOL = 1e-3
# How far (in coarse cells, any direction) a flipped anchor moves RoMa's dense output beyond the tolerances: the
# refiners' 5x5 convolutions over several blocks and scales carry it past the neighbouring cells. Measured
# (ONNX Runtime vs torch on an AVX2 CPU, pair1, 6 flipped anchors): warp errors up to 0.19 in the tie cell,
# 0.13 one cell away, 2.1e-3 two cells away, <= 2.9e-4 from three cells on (the background's level).
ANCHOR_TIE_SPREAD_CELLS = 2
# A draw of torch.multinomial without replacement (a race of weight / Exp(1) keys) whose key lies within this
# relative distance of the key of the draw it changed places with (keys = 1 / (1 + density) / q move with
# the density, measured <= 1.9e-5 relative: 5x margin).
DRAW_TIE_RTOL = 1e-4
# The KDE density of the balanced sampler's stage-1 matches (cdist + exp + sum), relative per element:
# measured 3e-7 on AVX-512/AVX2 but 1.9e-5 on the generic path (cdist's |x|^2 + |y|^2 - 2xy cancels).
KDE_RTOL = 1e-4
# A handful, never a percentage: more near-ties than this in one comparison of one pair fails.
MAX_EXCUSED_PER_PAIR = 8


@dataclass
class Excused:
    """What one comparison excused; a test prints it, so every run says how many near-ties it took."""

    what: str
    count: int = 0
    details: list[str] = field(default_factory=list)

    def add(self, detail: str) -> None:
        self.count += 1
        self.details.append(detail)

    def check(self, limit: int = MAX_EXCUSED_PER_PAIR) -> "Excused":
        assert self.count <= limit, f"{self}: more near-ties than a handful ({limit}): not rounding"
        return self

    def __str__(self) -> str:
        shown = "; ".join(self.details[:8]) + (" ..." if len(self.details) > 8 else "")
        return f"{self.what}: {self.count} near-tie(s) excused" + (f" [{shown}]" if shown else "")


def report(*excused: Excused) -> None:
    """Print what a test excused (pytest shows it with -s or -rA; CI logs keep it)."""
    for e in excused:
        print(f"[parity] {e}")


# --- margins ------------------------------------------------------------------------------------------------

def relative_margin(scores: np.ndarray) -> np.ndarray:
    """(best - second best) / |best| along the last axis, one value per row."""
    s = np.asarray(scores, np.float64)
    s = s.reshape(-1, s.shape[-1])
    top2 = -np.partition(-s, 1, axis=-1)[:, :2]
    return (top2[:, 0] - top2[:, 1]) / np.maximum(np.abs(top2[:, 0]), np.finfo(np.float64).tiny)


def absolute_margin(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """best - second best along `axis` (the other axes kept)."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    top2 = -np.partition(-s, 1, axis=-1)[..., :2]
    return top2[..., 0] - top2[..., 1]


def is_threshold_tie(conf: Any, threshold: float, rtol: float = COARSE_THRESHOLD_TIE_RTOL) -> Any:
    """conf within rtol (relative) of the threshold: `conf > threshold` may go either way on another CPU."""
    return np.abs(np.asarray(conf, np.float64) - threshold) <= rtol * abs(threshold)


# --- comparisons ------------------------------------------------------------------------------------------

def assert_conf_close(actual: Any, expected: Any, name: str) -> tuple[float, float]:
    """Confidences within CONF_ATOL absolute and CONF_RTOL relative; returns both largest errors."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    if not a.size:
        return 0.0, 0.0
    err = np.abs(a - e)
    normal = np.abs(e) >= np.finfo(np.float32).tiny
    rel = np.where(normal, err / np.where(normal, np.abs(e), 1.0), 0.0)
    worst_abs, worst_rel = int(err.argmax()), int(rel.argmax())
    assert err.flat[worst_abs] <= CONF_ATOL, (f"{name}: abs error {err.flat[worst_abs]:.3g} > {CONF_ATOL:g} at "
                                              f"{worst_abs} ({a.flat[worst_abs]:.8g} vs {e.flat[worst_abs]:.8g})")
    assert rel.flat[worst_rel] <= CONF_RTOL, (f"{name}: relative error {rel.flat[worst_rel]:.3g} > {CONF_RTOL:g} at "
                                              f"{worst_rel} ({a.flat[worst_rel]:.8g} vs {e.flat[worst_rel]:.8g})")
    return float(err.flat[worst_abs]), float(rel.flat[worst_rel])


def match_list_diff(ref_i: Any, ref_j: Any, got_i: Any, got_j: Any
                    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], list[tuple[int, int]]]:
    """Indices into ref and got of the common (i, j) matches (in ref's order), and the matches of one list only."""
    ref_keys = np.asarray(ref_i, np.int64) * (1 << 32) + np.asarray(ref_j, np.int64)
    got_keys = np.asarray(got_i, np.int64) * (1 << 32) + np.asarray(got_j, np.int64)
    _, ri, gi = np.intersect1d(ref_keys, got_keys, return_indices=True)
    order = np.argsort(ri)

    def cells(keys: np.ndarray) -> list[tuple[int, int]]:
        return [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in keys]

    return ri[order], gi[order], cells(np.setdiff1d(ref_keys, got_keys)), cells(np.setdiff1d(got_keys, ref_keys))


def compare_match_lists(ref_i: Any, ref_j: Any, got_i: Any, got_j: Any, is_tie: Callable[[int, int], bool],
                        what: str) -> tuple[np.ndarray, np.ndarray, Excused]:
    """The same (i, j) lists in the same order, except near-ties: a match of one list only must be a tie.

    Returns the indices into ref and got of the common matches (in ref's order) and what was excused."""
    ri, gi, only_ref, only_got = match_list_diff(ref_i, ref_j, got_i, got_j)
    assert np.all(np.diff(gi) > 0), f"{what}: the common matches come in another order"
    excused = Excused(what)
    for side, cells in (("only in the original's", only_ref), ("only in ours", only_got)):
        for i, j in cells:
            assert is_tie(i, j), f"{what}: match ({i}, {j}) {side} is not a near-tie"
            excused.add(f"({i},{j}) {side}")
    return ri, gi, excused.check()


def compare_keypoints(got0: Any, ref0: Any, got1: Any, ref1: Any, fine_margin: Any | None, what: str,
                      atol: float = KEYPOINT_ATOL_PX) -> tuple[np.ndarray, Excused]:
    """Keypoints of the same matches within atol px, except matches whose fine argmax is a near-tie.

    fine_margin: relative_margin of each match's fine dual-softmax scores (None: no excuse possible).
    Returns the mask of matches that were compared (not excused) and what was excused."""
    err = np.maximum(np.abs(np.asarray(got0, np.float64) - ref0).max(-1, initial=0),
                     np.abs(np.asarray(got1, np.float64) - ref1).max(-1, initial=0))
    excused = Excused(what)
    for m in np.nonzero(err > atol)[0]:
        margin = np.inf if fine_margin is None else float(fine_margin[m])
        assert margin <= FINE_ARGMAX_TIE_RTOL, (
            f"{what}: match {m} off by {err[m]:.3g} px (> {atol:g}) and its fine argmax is no near-tie "
            f"(margin {margin:.3g} > {FINE_ARGMAX_TIE_RTOL:g})")
        excused.add(f"match {m} off by {err[m]:.2f} px, fine margin {margin:.1e}")
    return err <= atol, excused.check()


def compare_argmax(got: Any, ref: Any, margin: Any, eps: float, what: str) -> Excused:
    """Two argmax maps equal except where our two best scores lie within eps (margin: same shape as got)."""
    got, ref, margin = np.asarray(got), np.asarray(ref), np.asarray(margin)
    assert got.shape == ref.shape == margin.shape, what
    excused = Excused(what)
    for flat in np.nonzero((got != ref).ravel())[0]:
        where = np.unravel_index(flat, got.shape)
        assert margin[where] <= eps, (f"{what}: argmax differs at {tuple(int(w) for w in where)} "
                                      f"({got[where]} vs {ref[where]}) with margin {margin[where]:.3g} > {eps:g}")
        excused.add(f"{tuple(int(w) for w in where)} margin {margin[where]:.1e}")
    return excused.check()


def decide_anchor_ties_as(cls: Any, ref_argmax: Any, eps: float = ANCHOR_TIE_ATOL) -> Any:
    """RoMa's anchor logits (torch [B, 4096, h, w]) with the reference's decision taken where ours differs at a
    near-tie (our two best within eps): that anchor's logit raised just above our best, an edit of at most the
    margin. As the sampler's stored draws are replayed: which of two near-equal anchors wins is the CPU's rounding
    (the original's own fp32 GP flips such ties between CPUs, docs/parity.md "The GP solve"), and one flip moves
    that cell's flow by a region and the scale-16 certainty logits image-wide. Flips at larger margins are kept."""
    import torch

    ref = torch.as_tensor(np.asarray(ref_argmax), device=cls.device).long()
    top2 = cls.topk(2, dim=1).values
    tie = (cls.argmax(dim=1) != ref) & (top2[:, 0] - top2[:, 1] <= eps)
    if not bool(tie.any()):
        return cls
    out = cls.clone()
    b, y, x = torch.nonzero(tie, as_tuple=True)
    best = top2[:, 0][b, y, x]
    out[b, ref[b, y, x], y, x] = best + 1e-6 * best.abs().clamp(min=1.0)  # strictly above, also after the softmax
    return out


# --- RoMa's balanced sampler: torch.multinomial without replacement, replayed ----------------------------------

def race_keys(weights: Any, generator: Any) -> np.ndarray:
    """The keys of `torch.multinomial(weights, k, replacement=False, generator)` on the CPU: it draws
    q ~ Exp(1) per entry and returns the top k of weights / q. Consumes the generator as that call does."""
    import torch

    w = torch.as_tensor(weights)
    q = torch.empty_like(w).exponential_(generator=generator)
    return (w / q).numpy()


def compare_draws(ref_idx: Any, got_idx: Any, keys: np.ndarray, what: str,
                  rtol: float = DRAW_TIE_RTOL) -> tuple[Excused, Excused]:
    """The same draws as the original's, except near-ties of the race: returns (membership, order).

    membership: an index drawn by one side only must have its key within rtol of the key of the one it
    displaced (at most a handful). order: the draws come sorted by key, so two draws whose keys are within
    rtol may come in either order; each such position is checked and counted, but it changes no match."""
    ref_idx, got_idx = np.asarray(ref_idx), np.asarray(got_idx)
    assert ref_idx.shape == got_idx.shape, f"{what}: {ref_idx.shape} != {got_idx.shape}"

    def gap(a: int, b: int) -> float:
        ka, kb = float(keys[a]), float(keys[b])
        return abs(ka - kb) / max(abs(ka), abs(kb), np.finfo(np.float64).tiny)

    membership = Excused(f"{what} (drawn by one side only)")
    only_ref, only_got = np.setdiff1d(ref_idx, got_idx), np.setdiff1d(got_idx, ref_idx)
    for a, b in zip(sorted(only_ref, key=lambda i: keys[i]), sorted(only_got, key=lambda i: keys[i])):
        assert gap(a, b) <= rtol, (f"{what}: {b} drawn instead of the original's {a}: keys {keys[b]:.9g} vs "
                                   f"{keys[a]:.9g}, no near-tie ({gap(a, b):.3g} > {rtol:g})")
        membership.add(f"{b} for {a}, keys {gap(a, b):.1e} apart")
    membership.check()
    order = Excused(f"{what} (same draws, order of tied keys)")
    displaced = {int(b): int(a) for a, b in zip(sorted(only_ref, key=lambda i: keys[i]),
                                                 sorted(only_got, key=lambda i: keys[i]))}
    for pos in np.nonzero(ref_idx != got_idx)[0]:
        a, b = int(ref_idx[pos]), int(got_idx[pos])
        if displaced.get(b) == a:
            continue  # the membership near-tie above, in its place
        assert gap(a, b) <= rtol, (f"{what}: draw {pos} is {b} (key {keys[b]:.9g}), the original's {a} "
                                   f"(key {keys[a]:.9g}): no near-tie ({gap(a, b):.3g} > {rtol:g})")
        order.add(f"draw {pos}: {b} for {a}, keys {gap(a, b):.1e} apart")
    return membership, order


def balanced_draw_keys(certainty: Any, density: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The race keys of both draws of the balanced sampler (matchanything_ros.core.roma.sampling) seeded with
    `seed`: stage 1 on the thresholded certainty, stage 2 on the original's 1 / (1 + density) weights (1e-7
    where density < 10). Tests check that these keys reproduce the sampler's own draws before using them."""
    import torch

    from matchanything_ros.core.roma.config import SAMPLE_THRESH
    from matchanything_ros.core.roma.sampling import seeded_generator

    c = torch.as_tensor(np.asarray(certainty, np.float32).reshape(-1)).clone()
    c[c > SAMPLE_THRESH] = 1
    if c.sum() == 0:
        c[0] = 1
    generator = seeded_generator(seed)
    keys1 = race_keys(c, generator)
    d = torch.as_tensor(np.asarray(density, np.float32))
    p = 1 / (d + 1)
    p[d < 10] = 1e-7
    return keys1, race_keys(p, generator)


def top_draws(keys: np.ndarray, k: int) -> np.ndarray:
    """The indices torch.multinomial returns for these race keys (torch's topk: its order among equal keys)."""
    import torch

    return torch.as_tensor(keys).topk(k).indices.numpy()


def verdict(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a check built from these rules without raising (for reports, e.g. the GPU benchmark scripts):
    {"holds": True, **what it returned} or {"holds": False, "why": the failed rule's message}."""
    try:
        return {"holds": True, **check()}
    except AssertionError as exc:
        return {"holds": False, "why": str(exc).splitlines()[0][:300]}


def dense_errors_at_anchor_ties(err: np.ndarray, tol: float, anchor_margin: np.ndarray, what: str,
                                eps: float = ANCHOR_TIE_ATOL) -> tuple[np.ndarray, Excused]:
    """RoMa's dense output [u, 2u] (left half: image A's warp, right half: B's) may differ by more than tol
    only around a cell whose anchor classification is a near-tie: anchor_margin [2, h, w] (absolute_margin
    of the coarse classification logits of A and B), the pixel's cell or one within ANCHOR_TIE_SPREAD_CELLS
    of it (the refiners spread a flipped anchor's flow over the cell's surroundings). Returns the mask of
    pixels left to compare (not excused) and the tie cells it took, counted."""
    err, margin = np.asarray(err), np.asarray(anchor_margin)
    u, h, w = err.shape[0], margin.shape[1], margin.shape[2]
    assert err.shape[1] == 2 * u and margin.shape[0] == 2, f"{what}: shapes {err.shape}, {margin.shape}"
    tie = margin <= eps
    r = ANCHOR_TIE_SPREAD_CELLS
    padded = np.pad(tie, ((0, 0), (r, r), (r, r)))
    near = np.zeros_like(tie)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            near |= padded[:, dy:dy + h, dx:dx + w]
    compared = np.ones(err.shape, bool)
    excused = Excused(what)
    cells: set[tuple[int, int, int]] = set()
    for y, x in zip(*np.nonzero(err > tol)):
        side = int(x >= u)
        cy, cx = int(y) * h // u, (int(x) - side * u) * w // u
        assert near[side, cy, cx], (f"{what}: error {err[y, x]:.3g} > {tol:g} at ({y}, {x}) and no anchor near-tie "
                                    f"within {r} cells of cell {(side, cy, cx)}")
        compared[y, x] = False
        y0, x0 = max(cy - r, 0), max(cx - r, 0)
        for ty, tx in zip(*np.nonzero(tie[side, y0:cy + r + 1, x0:cx + r + 1])):
            cells.add((side, int(ty) + y0, int(tx) + x0))
    for cell in sorted(cells):  # the tie anchors excused, however many pixels each one moved
        excused.add(f"anchor tie at cell {cell}, margin {margin[cell]:.1e}")
    return compared, excused.check()
