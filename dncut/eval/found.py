"""FOUND (Siméoni et al., CVPR 2023): a background seed, a pseudo-mask, and one 1x1 convolution
trained on frozen features (REFERENCE §7, facts read from the peers' public code; this is
dncut's own implementation). Pure torch / numpy; the Ray Train job is ``dncut.train.found``.

    features (B, C, h, w) [+ CLS->patch attention (B, heads, h*w) for a ViT]
      -> background_seed: ViT: per-head weights beta_h = log(sum_h (Q_h + eps) / (Q_h + eps)),
         Q_h = fraction of patches above the image's mean attention of head h, eps = 1e-10;
         seed = the patch with the smallest beta-weighted attention; key slices of head h scaled
         by beta_h.
         CNN (no CLS attention; dncut's rule): seed = the patch with the largest degree in the
         relu cosine graph, sum_j max(cos(f_i, f_j), 0): the most typical patch, as background
         covers most of a photo and is self-similar (the pseudo-masks' IoU: ``docs/results.md``).
      -> pseudo_masks: features L2-normalised; cosine to the seed > SEED_COSINE (0.3) = background;
         the foreground pseudo-mask is the complement (B, h, w) bool
    FoundHead: Conv2d(C -> 1, 1x1, bias) on the raw (not normalised) features -> logits (B, h, w)
    Inference (``image_mask`` in ``dncut.eval.methods``): logits bilinearly upsampled to the image,
    > 0 (sigmoid > 0.5); discovery: the largest 4-connected component of logits > 0 at patch
    resolution -> box (``largest_component_box``), no bilateral solver.

The head file (``save_head`` / ``load_head``) is a safetensors file: ``weight (1, C, 1, 1)``,
``bias (1,)`` and, as metadata, the backbone name and the backbone checkpoint it was trained on,
so the evaluation job pairs each (backbone, checkpoint) with its own head.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEED_COSINE = 0.3  # FOUND: patches with cosine > 0.3 to the seed are background
BETA_EPS = 1e-10  # FOUND: epsilon of the head weights
HEAD_FORMAT = "dncut-found-head"


def head_weights(attention: Tensor) -> Tensor:
    """FOUND's per-head weights ``beta (B, heads)`` from CLS->patch attention ``(B, heads, n)``:
    ``beta_h = log(sum_h (Q_h + eps) / (Q_h + eps))``, ``Q_h`` = fraction of patches whose
    attention exceeds the image's mean attention of that head (heads that attend to few patches
    weigh more)."""
    q = (attention > attention.mean(-1, keepdim=True)).float().mean(-1)  # (B, heads)
    q = q + BETA_EPS
    return torch.log(q.sum(-1, keepdim=True) / q)  # (B, heads)


def background_seed(tokens: Tensor, attention: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The background seed of each image and the features the pseudo-mask compares to it.

    Args:
        tokens: ``(B, n, C)`` patch features (keys for a ViT, heads concatenated).
        attention: ``(B, heads, n)`` CLS->patch attention of the last block (ViT), or ``None``
            (CNN: the degree rule of the module docstring).

    Returns:
        ``(seeds (B,) int64, features (B, n, C) L2-normalised)``: for a ViT the key slice of each
        head scaled by its ``beta_h`` before the normalisation.

    Raises:
        ValueError: shapes that do not match.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, n, C), got {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    tokens = tokens.float()
    if attention is None:
        unit = F.normalize(tokens, dim=-1)  # (B, n, C)
        degree = (unit @ unit.transpose(1, 2)).clamp(min=0).sum(-1)  # (B, n)
        return degree.argmax(-1), unit
    heads = attention.shape[1]
    if attention.shape != (b, heads, n) or c % heads:
        raise ValueError(f"attention must be (B, heads, n) = ({b}, heads, {n}) with C={c} divisible by heads, "
                         f"got {tuple(attention.shape)}")
    beta = head_weights(attention.float())  # (B, heads)
    seeds = (beta.unsqueeze(-1) * attention.float()).sum(1).argmin(-1)  # (B,)
    scaled = tokens.reshape(b, n, heads, c // heads) * beta[:, None, :, None]  # (B, n, heads, C/heads)
    return seeds, F.normalize(scaled.reshape(b, n, c), dim=-1)


def pseudo_masks(features: Tensor, attention: Tensor | None = None) -> Tensor:
    """FOUND's foreground pseudo-masks: not similar (cosine <= 0.3) to the background seed.

    Args:
        features: ``(B, C, h, w)`` patch features.
        attention: ``(B, heads, h * w)`` CLS->patch attention (ViT) or ``None`` (CNN).

    Returns:
        ``(B, h, w)`` bool foreground.
    """
    b, _, h, w = features.shape
    seeds, unit = background_seed(features.flatten(2).transpose(1, 2), attention)  # (B,), (B, n, C)
    seed_vec = unit[torch.arange(b), seeds]  # (B, C)
    cosine = torch.einsum("bnc,bc->bn", unit, seed_vec)  # (B, n)
    return (cosine <= SEED_COSINE).reshape(b, h, w)


class FoundHead(nn.Module):
    """FOUND's head: one 1x1 convolution ``(B, C, h, w) -> logits (B, h, w)``.

    Args:
        channels: C, the backbone's feature channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features.to(self.conv.weight.dtype))[:, 0]  # (B, h, w)


