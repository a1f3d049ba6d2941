"""dncut.data.datasets: every layout built as a tiny tree (local, and S3 for the generic folder)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from dncut import storage
from dncut.data.datasets import (
    DatasetLayoutError,
    DiscoverySample,
    SaliencySample,
    coco20k_dataset,
    saliency_dataset,
    voc_dataset,
)


def _touch(root, *relative: str) -> None:
    for rel in relative:
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"x")


# ----------------------------------------------------------------------------- saliency


@pytest.mark.parametrize(
    ("kind", "image_dir", "mask_dir"),
    [
        ("folder", "images", "masks"),
        ("ecssd", "images", "ground_truth_mask"),
        ("duts_te", "DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"),
        ("duts_te", "DUTS-TE-Image", "DUTS-TE-Mask"),
        ("dut_omron", "DUT-OMRON-image", "pixelwiseGT-new-PNG"),
        ("sod", "images", "masks"),
        ("sod", "Imgs", "GT"),
    ],
)
def test_saliency_layouts(tmp_path, kind, image_dir, mask_dir):
    _touch(tmp_path, f"{image_dir}/0002.jpg", f"{image_dir}/0001.JPG",
           f"{mask_dir}/0001.png", f"{mask_dir}/0002.bmp")
    samples = saliency_dataset(kind, str(tmp_path))
    root = str(tmp_path)
    assert samples == [
        SaliencySample("0001", f"{root}/{image_dir}/0001.JPG", f"{root}/{mask_dir}/0001.png"),
        SaliencySample("0002", f"{root}/{image_dir}/0002.jpg", f"{root}/{mask_dir}/0002.bmp"),
    ]


def test_duts_root_may_be_duts_or_duts_te(tmp_path):
    _touch(tmp_path, "DUTS/DUTS-TE/DUTS-TE-Image/a.jpg", "DUTS/DUTS-TE/DUTS-TE-Mask/a.png")
    from_duts = saliency_dataset("duts_te", str(tmp_path / "DUTS"))
    from_te = saliency_dataset("duts_te", str(tmp_path / "DUTS" / "DUTS-TE"))
    assert [s.mask_uri for s in from_duts] == [s.mask_uri for s in from_te]
    assert from_te[0].mask_uri == str(tmp_path / "DUTS/DUTS-TE/DUTS-TE-Mask/a.png")


def test_unmatched_files_are_counted_and_logged(tmp_path, caplog):
    _touch(tmp_path, "images/a.jpg", "images/b.jpg", "images/c.jpg", "images/e.jpg", "images/readme.txt",
           "masks/a.png", "masks/b.png", "masks/d.png")
    with caplog.at_level(logging.WARNING, logger="dncut.data.datasets"):
        samples = saliency_dataset("folder", str(tmp_path))
    assert [s.image_id for s in samples] == ["a", "b"]
    text = caplog.text
    assert "2 images without a mask (e.g. c, e)" in text
    assert "1 masks without an image (e.g. d)" in text


def test_nested_stems_pair_by_relative_path(tmp_path):
    _touch(tmp_path, "images/cat/1.jpg", "images/dog/1.jpg", "masks/cat/1.png", "masks/dog/1.png")
    samples = saliency_dataset("folder", str(tmp_path))
    assert [(s.image_id, os.path.basename(os.path.dirname(s.mask_uri))) for s in samples] == [
        ("cat/1", "cat"), ("dog/1", "dog")]


def test_duplicate_stem_is_an_error(tmp_path):
    _touch(tmp_path, "images/a.jpg", "images/a.png", "masks/a.png")
    with pytest.raises(DatasetLayoutError, match="share the stem 'a'"):
        saliency_dataset("folder", str(tmp_path))


def test_missing_folder_names_path_and_layout(tmp_path):
    _touch(tmp_path, "images/a.jpg")
    with pytest.raises(DatasetLayoutError) as info:
        saliency_dataset("ecssd", str(tmp_path))
    message = str(info.value)
    assert os.path.join(str(tmp_path), "ground_truth_mask") in message
    assert "{images, ground_truth_mask}" in message
    with pytest.raises(DatasetLayoutError, match="DUT-OMRON-image"):
        saliency_dataset("dut_omron", str(tmp_path / "nowhere"))


def test_empty_dataset_and_bad_kind(tmp_path):
    _touch(tmp_path, "images/a.jpg", "masks/b.png")
    with pytest.raises(DatasetLayoutError, match="no image/mask pairs"):
        saliency_dataset("folder", str(tmp_path))
    choices = r"\['folder', 'ecssd', 'duts_te', 'dut_omron', 'sod'\]"
    with pytest.raises(ValueError, match=rf"kind must be one of {choices}, got 'msra'"):
        saliency_dataset("msra", str(tmp_path))


def test_saliency_folder_on_s3(s3_server, s3_bucket):
    bucket = storage.split_s3(s3_bucket)[0]
    keys = ("images/x1.jpg", "images/x2.jpg", "masks/x1.png", "masks/x2.png", "masks/x3.png")
    for key in (f"ds/{k}" for k in keys):
        s3_server.client.put_object(Bucket=bucket, Key=key, Body=b"x")
    samples = saliency_dataset("folder", f"{s3_bucket}/ds")
    assert samples == [
        SaliencySample("x1", f"{s3_bucket}/ds/images/x1.jpg", f"{s3_bucket}/ds/masks/x1.png"),
        SaliencySample("x2", f"{s3_bucket}/ds/images/x2.jpg", f"{s3_bucket}/ds/masks/x2.png"),
    ]
    with pytest.raises(DatasetLayoutError, match=f"{s3_bucket}/other/images"):
        saliency_dataset("folder", f"{s3_bucket}/other")


def test_real_sod_val_folder():
    root = "/work/shared/data/sod-val"
    if not os.path.isdir(root):
        pytest.skip("sod-val not available")
    samples = saliency_dataset("folder", root)
    assert len(samples) == len(os.listdir(f"{root}/images"))
    assert all(os.path.exists(s.mask_uri) for s in samples)


# ----------------------------------------------------------------------------- VOC

VOC_XML = """<annotation>
  <folder>VOC2007</folder><filename>{name}.jpg</filename>
  <size><width>353</width><height>500</height><depth>3</depth></size>
  <object><name>dog</name><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox></object>
  <object><name>person</name><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498</ymax></bndbox></object>
