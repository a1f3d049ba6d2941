"""The Ray Train adapter: what every Train worker runs (``train_loop_per_worker``).

    train_loop_per_worker(loop_config)     every worker, CPU or GPU, 1 or N
        setup_worker(): logging, seed (seed + rank), threads, device
        build model (encoder + g + q), optimiser, per-step lr schedule   (dncut.train.loop)
        resume(): the run's newest intact checkpoint (dncut.train.checkpoints.resume_point;
                  rank 0 chooses, every rank loads the same one)
        for each batch of the worker's streaming_split shard (batches(): iter_torch_batches on
        the device, pinned, prefetched):
            train_one_step()
            every log_every / checkpoint_every / val_every step: report()
        Chief (rank 0 only, dncut.train.chief): validation, progress, tracking, checkpoint
            files, and at the end the export of the finetuned backbone and the curves figure,
            then the run's "finished" mark (dncut.train.checkpoints.record_finished)

``report`` hands Ray Train the metrics (a barrier of all workers) and, when due, rank 0's
checkpoint folder, which Ray uploads before ``ray.train.report`` returns; then the worker
returns freed heap to the kernel (``dncut.runtime.release_freed_memory``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from dncut.config import Config
from dncut.runtime import release_freed_memory, set_threads
from dncut.storage import Storage
from dncut.train.checkpoints import (checkpoint_name, clear_finished, load_state, record, record_finished,
                                     resume_point)
from dncut.train.chief import Chief
from dncut.train.loop import (LoopState, broadcast, build_loss, build_model, build_optimizer, checkpoint_due,
                              report_due, run_schedule, step_metrics, train_one_step, union, val_due)

log = logging.getLogger("dncut.train")

PREFETCH_BATCHES = 2  # batches Ray Data prepares (fetch, collate, pin, copy) while a step runs
LOG_FILE = "train.log"  # the workers' dncut log lines, under a local run folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker. ``loop_config``: ``{"config": Config dict (absolute paths),
    "total_steps": int, "start_step": int, "placement_group_file": URI or None}`` (the step the
    dataset's first row belongs to; where rank 0 writes the workers' placement group id, see
    ``dncut.train.driver.build_trainer``).

    Raises:
        RuntimeError: the rows ran out before ``total_steps``; too many non-finite losses in a row.
    """
    import ray.train
    import ray.train.torch
    import ray.util

    cfg, total = Config.model_validate(loop_config["config"]), int(loop_config["total_steps"])
    start = int(loop_config.get("start_step", 0))
    store = cfg.storage_handle()
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = setup_worker(cfg, rank)
    if rank == 0 and loop_config.get("placement_group_file"):
        group = ray.util.get_current_placement_group()
        if group is not None:
            store.write_bytes(loop_config["placement_group_file"], group.id.hex().encode())
    model, criterion = build_model(cfg, store), build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    sched = run_schedule(cfg, total)
    state = resume(model, optimizer, rank, cfg, store)
    if rank == 0 and state.step < total:
        clear_finished(cfg.run_dir, store)  # a finished run extended: no longer finished
    model = ray.train.torch.prepare_model(model)
    chief = Chief(cfg, device, model, state, store) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    while state.step < total:  # false when a finished run is run again: nothing left to train
        for batch in batches(shard, cfg.train.batch_size // world, skip=state.step - start, device=device):
            train_one_step(model, criterion, optimizer, batch, float(sched[state.step]), state, cfg, device)
            if report_due(state.step, total, cfg):
                report(model, optimizer, state, total, sched, cfg, chief, device)
            if state.step >= total:
                break
        else:
            raise RuntimeError(f"the training rows ran out at step {state.step} of {total} "
                               "(dncut.data.pipeline.epochs_needed sized them for the whole run)")
    if chief is not None:
        chief.finish(model)
        record_finished(cfg.run_dir, store, state.step, chief.last_metrics)  # a rerun starts no worker


def setup_worker(cfg: Config, rank: int) -> torch.device:
    """Logging, seed (``seed + rank``), CPU threads (``scaling.cpus_per_worker``); the worker's device."""
    import ray.train.torch

    worker_logging(cfg, rank)
    torch.manual_seed(cfg.seed + rank)
    if not cfg.scaling.use_gpu:
        set_threads(cfg.scaling.cpus_per_worker)
    return ray.train.torch.get_device()


def worker_logging(cfg: Config, rank: int) -> None:
    """dncut's log lines on the worker's stderr (Ray's worker log files; forwarded to the driver's
    console only with ``--verbose``) and, for a local run folder, appended to ``run_dir/train.log``."""
    logger = logging.getLogger("dncut")
    if logger.handlers:
        return
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if not Storage.is_s3(cfg.run_dir):
        os.makedirs(cfg.run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(cfg.run_dir, LOG_FILE)))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def batches(shard, batch_size: int, skip: int, device: torch.device):
    """This worker's batches (dicts of ``(batch_size, ...)`` tensors on ``device``), after ``skip``
    already trained ones: a worker group restarted inside one ``fit`` re-reads the dataset from its
    first row (``start_step``), so it passes over the batches of the steps it resumes after
    (decoded, not trained)."""
    if skip < 0:
        log.warning("the checkpoint (step %d) is older than the data start; continuing without skipping", skip)
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                          pin_memory=device.type == "cuda", prefetch_batches=PREFETCH_BATCHES):
        if skip > 0:
            skip -= 1
            continue
        yield batch