@dataclass(frozen=True)
class HeadInfo:
    """What a head file says it was trained on: ``backbone`` (a registered name) and
    ``checkpoint`` (the backbone weights' URI, ``""`` = the pretrained weights)."""

    backbone: str
    checkpoint: str
    channels: int
    steps: int


def save_head(head: FoundHead, info: HeadInfo) -> bytes:
    """A head and what it was trained on -> safetensors bytes (write them with ``dncut.storage``)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in head.conv.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "backbone": info.backbone, "checkpoint": info.checkpoint,
            "channels": str(info.channels), "steps": str(info.steps)}
    return save(tensors, metadata=meta)


def load_head(data: bytes, source: str = "<memory>") -> tuple[FoundHead, HeadInfo]:
    """Safetensors bytes from :func:`save_head` -> ``(head in eval mode, info)``.

    Raises:
        ValueError: not a FOUND head file, or non-finite weights (names ``source``).
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = _metadata(data)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"{source}: not a safetensors FOUND head ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != HEAD_FORMAT or set(tensors) != {"weight", "bias"}:
        raise ValueError(f"{source}: not a FOUND head (format {meta.get('format')!r}, tensors {sorted(tensors)}); "
                         "make one with `dncut found-train`")
    info = HeadInfo(meta["backbone"], meta.get("checkpoint", ""), int(meta["channels"]), int(meta.get("steps", 0)))
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ValueError(f"{source}: the FOUND head has non-finite weights (its training diverged)")
    head = FoundHead(info.channels)
    head.conv.load_state_dict(tensors)
    return head.eval(), info


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (an 8-byte little-endian header length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + size]).get("__metadata__", {}))


def same_weights(a: str | None, b: str | None) -> bool:
    """Whether two backbone-checkpoint URIs name the same weights (``None``/``""`` = pretrained;
    local paths compared absolute)."""
    def norm(u: str | None) -> str:
        if not u:
            return ""
        return u if "://" in u else os.path.abspath(os.path.expanduser(u))

    return norm(a) == norm(b)


def found_loss(logits: Tensor, targets: dict[str, Tensor], step: int, bkg_steps: int) -> tuple[Tensor, dict[str, float]]:
    """FOUND's training loss on logits ``(B, H, W)`` (REFERENCE §7):
    ``1.5 * BCE(refined own mask)`` plus, for the first ``bkg_steps`` steps, ``1 * BCE(refined
    background pseudo-mask)``, afterwards ``4 * BCE(own unrefined mask)``.

    Args:
        logits: ``(B, H, W)`` at the view's resolution.
        targets: ``own_refined``, ``own``, ``bkg_refined``: ``(B, H, W)`` float 0 / 1.
        step: the optimizer step (0-based).
        bkg_steps: steps that use the background pseudo-mask (FOUND: 100).

    Returns:
        ``(loss, parts)`` with the parts as floats (for logging).
    """
    bce = F.binary_cross_entropy_with_logits
    parts = {"loss_own_refined": 1.5 * bce(logits, targets["own_refined"])}
    if step < bkg_steps:
        parts["loss_bkg"] = 1.0 * bce(logits, targets["bkg_refined"])
    else:
        parts["loss_own"] = 4.0 * bce(logits, targets["own"])
    loss = sum(parts.values())
    return loss, {k: float(v) for k, v in parts.items()}


def refine_targets(images: np.ndarray, masks: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """The bilateral solver's refinement of each mask, kept only when its IoU with the mask is
    > ``min_iou`` (FOUND: 0.5), else the mask itself.

    Args:
        images: ``(B, H, W, 3)`` uint8.
        masks: ``(B, H, W)`` bool.

    Returns:
        ``(B, H, W)`` bool.
    """
    from dncut.eval.bilateral import refine_mask

    out = np.array(masks, dtype=bool)
    for i, (image, mask) in enumerate(zip(images, masks)):
        if not mask.any() or mask.all():
            continue
        _, refined = refine_mask(image, mask)
        union = np.count_nonzero(refined | mask)
        if union and np.count_nonzero(refined & mask) / union > min_iou:
            out[i] = refined
    return out


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, h, w) -> (B, H, W)`` bilinear (align_corners=False), FOUND's upsampling."""
    return F.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
