"""In-process Simple-NCut saliency of a backbone on a small labelled set (no Ray).

Used by training-time validation, the demo (before/after) and ``bench/finetune_quality.py``.
It runs the evaluation job's own stages (``dncut.eval.stages``: ``load_record`` ->
``predict_batch`` -> ``score_row`` -> ``Accumulator``) in process, in the job's batches of
``eval.batch_size``, so ``val_iou`` equals ``dncut eval-saliency``'s IoU on the same weights
and images::

    data.val (images/ + masks/, local or s3://) or held-out generated scenes
      -> validation_rows: decoded rows, loaded once (network input for the run's backbone)
      -> score_backbone: Predictor (backbone in eval mode, cfg.ncut.solver) -> grid z2 / masks
         -> upsampled to each image -> IoU, Acc, maxFβ, MAE over the images
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dncut.backbone_specs import spec as backbone_spec
from dncut.config import Config, EvalDataset
from dncut.eval.predict import Predictor
from dncut.eval.report import Accumulator
from dncut.eval.stages import dataset_records, load_record, predict_batch, score_row

log = logging.getLogger(__name__)

METHOD = "simple"  # the paper's evaluation of its own features (REFERENCE §2)


def validation_rows(cfg: Config) -> list[dict[str, Any]]:
    """Decoded rows (``dncut.eval.stages.load_record``) of ``data.val`` (images/ + masks/) or
    ``data.val_scenes`` held-out scenes.

    Rows that fail to load (unreadable image, mask of another size) are dropped here with a
    warning that counts them.

    Raises:
        dncut.data.datasets.DatasetLayoutError: the folder lacks images/ or masks/.
        ValueError: no row could be loaded.
    """
    if cfg.data.val is None:
        dataset = EvalDataset(name="val", kind="scenes", limit=cfg.data.val_scenes)
    else:
        dataset = EvalDataset(name="val", kind="folder", root=cfg.data.val)
    store = cfg.storage_handle()
    spec = backbone_spec(cfg.model.backbone)
    rows = [load_record(r, spec=spec, image_size=cfg.eval.image_size, store=store)
            for r in dataset_records(dataset, store)]
    failed = [f"{r['image_id']}: {r['error']}" for r in rows if r["status"] != "ok"]
    if failed:
        log.warning("validation set %s: skipped %d of %d unreadable or mismatched pairs, e.g. %s",
                    cfg.data.val or "scenes", len(failed), len(rows), failed[:3])
    rows = [r for r in rows if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"validation set {cfg.data.val}: no readable image/mask pair ({len(failed)} failed)")
    return rows


def score_backbone(backbone: torch.nn.Module, rows: list[dict[str, Any]], cfg: Config,
                   device: str | torch.device = "cpu") -> tuple[dict[str, float], list[np.ndarray]]:
    """Simple-NCut saliency of ``backbone`` on decoded ``rows`` (``validation_rows``).

    Args:
        backbone: a ``dncut.backbones.Backbone``; run in eval mode, every module's mode restored.
        rows: decoded rows (``dncut.eval.stages.load_record``, built for this backbone's stride).
        cfg: ``eval.batch_size`` and ``ncut.solver``, as the evaluation job uses them.
        device: where the backbone runs.

    Returns:
        ``({"acc", "iou", "max_fbeta", "mae", "failed"}, z2 grid maps (h, w) per row)``: means over
        the images that succeeded, NaN when every image failed (e.g. non-finite features);
        ``failed`` counts the images left out (logged with their reasons).
    """
    predictor = Predictor(backbone, [METHOD], cfg.ncut.solver, device)
    acc = Accumulator([METHOD])
    maps: list[np.ndarray] = []
    size = cfg.eval.batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        out = predict_batch(predictor, {k: [r[k] for r in chunk] for k in chunk[0]})
        for i in range(len(chunk)):
            row = {k: v[i] for k, v in out.items()}
            maps.append(np.asarray(row[f"{METHOD}_map"]))
            for scored in score_row(row, methods=[METHOD], bilateral=False, discovery=False):
                acc.add(scored, dataset="val", backbone=backbone.spec.name, checkpoint=None, task="saliency")
    (run,) = acc.summary()["runs"]
    if run["n_failed"]:
        reasons = [r["error"] for r in acc.failures]
        log.warning("validation: %d of %d images failed and are left out, e.g. %s", run["n_failed"], len(rows),
                    reasons[:2])
    scores = {k: float("nan") if run["metrics"][k] is None else float(run["metrics"][k])
              for k in ("acc", "iou", "max_fbeta", "mae")}
    return {**scores, "failed": float(run["n_failed"])}, maps
