"""FOUND's head on Ray Train (``dncut found-train``; REFERENCE §7, ``dncut.eval.found``).

    fit_found(cfg)                            driver: validate the source, build the TorchTrainer
      -> found_loop_per_worker(loop_config)   every worker
           frozen backbone (model.backbone / model.checkpoint, eval mode, no gradients)
           FoundHead (1x1 conv), AdamW(found.lr), StepLR(found.lr_step, found.lr_gamma) per step
           resume(): from ray.train.get_checkpoint() (head, optimiser, scheduler, step)
           for each batch of found.batch_size views (dncut.data.pipeline.FoundViewMaker):
               train_found_step(): drop undecodable rows (counted) -> blur on the device ->
               features (+ CLS attention) -> background pseudo-mask -> logits upsampled to the
               view -> bilateral-refined targets -> found_loss -> step
               every train.log_every: report() (loss, lr, fg_fraction of the head's masks and of the
               pseudo-masks; a collapse to near-constant masks is a warning); every
               train.checkpoint_every: with a checkpoint
           rank 0: metrics.jsonl / TensorBoard (dncut.tracking), and at the end
               <run>/found_head.safetensors (dncut.eval.found.save_head: the head plus the
               backbone and checkpoint it was trained on)

The same machinery as ``dncut.train``: the seeded row stream (``epoch_rows``), Ray Train
checkpoints under ``output_dir/run_name`` (a rerun of the same run resumes), the worker group
restarts from the last checkpoint (``scaling.max_failures``), the progress bar on the driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dncut import photometric, storage
from dncut.backbones import create_backbone
from dncut.config import Config, ConfigError
from dncut.data.pipeline import decode_failure, found_dataset, s3_options, source_uris, train_data_config
from dncut.eval.found import (FoundHead, HeadInfo, found_loss, pseudo_masks, refine_targets, save_head,
                              upsample_logits)
from dncut.tracking import ProgressBar, Tracker
from dncut.train import (CONFIG_FILE, PROGRESS_FILE, STATE_FILE, _all_reduce, _batches, _setup_worker,
                         checkpoint_state, reconcile_checkpoints, resume_step, run_config, run_dir,
                         with_absolute_output)

log = logging.getLogger("dncut.found")

HEAD_FILE = "found_head.safetensors"
COLLAPSE = (0.02, 0.98)
"""A head that marks less / more than this fraction of a batch's pixels as foreground has collapsed
to a near-constant mask (logged as a warning; ``fg_fraction`` in metrics.jsonl)."""


def frozen_backbone(cfg: Config, device: torch.device):
    """The backbone whose features the head learns on: eval mode, no gradients."""
    m = cfg.model
    backbone = create_backbone(m.backbone, pretrained=m.pretrained and m.checkpoint is None, checkpoint=m.checkpoint,
                               s3=s3_options(cfg))
    return backbone.eval().requires_grad_(False).to(device)


def head_info(cfg: Config, steps: int) -> HeadInfo:
    """What the head file records: the backbone and the checkpoint it was trained on."""
    from dncut.backbone_specs import spec

    return HeadInfo(cfg.model.backbone, cfg.model.checkpoint or "", spec(cfg.model.backbone).channels, steps)


def found_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker; ``loop_config`` as ``dncut.train.train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    cfg, start = Config.model_validate(loop_config["config"]), int(loop_config.get("start_step", 0))
    f, ctx = cfg.found, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _setup_worker(cfg, rank)
    backbone = frozen_backbone(cfg, device)
    head = FoundHead(backbone.channels).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=f.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=f.lr_step, gamma=f.lr_gamma)
    state = resume(head, optimizer, scheduler)
    head = ray.train.torch.prepare_model(head)
    tracker = Tracker(cfg, run_dir(cfg), state["step"], s3_options(cfg)) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    for batch in _batches(shard, f.batch_size // world, skip=state["step"] - start, device=device):
        parts = train_found_step(backbone, head, optimizer, scheduler, batch, state, cfg)
        if state["step"] % cfg.train.log_every == 0 or state["step"] % cfg.train.checkpoint_every == 0 \
                or state["step"] >= f.steps:
            report(head, optimizer, scheduler, state, parts, cfg, tracker)
        if state["step"] >= f.steps:
            break
    if tracker is not None:
        _unwrap(head).cpu()
        storage.write_bytes(storage.join(run_dir(cfg), HEAD_FILE), save_head(_unwrap(head), head_info(cfg, state["step"])),
                            s3_options(cfg))
        tracker.close()
        log.info("FOUND head written to %s", storage.join(run_dir(cfg), HEAD_FILE))


def _unwrap(head: torch.nn.Module) -> FoundHead:
    return head.module if hasattr(head, "module") else head


def train_found_step(backbone, head, optimizer, scheduler, batch: dict[str, torch.Tensor], state: dict,
                     cfg: Config) -> dict[str, float]:
    """One FOUND step on a batch of rows (``view (b, 3, S, S)`` uint8, ``sigma (b,)``, ``ok``).

    A batch in which some worker has no decodable row is a step without an update on every worker
    (DDP needs all or none; the step still counts, so the data and the schedule stay aligned): its
    metrics are NaN and it is counted in ``empty_steps``."""
    ok = batch["ok"].bool()
    for row in batch["failure"][~ok]:
        uri, reason = decode_failure(row.cpu())
        state["skipped"] += 1
        log.warning("skipped %s: %s", uri, reason)
    if _all_reduce([0.0 if bool(ok.any()) else 1.0], ok.device)[0] > 0:
        scheduler.step()
        state["step"] += 1
        state["empty_steps"] += 1
        log.warning("FOUND step %d: no decodable row on some worker; no update", state["step"])
        nan = float("nan")
        return {"loss": nan, "lr": scheduler.get_last_lr()[0], "fg_fraction": nan, "bkg_fg_fraction": nan}
    views = batch["view"][ok].float().div_(255.0)  # (b, 3, S, S) in [0, 1]
    sigma = batch["sigma"][ok].float()  # (b,)
    views = torch.where((sigma > 0)[:, None, None, None], photometric.gaussian_blur(views, sigma.clamp(min=0.1)), views)
    size = tuple(views.shape[-2:])
    with torch.no_grad():
        features, attention = backbone.features_and_attention(views)  # (b, C, h, w), (b, heads, h*w) | None
        bkg = pseudo_masks(features, attention)  # (b, h, w) foreground pseudo-mask
    logits = upsample_logits(head(features), size)  # (b, S, S)
    targets = view_targets(views, logits.detach(), bkg, with_bkg=state["step"] < cfg.found.bkg_steps)
    loss, parts = found_loss(logits, targets, state["step"], cfg.found.bkg_steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    state["step"] += 1
    return {**parts, "loss": float(loss), "lr": scheduler.get_last_lr()[0],
            "fg_fraction": float(targets["own"].mean()), "bkg_fg_fraction": float(bkg.float().mean())}


def view_targets(views: torch.Tensor, logits: torch.Tensor, bkg: torch.Tensor, with_bkg: bool) -> dict[str, torch.Tensor]:
    """FOUND's targets at the view's resolution ``(b, S, S)`` float 0 / 1: the head's own mask
    (``own``, sigmoid > 0.5), its bilateral refinement (``own_refined``) and, early on, the
    refined background pseudo-mask (``bkg_refined``; refinements kept only when IoU > 0.5)."""
    images = (views * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (b, S, S, 3) uint8
    own = (logits > 0).cpu().numpy()  # (b, S, S)
    out = {"own": own, "own_refined": refine_targets(images, own)}
    if with_bkg:
        up = F.interpolate(bkg.float().unsqueeze(1), size=views.shape[-2:], mode="bilinear", align_corners=False)
        out["bkg_refined"] = refine_targets(images, (up[:, 0] > 0.5).cpu().numpy())
    return {k: torch.from_numpy(np.asarray(v, np.float32)).to(logits.device) for k, v in out.items()}


def resume(head: FoundHead, optimizer, scheduler) -> dict:
    """Load ``ray.train.get_checkpoint()`` (head, optimiser, scheduler, step); a fresh state without one."""
    state = {"step": 0, "skipped": 0, "empty_steps": 0, "t0": time.perf_counter()}
    found = checkpoint_state()
    if found is None:
        return state
    saved, path = found
    head.load_state_dict(saved["head"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.update(step=int(saved["step"]), skipped=int(saved.get("skipped", 0)),
                 empty_steps=int(saved.get("empty_steps", 0)))
    log.info("resumed FOUND head training from %s at step %d", path, state["step"])
    return state


def report(head, optimizer, scheduler, state: dict, parts: dict[str, float], cfg: Config,
           tracker: Tracker | None) -> None:
    """``ray.train.report`` of the step's metrics (all workers), with a checkpoint from rank 0 when due."""
    import ray.train

    metrics = {"step": state["step"], "total_steps": cfg.found.steps, "skipped_rows": state["skipped"],
               "empty_steps": state["empty_steps"],
               "elapsed_s": round(time.perf_counter() - state["t0"], 2), **parts}
    checkpoint = None
    if tracker is not None:
        tracker.log(metrics, state["step"])
        log.info("FOUND step %d/%d loss %.4f lr %.2e foreground %.2f (pseudo-mask %.2f) skipped %d", state["step"],
                 cfg.found.steps, metrics["loss"], metrics["lr"], metrics["fg_fraction"], metrics["bkg_fg_fraction"],
                 state["skipped"])
        if math.isfinite(metrics["fg_fraction"]) and not COLLAPSE[0] < metrics["fg_fraction"] < COLLAPSE[1]:
            log.warning("FOUND head collapse: it marks %.0f%% of the pixels as foreground (the background "
                        "pseudo-mask: %.0f%%); its masks will be near-constant", 100 * metrics["fg_fraction"],
                        100 * metrics["bkg_fg_fraction"])
        if state["step"] % cfg.train.checkpoint_every == 0 or state["step"] >= cfg.found.steps:
            checkpoint = ray.train.Checkpoint.from_directory(_save(head, optimizer, scheduler, state, cfg))
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)


