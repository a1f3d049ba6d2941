"""Tests of dncut.eval.methods: hand-made features with known answers, scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi
import torch

from dncut.eval.methods import (box_to_pixels, clean_binary, largest_component_box, seed_component, simple_ncut,
                                tokencut, upsample_map, upsample_mask)

E = torch.eye(6, dtype=torch.float64)


def _feature_map(h: int, w: int, cells: dict[tuple[int, int], torch.Tensor], background=E[1]) -> torch.Tensor:
    """(1, C, h, w) map: ``background`` everywhere except the given cells."""
    f = background.repeat(h, w, 1).clone()  # (h, w, C)
    for (r, c), v in cells.items():
        f[r, c] = v
    return f.permute(2, 0, 1)[None]  # (1, C, h, w)


def _rect(r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


def _shape_mask(h: int, w: int, cells) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for r, c in cells:
        m[r, c] = True
    return m


# An L-shaped object (minority) on an orthogonal background.
L_SHAPE = _rect(1, 5, 2, 4) + _rect(3, 5, 4, 7)


def test_simple_recovers_a_minority_shape():
    feats = _feature_map(7, 9, {rc: E[0] for rc in L_SHAPE})
    z2, masks = simple_ncut(feats, solver="eigh")
    expected = _shape_mask(7, 9, L_SHAPE)
    assert z2.shape == (1, 7, 9) and masks.dtype == torch.bool
    np.testing.assert_array_equal(masks[0].numpy(), expected)
    assert (z2[0][torch.from_numpy(expected)] > 0).all() and (z2[0][~torch.from_numpy(expected)] < 0).all()


def test_simple_takes_the_minority_side_as_foreground():
    # the "object" covers 40 of 64 cells: the authors' rule makes the 24 others the foreground
    big = _rect(0, 5, 0, 8)
    feats = _feature_map(8, 8, {rc: E[0] for rc in big})
    _, masks = simple_ncut(feats, solver="eigh")
    np.testing.assert_array_equal(masks[0].numpy(), ~_shape_mask(8, 8, big))


# the fast solver runs at the eval tolerance (EVAL_TOL): eigenvectors to ~1e-6 / gap, same masks
SOLVER_ATOL = {"eigh": 1e-6, "lobpcg": 1e-4}


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_simple_matches_a_scipy_eigendecomposition(solver):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = rng.integers(0, 3, size=(8, 7))  # 56 nodes: more than lobpcg's exact-solver cut-off
    f = centres[labels] + 0.4 * rng.normal(size=(8, 7, 16))  # (h, w, C)
    z2, masks = simple_ncut(torch.from_numpy(f).permute(2, 0, 1)[None], solver=solver)
    # reference: numpy graph, scipy eigh of the normalized Laplacian
    x = f.reshape(-1, 16)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T
    w = np.where(a > 0, a, 1e-6)
    d = w.sum(1)
    lap = np.eye(len(d)) - w / np.sqrt(d[:, None] * d[None, :])
    _, vecs = scipy.linalg.eigh(lap)
    ref = vecs[:, 1]
    frac = np.mean(ref > 0)
    if frac > 0.5:  # independent orientation: minority positive side
        ref = -ref
    got = z2[0].numpy().ravel()
    np.testing.assert_allclose(got, ref, atol=SOLVER_ATOL[solver])
    np.testing.assert_array_equal(masks[0].numpy().ravel(), ref > 0)


# Two separated blobs: A (the seed's) and a smaller B that also links to a few background cells.
BLOB_A = _rect(1, 4, 1, 5)
BLOB_B = _rect(5, 7, 7, 9)
LINKS = [(7, 0), (7, 1), (0, 9)]


def _two_blobs() -> torch.Tensor:
    cells = {rc: E[0] for rc in BLOB_A}
    cells.update({rc: (E[0] + E[3]) / 2**0.5 for rc in BLOB_B})
    cells.update({rc: (E[1] + E[3]) / 2**0.5 for rc in LINKS})
    return _feature_map(8, 10, cells)


def test_tokencut_keeps_only_the_seed_component_and_its_box():
    out = tokencut(_two_blobs(), solver="eigh")
    a, b = _shape_mask(8, 10, BLOB_A), _shape_mask(8, 10, BLOB_B)
    np.testing.assert_array_equal(out.bipartition[0].numpy(), a | b)  # both blobs are foreground
    np.testing.assert_array_equal(out.masks[0].numpy(), a)  # only the seed's component is kept
    seed = int(out.seeds[0])
    assert a.ravel()[seed]
    assert out.boxes[0].tolist() == [1, 1, 5, 4]  # x0, y0, x1, y1 (half-open, patches)
    np.testing.assert_array_equal(box_to_pixels(out.boxes[0].numpy(), 16, (128, 160)), [16, 16, 80, 64])


def _tokencut_reference(f: np.ndarray, tau: float = 0.2, eps: float = 1e-5):
    """The peers' way: scipy generalized eigh per image; y2 oriented so its max-|y| entry is foreground."""
    h, w, c = f.shape
    x = f.reshape(-1, c)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = (x @ x.T > tau).astype(np.float64)
    a[a == 0] = eps
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    y = vecs[:, 0].copy()
    part = y > y.mean()
    seed = int(np.argmax(np.abs(y)))
    if not part[seed]:
        y, part = -y, ~part
    return y, part.reshape(h, w)


