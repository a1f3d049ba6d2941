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
HUE = 3  # the hue's index among the jitter factors and in ORDER (brightness, contrast, saturation, hue)
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


def gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (torchvision's ``rgb_to_grayscale``): (B, 3, H, W) -> (B, 1, H, W)."""
    luma = torch.add(0.2989 * x[:, 0], x[:, 1], alpha=0.587)
    return torch.add(luma, x[:, 2], alpha=0.114).unsqueeze(1)


def blend(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """Brightness, contrast or saturation, each image its own, in one pass over the batch.

    torchvision's three ops are one blend ``clamp(f x + (1 - f) base, 0, 1)`` with ``base`` black
    (brightness), the image's mean luma (contrast) or its luma (saturation)::

        x (B, 3, H, W) in [0, 1], op (B,) long: 0 brightness, 1 contrast, 2 saturation, any other
        value leaves the image unchanged; factor (B,) -> (B, 3, H, W)

    ``torch.lerp(base, x, f)`` is ``x`` exactly at ``f = 1`` (the unchanged images).
    """
    luma = gray(x)  # (B, 1, H, W)
    m = op.view(-1, 1, 1, 1)
    base = torch.where(m == 2, luma, luma.mean(dim=(2, 3), keepdim=True) * (m == 1))  # (B, 1, H, W)
    f = torch.where((op >= 0) & (op <= 2), factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
    return torch.lerp(base, x, f).clamp_(0, 1)


def hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the hue by ``f`` (B,) turns (torchvision's ``adjust_hue``): (B, 3, H, W) -> (B, 3, H, W).

    Closed form of torchvision's HSV round trip: with ``v = max``, chroma ``c = max - min`` and the
    hue in sixths ``h6`` (``(g - b) / c``, ``2 + (b - r) / c`` or ``4 + (r - g) / c`` for a red,
    green or blue maximum, first maximum wins as in torchvision), channel n of (r, g, b) is
    ``v - c clamp(min(k, 4 - k), 0, 1)`` with ``k = (5 - 2n + h6 + 6 f) mod 6``; grey pixels
    (``c = 0``) stay ``v``.
    """
    v, top = x.max(dim=1, keepdim=True)  # (B, 1, H, W) value, index of the first maximum
    c = v - x.amin(dim=1, keepdim=True)  # (B, 1, H, W) chroma
    after, before = x.gather(1, (top + 1) % 3), x.gather(1, (top + 2) % 3)  # (g, b) | (b, r) | (r, g)
    h6 = (after - before) / c.clamp_min(torch.finfo(x.dtype).tiny) + 2.0 * top  # (B, 1, H, W) sixths
    h6 += 6.0 * f.view(-1, 1, 1, 1)  # rotated
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + h6, 6.0)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)  # (B, 3, H, W)
    return torch.addcmul(v, c, ramp, value=-1.0)  # v - c * ramp


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


def _subsets(rows: Tensor, device: torch.device) -> dict[int | str, Tensor]:
    """The images each subset operation applies to, decided on the host from the ``(B, N_PARAMS)``
    CPU rows: ``{slot: idx}`` for the hue in jitter slot 0..3, and ``"gray"``, ``"blur"``,
    ``"solarize"``, each a ``(k,)`` long index on ``device`` (empty subsets left out). One pinned
    host-to-device copy for all of them; with the rows copied to the host once (``apply``), the
    operations need no further device-to-host sync (a boolean mask on the device would need one
    per operation to size its result)."""
    jitter, order = rows[:, JITTER] > 0.5, rows[:, ORDER].long()  # (B,), (B, 4)
    masks: dict[int | str, Tensor] = {slot: jitter & (order[:, slot] == HUE) for slot in range(4)}
    masks.update(gray=rows[:, GRAY] > 0.5, blur=rows[:, BLUR] > 0.5, solarize=rows[:, SOLARIZE] > 0.5)
    found = {key: m.nonzero().flatten() for key, m in masks.items() if bool(m.any())}
    if not found:
        return {}
    flat = torch.cat(list(found.values()))  # (total,) on the host
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return dict(zip(found, flat.split([len(v) for v in found.values()])))


def _on(x: Tensor, idx: Tensor | None, op, *args: Tensor) -> None:
    """``x[idx] = op(x[idx], *(a[idx] for a in args))`` in place; all of ``x`` when ``idx`` covers it."""
    if idx is None:
        return
    if len(idx) == len(x):  # every image: no gather / scatter
        x.copy_(op(x, *args))
        return
    x.index_copy_(0, idx, op(x.index_select(0, idx), *(a.index_select(0, idx) for a in args)))


def apply(views: Tensor, params: Tensor) -> Tensor:
    """Augment a batch of views on their device.

    Each jitter slot is one ``blend`` pass over the whole batch (brightness, contrast and
    saturation; factor 1 elsewhere) and a ``hue`` on the images whose slot holds it. Grayscale,
    blur and solarize run on their images only. Which images those are is read from ``params`` on
    the host once (one small copy when they are on the device); the batch then runs with no host
    syncs.

    Args:
        views: ``(B, 3, S, S)`` RGB, uint8 or float in [0, 1]; not modified.
        params: ``(B, N_PARAMS)`` rows of ``sample_params`` (any device / float dtype).

    Returns:
        ``(B, 3, S, S)`` float32 RGB in [0, 1] (the backbone normalises).

    Raises:
        ValueError: shapes that do not match.
    """
    if views.ndim != 4 or views.shape[1] != 3 or params.shape != (views.shape[0], N_PARAMS):
        raise ValueError(f"expected views (B, 3, S, S) and params (B, {N_PARAMS}), got "
                         f"{tuple(views.shape)} and {tuple(params.shape)}")
    # (B, 3, S, S) float32, our own copy (changed in place below); uint8 converted and scaled in one kernel
    if views.dtype == torch.uint8:
        x = torch.div(views, 255.0, out=torch.empty(views.shape, dtype=torch.float32, device=views.device))
    else:
        x = views.to(torch.float32, copy=True)
    p = params.to(device=x.device, dtype=torch.float32)  # (B, N_PARAMS) on the device
    subsets = _subsets(params.detach().to("cpu", torch.float32), x.device)
    factors = p[:, FACTORS]  # (B, 4)
    slot_ops = torch.where(p[:, JITTER:JITTER + 1] > 0.5, p[:, ORDER], -1.0).long()  # (B, 4), -1: no jitter
    for slot in range(4):  # each image runs its four jitter operations in its own order
        op = slot_ops[:, slot]  # (B,)
        x = blend(x, op, factors.gather(1, op.clamp(0, HUE).unsqueeze(1)).squeeze(1))
        _on(x, subsets.get(slot), hue, factors[:, HUE])
    _on(x, subsets.get("gray"), lambda v: gray(v).expand_as(v))
    _on(x, subsets.get("blur"), gaussian_blur, p[:, SIGMA])
    _on(x, subsets.get("solarize"), solarize)
    return x
