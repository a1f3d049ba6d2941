"""Evaluation service: unsupervised saliency, object discovery and semantic segmentation as Ray
Data batch jobs (segmentation: ``dncut.eval.segment_job``, for datasets with ``task: segmentation``).

One pipeline per (dataset, backbone, checkpoint); all methods share the backbone pass::

    records {image_id, image_uri, mask_uri | gt_boxes}
      -> map (CPU task)        read bytes (dncut.storage), decode, network_input (dncut.eval.predict:
                               saliency resizes, discovery or image_size null pads)
                               rows {image (H, W, 3) uint8, input (Hc, Wc, 3) uint8, content (2,), gt_mask (H, W)}
      -> map_batches (actors)  dncut.eval.predict.Predictor: backbone per input size, NCut per node count,
                               FOUND's head (method found: the eval.found_heads file trained on these weights)
                               adds {<method>_map (h, w) float32, <method>_mask (h, w) bool, tokencut_box (4,)}
      -> flat_map (CPU task)   upsample, bilateral solver, per-image metrics;
                               one row per (image, method) and (image, method+bs)
      -> driver                streams the rows: per_image.parquet, summary.json, summary.md,
                               examples.png, config.yaml (dncut.eval.report)

An image that fails (unreadable, corrupt, wrong mask size, too small for the grid) becomes a
row with ``status="failed"`` and the reason in ``error``: counted in ``n_failed``, never dropped,
never fatal. Metrics are means over the images that succeeded; maxFβ is the TokenCut definition
(mean Fβ curve over images, then its maximum; see ``dncut.eval.metrics``).

Training-time validation (``dncut.eval.validate``) runs the same three stage functions in
process, so ``val_iou`` and this job's IoU agree on the same weights and images.

Entry points: ``run_evaluation(cfg)``, ``evaluate_maps(masks_dir, maps_dirs, out_dir)``,
``evaluate_saliency(images_dir, masks_dir, backbone, checkpoint, methods, bilateral, out_dir)``.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from dncut import storage
from dncut.backbone_specs import BackboneSpec, spec as backbone_spec
from dncut.config import DISCOVERY_ONLY_METHODS, Config, ConfigError, EvalDataset
from dncut.data.datasets import (DatasetLayoutError, coco20k_dataset, coco_dataset, pair_by_stem,
                                 saliency_dataset, voc_dataset)
from dncut.data.images import IMAGE_SUFFIXES, check_mask_foreground, check_mask_size, decode_image, load_mask
from dncut.data.pipeline import s3_options
from dncut.eval import metrics
from dncut.eval.bilateral import refine_mask
from dncut.eval.methods import box_to_pixels, clean_binary, image_mask, largest_component_box, upsample_map
from dncut.eval.predict import METHODS, Predictor, network_input
from dncut.eval.report import Accumulator, example_payload, write_report

log = logging.getLogger(__name__)

DISCOVERY_KINDS = ("voc07", "voc12", "coco20k", "coco")
SCENE_SEED = 1_000_000  # held-out generated scenes (training uses seeds 0..num_scenes-1)
SCENE_SIZE = 224  # side of a held-out generated scene, px
RANDOM_INIT_SEED = 0  # torch seed of randomly initialised backbones in the actors (_load_backbone)
_NAN4 = np.full(4, np.nan)
BackboneFactory = Callable[..., Any]
"""``(name, *, pretrained, checkpoint) -> nn.Module`` (RGB (B, 3, H, W), uint8 or float in [0, 1]
-> (B, C, H/s, W/s), normalising itself like ``dncut.backbones.Backbone``) with a
``spec`` attribute on the FACTORY (a ``BackboneSpec``: stride and padding colour of what it
builds, for every name): custom feature extractors and tests; pickled to the actors."""


# --------------------------------------------------------------------------- records
_s3 = s3_options  # the one config -> S3Options mapping (dncut.data.pipeline)


def _record(image_id: str, image_uri: str, mask_uri: str = "", gt_boxes: str = "[]", missing: str = "",
            gt_size: tuple[int, int] | None = None) -> dict:
    """One pipeline record; ``missing`` (a reason) makes the image a failed row without reading it;
    ``gt_size`` (W, H) is the frame the annotation declares (``[0, 0]``: none declared)."""
    return {"image_id": image_id, "image_uri": image_uri, "mask_uri": mask_uri, "gt_boxes": gt_boxes,
            "missing": missing, "gt_size": list(gt_size) if gt_size else [0, 0]}


def dataset_records(spec: EvalDataset, s3: storage.S3Options | None = None, default_scenes: int = 16) -> list[dict]:
    """Plain records of one evaluation set (no image is read here).

    Args:
        spec: the dataset entry of ``cfg.eval.datasets``.
        s3: S3 endpoint options.
        default_scenes: scenes generated for ``kind: scenes`` without a ``limit``.

    Returns:
        Dicts ``{image_id, image_uri, mask_uri, gt_boxes, missing}`` (``gt_boxes``: JSON list of
        pixel boxes, ``"[]"`` for saliency), the first ``spec.limit`` only.

    Raises:
        DatasetLayoutError: missing folders / files, naming the path and the expected layout.
    """
    if spec.task == "segmentation":
        from dncut.eval.segment_job import segmentation_records

        return segmentation_records(spec, s3)
    if spec.kind == "scenes":
        n = spec.limit or default_scenes
        return [_record(f"scene_{i:05d}", f"scene://{SCENE_SEED + i}") for i in range(n)]
    if spec.kind in DISCOVERY_KINDS:
        if spec.kind == "coco20k":
            if not spec.annotations or not spec.image_list:
                raise DatasetLayoutError(f"dataset {spec.name!r} (coco20k) needs 'annotations' (instances "
                                         "JSON) and 'image_list' (file of the 19,817 image names)")
            samples = coco20k_dataset(spec.root, spec.annotations, spec.image_list, s3, spec.include_crowd)
        elif spec.kind == "coco":
            samples = coco_dataset(spec.root, spec.annotations, s3, spec.include_crowd)
        else:
            split = posixpath.splitext(posixpath.basename(spec.image_list))[0] if spec.image_list else "trainval"
            samples = voc_dataset(spec.root, "2007" if spec.kind == "voc07" else "2012", split, s3)
        records = [_record(s.image_id, s.image_uri, gt_boxes=json.dumps([list(b) for b in s.boxes]), gt_size=s.size)
                   for s in samples]
    else:
        records = [_record(s.image_id, s.image_uri, s.mask_uri) for s in saliency_dataset(spec.kind, spec.root, s3)]
    return records[: spec.limit] if spec.limit else records


def _stems(folder: str, what: str, layout: str, s3: storage.S3Options | None) -> dict[str, str]:
    """``stem -> URI`` of the images in a folder; a clear error when it is missing or empty."""
    try:
        files = storage.check_source(folder, s3, IMAGE_SUFFIXES)
    except storage.StorageError as exc:
        raise DatasetLayoutError(f"{what} folder {folder}: {exc}; expected layout: {layout}") from None
    prefix = folder.rstrip("/") + "/"
    return {posixpath.splitext(f[len(prefix):] if f.startswith(prefix) else posixpath.basename(f))[0]: f
            for f in files}


# --------------------------------------------------------------------------- stage 1: read + resize/pad
def load_record(record: dict, *, spec: BackboneSpec, image_size: int | None,
                s3: storage.S3Options | None) -> dict:
    """Stage 1 (CPU task): record -> decoded image, ground truth and network input (``network_input``
    with the backbone ``spec``'s stride and padding colour).

    Returns:
        The record plus ``status``, ``error``, ``image (H, W, 3) uint8``, ``gt_mask (H, W) bool``
        (``(1, 1)`` for discovery), ``input (Hc, Wc, 3) uint8`` and ``content (2,)`` = the
        unpadded part of the input. A failure gives ``status="failed"`` and 1-pixel placeholders.
    """
    row = dict(record)
    try:
        if record["missing"]:
            raise FileNotFoundError(record["missing"])
        uri = record["image_uri"]
        if uri.startswith("scene://"):
            from dncut.data.scenes import make_scene

            pil, gt = make_scene(int(uri[len("scene://"):]), size=SCENE_SIZE)
        else:
            declared = tuple(int(v) for v in record.get("gt_size", (0, 0)))
            # boxes describe the stored pixel frame: an annotated image is not EXIF-rotated
            pil = decode_image(storage.read_bytes(uri, s3), exif_transpose=not any(declared))
            if any(declared) and pil.size != declared:
                raise ValueError(f"the annotation declares {declared[0]}x{declared[1]} (WxH), the image decodes "
                                 f"to {pil.width}x{pil.height}: not scored in another frame")
            gt = load_mask(storage.read_bytes(record["mask_uri"], s3)) if record["mask_uri"] else None
        if gt is not None:
            check_mask_foreground(check_mask_size(pil, gt))
        image = np.asarray(pil.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        if min(image.shape[:2]) < spec.stride:
            raise ValueError(f"the image ({image.shape[1]}x{image.shape[0]}) is smaller than one patch "
                             f"({spec.stride} px): no patch grid to cut")
        net, content = network_input(image, stride=spec.stride, image_size=image_size, pad_rgb=spec.pad_rgb)
        row.update(status="ok", error="", image=image, input=net, content=np.asarray(content, np.int64),
                   gt_mask=np.zeros((1, 1), bool) if gt is None else gt)
    except Exception as exc:  # noqa: BLE001 - any bad input becomes a failed row
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", image=np.zeros((1, 1, 3), np.uint8),
                   input=np.zeros((1, 1, 3), np.uint8), content=np.ones(2, np.int64),
                   gt_mask=np.zeros((1, 1), bool))
    return row


# --------------------------------------------------------------------------- stage 2: actors
def retain_freed_memory(mmap_mb: int = 32, trim_mb: int = 256) -> bool:
    """Keep freed heap memory in this process instead of returning it to the OS (glibc ``mallopt``).

    The batched NCut allocates a few (B, n, n) float buffers per call (4-9 MB at B = 16, n = 260);
    with glibc's defaults they are mmap-ed / trimmed and page-faulted back in on every batch,
    about a quarter of the CPU NCut time (``bench/eval_throughput.py``). Blocks below ``mmap_mb``
    come from the heap, and up to ``trim_mb`` of free heap is kept. Returns False where glibc's
    ``mallopt`` is not available or refuses a setting.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, mmap_mb << 20)) and bool(libc.mallopt(m_trim_threshold, trim_mb << 20))
    except (OSError, AttributeError):
        return False


