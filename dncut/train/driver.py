"""The driver of a training run: run config, trainer assembly, ``fit``, ``export_run``.

    fit(cfg)
      build_trainer(cfg)   absolute paths (once, here); before any worker starts: the resource
                           arithmetic (dncut.train.resources: workers + decode tasks against the
                           cluster), the rerun check (a run folder with trained state continues only
                           with its own config, dncut.train.checkpoints.check_rerun), the data
                           source; then the resume step (the run's newest intact checkpoint,
                           dncut.train.checkpoints); the row stream from that step; config.yaml
                           and train_data.json (the images listed) in the run folder; a
                           TorchTrainer whose RunConfig names a fresh ``fit_<time>`` folder under
                           the run folder
      -> trainer.fit()     workers: dncut.train.worker.train_loop_per_worker (via dncut.train.entry)
         unless the run has finished already (finished_result): then no worker starts

``dncut found-train`` assembles its trainer from the same pieces (``scaling_config``,
``run_config``; ``dncut.train.found``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, get_args

from dncut.backbones import load_backbone
from dncut.config import Config, load_config
from dncut.data.datasets import saliency_dataset
from dncut.data.pipeline import source_uris, train_data_config, train_dataset
from dncut.export import ExportFormat, RunFacts, export_hf, push_hf
from dncut.runtime import worker_env
from dncut.storage import Storage, read_bytes
from dncut.tracking import ProgressBar, read_history
from dncut.train.checkpoints import (CONFIG_FILE, EXPORT_FILE, check_rerun, finished_at, new_fit_name,
                                     prune_earlier_fits, resume_point)
from dncut.train.resources import check_cluster
from dncut.train.entry import train_loop_per_worker

log = logging.getLogger("dncut.train")

TRAIN_DATA_FILE = "train_data.json"  # {"source": data.train, "images": count}: what the run listed, for the card
REPORT_POLL_S = 0.25
"""Seconds between Ray Train's controller polls of the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
Ray's default 2.0). ``ray.train.report`` returns only once the controller has taken the previous
report, so the poll interval bounds how often a run can report (``docs/operations.md``, "Load").
A user's own setting of the variable wins."""


def run_config(cfg: Config, callbacks: list | None = None, *, store: Storage | None = None,
               name: str | None = None):
    """``RunConfig``: Ray Train's folder for this fit (``run_dir/<name>``, default ``new_fit_name()``),
    local or s3://; checkpoint retention, failure policy, the workers' environment
    (``dncut.runtime.worker_env``).

    Also sets ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` to ``REPORT_POLL_S`` in this process unless it is
    set: Ray Train passes it from the process that calls ``fit()`` to its controller."""
    import ray.train

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    store = store or cfg.storage_handle()
    run = cfg.with_absolute_paths().run_dir
    if store.is_s3(run):
        fs, path = store.filesystem(run)
        kwargs: dict[str, Any] = {"storage_path": path, "storage_filesystem": fs}
    else:
        kwargs = {"storage_path": run}
    return ray.train.RunConfig(
        name=name or new_fit_name(),
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        checkpoint_config=checkpoint_config(cfg),
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # dncut logs the progress
        worker_runtime_env={"env_vars": worker_env()},
        **kwargs,
    )


def checkpoint_config(cfg: Config):
    """``CheckpointConfig``: the ``train.keep_checkpoints`` newest, or those with the highest
    ``val_iou`` (``train.keep_checkpoints_by``; Ray Train keeps the newest as well)."""
    import ray.train

    t = cfg.train
    if t.keep_checkpoints_by == "val_iou":
        return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_iou",
                                          checkpoint_score_order="max")
    return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)


def scaling_config(cfg: Config):
    """``ScalingConfig`` of ``cfg.scaling`` (workers, GPU, CPUs / GPUs per worker)."""
    import ray.train

    sc = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=sc.num_workers, use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})})


def start_step(cfg: Config, store: Storage, last: int) -> int:
    """The step this fit starts at: that of the run's newest intact checkpoint (skipped broken ones
    are named in a WARNING), at most ``last``. With ``train.keep_checkpoints_by: newest`` the
    earlier fits' checkpoints beyond ``train.keep_checkpoints`` are deleted first."""
    if cfg.train.keep_checkpoints_by == "newest":
        prune_earlier_fits(cfg.run_dir, store, cfg.train.keep_checkpoints)
    ref = resume_point(cfg.run_dir, store, say=True)
    if ref is not None:
        log.info("run %s resumes from %s (step %d)", cfg.run_dir, ref.name, ref.step)
    return min(ref.step if ref else 0, last)