def _save(head, optimizer, scheduler, state: dict, cfg: Config) -> str:
    d = tempfile.mkdtemp(prefix="dncut-found-ckpt-")
    torch.save({"head": _unwrap(head).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": state["step"], "skipped": state["skipped"],
                "empty_steps": state["empty_steps"]},
               os.path.join(d, STATE_FILE))
    Path(d, CONFIG_FILE).write_text(cfg.to_yaml())
    Path(d, PROGRESS_FILE).write_text(json.dumps({"step": state["step"],
                                                  "state_bytes": os.path.getsize(os.path.join(d, STATE_FILE))}))
    return d


def build_found_trainer(cfg: Config):
    """Validate the image source (before any worker starts) and assemble the TorchTrainer."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.found.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"found.batch_size={cfg.found.batch_size} (global) must be divisible by "
                          f"scaling.num_workers={cfg.scaling.num_workers}")
    cfg = with_absolute_output(cfg).with_overrides({"train.keep_checkpoints_by": "newest"})
    uris = source_uris(cfg)
    reconcile_checkpoints(cfg)  # a truncated / deleted newest checkpoint: resume from the one before
    start = min(resume_step(cfg), cfg.found.steps)
    storage.write_bytes(storage.join(run_dir(cfg), CONFIG_FILE), cfg.to_yaml().encode(), s3_options(cfg))
    sc = cfg.scaling
    scaling = ray.train.ScalingConfig(
        num_workers=sc.num_workers, use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})})
    return TorchTrainer(
        found_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "start_step": start},
        scaling_config=scaling, run_config=run_config(cfg), datasets={"train": found_dataset(cfg, uris, start)},
        dataset_config=train_data_config())


def fit_found(cfg: Config, *, progress: bool = False):
    """Train (or resume ``output_dir/run_name``) FOUND's head; returns the Ray Train ``Result``.
    The head is ``<output_dir>/<run_name>/found_head.safetensors``."""
    trainer = build_found_trainer(cfg)
    start = trainer.train_loop_config["start_step"]
    with ProgressBar(run_dir(with_absolute_output(cfg)), cfg.found.steps, start=start, s3=s3_options(cfg),
                     disable=not progress, desc=f"{cfg.run_name} (FOUND)"):
        return trainer.fit()
