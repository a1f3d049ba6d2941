"""Ground truth read as the peers read it, and as users' files really are: crowd regions, the
annotation frame, plain COCO instances (``coco-mini``), grey label masks with a 255 void ring,
COCO JSONs that name the VOC classes in VOC's spelling, objects stored as RLE. Hand-built inputs
with their right values; no Ray."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dncut.backbone_specs import spec
from dncut.config import EvalDataset
from dncut.data.class_maps import IGNORE, VOC_CLASSES, annotations_by_image, rasterise_coco
from dncut.data.datasets import CocoInstances
from dncut.data.images import load_mask, read_mask
from dncut.eval import metrics
from dncut.eval.stages import dataset_records, load_record, score_map, score_row

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


# ----------------------------------------------------------------------------- label-image masks with a void ring


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _voc_label_mask() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(40, 60) VOC SegmentationClassAug-style labels: a person (15) and a car (7), each inside a
    2-pixel ring of 255 (void); returns (labels, objects, ring) with 536 object and 296 ring pixels."""
    labels = np.zeros((40, 60), np.uint8)
    labels[8:32, 6:26] = 255  # 24 x 20 = 480
    labels[10:30, 8:24] = 15  # 20 x 16 = 320 -> ring 160
    labels[12:28, 36:58] = 255  # 16 x 22 = 352
    labels[14:26, 38:56] = 7  # 12 x 18 = 216 -> ring 136
    objects, ring = np.isin(labels, (7, 15)), labels == 255
    assert objects.sum() == 536 and ring.sum() == 296
    return labels, objects, ring


def test_grey_label_mask_with_a_void_ring_scores_a_perfect_map_one():
    """Before: the 255 ring was read as the foreground and a perfect map scored IoU 0."""
    labels, objects, ring = _voc_label_mask()
    encoded = _png(Image.fromarray(labels, mode="L"))
    gt = load_mask(encoded)
    assert np.array_equal(gt, objects)
    assert metrics.score_saliency(objects.astype(np.float32), gt).iou == 1.0
    regions = read_mask(encoded)
    assert np.array_equal(regions.foreground, objects) and np.array_equal(regions.void, ring)
    # a map that also covers the undecided ring: the ring is left out of every score
    covering = (objects | ring).astype(np.float32)
    scored = metrics.score_saliency(covering, regions.foreground, ignore=regions.void)
    assert (scored.iou, scored.acc, scored.mae, scored.max_fbeta) == (1.0, 1.0, 0.0, 1.0)
    assert metrics.score_saliency(covering, regions.foreground).iou == pytest.approx(536 / (536 + 296))


def test_void_is_read_alike_in_grey_palette_and_sixteen_bit_and_binary_masks_stay_binary():
    labels, objects, ring = _voc_label_mask()
    palette = Image.fromarray(labels, mode="P")
    colours = [0, 0, 0] * 256
    colours[7 * 3:8 * 3], colours[15 * 3:16 * 3], colours[255 * 3:] = (128, 128, 128), (192, 128, 128), (224, 224, 192)
    palette.putpalette(colours)
    for encoded in (_png(palette), _png(Image.fromarray(labels.astype(np.uint16)))):
        regions = read_mask(encoded)
        assert np.array_equal(regions.foreground, objects) and np.array_equal(regions.void, ring)
    binary = read_mask(_png(Image.fromarray((objects * 255).astype(np.uint8), mode="L")))  # a 0/255 saliency mask
    assert np.array_equal(binary.foreground, objects) and not binary.void.any()
    ids_only = read_mask(_png(Image.fromarray(np.where(ring, 0, labels).astype(np.uint8), mode="L")))
    assert np.array_equal(ids_only.foreground, objects) and not ids_only.void.any()
    soft = np.where(objects, 255, 0).astype(np.uint8)
    soft[ring] = 200  # an anti-aliased edge above half: a soft map, thresholded, no void
    regions = read_mask(_png(Image.fromarray(soft, mode="L")))
    assert np.array_equal(regions.foreground, objects | ring) and not regions.void.any()