def build_trainer(cfg: Config, callbacks: list | None = None, placement_group_file: str | None = None):
    """Check the run against the cluster and its folder, validate the data source (all before any
    worker starts and before ``config.yaml`` is written), and assemble the TorchTrainer.
    ``placement_group_file``: a URI where rank 0 writes its workers' placement group id (hex), for
    a sweep to remove it after a stop (``dncut.tune.ReleaseStoppedTrials``).

    Raises:
        dncut.train.resources.ResourceError: the workers leave no CPU for the decode tasks.
        dncut.train.checkpoints.RerunError: the run folder was trained with another config.
        dncut.storage.StorageError, dncut.data.datasets.DatasetLayoutError: an unusable source.
    """
    import ray.data
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop logs progress
    cfg = cfg.with_absolute_paths()
    check_cluster(cfg)
    store = cfg.storage_handle()
    check_rerun(cfg, store)
    uris = source_uris(cfg)
    if cfg.data.val is not None:  # a validation folder without masks fails here, before any worker
        saliency_dataset("folder", cfg.data.val, store)
    total = cfg.train.total_steps(len(uris))
    start = start_step(cfg, store, total)  # a rerun continues the seeded row stream where it stopped
    ds = train_dataset(cfg, uris, total, start)
    store.write_bytes(store.join(cfg.run_dir, CONFIG_FILE), cfg.to_yaml().encode())
    store.write_bytes(store.join(cfg.run_dir, TRAIN_DATA_FILE), json.dumps(  # for the model card
        {"source": cfg.data.train, "images": len(uris)}).encode())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "total_steps": total, "start_step": start,
                           "placement_group_file": placement_group_file},
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, callbacks, store=store),
        datasets={"train": ds},
        dataset_config=train_data_config(),
    )


def fit(cfg: Config, *, progress: bool = False):
    """Train (or resume ``cfg.run_dir``) and return the Ray Train ``Result``. A rerun of a finished
    run (``finished_result``) starts no worker and returns the finished run's result; so does a fit
    that reached the end without training a step (a run whose end was reached but not marked).

    ``progress``: draw a progress bar on this (the driver's) console (``dncut.tracking.ProgressBar``).
    """
    trainer = build_trainer(cfg)
    loop = trainer.train_loop_config
    cfg = cfg.with_absolute_paths()
    done = finished_result(cfg, loop["total_steps"])
    if done is not None:
        log.info("run %s finished at step %d already: nothing to train (set a larger train.max_steps to "
                 "continue it, or a new run_name)", cfg.run_dir, loop["total_steps"])
        return done
    with ProgressBar(cfg.run_dir, loop["total_steps"], start=loop["start_step"], store=cfg.storage_handle(),
                     disable=not progress, desc=cfg.run_name):
        result = trainer.fit()
    if result.error is None and result.checkpoint is None:  # trained no step (the end was reached before)
        return finished_result(cfg, loop["total_steps"]) or result
    return result


def finished_result(cfg: Config, total: int):
    """The ``ray.train.Result`` of a run that has finished ``total`` steps, or None (train then).

    Finished: the manifest's "finished" mark is at ``total`` (written after the last checkpoint's
    upload and the export, ``dncut.train.checkpoints.record_finished``), the newest intact checkpoint
    is at ``total`` and the export is there. The result holds the metrics of the run's last report
    and its newest checkpoint, as the ``fit()`` that finished it returned them.
    """
    import ray.train

    store = cfg.storage_handle()
    mark, newest = finished_at(cfg.run_dir, store), resume_point(cfg.run_dir, store)
    if (mark is None or newest is None or mark["step"] != total or newest.step != total
            or not store.exists(store.join(cfg.run_dir, EXPORT_FILE))):
        return None
    fs, path = store.filesystem(newest.uri)
    fit_folder = store.join(cfg.run_dir, newest.name.split("/")[0])
    checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    return ray.train.Result(metrics=mark["metrics"], checkpoint=checkpoint, error=None, path=fit_folder,
                            best_checkpoints=[(checkpoint, mark["metrics"])])


