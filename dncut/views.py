"""Two-view geometry: overlapping random crops, DINO augmentations, RoIAlign onto the overlap.

The training views of Sec. 3.3 of the paper: two RandomResizedCrop-style crops of one image
(the second overlapping the first), each resized to ``S x S`` and flipped here, on the CPU;
photometrically augmented per branch on the training device (``dncut.photometric``). After the encoder, both views' dense feature maps are resampled onto
the region of the original image that both crops cover, so that position ``(i, j)`` of both
aligned maps shows the same place of the image.

Coordinates: a box is ``(x0, y0, x1, y1)`` in continuous original-image pixel coordinates,
where pixel column ``c`` covers ``[c, c + 1)`` (its centre is ``c + 0.5``). The crops drawn
here have integer corners, so cropping is exact. A crop resized to ``S x S`` and encoded
with stride ``s`` gives a ``(h, w) = (S / s, S / s)`` map whose cell ``j`` covers
``[j, j + 1)`` in feature coordinates; feature x = ``(x_orig - x0) * w / (x1 - x0)``.
That is the pixel model of ``torchvision.ops.roi_align(..., aligned=True)``.

Shapes:
    sample_crop_boxes(W, H, rng) -> (box1, box2): two (4,) tuples of floats
    TwoViewTransform()(image PIL RGB or (3, H, W) uint8 tensor, rng) -> {view1, view2: (3, S, S) uint8 RGB,
        box1, box2: (4,) float32, flip1, flip2: bool}
    overlap_boxes(box1 (B, 4), box2 (B, 4)) -> (B, 4)
    align_to_overlap(features (B, C, h, w), boxes (B, 4), overlap (B, 4), flipped (B,),
        output_size) -> (B, C, oh, ow)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- crop boxes


def _check_range(name: str, pair: Sequence[float], low: float, high: float) -> None:
    """Raise ValueError unless ``low < pair[0] <= pair[1] <= high``."""
    if len(pair) != 2 or not (low < pair[0] <= pair[1] <= high):
        raise ValueError(f"{name} must be (a, b) with {low} < a <= b <= {high}, got {tuple(pair)}")


def box_area(box: Sequence[float]) -> float:
    """Area of an (x0, y0, x1, y1) box (0 when empty)."""
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def intersection_area(box1: Sequence[float], box2: Sequence[float]) -> float:
    """Area of the intersection of two (x0, y0, x1, y1) boxes (0 when disjoint)."""
    inter = (max(box1[0], box2[0]), max(box1[1], box2[1]), min(box1[2], box2[2]), min(box1[3], box2[3]))
    return box_area(inter)


def sample_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Box:
    """Draw one RandomResizedCrop box with integer corners.

    Same law as ``torchvision.transforms.RandomResizedCrop``: area fraction uniform in
    ``scale``, aspect ratio (w / h) log-uniform in ``ratio``, position uniform; after
    ``attempts`` misses, the central crop with the aspect ratio clamped into ``ratio``.

    Args:
        width: image width W in pixels.
        height: image height H in pixels.
        rng: source of randomness.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio width / height.
        attempts: draws before falling back to the central crop.

    Returns:
        (x0, y0, x1, y1) floats with integer values, 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H.
    """
    area = float(width * height)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return (float(x0), float(y0), float(x0 + w), float(y0 + h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def _centred_on(box: Box, ref: Box, width: int, height: int) -> Box:
    """``box``'s size moved to be centred on ``ref``'s centre, shifted back inside the image.

    The result contains ``ref``'s (rounded) centre, so it intersects ``ref``.
    """
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = round((ref[0] + ref[2]) / 2), round((ref[1] + ref[3]) / 2)
    x0 = min(max(cx - w // 2, 0), width - w)
    y0 = min(max(cy - h // 2, 0), height - h)
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def sample_crop_boxes(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    min_overlap: float = 0.01,
    max_tries: int = 100,
) -> tuple[Box, Box]:
    """Draw two RandomResizedCrop boxes, the second overlapping the first.

    ``box2`` is redrawn until ``area(box1 ∩ box2) >= min_overlap * area(box1)``. After
    ``max_tries`` misses the last ``box2``'s size is re-centred on ``box1``'s centre (shifted
    back inside the image); if even that falls short, ``box2 = box1`` (always satisfies it).

    Args:
        width: image width W in pixels.
        height: image height H in pixels.
        rng: source of randomness (all draws come from it, so a seed fixes the boxes).
        scale: crop area range as a fraction of the image area.
        ratio: crop aspect-ratio (w / h) range.
        min_overlap: required intersection as a fraction of box1's area, in [0, 1].
        max_tries: draws of box2 before the fallback.

    Returns:
        (box1, box2), each (x0, y0, x1, y1) in original-image pixel coordinates (floats with
        integer values).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    _check_range("scale", scale, 0.0, 1.0)
    _check_range("ratio", ratio, 0.0, math.inf)
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    box1 = sample_resized_crop_box(width, height, rng, scale=scale, ratio=ratio)
    needed = min_overlap * box_area(box1)
    box2 = box1
    for _ in range(max_tries):
        box2 = sample_resized_crop_box(width, height, rng, scale=scale, ratio=ratio)
        if intersection_area(box1, box2) >= needed:
            return box1, box2
    box2 = _centred_on(box2, box1, width, height)
    if intersection_area(box1, box2) >= needed:
        return box1, box2
    return box1, box1