class NCutPredictor:
    """Stateful Ray Data step: loads the backbone once, then ``Predictor`` per batch.

    Args:
        backbone: backbone name (``dncut.backbone_specs``).
        checkpoint: weights URI, or ``None`` for the pretrained / default weights.
        pretrained: use pretrained weights when ``checkpoint`` is ``None``.
        methods: subset of ``("simple", "tokencut")``.
        solver: NCut eigensolver name (``cfg.ncut.solver``).
        use_gpu: run on CUDA when available.
        s3: S3 options for an ``s3://`` checkpoint.
        factory: ``(name, *, pretrained, checkpoint) -> backbone`` replacing
            ``dncut.backbones.create_backbone`` (see ``BackboneFactory``).
        found_head: the FOUND head file's bytes for this backbone and checkpoint (``found_head_for``).
    """

    def __init__(self, backbone: str, checkpoint: str | None, pretrained: bool, methods: Sequence[str],
                 solver: str, use_gpu: bool = False, s3: storage.S3Options | None = None,
                 factory: BackboneFactory | None = None, found_head: bytes | None = None) -> None:
        import torch

        from dncut.eval.found import load_head

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            retain_freed_memory()
        model = _load_backbone(factory, backbone, pretrained, checkpoint, s3).to(device)
        head = load_head(found_head)[0] if found_head is not None else None
        self.predictor = Predictor(model, methods, solver, device, found_head=head)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return predict_batch(self.predictor, batch)


