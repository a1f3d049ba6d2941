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


def most_clusters(keys: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MOST on one image's patch grid, before the pixel-size rules.

    Args:
        keys: ``(n, C)`` patch features, ``n = h * w`` (not normalised: A = K K^T).
        h, w: the patch grid.

    Returns:
        ``(boxes (k, 4) in patch units (x0, y0, x1, y1), cluster sizes (k,), seeds (h, w) bool)``,
        largest cluster first.

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
        return np.zeros((0, 4)), np.zeros(0, np.int64), seeds
    labels = DBSCAN(eps=DBSCAN_EPS, min_samples=1, metric="manhattan").fit_predict(np.stack([rows, cols], 1))
    found = []
    for label in np.unique(labels):
        members = rows[labels == label] * w + cols[labels == label]  # token indices
        box = _cluster_box(a, members, h, w)
        if box is not None:
            found.append((len(members), box))
    found.sort(key=lambda t: -t[0])
    return (np.array([b for _, b in found], np.float64).reshape(-1, 4), np.array([n for n, _ in found], np.int64),
            seeds)


def pixel_boxes(grid_boxes: np.ndarray, patch: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Patch-unit boxes ``(k, 4)`` -> pixel boxes ``(k', 4)``, clipped to the image, keeping those
    wider and taller than ``MIN_SIDE`` with ``MIN_AREA < area < MAX_AREA_FRACTION`` of the image."""
    height, width = image_hw
    out = []
    for x0, y0, x1, y1 in np.asarray(grid_boxes, np.float64).reshape(-1, 4) * patch:
        x1, y1 = min(x1, width), min(y1, height)
        bw, bh = x1 - x0, y1 - y0
        if bw > MIN_SIDE and bh > MIN_SIDE and MIN_AREA < bw * bh < MAX_AREA_FRACTION * width * height:
            out.append((x0, y0, x1, y1))
    return np.array(out, np.float64).reshape(-1, 4)


def most_boxes(keys: np.ndarray, h: int, w: int, patch: int, image_hw: tuple[int, int]) -> MostResult:
    """MOST on one image: :func:`most_clusters` then :func:`pixel_boxes` (``patch`` = the backbone
    stride in px, ``image_hw`` = ``(H, W)``)."""
    grid, sizes, seeds = most_clusters(keys, h, w)
    kept = [i for i, b in enumerate(grid) if len(pixel_boxes(b[None], patch, image_hw))]
    return MostResult(pixel_boxes(grid[kept], patch, image_hw), sizes[kept], seeds)


def _cluster_box(a: np.ndarray, members: np.ndarray, h: int, w: int) -> tuple[float, float, float, float] | None:
    """The patch-unit box of the 4-connected component, holding the cluster's seed, of the
    summed affinity rows of the members similar to the seed."""
    seed = members[np.argmin((a[members] > 0).sum(axis=1))]
    similar = members[a[seed, members] > 0]
    summed = a[similar].sum(axis=0).reshape(h, w) > 0  # (h, w)
    if not summed.flat[seed]:
        return None
    components, _ = ndimage.label(summed)  # 4-connected
    ys, xs = np.nonzero(components == components.flat[seed])
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def corloc_any(boxes: np.ndarray, gt_boxes: np.ndarray) -> bool:
    """The peers' MOST CorLoc for one image: any predicted box with IoU >= 0.5 to any GT box."""
    from dncut.eval.metrics import corloc_hit

    return any(corloc_hit(np.asarray(b, np.float64), gt_boxes) for b in boxes)
