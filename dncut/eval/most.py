"""MOST: training-free multi-object discovery from patch features (REFERENCE §7, facts read from
the peers' public code; this is dncut's own implementation).

    keys (n, C) on an (h, w) patch grid -> A = K K^T (raw dot products)
      -> per token i: the map max(A[i], 0) on the grid, average-pooled k x k (stride 1) for
         k in POOL_SIZES (capped at min(h, w)); entropy (bits) of the histogram of its distinct
         values; token i is a foreground seed when entropy < 1 + log2(h - k + 1) for at least
         half of the pool sizes
      -> DBSCAN of the seeds' (row, col) positions (eps 2, Manhattan, min_samples 1)
      -> per cluster: seed = the member with the fewest positive entries in its row of A; the
         members m with A[seed, m] > 0; the sum of their rows; the 4-connected component of
         sum > 0 holding the seed -> box ((min, max + 1) x patch, clipped to the image)
      -> boxes wider and taller than MIN_SIDE px with MIN_AREA < area < MAX_AREA_FRACTION x image

CorLoc of MOST as the peers report it: an image is correct when ANY of its boxes has IoU >= 0.5
with a ground-truth box (``corloc_any``); the single-box variant keeps the box of the largest
cluster (``single_box``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

POOL_SIZES = (1, 2, 3, 4, 5)
DBSCAN_EPS = 2  # grid cells, Manhattan distance
MIN_SIDE = 16  # px: a kept box is wider and taller than this
MIN_AREA = 256  # px^2
MAX_AREA_FRACTION = 0.9  # of the image area


@dataclass(frozen=True)
class MostResult:
    """Boxes ``(k, 4)`` in pixels ``(x0, y0, x1, y1)`` with their clusters' sizes ``(k,)``
    (largest first), and the foreground seeds ``(h, w)`` bool."""

    boxes: np.ndarray
    cluster_sizes: np.ndarray
    seeds: np.ndarray

    def single_box(self) -> np.ndarray | None:
        """The largest cluster's box ``(4,)``, or ``None`` when no box survived."""
        return self.boxes[0] if len(self.boxes) else None


def token_entropy_seeds(affinity: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool: the tokens whose positive affinity map has low entropy (module docstring).

    Args:
        affinity: ``(n, n)`` raw dot products, ``n = h * w``.
    """
    import torch
    import torch.nn.functional as F

    maps = torch.from_numpy(np.maximum(affinity, 0.0).reshape(-1, 1, h, w))  # (n, 1, h, w)
    sizes = sorted({min(k, h, w) for k in POOL_SIZES})
    votes = np.zeros(h * w, np.int64)
    for k in sizes:
        pooled = F.avg_pool2d(maps, k, stride=1)[:, 0].numpy()  # (n, h-k+1, w-k+1): every k x k window
        threshold = 1.0 + math.log2(h - k + 1)
        votes += np.array([_entropy_bits(p) < threshold for p in pooled], dtype=np.int64)
    return (votes >= len(sizes) / 2.0).reshape(h, w)


def _entropy_bits(values: np.ndarray) -> float:
    """Entropy (bits) of the histogram of distinct values (rounded to 6 decimals, float noise)."""
    _, counts = np.unique(np.round(values, 6), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def most_boxes(keys: np.ndarray, h: int, w: int, patch: int, image_hw: tuple[int, int]) -> MostResult:
    """MOST on one image.

    Args:
        keys: ``(n, C)`` patch features, ``n = h * w`` (not normalised: A = K K^T).
        h, w: the patch grid.
        patch: pixels per patch (the backbone stride).
        image_hw: ``(H, W)`` of the image, for clipping and the area rule.

    Returns:
        ``MostResult`` (boxes of the largest clusters first).

    Raises:
        ValueError: ``keys`` is not ``(h * w, C)``.
    """
    from sklearn.cluster import DBSCAN

    keys = np.asarray(keys, np.float64)
    if keys.ndim != 2 or keys.shape[0] != h * w:
        raise ValueError(f"keys must be ({h * w}, C) for a {h}x{w} grid, got {keys.shape}")
    a = keys @ keys.T  # (n, n)
    seeds = token_entropy_seeds(a, h, w)
    rows, cols = np.nonzero(seeds)
    if not len(rows):
        return MostResult(np.zeros((0, 4)), np.zeros(0, np.int64), seeds)
    labels = DBSCAN(eps=DBSCAN_EPS, min_samples=1, metric="manhattan").fit_predict(np.stack([rows, cols], 1))
    found = []
    for label in np.unique(labels):
        members = rows[labels == label] * w + cols[labels == label]  # token indices
        box = _cluster_box(a, members, h, w, patch, image_hw)
        if box is not None:
            found.append((len(members), box))
    found.sort(key=lambda t: -t[0])
    boxes = np.array([b for _, b in found], np.float64).reshape(-1, 4)
    return MostResult(boxes, np.array([s for s, _ in found], np.int64), seeds)


def _cluster_box(a: np.ndarray, members: np.ndarray, h: int, w: int, patch: int,
                 image_hw: tuple[int, int]) -> tuple[float, float, float, float] | None:
    seed = members[np.argmin((a[members] > 0).sum(axis=1))]
    similar = members[a[seed, members] > 0]
    summed = a[similar].sum(axis=0).reshape(h, w) > 0  # (h, w)
    components, _ = ndimage.label(summed)  # 4-connected
    own = components == components.flat[seed]
    if not summed.flat[seed]:
        return None
    ys, xs = np.nonzero(own)
    height, width = image_hw
    x0, y0 = xs.min() * patch, ys.min() * patch
    x1, y1 = min((xs.max() + 1) * patch, width), min((ys.max() + 1) * patch, height)
    bw, bh = x1 - x0, y1 - y0
    if bw <= MIN_SIDE or bh <= MIN_SIDE or not MIN_AREA < bw * bh < MAX_AREA_FRACTION * width * height:
        return None
    return float(x0), float(y0), float(x1), float(y1)


def corloc_any(boxes: np.ndarray, gt_boxes: np.ndarray) -> bool:
    """The peers' MOST CorLoc for one image: any predicted box with IoU >= 0.5 to any GT box."""
    from dncut.eval.metrics import corloc_hit

    return any(corloc_hit(np.asarray(b, np.float64), gt_boxes) for b in boxes)