def predict_batch(predictor: Predictor, batch: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 on one batch of stage-1 rows (columns: ``image_id``, ``status``, ``error``, ``input``, ...).

    Returns:
        The batch without ``input``, plus ``stride`` and the predictor's grid maps per row;
        an image the backbone or the NCut fails on gets ``status="failed"`` and the reason.
    """
    n = len(batch["image_id"])
    status, error = list(batch["status"]), list(batch["error"])
    inputs = [batch["input"][i] if status[i] == "ok" else None for i in range(n)]
    results, errors = predictor.predict(inputs)
    for i, reason in errors.items():
        status[i], error[i] = "failed", reason
    out: dict[str, Any] = {k: v for k, v in batch.items() if k != "input"}
    out["status"], out["error"] = np.asarray(status), np.asarray(error)
    out["stride"] = np.full(n, predictor.backbone.spec.stride, np.int64)
    for m in predictor.methods:
        out[f"{m}_map"] = [r[f"{m}_map"] if r else np.zeros((1, 1), np.float32) for r in results]
        out[f"{m}_mask"] = [r[f"{m}_mask"] if r else np.zeros((1, 1), bool) for r in results]
    if "tokencut" in predictor.methods:
        out["tokencut_box"] = [r["tokencut_box"] if r else np.zeros(4, np.int64) for r in results]
    if "most" in predictor.methods:  # a variable number of boxes: one JSON list per image
        out["most_boxes"] = np.asarray([json.dumps(r["most_boxes"].tolist()) if r else "[]" for r in results])
    return out


# --------------------------------------------------------------------------- stage 3: scoring
def _most_rows(row: dict, image_id: str, image: np.ndarray, heat: np.ndarray, mask: np.ndarray,
               geometry: dict, keep: bool) -> list[dict]:
    """MOST's two CorLoc rows: ``most`` (the peers' protocol: any box with IoU >= 0.5; its box is
    the first that hits, else the largest cluster's) and ``most-single`` (the largest cluster's box
    only). An image where no box survived MOST's size rules has no prediction: a miss."""
    from dncut.eval.most import pixel_boxes

    gt_boxes = np.asarray(json.loads(row["gt_boxes"]), np.float64).reshape(-1, 4)
    if not len(gt_boxes):
        raise ValueError("no ground-truth box (crowd regions left out): flagged, not scored as a miss")
    grid = np.asarray(json.loads(row["most_boxes"]), np.float64).reshape(-1, 4)
    boxes = pixel_boxes(grid, int(row["stride"]), geometry["content"])  # (k, 4), largest cluster first
    hits = [metrics.corloc_hit(b, gt_boxes) for b in boxes]
    single = boxes[0] if len(boxes) else _NAN4
    shown = boxes[hits.index(True)] if any(hits) else single
    ex = example_payload(image, heat, mask, None, None, gt_boxes, shown) if keep and len(boxes) else b""
    return [_result_row(image_id, "most", pred_box=shown, hit=float(any(hits)), example=ex),
            _result_row(image_id, "most-single", pred_box=single, hit=float(bool(hits) and hits[0]))]



