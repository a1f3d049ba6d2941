"""Self-supervised dense learning on Ray Train (paper Sec. 3.3-3.4, 4 "Training details").

    fit(cfg)                                   driver: validate source, build TorchTrainer
      -> train_loop_per_worker(loop_config)   every worker, CPU or GPU, 1 or N
           build model (encoder + g + q), optimiser, per-step lr schedule
           resume(): from ray.train.get_checkpoint() (step, optimiser, counters)
           for each batch of the worker's streaming_split shard (iter_torch_batches: on the
           device, pinned, prefetched):
               train_one_step(): drop undecodable rows (counted) -> model_inputs (photometric
               augmentation of both views on the device) -> model -> NCutLoss -> step
               every log_every: report() metrics; every checkpoint_every: with a checkpoint
           Chief (rank 0 only): validation, progress line, tracking (metrics.jsonl, TensorBoard,
               MLflow / W&B: dncut.tracking), checkpoint files, and at the end the export of the
               finetuned backbone (export_backbone) and the curves figure

Learning-rate rule: the peak lr is ``train.lr * scale(global_batch / base_batch_size)``
(linear by default, Goyal et al.), warmed up linearly over ``warmup_steps`` then cosine to
``min_lr``. The global batch is split evenly across workers; DDP averages gradients.

A non-finite loss (or NaN features: ``dncut.ncut.NonFiniteFeaturesError``) skips the step on
every worker (the decision is all-reduced so DDP stays in step) and is counted;
``max_nan_steps`` in a row stop the run with a clear error. Mask collapse (similarity to a
template above 0.9) is logged as a warning.

Validation (rank 0, ``train.val_every`` and at the end) is ``dncut.eval.validate``: the
evaluation job's own inference path, so ``val_iou`` is what ``dncut eval-saliency`` reports.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.distributed as dist
from pyarrow import fs as pafs

from dncut import storage
from dncut.backbones import create_backbone, export_backbone, load_backbone
from dncut.config import Config, load_config
from dncut.data.datasets import saliency_dataset
from dncut.data.pipeline import decode_failure, s3_options, source_uris, train_data_config, train_dataset
from dncut.eval.validate import score_backbone, validation_rows
from dncut.losses import NCutLoss
from dncut.export import ExportFormat, export_hf, push_hf
from dncut.model import DenseNCutModel
from dncut import photometric
from dncut.ncut import NonFiniteFeaturesError
from dncut.tracking import ProgressBar, Tracker

log = logging.getLogger("dncut.train")

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"  # the resolved config, in the run folder and in every checkpoint
EXPORT_FILE = "backbone.pth"
PREFETCH_BATCHES = 2  # batches Ray Data prepares (fetch, collate, pin, copy) while a step runs
LOG_FILE = "train.log"  # the workers' dncut log lines, under a local run_dir
PROGRESS_FILE = "progress.json"  # {"step": k, "state_bytes": n} beside state.pt: where the data resumes
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: Config) -> DenseNCutModel:
    """Encoder (pretrained or from ``model.checkpoint``) + projector + predictor, in train mode
    with the encoder BatchNorm policy ``model.freeze_encoder_bn`` applied."""
    m = cfg.model
    encoder = create_backbone(m.backbone, pretrained=m.pretrained and m.checkpoint is None, checkpoint=m.checkpoint,
                              s3=s3_options(cfg))
    return DenseNCutModel(encoder, align_size=cfg.data.crop_size // encoder.stride, proj_dim=m.proj_dim,
                          hidden_dim=m.hidden_dim, projector=m.projector, ncut=cfg.ncut,
                          freeze_encoder_bn=m.freeze_encoder_bn)


def build_loss(cfg: Config) -> NCutLoss:
    c = cfg.loss
    return NCutLoss(alpha=c.alpha, temperature=c.temperature, consistency=c.consistency,
                    regularization=c.regularization, iou_threshold=c.iou_threshold, min_pass=c.min_pass)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, or SGD momentum wrapped in LARS (timm, trust 0.001) as the authors.

    Biases and norm parameters get no weight decay.
    """
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.effective_lr())
    from timm.optim import Lars
    return Lars(groups, lr=t.effective_lr(), momentum=t.momentum, trust_coeff=0.001)


