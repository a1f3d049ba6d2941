"""Robust image and mask decoding from raw bytes.

``decode_image``: bytes -> PIL RGB image (H, W, 3) uint8, whatever the file's mode:

- ``L`` / ``1`` grayscale: replicated to three channels.
- ``I;16*`` 16-bit grayscale: scaled to 8 bit by ``round(v / 257)`` (65535 -> 255).
  ``I`` (32-bit int, what some readers give for 16-bit files): treated as 16-bit when
  its values lie in [0, 65535], otherwise min-max scaled. ``F`` (float): values in
  [0, 1] scaled by 255, otherwise min-max scaled.
- ``RGBA`` / ``LA`` / ``PA`` / ``P`` with a transparency entry: composited on a
  **black** background (``rgb * alpha / 255``), so fully transparent pixels become
  black rather than whatever colour the file happens to store under them.
- ``P`` without transparency, ``CMYK``, ``YCbCr``, ...: Pillow's conversion to RGB.
- EXIF orientation is applied (``ImageOps.exif_transpose``), so the result is
  the image as a viewer shows it.

Corrupt, truncated or unreadable data, a zero-size image, or one smaller than
``min_size`` on either side raise :class:`ImageDecodeError` with the reason.
Truncated files always raise: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is not
enabled here (and must not be enabled elsewhere).

``read_mask``: bytes -> ``MaskRegions(foreground (H, W) bool, void (H, W) bool)``, ground truth
read by its encoding (the rule table is :func:`read_mask`'s docstring: binary, label images with
or without a 255 void ring, soft maps, class-colour and palette masks); ``load_mask``: its
foreground alone.
"""

from __future__ import annotations

import io
import struct
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dncut.storage import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "ImageDecodeError", "MaskRegions", "decode_image", "decode_rgb", "image_size", "is_jpeg",
           "load_mask", "read_mask"]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    TypeError,
    struct.error,
)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message says why."""


_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def image_size(data: bytes) -> tuple[int, int]:
    """``(W, H)`` of the image as a viewer shows it (EXIF orientation applied), from the header:
    nothing is decoded for a JPEG (other formats may load to read their metadata).

    Raises:
        ImageDecodeError: the bytes are not a recognisable image.
    """
    if not data:
        raise ImageDecodeError("empty data (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"cannot decode {len(data)} bytes: not a valid image in any known format "
                               f"(starts with {data[:8]!r})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot read the header of {len(data)} bytes: {type(exc).__name__}: {exc}") from exc
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _open(data: bytes, reduce: int = 1, exif_transpose: bool = True) -> Image.Image:
    """Open and fully decode ``data``, EXIF orientation applied (unless ``exif_transpose`` is false:
    the stored pixel frame); a JPEG is decoded at about ``1 / reduce`` of its size
    (``Image.draft``: DCT scaling, never below ``ceil(side / reduce)``)."""
    if not data:
        raise ImageDecodeError("empty data (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        if reduce > 1 and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (-(-image.width // reduce), -(-image.height // reduce)))
        image.load()
        transposed = ImageOps.exif_transpose(image) if exif_transpose else image
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"cannot decode {len(data)} bytes: not a valid image in any known format "
            f"(starts with {data[:8]!r})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(
            f"cannot decode {len(data)} bytes as an image: {type(exc).__name__}: {exc}"
        ) from exc
    if transposed.width == 0 or transposed.height == 0:
        raise ImageDecodeError(f"zero-size image ({transposed.width}x{transposed.height})")
    return transposed


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit / 32-bit / float single-channel image -> (H, W) uint8."""
    values = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "I" and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255.0
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_black(image: Image.Image) -> Image.Image:
    """RGBA (or anything convertible to it) -> RGB with colour * alpha / 255."""
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)  # (H, W, 4)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # (H, W, 3)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image  # already a standalone copy (exif_transpose copies)
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_gray_to_uint8(image), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_black(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def decode_image(data: bytes, *, min_size: int = 1, reduce: int = 1, exif_transpose: bool = True) -> Image.Image:
    """Decode encoded image bytes into an RGB image (see the module docstring for modes).

    Args:
        data: encoded file content (JPEG, PNG, BMP, TIFF, WebP, ...).
        min_size: smallest accepted width and height, in pixels (after EXIF rotation), of the
            image at full size.
        reduce: 1, 2, 4 or 8: a JPEG is decoded at about 1/reduce of its size (DCT scaling, the
            cheap way); other formats ignore it. The caller reads the actual size off the result.
        exif_transpose: apply the EXIF orientation (false: the stored pixel frame, the frame COCO
            and VOC annotations describe).

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``"RGB"``: (H, W, 3) uint8.

    Raises:
        ImageDecodeError: corrupt, truncated, unreadable, zero-size or too small.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if reduce not in (1, 2, 4, 8):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    if reduce > 1:
        width, height = image_size(data)
        if width < min_size or height < min_size:
            raise ImageDecodeError(f"image is {width}x{height} (WxH), smaller than min_size={min_size}")
        return _to_rgb(_open(data, reduce))
    image = _open(data, exif_transpose=exif_transpose)
    if image.width < min_size or image.height < min_size:
        raise ImageDecodeError(
            f"image is {image.width}x{image.height} (WxH), smaller than min_size={min_size}"
        )
    return _to_rgb(image)


_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG (JFIF, EXIF, MPO camera files)."""
    return data.startswith(_JPEG_MAGIC)


def decode_rgb(data: bytes, *, min_size: int = 1, reduce: int = 1) -> Image.Image | torch.Tensor:
    """Decode for the training crops, the cheapest way that gives the same pixels.

    A JPEG at full size goes through torchvision's libjpeg-turbo decoder into a ``(3, H, W)``
    uint8 tensor (EXIF orientation applied; the same pixels as Pillow, faster: bench/ingest.py); a JPEG
    with ``reduce > 1`` through Pillow's draft mode (DCT scaling); anything else, or a JPEG the
    fast decoder refuses, through :func:`decode_image` (its error messages, its mode handling).

    Args:
        data: encoded file content.
        min_size: smallest accepted width and height at full size, in pixels.
        reduce: 1, 2, 4 or 8 (see :func:`decode_image`).

    Returns:
        A ``(3, H, W)`` uint8 tensor, or a PIL RGB image (draft / non-JPEG).

    Raises:
        ImageDecodeError: corrupt, truncated, unreadable, zero-size or too small.
    """
    if reduce > 1 or not is_jpeg(data):
        return decode_image(data, min_size=min_size, reduce=reduce)
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        rgb = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          apply_exif_orientation=True)  # (3, H, W)
    except RuntimeError:
        return decode_image(data, min_size=min_size)  # Pillow says why (truncated, corrupt, ...)
    if rgb.shape[1] < min_size or rgb.shape[2] < min_size:
        raise ImageDecodeError(f"image is {rgb.shape[2]}x{rgb.shape[1]} (WxH), smaller than min_size={min_size}")
    return rgb