def agreed_resume_point(cfg: Config, store: Storage, rank: int):
    """The run's newest intact checkpoint as rank 0 sees it, on every rank (None: start from scratch).
    The checkpoint Ray Train would hand the worker (``get_checkpoint``) is not used."""
    return broadcast(resume_point(cfg.run_dir, store) if rank == 0 else None)


def resume(model, optimizer: torch.optim.Optimizer, rank: int, cfg: Config, store: Storage) -> LoopState:
    """Load the run's newest intact checkpoint into ``model`` and ``optimizer``; a fresh state without one."""
    ref = agreed_resume_point(cfg, store, rank)
    if ref is None:
        return LoopState()
    state = LoopState.from_checkpoint(load_state(ref, store), model, optimizer, rank)
    if rank == 0:
        log.info("resumed from %s at step %d (epoch %d)", ref.uri, state.step, state.epoch)
    return state


def report(model, optimizer, state: LoopState, total: int, sched: np.ndarray, cfg: Config, chief: Chief | None,
           device: torch.device) -> None:
    """Validation when due (rank 0), then ``ray.train.report`` (a barrier of all workers) of the
    metrics, with rank 0's checkpoint when due; then ``release_freed_memory``."""
    import ray.train
    import ray.util

    if chief is not None and val_due(state.step, total, cfg):
        state.last_val = chief.validate(model, state.step)
    metrics = {**step_metrics(state, total, sched, device), **state.last_val}
    state.skipped_files = union(state.skipped_files)
    metrics["skipped_files"] = len(state.skipped_files)
    checkpoint = None
    if chief is not None:
        chief.record(metrics)
        if checkpoint_due(state.step, total, cfg):
            checkpoint = ray.train.Checkpoint.from_directory(chief.stage_checkpoint(model, optimizer, state, metrics))
    report_checkpoint(metrics, checkpoint, cfg, chief.store if chief is not None else None)
    release_freed_memory()


def report_checkpoint(metrics: dict[str, Any], checkpoint, cfg: Config, store: Storage | None) -> None:
    """``ray.train.report`` (all workers); rank 0's ``checkpoint`` (or None) is uploaded to
    ``run_dir/<fit>/checkpoint_<step>_<time>`` before the call returns, then recorded in dncut's
    manifest (``dncut.train.checkpoints.record``)."""
    import ray.train
    import ray.util

    name = checkpoint_name(int(metrics["step"])) if checkpoint is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     delete_local_checkpoint_after_upload=True)
    if name is not None and store is not None:
        record(cfg.run_dir, store, f"{ray.train.get_context().get_experiment_name()}/{name}", int(metrics["step"]))
