"""In-process Simple-NCut saliency of a backbone on a small labelled set (no Ray).

Used by the demo (before/after) and by training-time validation: the same method
(:func:`dncut.eval.methods.simple_ncut`) and metrics (:mod:`dncut.eval.metrics`) as the Ray
Data batch job, on a handful of images held in memory::

    images (PIL, any size) -> resize, long side ``image_size``, sides multiple of the stride
      -> backbone (B=1, 3, H, W) -> (1, C, h, w) -> simple_ncut -> z2 (h, w), mask (h, w)
      -> bilinear upsampling to the image -> score_saliency against the GT mask
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dncut import storage
from dncut.config import Config
from dncut.data.datasets import saliency_dataset
from dncut.data.images import check_mask_size, decode_image, load_mask
from dncut.data.pipeline import s3_options
from dncut.data.scenes import make_scene
from dncut.eval.methods import simple_ncut, upsample_map
from dncut.eval.metrics import aggregate_saliency, score_saliency

log = logging.getLogger(__name__)

HELD_OUT_SEED = 1_000_000  # held-out scenes never overlap the training seeds 0..num_scenes-1


@dataclass
class Labelled:
    """One validation image: RGB PIL image and its (H, W) bool mask."""

    image: Image.Image
    mask: np.ndarray


def grid_size(width: int, height: int, long_side: int, stride: int) -> tuple[int, int]:
    """(W', H') with the long side ~``long_side`` and both sides multiples of ``stride``."""
    scale = long_side / max(width, height)
    return (max(stride, round(width * scale / stride) * stride), max(stride, round(height * scale / stride) * stride))


def image_tensor(image: Image.Image, size: tuple[int, int], mean, std) -> torch.Tensor:
    """PIL RGB -> normalised ``(1, 3, H', W')`` float32 at ``size`` = (W', H')."""
    x = torch.from_numpy(np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), np.float32) / 255.0)
    x = x.permute(2, 0, 1)  # (3, H', W')
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x.unsqueeze(0)  # (1, 3, H', W')


@torch.no_grad()
def simple_saliency(backbone: torch.nn.Module, image: Image.Image, *, image_size: int = 320,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Simple-NCut of one image: ``(z2 grid (h, w), soft mask (H, W) in [0, 1])``."""
    size = grid_size(*image.size, image_size, backbone.stride)
    x = image_tensor(image, size, backbone.mean, backbone.std).to(device)
    feats = backbone(x).float()  # (1, C, h, w)
    z, masks = simple_ncut(feats)  # (1, h, w), (1, h, w)
    soft = upsample_map(masks[0].float().cpu().numpy(), (image.height, image.width))
    return z[0].cpu().numpy(), np.clip(soft, 0.0, 1.0)


def score_backbone(backbone: torch.nn.Module, samples: Sequence[Labelled], *, image_size: int = 320,
                   device: str | torch.device = "cpu") -> tuple[dict[str, float], list[np.ndarray]]:
    """Dataset scores (acc, iou, max_fbeta, mae) and each image's z2 grid.

    The backbone is put in eval mode for the duration and restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    scores, maps = [], []
    try:
        for s in samples:
            z, soft = simple_saliency(backbone, s.image, image_size=image_size, device=device)
            scores.append(score_saliency(soft, s.mask))
            maps.append(z)
    finally:
        backbone.train(was_training)
    agg = aggregate_saliency(scores)
    return {k: agg[k] for k in ("acc", "iou", "max_fbeta", "mae")}, maps


def validation_set(cfg: Config) -> list[Labelled]:
    """``data.val`` (images/ + masks/, local or s3://) or ``data.val_scenes`` held-out scenes.

    Raises:
        dncut.data.datasets.DatasetLayoutError: the folder lacks images/ or masks/, or no pairs.
    """
    if cfg.data.val is None:
        return [Labelled(*make_scene(HELD_OUT_SEED + i, size=cfg.data.crop_size)) for i in range(cfg.data.val_scenes)]
    s3 = s3_options(cfg)
    samples, failed = [], []
    for r in saliency_dataset("folder", cfg.data.val, s3):
        try:
            image = decode_image(storage.read_bytes(r.image_uri, s3))
            samples.append(Labelled(image, check_mask_size(image, load_mask(storage.read_bytes(r.mask_uri, s3)))))
        except (OSError, ValueError) as exc:
            failed.append(f"{r.image_id}: {exc}")
    if failed:
        log.warning("validation set %s: skipped %d unreadable or mismatched pairs, e.g. %s", cfg.data.val, len(failed), failed[:3])
    if not samples:
        raise ValueError(f"validation set {cfg.data.val}: no readable image/mask pair ({len(failed)} failed)")
    return samples