# --------------------------------------------------------------------------- one view


def resized_crop(
    image: Image.Image | torch.Tensor, box: Sequence[float], size: int, flip: bool = False
) -> Image.Image | torch.Tensor:
    """Crop ``box`` (integer corners) out of ``image``, resize it bicubically to size x size.

    Args:
        image: PIL image, or a tensor (..., H, W).
        box: (x0, y0, x1, y1) with integer values.
        size: output side S.
        flip: mirror the crop horizontally after resizing.

    Returns:
        The view, same kind as ``image``: PIL S x S, or a tensor (..., S, S).
    """
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out = TF.resized_crop(
        image, y0, x0, y1 - y0, x1 - x0, [size, size],
        interpolation=InterpolationMode.BICUBIC, antialias=True,
    )
    return TF.hflip(out) if flip else out


def reduction_for(boxes: Sequence[Sequence[float]], size: int, max_reduce: int = 8) -> int:
    """The largest JPEG draft reduction (1, 2, 4 or 8) that still gives every crop box at least
    ``size`` pixels on its shorter side: decoding at 1/r of the size costs ~1/r^2 of the time and
    never upsamples a crop that the full image could serve."""
    shortest = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes)
    r = 1
    while r * 2 <= max_reduce and shortest / (r * 2) >= size:
        r *= 2
    return r