</annotation>"""


def _write_voc(folder, ids, split="trainval", skip_xml=(), skip_jpg=()):
    os.makedirs(os.path.join(folder, "ImageSets", "Main"), exist_ok=True)
    with open(os.path.join(folder, "ImageSets", "Main", f"{split}.txt"), "w") as handle:
        handle.write("\n".join(ids) + "\n\n")
    for i in ids:
        if i not in skip_jpg:
            _touch(folder, f"JPEGImages/{i}.jpg")
        if i not in skip_xml:
            os.makedirs(os.path.join(folder, "Annotations"), exist_ok=True)
            with open(os.path.join(folder, "Annotations", f"{i}.xml"), "w") as handle:
                handle.write(VOC_XML.format(name=i))


@pytest.mark.parametrize("where", ["VOCdevkit/VOC2007", "VOC2007", ""])
def test_voc_layouts_and_minus_one_shift(tmp_path, where):
    folder = os.path.join(str(tmp_path), where) if where else str(tmp_path)
    _write_voc(folder, ["000009", "000005"])
    samples = voc_dataset(str(tmp_path), "2007")
    expected_boxes = [(47.0, 239.0, 195.0, 371.0), (7.0, 11.0, 352.0, 498.0)]  # difficult one kept
    assert samples == [
        DiscoverySample("000009", os.path.join(folder, "JPEGImages", "000009.jpg"), expected_boxes, (353, 500)),
        DiscoverySample("000005", os.path.join(folder, "JPEGImages", "000005.jpg"), expected_boxes, (353, 500)),
    ]


def test_voc_missing_pieces(tmp_path):
    with pytest.raises(DatasetLayoutError, match="ImageSets/Main/trainval.txt"):
        voc_dataset(str(tmp_path), "2012")
    _write_voc(str(tmp_path / "VOC2012"), ["a", "b", "c"], skip_xml=("b",))
    with pytest.raises(DatasetLayoutError, match=r"1 of 3 ids have no Annotations/<id>.xml \(e.g. b\)"):
        voc_dataset(str(tmp_path), "2012")
    _write_voc(str(tmp_path / "other" / "VOC2012"), ["a", "b", "c"], skip_jpg=("a", "c"))
    with pytest.raises(DatasetLayoutError, match=r"2 of 3 ids have no JPEGImages/<id>.jpg \(e.g. a, c\)"):
        voc_dataset(str(tmp_path / "other"), "2012")
    with pytest.raises(ValueError, match=r"year must be one of \['2007', '2012'\], got '2010'"):
        voc_dataset(str(tmp_path), "2010")


def test_voc_on_s3(s3_server, s3_bucket):
    bucket = storage.split_s3(s3_bucket)[0]
    put = s3_server.client.put_object
    put(Bucket=bucket, Key="voc/VOCdevkit/VOC2007/ImageSets/Main/test.txt", Body=b"000001\n")
    put(Bucket=bucket, Key="voc/VOCdevkit/VOC2007/JPEGImages/000001.jpg", Body=b"x")
    put(Bucket=bucket, Key="voc/VOCdevkit/VOC2007/Annotations/000001.xml",
        Body=VOC_XML.format(name="1").encode())
    (sample,) = voc_dataset(f"{s3_bucket}/voc", "2007", split="test")
    assert sample.image_uri == f"{s3_bucket}/voc/VOCdevkit/VOC2007/JPEGImages/000001.jpg"
    assert sample.boxes[0] == (47.0, 239.0, 195.0, 371.0)


# ----------------------------------------------------------------------------- COCO20k


def _write_coco(tmp_path):
    coco = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480},
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 640, "height": 426},
            {"id": 30, "file_name": "COCO_train2014_000000000030.jpg", "width": 640, "height": 428},
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "bbox": [10.0, 20.0, 30.0, 40.0], "iscrowd": 0, "category_id": 1},
            {"id": 2, "image_id": 25, "bbox": [1.5, 2.5, 3.0, 4.0], "iscrowd": 0, "category_id": 2},
            {"id": 3, "image_id": 9, "bbox": [0, 0, 640, 480], "iscrowd": 1, "category_id": 1},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (tmp_path / "list.txt").write_text(
        "train2014/COCO_train2014_000000000025.jpg\nCOCO_train2014_000000000009.jpg\n"
        "COCO_train2014_000000000030.jpg\n")


def test_coco20k_xywh_to_corners(tmp_path):
    _write_coco(tmp_path)
    images = str(tmp_path / "images")
    samples = coco20k_dataset(images, str(tmp_path / "instances.json"), str(tmp_path / "list.txt"))
    assert samples == [  # crowd regions dropped by default, as the peers; sizes from the JSON
        DiscoverySample("COCO_train2014_000000000025", f"{images}/COCO_train2014_000000000025.jpg",
                        [(1.5, 2.5, 4.5, 6.5)], (640, 426)),
        DiscoverySample("COCO_train2014_000000000009", f"{images}/COCO_train2014_000000000009.jpg",
                        [(10.0, 20.0, 40.0, 60.0)], (640, 480)),
        DiscoverySample("COCO_train2014_000000000030", f"{images}/COCO_train2014_000000000030.jpg", [], (640, 428)),
    ]
    with_crowd = coco20k_dataset(images, str(tmp_path / "instances.json"), str(tmp_path / "list.txt"),
                                 include_crowd=True)
    assert with_crowd[1].boxes == [(10.0, 20.0, 40.0, 60.0), (0.0, 0.0, 640.0, 480.0)]


def test_coco20k_unknown_name(tmp_path):
    _write_coco(tmp_path)
    (tmp_path / "bad.txt").write_text("COCO_train2014_000000000009.jpg\nnope.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 names .* \(e.g. nope.jpg\)"):
        coco20k_dataset(str(tmp_path), str(tmp_path / "instances.json"), str(tmp_path / "bad.txt"))
