"""Bad-input corpus: one generator per kind of bad (or awkward) input, written by code into a folder.

Nothing binary is committed: every file is made here with PIL / numpy / json / XML text. The
registry ``KINDS`` maps a kind name to a :class:`Kind` (category, generator, expected outcome);
the runners below put a category's kinds through the library and return one :class:`Outcome`
per kind, so that ``tests/test_bad_inputs.py`` asserts them (``from bench import corpus``) and ``bench/bad_inputs.py`` tables them.

Categories and what a generator writes (``folder`` is the category's root):

    image, mask   folder/images/<kind>.<ext> + folder/masks/<kind>.png (one folder pair for all of
                  them, the layout of ``dncut eval-saliency``); outcomes of ONE evaluation run
    annotation    folder/<kind>/... a VOC07 or COCO tree; returns the ``eval.datasets`` entry
    config        folder/<kind>.yaml (+ overrides), or an S3 source with its options / environment
    feature       folder/<kind>.npy, patch features (B, C, h, w) float32

Expected outcomes (``Kind.expect``), checked against what actually happened:

    "scored"                     every method's row is ``status=ok``
    "failed:<text>"              every row of the kind is ``status=failed`` with <text> in ``error``
    "ok" / "skip:<text>"         training path (``ViewMaker``): a view pair / an ``ok=False`` row
    "<ErrorClass>:<text>"        the call raised ErrorClass (or a subclass) with <text> in the message
    "warn:<text>"                loaded, with a logged warning holding <text> (a counted skip)
    "mixed:<text>"               features: some of the methods score, the others raise with <text>

Run as ``python bench/bad_inputs.py`` for the table (bench/results/bad_inputs.json + .md).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CATEGORIES = ("image", "mask", "annotation", "config", "feature")
SIDE = 64  # side of the corpus' ordinary images, px: the whole corpus evaluates in seconds
SCENE_SEED = 7  # the scene every mask-encoding kind shares (same image, same predictions)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of bad input.

    Attributes:
        name: registry key; also the file stem of image / mask kinds.
        category: one of ``CATEGORIES``.
        make: ``make(folder) -> Any`` writes the input under ``folder`` (see the module docstring).
        expect: expected outcome of the category's run (module docstring).
        train: image kinds: expected outcome on the training path (``ViewMaker``), else None.
        note: what the input is, for the table.
    """

    name: str
    category: str
    make: Callable[[Path], Any]
    expect: str
    note: str
    train: str | None = None


@dataclasses.dataclass
class Outcome:
    """What happened to one kind: ``outcome`` in the vocabulary of ``Kind.expect`` and the reason."""

    kind: str
    category: str
    outcome: str
    reason: str = ""
    seconds: float = 0.0

    def matches(self, expect: str) -> bool:
        """Whether this outcome is ``expect`` (``"<label>:<text>"``: same label, text in the reason)."""
        label, _, text = expect.partition(":")
        mine = self.outcome.partition(":")[0]
        if mine != label:
            return False
        return text.lower() in self.reason.lower()


KINDS: dict[str, Kind] = {}


def kind(category: str, expect: str, note: str, train: str | None = None):
    """Decorator: register ``make`` under its function name (without a leading ``make_``)."""

    def register(make: Callable[[Path], Any]) -> Callable[[Path], Any]:
        name = make.__name__.removeprefix("make_")
        KINDS[name] = Kind(name, category, make, expect, note, train)
        return make

    return register


def kinds_of(category: str) -> list[Kind]:
    return [k for k in KINDS.values() if k.category == category]


