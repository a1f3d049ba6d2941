"""The evaluation jobs: Ray Data pipelines built on ``dncut.eval.stages``.

One pipeline per (dataset, backbone, checkpoint); all methods share the backbone pass::

    run_evaluation(cfg)        saliency / discovery (dncut eval): datasets x backbones x checkpoints
      records -> map load_record (CPU task) -> map_batches NCutPredictor (actors, eval.num_actors,
      eval.gpus_per_actor) -> flat_map score_row (CPU task) -> driver: Accumulator -> write_report
      segmentation datasets (task: segmentation): records -> map load_segmentation_record ->
      map_batches TokenExtractor -> driver: every image's tokens -> k-means per seed -> mIoU
      (transductive: all tokens of the set live on the driver, N x h*w x C float32)
    evaluate_saliency(...)     one backbone on an images / masks folder pair (dncut eval-saliency)
    evaluate_maps(...)         precomputed saliency maps against masks: map score_map (dncut eval-maps)
    predict_folder(...)        unlabelled images -> masks, maps, boxes: ... NCutPredictor ->
                               flat_map write_outputs -> predictions.parquet (dncut predict)

Outputs of the evaluations (``dncut.eval.report.write_report``): ``per_image.parquet``,
``summary.json``, ``summary.md``, ``examples.png`` and ``config.yaml`` under the run folder
(``Config.run_dir``) or the given ``out_dir``. Metrics are means over the images that
succeeded; failed images are rows with their reason (``dncut.eval.stages``).

Every job builds its ``dncut.storage.Storage`` handle once from the config, checks its inputs
(dataset layouts, checkpoints, FOUND heads) before any Ray work, and passes the handle to its
tasks and actors.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dncut import storage
from dncut.backbone_specs import spec as backbone_spec
from dncut.config import Config, ConfigError
from dncut.data.datasets import DatasetLayoutError, pair_by_stem
from dncut.data.images import IMAGE_SUFFIXES
from dncut.eval.predict import METHODS
from dncut.eval.report import Accumulator, write_report
from dncut.eval.stages import (DISCOVERY_KINDS, SEGMENTATION_CLASSES, BackboneFactory, NCutPredictor, TokenExtractor,
                               dataset_records, load_record, load_segmentation_record, pair_maps, predict_records,
                               record, result_row, score_map, score_row, score_segmentation, write_outputs)
from dncut.storage import Storage

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
MAPS_PER_TASK = 16  # precomputed maps scored per Ray task: a task's overhead >> scoring one map


# --------------------------------------------------------------------------- driver checks and resources
def ensure_ray() -> None:
    """Start (or join, through ``RAY_ADDRESS``) a Ray cluster unless this process already has one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)


def cpu_split(num_actors: int) -> tuple[float, float, float]:
    """CPUs for (each read task, each actor, each scoring / writing task): one CPU per actor while the
    cluster has ``num_actors + 1``, else the cluster shared; a read task asks for half an actor's
    share so that Ray does not fuse the read with the actor step."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    actor = 1.0 if total >= num_actors + 1 else max(0.25, total / (num_actors + 1))
    return actor / 2, actor, actor


def check_checkpoint(checkpoint: str | None, store: Storage) -> None:
    """Fail on the driver, before any actor starts, when a checkpoint does not exist.

    Raises:
        FileNotFoundError: naming the checkpoint.
    """
    if checkpoint is not None and not store.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")


def found_head_for(cfg: Config, backbone: str, checkpoint: str | None, store: Storage | None = None) -> bytes | None:
    """The bytes of the ``eval.found_heads`` file trained on ``backbone`` with ``checkpoint``
    (``None`` when method found is not asked for).

    Raises:
        ConfigError: method found is asked for and no head was trained on these weights (the
            message lists what each head was trained on), or a head file is unreadable.
    """
    from dncut.eval.found import load_head, same_weights

    if "found" not in cfg.eval.methods:
        return None
    store = store or cfg.storage_handle()
    seen = []
    for uri in cfg.eval.found_heads:
        try:
            data = store.read_bytes(uri)
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


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` without repeats, in order.

    Raises:
        ValueError: empty, or a name outside ``METHODS`` (listing the valid ones).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods {bad or list(methods)} invalid; valid choices: {list(METHODS)}")
    return list(dict.fromkeys(methods))


def stems(folder: str, what: str, layout: str, store: Storage) -> dict[str, str]:
    """``stem -> URI`` of the images below ``folder`` (stems keep their sub-folder).

    Raises:
        DatasetLayoutError: the folder is missing, unreachable or holds no image, naming ``layout``.
    """
    try:
        files = store.check_source(folder, IMAGE_SUFFIXES)
    except storage.StorageError as exc:
        raise DatasetLayoutError(f"{what} folder {folder}: {exc}; expected layout: {layout}") from None
    prefix = folder.rstrip("/") + "/"
    return {posixpath.splitext(f[len(prefix):] if f.startswith(prefix) else posixpath.basename(f))[0]: f
            for f in files}


def dataset_name(folder: str) -> str:
    """A dataset's name from its folder: ``.../DUTS/images`` -> ``DUTS``, ``.../ECSSD`` -> ``ECSSD``."""
    parts = [p for p in folder.rstrip("/").split("/") if p]
    generic = {"images", "masks", "gt", "imgs", "image", "mask"}
    return parts[-2] if len(parts) > 1 and parts[-1].lower() in generic else (parts[-1] if parts else folder)