def _result_row(image_id: str, method: str, *, status: str = "ok", error: str = "",
                scores: metrics.ImageScores | None = None, binary: tuple[float, float] | None = None,
                pred_box: np.ndarray = _NAN4, hit: float = math.nan, example: bytes = b"") -> dict:
    """One output row; NaN where a metric does not apply."""
    nan = math.nan
    return {
        "image_id": image_id, "method": method, "status": status, "error": error,
        "acc": scores.acc if scores else nan, "iou": scores.iou if scores else nan,
        "max_fbeta": scores.max_fbeta if scores else nan, "mae": scores.mae if scores else nan,
        "acc_binary": binary[0] if binary else nan, "iou_binary": binary[1] if binary else nan,
        "pred_box": np.asarray(pred_box, np.float64), "corloc_hit": hit,
        "fbeta_curve": metrics.fbeta_curve([scores]) if scores else np.full(metrics.N_THRESHOLDS, nan),
        "pysod_curve": metrics.fbeta_curve([scores], definition="pysod") if scores else np.full(metrics.N_LEVELS, nan),
        "pysod_mae": scores.pysod_mae if scores else nan, "example": example,
    }


def _binary_scores(mask: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(accuracy, IoU) of a bool mask; IoU = 1 when mask and GT are both empty."""
    union = np.count_nonzero(mask | gt)
    return float(np.mean(mask == gt)), 1.0 if union == 0 else np.count_nonzero(mask & gt) / union


def score_row(row: dict, *, methods: Sequence[str], bilateral: bool, discovery: bool,
              example_ids: frozenset[str] = frozenset()) -> list[dict]:
    """Stage 3 (CPU task): one image's predictions -> one scored row per method (+bs).

    Saliency: the grid mask is bilinearly upsampled to the image (padding removed) and scored
    as a binary map; with ``bilateral`` a ``<method>+bs`` row is scored on the solver's soft
    output (acc / IoU at 0.5), and ``acc_binary`` / ``iou_binary`` on its cleaned binary mask
    (holes filled, largest component). Discovery: the box (tokencut: the seed's component;
    simple: the largest component) in pixels, and whether it hits a GT box (CorLoc).
    """
    image_id = str(row["image_id"])
    if not discovery:
        methods = [m for m in methods if m not in DISCOVERY_ONLY_METHODS]
    names = [*methods, *([f"{m}+bs" for m in methods] if bilateral and not discovery else []),
             *(["most-single"] if discovery and "most" in methods else [])]
    if not methods:
        return []
    if row["status"] != "ok":
        return [_result_row(image_id, m, status="failed", error=str(row["error"])) for m in names]
    image, size = row["image"], row["image"].shape[:2]
    canvas = tuple(int(s) * int(row["stride"]) for s in row[f"{methods[0]}_map"].shape)
    geometry = {"canvas": canvas, "content": tuple(int(c) for c in row["content"])}
    out = []
    for m in methods:
        try:
            grid_mask = np.asarray(row[f"{m}_mask"], bool)
            heat = upsample_map(row[f"{m}_map"], size, **geometry)  # (H, W)
            mask = image_mask(m, row[f"{m}_map"], grid_mask, size, **geometry)  # (H, W)
            keep = image_id in example_ids
            if discovery and m == "most":
                out += _most_rows(row, image_id, image, heat, mask, geometry, keep)
                continue
            if discovery:
                box = row["tokencut_box"] if m == "tokencut" else largest_component_box(grid_mask)
                px = box_to_pixels(box, int(row["stride"]), geometry["content"])
                gt_boxes = np.asarray(json.loads(row["gt_boxes"]), np.float64).reshape(-1, 4)
                if not len(gt_boxes):
                    raise ValueError("no ground-truth box (crowd regions left out): flagged, not scored as a miss")
                hit = float(metrics.corloc_hit(px, gt_boxes))
                ex = example_payload(image, heat, mask, None, None, gt_boxes, px) if keep else b""
                out.append(_result_row(image_id, m, pred_box=px, hit=hit, example=ex))
                continue
            gt = np.asarray(row["gt_mask"], bool)
            scores = metrics.score_saliency(mask.astype(np.float32), gt)
            soft = None
            if bilateral:
                soft, binary = refine_mask(image, mask)
                cleaned = clean_binary(binary)
                bs_scores = metrics.score_saliency(soft.astype(np.float32), gt)
            ex = example_payload(image, heat, mask, soft, gt, None, None) if keep else b""
            out.append(_result_row(image_id, m, scores=scores, example=ex))
            if bilateral:
                out.append(_result_row(image_id, f"{m}+bs", scores=bs_scores,
                                       binary=_binary_scores(cleaned, gt)))
        except Exception as exc:  # noqa: BLE001 - a failed post-processing step fails this image only
            err = f"{type(exc).__name__}: {exc}"
            out.extend(_result_row(image_id, n, status="failed", error=err) for n in (m, f"{m}+bs", f"{m}-single")
                       if n in names)
    return out


# --------------------------------------------------------------------------- driver
def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)


def _cpu_split(num_actors: int) -> tuple[float, float, float]:
    """CPUs for (read tasks, each actor, scoring tasks); read != actor so Ray does not fuse them."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    actor = 1.0 if total >= num_actors + 1 else max(0.25, total / (num_actors + 1))
    return actor / 2, actor, actor


def _load_backbone(factory: BackboneFactory | None, backbone: str, pretrained: bool, checkpoint: str | None,
                   s3: storage.S3Options | None = None):
    """Build the backbone in an actor, with a message naming what failed. Weights that are neither
    pretrained nor loaded (random init: tests, smoke runs) are drawn from torch seed
    ``RANDOM_INIT_SEED``, so every actor, and an actor Ray restarts, holds the same network."""
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            if factory is not None:
                return factory(backbone, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint)
            from dncut.backbones import create_backbone

            return create_backbone(backbone, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint,
                                   s3=s3)
    except Exception as exc:
        raise RuntimeError(f"cannot build backbone {backbone!r} with checkpoint {checkpoint!r} "
                           f"(pretrained={pretrained}): {exc}") from exc


def found_head_for(cfg: Config, backbone: str, checkpoint: str | None) -> bytes | None:
    """The bytes of the ``eval.found_heads`` file trained on ``backbone`` with ``checkpoint``
    (``None`` when method found is not asked for).

    Raises:
        ConfigError: method found is asked for and no head was trained on these weights (the
            message lists what each head was trained on), or a head file is unreadable.
    """
    from dncut.eval.found import load_head, same_weights

    if "found" not in cfg.eval.methods:
        return None
    seen = []
    for uri in cfg.eval.found_heads:
        try:
            data = storage.read_bytes(uri, _s3(cfg))
        except (OSError, storage.StorageError) as exc:
            raise ConfigError(f"eval.found_heads: cannot read {uri} ({type(exc).__name__}: {exc}); "
                             "`dncut found-train` writes <output_dir>/<run_name>/found_head.safetensors") from None
        try:
            info = load_head(data, uri)[1]
        except ValueError as exc:
            raise ConfigError(f"eval.found_heads: {exc}") from None
        if info.backbone == backbone and same_weights(info.checkpoint, checkpoint):
            return data
        seen.append(f"{uri}: {info.backbone} @ {info.checkpoint or 'pretrained'}")
    raise ConfigError(f"method found: no head in eval.found_heads was trained on {backbone} @ "
                     f"{checkpoint or 'pretrained'} (`dncut found-train --set model.backbone={backbone}"
                     f"{f' --set model.checkpoint={checkpoint}' if checkpoint else ''}`); heads: {seen}")


def _check_checkpoint(checkpoint: str | None, s3: storage.S3Options | None) -> None:
    """Fail on the driver, before any actor starts, when a checkpoint does not exist."""
    if checkpoint is not None and not storage.exists(checkpoint, s3):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")


def _run_pipeline(records: list[dict], *, cfg: Config, dataset: str, discovery: bool, backbone: str,
                  checkpoint: str | None, acc: Accumulator, factory: BackboneFactory | None = None) -> None:
    """One (dataset, backbone, checkpoint): streams its scored rows into ``acc``."""
    import ray

    found_head = found_head_for(cfg, backbone, checkpoint)

    ev = cfg.eval
    methods = list(dict.fromkeys(ev.methods))
    bspec = factory.spec if factory is not None else backbone_spec(backbone)
    _check_checkpoint(checkpoint, _s3(cfg))
    read_cpus, actor_cpus, score_cpus = _cpu_split(ev.num_actors)
    example_ids = frozenset(r["image_id"] for r in records[: ev.examples])
    log.info("eval %s: %d images, backbone %s, checkpoint %s, methods %s%s", dataset, len(records),
             backbone, checkpoint or "(pretrained)", methods, " + bilateral" if ev.bilateral else "")
    ds = (
        ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // ev.batch_size)))
        .map(load_record, fn_kwargs={"spec": bspec, "image_size": None if discovery else ev.image_size,
                                     "s3": _s3(cfg)}, num_cpus=read_cpus)
        .map_batches(NCutPredictor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs={"backbone": backbone, "checkpoint": checkpoint,
                                            "pretrained": cfg.model.pretrained, "methods": methods,
                                            "solver": cfg.ncut.solver, "use_gpu": ev.gpus_per_actor > 0,
                                            "s3": _s3(cfg), "factory": factory, "found_head": found_head})
        .flat_map(score_row, fn_kwargs={"methods": methods, "bilateral": ev.bilateral, "discovery": discovery,
                                        "example_ids": example_ids}, num_cpus=score_cpus)
    )
    for row in ds.iter_rows():
        acc.add(row, dataset=dataset, backbone=backbone, checkpoint=checkpoint,
                task="discovery" if discovery else "saliency")


def _finish(acc: Accumulator, out_dir: str, cfg: Config | None, s3: storage.S3Options | None) -> dict:
    summary = acc.summary()
    write_report(out_dir, summary, acc, config_yaml=cfg.to_yaml() if cfg is not None else None, s3=s3)
    log.info("eval outputs written to %s", out_dir)
    return summary


def run_evaluation(cfg: Config, *, backbone_factory: BackboneFactory | None = None) -> dict:
    """The evaluation job of ``cfg.eval``: datasets x backbones x checkpoints x methods.

    Args:
        cfg: the resolved config; outputs go to ``storage.join(cfg.output_dir, cfg.run_name)``.
        backbone_factory: replaces ``dncut.backbones.create_backbone`` (see ``NCutPredictor``).

    Returns:
        The summary dict written to ``summary.json``: ``{"runs": [...]}``.

    Raises:
        DatasetLayoutError: a dataset root is missing or malformed (before any Ray work).
    """
    from dncut.eval.segment_job import run_segmentation

    s3 = _s3(cfg)
    # every dataset's layout is checked before any Ray work
    specs = [(spec, dataset_records(spec, s3, cfg.data.val_scenes)) for spec in cfg.eval.datasets]
    for backbone in cfg.eval_backbones():  # and every FOUND head is found before any Ray work
        for checkpoint in cfg.eval.checkpoints:
            found_head_for(cfg, backbone, checkpoint)
    _ensure_ray()
    acc = Accumulator(cfg.eval.methods)
    for spec, records in specs:
        for backbone in cfg.eval_backbones():
            for checkpoint in cfg.eval.checkpoints:
                if spec.task == "segmentation":
                    run_segmentation(records, cfg=cfg, dataset=spec.name, backbone=backbone, checkpoint=checkpoint,
                                     acc=acc, factory=backbone_factory)
                    continue
                _run_pipeline(records, cfg=cfg, dataset=spec.name, discovery=spec.kind in DISCOVERY_KINDS,
                              backbone=backbone, checkpoint=checkpoint, acc=acc, factory=backbone_factory)
    return _finish(acc, storage.join(cfg.output_dir, cfg.run_name), cfg, s3)


def _dataset_name(folder: str) -> str:
    parts = [p for p in folder.rstrip("/").split("/") if p]
    generic = {"images", "masks", "gt", "imgs", "image", "mask"}
    return parts[-2] if len(parts) > 1 and parts[-1].lower() in generic else (parts[-1] if parts else folder)


def evaluate_saliency(images_dir: str, masks_dir: str, backbone: str, checkpoint: str | None,
                      methods: str | Sequence[str], bilateral: bool, out_dir: str,
                      cfg: Config | None = None) -> dict:
    """Saliency of one backbone on an images / masks folder pair (``dncut eval-saliency``).

    Args:
        images_dir: folder of images (local or ``s3://``), ``<stem>.jpg|png|...``.
        masks_dir: folder of masks with the same stems.
        backbone: backbone name.
        checkpoint: weights URI, ``None`` = pretrained.
        methods: ``"simple"``, ``"tokencut"`` or a list of them.
        bilateral: also score the bilateral-solver refinement.
        out_dir: output folder or ``s3://`` prefix.
        cfg: base config (image size, batch size, actors, S3); ``None`` = defaults.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``).
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods {bad or methods} invalid; valid choices: {list(METHODS)}")
    cfg = (cfg or Config()).with_overrides({"eval.methods": methods, "eval.bilateral": bool(bilateral),
                                           "eval.backbones": [backbone], "eval.checkpoints": [checkpoint]})
    s3 = _s3(cfg)
    layout = "--images DIR of <stem>.jpg|png images and --masks DIR of <stem>.png masks (same stems)"
    images = _stems(images_dir, "images", layout, s3)
    masks = _stems(masks_dir, "masks", layout, s3)
    samples, lonely, lonely_masks = pair_by_stem(images, masks)
    records = [_record(s.image_id, s.image_uri, s.mask_uri) for s in samples]
    records += [_record(s, images[s], missing=f"no mask named {s}.* in {masks_dir}") for s in lonely]
    records += [_record(s, "", masks[s], missing=f"no image named {s}.* in {images_dir} (image suffixes: "
                        f"{' '.join(IMAGE_SUFFIXES)})") for s in lonely_masks]  # every input is a row
    _ensure_ray()
    acc = Accumulator(methods)
    _run_pipeline(records, cfg=cfg, dataset=_dataset_name(images_dir), discovery=False, backbone=backbone,
                  checkpoint=checkpoint, acc=acc)
    return _finish(acc, out_dir, cfg, s3)


# --------------------------------------------------------------------------- precomputed maps
def _read_map(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Saliency map bytes -> (H, W) uint8 at the mask size (bilinear resize if it differs)."""
    from PIL import Image

    gray = decode_image(data).convert("L")
    if gray.size != (size[1], size[0]):
        gray = gray.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)  # (H, W)


