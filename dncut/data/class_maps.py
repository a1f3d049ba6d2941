"""Semantic ground truth from COCO instances: the 21 PASCAL VOC classes, their names as COCO and
VOC writers spell them, and one image's objects drawn into a class map.

    voc_class(name) -> int in 1..20, or None (not one of the 20 classes)
    decode_segmentation(segmentation, size (W, H)) -> (H, W) bool, or None (no pixel data)
    rasterise_coco(annotations, categories, size (W, H)) -> (H, W) uint8 class map
        0 = background, 1..20 = VOC classes (``VOC_CLASSES`` order), IGNORE = 255 (left out)
    annotations_by_image(instances) -> {image stem: [annotation summaries]}, warns once per JSON
        about categories that map to no class (with their object counts)

Segmentations, as COCO writers store them (pycocotools, BlenderProc, pycococreator, CVAT):

    polygons              [[x0, y0, x1, y1, ...], ...]            PIL polygon fill (as before)
    RLE, compressed       {"size": [H, W], "counts": "<string>"}  pycocotools.mask.decode
    RLE, uncompressed     {"size": [H, W], "counts": [n0, n1, ...]}  frPyObjects, then decode
    several RLEs          [{...}, {...}]                          each decoded, united

Which value an object gets: a VOC class (``voc_class`` of its category's name) and not crowd ->
its class on its pixels; a crowd region, or an object of another category -> IGNORE on its pixels
(a crowd region without polygons: on its whole box, as before), so they are not scored as
background. Objects are drawn in annotation order (a later object covers an earlier one).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from dncut.data.datasets import CocoInstances

logger = logging.getLogger(__name__)

__all__ = ["IGNORE", "VOC_CLASSES", "VOC_SYNONYMS", "annotations_by_image", "decode_segmentation",
           "rasterise_coco", "voc_class"]

IGNORE = 255
"""Class-map value of pixels left out of the score (void, crowd, other categories)."""

VOC_CLASSES = ("background", "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch", "train", "tv")
"""PASCAL VOC's 21 classes (background + 20) in VOC order, under their COCO category names."""

VOC_SYNONYMS = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}
"""VOC devkit name -> COCO name, for the six classes whose names differ (VOC2012 ``classes`` list
vs COCO 2017 ``categories``); the other 14 are spelled alike."""


def _key(name: str) -> str:
    """Case, spaces, underscores, hyphens and slashes do not matter: "Dining_Table", "tv/monitor"."""
    return re.sub(r"[\s_\-/]+", "", name.strip().lower())


_INDEX = {_key(name): i for i, name in enumerate(VOC_CLASSES) if i}
_INDEX.update({_key(voc): _INDEX[_key(coco)] for voc, coco in VOC_SYNONYMS.items()})


def voc_class(name: str) -> int | None:
    """The VOC class index (1..20) of a category name in its COCO or VOC spelling (``VOC_SYNONYMS``;
    case, spaces, ``_``, ``-`` and ``/`` ignored), ``None`` for any other name ("background" included)."""
    return _INDEX.get(_key(name)) if isinstance(name, str) else None


def _rle_size(rle: dict) -> tuple[int, int]:
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"RLE segmentation needs 'size': [H, W], got {size!r}")
    return int(size[0]), int(size[1])


def decode_segmentation(segmentation: Any, size: tuple[int, int]) -> np.ndarray | None:
    """An RLE segmentation (compressed or uncompressed ``counts``, one dict or a list of them)
    -> ``(H, W)`` bool, decoded by ``pycocotools.mask``; ``None`` for polygons or no segmentation.

    Args:
        segmentation: an annotation's ``segmentation`` value.
        size: ``(W, H)`` of the image.

    Raises:
        ValueError: an RLE whose ``size`` is not the image's, without ``counts``, with uncompressed
            ``counts`` that do not cover H * W, or that pycocotools cannot read.
    """
    rles = [segmentation] if isinstance(segmentation, dict) else segmentation
    if not isinstance(rles, list) or not rles or not all(isinstance(r, dict) for r in rles):
        return None
    from pycocotools import mask as mask_util

    width, height = size
    out = np.zeros((height, width), bool)
    for rle in rles:
        if _rle_size(rle) != (height, width):
            raise ValueError(f"RLE size {list(_rle_size(rle))} (H, W) differs from the image's [{height}, {width}]")
        counts = rle.get("counts")
        if isinstance(counts, list):  # uncompressed: run lengths, column-major, starting with zeros
            runs = [int(c) for c in counts]
            if min(runs, default=-1) < 0 or sum(runs) != height * width:
                raise ValueError(f"uncompressed RLE counts must be non-negative and sum to H * W = {height * width}, "
                                 f"got {len(runs)} runs summing to {sum(runs)}")
            rle = mask_util.frPyObjects({"size": [height, width], "counts": runs}, height, width)
        elif isinstance(counts, (str, bytes)) and counts:
            rle = {"size": [height, width], "counts": counts}
        else:
            raise ValueError(f"RLE segmentation needs 'counts' (a non-empty string or a list), got {counts!r:.40}")
        with warnings.catch_warnings():  # pycocotools 2.0.x's numpy-2 copy notice, not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            out |= mask_util.decode(rle).astype(bool)  # (H, W)
    return out


