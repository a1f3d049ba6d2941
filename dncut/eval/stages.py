"""The evaluation stages: records, decode, the predictor actor, scoring (public; the jobs of
``dncut.eval.jobs`` chain them on Ray Data, ``dncut.eval.validate`` runs them in process).

One evaluation image, from its record to its row in ``per_image.parquet``::

    record  (record, dataset_records)           {image_id, image_uri, mask_uri, gt_boxes (JSON list of
                                                 pixel boxes), missing (a reason: fail unread),
                                                 gt_size [W, H] ([0, 0]: none declared)}; in the jobs
                                                 + record_index (int64, its position among the
                                                 records: dncut.eval.streamed.indexed), carried by
                                                 every stage to the scored rows
      -> decode (load_record, CPU task)         + status, error, image (H, W, 3) uint8,
                                                 gt_mask (H, W) bool ((1, 1) for discovery),
                                                 gt_void (H, W) bool (left out of the scores),
                                                 input (Hc, Wc, 3) uint8 (dncut.eval.predict.network_input),
                                                 content (2,) int64 = the unpadded part of the input
      -> predict (NCutPredictor, actor)         - input; + stride, <method>_map (h, w) float32,
                                                 <method>_mask (h, w) bool, tokencut_box (4,) int64
                                                 (patch units), most_boxes (JSON list of grid boxes)
      -> score (score_row, CPU task)            one scored row (result_row) per method, <method>+bs
                                                 (bilateral solver) and most-single

A scored row (``result_row``) is ``{image_id, method, status, error, acc, iou, max_fbeta, mae,
acc_binary, iou_binary, pred_box (4,) float64 pixels, corloc_hit, fbeta_curve
(metrics.N_THRESHOLDS,), pysod_curve (metrics.N_LEVELS,), pysod_mae, example (bytes)}``, NaN
where a metric does not apply. An image that fails at any stage (unreadable, corrupt, mask of
another size, smaller than one patch, non-finite features) carries ``status="failed"`` and the
reason in ``error`` from there on, with 1-pixel placeholders for its arrays: it is counted in
``n_failed`` (``dncut.eval.report.Accumulator``), never dropped, never fatal.

Other jobs' stages: ``score_map`` (a precomputed saliency map against its mask), the
segmentation stages (``segmentation_records`` -> ``load_segmentation_record`` ->
``TokenExtractor`` -> ``score_segmentation``) and the predict job's outputs (``dncut.eval.outputs``).
Every stage that reads or writes files takes the ``dncut.storage.Storage`` handle built once
on the driver (``Config.storage_handle()``).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dncut.backbone_specs import BackboneSpec
from dncut.config import DISCOVERY_ONLY_METHODS, EvalDataset
from dncut.data.datasets import DatasetLayoutError, coco20k_dataset, coco_dataset, saliency_dataset, voc_dataset
from dncut.data.images import check_mask_foreground, check_mask_size, decode_image, read_mask
from dncut.eval import metrics
from dncut.eval.bilateral import refine_mask
from dncut.eval.methods import box_to_pixels, clean_binary, image_mask, largest_component_box, upsample_map
from dncut.eval.predict import Predictor, network_input
from dncut.eval.report import example_payload
from dncut.eval.segmentation import VOC_CLASSES
from dncut.eval.streamed import RECORD_INDEX
from dncut.runtime import retain_freed_memory
from dncut.storage import Storage

DISCOVERY_KINDS = ("voc07", "voc12", "coco20k", "coco")
"""Dataset kinds scored as object discovery (CorLoc); every other kind is saliency."""
SCENE_SEED = 1_000_000  # held-out generated scenes (training uses seeds 0..num_scenes-1)
SCENE_SIZE = 224  # side of a held-out generated scene, px
RANDOM_INIT_SEED = 0  # torch seed of backbones built without weights (load_backbone)
SEGMENTATION_CLASSES = len(VOC_CLASSES)  # 21: background + the 20 PASCAL VOC classes
NAN_BOX = np.full(4, np.nan)  # pred_box of a row without a box

BackboneFactory = Callable[..., Any]
"""``(name, *, pretrained, checkpoint) -> nn.Module`` (RGB (B, 3, H, W), uint8 or float in [0, 1]
-> (B, C, H/s, W/s), normalising itself like ``dncut.backbones.Backbone``) with a
``spec`` attribute on the FACTORY (a ``BackboneSpec``: stride and padding colour of what it
builds, for every name): custom feature extractors and tests; pickled to the actors."""


# --------------------------------------------------------------------------- records
def record(image_id: str, image_uri: str, mask_uri: str = "", gt_boxes: str = "[]", missing: str = "",
           gt_size: tuple[int, int] | None = None) -> dict:
    """One pipeline record (schema in the module docstring); ``missing`` (a reason) makes the image
    a failed row without reading it; ``gt_size`` (W, H) is the frame the annotation declares."""
    return {"image_id": image_id, "image_uri": image_uri, "mask_uri": mask_uri, "gt_boxes": gt_boxes,
            "missing": missing, "gt_size": list(gt_size) if gt_size else [0, 0]}


def dataset_records(spec: EvalDataset, store: Storage | None = None, default_scenes: int = 16) -> list[dict]:
    """Plain records of one evaluation set (no image is read here).

    Args:
        spec: the dataset entry of ``cfg.eval.datasets``.
        store: the storage handle (``None``: the environment's defaults).
        default_scenes: scenes generated for ``kind: scenes`` without a ``limit``.

    Returns:
        ``record`` dicts (``gt_boxes``: JSON list of pixel boxes, ``"[]"`` for saliency), the first
        ``spec.limit`` only; for ``task: segmentation`` the records of ``segmentation_records``.

    Raises:
        DatasetLayoutError: missing folders / files, naming the path and the expected layout.
    """
    store = store or Storage()
    if spec.task == "segmentation":
        return segmentation_records(spec, store)
    if spec.kind == "scenes":
        n = spec.limit or default_scenes
        return [record(f"scene_{i:05d}", f"scene://{SCENE_SEED + i}") for i in range(n)]
    if spec.kind in DISCOVERY_KINDS:
        if spec.kind == "coco20k":
            if not spec.annotations or not spec.image_list:
                raise DatasetLayoutError(f"dataset {spec.name!r} (coco20k) needs 'annotations' (instances "
                                         "JSON) and 'image_list' (file of the 19,817 image names)")
            samples = coco20k_dataset(spec.root, spec.annotations, spec.image_list, store, spec.include_crowd)
        elif spec.kind == "coco":
            samples = coco_dataset(spec.root, spec.annotations, store, spec.include_crowd)
        else:
            split = posixpath.splitext(posixpath.basename(spec.image_list))[0] if spec.image_list else "trainval"
            samples = voc_dataset(spec.root, "2007" if spec.kind == "voc07" else "2012", split, store)
        records = [record(s.image_id, s.image_uri, gt_boxes=json.dumps([list(b) for b in s.boxes]), gt_size=s.size)
                   for s in samples]
    else:
        records = [record(s.image_id, s.image_uri, s.mask_uri) for s in saliency_dataset(spec.kind, spec.root, store)]
    return records[: spec.limit] if spec.limit else records


def result_row(image_id: str, method: str, *, status: str = "ok", error: str = "",
               scores: metrics.ImageScores | None = None, binary: tuple[float, float] | None = None,
               pred_box: np.ndarray = NAN_BOX, hit: float = math.nan, example: bytes = b"") -> dict:
    """One scored row (schema in the module docstring); NaN where a metric does not apply."""
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


def failed_row(image_id: str, method: str, error: str) -> dict:
    """The scored row of an image that failed: ``status="failed"``, the reason, NaN metrics."""
    return result_row(image_id, method, status="failed", error=error)


def reason(exc: BaseException) -> str:
    """The ``error`` text of a failed row: ``"<ExceptionType>: <message>"``."""
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- decode
def load_record(record: dict, *, spec: BackboneSpec, image_size: int | None, store: Storage | None = None) -> dict:
    """Decode (CPU task): record -> decoded image, ground truth and network input (``network_input``
    with the backbone ``spec``'s stride and padding colour; ``image_size`` None pads instead of
    resizing, the discovery protocol).

    Returns:
        The record plus ``status``, ``error``, ``image (H, W, 3) uint8``, ``gt_mask (H, W) bool``
        and ``gt_void (H, W) bool`` (``dncut.data.images.read_mask``; ``(1, 1)`` for discovery), ``input (Hc, Wc, 3) uint8`` and ``content (2,)`` = the
        unpadded part of the input. A failure gives ``status="failed"`` and 1-pixel placeholders.
    """
    store = store or Storage()
    row = dict(record)
    try:
        if record["missing"]:
            raise FileNotFoundError(record["missing"])
        uri = record["image_uri"]
        if uri.startswith("scene://"):
            from dncut.data.scenes import make_scene

            pil, gt = make_scene(int(uri[len("scene://"):]), size=SCENE_SIZE)
            void = np.zeros(gt.shape, bool)
        else:
            declared = tuple(int(v) for v in record.get("gt_size", (0, 0)))
            # boxes describe the stored pixel frame: an annotated image is not EXIF-rotated
            pil = decode_image(store.read_bytes(uri), exif_transpose=not any(declared))
            if any(declared) and pil.size != declared:
                raise ValueError(f"the annotation declares {declared[0]}x{declared[1]} (WxH), the image decodes "
                                 f"to {pil.width}x{pil.height}: not scored in another frame")
            regions = read_mask(store.read_bytes(record["mask_uri"])) if record["mask_uri"] else None
            gt, void = (regions.foreground, regions.void) if regions else (None, None)
        if gt is not None:
            check_mask_foreground(check_mask_size(pil, gt))
        image = np.asarray(pil.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        if min(image.shape[:2]) < spec.stride:
            raise ValueError(f"the image ({image.shape[1]}x{image.shape[0]}) is smaller than one patch "
                             f"({spec.stride} px): no patch grid to cut")
        net, content = network_input(image, stride=spec.stride, image_size=image_size, pad_rgb=spec.pad_rgb)
        row.update(status="ok", error="", image=image, input=net, content=np.asarray(content, np.int64),
                   gt_mask=np.zeros((1, 1), bool) if gt is None else gt,
                   gt_void=np.zeros((1, 1), bool) if gt is None else void)
    except Exception as exc:  # noqa: BLE001 - any bad input becomes a failed row
        row.update(status="failed", error=reason(exc), image=np.zeros((1, 1, 3), np.uint8),
                   input=np.zeros((1, 1, 3), np.uint8), content=np.ones(2, np.int64),
                   gt_mask=np.zeros((1, 1), bool), gt_void=np.zeros((1, 1), bool))
    return row


# --------------------------------------------------------------------------- the predictor actor
def load_backbone(factory: BackboneFactory | None, backbone: str, pretrained: bool, checkpoint: str | None,
                  store: Storage | None = None, trusted: bool = False):
    """Build the backbone in an actor, with a message naming what failed. Weights that are neither
    pretrained nor loaded (random init: tests, smoke runs) are drawn from torch seed
    ``RANDOM_INIT_SEED``, so every actor, and an actor Ray restarts, holds the same network.
    ``trusted``: full unpickling of ``checkpoint`` (config ``model.trusted_checkpoint``,
    ``dncut.weights.read_checkpoint``; a ``factory`` loads its checkpoints itself).

    Raises:
        RuntimeError: the backbone cannot be built (unknown name, unreadable checkpoint), naming both.
    """
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            if factory is not None:
                return factory(backbone, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint)
            from dncut.backbones import create_backbone

            return create_backbone(backbone, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint,
                                   store=store, trusted=trusted)
    except Exception as exc:
        raise RuntimeError(f"cannot build backbone {backbone!r} with checkpoint {checkpoint!r} "
                           f"(pretrained={pretrained}): {exc}") from exc


def _device(use_gpu: bool):
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class NCutPredictor:
    """Stateful Ray Data step: loads the backbone once, then ``predict_batch`` per batch.

    Args:
        backbone: backbone name (``dncut.backbone_specs``).
        checkpoint: weights URI, or ``None`` for the pretrained / default weights.
        pretrained: use pretrained weights when ``checkpoint`` is ``None``.
        methods: a subset of ``dncut.eval.predict.METHODS`` (``dncut.config.EvalMethod``).
        solver: NCut eigensolver name (``cfg.ncut.solver``).
        use_gpu: run on CUDA when available; on CPU the actor keeps freed heap
            (``dncut.runtime.retain_freed_memory``).
        store: the storage handle, for an ``s3://`` checkpoint.
        factory: ``(name, *, pretrained, checkpoint) -> backbone`` replacing
            ``dncut.backbones.create_backbone`` (see ``BackboneFactory``).
        found_head: the FOUND head file's bytes for this backbone and checkpoint
            (``dncut.eval.jobs.found_head_for``); required with method ``found``.
        trusted: full unpickling of ``checkpoint`` (config ``model.trusted_checkpoint``).
    """

    def __init__(self, backbone: str, checkpoint: str | None, pretrained: bool, methods: Sequence[str],
                 solver: str, use_gpu: bool = False, store: Storage | None = None,
                 factory: BackboneFactory | None = None, found_head: bytes | None = None,
                 trusted: bool = False) -> None:
        from dncut.eval.found import load_head

        device = _device(use_gpu)
        if device.type == "cpu":
            retain_freed_memory()
        model = load_backbone(factory, backbone, pretrained, checkpoint, store, trusted).to(device)
        head = load_head(found_head)[0] if found_head is not None else None
        self.predictor = Predictor(model, methods, solver, device, found_head=head)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return predict_batch(self.predictor, batch)


def predict_batch(predictor: Predictor, batch: dict[str, Any]) -> dict[str, Any]:
    """Predict on one batch of decoded rows (columns: ``image_id``, ``status``, ``error``, ``input``, ...).

    Returns:
        The batch without ``input``, plus ``stride`` and the predictor's grid maps per row
        (module docstring); an image the backbone or the NCut fails on gets ``status="failed"``
        and the reason.
    """
    n = len(batch["image_id"])
    status, error = list(batch["status"]), list(batch["error"])
    inputs = [batch["input"][i] if status[i] == "ok" else None for i in range(n)]
    results, errors = predictor.predict(inputs)
    for i, why in errors.items():
        status[i], error[i] = "failed", why
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


# --------------------------------------------------------------------------- scoring
def geometry(row: dict, method: str) -> dict:
    """``{"canvas": (Hc, Wc), "content": (Hv, Wv)}`` of a predicted row: the network input the grid
    of ``method``'s map covers, and its unpadded part (``dncut.eval.methods.upsample_map``)."""
    canvas = tuple(int(s) * int(row["stride"]) for s in row[f"{method}_map"].shape)
    return {"canvas": canvas, "content": tuple(int(c) for c in row["content"])}


def gt_boxes_of(row: dict) -> np.ndarray:
    """The row's ground-truth boxes ``(k, 4)`` in pixels.

    Raises:
        ValueError: none (crowd regions left out): the image is flagged, not scored as a miss.
    """
    boxes = np.asarray(json.loads(row["gt_boxes"]), np.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("no ground-truth box (crowd regions left out): flagged, not scored as a miss")
    return boxes


def binary_scores(mask: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(accuracy, IoU) of a bool mask ``(H, W)``; IoU = 1 when mask and GT are both empty."""
    union = np.count_nonzero(mask | gt)
    return float(np.mean(mask == gt)), 1.0 if union == 0 else np.count_nonzero(mask & gt) / union


def most_rows(row: dict, image: np.ndarray, heat: np.ndarray, mask: np.ndarray, keep: bool) -> list[dict]:
    """MOST's two CorLoc rows: ``most`` (the peers' protocol: any box with IoU >= 0.5; its box is
    the first that hits, else the largest cluster's) and ``most-single`` (the largest cluster's box
    only). An image where no box survived MOST's size rules has no prediction: a miss."""
    from dncut.eval.most import pixel_boxes

    image_id = str(row["image_id"])
    gt_boxes = gt_boxes_of(row)
    grid = np.asarray(json.loads(row["most_boxes"]), np.float64).reshape(-1, 4)
    boxes = pixel_boxes(grid, int(row["stride"]), geometry(row, "most")["content"])  # (k, 4), largest first
    hits = [metrics.corloc_hit(b, gt_boxes) for b in boxes]
    single = boxes[0] if len(boxes) else NAN_BOX
    shown = boxes[hits.index(True)] if any(hits) else single
    ex = example_payload(image, heat, mask, None, None, gt_boxes, shown) if keep and len(boxes) else b""
    return [result_row(image_id, "most", pred_box=shown, hit=float(any(hits)), example=ex),
            result_row(image_id, "most-single", pred_box=single, hit=float(bool(hits) and hits[0]))]


def row_methods(methods: Sequence[str], *, bilateral: bool, discovery: bool) -> list[str]:
    """The method names of the rows ``score_row`` gives for every image, failed or not: ``methods``
    (without ``DISCOVERY_ONLY_METHODS`` on saliency sets), then ``<method>+bs`` (``bilateral``, saliency)
    and ``most-single`` (discovery with ``most``); empty when no method applies."""
    if not discovery:
        methods = [m for m in methods if m not in DISCOVERY_ONLY_METHODS]
    if not methods:
        return []
    return [*methods, *([f"{m}+bs" for m in methods] if bilateral and not discovery else []),
            *(["most-single"] if discovery and "most" in methods else [])]


def score_row(row: dict, *, methods: Sequence[str], bilateral: bool, discovery: bool,
              example_ids: frozenset[str] = frozenset()) -> list[dict]:
    """Score (CPU task): one image's predictions -> one scored row per method (+bs, most-single)
    (``_scored_rows``), each with the row's ``RECORD_INDEX`` when it has one (the record's position,
    how the driver finds the record: ``dncut.eval.streamed.indexed``)."""
    rows = _scored_rows(row, methods=methods, bilateral=bilateral, discovery=discovery, example_ids=example_ids)
    if RECORD_INDEX in row:
        index = int(row[RECORD_INDEX])
        for scored in rows:
            scored[RECORD_INDEX] = index
    return rows


def _scored_rows(row: dict, *, methods: Sequence[str], bilateral: bool, discovery: bool,
                example_ids: frozenset[str] = frozenset()) -> list[dict]:
    """One image's predictions -> one scored row per method (+bs, most-single), without the record index.

    Saliency: the grid mask is bilinearly upsampled to the image (padding removed) and scored
    as a binary map; with ``bilateral`` a ``<method>+bs`` row is scored on the solver's soft
    output (acc / IoU at 0.5), and ``acc_binary`` / ``iou_binary`` on its cleaned binary mask
    (holes filled, largest component). Discovery: the box (tokencut: the seed's component;
    simple, found: the largest component; most: ``most_rows``) in pixels, and whether it hits a
    GT box (CorLoc). Methods for discovery sets only (``DISCOVERY_ONLY_METHODS``) give no saliency
    rows. ``example_ids``: images whose ``example`` thumbnail is kept.
    """
    image_id = str(row["image_id"])
    names = row_methods(methods, bilateral=bilateral, discovery=discovery)
    if not names:
        return []
    if not discovery:
        methods = [m for m in methods if m not in DISCOVERY_ONLY_METHODS]
    if row["status"] != "ok":
        return [failed_row(image_id, m, str(row["error"])) for m in names]
    image, size = row["image"], row["image"].shape[:2]
    out = []
    for m in methods:
        try:
            where = geometry(row, m)
            grid_mask = np.asarray(row[f"{m}_mask"], bool)
            heat = upsample_map(row[f"{m}_map"], size, **where)  # (H, W)
            mask = image_mask(m, row[f"{m}_map"], grid_mask, size, **where)  # (H, W)
            keep = image_id in example_ids
            if discovery and m == "most":
                out += most_rows(row, image, heat, mask, keep)
                continue
            if discovery:
                box = row["tokencut_box"] if m == "tokencut" else largest_component_box(grid_mask)
                px = box_to_pixels(box, int(row["stride"]), where["content"])
                gt_boxes = gt_boxes_of(row)
                hit = float(metrics.corloc_hit(px, gt_boxes))
                ex = example_payload(image, heat, mask, None, None, gt_boxes, px) if keep else b""
                out.append(result_row(image_id, m, pred_box=px, hit=hit, example=ex))
                continue
            gt = np.asarray(row["gt_mask"], bool)
            void = np.asarray(row["gt_void"], bool) if "gt_void" in row else np.zeros(gt.shape, bool)
            scores = metrics.score_saliency(mask.astype(np.float32), gt, ignore=void)
            soft = None
            if bilateral:
                soft, binary = refine_mask(image, mask)
                cleaned = clean_binary(binary)
                bs_scores = metrics.score_saliency(soft.astype(np.float32), gt, ignore=void)
            ex = example_payload(image, heat, mask, soft, gt, None, None) if keep else b""
            out.append(result_row(image_id, m, scores=scores, example=ex))
            if bilateral:
                out.append(result_row(image_id, f"{m}+bs", scores=bs_scores, binary=binary_scores(cleaned[~void], gt[~void])))
        except Exception as exc:  # noqa: BLE001 - a failed post-processing step fails this image only
            out.extend(failed_row(image_id, n, reason(exc)) for n in (m, f"{m}+bs", f"{m}-single") if n in names)
    return out


# --------------------------------------------------------------------------- precomputed maps
def read_map(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Saliency map bytes -> (H, W) uint8 at the mask size ``size`` = (H, W) (bilinear if it differs)."""
    from PIL import Image

    gray = decode_image(data).convert("L")
    if gray.size != (size[1], size[0]):
        gray = gray.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)  # (H, W)


def score_map(record: dict, *, store: Storage | None = None) -> dict:
    """Score (CPU task) one precomputed map (record ``{image_id, method, mask_uri, map_uri, maps_dir}``,
    optional ``missing``: a reason that fails the row, e.g. ambiguous maps of ``pair_maps``)
    against its mask -> a scored row with ``checkpoint`` = the maps folder (failed on any error)."""
    store = store or Storage()
    try:
        if record.get("missing"):
            raise ValueError(record["missing"])
        if not record["map_uri"]:
            raise FileNotFoundError(f"no map named {record['image_id']}.* in {record['maps_dir']}")
        regions = read_mask(store.read_bytes(record["mask_uri"]))
        gt = check_mask_foreground(regions.foreground)
        pred = read_map(store.read_bytes(record["map_uri"]), gt.shape)
        row = result_row(record["image_id"], record["method"],
                         scores=metrics.score_saliency(pred, gt, ignore=regions.void))
    except Exception as exc:  # noqa: BLE001
        row = failed_row(record["image_id"], record["method"], reason(exc))
    row["checkpoint"] = record["maps_dir"]
    return row


# --------------------------------------------------------------------------- segmentation
def segmentation_records(spec: EvalDataset, store: Storage | None = None) -> list[dict]:
    """Records of a ``task: segmentation`` dataset: the images of its instances JSON (through
    ``dncut.data.datasets.coco_samples``: URIs, declared sizes, missing files) as
    ``{image_id, image_uri, gt_size [W, H], annotations}`` (``annotations``: JSON list of the
    image's instances: category name, polygons, crowd flag, box), the first ``spec.limit`` only."""
    from dncut.data.class_maps import annotations_by_image
    from dncut.data.datasets import coco_samples, read_coco

    store = store or Storage()
    instances = read_coco(spec.root, spec.annotations, store)  # read once
    samples = coco_samples(instances, store, include_crowd=True)
    by_file = annotations_by_image(instances)  # warns once about categories that map to no VOC class
    records = [{"image_id": s.image_id, "image_uri": s.image_uri, "gt_size": list(s.size or (0, 0)),
                "annotations": json.dumps(by_file.get(s.image_id, []))} for s in samples]
    return records[: spec.limit] if spec.limit else records


def load_segmentation_record(record: dict, *, image_size: int, store: Storage | None = None) -> dict:
    """Decode (CPU task) a segmentation record -> ``{image_id, status, error, input (S, S, 3) uint8,
    labels (SCORE_SIZE, SCORE_SIZE) uint8}``: the image in its stored pixel frame (size checked
    against the annotation) resized to S = ``image_size`` (bilinear), the polygons rasterised to
    the 21-class VOC map and resized to ``SCORE_SIZE`` (nearest; 255 = ignore)."""
    from PIL import Image

    from dncut.eval.segmentation import SCORE_SIZE, rasterise_coco

    store = store or Storage()
    row = {"image_id": record["image_id"], "status": "ok", "error": ""}
    try:
        pil = decode_image(store.read_bytes(record["image_uri"]), exif_transpose=False)
        declared = tuple(int(v) for v in record["gt_size"])
        if any(declared) and pil.size != declared:
            raise ValueError(f"the annotation declares {declared[0]}x{declared[1]} (WxH), the image decodes to "
                             f"{pil.width}x{pil.height}: not scored in another frame")
        instances = json.loads(record["annotations"])
        anns = [{"category_id": i, "segmentation": a["segmentation"], "iscrowd": a["iscrowd"], "bbox": a["bbox"]}
                for i, a in enumerate(instances)]
        labels = rasterise_coco(anns, {i: a["category"] for i, a in enumerate(instances)}, pil.size)  # (H, W)
        row["input"] = np.asarray(pil.convert("RGB").resize((image_size, image_size), Image.BILINEAR), np.uint8)
        row["labels"] = np.asarray(Image.fromarray(labels).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST), np.uint8)
    except Exception as exc:  # noqa: BLE001 - a bad image is its row
        row.update(status="failed", error=reason(exc), input=np.zeros((image_size, image_size, 3), np.uint8),
                   labels=np.zeros((SCORE_SIZE, SCORE_SIZE), np.uint8))
    return row


class TokenExtractor:
    """Stateful Ray Data step: loads the backbone once; per batch, the tokens ``(h*w, C)`` float32 of
    every ok row (``dncut.eval.predict.Predictor.features``; arguments as ``NCutPredictor``)."""

    def __init__(self, backbone: str, checkpoint: str | None, pretrained: bool, use_gpu: bool = False,
                 store: Storage | None = None, factory: BackboneFactory | None = None,
                 trusted: bool = False) -> None:
        device = _device(use_gpu)
        model = load_backbone(factory, backbone, pretrained, checkpoint, store, trusted).to(device).eval()
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
                tokens[i] = m.flatten(1).T.cpu().numpy().astype(np.float32)  # (C, h, w) -> (h*w, C)
        except Exception as exc:  # noqa: BLE001 - the batch's images fail with the reason
            for i in ok:
                status[i], error[i] = "failed", reason(exc)
        return {"image_id": batch["image_id"], "status": np.asarray(status), "error": np.asarray(error),
                "labels": batch["labels"], "tokens": tokens}


def score_segmentation(rows: list[dict], k: int, how: str, seeds: Sequence[int]) -> list[float]:
    """mIoU of one clustering into ``k`` clusters, one value per seed, over the ok rows
    (``tokens (h*w, C)`` of a square grid, ``labels``); ``how``: ``"hungarian"`` or ``"majority"``
    (``dncut.eval.segmentation.assign``)."""
    from PIL import Image

    from dncut.eval.segmentation import SCORE_SIZE, assign, cluster_tokens, confusion, miou

    side = math.isqrt(rows[0]["tokens"].shape[0])  # square inputs: a (side, side) grid
    tokens = np.concatenate([r["tokens"] for r in rows])  # (N * h*w, C)
    out = []
    for seed in seeds:
        ids = cluster_tokens(tokens, k, seed=seed).reshape(len(rows), side, side)  # (N, h, w)
        conf = np.zeros((k, SEGMENTATION_CLASSES), np.int64)
        for grid, row in zip(ids, rows):
            pred = np.asarray(Image.fromarray(grid.astype(np.int32)).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))
            conf += confusion(pred, row["labels"], k, SEGMENTATION_CLASSES)
        out.append(miou(conf, assign(conf, how))[0])
    return out