def crop_view(image: Image.Image | torch.Tensor, box: Sequence[float], size: int, flip: bool,
              scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``(3, size, size)`` uint8 RGB: ``box`` (full-size pixel coordinates, integer corners) of
    ``image``, resized bicubically with antialiasing, mirrored when ``flip``.

    ``image`` is a ``(3, H, W)`` uint8 tensor at full size (torch's uint8 bicubic kernel, the
    fast path), or a PIL image decoded at ``scale = (width / full width, height / full height)``
    (a JPEG draft: PIL's ``resize(box=...)`` with the box scaled, corners fractional).
    """
    if isinstance(image, torch.Tensor):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        crop = image[None, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)  # (1, 3, h, w)
        view = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]  # (3, S, S) uint8
        return np.ascontiguousarray((view.flip(-1) if flip else view).numpy())
    sx, sy = scale
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))  # (3, S, S)


def _rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """A PIL image in RGB mode, or a ``(3, H, W)`` uint8 tensor as it is."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a (3, H, W) uint8 image tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    return image if image.mode == "RGB" else image.convert("RGB")


def _frame(image: Image.Image | torch.Tensor,
           full_size: tuple[int, int] | None) -> tuple[Image.Image | torch.Tensor, tuple[int, int], tuple[float, float]]:
    """``(image, (W, H) full size, scale = decoded / full size)``; a full-size image as a ``(3, H, W)``
    uint8 tensor (the fast crop path), a reduced JPEG draft as PIL."""
    image = _rgb(image)
    size = (image.shape[2], image.shape[1]) if isinstance(image, torch.Tensor) else image.size
    width, height = full_size or size
    scale = (size[0] / width, size[1] / height)
    if isinstance(image, torch.Tensor) and scale != (1.0, 1.0):
        raise ValueError(f"a tensor image must be at full size {(width, height)}, got {size}")
    if not isinstance(image, torch.Tensor) and scale == (1.0, 1.0):
        # full size: the fast tensor path (np.array: a writable copy; PIL's buffer is read-only, which torch warns of)
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return image, (width, height), scale


class ResizedCropTransform:
    """One RandomResizedCrop view, no flip (FOUND's training view, ``dncut.found_train``); the
    interface of :class:`TwoViewTransform` (``boxes`` then ``__call__``), so the same reader
    (``dncut.data.pipeline.ViewMaker``) decodes for both.

    Args:
        size: side S of the square view (FOUND: 224).
        scale: crop-area range as a fraction of the image area (FOUND: (0.1, 3.0); draws above
            1 do not fit and are redrawn, as in torchvision's RandomResizedCrop).
        ratio: crop aspect-ratio range.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.1, 3.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        _check_range("scale", scale, 0.0, math.inf)
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def boxes(self, width: int, height: int, rng: np.random.Generator) -> tuple[Box]:
        """The crop box for an image of ``width x height`` (the first draws of ``rng``)."""
        return (sample_resized_crop_box(width, height, rng, scale=self.scale, ratio=self.ratio),)

    def __call__(self, image: Image.Image | torch.Tensor, rng: np.random.Generator, *,
                 boxes: tuple[Box, ...] | None = None, full_size: tuple[int, int] | None = None) -> dict:
        """``{"view": (3, S, S) uint8, "box": (4,) float32}`` (arguments as :class:`TwoViewTransform`)."""
        image, (width, height), scale = _frame(image, full_size)
        box = (boxes or self.boxes(width, height, rng))[0]
        return {"view": crop_view(image, box, self.size, False, scale), "box": np.asarray(box, dtype=np.float32)}


class TwoViewTransform:
    """The two crops of one image (the CPU's share of the views): geometry only.

    Per view: RandomResizedCrop box (the second overlapping the first by ``min_overlap`` of
    the first's area), bicubic resize to ``size``, horizontal flip with p = ``flip_p``. No
    photometric work and no float conversion here: views stay uint8 RGB (the photometric
    parameters are drawn by the caller, ``dncut.data.pipeline.ViewMaker``, and applied on the
    training device, ``dncut.photometric``).

    Every random draw comes from the ``rng`` passed in, in a fixed order (boxes, flip 1, flip 2),
    so a given seed gives identical views.

    Args:
        size: side S of each square view (224 in the paper).
        scale: crop-area range as a fraction of the image area ((0.2, 1.0) in the paper).
        ratio: crop aspect-ratio range.
        min_overlap: required overlap of view 2 with view 1, as a fraction of box1's area.
        flip_p: probability of a horizontal flip, per view.
        max_tries: box-2 draws before the documented fallback of ``sample_crop_boxes``.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        min_overlap: float = 0.01,
        flip_p: float = 0.5,
        max_tries: int = 100,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        _check_range("scale", scale, 0.0, 1.0)
        _check_range("ratio", ratio, 0.0, math.inf)
        if not 0.0 <= min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.min_overlap, self.flip_p, self.max_tries = min_overlap, flip_p, max_tries

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, min_overlap={self.min_overlap})"

    def boxes(self, width: int, height: int, rng: np.random.Generator) -> tuple[Box, Box]:
        """The two crop boxes for an image of ``width x height`` (the first draws of ``rng``)."""
        return sample_crop_boxes(width, height, rng, scale=self.scale, ratio=self.ratio,
                                 min_overlap=self.min_overlap, max_tries=self.max_tries)

    def __call__(self, image: Image.Image | torch.Tensor, rng: np.random.Generator, *,
                 boxes: tuple[Box, ...] | None = None, full_size: tuple[int, int] | None = None) -> dict:
        """Make both views of ``image``.

        Args:
            image: PIL image (converted to RGB if needed), possibly decoded at a reduced size,
                or a ``(3, H, W)`` uint8 tensor at full size (``dncut.data.images.decode_rgb``).
            rng: source of every random draw.
            boxes: the crop boxes, already drawn with ``self.boxes(*full_size, rng)`` (the
                caller drew them to choose the decoding size); ``None`` draws them here.
            full_size: ``(W, H)`` of the image at full size, the frame of the boxes
                (default the image's size).

        Returns:
            dict with ``view1``, ``view2``: uint8 ``(3, S, S)`` RGB arrays; ``box1``, ``box2``:
            float32 ``(4,)`` crop boxes in full-size pixel coordinates; ``flip1``, ``flip2``: bool.

        Raises:
            ValueError: a tensor image whose size is not ``full_size`` (its boxes would not fit).
        """
        image, (width, height), scale = _frame(image, full_size)
        boxes = boxes or self.boxes(width, height, rng)
        out: dict = {}
        for branch, box in enumerate(boxes):
            flip = bool(rng.random() < self.flip_p)
            out[f"view{branch + 1}"] = crop_view(image, box, self.size, flip, scale)
            out[f"box{branch + 1}"] = np.asarray(box, dtype=np.float32)
            out[f"flip{branch + 1}"] = flip
        return out


# --------------------------------------------------------------------------- alignment


def overlap_boxes(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Intersection of two batches of boxes.

    Args:
        box1: (B, 4) boxes (x0, y0, x1, y1).
        box2: (B, 4) boxes.

    Returns:
        (B, 4) intersections; a disjoint pair gives an empty box (x1 = x0 or y1 = y0).
    """
    if box1.shape != box2.shape or box1.shape[-1] != 4:
        raise ValueError(f"boxes must both be (B, 4), got {tuple(box1.shape)} and {tuple(box2.shape)}")
    lo = torch.maximum(box1[..., :2], box2[..., :2])  # (B, 2)
    hi = torch.maximum(torch.minimum(box1[..., 2:], box2[..., 2:]), lo)  # (B, 2)
    return torch.cat([lo, hi], dim=-1)  # (B, 4)


def boxes_to_feature_coords(
    boxes: torch.Tensor, region: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Express original-image ``region`` boxes in the feature coordinates of crop ``boxes``.

    Feature x = (x_orig - box.x0) * width / (box.x1 - box.x0), same for y with height.

    Args:
        boxes: (B, 4) crop boxes in original coordinates.
        region: (B, 4) boxes in original coordinates.
        height: feature-map height h.
        width: feature-map width w.

    Returns:
        (B, 4) ``region`` in the crop's feature-map coordinates.
    """
    scale_x = width / (boxes[:, 2] - boxes[:, 0])  # (B,)
    scale_y = height / (boxes[:, 3] - boxes[:, 1])  # (B,)
    x0 = (region[:, 0] - boxes[:, 0]) * scale_x
    x1 = (region[:, 2] - boxes[:, 0]) * scale_x
    y0 = (region[:, 1] - boxes[:, 1]) * scale_y
    y1 = (region[:, 3] - boxes[:, 1]) * scale_y
    return torch.stack([x0, y0, x1, y1], dim=1)  # (B, 4)


def align_to_overlap(
    features: torch.Tensor,
    boxes: torch.Tensor,
    overlap: torch.Tensor,
    flipped: torch.Tensor,
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
) -> torch.Tensor:
    """Resample each crop's feature map onto the overlap box (RoIAlign, aligned=True).

    A flipped view's map is mirrored back first, then the overlap box is mapped into the
    crop's feature coordinates (crop offset, resize to S x S and stride folded into
    ``w / box_width``). Output position (i, j) of two views aligned onto the same overlap
    is the same place of the original image. Differentiable w.r.t. ``features``.

    Args:
        features: (B, C, h, w) feature maps of the (resized, possibly flipped) crops.
        boxes: (B, 4) crop boxes in original-image coordinates.
        overlap: (B, 4) target boxes in original-image coordinates (usually the overlap).
        flipped: (B,) bool, whether each crop was mirrored horizontally.
        output_size: side, or (oh, ow), of the aligned maps.
        sampling_ratio: RoIAlign sampling points per bin side (-1: adaptive).

    Returns:
        (B, C, oh, ow) aligned features, same dtype as ``features``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
    batch, _, height, width = features.shape
    for name, t in (("boxes", boxes), ("overlap", overlap)):
        if t.shape != (batch, 4):
            raise ValueError(f"{name} must be ({batch}, 4), got {tuple(t.shape)}")
    flipped = torch.as_tensor(flipped, dtype=torch.bool, device=features.device).reshape(batch)  # (B,)
    unflipped = torch.where(flipped[:, None, None, None], features.flip(-1), features)  # (B, C, h, w)
    boxes = boxes.to(device=features.device, dtype=features.dtype)
    overlap = overlap.to(device=features.device, dtype=features.dtype)
    rois = boxes_to_feature_coords(boxes, overlap, height, width)  # (B, 4)
    index = torch.arange(batch, device=features.device, dtype=features.dtype)[:, None]  # (B, 1)
    rois = torch.cat([index, rois], dim=1)  # (B, 5): batch index, x0, y0, x1, y1
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    return roi_align(unflipped, rois, output_size, spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)  # (B, C, oh, ow)
