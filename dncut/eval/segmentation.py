"""Unsupervised semantic segmentation from frozen dense features (paper Table 3; Leopart's protocol,
REFERENCE §7, facts read from the peers' public code; dncut's own implementation).

    tokens (N, C) of every evaluation image -> StandardScaler -> PCA (PCA_DIMS)
      -> k-means with K clusters (KMEANS_ITERS iterations, KMEANS_RESTARTS restarts; fitted on the
         evaluation tokens themselves: transductive)
      -> cluster maps and ground truth at SCORE_SIZE x SCORE_SIZE (nearest), label IGNORE left out
      -> K = number of classes: Hungarian matching on 1 - IoU (scipy linear_sum_assignment);
         K > classes (overclustering): each cluster to the class it overlaps most (majority vote)
      -> mIoU from TP / FP / FN accumulated over the dataset, averaged over the classes

Bounded memory (issue 26): the evaluation job (``dncut.eval.jobs.run_segmentation``) fits the
scaler, PCA and k-means on a ``TokenSample``: every token while the set has at most
``SAMPLE_TOKENS`` (the protocol above exactly: the fit sees all tokens, in image-id order), else a
deterministic uniform sample of ``SAMPLE_TOKENS`` of them (each token's priority is a hash of its
image id and index; the lowest priorities are kept, whatever order the images arrive in). The
fitted ``Clustering`` then labels every token of every image in the workers
(``Clustering.predict``), so the clustering stays transductive over the whole set; only the fit is
on a sample when the set is larger than the cap (VOC val at 28 x 28 tokens: 1,449 x 784 = 1.14 M
tokens, about 2.3 x the cap), which changes the centroids by the sampling noise of a 500 k-token
sample (figures: docs/operations.md, "Evaluation driver memory").

Shapes::

    cluster_tokens(tokens (N, C), k, seed) -> (N,) int cluster ids
    fit_clustering(tokens (N, C), k, seed) -> Clustering; Clustering.predict(tokens (M, C)) -> (M,) ids
    TokenSample(cap).add(image_id, tokens (n, C)); .tokens() -> (min(total, cap), C)
    confusion(clusters (M,), labels (M,), k, classes) -> (k, classes) int64 pixel counts
    assign(conf (k, classes), how) -> (k,) class of each cluster
    miou(conf, assignment) -> (mIoU, per-class IoU (classes,))

The ground truth (``VOC_CLASSES``, ``IGNORE``, ``rasterise_coco``: an image's COCO objects as a
21-class VOC map) is read in ``dncut.data.class_maps``; they are re-exported here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dncut.data.class_maps import IGNORE, VOC_CLASSES, rasterise_coco

__all__ = ["IGNORE", "KMEANS_ITERS", "KMEANS_RESTARTS", "PCA_DIMS", "SAMPLE_TOKENS", "SCORE_SIZE", "VOC_CLASSES",
           "Clustering", "TokenSample", "assign", "cluster_tokens", "confusion", "fit_clustering", "miou",
           "rasterise_coco"]

PCA_DIMS = 50
KMEANS_ITERS = 100
KMEANS_RESTARTS = 5
SCORE_SIZE = 100  # px: maps and ground truth are compared at 100 x 100 (nearest)
SAMPLE_TOKENS = 500_000  # tokens the k-means fit sees at most (float32 x 384 channels: 0.7 GiB on the driver)


def cluster_tokens(tokens: np.ndarray, k: int, seed: int = 0, pca_dims: int = PCA_DIMS) -> np.ndarray:
    """StandardScaler -> PCA -> k-means over all tokens of the evaluation set.

    Args:
        tokens: ``(N, C)`` dense features (every patch of every image).
        k: number of clusters.
        seed: k-means seed (the protocol averages 5 seeds).
        pca_dims: PCA components (capped at ``min(N, C)``).

    Returns:
        ``(N,)`` int cluster ids in ``[0, k)``.

    Raises:
        ValueError: fewer tokens than clusters.
    """
    return fit_clustering(tokens, k, seed, pca_dims).labels


@dataclass
class Clustering:
    """A fitted StandardScaler -> PCA -> k-means (picklable: sent to the workers).

    Attributes:
        scaler, pca, kmeans: the fitted scikit-learn steps.
        labels: ``(N,)`` cluster ids of the tokens it was fitted on.
    """

    scaler: Any
    pca: Any
    kmeans: Any
    labels: np.ndarray

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens (M, C)`` -> ``(M,)`` int cluster ids (the nearest centroid after scaling and PCA)."""
        x = self.pca.transform(self.scaler.transform(np.asarray(tokens, np.float64)))
        return self.kmeans.predict(x)


