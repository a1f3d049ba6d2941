"""FOUND's head on Ray Train (``dncut found-train``; REFERENCE §7, ``dncut.eval.found``).

    fit_found(cfg)                            driver: validate the source, build the TorchTrainer
      -> found_loop_per_worker(loop_config)   every worker
           frozen backbone (model.backbone / model.checkpoint, eval mode, no gradients)
           FoundHead (1x1 conv), AdamW(found.lr), StepLR(found.lr_step, found.lr_gamma) per step
           resume(): the run's newest intact checkpoint (head, optimiser, scheduler, step)
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

The same machinery as ``dncut train``: the seeded row stream (``epoch_rows``), the one checkpoint
format and resume point of ``dncut.train.checkpoints`` (a rerun of the same run resumes from its
newest intact checkpoint), the worker group restarts from it (``scaling.max_failures``), the
collectives of ``dncut.train.loop``, the progress bar on the driver.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dncut import photometric
from dncut.backbones import create_backbone
from dncut.config import Config, ConfigError
from dncut.data.pipeline import decode_failure, found_dataset, source_uris, train_data_config
from dncut.eval.found import (FoundHead, HeadInfo, found_loss, pseudo_masks, refine_targets, save_head,
                              upsample_logits)
from dncut.storage import Storage
from dncut.tracking import ProgressBar, Tracker
from dncut.train.checkpoints import FOUND_RERUN_KEYS, CONFIG_FILE, check_rerun, load_state, stage
from dncut.train.driver import run_config, scaling_config, start_step
from dncut.train.loop import all_reduce, unwrap
from dncut.train.resources import check_cluster
from dncut.train.worker import agreed_resume_point, batches, report_checkpoint, setup_worker

log = logging.getLogger("dncut.found")

HEAD_FILE = "found_head.safetensors"
COLLAPSE = (0.02, 0.98)
"""A head that marks less / more than this fraction of a batch's pixels as foreground has collapsed
to a near-constant mask (logged as a warning; ``fg_fraction`` in metrics.jsonl)."""


def frozen_backbone(cfg: Config, device: torch.device, store: Storage | None = None):
    """The backbone whose features the head learns on: eval mode, no gradients."""
    m, store = cfg.model, store or cfg.storage_handle()
    backbone = create_backbone(m.backbone, pretrained=m.pretrained and m.checkpoint is None, checkpoint=m.checkpoint,
                               store=store, trusted=m.trusted_checkpoint)
    return backbone.eval().requires_grad_(False).to(device)


def head_info(cfg: Config, steps: int) -> HeadInfo:
    """What the head file records: the backbone and the checkpoint it was trained on."""
    from dncut.backbone_specs import spec

    return HeadInfo(cfg.model.backbone, cfg.model.checkpoint or "", spec(cfg.model.backbone).channels, steps)


def found_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run by every Ray Train worker; ``loop_config``: ``{"config": Config dict (absolute paths),
    "start_step": int}`` (as ``dncut.train.worker.train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    cfg, start = Config.model_validate(loop_config["config"]), int(loop_config.get("start_step", 0))
    f, ctx = cfg.found, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    store = cfg.storage_handle()
    device = setup_worker(cfg, rank)
    backbone = frozen_backbone(cfg, device, store)
    head = FoundHead(backbone.channels).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=f.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=f.lr_step, gamma=f.lr_gamma)
    state = resume(head, optimizer, scheduler, rank, cfg, store)
    head = ray.train.torch.prepare_model(head)
    tracker = Tracker(cfg, cfg.run_dir, state["step"], store) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    for batch in batches(shard, f.batch_size // world, skip=state["step"] - start, device=device):
        parts = train_found_step(backbone, head, optimizer, scheduler, batch, state, cfg)
        if state["step"] % cfg.train.log_every == 0 or state["step"] % cfg.train.checkpoint_every == 0 \
                or state["step"] >= f.steps:
            report(head, optimizer, scheduler, state, parts, cfg, tracker)
        if state["step"] >= f.steps:
            break
    if tracker is not None:
        unwrap(head).cpu()
        uri = store.join(cfg.run_dir, HEAD_FILE)
        store.write_bytes(uri, save_head(unwrap(head), head_info(cfg, state["step"])))
        tracker.close()
        log.info("FOUND head written to %s", uri)


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
    if all_reduce([0.0 if bool(ok.any()) else 1.0], ok.device)[0] > 0:
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


def resume(head: FoundHead, optimizer, scheduler, rank: int, cfg: Config, store: Storage) -> dict:
    """Load the run's newest intact checkpoint (head, optimiser, scheduler, step); a fresh state without one."""
    state = {"step": 0, "skipped": 0, "empty_steps": 0, "t0": time.perf_counter()}
    ref = agreed_resume_point(cfg, store, rank)
    if ref is None:
        return state
    saved = load_state(ref, store)
    head.load_state_dict(saved["head"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.update(step=int(saved["step"]), skipped=int(saved.get("skipped", 0)),
                 empty_steps=int(saved.get("empty_steps", 0)))
    log.info("resumed FOUND head training from %s at step %d", ref.uri, state["step"])
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
            checkpoint = ray.train.Checkpoint.from_directory(stage(checkpoint_state(head, optimizer, scheduler, state),
                                                                  cfg, prefix="dncut-found-ckpt-"))
    report_checkpoint(metrics, checkpoint, cfg, cfg.storage_handle() if tracker is not None else None)


def checkpoint_state(head, optimizer, scheduler, state: dict) -> dict[str, Any]:
    """FOUND's ``state.pt`` dict: head, optimiser, scheduler, step and counters."""
    return {"head": unwrap(head).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": state["step"], "skipped": state["skipped"],
            "empty_steps": state["empty_steps"]}


def build_found_trainer(cfg: Config):
    """Check the run against the cluster and its folder (``dncut.train.driver.build_trainer``; a
    rerun may change ``FOUND_RERUN_KEYS`` only), validate the image source (all before any worker
    starts and before ``config.yaml`` is written) and assemble the TorchTrainer."""
    import ray.data
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.found.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"found.batch_size={cfg.found.batch_size} (global) must be divisible by "
                          f"scaling.num_workers={cfg.scaling.num_workers}")
    cfg = cfg.with_absolute_paths().with_overrides({"train.keep_checkpoints_by": "newest"})
    check_cluster(cfg)
    store = cfg.storage_handle()
    check_rerun(cfg, store, FOUND_RERUN_KEYS, outputs=(HEAD_FILE,))
    uris = source_uris(cfg)
    start = start_step(cfg, store, cfg.found.steps)  # a truncated / deleted newest checkpoint: the one before
    store.write_bytes(store.join(cfg.run_dir, CONFIG_FILE), cfg.to_yaml().encode())
    return TorchTrainer(
        found_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "start_step": start},
        scaling_config=scaling_config(cfg), run_config=run_config(cfg, store=store),
        datasets={"train": found_dataset(cfg, uris, start)}, dataset_config=train_data_config())


def fit_found(cfg: Config, *, progress: bool = False):
    """Train (or resume ``output_dir/run_name``) FOUND's head; returns the Ray Train ``Result``.
    The head is ``<output_dir>/<run_name>/found_head.safetensors``."""
    trainer = build_found_trainer(cfg)
    start = trainer.train_loop_config["start_step"]
    with ProgressBar(cfg.with_absolute_paths().run_dir, cfg.found.steps, start=start, store=cfg.storage_handle(),
                     disable=not progress, desc=f"{cfg.run_name} (FOUND)"):
        return trainer.fit()