GREY_TOLERANCE = 16
"""An RGB mask whose three channels agree within this many levels everywhere is a grey mask stored
as colour (JPEG chroma noise included); otherwise it is a class-colour mask."""
VOID_COLOUR = (224, 224, 192)
"""PASCAL VOC's void / boundary colour (palette index 255): ignored (left out of every score)."""


class MaskRegions(NamedTuple):
    """A ground-truth mask as read: ``foreground`` and ``void`` are ``(H, W)`` bool and never both
    true; ``void`` pixels (object boundaries a labeller left undecided) are left out of the scores
    (``dncut.eval.metrics.score_saliency(..., ignore=void)``)."""

    foreground: np.ndarray
    void: np.ndarray


def _grey_regions(values: np.ndarray, top: float) -> MaskRegions:
    """Grey levels ``(H, W)`` in ``[0, top]`` -> regions by the grey rules of :func:`read_mask`."""
    half = top / 2.0
    none = np.zeros(values.shape, bool)
    present = np.unique(values)
    if not np.isin(present, (0, top)).all():  # not a plain binary 0 / top mask
        below = present[present != top]
        if present.max() == top and below.max() < half:  # label ids and the top value: a void ring
            return MaskRegions((values != 0) & (values != top), values == top)
    if present.max() < half:  # label ids only (0/1 PNG, class ids)
        return MaskRegions(values != 0, none)
    return MaskRegions(values > half, none)  # binary 0 / top, soft or JPEG-compressed map


def _colour_regions(rgb: np.ndarray) -> MaskRegions:
    """``(H, W, 3)`` uint8: grey stored as colour -> the grey rules; class colours (VOC, DAVIS:
    (128, 0, 0) is label 1) -> any colour but black, and the VOC void colour -> void."""
    rgb = rgb.astype(np.int32)
    if int((rgb.max(axis=2) - rgb.min(axis=2)).max()) <= GREY_TOLERANCE:
        return _grey_regions(np.rint(rgb.mean(axis=2)), 255.0)
    void = (rgb == VOID_COLOUR).all(axis=2)
    return MaskRegions(rgb.any(axis=2) & ~void, void)


