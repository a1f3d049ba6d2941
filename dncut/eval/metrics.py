"""Saliency and object-discovery metrics (pure numpy).

Saliency, per image: ``pred: (H, W) float in [0, 1] (or uint8 0..255)`` and
``gt: (H, W) bool -> ImageScores`` (accuracy, IoU, MAE, per-image max F-beta and the
precision / recall curves at the 255 TokenCut thresholds). Per dataset:
``aggregate_saliency(scores: Sequence[ImageScores]) -> dict`` with ``acc``, ``iou``,
``mae`` and ``max_fbeta``.

Two definitions of the dataset-level maxFβ (β² = 0.3) are offered:

``definition="tokencut"`` (default; the TokenCut / unsupervised-saliency protocol):
    thresholds t_k = k / 255, k = 0..254 (255 thresholds, threshold 0 included); a pixel is
    predicted foreground at t_k when ``pred > t_k`` (strict), on the map *as given* (no
    per-image normalisation); precision = 1 where nothing is predicted, recall = 1 where the
    GT is empty, Fβ = 0 where precision = recall = 0; the per-image Fβ curves are averaged
    over images at each threshold and the maximum of that mean curve is reported.
    For a uint8 map u, ``u / 255 > k / 255`` is ``u > k``, i.e. the levels 1..255.

``definition="pysod"`` (reproduces ``py_sod_metrics.Fmeasure`` / ``FmeasureV2``):
    each map is min-max normalised to [0, 1] (unless constant), quantised with
    ``floor(255 * pred)`` to levels 0..255, and thresholded with ``>=`` at all 256 levels
    (level 0 predicts everything); precision = 0 where nothing is predicted, recall = 0
    where the GT is empty; the per-image Fβ curves are averaged over images and maximised.
    Its MAE is also taken on the min-max normalised map, as pysodmetrics does.

The two agree on maps that already span 0..255 (up to the extra all-foreground point at
level 0, which never wins, and the empty-prediction / empty-GT conventions); they differ
for maps whose range is narrower (e.g. PiCANet's on SOD), because min-max stretching moves
every threshold. Note also that our GT binarisation (``binarize_gt``: > 0.5 after scaling,
i.e. uint8 >= 128) differs from pysodmetrics' ``gt > 128`` at the single value 128.

Discovery (CorLoc): boxes are ``(x0, y0, x1, y1)`` in pixels, half-open (the box covers
columns x0 .. x1 - 1 and rows y0 .. y1 - 1, area = (x1 - x0) * (y1 - y0)): a TokenCut box
of patches i0..i1 (inclusive) is ``(i0 * P, j0 * P, (i1 + 1) * P, (j1 + 1) * P)``, and a VOC
box (1-based inclusive) becomes ``(xmin - 1, ymin - 1, xmax, ymax)``.
``box_iou(a: (4,), b: (K, 4)) -> (K,)``, ``corloc_hit(pred_box, gt_boxes) -> bool``,
``aggregate_corloc(hits) -> float``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

BETA_SQ = 0.3  # β² of the saliency F-measure (all peers)
N_THRESHOLDS = 255  # TokenCut thresholds k / 255, k = 0..254
N_LEVELS = 256  # pysodmetrics: uint8 levels 0..255, thresholded with >=

Definition = Literal["tokencut", "pysod"]
_DEFINITIONS = ("tokencut", "pysod")


# --------------------------------------------------------------------------- input scaling
def _to_unit_float(array: np.ndarray, name: str) -> np.ndarray:
    """Scale a bool / unsigned-int / float array to float values in [0, 1].

    bool -> {0, 1}; uint8 -> /255; uint16 -> /65535; float -> as is (must lie in [0, 1]).
    Float arrays keep their precision (float32 stays float32) so that thresholds can be
    compared in the array's own dtype.
    """
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float64) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains non-finite values")
        lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float {name} must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                "pass uint8 for 0..255 maps"
            )
        return array
    raise ValueError(
        f"{name} has unsupported dtype {array.dtype}; use bool, uint8, uint16 or float"
    )


def _check_2d(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")


def binarize_gt(mask: np.ndarray) -> np.ndarray:
    """Binarise a ground-truth mask: scale to [0, 1] by its dtype, then ``> 0.5``.

    Args:
        mask: (H, W) bool, uint8 (0..255), uint16 (0..65535) or float in [0, 1].

    Returns:
        (H, W) bool foreground mask (uint8 >= 128 is foreground).
    """
    mask = np.asarray(mask)
    _check_2d(mask, "mask")
    if mask.dtype == np.bool_:
        return mask.copy()
    return _to_unit_float(mask, "mask") > 0.5


# --------------------------------------------------------------------------- F-beta helpers
def _fbeta(precision: np.ndarray, recall: np.ndarray, beta_sq: float) -> np.ndarray:
    """Fβ = (1 + β²) P R / (β² P + R), 0 where P = R = 0. Shapes broadcast."""
    num = (1.0 + beta_sq) * precision * recall
    den = beta_sq * precision + recall
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def _tokencut_levels(pred: np.ndarray) -> np.ndarray:
    """Number of TokenCut thresholds each pixel exceeds: L = #{k : pred > k / 255}, in 0..255.

    A pixel is foreground at threshold k iff L > k. Thresholds are compared in pred's dtype,
    so a map made as ``u / 255`` (float32 or float64) gets exactly L = u.
    """
    thresholds = (np.arange(N_THRESHOLDS, dtype=np.float64) / 255.0).astype(pred.dtype)
    return np.searchsorted(thresholds, pred.ravel(), side="left")  # (H*W,)


def _tokencut_pr(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall, each (255,), at thresholds k / 255 with ``pred > t``."""
    levels = _tokencut_levels(pred)  # (H*W,)
    gt_flat = gt.ravel()  # (H*W,)
    fg_hist = np.bincount(levels[gt_flat], minlength=N_LEVELS)  # (256,)
    all_hist = np.bincount(levels, minlength=N_LEVELS)  # (256,)
    # count with L > k for k = 0..254: reverse cumulative sum over levels k+1..255
    tp = np.cumsum(fg_hist[::-1])[::-1][1:].astype(np.float64)  # (255,)
    predicted = np.cumsum(all_hist[::-1])[::-1][1:].astype(np.float64)  # (255,)
    n_gt = float(gt_flat.sum())
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    recall = tp / n_gt if n_gt > 0 else np.ones_like(tp)
    return precision, recall