def lr_schedule(peak: float, final: float, warmup: int, total: int) -> np.ndarray:
    """Per-step learning rates ``(total,)``: linear warm-up to ``peak``, cosine to ``final``."""
    warmup = min(warmup, total)
    ramp = np.linspace(peak / max(warmup, 1), peak, warmup) if warmup else np.zeros(0)
    t = np.arange(total - warmup) / max(total - warmup - 1, 1)
    cosine = final + 0.5 * (peak - final) * (1 + np.cos(math.pi * t))
    sched = np.concatenate([ramp, cosine])
    assert len(sched) == total
    return sched


WORKER_ENV = {"MIMALLOC_PURGE_DELAY": "0"}
"""Environment of the Ray Train workers (``RunConfig.worker_runtime_env``; a value the user set
wins, see ``_worker_env``). ``MIMALLOC_PURGE_DELAY=0``
(mimalloc's ``purge_delay`` option, in ms): the mimalloc allocator inside pyarrow (Arrow's default
memory pool; Ray Train uploads checkpoints with pyarrow) returns the pages it frees to the kernel at
once instead of after a delay. Without it the Train worker's private memory rose by ~2 MiB at some
checkpoints and kept it, in a 1 GiB region reserved the way mimalloc reserves its arenas: RssAnon
+4.57 MiB per 1,000 steps (one run; 3.2-4.1 with other allocator settings), +0.86 and +1.55 with it
(two runs) and +1.42 and +1.86 with it and ``release_freed_memory`` (two runs; ``bench/load.py
--parts train --malloc-probe``, keys ``train_malloc_probe``, ``train_after*``, ``train_released*``;
README "Faults and load"). Pyarrow builds whose mimalloc lacks the option ignore it."""


def _worker_env() -> dict[str, str]:
    """``WORKER_ENV`` with the user's values: a variable of the job's own ``runtime_env``
    (``ray.init(runtime_env=...)``), which the Train workers inherit, is left out; one in the
    driver's environment (a Ray Jobs entrypoint's ``runtime_env``, or a shell's) is passed on."""
    import ray

    job = (ray.get_runtime_context().runtime_env.get("env_vars") or {}) if ray.is_initialized() else {}
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items() if k not in job}


@functools.cache
def _glibc():
    """The C library when it is glibc (Linux), else None (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def release_freed_memory() -> bool:
    """Hand the free memory glibc's allocator keeps (free chunks inside its arenas) back to the
    kernel: ``malloc_trim(0)`` (``man 3 malloc_trim``). The loop calls it after every report. In the
    same runs, RssAnon right after a trim grew 0.2-1.0 MiB per 1,000 steps less than just before it
    (five runs, ``bench/load.py --malloc-trim``): glibc keeps that much more freed memory as a run
    goes on. Over 3,000 steps the Train worker's RssAnon rose 2.1 and 1.8 MiB with the call, 4.9 and
    3.1 MiB without it (one run each; 1,000-step runs show no difference), at no visible cost (231.3
    and 236.4 s with it, 241.2 and 287.1 s without). README "Faults and load". Returns False where
    the C library is not glibc (nothing is done)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _unwrap(model: torch.nn.Module) -> DenseNCutModel:
    return model.module if hasattr(model, "module") else model