def test_score_saliency_ignore_is_checked():
    gt = np.array([[True, False]])
    with pytest.raises(ValueError, match="ignore shape"):
        metrics.score_saliency(np.zeros((1, 2)), gt, ignore=np.zeros((2, 1), bool))
    with pytest.raises(ValueError, match="every pixel"):
        metrics.score_saliency(np.zeros((1, 2)), gt, ignore=np.ones((1, 2), bool))


# ----------------------------------------------------------------------------- COCO: VOC names, RLE


def _square(x0: int, y0: int, side: int = 8) -> list[float]:
    return [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]


def test_coco_json_with_voc_category_names_gives_the_voc_classes(caplog):
    """Before: every one of these objects became IGNORE (only COCO spellings matched)."""
    names = ["aeroplane", "diningtable", "tvmonitor", "motorbike", "sofa", "pottedplant", "person", "Dining_Table",
             "tv/monitor"]
    categories = {i + 1: n for i, n in enumerate(names)}
    anns = [{"category_id": c, "segmentation": [_square(10 * c, 4)], "iscrowd": 0, "bbox": [10 * c, 4, 8, 8]}
            for c in categories]
    out = rasterise_coco(anns, categories, (110, 20))
    got = [int(out[8, 10 * c + 4]) for c in categories]
    coco_names = ["airplane", "dining table", "tv", "motorcycle", "couch", "potted plant", "person", "dining table",
                  "tv"]
    assert got == [VOC_CLASSES.index(n) for n in coco_names] == [1, 11, 20, 14, 18, 16, 15, 11, 20]
    # a category that maps to nothing: IGNORE, and one warning per JSON with its object count
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "categories": [{"id": 1, "name": "aeroplane"}, {"id": 2, "name": "toaster"}, {"id": 3, "name": "lamp"}],
            "annotations": [{"id": i, "image_id": 1 + i % 2, "category_id": c, "segmentation": [_square(0, 0)],
                             "iscrowd": 0, "bbox": [0, 0, 8, 8]} for i, c in enumerate([1, 2, 2, 2, 3, 1])]}
    with caplog.at_level(logging.WARNING, logger="dncut.data.class_maps"):
        by_image = annotations_by_image(CocoInstances("x/instances.json", "x", coco))
        again = annotations_by_image(CocoInstances("x/instances.json", "x", coco))  # the job after the checks
    assert again == by_image
    assert sorted(by_image) == ["a", "b"] and sum(map(len, by_image.values())) == 6
    assert [r.getMessage() for r in caplog.records] == [
        "x/instances.json: 4 objects of 2 categories map to no PASCAL VOC class and are ignored in the class maps: "
        "'toaster' (3), 'lamp' (1)"]
    toaster = rasterise_coco([{**by_image["b"][0], "category_id": 0}], {0: by_image["b"][0]["category"]}, (20, 20))
    assert by_image["b"][0]["category"] == "toaster" and toaster[4, 4] == IGNORE