def _pysod_normalise(pred: np.ndarray) -> np.ndarray:
    """pysodmetrics' ``prepare_data``: min-max normalise unless the map is constant."""
    pred = pred.astype(np.float64)
    lo, hi = pred.min(), pred.max()
    if hi != lo:
        pred = (pred - lo) / (hi - lo)
    return pred


def _pysod_fbeta_curve(pred_norm: np.ndarray, gt: np.ndarray, beta_sq: float) -> np.ndarray:
    """Per-image Fβ curve (256,) of pysodmetrics, index j = threshold ``>= 255 - j``."""
    levels = (pred_norm * 255).astype(np.uint8).ravel()  # (H*W,) floor, as pysodmetrics
    gt_flat = gt.ravel()  # (H*W,)
    fg_hist = np.bincount(levels[gt_flat], minlength=N_LEVELS)  # (256,)
    bg_hist = np.bincount(levels[~gt_flat], minlength=N_LEVELS)  # (256,)
    tp = np.cumsum(fg_hist[::-1]).astype(np.float64)  # (256,) >= 255, >= 254, ..., >= 0
    predicted = tp + np.cumsum(bg_hist[::-1])  # (256,)
    precision = tp / np.maximum(predicted, 1.0)  # 0 where nothing is predicted
    recall = tp / max(float(gt_flat.sum()), 1.0)  # 0 where GT is empty
    return _fbeta(precision, recall, beta_sq)