def mask_regions(image: Image.Image) -> MaskRegions:
    """Any-mode decoded mask -> its foreground and void (rules in :func:`read_mask`)."""
    mode = image.mode
    if mode == "1":
        bits = np.asarray(image, dtype=bool)
        return MaskRegions(bits, np.zeros(bits.shape, bool))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return MaskRegions(values > 0.5, np.zeros(values.shape, bool))
    if mode.startswith("I"):  # I;16* and I: the 8-bit range when no value exceeds 255, else 16-bit
        values = np.asarray(image).astype(np.float64)
        return _grey_regions(values, 65535.0 if values.max() > 255 else 255.0)
    if mode in ("L", "LA"):
        return _grey_regions(np.asarray(image.getchannel("L")).astype(np.float64), 255.0)
    return _colour_regions(np.asarray(image.convert("RGB")))  # RGB(A), P (palette colours), CMYK, ...


def read_mask(data: bytes) -> MaskRegions:
    """Decode a ground-truth mask into foreground and void, whatever its encoding.

    The one table of mask rules (``docs/datasets.md`` repeats it for users). ``top`` is the
    largest value of the type (255; 65535 for a 16/32-bit file with a value above 255, a 16/32-bit
    file whose values fit in 8 bits is read as 8-bit); ``half`` is ``top / 2``.

    ==========================================  ==============================  ==========  ========
    encoding (values present)                   read as                         foreground  void
    ==========================================  ==============================  ==========  ========
    1-bit                                       binary                          1           --
    float ``F``                                 soft map                        > 0.5       --
    grey, only ``{0, top}`` (0/255, 0/65535)    binary                          ``top``     --
    grey, every value below ``half``            label image (0/1, class ids)    non-zero    --
    grey, ``top`` and values in ``1..half-1``   label image with a void ring    the ids     ``top``
    (nothing else: VOC SegmentationClassAug)    (ids 1..127 on 8 bits)
    grey, any other mix (a value in             soft / JPEG / anti-aliased map  > ``half``  --
    ``half..top-1``)                            (128 of 255, 32768 of 65535)
    RGB / palette, channels within              grey stored as colour           grey rules  grey
    ``GREY_TOLERANCE`` levels everywhere
    RGB / palette, other colours                class colours (VOC, DAVIS)      not black   ``VOID_COLOUR``
    ==========================================  ==============================  ==========  ========

    Alpha is ignored (``LA``: its grey; ``RGBA``: its colours); a palette (``P``) mask is read
    through its colours, so a VOC palette PNG and its grey SegmentationClassAug twin read alike.
    A plain binary mask is never a label image: ``{0, 255}`` is foreground = 255. The rule cannot
    tell a label image whose ids reach ``half`` (128 and above) with a 255 void from a soft map:
    such a file is read as a soft map; store it as a palette PNG to have it read as classes.

    A mask with no foreground is returned as such: the evaluation flags and counts that image
    (``check_mask_foreground``) instead of averaging it in.

    Args:
        data: encoded mask file content (PNG, BMP, TIFF, JPEG, ...).

    Returns:
        ``MaskRegions(foreground (H, W) bool, void (H, W) bool)``, disjoint.

    Raises:
        ImageDecodeError: the bytes are not a decodable image.
    """
    return mask_regions(_open(data))


def load_mask(data: bytes) -> np.ndarray:
    """The foreground of :func:`read_mask`: ``(H, W)`` bool, True = foreground (void is not
    foreground; a caller that can leave void out of its scores uses ``read_mask``)."""
    return read_mask(data).foreground


def check_mask_size(image: Image.Image, mask: np.ndarray) -> np.ndarray:
    """``mask (H, W)`` if it matches ``image``'s size; ``ValueError`` naming both sizes otherwise."""
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask size {mask.shape[::-1]} (WxH) differs from image size {image.size}")
    return mask


def check_mask_foreground(mask: np.ndarray) -> np.ndarray:
    """``mask (H, W)`` if it has a foreground pixel; ``ValueError`` otherwise: an empty ground truth
    makes IoU and maxFβ meaningless, so the image is flagged and counted, not averaged in."""
    if not mask.any():
        raise ValueError(f"the ground-truth mask ({mask.shape[1]}x{mask.shape[0]}) has no foreground pixel "
                         "(see dncut.data.images.read_mask for how each encoding is read)")
    return mask
