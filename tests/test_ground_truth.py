"""Ground truth read as the peers read it: crowd regions, the annotation frame, plain COCO
instances (``coco-mini``). Hand-built inputs with their right values; no Ray."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dncut.backbone_specs import spec
from dncut.config import EvalDataset
from dncut.eval import metrics
from dncut.eval.stages import dataset_records, load_record

COCO_MINI = Path(os.environ.get("DNCUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "coco-mini"


def _coco20k_tree(root: Path) -> EvalDataset:
    """Two 100 x 80 images, each with one crowd region covering most of it and one small box."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in (1, 2):
        name = f"im{i}.jpg"
        Image.new("RGB", (100, 80), (90, 120, 150)).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 100, "height": 80})
        annotations += [{"id": 10 * i, "image_id": i, "bbox": [2, 2, 95, 75], "iscrowd": 1, "category_id": 1},
                        {"id": 10 * i + 1, "image_id": i, "bbox": [70, 5, 20, 15], "iscrowd": 0, "category_id": 1}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "list.txt").write_text("im1.jpg\nim2.jpg\n")
    return EvalDataset(name="c20k", kind="coco20k", root=str(root / "images"),
                       annotations=str(root / "instances.json"), image_list=str(root / "list.txt"))


def _corloc(records: list[dict], box) -> float:
    return float(np.mean([metrics.corloc_hit(np.asarray(box, float), np.asarray(json.loads(r["gt_boxes"])).reshape(-1, 4))
                          for r in records]))


def test_crowd_regions_are_not_ground_truth_by_default(tmp_path):
    ds = _coco20k_tree(tmp_path)
    whole = (0.0, 0.0, 100.0, 80.0)  # a whole-image predicted box
    assert _corloc(dataset_records(ds), whole) == 0.0  # the peers' ground truth: crowd dropped
    assert _corloc(dataset_records(ds.model_copy(update={"include_crowd": True})), whole) == 1.0  # the switch


def test_an_image_decoded_in_another_frame_is_a_failed_row(tmp_path):
    """An EXIF-rotated JPEG is read in its stored frame (the boxes' frame); an image whose size
    differs from the annotation's is not scored."""
    stored = np.zeros((80, 100, 3), np.uint8)
    stored[:, :50] = 255  # left half white in the stored frame
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer would rotate it to 80 x 100
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "rot.jpg").write_bytes(buf.getvalue())
    Image.new("RGB", (64, 64)).save(tmp_path / "small.jpg")
    lite = spec("efficientnet_lite0_s16")
    rot = load_record({"image_id": "rot", "image_uri": str(tmp_path / "rot.jpg"), "mask_uri": "", "gt_boxes": "[]",
                       "missing": "", "gt_size": [100, 80]}, spec=lite, image_size=None)
    assert rot["status"] == "ok" and rot["image"].shape == (80, 100, 3) and rot["image"][40, 10].mean() > 200
    bad = load_record({"image_id": "small", "image_uri": str(tmp_path / "small.jpg"), "mask_uri": "", "gt_boxes": "[]",
                       "missing": "", "gt_size": [100, 80]}, spec=lite, image_size=None)
    assert bad["status"] == "failed" and "declares 100x80" in bad["error"] and "64x64" in bad["error"]
    Image.new("RGB", (12, 40)).save(tmp_path / "tiny.png")
    tiny = load_record({"image_id": "tiny", "image_uri": str(tmp_path / "tiny.png"), "mask_uri": "", "gt_boxes": "[]",
                        "missing": "", "gt_size": [0, 0]}, spec=lite, image_size=320)
    assert tiny["status"] == "failed" and "smaller than one patch (16 px)" in tiny["error"]


def test_plain_coco_instances_layout_on_coco_mini():
    if not COCO_MINI.is_dir():
        pytest.skip("coco-mini not available")
    ann = COCO_MINI / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    ds = EvalDataset(name="coco-mini", kind="coco", root=str(COCO_MINI / "val2017"), annotations=str(ann))
    records = dataset_records(ds)
    assert len(records) == len(coco["images"]) == 79
    boxes = sum(len(json.loads(r["gt_boxes"])) for r in records)
    crowd = sum(a["iscrowd"] for a in coco["annotations"])
    assert crowd == 5 and boxes == len(coco["annotations"]) - crowd
    sizes = {img["file_name"].rsplit(".", 1)[0]: [img["width"], img["height"]] for img in coco["images"]}
    assert all(r["gt_size"] == sizes[r["image_id"]] for r in records)
    with pytest.raises(Exception, match="expected one annotations/instances"):
        dataset_records(EvalDataset(name="two", kind="coco", root=str(COCO_MINI)))  # train and val JSONs
