"""Tests for dncut.data.scenes: reproducibility, mask sizes, object/background contrast, folder layout."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dncut.data import scenes


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)  # (H, W, 3)


def test_same_seed_same_scene_and_different_seed_differs() -> None:
    a_img, a_mask = scenes.make_scene(123, size=96)
    b_img, b_mask = scenes.make_scene(123, size=96)
    c_img, c_mask = scenes.make_scene(124, size=96)
    assert a_img.mode == "RGB" and a_img.size == (96, 96)
    assert a_mask.shape == (96, 96) and a_mask.dtype == bool
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img)) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))
    assert not np.array_equal(a_mask, c_mask)


def test_make_scenes_uses_scene_seeds_and_sets_do_not_overlap() -> None:
    first = scenes.make_scenes(3, seed=0, size=64)
    img, mask = scenes.make_scene(scenes.scene_seed(0, 2), size=64)
    assert np.array_equal(np.asarray(first[2][0]), np.asarray(img)) and np.array_equal(first[2][1], mask)
    other = scenes.make_scenes(3, seed=1, size=64)
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, _ in first for b, _ in other)
    with pytest.raises(ValueError, match="size"):
        scenes.make_scene(0, size=8)


def test_mask_fraction_and_object_count() -> None:
    counts = []
    for image, mask in scenes.make_scenes(30, seed=7, size=128):
        assert scenes.MIN_FRACTION <= mask.mean() <= scenes.MAX_FRACTION
        _, n = ndimage.label(mask)
        assert 1 <= n <= 2
        counts.append(n)
    assert set(counts) == {1, 2}  # both occur


def _fine_texture_energy(gray: np.ndarray, region: np.ndarray) -> float:
    """Mean squared high-pass response (gray minus a sigma-2 blur) over a region's interior."""
    inner = ndimage.binary_erosion(region, iterations=3)
    high_pass = gray - ndimage.gaussian_filter(gray, 2.0)
    return float((high_pass[inner] ** 2).mean())


def test_objects_differ_in_colour_and_texture() -> None:
    for image, mask in scenes.make_scenes(20, seed=3, size=128):
        rgb = _rgb(image)
        fg, bg = rgb[mask].mean(axis=0), rgb[~mask].mean(axis=0)
        assert np.linalg.norm(fg - bg) > 30  # colour: mean RGB differs clearly
        fg_hsv = colorsys.rgb_to_hsv(*(fg / 255))
        bg_hsv = colorsys.rgb_to_hsv(*(bg / 255))
        assert fg_hsv[1] > bg_hsv[1]  # objects more saturated
        gray = rgb.mean(axis=2)
        assert _fine_texture_energy(gray, mask) > 4.0 * _fine_texture_energy(gray, ~mask)  # texture


def test_backgrounds_vary() -> None:
    means = np.array([_rgb(img)[~m].mean(axis=0) for img, m in scenes.make_scenes(12, seed=5, size=64)])
    assert means.std(axis=0).mean() > 15


def test_write_scene_folder(tmp_path: Path) -> None:
    stems = scenes.write_scene_folder(str(tmp_path / "gen"), n=3, seed=2, size=64)
    assert stems == ["scene_00000", "scene_00001", "scene_00002"]
    images = sorted((tmp_path / "gen" / "images").glob("*.jpg"))
    masks = sorted((tmp_path / "gen" / "masks").glob("*.png"))
    assert [p.stem for p in images] == stems and [p.stem for p in masks] == stems
    ref_img, ref_mask = scenes.make_scene(scenes.scene_seed(2, 1), size=64)
    mask = np.asarray(Image.open(masks[1]))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask > 127, ref_mask)
    jpg = _rgb(Image.open(images[1]).convert("RGB"))
    assert np.abs(jpg - _rgb(ref_img)).mean() < 8  # JPEG-compressed copy of the same scene
