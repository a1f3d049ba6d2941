"""``dncut predict``: the evaluation job's pipeline on unlabelled images, writing what it finds.

    images (folder or s3:// prefix) -> records -> stage 1 load_record (resize to eval.image_size)
      -> stage 2 NCutPredictor actors (backbone + NCut / MOST, dncut.eval.predict)
      -> stage 3 write_outputs (CPU task), per image and method:
           <out>/masks/<method>/<stem>.png   foreground mask, 0 / 255, image size
           <out>/z2/<method>/<stem>.png      the method's map (z2 for simple, y2 for tokencut,
                                             MOST's seeds, FOUND's logits), min-max scaled to 0..255
           boxes                             pixel boxes (x0, y0, x1, y1): simple's largest
                                             component, tokencut's seed component, MOST's clusters
    -> <out>/predictions.parquet: one row per image and method (status, error, mask and map
       URIs, boxes as JSON); failed images are rows with their reason.

``dncut eval-maps --masks GT --maps <out>/masks`` scores the masks (a folder of method folders).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Any

import numpy as np

from dncut import storage
from dncut.config import Config

log = logging.getLogger("dncut.predict")

PREDICTIONS_FILE = "predictions.parquet"


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_levels(values: np.ndarray) -> np.ndarray:
    """A map ``(H, W)`` min-max scaled to uint8 0..255 (flat -> 0)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.zeros(values.shape, np.uint8) if hi <= lo else np.round((values - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def image_boxes(row: dict, method: str, geometry: dict, size: tuple[int, int]) -> list[list[float]]:
    """A method's boxes for one predicted row: patch units -> network-input pixels (clipped to the
    content) -> image pixels (``size`` = (H, W); the input was resized to ``eval.image_size``)."""
    from dncut.eval.methods import box_to_pixels, largest_component_box
    from dncut.eval.most import pixel_boxes

    stride, content = int(row["stride"]), geometry["content"]
    if method == "most":
        grid = np.asarray(json.loads(row["most_boxes"]), np.float64).reshape(-1, 4)
        boxes = pixel_boxes(grid, stride, content)  # (k, 4)
    else:
        mask = np.asarray(row[f"{method}_mask"], bool)
        grid_box = row["tokencut_box"] if method == "tokencut" else largest_component_box(mask)
        boxes = box_to_pixels(grid_box, stride, content)[None]  # (1, 4)
    scale = np.array([size[1] / content[1], size[0] / content[0]] * 2)  # x, y, x, y
    return (boxes * scale).round(2).tolist()


def write_outputs(row: dict, *, methods: list[str], out_dir: str, s3: storage.S3Options | None) -> list[dict]:
    """Stage 3 (CPU task): one predicted row -> its PNGs, and one output row per method."""
    from dncut.eval.methods import image_mask, upsample_map

    image_id = str(row["image_id"])
    if row["status"] != "ok":
        return [{"image_id": image_id, "method": m, "status": "failed", "error": str(row["error"]), "mask": "",
                 "map": "", "boxes": "[]"} for m in methods]
    size = row["image"].shape[:2]
    canvas = tuple(int(s) * int(row["stride"]) for s in row[f"{methods[0]}_map"].shape)
    geometry = {"canvas": canvas, "content": tuple(int(c) for c in row["content"])}
    out = []
    for m in methods:
        try:
            # grid -> image: the map as a heat map; a grid mask, as the eval job scores it
            mask = image_mask(m, row[f"{m}_map"], np.asarray(row[f"{m}_mask"], bool), size, **geometry)  # (H, W)
            heat = upsample_map(np.asarray(row[f"{m}_map"], np.float32), size, **geometry)  # (H, W)
            mask_uri = storage.join(out_dir, "masks", m, f"{image_id}.png")
            map_uri = storage.join(out_dir, "z2", m, f"{image_id}.png")
            storage.write_bytes(mask_uri, _png(mask.astype(np.uint8) * 255), s3)
            storage.write_bytes(map_uri, _png(_to_levels(heat)), s3)
            boxes = image_boxes(row, m, geometry, size)
            out.append({"image_id": image_id, "method": m, "status": "ok", "error": "", "mask": mask_uri,
                        "map": map_uri, "boxes": json.dumps(boxes)})
        except Exception as exc:  # noqa: BLE001 - one image's failure is its row
            out.append({"image_id": image_id, "method": m, "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}", "mask": "", "map": "", "boxes": "[]"})
    return out


def predict_folder(images: str, out_dir: str, cfg: Config, *, backbone: str | None = None,
                   checkpoint: str | None = None) -> dict[str, Any]:
    """Run ``cfg.eval.methods`` on every image of ``images`` and write the outputs (module docstring).

    Args:
        images: folder or ``s3://`` prefix of images.
        out_dir: where masks, maps and ``predictions.parquet`` go (local or ``s3://``).
        cfg: the config (``eval.methods``, ``eval.image_size``, ``eval.batch_size``, ``eval.num_actors``,
            ``ncut.solver``, ``storage``).
        backbone: a registered name (default ``cfg.model.backbone``).
        checkpoint: backbone weights (default: pretrained).

    Returns:
        ``{"images", "rows", "failed", "out"}`` counts and the output folder.

    Raises:
        dncut.storage.StorageError: the image source is unreachable or empty (before any Ray work).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from dncut.backbone_specs import spec as backbone_spec
    from dncut.data.images import IMAGE_SUFFIXES
    from dncut.data.pipeline import s3_options
    from dncut.eval.batch import (NCutPredictor, _check_checkpoint, _cpu_split, _ensure_ray, _record, found_head_for,
                                  load_record)

    s3, ev = s3_options(cfg), cfg.eval
    backbone = backbone or cfg.model.backbone
    uris = storage.check_source(images, s3, IMAGE_SUFFIXES)
    _check_checkpoint(checkpoint, s3)
    found_head = found_head_for(cfg, backbone, checkpoint)
    prefix = images.rstrip("/") + "/"
    records = [_record(posixpath.splitext(u[len(prefix):] if u.startswith(prefix) else posixpath.basename(u))[0]
                       .replace("/", "_"), u) for u in uris]
    methods = list(dict.fromkeys(ev.methods))
    _ensure_ray()
    read_cpus, actor_cpus, write_cpus = _cpu_split(ev.num_actors)
    ds = (
        ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // ev.batch_size)))
        .map(load_record, fn_kwargs={"spec": backbone_spec(backbone), "image_size": ev.image_size, "s3": s3},
             num_cpus=read_cpus)
        .map_batches(NCutPredictor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs={"backbone": backbone, "checkpoint": checkpoint,
                                            "pretrained": cfg.model.pretrained, "methods": methods,
                                            "solver": cfg.ncut.solver, "use_gpu": ev.gpus_per_actor > 0, "s3": s3,
                                            "found_head": found_head})
        .flat_map(write_outputs, fn_kwargs={"methods": methods, "out_dir": out_dir, "s3": s3}, num_cpus=write_cpus)
    )
    rows = sorted(ds.iter_rows(), key=lambda r: (r["image_id"], r["method"]))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join(out_dir, PREDICTIONS_FILE), buffer.getvalue(), s3)
    failed = sorted({r["image_id"] for r in rows if r["status"] != "ok"})
    if failed:
        log.warning("predict: %d of %d images failed, e.g. %s", len(failed), len(records), failed[:3])
    return {"images": len(records), "rows": len(rows), "failed": len(failed), "out": out_dir}
