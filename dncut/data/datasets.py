"""Dataset layouts: saliency (image + mask) and object discovery (image + boxes).

Every function takes a root URI (local path or ``s3://bucket/prefix``) and
returns plain records; no image is decoded here (see ``dncut.data.images``).

Saliency layouts accepted by :func:`saliency_dataset` (image folder, mask folder)::

    folder     ROOT/{images, masks}
    ecssd      ROOT/{images, ground_truth_mask}                      (ECSSD)
    duts_te    ROOT/DUTS-TE/{DUTS-TE-Image, DUTS-TE-Mask}            (ROOT = DUTS)
               ROOT/{DUTS-TE-Image, DUTS-TE-Mask}                    (ROOT = DUTS-TE)
    dut_omron  ROOT/{DUT-OMRON-image, pixelwiseGT-new-PNG}           (DUT-OMRON)
    sod        ROOT/{images, masks}  or  ROOT/{Imgs, GT}             (SOD; the benchmark's naming)

Images and masks are paired by their path relative to their folder, without
suffix ("stem"): ``images/a/0001.jpg`` <-> ``masks/a/0001.png``. Unpaired files
are counted and logged as a warning; they are never dropped silently.

Discovery: :func:`voc_dataset` (VOC07 / VOC12, boxes shifted by -1 on xmin and
ymin as the peers do) and :func:`coco20k_dataset` (COCO instances JSON + a
file list, boxes xywh -> x0 y0 x1 y1). Boxes are in pixels of the original image.

Bad annotations: an annotation file that does not parse (malformed XML / JSON, a coordinate that
is not a number, a missing key) raises :class:`DatasetLayoutError` naming the file; a box of zero
or negative area, with a non-finite coordinate, or entirely outside the image size the annotation
declares is dropped, counted and logged as one warning (an image left without a box is then
flagged by the evaluation, never scored as a miss).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

from dncut import storage
from dncut.storage import IMAGE_SUFFIXES, Storage

logger = logging.getLogger(__name__)

SaliencyKind = Literal["folder", "ecssd", "duts_te", "dut_omron", "sod"]
VocYear = Literal["2007", "2012"]
Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels."""

SALIENCY_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "folder": (("images", "masks"),),
    "ecssd": (("images", "ground_truth_mask"),),
    "duts_te": (
        ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"),
        ("DUTS-TE-Image", "DUTS-TE-Mask"),
    ),
    "dut_omron": (("DUT-OMRON-image", "pixelwiseGT-new-PNG"),),
    "sod": (("images", "masks"), ("Imgs", "GT")),
}
"""Per kind, the accepted (image folder, mask folder) pairs relative to the root, tried in order."""

_EXAMPLES_IN_WARNING = 5
_READ_THREADS = 16


class DatasetLayoutError(ValueError):
    """A dataset root does not have the expected layout, or yields no samples."""


@dataclasses.dataclass(frozen=True)
class SaliencySample:
    """One saliency image and its ground-truth mask.

    Attributes:
        image_id: path of the image relative to its folder, without suffix.
        image_uri: full URI of the image.
        mask_uri: full URI of the mask.
    """

    image_id: str
    image_uri: str
    mask_uri: str


@dataclasses.dataclass(frozen=True)
class DiscoverySample:
    """One object-discovery image and its ground-truth boxes.

    Attributes:
        image_id: VOC id (``"000005"``) or COCO file stem.
        image_uri: full URI of the image.
        boxes: ground-truth boxes ``(x0, y0, x1, y1)`` in pixels (possibly empty).
        size: ``(W, H)`` declared by the annotation (COCO ``width``/``height``, VOC ``<size>``);
            the evaluation refuses an image decoded to another size.
    """

    image_id: str
    image_uri: str
    boxes: list[Box]
    size: tuple[int, int] | None = None  # (W, H) the annotation declares: the stored pixel frame


# ----------------------------------------------------------------------------- saliency


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def relative_stem(folder_uri: str, uri: str) -> str:
    """A file's stem below its folder, the key images and masks pair on: ``<folder>/sub/x.jpg`` -> ``sub/x``."""
    prefix = folder_uri.rstrip("/") + "/"
    relative = uri[len(prefix) :] if uri.startswith(prefix) else os.path.basename(uri)
    return posixpath.splitext(relative.replace(os.sep, "/"))[0]


def stem_array(folder_uri: str, uris: Sequence[str]):
    """``relative_stem`` of each of ``uris`` as one ``pyarrow.StringArray`` ``(n,)``, in order (no Python
    object kept per file: what the pre-Ray pairing check and the evaluation's listing hold)."""
    import pyarrow as pa

    return pa.array((relative_stem(folder_uri, u) for u in uris), pa.string(), size=len(uris))