def _workers() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    """``values`` summed (or ``op``) over the workers; no collective on one worker.

    One worker skips the call because torch.distributed's flight recorder keeps every collective
    with its Python traceback in a ring of ``TORCH_FR_BUFFER_SIZE`` entries: with two calls per step
    it held ~1.9 MB after 600 steps of one worker, growing until the ring was full (heaptrack on the
    Train worker; README "Faults and load")."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _workers() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopState:
    """What one worker carries from step to step (and, in part, through a checkpoint)."""

    step: int = 0
    epoch: int = 0
    counters: dict[str, float] = field(default_factory=lambda: {"skipped_images": 0.0, "nan_steps": 0.0,
                                                                 "fallbacks": 0.0})
    skipped_files: set[str] = field(default_factory=set)
    nan_in_row: int = 0
    last_parts: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker. ``loop_config``: ``{"config": Config dict, "total_steps": int,
    "start_step": int}`` (the step the dataset's first row belongs to, see ``build_trainer``)."""
    import ray.train
    import ray.train.torch

    cfg, total = Config.model_validate(loop_config["config"]), int(loop_config["total_steps"])
    start = int(loop_config.get("start_step", 0))
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = _setup_worker(cfg, rank)
    model, criterion = build_model(cfg), build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    sched = lr_schedule(cfg.train.effective_lr(), cfg.train.min_lr, cfg.train.warmup_steps, total)
    state = resume(model, optimizer, rank)
    model = ray.train.torch.prepare_model(model)
    chief = Chief(cfg, device, model, state) if rank == 0 else None  # every rank-0 duty lives there
    shard = ray.train.get_dataset_shard("train")
    while state.step < total:  # false when a finished run is run again: nothing left to train
        for batch in _batches(shard, cfg.train.batch_size // world, skip=state.step - start, device=device):
            train_one_step(model, criterion, optimizer, batch, float(sched[state.step]), state, cfg, device)
            if _due(state.step, total, cfg):
                report(model, optimizer, state, total, sched, cfg, chief, device)
            if state.step >= total:
                break
        else:
            raise RuntimeError(f"the training rows ran out at step {state.step} of {total} "
                               "(dncut.data.pipeline.epochs_needed sized them for the whole run)")
    if chief is not None:
        chief.export(model)


class Chief:
    """Rank 0's duties: validation, the progress line, the metric history, checkpoint files, the export.

    Args:
        cfg: the run config.
        device: where validation runs.
        model: the (DDP-wrapped) model; validated once here (the starting point of the curve).
        state: the loop state (resumed runs keep their history up to ``state.step``).
    """

    def __init__(self, cfg: Config, device: torch.device, model, state: LoopState) -> None:
        self.cfg, self.device, self.s3 = cfg, device, s3_options(cfg)
        self.rows = validation_rows(cfg)
        self.tracker = Tracker(cfg, run_dir(cfg), state.step, self.s3)
        self.best = max((m["val_iou"] for m in self.tracker.history if math.isfinite(m.get("val_iou", math.nan))),
                        default=-math.inf)  # of the exported encoder (train.export: best_val_iou)
        state.last_val = self.validate(model, state.step)

    def validate(self, model, step: int) -> dict[str, float]:
        """Simple-NCut saliency of the current encoder (``dncut.eval.validate``): ``val_acc``, ``val_iou``,
        ``val_max_fbeta``, ``val_mae`` (NaN when every image failed), ``val_failed`` and ``val_step``.
        With ``train.export: best_val_iou`` a new best is exported at once."""
        scores, _ = score_backbone(_unwrap(model).encoder, self.rows, self.cfg, device=self.device)
        if self.cfg.train.export == "best_val_iou" and scores["iou"] > self.best:
            self.best = scores["iou"]
            self._export(model, f"best val_iou {self.best:.4f} at step {step}")
        return {**{f"val_{k}": v for k, v in scores.items()}, "val_step": step}

    def record(self, metrics: dict[str, Any]) -> None:
        """Progress line + the run's tracking (``metrics.jsonl``, TensorBoard, MLflow / W&B)."""
        _log_progress(metrics)
        self.tracker.log(metrics, metrics["step"])

    def checkpoint(self, model, optimizer, state: LoopState, metrics: dict[str, Any]):
        """A Ray Train checkpoint (state.pt + config.yaml in a temporary folder Ray deletes after upload)."""
        import ray.train

        folder = _save_checkpoint(_unwrap(model), optimizer, state, _totals(metrics), self.cfg)
        return ray.train.Checkpoint.from_directory(folder)

    def export(self, model) -> None:
        """The end of the run: export the final encoder (``train.export: last``), close the tracking
        (writes ``curves.png``)."""
        if self.cfg.train.export == "last":
            self._export(model, "last step")
        self.tracker.close()

    def _export(self, model, why: str) -> None:
        """``backbone.pth`` and, beside it, ``model.safetensors`` + ``config.json`` (timm's layout)."""
        run, encoder = run_dir(self.cfg), _unwrap(model).encoder
        export_backbone(encoder, storage.join(run, EXPORT_FILE), self.s3)
        export_hf(encoder, run, self.s3)
        log.info("exported the finetuned backbone (%s) to %s (%s, model.safetensors)", why, run, EXPORT_FILE)


def _setup_worker(cfg: Config, rank: int) -> torch.device:
    """Logging, seed (``seed + rank``), CPU threads; returns the worker's device."""
    import ray.train.torch

    _worker_logging(cfg, rank)
    torch.manual_seed(cfg.seed + rank)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    return ray.train.torch.get_device()


def _batches(shard, batch_size: int, skip: int, device: torch.device):
    """This worker's batches (tensors on ``device``), after ``skip`` already trained ones: a worker group restarted
    inside one ``fit`` re-reads the dataset from its first row (``start_step``), so it passes over
    the batches of the steps it resumes after (decoded, not trained)."""
    if skip < 0:
        log.warning("the checkpoint (step %d) is older than the data start; continuing without skipping", skip)
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                          pin_memory=device.type == "cuda", prefetch_batches=PREFETCH_BATCHES):
        if skip > 0:
            skip -= 1
            continue
        yield batch