# --------------------------------------------------------------------------- per image
@dataclass(frozen=True)
class ImageScores:
    """Saliency scores of one image.

    Attributes:
        acc: pixel accuracy of the binary mask.
        iou: IoU of the binary mask with the GT (1.0 when both are empty).
        mae: mean |pred - gt| on the map as given.
        max_fbeta: per-image max over the 255 TokenCut thresholds of Fβ (for per-row reports;
            the dataset maxFβ is NOT the mean of this, see ``aggregate_saliency``).
        precision: (255,) TokenCut precision at t_k = k / 255 (1 where nothing is predicted).
        recall: (255,) TokenCut recall at t_k (1 where the GT is empty).
        pysod_fbeta: (256,) pysodmetrics per-image Fβ curve (index j: level >= 255 - j).
        pysod_mae: MAE on the min-max normalised map (pysodmetrics' MAE).
    """

    acc: float
    iou: float
    mae: float
    max_fbeta: float
    precision: np.ndarray
    recall: np.ndarray
    pysod_fbeta: np.ndarray
    pysod_mae: float

    def row(self) -> dict[str, float]:
        """Scalar scores for a per-image table: acc, iou, mae, max_fbeta."""
        return {"acc": self.acc, "iou": self.iou, "mae": self.mae, "max_fbeta": self.max_fbeta}