def score_map(record: dict, *, s3: storage.S3Options | None = None) -> dict:
    """One precomputed map vs its mask -> a scored row (``status="failed"`` on any error)."""
    try:
        if not record["map_uri"]:
            raise FileNotFoundError(f"no map named {record['image_id']}.* in {record['maps_dir']}")
        gt = check_mask_foreground(load_mask(storage.read_bytes(record["mask_uri"], s3)))
        pred = _read_map(storage.read_bytes(record["map_uri"], s3), gt.shape)
        row = _result_row(record["image_id"], record["method"], scores=metrics.score_saliency(pred, gt))
    except Exception as exc:  # noqa: BLE001
        row = _result_row(record["image_id"], record["method"], status="failed",
                          error=f"{type(exc).__name__}: {exc}")
    row["checkpoint"] = record["maps_dir"]
    return row


def _map_folders(maps_dirs: Iterable[str], s3: storage.S3Options | None) -> list[tuple[str, str]]:
    """``(method name, folder)``: a folder of maps, or a parent whose sub-folders are methods."""
    found = []
    for folder in maps_dirs:
        files = _stems(folder, "maps", "a folder of <stem>.png maps, or a folder of such folders", s3)
        prefix = folder.rstrip("/") + "/"
        subdirs = sorted({k.split("/")[0] for k in files if "/" in k})
        if any("/" not in k for k in files) or not subdirs:
            found.append((posixpath.basename(folder.rstrip("/")), folder))
        else:
            found.extend((d, prefix + d) for d in subdirs)
    return found