def intact_checkpoints(cfg: Config) -> dict[str, int]:
    """``{checkpoint folder name: step}`` of the run's intact checkpoints: ``progress.json`` readable and
    ``state.pt`` present with the byte count ``progress.json`` recorded (a truncated, half-uploaded or
    deleted one is left out with a warning). Storage failures (an unreachable endpoint) raise."""
    s3 = s3_options(cfg)
    fs, root = storage.filesystem(run_dir(cfg), s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return {}
    sizes: dict[str, dict[str, int]] = {}
    for info in infos:
        parts = info.path[len(root):].strip("/").split("/")
        if info.type == pafs.FileType.File and len(parts) == 2 and parts[0].startswith("checkpoint_"):
            sizes.setdefault(parts[0], {})[parts[1]] = info.size
    intact = {}
    for name, files in sorted(sizes.items()):
        why = None
        if PROGRESS_FILE not in files:
            why = f"no {PROGRESS_FILE}"
        else:
            try:
                progress = json.loads(storage.read_bytes(storage.join(run_dir(cfg), name, PROGRESS_FILE), s3))
                step, expected = int(progress["step"]), progress.get("state_bytes")
            except (ValueError, KeyError, TypeError) as exc:  # a truncated file
                why = f"unreadable {PROGRESS_FILE} ({exc})"
            else:
                if expected is not None and STATE_FILE not in files:  # (older checkpoints: no byte count)
                    why = f"no {STATE_FILE}"
                elif expected is not None and files[STATE_FILE] != expected:
                    why = f"{STATE_FILE} holds {files[STATE_FILE]} of {expected} bytes"
        if why is None:
            intact[name] = step
        else:
            log.warning("ignoring the incomplete checkpoint %s: %s", storage.join(run_dir(cfg), name), why)
    return intact


def resume_step(cfg: Config) -> int:
    """The step a rerun of ``run_dir`` resumes at: that of the checkpoint Ray Train hands the workers, the
    latest one of its run snapshot (or, if that one is broken, the newest intact one it lists; see
    ``reconcile_checkpoints``). 0 without a snapshot: Ray Train then starts from scratch. A checkpoint
    folder the snapshot does not list is not resumed from (``build_trainer`` adopts a newer intact one
    into the snapshot first), so the data must not start after it either."""
    snap = _read_snapshot(cfg)
    if snap is None:
        return 0
    intact = intact_checkpoints(cfg)
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if latest in intact:
        return intact[latest]
    return max((intact[r["checkpoint_dir_name"]] for r in snap.get("checkpoint_results", [])
                if r["checkpoint_dir_name"] in intact), default=0)


def _read_snapshot(cfg: Config) -> dict | None:
    """Ray Train's ``checkpoint_manager_snapshot.json`` of the run (None if there is none)."""
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir(cfg), SNAPSHOT_FILE), s3_options(cfg)))
    except FileNotFoundError:
        return None