def _binary_scores(binary: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(accuracy, IoU) of a bool mask against a bool GT; IoU = 1 when both are empty."""
    acc = float(np.mean(binary == gt))
    union = int(np.count_nonzero(binary | gt))
    iou = 1.0 if union == 0 else np.count_nonzero(binary & gt) / union
    return acc, float(iou)


def score_saliency(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    binary: np.ndarray | None = None,
    ignore: np.ndarray | None = None,
    beta_sq: float = BETA_SQ,
) -> ImageScores:
    """Score one saliency map against its ground truth.

    Args:
        pred: (H, W) soft map, float in [0, 1], or uint8 0..255 (divided by 255), or bool.
        gt: (H, W) GT mask; bool, or any dtype ``binarize_gt`` accepts.
        binary: optional (H, W) bool mask scored for acc / IoU instead of ``pred > 0.5``
            (e.g. a post-processed mask whose soft map is ``pred``).
        ignore: optional (H, W) bool, True where the GT is void (``dncut.data.images.read_mask``):
            those pixels are left out of every score, as if absent from the image (pysod's
            min-max normalisation included).
        beta_sq: β² of the F-measure.

    Returns:
        ImageScores with acc, iou, mae, max_fbeta and the precision / recall curves.

    Raises:
        ValueError: on shape mismatch, non-2-D input, values out of range, or every pixel ignored.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_2d(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    gt = binarize_gt(gt)
    pred = _to_unit_float(pred, "pred")
    if binary is None:
        binary = pred > 0.5
    else:
        binary = np.asarray(binary)
        if binary.shape != gt.shape:
            raise ValueError(f"binary shape {binary.shape} != gt shape {gt.shape}")
        binary = binary.astype(bool)
    if ignore is not None:
        ignore = np.asarray(ignore, bool)
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore shape {ignore.shape} != gt shape {gt.shape}")
        if ignore.all():
            raise ValueError("every pixel of the ground truth is ignored: nothing to score")
        keep = ~ignore
        pred, gt, binary = pred[keep], gt[keep], binary[keep]  # (n_kept,) each

    acc, iou = _binary_scores(binary, gt)
    pred64 = pred.astype(np.float64)
    mae = float(np.mean(np.abs(pred64 - gt)))
    precision, recall = _tokencut_pr(pred, gt)
    pred_norm = _pysod_normalise(pred64)
    return ImageScores(
        acc=acc,
        iou=iou,
        mae=mae,
        max_fbeta=float(_fbeta(precision, recall, beta_sq).max()),
        precision=precision,
        recall=recall,
        pysod_fbeta=_pysod_fbeta_curve(pred_norm, gt, beta_sq),
        pysod_mae=float(np.mean(np.abs(pred_norm - gt))),
    )


# --------------------------------------------------------------------------- per dataset
def fbeta_curve(
    scores: Sequence[ImageScores],
    *,
    definition: Definition = "tokencut",
    beta_sq: float = BETA_SQ,
) -> np.ndarray:
    """Dataset Fβ curve: per-image Fβ curves averaged over images at each threshold.

    Args:
        scores: per-image scores from ``score_saliency``.
        definition: "tokencut" -> (255,) over t_k = k / 255, k = 0..254;
            "pysod" -> (256,) over levels >= 255, 254, ..., 0 (pysodmetrics' order).
        beta_sq: β² used for the "tokencut" curve ("pysod" curves are stored with the β² given
            to ``score_saliency``).

    Returns:
        The mean Fβ curve.
    """
    _check_definition(definition)
    if len(scores) == 0:
        raise ValueError("no images to aggregate")
    if definition == "pysod":
        return np.mean(np.stack([s.pysod_fbeta for s in scores]), axis=0)  # (256,)
    precision = np.stack([s.precision for s in scores])  # (N, 255)
    recall = np.stack([s.recall for s in scores])  # (N, 255)
    return _fbeta(precision, recall, beta_sq).mean(axis=0)  # (255,)


def aggregate_saliency(
    scores: Sequence[ImageScores],
    *,
    definition: Definition = "tokencut",
    beta_sq: float = BETA_SQ,
) -> dict[str, float]:
    """Dataset-level saliency scores.

    ``acc`` and ``iou`` are means over images (TokenCut); ``max_fbeta`` is the maximum over
    thresholds of the image-averaged Fβ curve (see the module docstring for the two
    definitions); ``mae`` is the mean over images, of the map as given ("tokencut") or of the
    min-max normalised map ("pysod", as pysodmetrics).

    Args:
        scores: per-image scores from ``score_saliency``.
        definition: "tokencut" or "pysod".
        beta_sq: β² for the "tokencut" F-measure.

    Returns:
        {"acc", "iou", "mae", "max_fbeta", "n_images"}.
    """
    curve = fbeta_curve(scores, definition=definition, beta_sq=beta_sq)
    mae_attr = "pysod_mae" if definition == "pysod" else "mae"
    return {
        "acc": float(np.mean([s.acc for s in scores])),
        "iou": float(np.mean([s.iou for s in scores])),
        "mae": float(np.mean([getattr(s, mae_attr) for s in scores])),
        "max_fbeta": float(curve.max()),
        "n_images": float(len(scores)),
    }


def _check_definition(definition: str) -> None:
    if definition not in _DEFINITIONS:
        raise ValueError(f"unknown definition {definition!r}; choose one of {_DEFINITIONS}")


# --------------------------------------------------------------------------- discovery
def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim == 1:
        boxes = boxes[None, :]  # (1, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (4,) or (K, 4), got {boxes.shape}")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(f"{name} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box with K boxes; half-open pixel boxes (x0, y0, x1, y1).

    Args:
        a: (4,) box.
        b: (K, 4) boxes (a single (4,) box is accepted as K = 1).

    Returns:
        (K,) IoU values in [0, 1] (0 where the union is empty).
    """
    a = _as_boxes(a, "a")
    if a.shape[0] != 1:
        raise ValueError(f"a must be a single box of shape (4,), got {a.shape}")
    b = _as_boxes(b, "b")
    ix = np.clip(np.minimum(a[0, 2], b[:, 2]) - np.maximum(a[0, 0], b[:, 0]), 0, None)  # (K,)
    iy = np.clip(np.minimum(a[0, 3], b[:, 3]) - np.maximum(a[0, 1], b[:, 1]), 0, None)  # (K,)
    inter = ix * iy
    area_a = (a[0, 2] - a[0, 0]) * (a[0, 3] - a[0, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (K,)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def corloc_hit(pred_box: np.ndarray, gt_boxes: np.ndarray, *, threshold: float = 0.5) -> bool:
    """Whether a predicted box localises an object: IoU >= threshold with any GT box.

    Args:
        pred_box: (4,) predicted box (x0, y0, x1, y1), half-open pixels.
        gt_boxes: (K, 4) ground-truth boxes; K = 0 gives False.
        threshold: IoU threshold (0.5 for CorLoc).

    Returns:
        True if the prediction is correct.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    if gt_boxes.size == 0:
        return False
    return bool(np.any(box_iou(pred_box, gt_boxes) >= threshold))


def aggregate_corloc(hits: Sequence[bool]) -> float:
    """CorLoc: the fraction of images whose predicted box is correct.

    Args:
        hits: one bool per image (from ``corloc_hit``).

    Returns:
        CorLoc in [0, 1].
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.size == 0:
        raise ValueError("no images to aggregate")
    return float(hits.mean())