def fit_clustering(tokens: np.ndarray, k: int, seed: int = 0, pca_dims: int = PCA_DIMS) -> Clustering:
    """Fit StandardScaler -> PCA -> k-means on ``tokens (N, C)`` (arguments and errors as ``cluster_tokens``)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    tokens = np.asarray(tokens, np.float64)
    if tokens.ndim != 2 or len(tokens) < k:
        raise ValueError(f"need (N, C) tokens with N >= k={k}, got {tokens.shape}")
    scaler = StandardScaler().fit(tokens)
    x = scaler.transform(tokens)
    pca = PCA(n_components=min(pca_dims, *x.shape), random_state=seed)
    x = pca.fit_transform(x)
    kmeans = KMeans(k, n_init=KMEANS_RESTARTS, max_iter=KMEANS_ITERS, random_state=seed)
    labels = kmeans.fit_predict(x)
    return Clustering(scaler, pca, kmeans, labels)


class TokenSample:
    """A bounded, deterministic sample of the tokens of a set of images (bottom-k by priority).

    Every token gets the priority ``uniform(0, 1)`` drawn from a generator seeded with the CRC-32 of
    its image id (token ``j`` of an image: the ``j``-th draw); the ``cap`` lowest priorities are kept,
    so the sample does not depend on the order the images arrive in. ``tokens()`` returns the kept
    tokens in (image id, token index) order: all of them, in the order of a sorted concatenation,
    while ``total <= cap``. Memory: at most ``2 * cap`` tokens between trims.

    Args:
        cap: tokens kept at most (``SAMPLE_TOKENS``).
    """

    def __init__(self, cap: int = SAMPLE_TOKENS) -> None:
        self.cap = int(cap)
        self.total = 0
        self._parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # (id, index, priority, tokens)
        self._held = 0

    def add(self, image_id: str, tokens: np.ndarray) -> None:
        """Offer one image's ``tokens (n, C)``."""
        tokens = np.asarray(tokens)
        n = len(tokens)
        self.total += n
        priority = np.random.default_rng(zlib.crc32(str(image_id).encode())).random(n)
        self._parts.append((str(image_id), np.arange(n), priority, tokens))
        self._held += n
        if self._held > 2 * self.cap:
            self._trim()

    def _trim(self) -> None:
        if self._held <= self.cap:
            return
        cut = np.partition(np.concatenate([p for _, _, p, _ in self._parts]), self.cap - 1)[self.cap - 1]
        parts = []
        for image_id, index, priority, tokens in self._parts:
            keep = priority <= cut
            if keep.any():
                parts.append((image_id, index[keep], priority[keep], tokens[keep]))
        self._parts = parts
        self._held = sum(len(i) for _, i, _, _ in parts)

    def tokens(self) -> np.ndarray:
        """``(min(total, cap), C)`` float32 tokens, in (image id, token index) order."""
        self._trim()
        parts = sorted(self._parts, key=lambda p: p[0])
        return np.concatenate([t for _, _, _, t in parts]).astype(np.float32, copy=False)


def confusion(clusters: np.ndarray, labels: np.ndarray, k: int, classes: int) -> np.ndarray:
    """``(k, classes)`` pixel counts of cluster x ground-truth class; ``IGNORE`` pixels left out.

    Raises:
        ValueError: shapes differ, or a label outside ``[0, classes)`` other than ``IGNORE``.
    """
    clusters, labels = np.asarray(clusters).ravel(), np.asarray(labels).ravel()
    if clusters.shape != labels.shape:
        raise ValueError(f"clusters {clusters.shape} and labels {labels.shape} differ")
    keep = labels != IGNORE
    bad = np.unique(labels[keep][(labels[keep] < 0) | (labels[keep] >= classes)])
    if len(bad):
        raise ValueError(f"labels {bad.tolist()} outside [0, {classes}) and not {IGNORE}")
    return np.bincount(clusters[keep] * classes + labels[keep], minlength=k * classes).reshape(k, classes)


def assign(conf: np.ndarray, how: Literal["hungarian", "majority"]) -> np.ndarray:
    """The class of each cluster: Hungarian matching on 1 - IoU (one cluster per class; K must
    equal the number of classes) or majority vote (overclustering).

    Returns:
        ``(k,)`` class ids (``-1``: a cluster left unmatched).
    """
    from scipy.optimize import linear_sum_assignment

    k, classes = conf.shape
    if how == "majority":
        return conf.argmax(axis=1)
    if k != classes:
        raise ValueError(f"Hungarian matching needs K = classes, got K={k}, classes={classes}")
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
    iou = conf / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(1.0 - iou)
    out = np.full(k, -1, np.int64)
    out[rows] = cols
    return out


def miou(conf: np.ndarray, assignment: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU over the classes from dataset-level TP / FP / FN of the assigned clusters.

    Args:
        conf: ``(k, classes)`` from :func:`confusion`, summed over the dataset.
        assignment: ``(k,)`` from :func:`assign`.

    Returns:
        ``(mean IoU, per-class IoU (classes,))``; a class absent from both prediction and ground
        truth has IoU NaN and is left out of the mean.
    """
    classes = conf.shape[1]
    pred = np.zeros((classes, classes), np.int64)  # predicted class x true class
    for cluster, cls in enumerate(assignment):
        if cls >= 0:
            pred[cls] += conf[cluster]
    tp = np.diag(pred).astype(np.float64)
    fp, fn = pred.sum(1) - tp, pred.sum(0) - tp
    denom = tp + fp + fn
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return float(np.nanmean(iou)), iou