def reconcile_checkpoints(cfg: Config) -> None:
    """Before a (re)run: make Ray Train's run snapshot agree with the checkpoint folders, so that the run
    resumes from the newest intact checkpoint, and say which one that is.

    * A listed checkpoint that is no longer intact (truncated ``state.pt``, deleted folder) is dropped:
      Ray Train would fail on the missing folder or hand the workers an unreadable ``state.pt``.
    * An intact checkpoint newer than every listed one is adopted: it was uploaded, but the driver died
      before the controller registered it (that happens a poll interval after the upload).

    The broken folders stay where they are."""
    import ray

    intact = intact_checkpoints(cfg)
    snap = _read_snapshot(cfg)
    if snap is None and not intact:
        return
    snap = snap or {"ray_version": ray.__version__, "checkpoint_results": [], "checkpoint_report_indices": [],
                    "latest_checkpoint_result": None, "pending_training_results": [], "pending_validation_specs": [],
                    "current_report_index": 0, "validated_checkpoint_dir_names": [],
                    "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    results = snap["checkpoint_results"]
    good = [i for i, r in enumerate(results) if r["checkpoint_dir_name"] in intact]
    latest = snap.get("latest_checkpoint_result")
    dropped = [r["checkpoint_dir_name"] for r in results if r["checkpoint_dir_name"] not in intact]
    if latest is not None and latest["checkpoint_dir_name"] not in intact and latest["checkpoint_dir_name"] not in dropped:
        dropped.append(latest["checkpoint_dir_name"])
    newest = max(intact[r["checkpoint_dir_name"]] for r in (results[i] for i in good)) if good else -1
    orphans = {n: k for n, k in intact.items() if k > newest and n not in {r["checkpoint_dir_name"] for r in results}}
    if not dropped and not orphans:
        return
    snap["checkpoint_results"] = [results[i] for i in good]
    snap["checkpoint_report_indices"] = [snap["checkpoint_report_indices"][i] for i in good]
    pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"])
               if r["checkpoint_dir_name"] in intact]
    snap["pending_training_results"], snap["pending_validation_specs"] = [p[0] for p in pending], [p[1] for p in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        snap[key] = [n for n in snap[key] if n in intact]
    adopted = max(orphans, key=orphans.get) if orphans else None
    if adopted is not None:
        from dncut.tracking import read_history

        metrics = next((m for m in reversed(read_history(run_dir(cfg), s3_options(cfg)))
                        if m.get("step") == orphans[adopted]), {"step": orphans[adopted]})
        snap["checkpoint_results"].append({"checkpoint_dir_name": adopted, "metrics": metrics})
        snap["checkpoint_report_indices"].append(snap["current_report_index"])
        snap["current_report_index"] += 1
    kept = snap["checkpoint_results"]
    snap["latest_checkpoint_result"] = max(kept, key=lambda r: intact[r["checkpoint_dir_name"]]) if kept else None
    storage.write_bytes(storage.join(run_dir(cfg), SNAPSHOT_FILE), json.dumps(snap).encode(), s3_options(cfg))
    new = snap["latest_checkpoint_result"]
    log.warning("run %s:%s%s resuming from %s", run_dir(cfg),
                f" dropped the incomplete checkpoint(s) {', '.join(dropped)};" if dropped else "",
                f" adopted {adopted}, uploaded but not registered when the last run stopped;" if adopted else "",
                f"{new['checkpoint_dir_name']} (step {intact[new['checkpoint_dir_name']]})" if new else
                "the start (no intact checkpoint left)")


def checkpoint_state() -> tuple[dict[str, Any], str] | None:
    """``(state.pt dict on the CPU, checkpoint path)`` of the checkpoint Ray Train hands this worker;
    None without one."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True), ckpt.path


def resume(model: DenseNCutModel, optimizer: torch.optim.Optimizer, rank: int) -> LoopState:
    """Load ``ray.train.get_checkpoint()`` into ``model`` and ``optimizer``; a fresh state without one."""
    state = LoopState()
    found = checkpoint_state()
    if found is None:
        return state
    saved, path = found
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    state.skipped_files = set(saved.get("skipped_files", []))
    totals = saved.get("counters", {})  # totals over all workers (see _totals)
    state.counters["nan_steps"] = float(totals.get("nan_steps", 0.0))  # the same on every worker
    if rank == 0:  # per-worker counters are summed at each report: the old totals count once
        state.counters.update(totals)
        log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    return state


def model_inputs(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A batch of two-view rows (on the device) -> the model's arguments: both views photometrically
    augmented with their own parameters (``dncut.photometric.apply``: ``(b, 3, S, S)`` float in [0, 1];
    the backbone normalises), then the boxes and flips."""
    b = batch["view1"].shape[0]
    views = photometric.apply(torch.cat([batch["view1"], batch["view2"]]),  # (2b, 3, S, S): one call, half the launches
                              torch.cat([batch["aug1"], batch["aug2"]]))  # (2b, N_PARAMS)
    return [views[:b], views[b:], *(batch[k] for k in ("box1", "box2", "flip1", "flip2"))]


def train_one_step(model, criterion: NCutLoss, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   lr: float, state: LoopState, cfg: Config, device: torch.device) -> None:
    """One optimizer step on a batch of two-view rows; bad rows and non-finite steps are counted."""
    ok = batch["ok"].bool()  # (b,)
    _count_skipped(batch, ok, state)
    state.epoch = max(state.epoch, int(batch["epoch"].max()))
    inputs = model_inputs({k: v[ok] for k, v in batch.items()})
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, parts = None, {}
    # DDP's forward broadcasts buffers (BatchNorm): every worker runs it, or none does
    if _all_reduce([0.0 if int(ok.sum()) >= 2 else 1.0], device)[0] == 0:
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda"):
                out = model(*inputs)
            loss, parts = criterion.symmetric(out.ab, out.ba, shape=out.shape)
            state.counters["fallbacks"] += out.n_fallback
        except NonFiniteFeaturesError as exc:
            log.warning("step %d: %s", state.step, exc)
    finite = loss is not None and bool(torch.isfinite(loss))
    optimizer.zero_grad(set_to_none=True)
    if _all_reduce([0.0 if finite else 1.0], device)[0] == 0:
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        state.nan_in_row, state.last_parts = 0, parts
    else:
        state.counters["nan_steps"] += 1
        state.nan_in_row += 1
        if state.nan_in_row > cfg.train.max_nan_steps:
            raise RuntimeError(f"{state.nan_in_row} non-finite losses in a row at step {state.step} "
                               f"(train.max_nan_steps={cfg.train.max_nan_steps}): lower train.lr "
                               "or check the data; the last checkpoint is intact")
    state.step += 1


def _count_skipped(batch: dict[str, torch.Tensor], ok: torch.Tensor, state: LoopState) -> None:
    """Count rows that failed to decode; log each file the first time."""
    if bool(ok.all()):
        return
    state.counters["skipped_images"] += float((~ok).sum())
    for column in batch["failure"][~ok].cpu().numpy():
        uri, err = decode_failure(column)
        if uri not in state.skipped_files:
            state.skipped_files.add(str(uri))
            log.warning("skipped %s: %s", uri, err)


def _due(step: int, total: int, cfg: Config) -> bool:
    """A report at this step: every ``log_every``, ``checkpoint_every`` and ``val_every`` step, and the last."""
    t = cfg.train
    return step % t.log_every == 0 or step % t.checkpoint_every == 0 or _val_due(step, total, cfg)


def _val_due(step: int, total: int, cfg: Config) -> bool:
    return step >= total or bool(cfg.train.val_every and step % cfg.train.val_every == 0)


def report(model, optimizer, state: LoopState, total: int, sched: np.ndarray, cfg: Config, chief: Chief | None,
           device: torch.device) -> None:
    """Validation when due (rank 0), then ``ray.train.report`` (a barrier of all workers) of the
    metrics, with a checkpoint when due; then ``release_freed_memory``."""
    import ray.train

    if chief is not None and _val_due(state.step, total, cfg):
        state.last_val = chief.validate(model, state.step)
    metrics = {**_metrics(state, total, sched, device), **state.last_val}
    state.skipped_files = _union(state.skipped_files)
    metrics["skipped_files"] = len(state.skipped_files)
    checkpoint = None
    if chief is not None:
        chief.record(metrics)
        if state.step % cfg.train.checkpoint_every == 0 or state.step >= total:
            checkpoint = chief.checkpoint(model, optimizer, state, metrics)
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
    release_freed_memory()


def _worker_logging(cfg: Config, rank: int) -> None:
    """dncut's log lines on the worker's stderr (Ray's worker log files; forwarded to the driver's
    console only with ``--verbose``) and, for a local run folder, appended to ``run_dir/train.log``."""
    logger = logging.getLogger("dncut")
    if logger.handlers:
        return
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if not storage.is_s3(cfg.output_dir):
        os.makedirs(run_dir(cfg), exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir(cfg), LOG_FILE)))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _metrics(state: LoopState, total: int, sched: np.ndarray, device) -> dict[str, Any]:
    counters, parts = state.counters, state.last_parts
    summed = _all_reduce([counters["skipped_images"], counters["fallbacks"]], device)
    # a skipped step is decided by an all-reduce: every worker counts it, so nan_steps is not summed
    out = {"step": state.step, "total_steps": total, "epoch": state.epoch, "lr": float(sched[state.step - 1]),
           "skipped_rows": int(summed[0]), "nan_steps": int(counters["nan_steps"]), "ncut_fallbacks": int(summed[1]),
           "elapsed_s": round(time.perf_counter() - state.t0, 2)}
    for key in ("loss", "l_consistency", "l_reg", "pass_fraction", "iou_mean",
                "sim_horizontal", "sim_vertical", "sim_uniform", "collapsed"):
        if key in parts:
            out[key] = parts[key]
    return out