def _blocks(n: int, per_block: int) -> int:
    return max(1, -(-n // per_block))


def _predictor_kwargs(cfg: Config, backbone: str, checkpoint: str | None, methods: list[str], store: Storage,
                      factory: BackboneFactory | None, found_head: bytes | None) -> dict[str, Any]:
    return {"backbone": backbone, "checkpoint": checkpoint, "pretrained": cfg.model.pretrained, "methods": methods,
            "solver": cfg.ncut.solver, "use_gpu": cfg.eval.gpus_per_actor > 0, "store": store, "factory": factory,
            "found_head": found_head, "trusted": cfg.model.trusted_checkpoint}


# --------------------------------------------------------------------------- saliency / discovery
def run_pipeline(records: list[dict], *, cfg: Config, dataset: str, discovery: bool, backbone: str,
                 checkpoint: str | None, acc: Accumulator, store: Storage,
                 factory: BackboneFactory | None = None) -> None:
    """One (dataset, backbone, checkpoint) of saliency (``discovery`` False: images resized to
    ``eval.image_size``) or discovery (padded, CorLoc): streams its scored rows into ``acc``."""
    import ray

    ev = cfg.eval
    methods = check_methods(ev.methods)
    found_head = found_head_for(cfg, backbone, checkpoint, store)
    bspec = factory.spec if factory is not None else backbone_spec(backbone)
    check_checkpoint(checkpoint, store)
    read_cpus, actor_cpus, score_cpus = cpu_split(ev.num_actors)
    example_ids = frozenset(r["image_id"] for r in records[: ev.examples])
    log.info("eval %s: %d images, backbone %s, checkpoint %s, methods %s%s", dataset, len(records),
             backbone, checkpoint or "(pretrained)", methods, " + bilateral" if ev.bilateral else "")
    ds = (
        ray.data.from_items(records, override_num_blocks=_blocks(len(records), ev.batch_size))
        .map(load_record, fn_kwargs={"spec": bspec, "image_size": None if discovery else ev.image_size,
                                     "store": store}, num_cpus=read_cpus)
        .map_batches(NCutPredictor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs=_predictor_kwargs(cfg, backbone, checkpoint, methods, store, factory,
                                                             found_head))
        .flat_map(score_row, fn_kwargs={"methods": methods, "bilateral": ev.bilateral, "discovery": discovery,
                                        "example_ids": example_ids}, num_cpus=score_cpus)
    )
    for row in ds.iter_rows():
        acc.add(row, dataset=dataset, backbone=backbone, checkpoint=checkpoint,
                task="discovery" if discovery else "saliency")


# --------------------------------------------------------------------------- segmentation
def run_segmentation(records: list[dict], *, cfg: Config, dataset: str, backbone: str, checkpoint: str | None,
                     acc: Accumulator, store: Storage, factory: BackboneFactory | None = None) -> None:
    """One (dataset, backbone, checkpoint) of unsupervised semantic segmentation (paper Table 3;
    protocol: ``dncut.eval.segmentation``): per-image rows and one mIoU per score into ``acc``.

    Scores: ``kmeans-k21`` (K = 21, Hungarian matching) and ``kmeans-k<K>`` (K =
    ``eval.segmentation.overcluster_k``, majority vote), each the mean (and std) over
    ``eval.segmentation.seeds``; failed images are rows and are left out of the clustering.
    """
    import ray

    ev, seg = cfg.eval, cfg.eval.segmentation
    read_cpus, actor_cpus, _ = cpu_split(ev.num_actors)
    check_checkpoint(checkpoint, store)
    log.info("segmentation %s: %d images, backbone %s, checkpoint %s, K = %d and %d, seeds %s", dataset,
             len(records), backbone, checkpoint or "(pretrained)", SEGMENTATION_CLASSES, seg.overcluster_k, seg.seeds)
    ds = (
        ray.data.from_items(records, override_num_blocks=_blocks(len(records), ev.batch_size))
        .map(load_segmentation_record, fn_kwargs={"image_size": seg.image_size, "store": store}, num_cpus=read_cpus)
        .map_batches(TokenExtractor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs={"backbone": backbone, "checkpoint": checkpoint,
                                            "pretrained": cfg.model.pretrained, "use_gpu": ev.gpus_per_actor > 0,
                                            "store": store, "factory": factory,
                                            "trusted": cfg.model.trusted_checkpoint})
    )
    rows = sorted(ds.iter_rows(), key=lambda r: str(r["image_id"]))
    ok = [r for r in rows if r["status"] == "ok"]
    scores = {f"kmeans-k{SEGMENTATION_CLASSES}": (SEGMENTATION_CLASSES, "hungarian"),
              f"kmeans-k{seg.overcluster_k}": (seg.overcluster_k, "majority")}
    for method, (k, how) in scores.items():
        enough = len(ok) and sum(len(r["tokens"]) for r in ok) >= k
        per_seed = score_segmentation(ok, k, how, seg.seeds) if enough else []
        for r in rows:
            acc.add(result_row(str(r["image_id"]), method, status=str(r["status"]), error=str(r["error"])),
                    dataset=dataset, backbone=backbone, checkpoint=checkpoint, task="segmentation")
        acc.set_metrics((dataset, method, backbone, checkpoint), {
            "miou": float(np.mean(per_seed)) if per_seed else None,
            "miou_std": float(np.std(per_seed)) if per_seed else None, "seeds": len(per_seed)})


# --------------------------------------------------------------------------- the commands
def _finish(acc: Accumulator, out_dir: str, cfg: Config | None, store: Storage) -> dict:
    summary = acc.summary()
    write_report(out_dir, summary, acc, config_yaml=cfg.to_yaml() if cfg is not None else None, store=store)
    log.info("eval outputs written to %s", out_dir)
    return summary


def run_evaluation(cfg: Config, *, backbone_factory: BackboneFactory | None = None) -> dict:
    """The evaluation job of ``cfg.eval``: datasets x backbones x checkpoints x methods
    (``dncut eval``).

    Args:
        cfg: the resolved config; outputs go to its run folder ``cfg.run_dir``.
        backbone_factory: replaces ``dncut.backbones.create_backbone`` (see ``BackboneFactory``).

    Returns:
        The summary dict written to ``summary.json``: ``{"runs": [...]}``.

    Raises:
        DatasetLayoutError: a dataset root is missing or malformed (before any Ray work).
        ConfigError: method found without a head trained on the weights (before any Ray work).
    """
    store = cfg.storage_handle()
    # every dataset's layout is checked before any Ray work
    specs = [(spec, dataset_records(spec, store, cfg.data.val_scenes)) for spec in cfg.eval.datasets]
    for backbone in cfg.eval_backbones():  # and every FOUND head is found before any Ray work
        for checkpoint in cfg.eval.checkpoints:
            found_head_for(cfg, backbone, checkpoint, store)
    ensure_ray()
    acc = Accumulator(cfg.eval.methods)
    for spec, records in specs:
        for backbone in cfg.eval_backbones():
            for checkpoint in cfg.eval.checkpoints:
                common = {"cfg": cfg, "dataset": spec.name, "backbone": backbone, "checkpoint": checkpoint,
                          "acc": acc, "store": store, "factory": backbone_factory}
                if spec.task == "segmentation":
                    run_segmentation(records, **common)
                else:
                    run_pipeline(records, discovery=spec.kind in DISCOVERY_KINDS, **common)
    return _finish(acc, cfg.run_dir, cfg, store)


def evaluate_saliency(images_dir: str, masks_dir: str, backbone: str, checkpoint: str | None,
                      methods: str | Sequence[str], bilateral: bool, out_dir: str,
                      cfg: Config | None = None) -> dict:
    """Saliency of one backbone on an images / masks folder pair (``dncut eval-saliency``).

    Args:
        images_dir: folder of images (local or ``s3://``), ``<stem>.jpg|png|...``.
        masks_dir: folder of masks with the same stems.
        backbone: backbone name.
        checkpoint: weights URI, ``None`` = pretrained.
        methods: one of ``METHODS`` (``typing.get_args(dncut.config.EvalMethod)``) or a list of
            them; ``most`` scores discovery sets only and gives no saliency row.
        bilateral: also score the bilateral-solver refinement.
        out_dir: output folder or ``s3://`` prefix.
        cfg: base config (image size, batch size, actors, storage); ``None`` = defaults.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``). An image without a mask, or a
        mask without an image, is a failed row.
    """
    methods = check_methods([methods] if isinstance(methods, str) else list(methods))
    cfg = (cfg or Config()).with_overrides({"eval.methods": methods, "eval.bilateral": bool(bilateral),
                                           "eval.backbones": [backbone], "eval.checkpoints": [checkpoint]})
    store = cfg.storage_handle()
    layout = "--images DIR of <stem>.jpg|png images and --masks DIR of <stem>.png masks (same stems)"
    images = stems(images_dir, "images", layout, store)
    masks = stems(masks_dir, "masks", layout, store)
    samples, lonely, lonely_masks = pair_by_stem(images, masks)
    records = [record(s.image_id, s.image_uri, s.mask_uri) for s in samples]
    records += [record(s, images[s], missing=f"no mask named {s}.* in {masks_dir}") for s in lonely]
    records += [record(s, "", masks[s], missing=f"no image named {s}.* in {images_dir} (image suffixes: "
                       f"{' '.join(IMAGE_SUFFIXES)})") for s in lonely_masks]  # every input is a row
    ensure_ray()
    acc = Accumulator(methods)
    run_pipeline(records, cfg=cfg, dataset=dataset_name(images_dir), discovery=False, backbone=backbone,
                 checkpoint=checkpoint, acc=acc, store=store)
    return _finish(acc, out_dir, cfg, store)


def map_folders(maps_dirs: Iterable[str], store: Storage) -> list[tuple[str, str]]:
    """``(method name, folder)`` per run: a folder of maps, or a parent whose sub-folders are methods."""
    found = []
    for folder in maps_dirs:
        files = stems(folder, "maps", "a folder of <stem>.png maps, or a folder of such folders", store)
        prefix = folder.rstrip("/") + "/"
        subdirs = sorted({k.split("/")[0] for k in files if "/" in k})
        if any("/" not in k for k in files) or not subdirs:
            found.append((posixpath.basename(folder.rstrip("/")), folder))
        else:
            found.extend((d, prefix + d) for d in subdirs)
    return found


def evaluate_maps(masks_dir: str, maps_dirs: str | Sequence[str], out_dir: str,
                  store: Storage | None = None) -> dict:
    """Score folders of precomputed saliency maps (``dncut eval-maps``).

    Each run's metrics hold the TokenCut-definition ``acc``, ``iou``, ``max_fbeta`` and ``mae``
    plus ``max_fbeta_pysod`` / ``mae_pysod`` (pysodmetrics' definition: min-max normalised maps,
    256 ``>=`` thresholds) so published numbers can be compared either way.

    Args:
        masks_dir: folder of ground-truth masks ``<stem>.png`` (local or ``s3://``).
        maps_dirs: folder(s) of maps ``<stem>.png`` (or ``<stem>.<image ext>.png``, as ``dncut predict``
            names them; pairing rule: ``dncut.eval.stages.pair_maps``); a folder whose sub-folders are methods
            (like ``sod-val/maps``, or ``dncut predict``'s ``masks/``) gives one run per sub-folder.
        out_dir: output folder or ``s3://`` prefix.
        store: the storage handle (``None``: the environment's defaults).

    Returns:
        The summary dict (also written to ``out_dir/summary.json``). A mask without a map is a
        failed row of that method.
    """
    import ray

    store = store or Storage()
    maps_dirs = [maps_dirs] if isinstance(maps_dirs, str) else list(maps_dirs)
    masks = stems(masks_dir, "masks", "a folder of <stem>.png ground-truth masks", store)
    dataset = dataset_name(masks_dir)
    records = []
    for method, folder in map_folders(maps_dirs, store):
        maps = stems(folder, "maps", "a folder of <stem>.png maps", store)
        paired = pair_maps(masks, maps)  # predict's <stem>.<ext>.png maps pair with <stem>.png masks
        records += [{"image_id": s, "method": method, "mask_uri": u, "map_uri": paired[s][0],
                     "missing": paired[s][1], "maps_dir": folder} for s, u in sorted(masks.items())]
    ensure_ray()
    log.info("eval-maps %s: %d masks x %d map folders", dataset, len(masks), len(records) // max(1, len(masks)))
    acc = Accumulator()
    ds = ray.data.from_items(records, override_num_blocks=_blocks(len(records), MAPS_PER_TASK))
    for row in ds.map(score_map, fn_kwargs={"store": store}).iter_rows():
        acc.add(row, dataset=dataset, backbone="maps", checkpoint=row["checkpoint"], task="saliency", pysod=True)
    return _finish(acc, out_dir, None, store)


def predict_folder(images: str, out_dir: str, cfg: Config, *, backbone: str | None = None,
                   checkpoint: str | None = None) -> dict[str, Any]:
    """Run ``cfg.eval.methods`` on every image of ``images`` and write what they find (``dncut predict``).

    Outputs under ``out_dir`` (``dncut.eval.stages.write_outputs``): ``masks/<method>/<path>.png``,
    ``z2/<method>/<path>.png`` (``<path>``: the image's path below ``images`` with its extension,
    ``sub/x.jpg`` -> ``masks/<method>/sub/x.jpg.png``, so names never collide; naming rule:
    ``dncut.eval.stages.predict_records``) and ``predictions.parquet`` (one row per image and method: status,
    error, mask and map URIs, boxes as JSON; failed images are rows with their reason).
    ``dncut eval-maps --masks GT --maps <out>/masks`` scores the masks.

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
        FileNotFoundError: the checkpoint does not exist (before any Ray work).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    store, ev = cfg.storage_handle(), cfg.eval
    backbone = backbone or cfg.model.backbone
    methods = check_methods(ev.methods)
    uris = store.check_source(images, IMAGE_SUFFIXES)
    check_checkpoint(checkpoint, store)
    found_head = found_head_for(cfg, backbone, checkpoint, store)
    records = predict_records(uris, images)  # output names unique per input
    ensure_ray()
    read_cpus, actor_cpus, write_cpus = cpu_split(ev.num_actors)
    ds = (
        ray.data.from_items(records, override_num_blocks=_blocks(len(records), ev.batch_size))
        .map(load_record, fn_kwargs={"spec": backbone_spec(backbone), "image_size": ev.image_size, "store": store},
             num_cpus=read_cpus)
        .map_batches(NCutPredictor, batch_size=ev.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                     num_gpus=ev.gpus_per_actor or None,
                     fn_constructor_kwargs=_predictor_kwargs(cfg, backbone, checkpoint, methods, store, None,
                                                             found_head))
        .flat_map(write_outputs, fn_kwargs={"methods": methods, "out_dir": out_dir, "store": store},
                  num_cpus=write_cpus)
    )
    rows = sorted(ds.iter_rows(), key=lambda r: (r["image_id"], r["method"]))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    store.write_bytes(store.join(out_dir, PREDICTIONS_FILE), buffer.getvalue())
    failed = sorted({r["image_id"] for r in rows if r["status"] != "ok"})
    if failed:
        log.warning("predict: %d of %d images failed, e.g. %s", len(failed), len(records), failed[:3])
    return {"images": len(records), "rows": len(rows), "failed": len(failed), "out": out_dir}
