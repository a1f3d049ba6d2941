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


# --------------------------------------------------------------------------- the Ray batch job
def _coco_tree(root) -> None:
    """Six 64 x 64 photos-to-be: a cat (left half) or a dog (right half) polygon on a flat
    background, plus one image whose annotation declares another size (a failed row)."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    images, anns = [], []
    for i in range(7):
        pixels = np.full((64, 64, 3), 40, np.uint8)
        cls, x0 = (1, 0) if i % 2 == 0 else (2, 32)
        pixels[8:56, x0 + 4:x0 + 28] = (200, 60, 60) if cls == 1 else (60, 200, 60)
        pixels = np.clip(pixels + rng.integers(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i, "file_name": f"{i:03d}.png", "width": 64 if i < 6 else 80, "height": 64})
        poly = [x0 + 4, 8, x0 + 28, 8, x0 + 28, 56, x0 + 4, 56]
        anns.append({"id": i, "image_id": i, "category_id": cls, "segmentation": [poly], "iscrowd": 0,
                     "bbox": [x0 + 4, 8, 24, 48], "area": 24 * 48})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))


def test_segmentation_job_on_ray_matches_the_protocol_in_process(ray_session, tmp_path):
    """The Ray batch job (features in actors, clustering on the driver) gives the mIoU that the
    protocol functions give on the same backbone in this process; a bad image is a failed row."""
    import torch
    from PIL import Image

    from dncut.backbones import create_backbone, export_backbone
    from dncut.config import load_config
    from dncut.eval.jobs import run_evaluation
    from dncut.eval.predict import Predictor
    from dncut.eval.report import format_table

    _coco_tree(tmp_path)
    torch.manual_seed(0)
    weights = str(tmp_path / "backbone.pth")
    backbone = create_backbone("vit_tiny_test").eval()
    export_backbone(backbone, weights)
    cfg = load_config("configs/eval/smoke.yaml", [
        f"output_dir={tmp_path / 'out'}", f"eval.checkpoints=[{weights}]",
        f"eval.datasets=[{{name: seg, kind: coco, task: segmentation, root: {tmp_path / 'images'}, "
        f"annotations: {tmp_path / 'instances.json'}}}]",
        "eval.segmentation.image_size=64", "eval.segmentation.overcluster_k=4", "eval.segmentation.seeds=[0, 1]"])
    summary = run_evaluation(cfg)
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"kmeans-k21", "kmeans-k4"}
    assert all(r["n_images"] == 7 and r["n_failed"] == 1 for r in runs.values())

    # the same protocol in process: resize, features, tokens, clustering, confusion at 100 x 100
    predictor = Predictor(backbone, ["simple"], "eigh")
    tokens, labels = [], []
    for i in range(6):
        image = np.asarray(Image.open(tmp_path / "images" / f"{i:03d}.png").convert("RGB"))
        with torch.inference_mode():
            tokens.append(predictor.features([image])[0].flatten(1).T.numpy())
        x0 = 0 if i % 2 == 0 else 32
        poly = [x0 + 4, 8, x0 + 28, 8, x0 + 28, 56, x0 + 4, 56]  # rasterise_coco is tested above
        gt = rasterise_coco([{"category_id": 1, "segmentation": [poly], "iscrowd": 0}], {1: "cat" if i % 2 == 0 else "dog"},
                            (64, 64))
        assert set(np.unique(gt)) == {0, 8 if i % 2 == 0 else 12}  # VOC ids: cat 8, dog 12
        labels.append(np.asarray(Image.fromarray(gt).resize((100, 100), Image.NEAREST)))
    for k, how, method in ((21, "hungarian", "kmeans-k21"), (4, "majority", "kmeans-k4")):
        scores = []
        for seed in (0, 1):
            ids = cluster_tokens(np.concatenate(tokens), k, seed=seed).reshape(6, 8, 8)
            conf = sum(confusion(np.asarray(Image.fromarray(g.astype(np.int32)).resize((100, 100), Image.NEAREST)),
                                 lab, k, 21) for g, lab in zip(ids, labels))
            scores.append(miou(conf, assign(conf, how))[0])
        assert runs[method]["metrics"]["miou"] == pytest.approx(np.mean(scores), abs=1e-6)
    rows = __import__("pyarrow.parquet", fromlist=["x"]).read_table(tmp_path / "out" / "eval_smoke" /
                                                                      "per_image.parquet").to_pylist()
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(failed) == 2 and all("80x64" in r["error"] for r in failed)  # one image x two scores
    table = format_table(summary)
    assert "Unsupervised semantic segmentation, mIoU" in table and "kmeans-k4" in table