def _component(part: np.ndarray, seed: int) -> tuple[np.ndarray, list[int]]:
    labels, _ = ndi.label(part)
    comp = labels == labels.flat[seed]
    rows, cols = np.nonzero(comp)
    return comp, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokencut_matches_the_scipy_generalized_eigenproblem(seed, solver):
    rng = np.random.default_rng(seed)
    h, w = 9, 11
    centres = rng.normal(size=(2, 24))
    yy, xx = np.mgrid[:h, :w]
    labels = ((yy - 4) ** 2 / 9 + (xx - 5 - seed) ** 2 / 12 < 1).astype(int)  # an ellipse
    f = centres[labels] + 0.9 * rng.normal(size=(h, w, 24))  # (h, w, C), noisy: few tied nodes
    out = tokencut(torch.from_numpy(f).permute(2, 0, 1)[None], solver=solver)
    y, part = _tokencut_reference(f)
    got = out.eigvec[0].numpy().ravel()
    atol = 1e-7 if solver == "eigh" else SOLVER_ATOL[solver]
    np.testing.assert_allclose(got, y, atol=atol)  # same scale (y^T D y = 1) and orientation
    seed_tol = 1e-9 if solver == "eigh" else atol
    np.testing.assert_array_equal(out.bipartition[0].numpy(), part)
    ours = int(out.seeds[0])
    assert abs(abs(y[ours]) - np.abs(y).max()) < seed_tol  # a maximiser of |y2| (ties are possible)
    comp, box = _component(part, ours)
    np.testing.assert_array_equal(out.masks[0].numpy(), comp)
    np.testing.assert_array_equal(comp, labels.astype(bool))  # the ellipse, noise cells dropped
    assert out.boxes[0].tolist() == box


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.normal(size=(3, 8, 5, 6)))
    simple_z, simple_m = simple_ncut(feats, solver="eigh")
    tc = tokencut(feats, solver="eigh")
    for i in range(3):
        z, m = simple_ncut(feats[i : i + 1], solver="eigh")
        np.testing.assert_allclose(simple_z[i].numpy(), z[0].numpy(), atol=1e-10)
        one = tokencut(feats[i : i + 1], solver="eigh")
        np.testing.assert_array_equal(tc.masks[i].numpy(), one.masks[0].numpy())
        assert tc.boxes[i].tolist() == one.boxes[0].tolist()


def test_upsample_without_padding_is_one_bilinear_resize():
    # 2 -> 4 bilinear (align_corners=False) weights along an axis: 1, 0.75, 0.25, 0
    m = np.array([[1, 0], [0, 0]], bool)
    np.testing.assert_allclose(upsample_map(m.astype(np.float32), (4, 4))[:, 0], [1, 0.75, 0.25, 0])
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(upsample_mask(m, (4, 4)), expected)


def test_upsample_removes_the_padding_first():
    # grid 2x2 over an 8x8 canvas (stride 4) whose top-left 6x5 is the image.
    # canvas weights along an axis: 1, 1, .875, .625, .375, .125, 0, 0; 2-D weight = product
    m = np.array([[1, 0], [0, 0]], bool)
    got = upsample_mask(m, (6, 5), canvas=(8, 8), content=(6, 5))
    weights = np.array([1, 1, 0.875, 0.625, 0.375, 0.125, 0, 0])
    expected = np.outer(weights[:6], weights[:5]) > 0.5
    np.testing.assert_array_equal(got, expected)
    # a direct resize of the padded grid to 6x5 would give 3 rows only
    assert upsample_mask(m, (6, 5)).sum(0)[0] == 3


def test_upsample_rejects_bad_geometry():
    with pytest.raises(ValueError, match="content"):
        upsample_map(np.zeros((2, 2)), (4, 4), canvas=(8, 8), content=(9, 8))
    with pytest.raises(ValueError, match="values must be an"):
        upsample_map(np.zeros((2, 2, 2)), (4, 4))


