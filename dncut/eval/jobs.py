"""The evaluation jobs: Ray Data pipelines built on ``dncut.eval.stages``.

One pipeline per (dataset, backbone, checkpoint); all methods share the backbone pass::

    run_evaluation(cfg)        saliency / discovery (dncut eval): datasets x backbones x checkpoints
      records -> map load_record (CPU task) -> map_batches NCutPredictor (actors, eval.num_actors,
      eval.gpus_per_actor) -> flat_map score_row (CPU task) -> map_batches write_per_image (CPU task:
      a Parquet part of per_image.parquet) -> driver: Accumulator (running sums only) -> write_report
      segmentation datasets (task: segmentation): records -> map load_segmentation_record ->
      map_batches TokenExtractor -> driver: every image's tokens -> k-means per seed -> mIoU
      (transductive: all tokens of the set live on the driver, N x h*w x C float32)
    evaluate_saliency(...)     one backbone on an images / masks folder pair (dncut eval-saliency)
    evaluate_maps(...)         precomputed saliency maps against masks: map score_map (dncut eval-maps)
    predict_folder(...)        unlabelled images -> masks, maps, boxes: ... NCutPredictor ->
                               flat_map write_outputs -> map_batches: Parquet parts, merged into
                               predictions.parquet (dncut predict)

Outputs of the evaluations (``dncut.eval.report.write_report``): ``per_image.parquet``,
``summary.json``, ``summary.md``, ``examples.png`` and ``config.yaml`` under the run folder
(``Config.run_dir``) or the given ``out_dir``, and the offline gallery ``index.html``
(``dncut.eval.gallery``; predict writes its own ``index.html`` and ``config.yaml`` too). Metrics
are means over the images that succeeded; failed images are rows with their reason
(``dncut.eval.stages``).

Driver memory: per-image rows are written by the workers as Parquet parts and streamed into one
file at the end, row group by row group (``dncut.eval.streamed.merge_parts``; row order not
guaranteed), metrics are running sums (``Accumulator``); what remains per image on the driver is
its input record in one Arrow table (``dncut.eval.streamed.records_table``, ~150 bytes, with its
position as ``record_index``) and its ``RowLedger`` byte; the rows reach it as one payload row per
batch and method (``dncut.eval.streamed.driver_rows``: record indices, not image ids). Figures:
docs/operations.md, "Evaluation driver memory".

An inference actor that dies (OOM kill, SIGKILL, node lost) fails the pipeline; the driver runs it
again on the images without all their rows, at most ``dncut.eval.retry.ATTEMPTS`` runs, and counts
and writes each row once (``dncut.eval.retry``: Ray does not restart the actors, ``max_restarts=0``).

Every job builds its ``dncut.storage.Storage`` handle once from the config, checks its inputs
(dataset layouts, checkpoints, FOUND heads) before any Ray work, and passes the handle to its
tasks and actors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from dncut import storage
from dncut.backbone_specs import spec as backbone_spec
from dncut.config import Config, ConfigError
from dncut.data.images import IMAGE_SUFFIXES
from dncut.eval.gallery import write_eval_gallery, write_predict_gallery
from dncut.eval.inputs import dataset_name, map_records, saliency_records
from dncut.eval.outputs import predict_records, write_outputs
from dncut.eval.predict import METHODS
from dncut.eval.report import PER_IMAGE_FILE, Accumulator, weights_label, write_per_image, write_report
from dncut.eval.retry import ACTOR_REMOTE_ARGS, RowLedger, run_with_retries
from dncut.eval.stages import (DISCOVERY_KINDS, SEGMENTATION_CLASSES, BackboneFactory, NCutPredictor, TokenExtractor,
                               dataset_records, load_record, load_segmentation_record, result_row,
                               row_methods, score_map, score_row)
from dncut.eval.streamed import (RECORD_INDEX, batch_payloads, check_unique_ids, clear_parts, indexed, merge_parts,
                                 num_record_blocks, parts_folder, record_blocks, records_table, write_part)
from dncut.storage import Storage

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
CONFIG_FILE = "config.yaml"  # the resolved config, beside every evaluation's and predict's outputs
MAPS_PER_TASK = 16  # precomputed maps scored per Ray task: a task's overhead >> scoring one map
PART_ROWS = 4096  # rows per Parquet part written by a worker (per_image.parquet, predictions.parquet)
PREDICTION_KEY = ("image_id", "method")  # one row each in predictions.parquet


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


def _predictor_kwargs(cfg: Config, backbone: str, checkpoint: str | None, methods: list[str], store: Storage,
                      factory: BackboneFactory | None, found_head: bytes | None) -> dict[str, Any]:
    return {"backbone": backbone, "checkpoint": checkpoint, "pretrained": cfg.model.pretrained, "methods": methods,
            "solver": cfg.ncut.solver, "use_gpu": cfg.eval.gpus_per_actor > 0, "store": store, "factory": factory,
            "found_head": found_head, "trusted": cfg.model.trusted_checkpoint}


def predicted_rows(records, *, cfg: Config, backbone: str, checkpoint: str | None, methods: list[str],
                   store: Storage, image_size: int | None, spec=None, factory: BackboneFactory | None = None,
                   found_head: bytes | None = None):
    """Records -> predicted rows: the pipeline head that evaluation and predict share, a lazy
    ``ray.data.Dataset``: blocks of ``eval.batch_size`` records (a multiple of it past
    ``dncut.eval.streamed.MAX_RECORD_BLOCKS`` blocks) -> ``load_record`` (CPU task; ``image_size``
    None pads, the discovery protocol) -> ``NCutPredictor`` (an actor pool of ``eval.num_actors``,
    ``eval.gpus_per_actor``; ``ACTOR_REMOTE_ARGS``: no Ray restart).

    Args:
        records: ``dncut.eval.stages.record`` dicts, or a ``pyarrow.Table`` of them
            (``dncut.eval.streamed.records_table``: ~150 bytes an image on the driver, not ~1 KB).
        spec: the backbone's ``BackboneSpec`` (default: ``factory.spec``, else the registered one).
    """
    import ray

    ev = cfg.eval
    spec = spec or (factory.spec if factory is not None else backbone_spec(backbone))
    read_cpus, actor_cpus, _ = cpu_split(ev.num_actors)
    if hasattr(records, "column"):
        ds = ray.data.from_arrow_refs([ray.put(block) for block in record_blocks(records, ev.batch_size)])
    else:
        ds = ray.data.from_items(list(records), override_num_blocks=num_record_blocks(len(records), ev.batch_size))
    return (ds.map(load_record, fn_kwargs={"spec": spec, "image_size": image_size, "store": store}, num_cpus=read_cpus)
            .map_batches(NCutPredictor, batch_size=ev.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                         num_gpus=ev.gpus_per_actor or None, **ACTOR_REMOTE_ARGS,
                         fn_constructor_kwargs=_predictor_kwargs(cfg, backbone, checkpoint, methods, store, factory,
                                                                 found_head)))


# --------------------------------------------------------------------------- saliency / discovery
def run_pipeline(records, *, cfg: Config, dataset: str, discovery: bool, backbone: str,
                 checkpoint: str | None, acc: Accumulator, store: Storage, out_dir: str,
                 factory: BackboneFactory | None = None) -> None:
    """One (dataset, backbone, checkpoint) of saliency (``discovery`` False: images resized to
    ``eval.image_size``) or discovery (padded, CorLoc): the workers write its per-image rows as
    parts of ``<out_dir>/per_image.parquet``; the scored rows stream into ``acc`` (not kept), each
    (image, method) once, also across the re-runs after an actor died (``dncut.eval.retry``: a
    re-run's writers leave out the rows that reached the driver before). The rows reach the driver
    as one payload row per batch and method (``dncut.eval.streamed.driver_rows``). ``records``:
    ``dncut.eval.stages.record`` dicts or, for a driver that stays small, their ``records_table``.

    Raises:
        dncut.eval.retry.ActorRetriesExhausted: an inference actor died in each run.
        ValueError: two records share an image id (``dncut.eval.streamed.check_unique_ids``, before the pipeline runs).
        RuntimeError: a row reached the driver twice.
    """
    ev = cfg.eval
    methods = check_methods(ev.methods)
    found_head = found_head_for(cfg, backbone, checkpoint, store)
    check_checkpoint(checkpoint, store)
    score_cpus = cpu_split(ev.num_actors)[2]
    records = indexed(records if hasattr(records, "column") else records_table(records))
    check_unique_ids(records, dataset)
    head = records.slice(0, ev.examples).column("image_id").to_pylist() if records.num_rows else []
    example_ids = frozenset(head)
    log.info("eval %s: %d images, backbone %s, checkpoint %s, methods %s%s", dataset, len(records),
             backbone, weights_label(checkpoint, cfg.model.pretrained), methods, " + bilateral" if ev.bilateral else "")
    ledger = RowLedger(row_methods(methods, bilateral=ev.bilateral, discovery=discovery), records)
    task = "discovery" if discovery else "saliency"

    def run(pending) -> None:
        counted = ledger.counted(pending)  # per method, the record indices of a re-run's rows that arrived already
        ds = (
            predicted_rows(pending, cfg=cfg, backbone=backbone, checkpoint=checkpoint, methods=methods, store=store,
                           image_size=None if discovery else ev.image_size, factory=factory, found_head=found_head)
            .flat_map(score_row, fn_kwargs={"methods": methods, "bilateral": ev.bilateral, "discovery": discovery,
                                            "example_ids": example_ids}, num_cpus=score_cpus)
            .map_batches(write_per_image, batch_format="pyarrow", batch_size=PART_ROWS, num_cpus=score_cpus,
                         fn_kwargs={"out_dir": out_dir, "dataset": dataset, "backbone": backbone,
                                    "checkpoint": checkpoint, "store": store, "counted": counted})
        )
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):  # one row per batch and method
            for payload in batch_payloads(table):  # its rows summed: a repeat cannot be dropped here
                fresh = ledger.first_batch(payload[RECORD_INDEX], payload["method"])
                if not fresh.all():
                    repeated = records.column("image_id")[int(payload[RECORD_INDEX][np.argmin(fresh)])].as_py()
                    raise RuntimeError(f"eval {dataset}: the row of ({repeated}, {payload['method']}) reached the "
                                       "driver twice")
                acc.add_batch(payload, dataset=dataset, backbone=backbone, checkpoint=checkpoint, task=task)

    run_with_retries(run, records, missing=lambda: ledger.missing(records),
                     what=f"eval {dataset} {backbone} @ {checkpoint or 'pretrained'}")


# --------------------------------------------------------------------------- segmentation
def run_segmentation(records: list[dict], *, cfg: Config, dataset: str, backbone: str, checkpoint: str | None,
                     acc: Accumulator, store: Storage, out_dir: str, factory: BackboneFactory | None = None) -> None:
    """One (dataset, backbone, checkpoint) of unsupervised semantic segmentation (paper Table 3;
    protocol: ``dncut.eval.segmentation``): per-image rows and one mIoU per score into ``acc``.

    Scores: ``kmeans-k21`` (K = 21, Hungarian matching) and ``kmeans-k<K>`` (K =
    ``eval.segmentation.overcluster_k``, majority vote), each the mean (and std) over
    ``eval.segmentation.seeds``; failed images are rows and are left out of the clustering.

    Memory: the tokens are materialised in Ray's object store (spilled to disk when it is full), not
    on the driver. Pass 1 streams them to the driver, which keeps a ``TokenSample`` (all tokens up to
    ``SAMPLE_TOKENS``, then a deterministic sample of that many) and fits one ``Clustering`` per K and
    seed on it; pass 2 labels every token in Ray tasks (``_segment_batch``), which write the
    per-image rows and return confusion matrices ``(K, 21)`` that the driver sums.
    """
    import dataclasses

    import ray

    from dncut.eval.segmentation import SAMPLE_TOKENS, TokenSample, assign, fit_clustering, miou

    ev, seg = cfg.eval, cfg.eval.segmentation
    read_cpus, actor_cpus, task_cpus = cpu_split(ev.num_actors)
    check_checkpoint(checkpoint, store)
    log.info("segmentation %s: %d images, backbone %s, checkpoint %s, K = %d and %d, seeds %s", dataset,
             len(records), backbone, weights_label(checkpoint, cfg.model.pretrained), SEGMENTATION_CLASSES,
             seg.overcluster_k, seg.seeds)
    extracted = []  # the materialised tokens of the run that finished

    def extract(pending: list[dict]) -> None:  # an actor death re-runs the whole token pass (nothing reached acc)
        extracted[:] = [(
            ray.data.from_items(pending, override_num_blocks=num_record_blocks(len(pending), ev.batch_size))
            .map(load_segmentation_record, fn_kwargs={"image_size": seg.image_size, "store": store},
                 num_cpus=read_cpus)
            .map_batches(TokenExtractor, batch_size=ev.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=ev.num_actors), num_cpus=actor_cpus,
                         num_gpus=ev.gpus_per_actor or None, **ACTOR_REMOTE_ARGS,
                         fn_constructor_kwargs={"backbone": backbone, "checkpoint": checkpoint,
                                                "pretrained": cfg.model.pretrained,
                                                "use_gpu": ev.gpus_per_actor > 0, "store": store, "factory": factory,
                                                "trusted": cfg.model.trusted_checkpoint})
        ).materialize()]

    run_with_retries(extract, records, missing=lambda: records,
                     what=f"segmentation {dataset} {backbone} @ {checkpoint or 'pretrained'}")
    (ds,) = extracted
    scores = {f"kmeans-k{SEGMENTATION_CLASSES}": (SEGMENTATION_CLASSES, "hungarian"),
              f"kmeans-k{seg.overcluster_k}": (seg.overcluster_k, "majority")}
    sample = TokenSample(SAMPLE_TOKENS)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):  # pass 1: counts and the sample
        for i, image_id in enumerate(batch["image_id"]):
            status, error = str(batch["status"][i]), str(batch["error"][i])
            for method in scores:
                acc.add(result_row(str(image_id), method, status=status, error=error), dataset=dataset,
                        backbone=backbone, checkpoint=checkpoint, task="segmentation")
            if status == "ok":
                sample.add(str(image_id), np.asarray(batch["tokens"][i]))
    if sample.total > SAMPLE_TOKENS:
        log.info("segmentation %s: k-means fitted on %d of %d tokens (deterministic sample)", dataset,
                 SAMPLE_TOKENS, sample.total)
    tokens = sample.tokens() if sample.total else None
    fits: dict[str, list] = {}
    for method, (k, _) in scores.items():
        if tokens is not None and len(tokens) >= k:  # labels of the sample are not shipped to the tasks
            fits[method] = [dataclasses.replace(fit_clustering(tokens, k, seed=s), labels=np.empty(0, np.int64))
                            for s in seg.seeds]
    del tokens, sample
    confs = {m: [np.zeros((scores[m][0], SEGMENTATION_CLASSES), np.int64) for _ in seg.seeds] for m in fits}
    labelled = ds.map_batches(_segment_batch, batch_format="numpy", batch_size=None, num_cpus=task_cpus,
                              fn_kwargs={"fits": fits, "methods": list(scores), "out_dir": out_dir, "dataset": dataset,
                                         "backbone": backbone, "checkpoint": checkpoint, "store": store})
    for row in labelled.iter_rows():  # pass 2: one row per (method, seed) and batch
        method, s = str(row["method"]), int(row["seed_index"])
        confs[method][s] += np.asarray(row["conf"], np.int64).reshape(confs[method][s].shape)
    for method, (k, how) in scores.items():
        per_seed = [miou(c, assign(c, how))[0] for c in confs.get(method, [])]
        acc.set_metrics((dataset, method, backbone, checkpoint), {
            "miou": float(np.mean(per_seed)) if per_seed else None,
            "miou_std": float(np.std(per_seed)) if per_seed else None, "seeds": len(per_seed)})


def _segment_batch(batch: dict[str, np.ndarray], *, fits: dict[str, list], methods: list[str], out_dir: str,
                   dataset: str, backbone: str, checkpoint: str | None, store: Storage) -> dict[str, Any]:
    """Ray task of ``run_segmentation``'s pass 2: the batch's per-image rows as a part of
    ``per_image.parquet``, and its ok images' tokens labelled by each fitted ``Clustering``, resized
    to ``SCORE_SIZE`` (nearest) against their ``labels`` -> ``{method, seed_index, conf (K * 21,)}``
    rows, one per (method, seed)."""
    import math

    import pyarrow as pa
    from PIL import Image

    from dncut.eval.report import per_image_row, per_image_schema
    from dncut.eval.segmentation import SCORE_SIZE, confusion

    rows, confs = [], {m: [np.zeros((f.kmeans.n_clusters, SEGMENTATION_CLASSES), np.int64) for f in fits[m]]
                       for m in fits}
    for i, image_id in enumerate(batch["image_id"]):
        status, error = str(batch["status"][i]), str(batch["error"][i])
        rows += [per_image_row(result_row(str(image_id), m, status=status, error=error), dataset=dataset,
                               backbone=backbone, checkpoint=checkpoint) for m in methods]
        if status != "ok":
            continue
        tokens = np.asarray(batch["tokens"][i])  # (h*w, C), a square grid
        side = math.isqrt(len(tokens))
        for method, method_fits in fits.items():
            for s, fit in enumerate(method_fits):
                grid = fit.predict(tokens).reshape(side, side).astype(np.int32)  # (h, w)
                pred = np.asarray(Image.fromarray(grid).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))
                confs[method][s] += confusion(pred, batch["labels"][i], fit.kmeans.n_clusters, SEGMENTATION_CLASSES)
    if rows:
        write_part(pa.Table.from_pylist(rows, schema=per_image_schema()),
                   parts_folder(out_dir, PER_IMAGE_FILE, store), store)
    out = [(m, s, c.ravel()) for m in confs for s, c in enumerate(confs[m])]
    return {"method": np.asarray([m for m, _, _ in out], dtype=object),
            "seed_index": np.asarray([s for _, s, _ in out], np.int64),
            "conf": np.asarray([c for _, _, c in out] or np.zeros((0, 0), np.int64), dtype=object)}


# --------------------------------------------------------------------------- the commands
def _finish(acc: Accumulator, out_dir: str, cfg: Config | None, store: Storage) -> dict:
    """Summary of ``acc``; every output written (the workers' per-image parts merged)."""
    summary = acc.summary()
    write_report(out_dir, summary, acc, config_yaml=(cfg or Config()).to_yaml(), store=store)
    write_eval_gallery(out_dir, summary, acc.examples, store)  # index.html, after per_image.parquet
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
    cfg = cfg.with_absolute_paths()  # the workers' working directories are not the driver's
    store = cfg.storage_handle()
    # every dataset's layout is checked before any Ray work
    specs = [(spec, dataset_records(spec, store, cfg.data.val_scenes)) for spec in cfg.eval.datasets]
    specs = [(spec, recs if spec.task == "segmentation" else records_table(recs)) for spec, recs in specs]
    for backbone in cfg.eval_backbones():  # and every FOUND head is found before any Ray work
        for checkpoint in cfg.eval.checkpoints:
            found_head_for(cfg, backbone, checkpoint, store)
    ensure_ray()
    clear_parts(cfg.run_dir, PER_IMAGE_FILE, store)
    acc = Accumulator(cfg.eval.methods)
    for spec, records in specs:
        for backbone in cfg.eval_backbones():
            for checkpoint in cfg.eval.checkpoints:
                common = {"cfg": cfg, "dataset": spec.name, "backbone": backbone, "checkpoint": checkpoint,
                          "acc": acc, "store": store, "out_dir": cfg.run_dir, "factory": backbone_factory}
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
    dataset = dataset_name(images_dir)  # the name of the folder as the user gave it
    images_dir, masks_dir, checkpoint, out_dir = map(storage.absolute, (images_dir, masks_dir, checkpoint, out_dir))
    cfg = (cfg or Config()).with_overrides({"eval.methods": methods, "eval.bilateral": bool(bilateral),
                                           "eval.backbones": [backbone], "eval.checkpoints": [checkpoint]})
    cfg = cfg.with_absolute_paths()
    store = cfg.storage_handle()
    records = saliency_records(images_dir, masks_dir, store)
    ensure_ray()
    clear_parts(out_dir, PER_IMAGE_FILE, store)
    acc = Accumulator(methods)
    run_pipeline(records, cfg=cfg, dataset=dataset, discovery=False, backbone=backbone,
                 checkpoint=checkpoint, acc=acc, store=store, out_dir=out_dir)
    return _finish(acc, out_dir, cfg, store)


def _write_map_rows(batch, *, out_dir: str, dataset: str, store: Storage):
    """``write_per_image`` for scored maps, whose checkpoint (the maps folder) is per row: per maps folder
    (in order of first appearance), its rows as a Parquet part, and its ``driver_rows`` (one row per
    method within the folder: two folders may share a method name) with a ``checkpoint`` column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for checkpoint in dict.fromkeys(batch.column("checkpoint").to_pylist()) or [None]:  # [None]: no row
        rows = batch.filter(pc.equal(batch["checkpoint"], checkpoint)) if checkpoint is not None else batch
        payload = write_per_image(rows, out_dir=out_dir, dataset=dataset, backbone="maps", checkpoint=checkpoint,
                                  store=store)
        out.append(payload.append_column("checkpoint", pa.array([checkpoint] * payload.num_rows, pa.string())))
    return pa.concat_tables(out)


def evaluate_maps(masks_dir: str, maps_dirs: str | Sequence[str], out_dir: str,
                  store: Storage | None = None) -> dict:
    """Score folders of precomputed saliency maps (``dncut eval-maps``).

    Each run's metrics hold the TokenCut-definition ``acc``, ``iou``, ``max_fbeta`` and ``mae``
    plus ``max_fbeta_pysod`` / ``mae_pysod`` (pysodmetrics' definition: min-max normalised maps,
    256 ``>=`` thresholds) so published numbers can be compared either way.

    Args:
        masks_dir: folder of ground-truth masks ``<stem>.png`` (local or ``s3://``).
        maps_dirs: folder(s) of maps ``<stem>.png`` (or ``<stem>.<image ext>.png``, as ``dncut predict``
            names them; pairing rule: ``dncut.eval.outputs.pair_maps``); a folder whose sub-folders are methods
            (like ``sod-val/maps``, or ``dncut predict``'s ``masks/``) gives one run per sub-folder.
        out_dir: output folder or ``s3://`` prefix.
        store: the storage handle (``None``: the environment's defaults).

    Returns:
        The summary dict (also written to ``out_dir/summary.json``). A mask without a map is a
        failed row of that method.
    """
    import ray

    store = store or Storage()
    dataset = dataset_name(masks_dir)  # the name of the folder as the user gave it
    maps_dirs = [storage.absolute(d) for d in ([maps_dirs] if isinstance(maps_dirs, str) else maps_dirs)]
    masks_dir, out_dir = storage.absolute(masks_dir), storage.absolute(out_dir)
    records, n_masks = map_records(masks_dir, maps_dirs, store)
    ensure_ray()
    log.info("eval-maps %s: %d masks x %d map folders", dataset, n_masks, len(records) // max(1, n_masks))
    clear_parts(out_dir, PER_IMAGE_FILE, store)
    acc = Accumulator()
    ds = ray.data.from_arrow_refs([ray.put(block) for block in record_blocks(records, MAPS_PER_TASK)])
    del records
    ds = ds.map(score_map, fn_kwargs={"store": store}).map_batches(
        _write_map_rows, batch_format="pyarrow", batch_size=PART_ROWS,
        fn_kwargs={"out_dir": out_dir, "dataset": dataset, "store": store})
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):  # a row per batch, folder, method
        for payload in batch_payloads(table):
            acc.add_batch(payload, dataset=dataset, backbone="maps", checkpoint=payload["checkpoint"],
                          task="saliency", pysod=True)
    return _finish(acc, out_dir, None, store)


def predict_folder(images: str, out_dir: str, cfg: Config, *, backbone: str | None = None,
                   checkpoint: str | None = None) -> dict[str, Any]:
    """Run ``cfg.eval.methods`` on every image of ``images`` and write what they find (``dncut predict``).

    Outputs under ``out_dir`` (``dncut.eval.outputs.write_outputs``): ``masks/<method>/<path>.png``,
    ``z2/<method>/<path>.png`` (``<path>``: the image's path below ``images`` with its extension,
    ``sub/x.jpg`` -> ``masks/<method>/sub/x.jpg.png``, so names never collide; naming rule:
    ``dncut.eval.outputs.predict_records``) and ``predictions.parquet`` (one row per image and method: status,
    error, mask and map URIs, boxes as JSON; failed images are rows with their reason). The workers
    write the rows as Parquet parts, each sorted by (image_id, method), streamed into one file at
    the end: rows are not sorted across parts, and the driver never holds them. After an actor
    died, the images without all their rows run again (``dncut.eval.retry``): their files are
    overwritten with the same names, their rows kept once (``PREDICTION_KEY``).
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
        dncut.eval.retry.ActorRetriesExhausted: an inference actor died in each run.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    images, out_dir, checkpoint = map(storage.absolute, (images, out_dir, checkpoint))
    cfg = cfg.with_absolute_paths()
    store, ev = cfg.storage_handle(), cfg.eval
    backbone = backbone or cfg.model.backbone
    methods = check_methods(ev.methods)
    uris = store.check_source(images, IMAGE_SUFFIXES)
    check_checkpoint(checkpoint, store)
    found_head = found_head_for(cfg, backbone, checkpoint, store)
    records = predict_records(uris, images)  # output names unique per input
    table = indexed(records_table(records))
    ensure_ray()
    write_cpus = cpu_split(ev.num_actors)[2]
    ledger, failed = RowLedger(methods, table), set()  # failed: image ids, bounded by the failures' count

    def run(pending) -> None:
        ds = (
            predicted_rows(pending, cfg=cfg, backbone=backbone, checkpoint=checkpoint, methods=methods, store=store,
                           image_size=ev.image_size, found_head=found_head)
            .flat_map(_indexed_outputs, fn_kwargs={"methods": methods, "out_dir": out_dir, "store": store},
                      num_cpus=write_cpus)
            .map_batches(_write_predictions, batch_format="pyarrow", batch_size=PART_ROWS, num_cpus=write_cpus,
                         fn_kwargs={"folder": parts_folder(out_dir, PREDICTIONS_FILE, store), "store": store})
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for method in pc.unique(batch["method"]).to_pylist():
                rows = batch.filter(pc.equal(batch["method"], method))
                at = np.asarray(rows[RECORD_INDEX].to_numpy(), np.int64)  # (m,) record indices
                fresh = ledger.first_batch(at, method) & ~np.asarray(
                    pc.equal(rows["status"], "ok").to_numpy(zero_copy_only=False), bool)
                failed.update(table.column("image_id").take(pa.array(at[fresh])).to_pylist())

    clear_parts(out_dir, PREDICTIONS_FILE, store)
    run_with_retries(run, table, missing=lambda: ledger.missing(table), what=f"predict {images}")
    n_rows = merge_parts(out_dir, PREDICTIONS_FILE, store, unique=PREDICTION_KEY)
    store.write_bytes(store.join(out_dir, CONFIG_FILE), cfg.with_overrides(
        {"model.backbone": backbone, "eval.backbones": [backbone], "eval.checkpoints": [checkpoint]}).to_yaml().encode())
    write_predict_gallery(out_dir, {r["image_id"]: r["image_uri"] for r in records}, store, ev.examples)
    if failed:
        log.warning("predict: %d of %d images failed, e.g. %s", len(failed), len(records), sorted(failed)[:3])
    return {"images": len(records), "rows": n_rows, "failed": len(failed), "out": out_dir}


def _indexed_outputs(row: dict, **kwargs) -> list[dict]:
    """``dncut.eval.outputs.write_outputs`` of one predicted row, each output row with the row's
    ``RECORD_INDEX`` (how the driver finds its record)."""
    out = write_outputs(row, **kwargs)
    for written in out:
        written[RECORD_INDEX] = int(row[RECORD_INDEX])
    return out


def _write_predictions(batch, *, folder: str, store: Storage):
    """Ray Data step: the batch's prediction rows, sorted by (image_id, method), without their record
    index, as a Parquet part of ``predictions.parquet``; returns their ``{record_index, method,
    status}`` for the driver's counts."""
    if batch.num_rows:
        write_part(batch.drop_columns([RECORD_INDEX]).sort_by([("image_id", "ascending"), ("method", "ascending")]),
                   folder, store)
    return batch.select([RECORD_INDEX, "method", "status"])