def rasterise_coco(annotations: Sequence[dict], categories: dict[int, str], size: tuple[int, int]) -> np.ndarray:
    """One image's COCO objects -> ``(H, W)`` uint8 VOC class map (rules in the module docstring).

    Args:
        annotations: the image's entries of a COCO instances JSON (``category_id``,
            ``segmentation``, ``iscrowd``, ``bbox``).
        categories: COCO category id -> name (COCO or VOC spelling, see :func:`voc_class`).
        size: ``(W, H)`` of the image.

    Returns:
        ``(H, W)`` uint8: 0 background, 1..20 VOC classes, ``IGNORE``.

    Raises:
        ValueError: an RLE whose size is not the image's, or a malformed RLE.
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for ann in annotations:
        crowd = bool(ann.get("iscrowd", 0))
        cls = voc_class(categories.get(int(ann["category_id"]), ""))
        value = cls if cls and not crowd else IGNORE
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and segmentation and not any(isinstance(p, dict) for p in segmentation):
            for poly in segmentation:  # polygons; one of fewer than 3 points draws nothing
                if len(poly) >= 6:
                    draw.polygon([float(v) for v in poly], fill=value)
            continue
        region = None if crowd else decode_segmentation(segmentation, size)  # (H, W) bool
        if region is not None:
            labels = np.array(canvas, np.uint8)  # (H, W)
            labels[region] = value
            canvas = Image.fromarray(labels)
            draw = ImageDraw.Draw(canvas)
        else:  # a crowd RLE, or no pixel data: its box is left out of the score
            x, y, w, h = (float(v) for v in ann["bbox"])
            draw.rectangle([x, y, x + w, y + h], fill=IGNORE)
    return np.asarray(canvas, np.uint8)


_WARNED: set[str] = set()  # instances JSONs warned about in this process


def annotations_by_image(instances: CocoInstances) -> dict[str, list[dict]]:
    """An instances JSON's objects grouped by image file stem, each as ``{"category": name,
    "segmentation", "iscrowd", "bbox"}`` (what :func:`rasterise_coco` needs, JSON-serialisable).

    Logs one warning naming every category that maps to no VOC class (:func:`voc_class`) with its
    object count: those objects are IGNORE in the class maps, not scored.
    """
    coco = instances.data
    names = {int(c["id"]): str(c.get("name", "")) for c in coco.get("categories", [])}
    stems = {int(img["id"]): img["file_name"].rsplit(".", 1)[0] for img in coco["images"]}
    by_file: dict[str, list[dict]] = {}
    unmapped: Counter[str] = Counter()
    for ann in coco.get("annotations", []):
        name = names.get(int(ann["category_id"]), "")
        if voc_class(name) is None:
            unmapped[name or f"<category id {ann['category_id']} not in 'categories'>"] += 1
        by_file.setdefault(stems.get(int(ann["image_id"]), ""), []).append(
            {"category": name, "segmentation": ann.get("segmentation"), "iscrowd": int(ann.get("iscrowd", 0)),
             "bbox": ann.get("bbox", [0, 0, 0, 0])})
    if unmapped and instances.path not in _WARNED:  # the pre-Ray checks and the job read the same JSON
        _WARNED.add(instances.path)
        listed = ", ".join(f"{name!r} ({n})" for name, n in unmapped.most_common())
        logger.warning("%s: %d objects of %d categories map to no PASCAL VOC class and are ignored in the class "
                       "maps: %s", instances.path, sum(unmapped.values()), len(unmapped), listed)
    return by_file
