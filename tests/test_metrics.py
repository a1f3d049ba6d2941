"""Tests for dncut.eval.metrics: hand-computed cases, a naive TokenCut-protocol reference,
pysodmetrics on random maps, and the real SOD maps when /work/shared/data is present."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from dncut.eval.metrics import (
    aggregate_corloc,
    aggregate_saliency,
    binarize_gt,
    box_iou,
    corloc_hit,
    fbeta_curve,
    score_saliency,
)

SOD_DIR = Path("/work/shared/data/sod-val")


def f03(p: float, r: float) -> float:
    """Hand formula for Fβ with β² = 0.3."""
    return 0.0 if p == 0 and r == 0 else 1.3 * p * r / (0.3 * p + r)


# --------------------------------------------------------------------------- binarize_gt
def test_binarize_gt_dtypes():
    assert binarize_gt(np.array([[0, 127, 128, 255]], dtype=np.uint8)).tolist() == [
        [False, False, True, True]
    ]
    assert binarize_gt(np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)).tolist() == [
        [False, False, True, True]
    ]
    assert binarize_gt(np.array([[0.0, 0.5, 0.51, 1.0]])).tolist() == [[False, False, True, True]]
    assert binarize_gt(np.array([[True, False]])).tolist() == [[True, False]]


def test_binarize_gt_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        binarize_gt(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize_gt(np.array([[0.0, 255.0]]))


# --------------------------------------------------------------------------- one image by hand
# pred (uint8) 230 153  51      gt 1 1 0
#              102   0 255         1 0 0
PRED_U8 = np.array([[230, 153, 51], [102, 0, 255]], dtype=np.uint8)
GT = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)


def test_hand_case_scalar_scores():
    s = score_saliency(PRED_U8, GT)
    # binary (> 0.5): 1 1 0 / 0 0 1 -> 4 of 6 pixels right; intersection 2, union 4
    assert s.acc == pytest.approx(4 / 6)
    assert s.iou == pytest.approx(0.5)
    mae = (25 + 102 + 51 + 153 + 0 + 255) / 255 / 6  # |u/255 - gt|
    assert s.mae == pytest.approx(mae)


def test_hand_case_precision_recall_curves():
    s = score_saliency(PRED_U8, GT)
    assert s.precision.shape == s.recall.shape == (255,)
    # threshold k: pixel predicted iff u > k
    expected = {  # k: (precision, recall)
        0: (3 / 5, 1.0),  # {230, 153, 51, 102, 255}
        50: (3 / 5, 1.0),
        51: (3 / 4, 1.0),  # 51 drops out
        101: (3 / 4, 1.0),
        102: (2 / 3, 2 / 3),  # {230, 153, 255}
        152: (2 / 3, 2 / 3),
        153: (1 / 2, 1 / 3),  # {230, 255}
        229: (1 / 2, 1 / 3),
        230: (0.0, 0.0),  # {255}
        254: (0.0, 0.0),
    }
    for k, (p, r) in expected.items():
        assert s.precision[k] == pytest.approx(p), k
        assert s.recall[k] == pytest.approx(r), k
    assert s.max_fbeta == pytest.approx(f03(0.75, 1.0))  # = 39/49


def test_hand_case_binary_override():
    binary = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)  # == GT
    s = score_saliency(PRED_U8, GT, binary=binary)
    assert s.acc == 1.0 and s.iou == 1.0
    assert s.mae == pytest.approx(score_saliency(PRED_U8, GT).mae)  # the soft map is scored


# --------------------------------------------------------------------------- dataset by hand
# image P: pred [20, 10, 0, 0], gt [1, 1, 0, 0]  (narrow range: pysod stretches it)
# image Q: pred [255, 200, 0, 0], gt [1, 0, 0, 0]
P_PRED, P_GT = np.array([[20, 10, 0, 0]], np.uint8), np.array([[1, 1, 0, 0]], bool)
Q_PRED, Q_GT = np.array([[255, 200, 0, 0]], np.uint8), np.array([[1, 0, 0, 0]], bool)


def test_hand_dataset_tokencut_max_of_mean_curve():
    scores = [score_saliency(P_PRED, P_GT), score_saliency(Q_PRED, Q_GT)]
    # P: k < 10 F=1; 10..19 F(1, .5); k >= 20 nothing predicted (P=1, R=0) F=0
    # Q: k < 200 F(.5, 1); 200..254 F=1
    f_p = np.array([1.0] * 10 + [f03(1, 0.5)] * 10 + [0.0] * 235)
    f_q = np.array([f03(0.5, 1)] * 200 + [1.0] * 55)
    np.testing.assert_allclose(fbeta_curve(scores), (f_p + f_q) / 2, atol=1e-12)
    agg = aggregate_saliency(scores)
    # 18/23, not the mean of the per-image maxima (1.0)
    assert agg["max_fbeta"] == pytest.approx((1 + f03(0.5, 1)) / 2)
    assert np.mean([s.max_fbeta for s in scores]) == pytest.approx(1.0)
    assert agg["mae"] == pytest.approx(((235 + 245) / 255 / 4 + (0 + 200) / 255 / 4) / 2)
    assert agg["n_images"] == 2


def test_hand_dataset_pysod_definition():
    scores = [score_saliency(P_PRED, P_GT), score_saliency(Q_PRED, Q_GT)]
    # pysod: P min-max -> [1, .5, 0, 0] -> levels [255, 127, 0, 0]; Q -> [255, 200, 0, 0].
    # curve index j is the threshold ">= 255 - j"; level 0 predicts every pixel.
    f_p = {0: f03(0.5, 1), 1: 1.0, 127: 1.0, 128: f03(1, 0.5), 255: f03(1, 0.5)}
    f_q = {0: f03(0.25, 1), 1: f03(0.5, 1), 200: f03(0.5, 1), 201: 1.0, 255: 1.0}
    curve = fbeta_curve(scores, definition="pysod")
    assert curve.shape == (256,)
    for level in (0, 1, 127, 128, 200, 201, 255):
        lookup_p = f_p[max(k for k in f_p if k <= level)]
        lookup_q = f_q[max(k for k in f_q if k <= level)]
        assert curve[255 - level] == pytest.approx((lookup_p + lookup_q) / 2), level
    agg = aggregate_saliency(scores, definition="pysod")
    # 0.90625, where the TokenCut definition gives 18/23
    assert agg["max_fbeta"] == pytest.approx((f03(1, 0.5) + 1) / 2)
    assert agg["mae"] == pytest.approx((0.5 / 4 + (200 / 255) / 4) / 2)  # on the stretched P


def test_unknown_definition_and_empty():
    scores = [score_saliency(P_PRED, P_GT)]
    with pytest.raises(ValueError, match="'tokencut', 'pysod'"):
        aggregate_saliency(scores, definition="mean")
    with pytest.raises(ValueError, match="no images"):
        aggregate_saliency([])


# --------------------------------------------------------------------------- edge cases
def test_empty_prediction():
    gt = np.array([[1, 0], [0, 0]], bool)
    s = score_saliency(np.zeros((2, 2)), gt)
    np.testing.assert_array_equal(s.precision, 1.0)  # nothing predicted -> precision 1
    np.testing.assert_array_equal(s.recall, 0.0)
    assert s.max_fbeta == 0.0 and s.iou == 0.0 and s.acc == 0.75 and s.mae == 0.25


def test_empty_gt():
    gt = np.zeros((2, 2), bool)
    pred = np.array([[0.8, 0.0], [0.0, 0.0]])
    s = score_saliency(pred, gt)
    np.testing.assert_array_equal(s.recall, 1.0)  # empty GT -> recall 1
    predicted = np.arange(255) < 0.8 * 255  # k / 255 < 0.8
    np.testing.assert_array_equal(s.precision, np.where(predicted, 0.0, 1.0))
    assert s.max_fbeta == 1.0  # thresholds above 0.8 predict nothing: P = R = 1
    assert s.iou == 0.0 and s.acc == 0.75
    both_empty = score_saliency(np.zeros((2, 2)), gt)
    assert both_empty.iou == 1.0 and both_empty.acc == 1.0


def test_all_foreground():
    s = score_saliency(np.ones((3, 3)), np.ones((3, 3), bool))
    np.testing.assert_array_equal(s.precision, 1.0)
    np.testing.assert_array_equal(s.recall, 1.0)
    assert (s.acc, s.iou, s.mae, s.max_fbeta) == (1.0, 1.0, 0.0, 1.0)


def test_constant_map():
    gt = np.array([[1, 1, 0, 0]], bool)
    s = score_saliency(np.full((1, 4), 0.5), gt)
    below = np.arange(255) / 255 < 0.5  # k <= 127: every pixel predicted
    np.testing.assert_allclose(s.precision, np.where(below, 0.5, 1.0))
    np.testing.assert_allclose(s.recall, np.where(below, 1.0, 0.0))
    assert s.max_fbeta == pytest.approx(f03(0.5, 1.0))
    assert s.iou == 0.0 and s.acc == 0.5  # 0.5 is not > 0.5
    # pysod leaves a constant map as is: levels floor(127.5) = 127, ">=" -> all for level <= 127
    assert s.pysod_fbeta[255 - 127] == pytest.approx(f03(0.5, 1.0))
    assert s.pysod_fbeta[255 - 128] == 0.0


def test_uint8_and_float_inputs_agree():
    rng = np.random.default_rng(3)
    pred_u8 = rng.integers(0, 256, size=(17, 23), dtype=np.uint8)
    gt = rng.random((17, 23)) > 0.6
    ref = score_saliency(pred_u8, gt)
    for pred in (pred_u8 / 255.0, (pred_u8 / 255.0).astype(np.float32)):
        s = score_saliency(pred, gt)
        np.testing.assert_array_equal(s.precision, ref.precision)
        np.testing.assert_array_equal(s.recall, ref.recall)
        assert s.mae == pytest.approx(ref.mae, abs=1e-7)
        assert (s.acc, s.iou) == (ref.acc, ref.iou)
    # uint8 GT is binarised the same way
    s = score_saliency(pred_u8, gt.astype(np.uint8) * 255)
    np.testing.assert_array_equal(s.recall, ref.recall)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        score_saliency(np.zeros((2, 3)), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="shape"):
        score_saliency(np.zeros((2, 3)), np.zeros((2, 3), bool), binary=np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_saliency(np.full((2, 2), 1.5), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="non-finite"):
        score_saliency(np.full((2, 2), np.nan), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="2-D"):
        score_saliency(np.zeros((2, 2, 1)), np.zeros((2, 2, 1), bool))


# --------------------------------------------------------------------------- naive TokenCut reference
def tokencut_reference(preds, gts) -> float:
    """The TokenCut protocol written as a plain loop over thresholds (independent reference)."""
    fs = []
    for pred, gt in zip(preds, gts):
        row = []
        for k in range(255):
            binary = pred > k / 255
            area, tp, n_gt = binary.sum(), (binary & gt).sum(), gt.sum()
            p = tp / area if area else 1.0
            r = tp / n_gt if n_gt else 1.0
            row.append(f03(p, r))
        fs.append(row)
    return float(np.mean(fs, axis=0).max())


def test_tokencut_definition_matches_naive_loop():
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for i in range(6):
        h, w = rng.integers(5, 30, size=2)
        pred = rng.random((h, w)) ** rng.uniform(0.3, 3)  # skewed, continuous
        if i == 4:
            pred = np.round(pred * 255) / 255  # exactly on the thresholds
        gt = rng.random((h, w)) < rng.uniform(0.0, 0.7)
        preds.append(pred)
        gts.append(gt)
    gts[5][:] = False  # one empty GT
    scores = [score_saliency(p, g) for p, g in zip(preds, gts)]
    assert aggregate_saliency(scores)["max_fbeta"] == pytest.approx(
        tokencut_reference(preds, gts), abs=1e-12
    )


# --------------------------------------------------------------------------- pysodmetrics
def _pysod_results(preds_u8, gts_bool):
    psm = pytest.importorskip("py_sod_metrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure warns that it is deprecated
        fm, mae = psm.Fmeasure(), psm.MAE()
        for pred, gt in zip(preds_u8, gts_bool):
            fm.step(pred, gt.astype(np.uint8) * 255)
            mae.step(pred, gt.astype(np.uint8) * 255)
    return fm.get_results()["fm"]["curve"], mae.get_results()["mae"]


def test_pysod_definition_matches_pysodmetrics_on_random_maps():
    rng = np.random.default_rng(1)
    preds, gts = [], []
    for i in range(12):
        h, w = rng.integers(8, 40, size=2)
        lo, hi = sorted(rng.integers(0, 256, size=2))
        pred = rng.integers(lo, hi + 1, size=(h, w)).astype(np.uint8)  # narrow ranges too
        if i == 3:
            pred[:] = 77  # constant map
        gt = rng.random((h, w)) < rng.uniform(0.0, 0.8)
        if i == 5:
            gt[:] = False  # empty GT
        preds.append(pred)
        gts.append(gt)
    curve_ref, mae_ref = _pysod_results(preds, gts)
    scores = [score_saliency(p, g) for p, g in zip(preds, gts)]
    np.testing.assert_allclose(fbeta_curve(scores, definition="pysod"), curve_ref, atol=1e-12)
    agg = aggregate_saliency(scores, definition="pysod")
    assert agg["max_fbeta"] == pytest.approx(curve_ref.max(), abs=1e-12)
    assert agg["mae"] == pytest.approx(mae_ref, abs=1e-12)


# --------------------------------------------------------------------------- real SOD maps
@pytest.mark.parametrize(
    "method, tokencut_max_fbeta",
    [("Amulet", 0.7933), ("DSS", 0.8243), ("PiCANet", 0.8196)],  # REFERENCE.md §3
)
def test_real_sod_maps(method, tokencut_max_fbeta):
    map_dir = SOD_DIR / "maps" / method
    if not map_dir.is_dir():
        pytest.skip(f"{map_dir} not present")
    from PIL import Image

    preds, gts = [], []
    for path in sorted(map_dir.glob("*.png")):
        preds.append(np.array(Image.open(path).convert("L")))
        gts.append(binarize_gt(np.array(Image.open(SOD_DIR / "masks" / path.name))))
    curve_ref, mae_ref = _pysod_results(preds, gts)
    scores = [score_saliency(p, g) for p, g in zip(preds, gts)]
    pysod = aggregate_saliency(scores, definition="pysod")
    tokencut = aggregate_saliency(scores)
    assert abs(pysod["max_fbeta"] - curve_ref.max()) < 0.002
    assert abs(pysod["mae"] - mae_ref) < 0.002
    assert abs(tokencut["mae"] - mae_ref) < 0.002
    assert tokencut["max_fbeta"] == pytest.approx(tokencut_max_fbeta, abs=5e-4)


# --------------------------------------------------------------------------- discovery
def test_box_iou_by_hand():
    a = np.array([0, 0, 10, 10])
    b = np.array(
        [
            [5, 5, 15, 15],  # 25 / 175
            [0, 0, 10, 10],  # identical
            [10, 0, 20, 10],  # touching edge, half-open: no overlap
            [2, 2, 4, 4],  # inside: 4 / 100
            [3, 3, 3, 3],  # empty box inside: 0
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), [1 / 7, 1.0, 0.0, 0.04, 0.0])
    assert box_iou(a, np.array([0, 0, 5, 10])).shape == (1,)
    assert box_iou(np.zeros(4), np.zeros((1, 4)))[0] == 0.0  # empty union


def test_box_iou_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_iou(np.array([5, 0, 0, 5]), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        box_iou(np.zeros(4), np.zeros((2, 3)))


def test_corloc():
    pred = np.array([0, 0, 10, 10])
    assert corloc_hit(pred, np.array([[0, 0, 10, 20]]))  # IoU exactly 0.5 counts
    assert not corloc_hit(pred, np.array([[0, 0, 10, 21]]))  # 100 / 210
    assert corloc_hit(pred, np.array([[50, 50, 60, 60], [1, 1, 10, 10]]))  # any GT box
    assert not corloc_hit(pred, np.zeros((0, 4)))
    assert aggregate_corloc([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="no images"):
        aggregate_corloc([])