def _uncompressed_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of an (H, W) bool mask: run lengths over the column-major pixels,
    starting with a run of zeros (built here by hand to give the decoder an independent input)."""
    flat = mask.T.ravel()  # column-major
    runs, value, length = [], False, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return runs + [length]


def test_non_crowd_rle_objects_are_drawn_as_their_class():
    """Before: a non-crowd RLE object was IGNORE over its box. Compressed (pycocotools' string) and
    uncompressed (BlenderProc's list) RLE of the same shape give the polygon's pixels."""
    from pycocotools import mask as mask_util

    shape = np.zeros((40, 60), bool)
    shape[5:20, 10:30] = True  # the polygon below, as PIL fills it (both ends included)
    shape[25:35, 40:55] = True  # a second part of the same object
    polygon = [[10, 5, 29, 5, 29, 19, 10, 19], [40, 25, 54, 25, 54, 34, 40, 34]]
    compressed = mask_util.encode(np.asfortranarray(shape.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as JSON stores it
    uncompressed = {"size": [40, 60], "counts": _uncompressed_runs(shape)}
    assert sum(uncompressed["counts"]) == 40 * 60
    cat = VOC_CLASSES.index("cat")
    by_polygon = rasterise_coco([{"category_id": 1, "segmentation": polygon, "iscrowd": 0, "bbox": [10, 5, 45, 30]}],
                                {1: "cat"}, (60, 40))
    assert np.array_equal(by_polygon == cat, shape)
    for segmentation in (compressed, uncompressed, [compressed]):
        ann = {"category_id": 1, "segmentation": json.loads(json.dumps(segmentation)), "iscrowd": 0,
               "bbox": [10, 5, 45, 30]}
        out = rasterise_coco([ann], {1: "cat"}, (60, 40))
        assert np.array_equal(out == cat, shape) and set(np.unique(out)) == {0, cat}
    # a later RLE object of another category covers part of the first, as polygons do
    other = np.zeros((40, 60), bool)
    other[0:10, 0:15] = True
    toaster = {"category_id": 2, "segmentation": {"size": [40, 60], "counts": _uncompressed_runs(other)}, "iscrowd": 0,
               "bbox": [0, 0, 15, 10]}
    out = rasterise_coco([{**ann, "segmentation": uncompressed}, toaster], {1: "cat", 2: "toaster"}, (60, 40))
    assert np.array_equal(out == IGNORE, other) and np.array_equal(out == cat, shape & ~other)
    with pytest.raises(ValueError, match="differs from the image"):
        rasterise_coco([{**ann, "segmentation": {"size": [30, 60], "counts": compressed["counts"]}}], {1: "cat"}, (60, 40))
    with pytest.raises(ValueError, match="sum to H"):
        rasterise_coco([{**ann, "segmentation": {"size": [40, 60], "counts": [5, 10]}}], {1: "cat"}, (60, 40))


def test_the_void_ring_is_left_out_of_the_evaluation_rows(tmp_path):
    """The evaluation's own path: a decoded record carries the void, the scored rows leave it out."""
    labels, objects, ring = _voc_label_mask()
    Image.fromarray(labels, mode="L").save(tmp_path / "gt.png")
    Image.fromarray(((objects | ring) * 255).astype(np.uint8), mode="L").save(tmp_path / "map.png")
    row = score_map({"image_id": "a", "method": "m", "mask_uri": str(tmp_path / "gt.png"),
                     "map_uri": str(tmp_path / "map.png"), "maps_dir": str(tmp_path)})
    assert row["status"] == "ok" and row["iou"] == 1.0 and row["acc"] == 1.0
    Image.new("RGB", (60, 40), (90, 120, 150)).save(tmp_path / "a.png")
    loaded = load_record({"image_id": "a", "image_uri": str(tmp_path / "a.png"), "mask_uri": str(tmp_path / "gt.png"),
                          "gt_boxes": "[]", "missing": "", "gt_size": [0, 0]}, spec=spec("efficientnet_lite0_s16"),
                         image_size=None)
    assert loaded["status"] == "ok" and np.array_equal(loaded["gt_mask"], objects)
    assert np.array_equal(loaded["gt_void"], ring)
    # stage 3 (score_row): a prediction over the whole image, against a GT whose only non-object
    # pixels are a void ring, scores IoU 1 (0.75 if the ring counted as background)
    void = np.zeros((64, 64), bool)
    void[:, :16] = True
    predicted = {"image_id": "b", "status": "ok", "error": "", "image": np.zeros((64, 64, 3), np.uint8),
                 "content": np.array([64, 64]), "stride": 16, "simple_map": np.ones((4, 4), np.float32),
                 "simple_mask": np.ones((4, 4), bool), "gt_mask": ~void}
    (plain,) = score_row(predicted, methods=["simple"], bilateral=False, discovery=False)
    (voided,) = score_row({**predicted, "gt_void": void}, methods=["simple"], bilateral=False, discovery=False)
    assert (plain["iou"], voided["iou"]) == (0.75, 1.0)
