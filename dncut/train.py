"""Self-supervised dense learning on Ray Train (paper Sec. 3.3-3.4, 4 "Training details").

    fit(cfg)                                   driver: validate source, build TorchTrainer
      -> train_loop_per_worker(loop_config)   every worker, CPU or GPU, 1 or N
           build model (encoder + g + q), optimiser, per-step lr schedule
           resume from ray.train.get_checkpoint() (step, optimiser, epoch)
           for each batch of the worker's streaming_split shard:
               drop undecodable rows (counted) -> model -> NCutLoss -> step
               every log_every: ray.train.report(metrics)
               every checkpoint_every: ray.train.report(metrics, checkpoint)
      -> export the finetuned backbone (dncut.backbones.export_backbone)

Learning-rate rule: the peak lr is ``train.lr * scale(global_batch / base_batch_size)``
(linear by default, Goyal et al.), warmed up linearly over ``warmup_steps`` then cosine to
``min_lr``. The global batch is split evenly across workers; DDP averages gradients.

A non-finite loss (or NaN features) skips the step on every worker (the decision is
all-reduced so DDP stays in step) and is counted; ``max_nan_steps`` in a row stop the run
with a clear error. Mask collapse (similarity to a template above 0.9) is logged as a warning.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dncut import storage
from dncut.backbones import create_backbone, export_backbone
from dncut.config import Config
from dncut.data.datasets import saliency_dataset
from dncut.data.pipeline import s3_options, source_uris, train_dataset
from dncut.eval.validate import score_backbone, validation_set
from dncut.losses import NCutLoss
from dncut.model import DenseNCutModel, NCutOptions

log = logging.getLogger("dncut.train")

STATE_FILE = "state.pt"
EXPORT_FILE = "backbone.pth"


# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: Config) -> DenseNCutModel:
    """Encoder (pretrained or from ``model.checkpoint``) + projector + predictor."""
    encoder = create_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint)
    if cfg.data.crop_size % encoder.stride:
        raise ValueError(f"data.crop_size={cfg.data.crop_size} must be a multiple of the "
                         f"{cfg.model.backbone} stride {encoder.stride}")
    return DenseNCutModel(encoder, align_size=cfg.data.crop_size // encoder.stride, proj_dim=cfg.model.proj_dim,
                          hidden_dim=cfg.model.hidden_dim, projector=cfg.model.projector,
                          ncut=NCutOptions(**cfg.ncut.model_dump()))


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


def _unwrap(model: torch.nn.Module) -> DenseNCutModel:
    return model.module if hasattr(model, "module") else model


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker. ``loop_config``: ``{"config": Config dict, "total_steps": int}``."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    total = int(loop_config["total_steps"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _worker_logging()
    torch.manual_seed(cfg.seed + rank)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()

    model = build_model(cfg)
    criterion = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    sched = lr_schedule(cfg.train.effective_lr(), cfg.train.min_lr, cfg.train.warmup_steps, total)
    step, epoch = 0, 0
    counters = {"skipped_images": 0.0, "nan_steps": 0.0, "fallbacks": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = int(state["step"]), int(state["epoch"])
        saved = state.get("counters", {})  # totals over all workers (see _totals)
        counters["nan_steps"] = float(saved.get("nan_steps", 0.0))  # the same on every worker
        if rank == 0:  # per-worker counters are summed at each report: the old totals count once
            counters.update(saved)
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d)", ckpt.path, step, epoch)
    model = ray.train.torch.prepare_model(model)
    val_samples = validation_set(cfg) if rank == 0 else []
    last_val = _validate(_unwrap(model).encoder, val_samples, cfg, device) if rank == 0 else {}
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.train.batch_size // world
    amp = cfg.train.amp and device.type == "cuda"
    nan_in_row, last_parts, t0 = 0, {}, time.perf_counter()
    skipped_files: set[str] = set(state.get("skipped_files", [])) if ckpt is not None else set()

    while step < total:
        for batch in shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True):
            ok = batch["ok"].astype(bool)
            if not ok.all():
                counters["skipped_images"] += float((~ok).sum())
                for uri, err in zip(batch["uri"][~ok], batch["error"][~ok]):
                    if uri not in skipped_files:
                        skipped_files.add(str(uri))
                        log.warning("skipped %s: %s", uri, err)
            inputs = [torch.from_numpy(np.ascontiguousarray(batch[k][ok])).to(device)
                      for k in ("view1", "view2", "box1", "box2", "flip1", "flip2")]
            for group in optimizer.param_groups:
                group["lr"] = float(sched[step])
            loss, parts = None, {}
            # DDP's forward broadcasts buffers (BatchNorm): every worker runs it, or none does
            if _all_reduce([0.0 if ok.sum() >= 2 else 1.0], device)[0] == 0:
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        out = model(*inputs)
                    loss, parts = criterion.symmetric(out.ab, out.ba, shape=out.shape)
                    counters["fallbacks"] += out.n_fallback
                except ValueError as exc:  # NaN/Inf features reach the NCut layer
                    if "NaN/Inf" not in str(exc):
                        raise
                    log.warning("step %d: %s", step, exc)
            finite = loss is not None and bool(torch.isfinite(loss))
            all_finite = _all_reduce([0.0 if finite else 1.0], device)[0] == 0
            optimizer.zero_grad(set_to_none=True)
            if all_finite:
                loss.backward()
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                nan_in_row = 0
                last_parts = parts
            else:
                counters["nan_steps"] += 1
                nan_in_row += 1
                if nan_in_row > cfg.train.max_nan_steps:
                    raise RuntimeError(f"{nan_in_row} non-finite losses in a row at step {step} "
                                       f"(train.max_nan_steps={cfg.train.max_nan_steps}): lower train.lr "
                                       "or check the data; the last checkpoint is intact")
            step += 1
            done = step >= total
            if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or done:
                if rank == 0 and (done or (cfg.train.val_every and step % cfg.train.val_every == 0)):
                    last_val = _validate(_unwrap(model).encoder, val_samples, cfg, device)
                metrics = {**_metrics(step, total, epoch, sched, last_parts, counters, device, t0), **last_val}
                skipped_files = _union(skipped_files)
                metrics["skipped_files"] = len(skipped_files)
                if rank == 0:
                    _log_progress(metrics)
                checkpoint = None
                if step % cfg.train.checkpoint_every == 0 or done:
                    checkpoint = _save_checkpoint(_unwrap(model), optimizer, step, epoch, _totals(metrics),
                                                  sorted(skipped_files), cfg, rank)
                ray.train.report(metrics, checkpoint=checkpoint)
            if done:
                break
        epoch += 1
    if rank == 0:
        uri = storage.join(run_dir(cfg), EXPORT_FILE)
        export_backbone(_unwrap(model).encoder, uri)
        log.info("exported the finetuned backbone to %s", uri)


def _validate(encoder, samples, cfg: Config, device) -> dict[str, float]:
    """Simple-NCut saliency of the current encoder: ``val_iou``, ``val_max_fbeta``, ..."""
    if not samples:
        return {}
    try:
        scores, _ = score_backbone(encoder, samples, image_size=cfg.eval.image_size or 320, device=device)
    except ValueError as exc:  # NaN/Inf weights: report NaN scores, the NaN-step rule decides the run's fate
        if "NaN/Inf" not in str(exc):
            raise
        log.warning("validation skipped: %s", exc)
        return {f"val_{k}": float("nan") for k in ("acc", "iou", "max_fbeta", "mae")}
    return {f"val_{k}": v for k, v in scores.items()}


def _worker_logging() -> None:
    """dncut's progress lines on the worker's stdout (Ray forwards them to the driver)."""
    logger = logging.getLogger("dncut")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _metrics(step, total, epoch, sched, parts, counters, device, t0) -> dict[str, Any]:
    summed = _all_reduce([counters["skipped_images"], counters["fallbacks"]], device)
    # a skipped step is decided by an all-reduce: every worker counts it, so nan_steps is not summed
    out = {"step": step, "total_steps": total, "epoch": epoch, "lr": float(sched[step - 1]),
           "skipped_rows": int(summed[0]), "nan_steps": int(counters["nan_steps"]), "ncut_fallbacks": int(summed[1]),
           "elapsed_s": round(time.perf_counter() - t0, 2)}
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
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*map(set, gathered))


def _save_checkpoint(model, optimizer, step, epoch, counters, skipped_files, cfg: Config, rank: int):
    """A Ray Train checkpoint from rank 0 (None elsewhere): state.pt + config.yaml."""
    import ray.train

    if rank != 0:
        return None
    d = tempfile.mkdtemp(prefix="dncut-ckpt-")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "epoch": epoch, "counters": dict(counters), "skipped_files": skipped_files},
               os.path.join(d, STATE_FILE))
    Path(d, "config.yaml").write_text(cfg.to_yaml())
    return ray.train.Checkpoint.from_directory(d)


# ----------------------------------------------------------------------------- driver


def run_dir(cfg: Config) -> str:
    """Where a run's checkpoints, export and config live: ``output_dir/run_name``."""
    return storage.join(cfg.output_dir, cfg.run_name)


