"""The predict job's outputs, one input image at a time: unique output names, mask / z2 PNGs,
boxes, and the pairing of such maps with ground-truth masks (``dncut eval-maps``).

    predict_records(uris, folder)     one record per image; ``image_id`` = the path below ``folder``
                                      with its extension kept, so no two inputs share an output name
    write_outputs(row, methods, ...)  masks/<method>/<image_id>.png, z2/<method>/<image_id>.png and a
                                      row per method (failed rows keep their reason)
    pair_maps(masks, maps)            <stem>.png masks with <stem>.png or <stem>.<ext>.png maps

Rows come from ``dncut.eval.stages`` (``load_record`` -> ``NCutPredictor``).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Sequence

import numpy as np

from dncut.data.images import IMAGE_SUFFIXES
from dncut.eval.methods import box_to_pixels, image_mask, largest_component_box, upsample_map
from dncut.eval.stages import geometry, reason, record
from dncut.storage import Storage


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 array ``(H, W)`` or ``(H, W, 3)`` as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_levels(values: np.ndarray) -> np.ndarray:
    """A map ``(H, W)`` min-max scaled to uint8 0..255 (flat -> 0)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def image_boxes(row: dict, method: str, where: dict, size: tuple[int, int]) -> list[list[float]]:
    """A method's boxes ``[[x0, y0, x1, y1], ...]`` for one predicted row: patch units ->
    network-input pixels (clipped to the content, ``where`` = ``geometry(row, method)``) -> image
    pixels (``size`` = (H, W); the input was resized to ``eval.image_size``)."""
    from dncut.eval.most import pixel_boxes

    stride, content = int(row["stride"]), where["content"]
    if method == "most":
        grid = np.asarray(json.loads(row["most_boxes"]), np.float64).reshape(-1, 4)
        boxes = pixel_boxes(grid, stride, content)  # (k, 4)
    else:
        mask = np.asarray(row[f"{method}_mask"], bool)
        grid_box = row["tokencut_box"] if method == "tokencut" else largest_component_box(mask)
        boxes = box_to_pixels(grid_box, stride, content)[None]  # (1, 4)
    scale = np.array([size[1] / content[1], size[0] / content[0]] * 2)  # x, y, x, y
    return (boxes * scale).round(2).tolist()


def predict_records(uris: Sequence[str], folder: str) -> list[dict]:
    """The predict job's records, one per image URI listed below ``folder``, in sorted order.

    Naming rule (the output names of ``write_outputs`` are ``<image_id>.png``): ``image_id`` is the
    image's path relative to ``folder`` with its extension kept (``sub/x.jpg``; the base name for a
    URI outside ``folder``), so ``photo.jpg`` / ``photo.png`` and ``sub/x.jpg`` / ``sub_x.jpg`` get
    four distinct files. Two ids equal but for letter case (``A.jpg``, ``a.jpg``) would overwrite
    each other's files on a case-insensitive file system: the first in sorted order is kept and
    every other is a record with ``missing`` set (a failed row naming the kept one), never an
    overwrite.
    """
    prefix = folder.rstrip("/") + "/"
    owners: dict[str, str] = {}  # casefolded id -> the URI that owns its output names
    out = []
    for uri in sorted(uris):
        image_id = uri[len(prefix):] if uri.startswith(prefix) else posixpath.basename(uri)
        owner = owners.setdefault(image_id.casefold(), uri)
        missing = "" if owner == uri else (
            f"output name {image_id}.png collides with that of {owner} (the same name but for letter case, which "
            "a case-insensitive file system cannot tell apart): rename one of the two")
        out.append(record(image_id, uri, missing=missing))
    return out


def map_key_stem(key: str) -> str:
    """A map's key (its path below the maps folder without ``.png``) -> the stem it scores:
    an image extension kept by ``dncut predict`` is dropped (``sub/x.jpg`` -> ``sub/x``)."""
    stem, ext = posixpath.splitext(key)
    return stem if ext.lower() in IMAGE_SUFFIXES else key


def pair_maps(masks: dict[str, str], maps: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Pair ground-truth masks with maps, both ``stem -> URI`` (stems keep their sub-folder).

    Rule: the map whose key is the mask's stem (``x.png`` for mask ``x.png``); else the one map
    whose key is that stem plus an image extension (``dncut predict``'s ``x.jpg.png``). Several
    such maps (``x.jpg.png`` and ``x.png.png``) are ambiguous.

    Returns:
        ``mask stem -> (map URI, "")``, or ``("", reason)`` when no map or several match.
    """
    by_stem: dict[str, list[str]] = {}
    for key in sorted(maps):
        by_stem.setdefault(map_key_stem(key), []).append(key)
    out = {}
    for stem in masks:
        if stem in maps:
            out[stem] = (maps[stem], "")
            continue
        keys = by_stem.get(stem, [])
        if len(keys) == 1:
            out[stem] = (maps[keys[0]], "")
        elif keys:
            out[stem] = ("", f"maps {', '.join(k + '.png' for k in keys)} all match mask {stem}: ambiguous")
        else:
            out[stem] = ("", "")
    return out


def write_outputs(row: dict, *, methods: list[str], out_dir: str, store: Storage | None = None) -> list[dict]:
    """Write (CPU task, the predict job): one predicted row -> per method
    ``<out_dir>/masks/<method>/<image_id>.png`` (0 / 255, image size) and ``<out_dir>/z2/<method>/
    <image_id>.png`` (the map min-max scaled to 0..255; ``image_id`` as ``predict_records`` names
    it: ``sub/x.jpg`` -> ``masks/<method>/sub/x.jpg.png``), and one output row per method:
    ``{image_id, method, status, error, mask (URI), map (URI), boxes (JSON, image pixels)}``."""
    store = store or Storage()
    image_id = str(row["image_id"])
    if row["status"] != "ok":
        return [{"image_id": image_id, "method": m, "status": "failed", "error": str(row["error"]), "mask": "",
                 "map": "", "boxes": "[]"} for m in methods]
    size = row["image"].shape[:2]
    out = []
    for m in methods:
        try:
            # grid -> image: the map as a heat map; a grid mask, as the eval job scores it
            where = geometry(row, m)
            mask = image_mask(m, row[f"{m}_map"], np.asarray(row[f"{m}_mask"], bool), size, **where)  # (H, W)
            heat = upsample_map(np.asarray(row[f"{m}_map"], np.float32), size, **where)  # (H, W)
            mask_uri = store.join(out_dir, "masks", m, f"{image_id}.png")
            map_uri = store.join(out_dir, "z2", m, f"{image_id}.png")
            store.write_bytes(mask_uri, png_bytes(mask.astype(np.uint8) * 255))
            store.write_bytes(map_uri, png_bytes(to_levels(heat)))
            out.append({"image_id": image_id, "method": m, "status": "ok", "error": "", "mask": mask_uri,
                        "map": map_uri, "boxes": json.dumps(image_boxes(row, m, where, size))})
        except Exception as exc:  # noqa: BLE001 - one image's failure is its row
            out.append({"image_id": image_id, "method": m, "status": "failed", "error": reason(exc),
                        "mask": "", "map": "", "boxes": "[]"})
    return out