def _totals(metrics: dict[str, Any]) -> dict[str, float]:
    """The counters over all workers, as stored in a checkpoint."""
    return {"skipped_images": float(metrics["skipped_rows"]), "nan_steps": float(metrics["nan_steps"]),
            "fallbacks": float(metrics["ncut_fallbacks"])}


def _log_progress(m: dict[str, Any]) -> None:
    pct = 100.0 * m["step"] / m["total_steps"]
    log.info("step %d/%d (%.0f%%) loss %s l_reg %s pass %s val_iou %s lr %.2e skipped %d nan %d",
             m["step"], m["total_steps"], pct, _fmt(m.get("loss")), _fmt(m.get("l_reg")),
             _fmt(m.get("pass_fraction")), _fmt(m.get("val_iou")), m["lr"], m["skipped_files"], m["nan_steps"])
    if m.get("collapsed"):
        log.warning("mask collapse: template similarity h=%.2f v=%.2f u=%.2f (raise loss.alpha)",
                    m["sim_horizontal"], m["sim_vertical"], m["sim_uniform"])


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _union(items: set[str]) -> set[str]:
    """The union of every worker's set (all_gather_object; identity on one worker)."""
    if _workers() == 1:
        return items
    gathered: list = [None] * _workers()
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*map(set, gathered))