# =============================================================================== encoders
def encode(image: Image.Image | np.ndarray, fmt: str, **params: Any) -> bytes:
    """PIL image or array -> encoded bytes of ``fmt`` (PNG, JPEG, TIFF, WEBP, GIF, BMP)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **params)
    return buf.getvalue()


def scene(seed: int = SCENE_SEED, size: int = SIDE) -> tuple[Image.Image, np.ndarray]:
    """A generated scene (RGB image, (H, W) bool object mask) of ``dncut.data.scenes``."""
    from dncut.data.scenes import make_scene

    image, mask = make_scene(seed, size=size)
    return image, np.asarray(mask, bool)


def grey_mask(mask: np.ndarray) -> bytes:
    return encode((mask * 255).astype(np.uint8), "PNG")


def _put(folder: Path, name: str, image: bytes | None, ext: str, mask: bytes | None) -> None:
    """Write ``folder/images/<name><ext>`` and ``folder/masks/<name>.png`` (None: not written)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    if image is not None:
        (folder / "images" / f"{name}{ext}").write_bytes(image)
    if mask is not None:
        (folder / "masks" / f"{name}.png").write_bytes(mask)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width x height`` RGB pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def declared_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header is rewritten to declare ``width x height`` pixels."""
    data = bytearray(encode(scene()[0], "JPEG", quality=80))
    at = data.find(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# =============================================================================== images
# Every image kind comes with the mask of its own content (so a decodable image is scored).

@kind("image", "scored", "ordinary RGB JPEG (control)", train="ok")
def make_img_ok_jpeg(folder: Path) -> None:
    image, mask = scene(1)
    _put(folder, "img_ok_jpeg", encode(image, "JPEG", quality=90), ".jpg", grey_mask(mask))


@kind("image", "failed:cannot decode", "JPEG cut at half its length", train="skip:truncated")
def make_img_truncated(folder: Path) -> None:
    image, mask = scene(2)
    data = encode(image, "JPEG", quality=90)
    _put(folder, "img_truncated", data[: len(data) // 2], ".jpg", grey_mask(mask))


@kind("image", "failed:empty data (0 bytes)", "zero-byte .jpg", train="skip:empty data")
def make_img_zero_byte(folder: Path) -> None:
    _put(folder, "img_zero_byte", b"", ".jpg", grey_mask(scene(3)[1]))


@kind("image", "failed:not a valid image", "an HTML error page saved as .jpg", train="skip:not a valid image")
def make_img_html_named_jpg(folder: Path) -> None:
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    _put(folder, "img_html_named_jpg", html, ".jpg", grey_mask(scene(3)[1]))


@kind("image", "failed:not a valid image", "2 KB of random bytes named .png", train="skip:not a valid image")
def make_img_random_bytes(folder: Path) -> None:
    junk = np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    _put(folder, "img_random_bytes", junk, ".png", grey_mask(scene(3)[1]))


@kind("image", "scored", "CMYK JPEG", train="ok")
def make_img_cmyk(folder: Path) -> None:
    image, mask = scene(4)
    _put(folder, "img_cmyk", encode(image.convert("CMYK"), "JPEG", quality=90), ".jpg", grey_mask(mask))


@kind("image", "scored", "16-bit greyscale PNG (I;16)", train="ok")
def make_img_16bit(folder: Path) -> None:
    image, mask = scene(5)
    grey16 = np.asarray(image.convert("L"), np.uint16) * 257  # (H, W) uint16, full range
    _put(folder, "img_16bit", encode(Image.fromarray(grey16), "PNG"), ".png", grey_mask(mask))


@kind("image", "scored", "palette PNG with a transparent palette entry", train="ok")
def make_img_palette_transparency(folder: Path) -> None:
    image, mask = scene(6)
    pal = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    _put(folder, "img_palette_transparency", encode(pal, "PNG", transparency=0), ".png", grey_mask(mask))


@kind("image", "scored", "RGBA PNG, half-transparent background", train="ok")
def make_img_rgba(folder: Path) -> None:
    image, mask = scene(8)
    rgba = np.dstack([np.asarray(image), np.where(mask, 255, 128).astype(np.uint8)])  # (H, W, 4)
    _put(folder, "img_rgba", encode(rgba, "PNG"), ".png", grey_mask(mask))


@kind("image", "scored", "8-bit greyscale JPEG", train="ok")
def make_img_grey(folder: Path) -> None:
    image, mask = scene(9)
    _put(folder, "img_grey", encode(image.convert("L"), "JPEG", quality=90), ".jpg", grey_mask(mask))


@kind("image", "scored", "JPEG stored 64x48 with EXIF orientation 6 (shown 48x64); mask at the shown size",
      train="ok")
def make_img_exif_rotated(folder: Path) -> None:
    image, mask = scene(10)
    shown, shown_mask = image.crop((8, 0, 56, 64)), mask[:, 8:56]  # 48 x 64 (W x H) as a viewer shows it
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # 64 x 48; orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    _put(folder, "img_exif_rotated", encode(stored, "JPEG", quality=90, exif=exif.tobytes()), ".jpg",
         grey_mask(shown_mask))


@kind("image", "failed:smaller than one patch", "1x1 PNG", train="skip:smaller than min_size")
def make_img_1x1(folder: Path) -> None:
    _put(folder, "img_1x1", encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), ".png",
         encode(np.full((1, 1), 255, np.uint8), "PNG"))


@kind("image", "scored", "20,000 x 20 panorama (resized to a 1-patch-high grid)", train="skip:smaller than min_size")
def make_img_panorama(folder: Path) -> None:
    rng = np.random.default_rng(11)
    pano = rng.integers(0, 80, (20, 20_000, 3), dtype=np.uint8)  # (H, W, 3)
    mask = np.zeros((20, 20_000), bool)
    mask[:, 6_000:12_000] = True
    pano[mask] = (230, 200, 40)
    _put(folder, "img_panorama", encode(pano, "PNG"), ".png", grey_mask(mask))


@kind("image", "failed:no image named img_animated_gif", "3-frame animated .gif (not an image suffix) with a mask",
      train="ok")
def make_img_animated_gif(folder: Path) -> None:
    frames = [scene(12 + i)[0] for i in range(3)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _put(folder, "img_animated_gif", gif, ".gif", grey_mask(scene(12)[1]))


@kind("image", "scored", "LZW-compressed TIFF", train="ok")
def make_img_tiff(folder: Path) -> None:
    image, mask = scene(15)
    _put(folder, "img_tiff", encode(image, "TIFF", compression="tiff_lzw"), ".tif", grey_mask(mask))


@kind("image", "scored", "lossy WebP", train="ok")
def make_img_webp(folder: Path) -> None:
    image, mask = scene(16)
    _put(folder, "img_webp", encode(image, "WEBP", quality=80), ".webp", grey_mask(mask))


@kind("image", "scored", "PNG bytes named .jpg", train="ok")
def make_img_png_named_jpg(folder: Path) -> None:
    image, mask = scene(17)
    _put(folder, "img_png_named_jpg", encode(image, "PNG"), ".jpg", grey_mask(mask))


@kind("image", "scored", "upper-case suffix .JPEG", train="ok")
def make_img_upper_suffix(folder: Path) -> None:
    image, mask = scene(18)
    _put(folder, "img_upper_suffix", encode(image, "JPEG", quality=90), ".JPEG", grey_mask(mask))


@kind("image", "failed:DecompressionBomb", "60-byte PNG declaring 60,000 x 60,000 pixels",
      train="skip:DecompressionBomb")
def make_img_bomb_png(folder: Path) -> None:
    _put(folder, "img_bomb_png", declared_png(60_000, 60_000), ".png", grey_mask(scene(19)[1]))


@kind("image", "failed:DecompressionBomb", "small JPEG whose header declares 65,000 x 65,000 pixels",
      train="skip:DecompressionBomb")
def make_img_bomb_jpeg(folder: Path) -> None:
    _put(folder, "img_bomb_jpeg", declared_jpeg(65_000, 65_000), ".jpg", grey_mask(scene(19)[1]))


# =============================================================================== masks
# Every mask kind pairs the SAME image (scene SCENE_SEED) with its mask in another encoding, so the
# scored encodings must give identical scores.

def _mask_kind(folder: Path, name: str, mask: bytes | None, with_image: bool = True) -> None:
    image, _ = scene()
    _put(folder, name, encode(image, "JPEG", quality=90) if with_image else None, ".jpg", mask)


@kind("mask", "scored", "grey PNG 0/255 (control)")
def make_mask_grey_0_255(folder: Path) -> None:
    _mask_kind(folder, "mask_grey_0_255", grey_mask(scene()[1]))


@kind("mask", "scored", "grey PNG with labels 0/1")
def make_mask_grey_0_1(folder: Path) -> None:
    _mask_kind(folder, "mask_grey_0_1", encode(scene()[1].astype(np.uint8), "PNG"))


@kind("mask", "scored", "16-bit PNG 0/65535")
def make_mask_16bit(folder: Path) -> None:
    _mask_kind(folder, "mask_16bit", encode(Image.fromarray(scene()[1].astype(np.uint16) * 65535), "PNG"))


@kind("mask", "scored", "RGB class colour (128, 0, 0) on black (VOC / DAVIS label 1)")
def make_mask_rgb_class_colour(folder: Path) -> None:
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    rgb[scene()[1]] = (128, 0, 0)
    _mask_kind(folder, "mask_rgb_class_colour", encode(rgb, "PNG"))


@kind("mask", "scored", "palette PNG, VOC palette (index 1 = (128, 0, 0))")
def make_mask_palette(folder: Path) -> None:
    pal = Image.fromarray(scene()[1].astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
    _mask_kind(folder, "mask_palette", encode(pal, "PNG"))


@kind("mask", "scored", "1-bit PNG")
def make_mask_1bit(folder: Path) -> None:
    _mask_kind(folder, "mask_1bit", encode(Image.fromarray(scene()[1]).convert("1"), "PNG"))


@kind("mask", "scored", "JPEG-compressed 0/255 mask (non-binary values near the edges)")
def make_mask_jpeg_nonbinary(folder: Path) -> None:
    _mask_kind(folder, "mask_jpeg_nonbinary", None)
    (folder / "masks" / "mask_jpeg_nonbinary.jpg").write_bytes(
        encode((scene()[1] * 255).astype(np.uint8), "JPEG", quality=60))


def voc_void_labels() -> tuple[np.ndarray, np.ndarray]:
    """The scene mask as VOC SegmentationClassAug labels: class 15 (person) on the object and a
    2-pixel void ring (255) just outside it; returns (labels (SIDE, SIDE) uint8, ring (SIDE, SIDE) bool)."""
    from scipy.ndimage import binary_dilation

    fg = scene()[1]
    ring = binary_dilation(fg, iterations=2) & ~fg
    labels = np.where(fg, 15, 0).astype(np.uint8)
    labels[ring] = 255
    return labels, ring


@kind("mask", "scored", "grey label PNG (VOC SegmentationClassAug): class 15 on the object, a 255 void ring")
def make_mask_grey_voc_void(folder: Path) -> None:
    _mask_kind(folder, "mask_grey_voc_void", encode(Image.fromarray(voc_void_labels()[0], mode="L"), "PNG"))


@kind("mask", "scored", "palette PNG of the same labels (VOC palette: 15 = (192, 128, 128), 255 = void colour)")
def make_mask_palette_voc_void(folder: Path) -> None:
    pal = Image.fromarray(voc_void_labels()[0], mode="P")
    colours = [0] * 768
    colours[15 * 3:16 * 3], colours[255 * 3:] = (192, 128, 128), (224, 224, 192)
    pal.putpalette(colours)
    _mask_kind(folder, "mask_palette_voc_void", encode(pal, "PNG"))


@kind("mask", "failed:differs from image size", "mask 50x40 for a 64x64 image")
def make_mask_wrong_size(folder: Path) -> None:
    _mask_kind(folder, "mask_wrong_size", grey_mask(np.ones((40, 50), bool)))


@kind("mask", "failed:no foreground pixel", "all-zero mask")
def make_mask_empty(folder: Path) -> None:
    _mask_kind(folder, "mask_empty", grey_mask(np.zeros((SIDE, SIDE), bool)))


@kind("mask", "failed:cannot decode", "random bytes as .png mask")
def make_mask_corrupt(folder: Path) -> None:
    _mask_kind(folder, "mask_corrupt", np.random.default_rng(6).integers(0, 256, 900, dtype=np.uint8).tobytes())


@kind("mask", "failed:no mask named mask_missing", "image without a mask")
def make_mask_missing(folder: Path) -> None:
    _mask_kind(folder, "mask_missing", None)


@kind("mask", "failed:no image named mask_without_image", "mask without an image")
def make_mask_without_image(folder: Path) -> None:
    _mask_kind(folder, "mask_without_image", grey_mask(scene()[1]), with_image=False)


# =============================================================================== annotations
# Each kind writes a small VOC07 or COCO tree under folder/<kind> and returns its eval.datasets entry.
# The images are 64x64 scenes with one object box each (from the scene mask).

def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def voc_tree(root: Path, objects: dict[str, str] | None = None, n: int = 2, xml: dict[str, str] | None = None,
             drop_jpeg: str | None = None) -> dict:
    """VOC07 tree with ``n`` images ``00000<i>``; ``objects[id]``: replaces that image's <object>
    XML; ``xml[id]``: replaces its whole annotation text; ``drop_jpeg``: that image not written."""
    base = root / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n)]
    (base / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    for i, image_id in enumerate(ids):
        image, mask = scene(30 + i)
        if image_id != drop_jpeg:
            (base / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode(image, "JPEG", quality=90))
        x0, y0, x1, y1 = _box(mask)
        obj = (objects or {}).get(image_id, f"<object><name>thing</name><bndbox><xmin>{x0 + 1:g}</xmin>"
                                            f"<ymin>{y0 + 1:g}</ymin><xmax>{x1:g}</xmax><ymax>{y1:g}</ymax>"
                                            "</bndbox></object>")
        text = (xml or {}).get(image_id, f"<annotation><filename>{image_id}.jpg</filename><size><width>{SIDE}"
                                         f"</width><height>{SIDE}</height><depth>3</depth></size>{obj}</annotation>")
        if text is not None:
            (base / "Annotations" / f"{image_id}.xml").write_text(text)
    return {"name": root.name, "kind": "voc07", "root": str(root)}


def coco_tree(root: Path, *, n: int = 2, boxes: dict[int, list] | None = None, text: str | None = None,
              drop_file: int | None = None, size: dict[int, tuple[int, int]] | None = None) -> dict:
    """COCO tree ``root/val/*.jpg`` + ``root/annotations/instances_val.json``; ``boxes[id]``: that
    image's bbox list; ``text``: replaces the JSON text; ``drop_file``: that image not written;
    ``size[id]``: the (width, height) the JSON declares."""
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        image, mask = scene(40 + i)
        name = f"{i:012d}.jpg"
        if i != drop_file:
            (root / "val" / name).write_bytes(encode(image, "JPEG", quality=90))
        w, h = (size or {}).get(i, (SIDE, SIDE))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        x0, y0, x1, y1 = _box(mask)
        for k, bbox in enumerate((boxes or {}).get(i, [[x0, y0, x1 - x0, y1 - y0]])):
            anns.append({"id": 100 * i + k, "image_id": i, "bbox": bbox, "category_id": 1, "iscrowd": 0,
                         "area": float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val.json").write_text(text if text is not None else json.dumps(coco))
    return {"name": root.name, "kind": "coco", "root": str(root)}


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of an (H, W) bool mask (as BlenderProc writes them): run
    lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.int8)  # column-major
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def coco_segmentation_tree(root: Path, names: tuple[str, str], segmentation: str = "polygon",
                           rle_size: list[int] | None = None) -> dict:
    """A ``task: segmentation`` COCO tree of two scenes, one object each (the scene mask) of
    category ``names[i]``, its segmentation stored as ``"polygon"`` (its box), ``"rle"`` (image 0
    compressed, image 1 uncompressed) ; ``rle_size``: the [H, W] the RLE declares."""
    from pycocotools import mask as mask_util

    spec = coco_tree(root)
    path = root / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    for i, ann in enumerate(coco["annotations"]):
        mask = scene(40 + i)[1]
        x0, y0, x1, y1 = _box(mask)
        ann["category_id"] = ann["image_id"] + 1
        if segmentation == "polygon":
            ann["segmentation"] = [[x0, y0, x1 - 1, y0, x1 - 1, y1 - 1, x0, y1 - 1]]
        elif i == 0:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["segmentation"] = {"size": rle_size or [SIDE, SIDE], "counts": rle["counts"].decode("ascii")}
        else:
            ann["segmentation"] = {"size": rle_size or [SIDE, SIDE], "counts": uncompressed_rle(mask)}
    path.write_text(json.dumps(coco))
    return {**spec, "root": str(root / "val"), "task": "segmentation", "annotations": str(path)}


@kind("annotation", "scored", "VOC07 tree, two images with one box each (control)")
def make_voc_ok(folder: Path) -> dict:
    return voc_tree(folder / "voc_ok")


@kind("annotation", "DatasetLayoutError:000001.xml", "VOC annotation that is not well-formed XML")
def make_voc_malformed_xml(folder: Path) -> dict:
    return voc_tree(folder / "voc_malformed_xml", xml={"000001": "<annotation><object><bndbox><xmin>3</xmin"})


@kind("annotation", "DatasetLayoutError:lacks one of xmin", "VOC <bndbox> without <ymax>")
def make_voc_incomplete_box(folder: Path) -> dict:
    obj = "<object><name>a</name><bndbox><xmin>3</xmin><ymin>3</ymin><xmax>9</xmax></bndbox></object>"
    return voc_tree(folder / "voc_incomplete_box", objects={"000001": obj})


@kind("annotation", "DatasetLayoutError:000001.xml", "VOC coordinate that is not a number")
def make_voc_non_numeric(folder: Path) -> dict:
    obj = "<object><name>a</name><bndbox><xmin>three</xmin><ymin>3</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    return voc_tree(folder / "voc_non_numeric", objects={"000001": obj})


@kind("annotation", "DatasetLayoutError:have no Annotations", "VOC id listed without its XML file")
def make_voc_missing_xml(folder: Path) -> dict:
    return voc_tree(folder / "voc_missing_xml", xml={"000001": None})


@kind("annotation", "DatasetLayoutError:have no JPEGImages", "VOC id listed without its JPEG")
def make_voc_missing_jpeg(folder: Path) -> dict:
    return voc_tree(folder / "voc_missing_jpeg", drop_jpeg="000001")


@kind("annotation", "warn:outside the image", "VOC box entirely outside the 64x64 image (its only box): dropped, "
      "then the image is a failed row")
def make_voc_box_outside(folder: Path) -> dict:
    obj = ("<object><name>a</name><bndbox><xmin>100</xmin><ymin>90</ymin><xmax>140</xmax><ymax>120</ymax>"
           "</bndbox></object>")
    return voc_tree(folder / "voc_box_outside", objects={"000001": obj})


@kind("annotation", "warn:zero or negative area", "VOC box with xmax < xmin beside a good box: dropped")
def make_voc_zero_area(folder: Path) -> dict:
    _, mask = scene(31)
    x0, y0, x1, y1 = _box(mask)
    good = (f"<object><name>a</name><bndbox><xmin>{x0 + 1:g}</xmin><ymin>{y0 + 1:g}</ymin><xmax>{x1:g}</xmax>"
            f"<ymax>{y1:g}</ymax></bndbox></object>")
    bad = "<object><name>b</name><bndbox><xmin>20</xmin><ymin>5</ymin><xmax>10</xmax><ymax>30</ymax></bndbox></object>"
    return voc_tree(folder / "voc_zero_area", objects={"000001": good + bad})


@kind("annotation", "failed:the annotation declares", "VOC <size> 80x64 for a 64x64 JPEG")
def make_voc_size_mismatch(folder: Path) -> dict:
    _, mask = scene(31)
    x0, y0, x1, y1 = _box(mask)
    text = (f"<annotation><size><width>80</width><height>64</height></size><object><name>a</name><bndbox>"
            f"<xmin>{x0 + 1:g}</xmin><ymin>{y0 + 1:g}</ymin><xmax>{x1:g}</xmax><ymax>{y1:g}</ymax></bndbox>"
            "</object></annotation>")
    return voc_tree(folder / "voc_size_mismatch", xml={"000001": text})


@kind("annotation", "scored", "COCO segmentation tree whose categories have VOC's spelling (aeroplane, tvmonitor)")
def make_coco_seg_voc_names(folder: Path) -> dict:
    return coco_segmentation_tree(folder / "coco_seg_voc_names", ("aeroplane", "tvmonitor"))


@kind("annotation", "scored", "COCO segmentation tree, non-crowd objects as RLE (compressed and uncompressed)")
def make_coco_seg_rle(folder: Path) -> dict:
    return coco_segmentation_tree(folder / "coco_seg_rle", ("cat", "cat"), "rle")


@kind("annotation", "warn:map to no PASCAL VOC class", "COCO segmentation tree with a category outside the 20 "
      "VOC classes (toaster): ignored in the class maps, counted in one warning")
def make_coco_seg_unmapped(folder: Path) -> dict:
    return coco_segmentation_tree(folder / "coco_seg_unmapped", ("cat", "toaster"))


@kind("annotation", "failed:differs from the image", "COCO RLE whose size is not the image's")
def make_coco_seg_rle_wrong_size(folder: Path) -> dict:
    return coco_segmentation_tree(folder / "coco_seg_rle_wrong_size", ("cat", "cat"), "rle", rle_size=[32, 32])


@kind("annotation", "scored", "COCO tree, two images with one box each (control)")
def make_coco_ok(folder: Path) -> dict:
    return coco_tree(folder / "coco_ok")


@kind("annotation", "DatasetLayoutError:instances_val.json", "COCO instances JSON cut in the middle")
def make_coco_malformed_json(folder: Path) -> dict:
    spec = coco_tree(folder / "coco_malformed_json")
    path = folder / "coco_malformed_json" / "annotations" / "instances_val.json"
    path.write_text(path.read_text()[:40])
    return spec


@kind("annotation", "DatasetLayoutError:file_name", "COCO image entry without file_name")
def make_coco_missing_key(folder: Path) -> dict:
    spec = coco_tree(folder / "coco_missing_key")
    path = folder / "coco_missing_key" / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    del coco["images"][1]["file_name"]
    path.write_text(json.dumps(coco))
    return spec


@kind("annotation", "DatasetLayoutError:bbox", "COCO bbox with 3 numbers")
def make_coco_bad_bbox(folder: Path) -> dict:
    return coco_tree(folder / "coco_bad_bbox", boxes={1: [[4.0, 4.0, 10.0]]})


@kind("annotation", "warn:zero or negative area", "COCO bbox of width 0 (its only box): dropped, then the image "
      "is a failed row")
def make_coco_zero_area(folder: Path) -> dict:
    return coco_tree(folder / "coco_zero_area", boxes={1: [[10.0, 10.0, 0.0, 20.0]]})


@kind("annotation", "warn:outside the image", "COCO bbox starting right of the image: dropped")
def make_coco_box_outside(folder: Path) -> dict:
    return coco_tree(folder / "coco_box_outside", boxes={1: [[70.0, 10.0, 20.0, 20.0], [10.0, 10.0, 30.0, 30.0]]})


@kind("annotation", "DatasetLayoutError:are not in", "COCO image listed in the JSON, file missing")
def make_coco_missing_image(folder: Path) -> dict:
    return coco_tree(folder / "coco_missing_image", drop_file=1)


@kind("annotation", "failed:the annotation declares", "COCO width/height 64x100 for a 64x64 image")
def make_coco_size_mismatch(folder: Path) -> dict:
    return coco_tree(folder / "coco_size_mismatch", size={1: (SIDE, 100)})


# =============================================================================== configs
# Each kind returns {"path", "overrides"} for load_config, or {"source", "endpoint", "env"} for
# dncut.storage.check_source ("endpoint": "server" = the moto server, "closed" = a port nobody serves).

def _yaml(folder: Path, name: str, text: str, overrides: list[str] | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return {"path": str(path), "overrides": overrides or []}


@kind("config", "ConfigError:did you mean 'backbone'", "unknown key model.backbon")
def make_cfg_unknown_key(folder: Path) -> dict:
    return _yaml(folder, "cfg_unknown_key", "model:\n  backbon: vit_tiny_test\n")


@kind("config", "ConfigError:train.batch_size", "train.batch_size: 'thirty-two'")
def make_cfg_wrong_type(folder: Path) -> dict:
    return _yaml(folder, "cfg_wrong_type", "train:\n  batch_size: thirty-two\n")


@kind("config", "ConfigError:ncut.tau", "ncut.tau: .nan (no bound on tau: NaN would pass a range check)")
def make_cfg_nan(folder: Path) -> dict:
    return _yaml(folder, "cfg_nan", "ncut:\n  tau: .nan\n")


@kind("config", "ConfigError:train.lr", "train.lr: .inf (passes lr > 0)")
def make_cfg_inf(folder: Path) -> dict:
    return _yaml(folder, "cfg_inf", "train:\n  lr: .inf\n")


@kind("config", "ConfigError:loss.alpha", "--set loss.alpha=-.inf")
def make_cfg_inf_override(folder: Path) -> dict:
    return _yaml(folder, "cfg_inf_override", "", ["loss.alpha=-.inf"])


@kind("config", "ConfigError:data.crop_size", "data.crop_size: -64")
def make_cfg_negative_size(folder: Path) -> dict:
    return _yaml(folder, "cfg_negative_size", "data:\n  crop_size: -64\n")


@kind("config", "ConfigError:eval.image_size", "--set eval.image_size=0")
def make_cfg_zero_image_size(folder: Path) -> dict:
    return _yaml(folder, "cfg_zero_image_size", "", ["eval.image_size=0"])


@kind("config", "ConfigError:top level must be a mapping", "a YAML list instead of sections")
def make_cfg_not_mapping(folder: Path) -> dict:
    return _yaml(folder, "cfg_not_mapping", "- model\n- train\n")


@kind("config", "ConfigError:invalid YAML", "YAML with an unclosed bracket")
def make_cfg_bad_yaml(folder: Path) -> dict:
    return _yaml(folder, "cfg_bad_yaml", "train: {batch_size: 4\n")


@kind("config", "ConfigError:storage.aws_secret_access_key: unknown key", "a credential in the config "
      "(storage.aws_secret_access_key): refused, its value never echoed")
def make_cfg_credential_key(folder: Path) -> dict:
    return _yaml(folder, "cfg_credential_key", "storage:\n  aws_secret_access_key: cfgSecretValue/NOT-ECHOED\n")


@kind("config", "StorageError:cannot reach the S3 endpoint", "s3:// source on an endpoint nobody listens on")
def make_src_unreachable(folder: Path) -> dict:
    return {"source": "s3://dncut-corpus-bucket/train", "endpoint": "closed", "env": {}}


@kind("config", "StorageError:does not exist", "s3:// source in a bucket that does not exist")
def make_src_missing_bucket(folder: Path) -> dict:
    return {"source": "s3://dncut-no-such-bucket/train", "endpoint": "server", "env": {}}


@kind("config", "StorageError:no AWS credentials", "s3:// source with no credentials anywhere")
def make_src_no_credentials(folder: Path) -> dict:
    return {"source": "s3://dncut-corpus-bucket/train", "endpoint": "server",
            "env": {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}}


@kind("config", "StorageError:unsupported URI scheme", "gs:// source")
def make_src_bad_scheme(folder: Path) -> dict:
    return {"source": "gs://bucket/train", "endpoint": "server", "env": {}}


@kind("config", "StorageError:does not exist", "local folder that does not exist")
def make_src_missing_folder(folder: Path) -> dict:
    return {"source": str(folder / "no_such_folder"), "endpoint": "server", "env": {}}


@kind("config", "StorageError:none ends with one of", "local folder holding only .txt files")
def make_src_no_images(folder: Path) -> dict:
    (folder / "src_no_images").mkdir(parents=True, exist_ok=True)
    (folder / "src_no_images" / "readme.txt").write_text("no images here\n")
    return {"source": str(folder / "src_no_images"), "endpoint": "server", "env": {}}


# =============================================================================== features
# (B, C, h, w) float32 patch features, as a backbone would give them; saved as .npy.

def _features(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    np.save(path, array.astype(np.float32))
    return path


def _random_features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, 8, 8)).astype(np.float32)  # (1, C, h, w)


@kind("feature", "scored", "random features (control)")
def make_feat_random(folder: Path) -> Path:
    return _features(folder, "feat_random", _random_features())


@kind("feature", "NonFiniteFeaturesError:NaN/Inf", "one NaN entry")
def make_feat_nan(folder: Path) -> Path:
    f = _random_features()
    f[0, 3, 2, 5] = np.nan
    return _features(folder, "feat_nan", f)


@kind("feature", "NonFiniteFeaturesError:NaN/Inf", "one +inf entry")
def make_feat_inf(folder: Path) -> Path:
    f = _random_features()
    f[0, 0, 0, 0] = np.inf
    return _features(folder, "feat_inf", f)


@kind("feature", "ValueError:the same for every patch", "every patch has the same feature vector")
def make_feat_constant(folder: Path) -> Path:
    return _features(folder, "feat_constant", np.broadcast_to(_random_features()[:, :, :1, :1], (1, 16, 8, 8)))


@kind("feature", "ValueError:the same for every patch", "all-zero features")
def make_feat_zero(folder: Path) -> Path:
    return _features(folder, "feat_zero", np.zeros((1, 16, 8, 8), np.float32))


@kind("feature", "ValueError:the same for every patch", "one vector scaled per patch (constant after L2 normalisation)")
def make_feat_scaled_constant(folder: Path) -> Path:
    scale = np.random.default_rng(2).uniform(0.5, 2.0, (1, 1, 8, 8))
    return _features(folder, "feat_scaled_constant", _random_features()[:, :, :1, :1] * scale)


def _two_vectors(cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit feature vectors (C,) = (16,) with the given cosine similarity."""
    a, b = _random_features(3)[0, :, 0, 0].astype(np.float64), _random_features(4)[0, :, 0, 0].astype(np.float64)
    a /= np.linalg.norm(a)
    b -= (b @ a) * a
    b /= np.linalg.norm(b)
    return a, cosine * a + np.sqrt(1 - cosine ** 2) * b


def _left_right(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    f = np.empty((1, a.size, 8, 8), np.float32)  # (1, C, h, w): a on the 3 left columns, b on the 5 right
    f[0, :, :, :3] = a[:, None, None]
    f[0, :, :, 3:] = b[:, None, None]
    return f


@kind("feature", "scored", "two orthogonal vectors, each duplicated over one side of the grid (left 3 / right 5 "
      "columns): both methods must cut exactly there")
def make_feat_duplicated_rows(folder: Path) -> Path:
    return _features(folder, "feat_duplicated_rows", _left_right(*_two_vectors(0.0)))


@kind("feature", "mixed:the binary graph is complete", "two vectors of cosine 0.5 (left / right): Simple cuts "
      "them apart; TokenCut's binary graph (tau 0.2) links every pair, so it has no cut and must refuse")
def make_feat_tokencut_complete(folder: Path) -> Path:
    return _features(folder, "feat_tokencut_complete", _left_right(*_two_vectors(0.5)))


@kind("feature", "scored", "the same image twice in one batch (duplicated batch items)")
def make_feat_duplicated_items(folder: Path) -> Path:
    return _features(folder, "feat_duplicated_items", np.concatenate([_random_features(5)] * 2))


# =============================================================================== runners
def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _raised(exc: BaseException) -> str:
    """Outcome label of an exception: its class name (the registry names the class expected)."""
    return type(exc).__name__


def write_images_and_masks(root: Path) -> list[Kind]:
    """Every image and mask kind under ``root/{images, masks}``; returns those kinds."""
    kinds = kinds_of("image") + kinds_of("mask")
    for k in kinds:
        k.make(root)
    return kinds


def outcomes_from_rows(rows: list[dict], kinds: list[Kind]) -> dict[str, Outcome]:
    """Per-image rows (``per_image.parquet``) -> one outcome per kind: "scored" when all of its rows
    are ok, "failed" when all failed (reason = the error), "mixed" otherwise, "missing" without rows."""
    out = {}
    for k in kinds:
        mine = [r for r in rows if r["image_id"] == k.name]
        status = {r["status"] for r in mine}
        if not mine:
            out[k.name] = Outcome(k.name, k.category, "missing", "no row in per_image.parquet")
        elif status == {"ok"}:
            iou = ", ".join(f"{r['method']} IoU {r['iou']:.3f}" for r in mine)
            out[k.name] = Outcome(k.name, k.category, "scored", iou)
        elif status == {"failed"}:
            out[k.name] = Outcome(k.name, k.category, "failed", mine[0]["error"])
        else:
            out[k.name] = Outcome(k.name, k.category, "mixed", "; ".join(f"{r['method']}: {r['status']} {r['error']}"
                                                                          for r in mine))
    return out


def run_view_maker(root: Path, kinds: list[Kind], cfg=None) -> dict[str, Outcome]:
    """Each image kind through the training data path (``ViewMaker`` on one row, no Ray)."""
    from dncut.config import load_config
    from dncut.data.pipeline import ViewMaker, decode_failure, file_key

    cfg = cfg or load_config("configs/train/smoke.yaml")
    maker = ViewMaker(cfg)
    out = {}
    for k in kinds:
        (uri,) = [str(p) for p in (root / "images").iterdir() if p.stem == k.name]
        start = time.perf_counter()
        row = maker({"uri": uri, "epoch": 0, "key": file_key(uri)})
        took = time.perf_counter() - start
        if row["ok"]:
            out[k.name] = Outcome(k.name, k.category, "ok", f"views {tuple(row['view1'].shape)}", took)
        else:
            failed_uri, reason = decode_failure(row["failure"])
            assert failed_uri == uri, (failed_uri, uri)
            out[k.name] = Outcome(k.name, k.category, "skip", reason, took)
    return out


class _StageRunner:
    """The evaluation job's three stage functions in this process (as ``dncut.eval.validate``),
    with a tiny colour backbone: ``load_record -> predict_batch -> score_row``."""

    def __init__(self) -> None:
        import torch

        from dncut.backbone_specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
        from dncut.eval.predict import Predictor

        spec = BackboneSpec("colour", "vit", "colour", "mean colour per 8x8 patch", 8, 3, IMAGENET_MEAN,
                            IMAGENET_STD, False, "")

        class Colour(torch.nn.Module):
            def forward(self, images):  # (B, 3, H, W) uint8 -> (B, 3, H/8, W/8)
                x = images.float() / 255
                mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
                return torch.nn.functional.avg_pool2d((x - mean) / std, 8)

        backbone = Colour()
        backbone.spec = spec
        self.spec = spec
        self.predictor = Predictor(backbone, ["simple", "tokencut"], "eigh")

    def rows(self, records: list[dict], discovery: bool) -> list[dict]:
        from dncut.eval.stages import load_record, predict_batch, score_row

        stage1 = [load_record(r, spec=self.spec, image_size=None if discovery else SIDE) for r in records]
        batch = {key: [r[key] for r in stage1] for key in stage1[0]}
        stage2 = predict_batch(self.predictor, batch)
        rows = []
        for i in range(len(stage1)):
            row = {key: value[i] for key, value in stage2.items()}
            rows += score_row(row, methods=["simple", "tokencut"], bilateral=False, discovery=discovery)
        return rows


def run_annotations(folder: Path, kinds: list[Kind] | None = None) -> dict[str, Outcome]:
    """Each annotation kind: ``dataset_records`` (the dataset readers) then, if it loads, the three
    stages in process (``task: segmentation``: ``segmentation_records`` then ``load_segmentation_record``,
    rows with ``labels``); warnings of ``dncut.data`` are captured."""
    from dncut.config import EvalDataset
    from dncut.eval.stages import DISCOVERY_KINDS, dataset_records, load_segmentation_record, segmentation_records

    runner = _StageRunner()
    out = {}
    for k in kinds or kinds_of("annotation"):
        spec = EvalDataset.model_validate(k.make(folder))
        start = time.perf_counter()
        with _captured("dncut.data") as warnings:  # dncut.data.datasets, dncut.data.class_maps
            try:
                records = segmentation_records(spec) if spec.task == "segmentation" else dataset_records(spec)
            except Exception as exc:  # noqa: BLE001 - the outcome is the error
                out[k.name] = Outcome(k.name, k.category, _raised(exc), _reason(exc), time.perf_counter() - start)
                continue
        if spec.task == "segmentation":
            rows = [load_segmentation_record(r, image_size=SIDE) for r in records]
        else:
            rows = runner.rows(records, discovery=spec.kind in DISCOVERY_KINDS)
        failed = [r for r in rows if r["status"] != "ok"]
        detail = "; ".join(sorted({f"{r['image_id']}: {r['error']}" for r in failed}))
        if warnings:
            outcome, reason = "warn", " | ".join(warnings) + (f" || failed rows: {detail}" if detail else "")
        elif failed:
            outcome, reason = "failed", detail
        else:
            outcome, reason = "scored", f"{len(rows)} rows ok"
        out[k.name] = Outcome(k.name, k.category, outcome, reason, time.perf_counter() - start)
        out[k.name].rows = rows  # type: ignore[attr-defined]
        out[k.name].n_records = len(records)  # type: ignore[attr-defined]
    return out


class _captured:
    """Context manager: the WARNING messages of one logger, as a list."""

    def __init__(self, name: str) -> None:
        self.logger, self.messages = logging.getLogger(name), []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                outer.messages.append(record.getMessage())

        self.handler = Handler(logging.WARNING)

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)


def run_configs(folder: Path, endpoint_url: str, closed_url: str, kinds: list[Kind] | None = None,
                setenv: Callable[[str, str | None], None] | None = None) -> dict[str, Outcome]:
    """Each config kind: ``load_config`` (YAML kinds) or ``check_source`` (source kinds) against
    ``endpoint_url`` (a live S3 endpoint) / ``closed_url`` (nothing listens). ``setenv(name, value)``
    sets (None: removes) an environment variable for the rest of the run (e.g. pytest's monkeypatch);
    the caller restores the environment."""
    import os

    from dncut import storage
    from dncut.config import load_config

    out = {}
    for k in kinds or kinds_of("config"):
        spec = k.make(folder)
        start = time.perf_counter()
        saved = {}
        try:
            if "path" in spec:
                cfg = load_config(spec["path"], spec["overrides"])
                outcome, reason = "loaded", cfg.to_yaml()[:80]
            else:
                for name, value in spec["env"].items():
                    saved[name] = os.environ.get(name)
                    _set(name, value, setenv)
                url = endpoint_url if spec["endpoint"] == "server" else closed_url
                files = storage.check_source(spec["source"], storage.S3Options(endpoint_url=url))
                outcome, reason = "listed", f"{len(files)} files"
        except Exception as exc:  # noqa: BLE001 - the outcome is the error
            outcome, reason = _raised(exc), _reason(exc)
        finally:
            for name, value in saved.items():
                _set(name, value, setenv)
        out[k.name] = Outcome(k.name, k.category, outcome, reason, time.perf_counter() - start)
    return out


def _set(name: str, value: str | None, setenv: Callable[[str, str | None], None] | None) -> None:
    import os

    if setenv is not None:
        setenv(name, value)
    elif value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_features(folder: Path, solver: str = "lobpcg", kinds: list[Kind] | None = None) -> dict[str, Outcome]:
    """Each feature kind through ``simple_ncut``, ``tokencut`` and ``ncut_maps``: "scored" when all
    three return masks, else the first error (all three must raise the same class)."""
    import torch

    from dncut.eval.methods import ncut_maps, simple_ncut, tokencut

    out = {}
    for k in kinds or kinds_of("feature"):
        features = torch.from_numpy(np.load(k.make(folder)))  # (B, C, h, w)
        start = time.perf_counter()
        results: list[Any] = []
        for fn in (lambda f: simple_ncut(f, solver=solver)[1],
                   lambda f: tokencut(f, solver=solver).masks,
                   lambda f: ncut_maps(list(f), ["simple", "tokencut"], solver=solver)):
            try:
                results.append(fn(features))
            except Exception as exc:  # noqa: BLE001 - the outcome is the error
                results.append(exc)
        errors = [r for r in results if isinstance(r, Exception)]
        if not errors:
            simple = results[0]
            out[k.name] = Outcome(k.name, k.category, "scored",
                                  f"simple foreground {int(simple[0].sum())} of {simple[0].numel()} patches")
        elif len(errors) == len(results) and len({type(e) for e in errors}) == 1:
            out[k.name] = Outcome(k.name, k.category, _raised(errors[0]), _reason(errors[0]))
        else:
            out[k.name] = Outcome(k.name, k.category, "mixed", " | ".join(
                _reason(r) if isinstance(r, Exception) else "ok" for r in results))
        out[k.name].seconds = time.perf_counter() - start
        out[k.name].results = results  # type: ignore[attr-defined]
    return out


def raised_matches(outcome: Outcome, expect: str) -> bool:
    """``expect = "<ErrorClass>:<text>"``: the raised class is ErrorClass or a subclass of it."""
    import builtins

    from dncut import storage
    from dncut.config import ConfigError
    from dncut.data.datasets import DatasetLayoutError
    from dncut.ncut import NonFiniteFeaturesError

    label, _, text = expect.partition(":")
    known = {"ConfigError": ConfigError, "StorageError": storage.StorageError,
             "DatasetLayoutError": DatasetLayoutError, "NonFiniteFeaturesError": NonFiniteFeaturesError}
    wanted = known.get(label) or getattr(builtins, label, None)
    if wanted is None or not (isinstance(wanted, type) and issubclass(wanted, BaseException)):
        return outcome.matches(expect)
    raised = {**known, **{n: getattr(builtins, n) for n in dir(builtins)}}.get(outcome.outcome)
    if raised is None:  # a class this module does not know: compare names only
        return outcome.matches(expect)
    return issubclass(raised, wanted) and text.lower() in outcome.reason.lower()


def check(outcome: Outcome, expect: str) -> bool:
    """Whether ``outcome`` is what ``expect`` says (exception labels: the class or a subclass)."""
    label = expect.partition(":")[0]
    if label in ("scored", "failed", "ok", "skip", "warn", "loaded", "listed", "mixed"):
        return outcome.matches(expect)
    return raised_matches(outcome, expect)
