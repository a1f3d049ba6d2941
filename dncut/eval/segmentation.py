"""Unsupervised semantic segmentation from frozen dense features (paper Table 3; Leopart's protocol,
REFERENCE §7, facts read from the peers' public code; dncut's own implementation).

    tokens (N, C) of every evaluation image -> StandardScaler -> PCA (PCA_DIMS)
      -> k-means with K clusters (KMEANS_ITERS iterations, KMEANS_RESTARTS restarts; fitted on the
         evaluation tokens themselves: transductive)
      -> cluster maps and ground truth at SCORE_SIZE x SCORE_SIZE (nearest), label IGNORE left out
      -> K = number of classes: Hungarian matching on 1 - IoU (scipy linear_sum_assignment);
         K > classes (overclustering): each cluster to the class it overlaps most (majority vote)
      -> mIoU from TP / FP / FN accumulated over the dataset, averaged over the classes

Shapes::

    cluster_tokens(tokens (N, C), k, seed) -> (N,) int cluster ids
    confusion(clusters (M,), labels (M,), k, classes) -> (k, classes) int64 pixel counts
    assign(conf (k, classes), how) -> (k,) class of each cluster
    miou(conf, assignment) -> (mIoU, per-class IoU (classes,))

The ground truth (``VOC_CLASSES``, ``IGNORE``, ``rasterise_coco``: an image's COCO objects as a
21-class VOC map) is read in ``dncut.data.class_maps``; they are re-exported here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dncut.data.class_maps import IGNORE, VOC_CLASSES, rasterise_coco

__all__ = ["IGNORE", "KMEANS_ITERS", "KMEANS_RESTARTS", "PCA_DIMS", "SCORE_SIZE", "VOC_CLASSES", "assign", "cluster_tokens",
           "confusion", "miou", "rasterise_coco"]

PCA_DIMS = 50
KMEANS_ITERS = 100
KMEANS_RESTARTS = 5
SCORE_SIZE = 100  # px: maps and ground truth are compared at 100 x 100 (nearest)


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
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    tokens = np.asarray(tokens, np.float64)
    if tokens.ndim != 2 or len(tokens) < k:
        raise ValueError(f"need (N, C) tokens with N >= k={k}, got {tokens.shape}")
    x = StandardScaler().fit_transform(tokens)
    x = PCA(n_components=min(pca_dims, *x.shape), random_state=seed).fit_transform(x)
    return KMeans(k, n_init=KMEANS_RESTARTS, max_iter=KMEANS_ITERS, random_state=seed).fit_predict(x)


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
