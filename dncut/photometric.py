"""DINO's photometric augmentation, drawn per view on the CPU and applied in batches on the device.

The CPU side (``dncut.data.pipeline.ViewMaker``) only decodes and crops; for each view it also
draws the augmentation's random parameters (a ``(N_PARAMS,)`` float32 row, ``sample_params``) from
the view's seeded rng. The training worker applies them to a whole batch on its device
(``apply``): no PIL work and no float conversion on the CPU, one batched kernel per operation.

Parameters of one view (REFERENCE §2, DINO's ``DataAugmentationDINO``; torchvision's ColorJitter
law: factors uniform in [max(0, 1 - s), 1 + s], hue uniform in [-h, h], the four operations in a
random order)::

    jitter (p = 0.8): brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; random order
    grayscale (p = 0.2)
    Gaussian blur: p = 1.0 on view 1, 0.1 on view 2; sigma uniform in [0.1, 2.0], kernel 2*ceil(3 sigma)+1
    solarize: p = 0.0 on view 1, 0.2 on view 2; threshold 128 (of 255)

Shapes::

    sample_params(rng, branch) -> (N_PARAMS,) float32
    apply(views (B, 3, S, S) uint8 or float in [0, 1], params (B, N_PARAMS)) -> (B, 3, S, S) float in [0, 1]

The result goes to the backbone, which applies its own normalisation (``dncut.backbones``).
Each batched operation equals torchvision's per-image functional op with the same factor
(``tests/test_photometric.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

JITTER_P = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (DINO)
GRAYSCALE_P = 0.2
BLUR_P = (1.0, 0.1)  # view 1, view 2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_P = (0.0, 0.2)  # view 1, view 2
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): pixels >= 128 are inverted

# one view's row: [jitter?, brightness, contrast, saturation, hue, order x4, grayscale?, blur?, sigma, solarize?]
JITTER, FACTORS, ORDER, GRAY, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
N_PARAMS = 13
MAX_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 13: every blur kernel fits, zero-padded


def sample_params(rng: np.random.Generator, branch: int) -> np.ndarray:
    """One view's augmentation parameters ``(N_PARAMS,)`` float32 (module docstring); ``branch`` 0 or 1.

    Every draw is made whether or not its operation applies, so a view's parameters do not shift
    the random stream of the next one.
    """
    b, c, s, h = JITTER_STRENGTH
    row = np.empty(N_PARAMS, np.float32)
    row[JITTER] = rng.random() < JITTER_P
    row[FACTORS] = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                    rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
    row[ORDER] = rng.permutation(4)
    row[GRAY] = rng.random() < GRAYSCALE_P
    row[BLUR] = rng.random() < BLUR_P[branch]
    row[SIGMA] = rng.uniform(*BLUR_SIGMA)
    row[SOLARIZE] = rng.random() < SOLARIZE_P[branch]
    return row


def identity_params(batch: int = 1) -> np.ndarray:
    """``(batch, N_PARAMS)`` rows that change nothing (``data.photometric: false``)."""
    row = np.zeros(N_PARAMS, np.float32)
    row[FACTORS] = (1.0, 1.0, 1.0, 0.0)
    row[ORDER] = np.arange(4)
    row[SIGMA] = BLUR_SIGMA[0]
    return np.tile(row, (batch, 1))


# --------------------------------------------------------------------------- batched operations


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (torchvision's ``rgb_to_grayscale``): (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    """``ratio * a + (1 - ratio) * b`` clamped to [0, 1]; ``ratio`` (B,)."""
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1 - r) * b).clamp_(0, 1)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), f)


def contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the hue by ``f`` (B,) turns, in HSV (torchvision's ``adjust_hue``)."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (B, H, W), hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    chroma = maxc - minc
    safe_max = torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    s = chroma / safe_max
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma == 0, torch.zeros_like(h), h)
    return torch.remainder(h / 6.0, 1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """hue, saturation, value (B, H, W) -> (B, 3, H, W) RGB, elementwise: channel n in (5, 3, 1)
    is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6`` (the closed form of the
    six-sector table torchvision gathers from)."""
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)  # (B, 3, H, W)
    return v.unsqueeze(1) * (1.0 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur with sigma (B,), kernel ``2 * ceil(3 sigma) + 1``, reflect padding
    (torchvision's ``gaussian_blur``); kernels zero-padded to ``MAX_KERNEL`` share one depthwise conv."""
    b, c, hgt, wid = x.shape
    radius = MAX_KERNEL // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    half = torch.ceil(3 * sigma.to(x.dtype)).clamp(max=radius)  # (B,) kernel half-width
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.to(x.dtype)[:, None]) ** 2)  # (B, K)
    kernel = kernel * (offsets[None].abs() <= half[:, None])
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    weights = kernel.repeat_interleave(c, dim=0)  # (B * C, K)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weights.view(b * c, 1, 1, -1), groups=b * c)  # along W
    y = F.conv2d(y, weights.view(b * c, 1, -1, 1), groups=b * c)  # along H
    return y.view(b, c, hgt, wid)


def solarize(x: Tensor) -> Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


_JITTER_OPS = (brightness, contrast, saturation, hue)


def _where(mask: Tensor, op, x: Tensor, *args: Tensor) -> Tensor:
    """``op`` on the images selected by ``mask`` (B,) bool, the others unchanged."""
    if not bool(mask.any()):
        return x
    out = x.clone()
    out[mask] = op(x[mask], *(a[mask] for a in args))
    return out


def apply(views: Tensor, params: Tensor) -> Tensor:
    """Augment a batch of views on their device.

    Args:
        views: ``(B, 3, S, S)`` RGB, uint8 or float in [0, 1].
        params: ``(B, N_PARAMS)`` rows of ``sample_params`` (any device / float dtype).

    Returns:
        ``(B, 3, S, S)`` float32 RGB in [0, 1] (the backbone normalises).

    Raises:
        ValueError: shapes that do not match.
    """
    if views.ndim != 4 or views.shape[1] != 3 or params.shape != (views.shape[0], N_PARAMS):
        raise ValueError(f"expected views (B, 3, S, S) and params (B, {N_PARAMS}), got "
                         f"{tuple(views.shape)} and {tuple(params.shape)}")
    x = views.float().div_(255.0) if views.dtype == torch.uint8 else views.float()  # (B, 3, S, S)
    p = params.to(device=x.device, dtype=torch.float32)  # (B, N_PARAMS)
    jitter, order = p[:, JITTER] > 0.5, p[:, ORDER].long()  # (B,), (B, 4)
    for slot in range(4):  # each image runs its four jitter operations in its own order
        for k, op in enumerate(_JITTER_OPS):
            x = _where(jitter & (order[:, slot] == k), op, x, p[:, FACTORS][:, k])
    x = torch.where((p[:, GRAY] > 0.5).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = _where(p[:, BLUR] > 0.5, gaussian_blur, x, p[:, SIGMA])
    return torch.where((p[:, SOLARIZE] > 0.5).view(-1, 1, 1, 1), solarize(x), x)