def _save_checkpoint(model: DenseNCutModel, optimizer, state: LoopState, counters: dict[str, float],
                     cfg: Config) -> str:
    """A temporary folder with state.pt + config.yaml (rank 0); Ray Train deletes it after the upload."""
    d = tempfile.mkdtemp(prefix="dncut-ckpt-")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "epoch": state.epoch, "counters": dict(counters), "skipped_files": sorted(state.skipped_files)},
               os.path.join(d, STATE_FILE))
    Path(d, CONFIG_FILE).write_text(cfg.to_yaml())
    Path(d, PROGRESS_FILE).write_text(json.dumps({"step": state.step,
                                                  "state_bytes": os.path.getsize(os.path.join(d, STATE_FILE))}))
    return d


# ----------------------------------------------------------------------------- driver


def run_dir(cfg: Config) -> str:
    """Where a run's checkpoints, export and config live: ``output_dir/run_name``."""
    return storage.join(cfg.output_dir, cfg.run_name)


def with_absolute_output(cfg: Config) -> Config:
    """Workers run in their own directories: make the local paths of a config absolute
    (``output_dir``, ``model.checkpoint``, ``data.train``, ``data.val``; s3:// and null stay)."""
    paths = (("output_dir", cfg.output_dir), ("model.checkpoint", cfg.model.checkpoint),
             ("data.train", cfg.data.train), ("data.val", cfg.data.val))
    local = {k: v for k, v in paths if v and not storage.is_s3(v)}
    return cfg.with_overrides({k: os.path.abspath(os.path.expanduser(v)) for k, v in local.items()}) if local else cfg


REPORT_POLL_S = 0.25
"""Seconds between Ray Train's controller polls of the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``;
Ray's default is 2.0). ``ray.train.report`` returns only once the controller has taken the previous
report (a queue of one per worker), so with Ray's default a run that reports every ``train.log_every``
steps can make at most one report per 2 s: 1,000 fast steps logged every 10 took 239.2 s instead of
100.1 s (``bench/results/load.json``, ``train_ray_default_poll`` vs ``train``). A user's own
setting of the variable wins."""


