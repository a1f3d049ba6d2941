"""Unsupervised semantic segmentation protocol (dncut.eval.segmentation) on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest

from dncut.eval.segmentation import IGNORE, VOC_CLASSES, assign, cluster_tokens, confusion, miou, rasterise_coco


def test_miou_hand_computed():
    """2 clusters x 2 classes: cluster 0 = 6 px of class 0 + 2 of class 1; cluster 1 = 4 px of class 1."""
    clusters = np.array([0] * 6 + [0] * 2 + [1] * 4 + [1])
    labels = np.array([0] * 6 + [1] * 2 + [1] * 4 + [IGNORE])  # the ignored pixel counts nowhere
    conf = confusion(clusters, labels, 2, 2)
    assert conf.tolist() == [[6, 2], [0, 4]]
    mapping = assign(conf, "hungarian")
    assert mapping.tolist() == [0, 1]
    mean, per_class = miou(conf, mapping)
    # class 0: TP 6, FP 2 (cluster 0's class-1 pixels), FN 0 -> 6/8; class 1: TP 4, FP 0, FN 2 -> 4/6
    assert per_class == pytest.approx([6 / 8, 4 / 6]) and mean == pytest.approx((6 / 8 + 4 / 6) / 2)


def test_hungarian_undoes_a_permutation_and_majority_handles_overclustering():
    labels = np.repeat([0, 1, 2], 50)
    permuted = np.array([2, 0, 1])[labels]
    conf = confusion(permuted, labels, 3, 3)
    assert miou(conf, assign(conf, "hungarian"))[0] == 1.0
    over = labels * 2 + (np.arange(150) % 2)  # 6 clusters, two per class
    conf6 = confusion(over, labels, 6, 3)
    assert assign(conf6, "majority").tolist() == [0, 0, 1, 1, 2, 2] and miou(conf6, assign(conf6, "majority"))[0] == 1.0
    with pytest.raises(ValueError, match="K = classes"):
        assign(conf6, "hungarian")


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 8))
    truth = np.repeat([0, 1, 2], 40)
    tokens = centres[truth] + rng.normal(0, 0.5, (120, 8))
    ids = cluster_tokens(tokens, 3, seed=0)
    conf = confusion(ids, truth, 3, 3)
    assert miou(conf, assign(conf, "hungarian"))[0] == 1.0


def test_rasterise_coco_polygons_into_voc_classes():
    categories = {1: "person", 18: "dog", 44: "bottle", 70: "toaster"}
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    anns = [{"category_id": 1, "segmentation": [square], "iscrowd": 0, "bbox": [10, 10, 20, 20]},
            {"category_id": 70, "segmentation": [[40, 5, 50, 5, 50, 15, 40, 15]], "iscrowd": 0, "bbox": [40, 5, 10, 10]},
            {"category_id": 18, "segmentation": {"counts": "...", "size": [40, 60]}, "iscrowd": 1, "bbox": [0, 32, 8, 6]}]
    out = rasterise_coco(anns, categories, (60, 40))
    assert out.shape == (40, 60)
    assert out[20, 20] == VOC_CLASSES.index("person") == 15
    assert out[10, 45] == IGNORE  # a non-VOC category is not background
    assert out[35, 4] == IGNORE  # a crowd RLE region is left out
    assert out[2, 2] == 0 and set(np.unique(out)) == {0, 15, IGNORE}
