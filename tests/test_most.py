"""MOST (dncut.eval.most) on features built by hand: two objects on a background."""

from __future__ import annotations

import numpy as np

from dncut.eval.most import corloc_any, most_boxes


def _two_objects(noise: float = 0.01, seed: int = 0):
    """A 12 x 12 grid (patch 16, 192 x 192 px): background token features ~[1, 0, 0], object 1
    (rows/cols 2-4) ~[-0.3, 1, 0], object 2 (rows/cols 7-9) ~[-0.3, 0, 1]."""
    rng = np.random.default_rng(seed)
    f = np.zeros((12, 12, 3))
    f[...] = (1.0, 0.0, 0.0)
    f[2:5, 2:5] = (-0.3, 1.0, 0.0)
    f[7:10, 7:10] = (-0.3, 0.0, 1.0)
    return (f + noise * rng.standard_normal(f.shape)).reshape(144, 3)


def test_two_objects_give_two_boxes_largest_first():
    result = most_boxes(_two_objects(), 12, 12, 16, (192, 192))
    expected_seeds = np.zeros((12, 12), bool)
    expected_seeds[2:5, 2:5] = expected_seeds[7:10, 7:10] = True
    np.testing.assert_array_equal(result.seeds, expected_seeds)  # the dense background rows are not seeds
    assert sorted(map(tuple, result.boxes.tolist())) == [(32.0, 32.0, 80.0, 80.0), (112.0, 112.0, 160.0, 160.0)]
    assert result.cluster_sizes.tolist() == [9, 9]
    gt = np.array([[110.0, 110.0, 162.0, 158.0]])
    assert corloc_any(result.boxes, gt)  # the peers' any-box CorLoc
    assert not corloc_any(result.boxes[:0], gt)


def test_box_rules_drop_tiny_and_whole_image_boxes():
    f = _two_objects()
    tiny = most_boxes(f, 12, 12, 4, (48, 48))  # 3 x 3 patches of 4 px: 12 px sides, not > 16
    assert len(tiny.boxes) == 0 and tiny.single_box() is None


def test_most_in_the_eval_job_stages_two_corloc_rows():
    """ncut_maps (the actors' stage) then score_row (stage 3): ``most`` = any box hits (the peers'),
    ``most-single`` = the largest cluster's box only."""
    import json

    import torch

    from dncut.eval.stages import score_row
    from dncut.eval.methods import ncut_maps

    feats = torch.from_numpy(_two_objects()).T.reshape(3, 12, 12).float()  # (C, h, w)
    (pred,) = ncut_maps([feats], ["most"], solver="eigh")
    assert sorted(map(tuple, pred["most_boxes"].tolist())) == [(2.0, 2.0, 5.0, 5.0), (7.0, 7.0, 10.0, 10.0)]
    row = {"image_id": "two", "status": "ok", "error": "", "image": np.zeros((192, 192, 3), np.uint8),
           "content": np.array([192, 192]), "stride": 16, "most_map": pred["most_map"], "most_mask": pred["most_mask"],
           "most_boxes": json.dumps(pred["most_boxes"].tolist())}
    second = [112.0, 112.0, 160.0, 160.0]  # only the second object is annotated
    first_is_largest = tuple(pred["most_boxes"][0]) == (2.0, 2.0, 5.0, 5.0)
    rows = {r["method"]: r for r in score_row({**row, "gt_boxes": json.dumps([second])}, methods=["most"],
                                              bilateral=False, discovery=True)}
    assert rows["most"]["corloc_hit"] == 1.0 and rows["most"]["pred_box"].tolist() == second
    assert rows["most-single"]["corloc_hit"] == (0.0 if first_is_largest else 1.0)
    saliency = score_row({**row, "gt_mask": np.ones((192, 192), bool)}, methods=["most"], bilateral=False,
                         discovery=False)
    assert saliency == []  # a discovery-only method gives no saliency rows
    empty = score_row({**row, "gt_boxes": "[]"}, methods=["most"], bilateral=False, discovery=True)
    assert [r["status"] for r in empty] == ["failed", "failed"] and "no ground-truth box" in empty[0]["error"]