def run_config(cfg: Config, callbacks: list | None = None):
    """``RunConfig`` with storage (local or s3://), checkpoint retention, failure policy and the
    workers' ``WORKER_ENV``.

    Also sets ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` to ``REPORT_POLL_S`` in this process unless it is
    set: Ray Train passes it from the process that calls ``fit()`` to its controller."""
    import ray.train

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    kwargs: dict[str, Any] = {}
    if storage.is_s3(cfg.output_dir):
        fs, path = storage.filesystem(cfg.output_dir, s3_options(cfg))
        kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        kwargs = {"storage_path": with_absolute_output(cfg).output_dir}
    return ray.train.RunConfig(
        name=cfg.run_name,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        checkpoint_config=checkpoint_config(cfg),
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # dncut logs the progress
        worker_runtime_env={"env_vars": _worker_env()},
        **kwargs,
    )


def checkpoint_config(cfg: Config):
    """``CheckpointConfig``: the ``train.keep_checkpoints`` newest, or those with the highest
    ``val_iou`` (``train.keep_checkpoints_by``; Ray Train keeps the newest as well, to resume from)."""
    import ray.train

    t = cfg.train
    if t.keep_checkpoints_by == "val_iou":
        return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_iou",
                                          checkpoint_score_order="max")
    return ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)


def build_trainer(cfg: Config, callbacks: list | None = None):
    """Validate the data source (before any worker starts) and assemble the TorchTrainer."""
    import ray.train
    from ray.train.torch import TorchTrainer

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop logs progress
    cfg = with_absolute_output(cfg)
    uris = source_uris(cfg)
    if cfg.data.val is not None:  # a validation folder without masks fails here, before any worker
        saliency_dataset("folder", cfg.data.val, s3_options(cfg))
    total = cfg.train.total_steps(len(uris))
    reconcile_checkpoints(cfg)
    start = min(resume_step(cfg), total)  # a rerun continues the seeded row stream where it stopped
    ds = train_dataset(cfg, uris, total, start)
    storage.write_bytes(storage.join(run_dir(cfg), CONFIG_FILE), cfg.to_yaml().encode(), s3_options(cfg))
    sc = cfg.scaling
    scaling = ray.train.ScalingConfig(
        num_workers=sc.num_workers, use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "total_steps": total, "start_step": start},
        scaling_config=scaling,
        run_config=run_config(cfg, callbacks),
        datasets={"train": ds},
        dataset_config=train_data_config(),
    )


def export_run(run: str, fmt: ExportFormat = "hf", out: str | None = None, *,
               push_to_hub: str | None = None) -> list[str]:
    """Export the backbone of a training run folder (``output_dir/run_name``: ``backbone.pth`` + ``config.yaml``).

    Args:
        run: The run folder, local or ``s3://`` (S3 endpoint/region from the run's ``config.yaml``).
        fmt: ``safetensors``: ``model.safetensors`` + ``config.json``; ``hf``: the same plus ``README.md``
            (a model card), i.e. a complete Hub repository folder.
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
    cfg = load_config(storage.join(run, CONFIG_FILE), reader=storage.read_bytes)
    s3 = s3_options(cfg)
    backbone = load_backbone(storage.join(run, EXPORT_FILE), s3)
    if backbone.name != cfg.model.backbone:
        raise ValueError(f"{run}: {EXPORT_FILE} holds {backbone.name!r}, {CONFIG_FILE} says "
                         f"{cfg.model.backbone!r}")
    uris = export_hf(backbone, out or storage.join(run, fmt), s3, readme=fmt == "hf")
    if push_to_hub:
        uris.append(push_hf(backbone, push_to_hub))
    return uris


def fit(cfg: Config, *, progress: bool = False):
    """Train (or resume ``output_dir/run_name``) and return the Ray Train ``Result``.

    ``progress``: draw a progress bar on this (the driver's) console (``dncut.tracking.ProgressBar``).
    """
    trainer = build_trainer(cfg)
    loop = trainer.train_loop_config
    with ProgressBar(run_dir(with_absolute_output(cfg)), loop["total_steps"], start=loop["start_step"],
                     s3=s3_options(cfg), disable=not progress, desc=cfg.run_name):
        return trainer.fit()
