"""The training loop's pieces, without Ray (paper Sec. 3.3-3.4, 4 "Training details").

    build_model / build_loss / build_optimizer / lr_schedule     what one worker trains
    LoopState                                                    what it carries from step to step
    model_inputs(batch)                                          two-view rows -> the model's arguments
    train_one_step(model, criterion, optimizer, batch, lr, state, cfg, device)
    step_metrics / log_progress                                  what a report says
    all_reduce / union / workers                                 collectives (identity on one worker)

A batch is a dict of tensors on the device: ``view1``/``view2`` ``(b, 3, S, S)`` uint8, ``box1``/
``box2`` ``(b, 4)``, ``flip1``/``flip2`` ``(b,)``, ``aug1``/``aug2`` ``(b, 13)``, ``epoch``/``key``
``(b,)``, ``ok`` ``(b,)`` and ``failure`` ``(b, 1024)`` uint8 (``dncut.data.pipeline``).

Learning-rate rule: the peak lr is ``train.lr * scale(global_batch / base_batch_size)`` (linear
by default, Goyal et al.), warmed up linearly over ``warmup_steps`` then cosine to ``min_lr``.

A non-finite loss (or NaN features: ``dncut.ncut.NonFiniteFeaturesError``) skips the step on
every worker (the decision is all-reduced so DDP stays in step) and is counted;
``max_nan_steps`` in a row stop the run with a clear error. Mask collapse (similarity to a
template above 0.9) is logged as a warning.

This module imports no Ray: the Ray Train adapter is ``dncut.train.worker``; a bench or a test
runs the same loop in-process (``bench/finetune_device.py``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dncut import photometric
from dncut.backbones import create_backbone
from dncut.config import Config
from dncut.data.pipeline import decode_failure
from dncut.losses import NCutLoss
from dncut.model import DenseNCutModel
from dncut.ncut import NonFiniteFeaturesError
from dncut.storage import Storage

log = logging.getLogger("dncut.train")


# ----------------------------------------------------------------------------- builders


def build_model(cfg: Config, store: Storage | None = None) -> DenseNCutModel:
    """Encoder (pretrained or from ``model.checkpoint``, read through ``store``) + projector +
    predictor, in train mode with the encoder BatchNorm policy ``model.freeze_encoder_bn`` applied."""
    m, store = cfg.model, store or cfg.storage_handle()
    encoder = create_backbone(m.backbone, pretrained=m.pretrained and m.checkpoint is None, checkpoint=m.checkpoint,
                              store=store, trusted=m.trusted_checkpoint)
    return DenseNCutModel(encoder, align_size=cfg.data.crop_size // encoder.stride, proj_dim=m.proj_dim,
                          hidden_dim=m.hidden_dim, projector=m.projector, ncut=cfg.ncut,
                          freeze_encoder_bn=m.freeze_encoder_bn)


def build_loss(cfg: Config) -> NCutLoss:
    """The symmetric NCut loss of ``cfg.loss``."""
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


def run_schedule(cfg: Config, total: int) -> np.ndarray:
    """``lr_schedule`` of a run of ``total`` steps with ``cfg.train``'s peak, floor and warm-up."""
    t = cfg.train
    return lr_schedule(t.effective_lr(), t.min_lr, t.warmup_steps, total)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the module itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- collectives