def export_run(run: str, fmt: ExportFormat = "hf", out: str | None = None, *,
               push_to_hub: str | None = None) -> list[str]:
    """Export the backbone of a training run folder (``output_dir/run_name``: ``backbone.pth`` + ``config.yaml``).

    Args:
        run: The run folder, local or ``s3://`` (S3 endpoint/region from the run's ``config.yaml``).
        fmt: ``safetensors``: ``model.safetensors`` + ``config.json``; ``hf``: the same plus ``README.md``
            (the model card of the run: ``run_facts``), i.e. a complete Hub repository folder.
        out: Output folder; default ``RUN/<fmt>``.
        push_to_hub: Also upload to this Hub repo id (``user/name``) with timm's ``push_to_hf_hub``.

    Returns:
        The written files (and the commit URL when pushed).

    Raises:
        ValueError: unknown ``fmt``, an unreadable run, or ``backbone.pth`` of another backbone than the config's.
        RuntimeError: the push failed.
    """
    if fmt not in get_args(ExportFormat):
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(get_args(ExportFormat))}")
    cfg = load_config(Storage.join(run, CONFIG_FILE), reader=read_bytes)
    store = cfg.storage_handle()
    backbone = load_backbone(store.join(run, EXPORT_FILE), store)
    if backbone.name != cfg.model.backbone:
        raise ValueError(f"{run}: {EXPORT_FILE} holds {backbone.name!r}, {CONFIG_FILE} says "
                         f"{cfg.model.backbone!r}")
    facts = run_facts(run, cfg, store)
    uris = export_hf(backbone, out or store.join(run, fmt), store, readme=fmt == "hf", run=facts)
    if push_to_hub:
        uris.append(push_hf(backbone, push_to_hub, run=facts))
    return uris


def run_facts(run: str, cfg: Config, store: Storage) -> RunFacts:
    """The model card's facts of a run folder: its ``config.yaml`` (``cfg``), ``train_data.json``
    (the images the run listed; a run without it: the generated scenes' count, else unknown) and
    ``metrics.jsonl`` (the last step; the first, best and final ``val_iou`` with their steps)."""
    t, d, loss, ncut = cfg.train, cfg.data, cfg.loss, cfg.ncut
    images: int | None = d.num_scenes if d.train is None else None
    record = store.join(run, TRAIN_DATA_FILE)
    if store.exists(record):
        images = int(json.loads(store.read_bytes(record))["images"])
    history = read_history(run, store)
    steps = max((int(m["step"]) for m in history if "step" in m), default=None)
    vals = [m for m in history if isinstance(m.get("val_iou"), (int, float)) and math.isfinite(m["val_iou"])]
    validation: dict[str, Any] = {}
    if vals:
        at = lambda m: f"{m['val_iou']:.4f} at step {int(m.get('val_step', m.get('step', 0)))}"  # noqa: E731
        validation = {"data": d.val or f"{d.val_scenes} generated scenes (held out)",
                      "metric": "val_iou: Simple NCut saliency IoU (dncut.eval.validate)",
                      "first val_iou": at(vals[0]), "best val_iou": at(max(vals, key=lambda m: m["val_iou"])),
                      "final val_iou": at(vals[-1])}
        if isinstance(vals[-1].get("val_max_fbeta"), (int, float)):
            validation["final val_max_fbeta"] = f"{vals[-1]['val_max_fbeta']:.4f}"
    try:
        total = t.total_steps(images)
    except ValueError:
        total = None
    optimizer = f"{t.optimizer}, weight decay {t.weight_decay}" + (f", momentum {t.momentum}"
                                                                     if t.optimizer == "lars" else "")
    recipe = {
        "global batch": f"{t.batch_size} on {cfg.scaling.num_workers} worker(s)", "optimizer": optimizer,
        "learning rate": f"{t.lr} at batch {t.base_batch_size} ({t.lr_scaling} scaling), {t.warmup_steps} "
                         f"warm-up steps, cosine to {t.min_lr}",
        "loss": f"{loss.consistency} consistency, alpha {loss.alpha}, temperature {loss.temperature}, "
                f"IoU filter {loss.iou_threshold}",
        "crops": f"{d.crop_size} px, scale {tuple(d.crop_scale)}, photometric {d.photometric}",
        "NCut": f"{ncut.affinity} affinity, {ncut.laplacian} Laplacian, {ncut.solver}",
        "seed": cfg.seed, "exported encoder": t.export,
    }
    return RunFacts(run=run, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint,
                    data=d.train or "generated scenes (dncut.data.scenes)", images=images, steps=steps,
                    total_steps=total, recipe=recipe, validation=validation)
