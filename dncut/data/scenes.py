"""Generated scenes: seeded, reproducible images with known foreground masks (demo data and tests).

    make_scene(seed, size) -> (image: PIL RGB (size, size), mask: np.ndarray (size, size) bool)

Each scene has one or two objects (ellipse, smooth blob or star-shaped polygon) covering 10-40 %
of the image together. Objects differ from the background in colour (hue at least a quarter turn
away, more saturated) AND texture (fine stripes / checks / dots, period 4-10 px, versus a smooth
gradient with low-frequency noise or broad low-contrast stripes). ``write_scene_folder`` writes the
generic saliency layout ``root/images/<stem>.jpg`` + ``root/masks/<stem>.png`` (local or ``s3://``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

MIN_FRACTION = 0.10  # smallest foreground share of the image
MAX_FRACTION = 0.40  # largest foreground share of the image
_HUE_GAP = 0.25  # minimum circular hue distance object <-> background (fraction of a turn)
_MAX_TRIES = 100

ShapeKind = Literal["ellipse", "blob", "polygon"]
_SHAPES: tuple[ShapeKind, ...] = ("ellipse", "blob", "polygon")


# ----------------------------------------------------------------------------------------------
# Shapes: boolean masks (size, size)
# ----------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each (size, size) float."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")


def _ellipse(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    aspect = rng.uniform(0.6, 1.0)
    a, b = radius / np.sqrt(aspect), radius * np.sqrt(aspect)  # area pi * a * b = pi * radius^2
    theta = rng.uniform(0, np.pi)
    y, x = _grid(size)
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _blob(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Star-shaped smooth blob: r(phi) = radius * (1 + sum_k a_k cos(k phi + p_k)), k = 2..4."""
    y, x = _grid(size)
    phi = np.arctan2(y - cy, x - cx)
    r = np.ones_like(phi)
    for k in (2, 3, 4):
        r += rng.uniform(0.0, 0.22 / (k - 1)) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.hypot(y - cy, x - cx) <= radius * r


def _polygon(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Star-shaped polygon with 3-7 vertices around the centre."""
    n = int(rng.integers(3, 8))
    angles = rng.uniform(0, 2 * np.pi) + (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    radii = radius * rng.uniform(1.0, 1.35, n)  # polygons are smaller than their circumcircle
    pts = [(float(cx + r * np.cos(t)), float(cy + r * np.sin(t))) for r, t in zip(radii, angles)]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    return np.asarray(canvas) > 127


def _object_masks(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """One or two object masks whose union covers MIN_FRACTION..MAX_FRACTION of the image."""
    for _ in range(_MAX_TRIES):
        count = int(rng.integers(1, 3))
        total = rng.uniform(MIN_FRACTION + 0.03, MAX_FRACTION - 0.05) * size * size
        shares = rng.dirichlet([3.0] * count)
        masks = []
        for share in shares:
            radius = np.sqrt(total * share / np.pi)
            margin = min(1.1 * radius, size / 2)
            cy, cx = rng.uniform(margin, size - margin, 2)
            kind = _SHAPES[int(rng.integers(len(_SHAPES)))]
            masks.append({"ellipse": _ellipse, "blob": _blob, "polygon": _polygon}[kind](rng, size, cy, cx, radius))
        union = np.logical_or.reduce(masks)
        if MIN_FRACTION <= union.mean() <= MAX_FRACTION and all(m.mean() >= 0.02 for m in masks):
            return masks
    raise RuntimeError(f"could not place objects covering {MIN_FRACTION}-{MAX_FRACTION} of a {size}px image")


# ----------------------------------------------------------------------------------------------
# Textures: float maps (size, size) in [-1, 1]
# ----------------------------------------------------------------------------------------------


def _low_freq_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise: a (cells, cells) random grid bicubically upsampled, scaled to [-1, 1]."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return smooth / 127.5 - 1.0


def _stripes(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    y, x = _grid(size)
    theta = rng.uniform(0, np.pi)
    return np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))


def _background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradient + low-frequency noise, sometimes with broad faint stripes."""
    y, x = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    gradient = ((x * np.cos(theta) + y * np.sin(theta)) / size) * 2 - 1  # roughly [-1.4, 1.4]
    tex = 0.5 * np.clip(gradient, -1, 1) + 0.35 * _low_freq_noise(rng, size, int(rng.integers(3, 6)))
    if rng.random() < 0.5:
        tex += 0.25 * _stripes(rng, size, period=rng.uniform(0.2, 0.4) * size)
    return np.clip(tex, -1, 1)


def _object_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Fine high-contrast texture: stripes, checks or dots with a 4-10 px period."""
    period = rng.uniform(4.0, 10.0)
    kind = int(rng.integers(3))
    if kind == 0:
        return _stripes(rng, size, period)
    a, b = _stripes(rng, size, period), _stripes(rng, size, period)
    if kind == 1:
        return np.sign(a * b + 1e-9)  # checks
    return np.where((a > 0.4) & (b > 0.4), 1.0, -0.6)  # dots on a darker base


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV maps (size, size) with s, v in [0, 1] and hue in turns -> uint8 RGB (size, size, 3)."""
    h6 = (h % 1.0) * 6.0
    s, v = np.clip(s, 0, 1), np.clip(v, 0, 1)
    sector = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]  # R, G, B per sector
    rgb = np.zeros(h.shape + (3,))  # (H, W, 3)
    for k, channels in enumerate(table):
        sel = sector == k
        for c in range(3):
            rgb[..., c][sel] = channels[c][sel]
    return np.round(rgb * 255).astype(np.uint8)