def workers() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    """``values`` summed (or ``op``) over the workers; no collective on one worker.

    One worker makes no call: torch.distributed's flight recorder keeps every collective with its
    traceback in a ring buffer, which a one-worker run would only fill (``docs/operations.md``)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if workers() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def union(items: set[str]) -> set[str]:
    """The union of every worker's set (``all_gather_object``; identity on one worker)."""
    if workers() == 1:
        return items
    gathered: list = [None] * workers()
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*map(set, gathered))


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every worker (identity on one worker)."""
    if workers() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- the step


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

    def to_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      counters: dict[str, float]) -> dict[str, Any]:
        """The ``state.pt`` dict: weights, optimiser, step, epoch, ``counters`` (totals over all
        workers, ``checkpoint_counters``) and the skipped files."""
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": self.step,
                "epoch": self.epoch, "counters": dict(counters), "skipped_files": sorted(self.skipped_files)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        rank: int) -> LoopState:
        """Load a ``state.pt`` dict into ``model`` and ``optimizer``; the state to continue with.
        Rank 0 takes the saved counter totals (the others start at 0: counters are summed at each
        report); ``nan_steps`` is the same on every worker."""
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = cls(step=int(saved["step"]), epoch=int(saved["epoch"]),
                    skipped_files=set(saved.get("skipped_files", [])))
        totals = saved.get("counters", {})
        state.counters["nan_steps"] = float(totals.get("nan_steps", 0.0))
        if rank == 0:
            state.counters.update(totals)
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
    """One optimizer step on a batch of two-view rows; bad rows and non-finite steps are counted.

    Raises:
        RuntimeError: more than ``train.max_nan_steps`` non-finite losses in a row.
    """
    ok = batch["ok"].bool()  # (b,)
    count_skipped(batch, ok, state)
    state.epoch = max(state.epoch, int(batch["epoch"].max()))
    inputs = model_inputs({k: v[ok] for k, v in batch.items()})
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, parts = None, {}
    # DDP's forward broadcasts buffers (BatchNorm): every worker runs it, or none does
    if all_reduce([0.0 if int(ok.sum()) >= 2 else 1.0], device)[0] == 0:
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda"):
                out = model(*inputs)
            loss, parts = criterion.symmetric(out.ab, out.ba, shape=out.shape)
            state.counters["fallbacks"] += out.n_fallback
        except NonFiniteFeaturesError as exc:
            log.warning("step %d: %s", state.step, exc)
    finite = loss is not None and bool(torch.isfinite(loss))
    optimizer.zero_grad(set_to_none=True)
    if all_reduce([0.0 if finite else 1.0], device)[0] == 0:
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


def count_skipped(batch: dict[str, torch.Tensor], ok: torch.Tensor, state: LoopState) -> None:
    """Count rows that failed to decode; log each file the first time."""
    if bool(ok.all()):
        return
    state.counters["skipped_images"] += float((~ok).sum())
    for column in batch["failure"][~ok].cpu().numpy():
        uri, err = decode_failure(column)
        if uri not in state.skipped_files:
            state.skipped_files.add(str(uri))
            log.warning("skipped %s: %s", uri, err)


# ----------------------------------------------------------------------------- when to report, what to say


def val_due(step: int, total: int, cfg: Config) -> bool:
    """Validation at this step: every ``train.val_every`` steps and at the last."""
    return step >= total or bool(cfg.train.val_every and step % cfg.train.val_every == 0)


def checkpoint_due(step: int, total: int, cfg: Config) -> bool:
    """A checkpoint at this step: every ``train.checkpoint_every`` steps and at the last."""
    return step % cfg.train.checkpoint_every == 0 or step >= total


def report_due(step: int, total: int, cfg: Config) -> bool:
    """A report at this step: every ``log_every``, ``checkpoint_every`` and ``val_every`` step, and the last."""
    return step % cfg.train.log_every == 0 or checkpoint_due(step, total, cfg) or val_due(step, total, cfg)


def step_metrics(state: LoopState, total: int, sched: np.ndarray, device) -> dict[str, Any]:
    """The report of this step (counters summed over the workers; a collective on every worker)."""
    counters, parts = state.counters, state.last_parts
    summed = all_reduce([counters["skipped_images"], counters["fallbacks"]], device)
    # a skipped step is decided by an all-reduce: every worker counts it, so nan_steps is not summed
    out = {"step": state.step, "total_steps": total, "epoch": state.epoch, "lr": float(sched[state.step - 1]),
           "skipped_rows": int(summed[0]), "nan_steps": int(counters["nan_steps"]), "ncut_fallbacks": int(summed[1]),
           "elapsed_s": round(time.perf_counter() - state.t0, 2)}
    for key in ("loss", "l_consistency", "l_reg", "pass_fraction", "iou_mean",
                "sim_horizontal", "sim_vertical", "sim_uniform", "collapsed"):
        if key in parts:
            out[key] = parts[key]
    return out


def checkpoint_counters(metrics: dict[str, Any]) -> dict[str, float]:
    """The counters over all workers (from a report's metrics), as stored in a checkpoint."""
    return {"skipped_images": float(metrics["skipped_rows"]), "nan_steps": float(metrics["nan_steps"]),
            "fallbacks": float(metrics["ncut_fallbacks"])}


def log_progress(m: dict[str, Any]) -> None:
    """The progress line of a report; a mask collapse is a warning."""
    pct = 100.0 * m["step"] / m["total_steps"]
    log.info("step %d/%d (%.0f%%) loss %s l_reg %s pass %s val_iou %s lr %.2e skipped %d nan %d",
             m["step"], m["total_steps"], pct, _fmt(m.get("loss")), _fmt(m.get("l_reg")),
             _fmt(m.get("pass_fraction")), _fmt(m.get("val_iou")), m["lr"], m["skipped_files"], m["nan_steps"])
    if m.get("collapsed"):
        log.warning("mask collapse: template similarity h=%.2f v=%.2f u=%.2f (raise loss.alpha)",
                    m["sim_horizontal"], m["sim_vertical"], m["sim_uniform"])


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