def evaluate_maps(masks_dir: str, maps_dirs: str | Sequence[str], out_dir: str,
                  s3: storage.S3Options | None = None) -> dict:
    """Score folders of precomputed saliency maps (``dncut eval-maps``).

    Each run's metrics hold the TokenCut-definition ``acc``, ``iou``, ``max_fbeta`` and ``mae``
    plus ``max_fbeta_pysod`` / ``mae_pysod`` (pysodmetrics' definition: min-max normalised maps,
    256 ``>=`` thresholds) so published numbers can be compared either way.

    Args:
        masks_dir: folder of ground-truth masks ``<stem>.png`` (local or ``s3://``).
        maps_dirs: folder(s) of maps ``<stem>.png``; a folder whose sub-folders are methods
            (like ``sod-val/maps``) gives one run per sub-folder.
        out_dir: output folder or ``s3://`` prefix.
        s3: S3 endpoint options.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``). A mask without a map is a
        failed row of that method.
    """
    import ray

    maps_dirs = [maps_dirs] if isinstance(maps_dirs, str) else list(maps_dirs)
    masks = _stems(masks_dir, "masks", "a folder of <stem>.png ground-truth masks", s3)
    dataset = _dataset_name(masks_dir)
    records = []
    for method, folder in _map_folders(maps_dirs, s3):
        maps = _stems(folder, "maps", "a folder of <stem>.png maps", s3)
        records += [{"image_id": s, "method": method, "mask_uri": u, "map_uri": maps.get(s, ""),
                     "maps_dir": folder} for s, u in sorted(masks.items())]
    _ensure_ray()
    log.info("eval-maps %s: %d masks x %d map folders", dataset, len(masks), len(records) // max(1, len(masks)))
    acc = Accumulator()
    blocks = max(1, -(-len(records) // 16))  # 16 maps per task: task overhead >> scoring one map
    for row in ray.data.from_items(records, override_num_blocks=blocks).map(score_map, fn_kwargs={"s3": s3}).iter_rows():
        acc.add(row, dataset=dataset, backbone="maps", checkpoint=row["checkpoint"], task="saliency",
                pysod=True)
    return _finish(acc, out_dir, None, s3)