def make_scene(seed: int, size: int = 224) -> tuple[Image.Image, np.ndarray]:
    """One generated scene.

    Args:
        seed: Any integer; the same seed gives the same image and mask.
        size: Side length in pixels (>= 32).

    Returns:
        ``(image, mask)``: PIL RGB image (size x size) and a (size, size) bool foreground mask.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size!r}")
    rng = np.random.default_rng(int(seed))
    masks = _object_masks(rng, size)

    bg_hue = rng.uniform(0, 1)
    bg_tex = _background_texture(rng, size)
    hue = bg_hue + 0.03 * bg_tex
    sat = np.full((size, size), rng.uniform(0.15, 0.45)) + 0.08 * bg_tex
    val = rng.uniform(0.45, 0.7) + 0.22 * bg_tex

    for obj in masks:
        obj_hue = bg_hue + rng.uniform(_HUE_GAP, 1 - _HUE_GAP)
        tex = _object_texture(rng, size)
        hue = np.where(obj, obj_hue + 0.02 * tex, hue)
        sat = np.where(obj, rng.uniform(0.65, 0.95) + 0.05 * tex, sat)
        val = np.where(obj, rng.uniform(0.55, 0.8) + rng.uniform(0.15, 0.25) * tex, val)

    rgb = _hsv_to_rgb(hue, sat, val).astype(np.float64)  # (H, W, 3)
    rgb += rng.normal(0.0, 2.0, rgb.shape)  # mild sensor noise
    image = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))  # RGB
    return image, np.logical_or.reduce(masks)


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in the set ``seed`` (sets with different seeds do not overlap)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def make_scenes(n: int, seed: int = 0, size: int = 224) -> list[tuple[Image.Image, np.ndarray]]:
    """``n`` scenes; scene i is ``make_scene(scene_seed(seed, i), size)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    return [make_scene(scene_seed(seed, i), size) for i in range(n)]


def _write(uri: str, data: bytes) -> None:
    if "://" in uri:
        from dncut import storage

        storage.write_bytes(uri, data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_scene_folder(root: str, n: int, seed: int = 0, size: int = 224) -> list[str]:
    """Write ``n`` scenes as ``root/images/scene_00000.jpg`` and ``root/masks/scene_00000.png``.

    Args:
        root: Local folder or ``s3://bucket/prefix``.
        n: Number of scenes.
        seed: Scene-set seed (see ``scene_seed``).
        size: Side length in pixels.

    Returns:
        The stems written, in order (``scene_00000`` ...).
    """
    root = str(root).rstrip("/")
    stems = []
    for i, (image, mask) in enumerate(make_scenes(n, seed=seed, size=size)):
        stem = f"scene_{i:05d}"
        jpg, png = io.BytesIO(), io.BytesIO()
        image.save(jpg, format="JPEG", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(png, format="PNG")  # mode L
        _write(f"{root}/images/{stem}.jpg", jpg.getvalue())
        _write(f"{root}/masks/{stem}.png", png.getvalue())
        stems.append(stem)
    return stems