def with_absolute_output(cfg: Config) -> Config:
    """Workers run in their own directories: make a local ``output_dir`` absolute."""
    if storage.is_s3(cfg.output_dir):
        return cfg
    return cfg.with_overrides({"output_dir": os.path.abspath(os.path.expanduser(cfg.output_dir))})


def run_config(cfg: Config, callbacks: list | None = None):
    """``RunConfig`` with storage (local or s3://), checkpoint retention and failure policy."""
    import ray.train

    kwargs: dict[str, Any] = {}
    if storage.is_s3(cfg.output_dir):
        fs, path = storage.filesystem(cfg.output_dir, s3_options(cfg))
        kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        kwargs = {"storage_path": with_absolute_output(cfg).output_dir}
    return ray.train.RunConfig(
        name=cfg.run_name,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # dncut logs the progress
        **kwargs,
    )


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
    encoder_norm = create_backbone(cfg.model.backbone, pretrained=False)
    ds = train_dataset(cfg, uris, mean=encoder_norm.mean, std=encoder_norm.std)
    storage.write_bytes(storage.join(run_dir(cfg), "config.yaml"), cfg.to_yaml().encode(), s3_options(cfg))
    sc = cfg.scaling
    scaling = ray.train.ScalingConfig(
        num_workers=sc.num_workers, use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "total_steps": total},
        scaling_config=scaling,
        run_config=run_config(cfg, callbacks),
        datasets={"train": ds},
    )


def fit(cfg: Config):
    """Train (or resume ``output_dir/run_name``) and return the Ray Train ``Result``."""
    return build_trainer(cfg).fit()
