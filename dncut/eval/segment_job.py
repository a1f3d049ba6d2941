"""Unsupervised semantic segmentation as a Ray Data batch job (paper Table 3; the protocol is
``dncut.eval.segmentation``). One pipeline per (dataset, backbone, checkpoint)::

    records {image_id, image_uri, gt_size, annotations (JSON: the image's COCO instances)}
      -> map (CPU task)        read, decode in the stored pixel frame (size checked against the
                               annotation), polygons -> 21-class VOC map (rasterise_coco), image ->
                               S x S (bilinear, eval.segmentation.image_size), labels -> SCORE_SIZE
                               (nearest)
      -> map_batches (actors)  TokenExtractor: the backbone (the one inference path,
                               dncut.eval.predict.Predictor.features) -> tokens (h*w, C) float32
      -> driver                every image's tokens -> StandardScaler, PCA, k-means per seed
                               (K = 21: Hungarian matching; K = overcluster_k: majority vote) ->
                               confusion at SCORE_SIZE -> mIoU (mean over seeds)

Rows: one per image and score (``kmeans-k21`` / ``kmeans-k<K>``) in the evaluation's
``per_image.parquet``; an image that fails (unreadable, another frame than its annotation) is a
failed row with its reason and is left out of the clustering. The clustering is transductive:
all tokens of the set live on the driver (N x h*w x C float32; 159 coco-mini images at 448 px
with Lite0 stride 16: 56 MB).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np

from dncut import storage
from dncut.config import Config, EvalDataset

log = logging.getLogger(__name__)

NUM_CLASSES = 21  # background + the 20 PASCAL VOC classes (dncut.eval.segmentation.VOC_CLASSES)


def segmentation_records(spec: EvalDataset, s3: storage.S3Options | None) -> list[dict]:
    """Records of a ``task: segmentation`` dataset: the images of its instances JSON (through
    ``dncut.data.datasets.coco_dataset``: URIs, declared sizes, missing files) with each image's
    annotations as JSON (category name, polygons, crowd flag, box)."""
    from dncut.data.datasets import coco_samples, read_coco

    instances = read_coco(spec.root, spec.annotations, s3)  # read once
    samples, coco = coco_samples(instances, s3, include_crowd=True), instances.data
    names = {int(c["id"]): c["name"] for c in coco.get("categories", [])}
    by_file: dict[str, list[dict]] = {}
    ids = {int(img["id"]): img["file_name"].rsplit(".", 1)[0] for img in coco["images"]}
    for ann in coco.get("annotations", []):
        by_file.setdefault(ids.get(int(ann["image_id"]), ""), []).append(
            {"category": names.get(int(ann["category_id"]), ""), "segmentation": ann.get("segmentation"),
             "iscrowd": int(ann.get("iscrowd", 0)), "bbox": ann.get("bbox", [0, 0, 0, 0])})
    records = [{"image_id": s.image_id, "image_uri": s.image_uri, "gt_size": list(s.size or (0, 0)),
                "annotations": json.dumps(by_file.get(s.image_id, []))} for s in samples]
    return records[: spec.limit] if spec.limit else records


def load_segmentation_record(record: dict, *, image_size: int, s3: storage.S3Options | None) -> dict:
    """Stage 1 (CPU task): record -> ``input (S, S, 3) uint8`` and ``labels (SCORE_SIZE, SCORE_SIZE)
    uint8`` (255 = ignore); a failure gives ``status="failed"`` and its reason."""
    from PIL import Image

    from dncut.data.images import decode_image
    from dncut.eval.segmentation import SCORE_SIZE, rasterise_coco

    row = {"image_id": record["image_id"], "status": "ok", "error": ""}
    try:
        pil = decode_image(storage.read_bytes(record["image_uri"], s3), exif_transpose=False)
        declared = tuple(int(v) for v in record["gt_size"])
        if any(declared) and pil.size != declared:
            raise ValueError(f"the annotation declares {declared[0]}x{declared[1]} (WxH), the image decodes to "
                             f"{pil.width}x{pil.height}: not scored in another frame")
        anns = [{"category_id": i, "segmentation": a["segmentation"], "iscrowd": a["iscrowd"], "bbox": a["bbox"]}
                for i, a in enumerate(json.loads(record["annotations"]))]
        categories = {i: a["category"] for i, a in enumerate(json.loads(record["annotations"]))}
        labels = rasterise_coco(anns, categories, pil.size)  # (H, W) uint8
        row["input"] = np.asarray(pil.convert("RGB").resize((image_size, image_size), Image.BILINEAR), np.uint8)
        row["labels"] = np.asarray(Image.fromarray(labels).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST), np.uint8)
    except Exception as exc:  # noqa: BLE001 - a bad image is its row
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", input=np.zeros((image_size, image_size, 3),
                   np.uint8), labels=np.zeros((SCORE_SIZE, SCORE_SIZE), np.uint8))
    return row


class TokenExtractor:
    """Stateful Ray Data step: loads the backbone once; per batch, the tokens ``(h*w, C)`` of
    every ok row (``dncut.eval.predict.Predictor.features``; arguments as ``NCutPredictor``)."""

    def __init__(self, backbone: str, checkpoint: str | None, pretrained: bool, use_gpu: bool = False,
                 s3: storage.S3Options | None = None, factory: Any = None) -> None:
        import torch

        from dncut.eval.batch import _load_backbone
        from dncut.eval.predict import Predictor

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = _load_backbone(factory, backbone, pretrained, checkpoint, s3).to(device).eval()
        self.predictor = Predictor(model, ["simple"], "eigh", device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        n = len(batch["image_id"])
        status, error = list(batch["status"]), list(batch["error"])
        ok = [i for i in range(n) if status[i] == "ok"]
        tokens: list[np.ndarray] = [np.zeros((1, 1), np.float32)] * n
        try:
            with torch.inference_mode():
                maps = self.predictor.features([batch["input"][i] for i in ok]) if ok else []
            for i, m in zip(ok, maps):
                tokens[i] = m.flatten(1).T.cpu().numpy().astype(np.float32)  # (h*w, C)
        except Exception as exc:  # noqa: BLE001 - the batch's images fail with the reason
            for i in ok:
                status[i], error[i] = "failed", f"{type(exc).__name__}: {exc}"
        return {"image_id": batch["image_id"], "status": np.asarray(status), "error": np.asarray(error),
                "labels": batch["labels"], "tokens": tokens}


def score_segmentation(rows: list[dict], k: int, how: str, seeds: list[int]) -> list[float]:
    """mIoU of one clustering (per seed) over the ok rows (``tokens (h*w, C)``, ``labels``)."""
    from PIL import Image

    from dncut.eval.segmentation import SCORE_SIZE, assign, cluster_tokens, confusion, miou

    side = math.isqrt(rows[0]["tokens"].shape[0])  # square inputs: an (side, side) grid
    tokens = np.concatenate([r["tokens"] for r in rows])  # (N * h*w, C)
    out = []
    for seed in seeds:
        ids = cluster_tokens(tokens, k, seed=seed).reshape(len(rows), side, side)
        conf = np.zeros((k, NUM_CLASSES), np.int64)
        for grid, row in zip(ids, rows):
            pred = np.asarray(Image.fromarray(grid.astype(np.int32)).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))
            conf += confusion(pred, row["labels"], k, NUM_CLASSES)
        out.append(miou(conf, assign(conf, how))[0])
    return out


def run_segmentation(records: list[dict], *, cfg: Config, dataset: str, backbone: str, checkpoint: str | None,
                     acc, factory: Any = None) -> None:
    """One (dataset, backbone, checkpoint): per-image rows and the mIoU runs into ``acc``
    (``dncut.eval.report.Accumulator``)."""
    import ray

    from dncut.data.pipeline import s3_options
    from dncut.eval.batch import _cpu_split, _result_row

    ev, seg = cfg.eval, cfg.eval.segmentation
    read_cpus, actor_cpus, _ = _cpu_split(ev.num_actors)
    log.info("segmentation %s: %d images, backbone %s, checkpoint %s, K = %d and %d, seeds %s", dataset,
             len(records), backbone, checkpoint or "(pretrained)", NUM_CLASSES, seg.overcluster_k, seg.seeds)
    ds = (
        ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // ev.batch_size)))
        .map(load_segmentation_record, fn_kwargs={"image_size": seg.image_size, "s3": s3_options(cfg)},
             num_cpus=read_cpus)
        .map_batches(TokenExtractor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs={"backbone": backbone, "checkpoint": checkpoint,
                                            "pretrained": cfg.model.pretrained, "use_gpu": ev.gpus_per_actor > 0,
                                            "s3": s3_options(cfg), "factory": factory})
    )
    rows = sorted(ds.iter_rows(), key=lambda r: str(r["image_id"]))
    ok = [r for r in rows if r["status"] == "ok"]
    scores = {f"kmeans-k{NUM_CLASSES}": (NUM_CLASSES, "hungarian"),
              f"kmeans-k{seg.overcluster_k}": (seg.overcluster_k, "majority")}
    for method, (k, how) in scores.items():
        per_seed = score_segmentation(ok, k, how, seg.seeds) if len(ok) and sum(len(r["tokens"]) for r in ok) >= k \
            else []
        for r in rows:
            acc.add(_result_row(str(r["image_id"]), method, status=str(r["status"]), error=str(r["error"])),
                    dataset=dataset, backbone=backbone, checkpoint=checkpoint, task="segmentation")
        acc.set_metrics((dataset, method, backbone, checkpoint), {
            "miou": float(np.mean(per_seed)) if per_seed else None,
            "miou_std": float(np.std(per_seed)) if per_seed else None, "seeds": len(per_seed)})