def _stem_map(folder_uri: str, uris: Sequence[str]) -> dict[str, str]:
    """Relative stem -> URI; two files with one stem are a layout error."""
    stems: dict[str, str] = {}
    for uri in uris:
        stem = relative_stem(folder_uri, uri)
        if stem in stems:
            raise DatasetLayoutError(
                f"two files share the stem {stem!r} in {folder_uri}: {stems[stem]} and {uri}"
            )
        stems[stem] = uri
    return stems


def pair_by_stem(
    images: dict[str, str], masks: dict[str, str]
) -> tuple[list[SaliencySample], list[str], list[str]]:
    """Pair images and masks that share a stem.

    Args:
        images: stem -> image URI.
        masks: stem -> mask URI.

    Returns:
        (samples sorted by stem, stems of images without a mask, stems of masks without an image).
    """
    samples = [SaliencySample(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return samples, sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())


def _warn_unmatched(what: str, stems: list[str], root: str) -> None:
    if stems:
        examples = ", ".join(stems[:_EXAMPLES_IN_WARNING])
        more = ", ..." if len(stems) > _EXAMPLES_IN_WARNING else ""
        logger.warning("%s: %d %s (e.g. %s%s)", root, len(stems), what, examples, more)


def _find_layout(kind: str, root: str, store: Storage) -> tuple[str, str]:
    """The first (image folder, mask folder) of ``kind`` that exists under ``root``."""
    missing: list[str] = []
    for image_dir, mask_dir in SALIENCY_LAYOUTS[kind]:
        image_uri, mask_uri = storage.join(root, image_dir), storage.join(root, mask_dir)
        absent = [u for u in (image_uri, mask_uri) if not store.exists(u)]
        if not absent:
            return image_uri, mask_uri
        missing.extend(absent)
    expected = " or ".join(f"{root}/{{{i}, {m}}}" for i, m in SALIENCY_LAYOUTS[kind])
    raise DatasetLayoutError(
        f"saliency dataset {kind!r}: not found: {', '.join(missing)}; expected layout {expected}"
    )


def saliency_dataset(kind: SaliencyKind, root: str, store: Storage | None = None) -> list[SaliencySample]:
    """Image/mask pairs of a saliency dataset (layouts in the module docstring).

    Args:
        kind: one of ``"folder", "ecssd", "duts_te", "dut_omron", "sod"``.
        root: dataset root, local path or ``s3://bucket/prefix``.
        store: storage handle (``dncut.storage.Storage``); ``None``: the environment's defaults.

    Returns:
        Samples sorted by image id. Unpaired images / masks are logged (count + names).

    Raises:
        ValueError: unknown ``kind``.
        DatasetLayoutError: a folder is missing (message names it and the expected
            layout), two files share a stem, or no pair is found.
    """
    store = store or Storage()
    _check_choice("kind", kind, get_args(SaliencyKind))
    image_dir, mask_dir = _find_layout(kind, root, store)
    images = _stem_map(image_dir, store.list_files(image_dir, IMAGE_SUFFIXES))
    masks = _stem_map(mask_dir, store.list_files(mask_dir, IMAGE_SUFFIXES))
    samples, lonely_images, lonely_masks = pair_by_stem(images, masks)
    _warn_unmatched("images without a mask", lonely_images, root)
    _warn_unmatched("masks without an image", lonely_masks, root)
    if not samples:
        raise DatasetLayoutError(
            f"saliency dataset {kind!r} at {root}: no image/mask pairs "
            f"({len(images)} images in {image_dir}, {len(masks)} masks in {mask_dir})"
        )
    return samples


# ----------------------------------------------------------------------------- VOC


def _voc_folder(root: str, year: str, split: str, store: Storage) -> str:
    candidates = [storage.join(root, "VOCdevkit", f"VOC{year}"), storage.join(root, f"VOC{year}"), root]
    for folder in candidates:
        if store.exists(storage.join(folder, "ImageSets", "Main", f"{split}.txt")):
            return folder
    raise DatasetLayoutError(
        f"VOC{year} split {split!r}: no ImageSets/Main/{split}.txt under any of {candidates}; "
        f"expected ROOT/VOCdevkit/VOC{year}/{{ImageSets/Main, Annotations, JPEGImages}} "
        f"or the VOC{year} folder itself"
    )


def _read_split(uri: str, store: Storage) -> list[str]:
    text = store.read_bytes(uri).decode("utf-8")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def parse_voc_boxes(xml_text: str | bytes) -> list[Box]:
    """Boxes of a VOC annotation, shifted by -1 on xmin and ymin.

    VOC coordinates are 1-based inclusive; the peers' CorLoc protocol uses
    ``(xmin - 1, ymin - 1, xmax, ymax)``. Every object is kept, including those
    marked ``difficult`` or ``truncated`` (as the peers do).

    Args:
        xml_text: content of ``Annotations/<id>.xml``.

    Returns:
        One ``(x0, y0, x1, y1)`` per ``<object>``, in file order.
    """
    tree = ET.fromstring(xml_text)
    boxes: list[Box] = []
    for obj in tree.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetLayoutError(f"VOC object without <bndbox>: {ET.tostring(obj)[:200]!r}")
        coords = [bndbox.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            raise DatasetLayoutError(f"VOC <bndbox> lacks one of xmin/ymin/xmax/ymax: {coords}")
        x0, y0, x1, y1 = (float(c) for c in coords)
        boxes.append((x0 - 1.0, y0 - 1.0, x1, y1))
    return boxes


def parse_voc_size(xml_text: str | bytes) -> tuple[int, int] | None:
    """``(W, H)`` of a VOC annotation's ``<size>`` (the frame its boxes are in), ``None`` if absent."""
    size = ET.fromstring(xml_text).find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        return None
    return int(float(size.findtext("width"))), int(float(size.findtext("height")))


def _read_many(uris: Sequence[str], store: Storage) -> list[bytes | None]:
    """Read files concurrently (S3 latency); ``None`` where a file does not exist."""

    def read(uri: str) -> bytes | None:
        try:
            return store.read_bytes(uri)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(read, uris))


def voc_dataset(
    root: str, year: VocYear, split: str = "trainval", store: Storage | None = None
) -> list[DiscoverySample]:
    """Images and ground-truth boxes of PASCAL VOC (see :func:`parse_voc_boxes`).

    Args:
        root: folder holding ``VOCdevkit/VOC{year}``, or ``VOC{year}``, or that folder itself.
        year: ``"2007"`` or ``"2012"``.
        split: name of the ``ImageSets/Main/{split}.txt`` list.
        store: storage handle (``dncut.storage.Storage``); ``None``: the environment's defaults.

    Returns:
        One sample per listed id, in list order (images without objects keep ``boxes=[]``
        and are counted in a warning).

    Raises:
        ValueError: unknown ``year``.
        DatasetLayoutError: missing split file, annotations or JPEG images (counted and named), or an
            annotation that does not parse (named).
    """
    store = store or Storage()
    _check_choice("year", year, get_args(VocYear))
    folder = _voc_folder(root, year, split, store)
    ids = _read_split(storage.join(folder, "ImageSets", "Main", f"{split}.txt"), store)
    if not ids:
        raise DatasetLayoutError(f"VOC{year} split {split!r} at {folder} lists no image")
    jpeg_dir = storage.join(folder, "JPEGImages")
    image_uris = {i: storage.join(jpeg_dir, f"{i}.jpg") for i in ids}
    present = set(store.list_files(jpeg_dir, (".jpg",))) if store.exists(jpeg_dir) else set()
    no_image = [i for i in ids if image_uris[i] not in present]
    xml_data = _read_many([storage.join(folder, "Annotations", f"{i}.xml") for i in ids], store)
    no_xml = [i for i, data in zip(ids, xml_data) if data is None]
    for what, bad in (("JPEGImages/<id>.jpg", no_image), ("Annotations/<id>.xml", no_xml)):
        if bad:
            raise DatasetLayoutError(
                f"VOC{year} {split} at {folder}: {len(bad)} of {len(ids)} ids have no {what} "
                f"(e.g. {', '.join(bad[:_EXAMPLES_IN_WARNING])})"
            )
    samples = [_voc_sample(i, image_uris[i], x, storage.join(folder, "Annotations", f"{i}.xml"))
               for i, x in zip(ids, xml_data)]
    samples = drop_bad_boxes(samples, folder)
    _warn_unmatched("VOC images without objects", [s.image_id for s in samples if not s.boxes], folder)
    return samples


def _voc_sample(image_id: str, image_uri: str, xml_data: bytes, xml_uri: str) -> DiscoverySample:
    """One VOC sample; an annotation that does not parse raises ``DatasetLayoutError`` naming it."""
    try:
        return DiscoverySample(image_id, image_uri, parse_voc_boxes(xml_data), parse_voc_size(xml_data))
    except (ET.ParseError, ValueError) as exc:
        raise DatasetLayoutError(f"VOC annotation {xml_uri}: {type(exc).__name__}: {exc}") from None


def drop_bad_boxes(samples: Sequence[DiscoverySample], source: str) -> list[DiscoverySample]:
    """The samples without their unusable boxes, dropped with one warning that counts them.

    A box is dropped when a coordinate is not finite, its area is zero or negative (x1 <= x0 or
    y1 <= y0), or it lies entirely outside the ``size`` the annotation declares (when it declares one).
    """
    out, dropped = [], {"zero or negative area / not finite": [], "outside the image": []}
    for smp in samples:
        keep = []
        for box in smp.boxes:
            x0, y0, x1, y1 = box
            if not all(math.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
                dropped["zero or negative area / not finite"].append(f"{smp.image_id} {list(box)}")
            elif smp.size is not None and (x1 <= 0 or y1 <= 0 or x0 >= smp.size[0] or y0 >= smp.size[1]):
                dropped["outside the image"].append(f"{smp.image_id} {list(box)} (image {smp.size[0]}x{smp.size[1]})")
            else:
                keep.append(box)
        out.append(smp if len(keep) == len(smp.boxes) else dataclasses.replace(smp, boxes=keep))
    for why, items in dropped.items():
        if items:
            examples = ", ".join(items[:_EXAMPLES_IN_WARNING]) + (", ..." if len(items) > _EXAMPLES_IN_WARNING else "")
            logger.warning("%s: dropped %d boxes of %s (e.g. %s)", source, len(items), why, examples)
    return out


def _read_json(uri: str, store: Storage) -> dict:
    """A COCO instances JSON; ``DatasetLayoutError`` naming the file when it is not a JSON object."""
    try:
        data = json.loads(store.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"COCO annotations {uri}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetLayoutError(f"COCO annotations {uri}: expected an object with an 'images' list")
    return data


def _malformed(uri: str, exc: Exception) -> DatasetLayoutError:
    return DatasetLayoutError(f"COCO annotations {uri}: malformed entry: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- COCO20k


def coco_boxes(annotations: Sequence[dict], include_crowd: bool = False) -> dict[int, list[Box]]:
    """Group COCO ``bbox`` entries ``[x, y, w, h]`` by image id as ``(x, y, x + w, y + h)``.

    Args:
        annotations: the ``"annotations"`` list of a COCO instances JSON.
        include_crowd: keep ``iscrowd=1`` regions as ground truth (false, the default, drops
            them, as LOST, TokenCut, FOUND and MOST do).

    Returns:
        image id -> boxes in annotation order.
    """
    boxes: dict[int, list[Box]] = {}
    for ann in annotations:
        if not include_crowd and ann.get("iscrowd", 0):
            continue
        if not isinstance(ann.get("bbox"), (list, tuple)) or len(ann["bbox"]) != 4:
            raise ValueError(f"annotation {ann.get('id')}: bbox must be [x, y, w, h], got {ann.get('bbox')!r}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.setdefault(int(ann["image_id"]), []).append((x, y, x + w, y + h))
    return boxes


def coco20k_dataset(
    root: str,
    annotations_json: str,
    image_list: str,
    store: Storage | None = None,
    include_crowd: bool = False,
) -> list[DiscoverySample]:
    """COCO20k: the images named in a list file with their boxes from an instances JSON.

    Each line of ``image_list`` names one image; only its base name is used and
    matched to the JSON's ``file_name`` (e.g. ``COCO_train2014_000000000009.jpg``).
    Crowd regions (``iscrowd=1``) are dropped by default, as the peers' ground truth does.

    Args:
        root: folder holding the images (``file_name`` is joined onto it).
        annotations_json: URI of the COCO instances JSON (e.g. ``instances_train2014.json``).
        image_list: URI of the text file with one image file name per line.
        store: storage handle (``dncut.storage.Storage``); ``None``: the environment's defaults.
        include_crowd: keep ``iscrowd=1`` boxes.

    Returns:
        One sample per listed image, in list order; ``image_id`` is the file stem, ``size`` the
        JSON's ``width``/``height``.

    Raises:
        DatasetLayoutError: listed names missing from the JSON, an empty list, or a malformed JSON.
    """
    store = store or Storage()
    names = [posixpath.basename(line.strip()) for line in
             store.read_bytes(image_list).decode("utf-8").splitlines() if line.strip()]
    if not names:
        raise DatasetLayoutError(f"COCO image list {image_list} is empty")
    coco = _read_json(annotations_json, store)
    try:
        by_name = {img["file_name"]: int(img["id"]) for img in coco["images"]}
        sizes = _coco_sizes(coco)
        boxes = coco_boxes(coco.get("annotations", []), include_crowd)
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed(annotations_json, exc) from None
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DatasetLayoutError(
            f"{len(unknown)} of {len(names)} names in {image_list} are not in {annotations_json} "
            f"(e.g. {', '.join(unknown[:_EXAMPLES_IN_WARNING])})"
        )
    samples = drop_bad_boxes([
        DiscoverySample(posixpath.splitext(n)[0], storage.join(root, n), boxes.get(by_name[n], []), sizes.get(by_name[n]))
        for n in names
    ], annotations_json)
    _warn_unmatched("COCO images without boxes", [s.image_id for s in samples if not s.boxes], image_list)
    return samples


def _coco_sizes(coco: dict) -> dict[int, tuple[int, int]]:
    return {int(img["id"]): (int(img["width"]), int(img["height"])) for img in coco["images"]
            if "width" in img and "height" in img}


@dataclasses.dataclass(frozen=True)
class CocoInstances:
    """A COCO instances JSON as read: its path, the folder of its images and its parsed content."""

    path: str
    image_dir: str
    data: dict


def read_coco(root: str, annotations_json: str | None = None, store: Storage | None = None) -> CocoInstances:
    """Find and read the instances JSON of a COCO layout (see ``coco_dataset``).

    Raises:
        DatasetLayoutError: no (or several) ``annotations/instances_*.json``, or one that is not a
            JSON object with an ``images`` list.
        FileNotFoundError: the given ``annotations_json`` does not exist.
    """
    store = store or Storage()
    if annotations_json is None:
        found = [f for f in store.list_files(storage.join(root, "annotations"), (".json",))
                 if posixpath.basename(f).startswith("instances_")] if store.exists(storage.join(root, "annotations")) else []
        if len(found) != 1:
            raise DatasetLayoutError(f"COCO root {root}: expected one annotations/instances_<split>.json, found "
                                     f"{[posixpath.basename(f) for f in found]}; set 'annotations'")
        annotations_json = found[0]
        split = posixpath.basename(annotations_json)[len("instances_"):-len(".json")]
        image_dir = storage.join(root, split)
    else:
        image_dir = root
    return CocoInstances(annotations_json, image_dir, _read_json(annotations_json, store))


def coco_dataset(
    root: str, annotations_json: str | None = None, store: Storage | None = None, include_crowd: bool = False
) -> list[DiscoverySample]:
    """Plain COCO instances: every image of an instances JSON, under ``root``, with its boxes.

    Layout (``coco-mini``, MS-COCO itself): ``root/<split>/<file_name>`` with
    ``root/annotations/instances_<split>.json``, or ``annotations_json`` given and the images
    in ``root`` itself.

    Args:
        root: folder holding the images, or the COCO root (with ``annotations/``).
        annotations_json: the instances JSON; ``None`` = the only ``annotations/instances_*.json``.
        store: storage handle (``dncut.storage.Storage``); ``None``: the environment's defaults.
        include_crowd: keep ``iscrowd=1`` boxes (default: dropped, as the peers).

    Returns:
        One sample per JSON image, in JSON order (``size`` = its ``width``/``height``).

    Raises:
        DatasetLayoutError: no (or several) instances JSON, a malformed one, or JSON images missing on disk.
    """
    store = store or Storage()
    return coco_samples(read_coco(root, annotations_json, store), store, include_crowd)


def coco_samples(instances: CocoInstances, store: Storage | None = None,
                 include_crowd: bool = False) -> list[DiscoverySample]:
    """The samples of an instances JSON already read (``coco_dataset``'s result and errors)."""
    store = store or Storage()
    coco, annotations_json, image_dir = instances.data, instances.path, instances.image_dir
    try:
        boxes, sizes = coco_boxes(coco.get("annotations", []), include_crowd), _coco_sizes(coco)
        samples = [DiscoverySample(posixpath.splitext(img["file_name"])[0], storage.join(image_dir, img["file_name"]),
                                   boxes.get(int(img["id"]), []), sizes.get(int(img["id"])))
                   for img in coco["images"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed(annotations_json, exc) from None
    present = set(store.list_files(image_dir, IMAGE_SUFFIXES)) if store.exists(image_dir) else set()
    samples = drop_bad_boxes(samples, annotations_json)
    missing = [smp.image_id for smp in samples if smp.image_uri not in present]
    if missing:
        raise DatasetLayoutError(f"{len(missing)} of {len(samples)} images of {annotations_json} are not in "
                                 f"{image_dir} (e.g. {', '.join(missing[:_EXAMPLES_IN_WARNING])})")
    _warn_unmatched("COCO images without a non-crowd box", [smp.image_id for smp in samples if not smp.boxes],
                    annotations_json)
    return samples