def test_clean_binary_fills_holes_and_keeps_the_largest_component():
    m = np.zeros((10, 10), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False  # a hole
    m[8:10, 8:10] = True  # a small second component
    expected = np.zeros((10, 10), bool)
    expected[1:6, 1:6] = True
    np.testing.assert_array_equal(clean_binary(m), expected)
    assert not clean_binary(np.zeros((4, 4), bool)).any()


def test_seed_component_is_four_connected():
    part = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]], bool)  # (0, 0) touches (1, 1) diagonally only
    comp, box = seed_component(part, 4)
    np.testing.assert_array_equal(comp, np.array([[0, 0, 0], [0, 1, 1], [0, 1, 0]], bool))
    assert box.tolist() == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="not in the foreground"):
        seed_component(part, 1)


def test_largest_component_box():
    m = np.zeros((6, 8), bool)
    m[0, 0] = True  # a 1-cell component
    m[2:5, 3:7] = True  # the largest: rows 2..4, cols 3..6
    assert largest_component_box(m).tolist() == [3, 2, 7, 5]
    assert largest_component_box(np.zeros((3, 4), bool)).tolist() == [0, 0, 4, 3]


def test_box_to_pixels_clips_to_the_unpadded_image():
    np.testing.assert_array_equal(box_to_pixels(np.array([1, 0, 4, 3]), 16, (40, 50)), [16, 0, 50, 40])


def test_bad_features_are_rejected():
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        simple_ncut(torch.zeros(2, 5, 3), solver="eigh")
    with pytest.raises(ValueError, match="at least 2 cells"):
        tokencut(torch.ones(1, 4, 1, 1), solver="eigh")


def test_eval_methods_run_the_fast_solver_at_eval_tol(monkeypatch):
    """simple_ncut and tokencut hand EVAL_TOL and float32 to an iterative solver; eigh, the
    reference, runs in float64. A looser tol means fewer iterations (the solver honours it)."""
    import dncut.eval.methods as methods
    from dncut.ncut import lobpcg, normalized_cut

    assert methods.EVAL_TOL == 1e-5
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["solver"], kwargs["tol"], kwargs["solver_dtype"]))
        return normalized_cut(*args, **kwargs)

    monkeypatch.setattr(methods, "normalized_cut", spy)
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 32))
    labels = rng.integers(0, 4, size=(4, 12, 14))
    feats = torch.from_numpy(centres[labels] + 2.0 * rng.normal(size=(4, 12, 14, 32))).permute(0, 3, 1, 2)
    for method in (simple_ncut, tokencut):
        for solver in ("lobpcg", "eigh"):
            method(feats, solver=solver)
    assert seen == [("lobpcg", 1e-5, torch.float32), ("eigh", 1e-5, torch.float64)] * 2
    f = feats.flatten(2).transpose(1, 2)  # (B, n, C)
    iterations = []
    for tol in (1e-5, 1e-10):
        lobpcg.reset_stats()
        normalized_cut(f, solver="lobpcg", tol=tol)
        iterations.append(lobpcg.reset_stats().iterations)
    assert 0 < iterations[0] < iterations[1]


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_ncut_maps_mixes_grids_of_one_node_count(solver):
    """13 x 20, 20 x 13 and 10 x 10 maps in one call: the first two share one NCut call; every
    image gets what tokencut / simple_ncut give it alone, and a transposed map gives the
    transposed mask and the box with x and y swapped (4-connectivity is transpose-invariant)."""
    from dncut.eval.methods import ncut_maps

    rng = np.random.default_rng(9)
    centres = rng.normal(size=(2, 24))
    yy, xx = np.mgrid[:13, :20]
    labels = ((yy - 6) ** 2 / 16 + (xx - 8) ** 2 / 30 < 1).astype(int)
    wide = torch.from_numpy(centres[labels] + 0.6 * rng.normal(size=(13, 20, 24))).permute(2, 0, 1).float()
    tall = wide.transpose(1, 2).contiguous()  # (C, 20, 13)
    small = torch.from_numpy(rng.normal(size=(24, 10, 10))).float()
    out = ncut_maps([wide, tall, small], ["simple", "tokencut"], solver=solver)
    for f, got in zip((wide, tall, small), out):
        alone = tokencut(f[None], solver=solver)
        z, m = simple_ncut(f[None], solver=solver)
        np.testing.assert_array_equal(got["tokencut_mask"], alone.masks[0].numpy())
        assert got["tokencut_box"].tolist() == alone.boxes[0].tolist()
        np.testing.assert_allclose(got["tokencut_map"], alone.eigvec[0].numpy(), atol=1e-4)
        np.testing.assert_array_equal(got["simple_mask"], m[0].numpy())
    np.testing.assert_array_equal(out[1]["tokencut_mask"], out[0]["tokencut_mask"].T)
    x0, y0, x1, y1 = out[0]["tokencut_box"].tolist()
    assert out[1]["tokencut_box"].tolist() == [y0, x0, y1, x1]
    with pytest.raises(ValueError):
        ncut_maps([torch.zeros(24, 1, 1)], ["tokencut"], solver="eigh")
