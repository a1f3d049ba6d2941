"""Rank 0's duties in a training run, without Ray: validation, the progress line, the metric
history, the checkpoint files and the export of the finetuned encoder.

Validation (``train.val_every`` and at the end) is ``dncut.eval.validate``: the evaluation job's
own inference path, so ``val_iou`` is what ``dncut eval-saliency`` reports. With ``train.export:
best_val_iou`` a new best encoder is exported at once; with ``last`` at the end of the run.

``dncut.train.worker`` runs it on rank 0 of a Ray Train run; ``bench/finetune_device.py`` runs it
in-process.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dncut.backbones import export_backbone
from dncut.config import Config
from dncut.eval.validate import score_backbone, validation_rows
from dncut.export import export_hf
from dncut.storage import Storage
from dncut.tracking import Tracker
from dncut.train.checkpoints import EXPORT_FILE, stage
from dncut.train.loop import LoopState, checkpoint_counters, log_progress, unwrap

log = logging.getLogger("dncut.train")


class Chief:
    """Rank 0's duties.

    Args:
        cfg: the run config (absolute paths).
        device: where validation runs.
        model: the (possibly DDP-wrapped) model; validated once here (the starting point of the curve).
        state: the loop state (a resumed run keeps its history up to ``state.step``).
        store: the storage handle of the run.
        track: keep the run's tracking (``metrics.jsonl``, TensorBoard, MLflow / W&B); off, only
            validation and export.
    """

    def __init__(self, cfg: Config, device: torch.device, model, state: LoopState, store: Storage,
                 track: bool = True) -> None:
        self.cfg, self.device, self.store, self.run = cfg, device, store, cfg.run_dir
        self.rows = validation_rows(cfg)
        self.tracker = Tracker(cfg, self.run, state.step, store) if track else None
        history = self.tracker.history if self.tracker else []
        self.best = max((m["val_iou"] for m in history if math.isfinite(m.get("val_iou", math.nan))),
                        default=-math.inf)  # of the exported encoder (train.export: best_val_iou)
        self.best_step: int | None = None
        self.curve: list[dict[str, float]] = []
        self.last_metrics: dict[str, Any] = dict(history[-1]) if history else {}  # the last reported
        state.last_val = self.validate(model, state.step)

    def validate(self, model, step: int) -> dict[str, float]:
        """Simple-NCut saliency of the current encoder: ``val_acc``, ``val_iou``, ``val_max_fbeta``,
        ``val_mae`` (NaN when every image failed), ``val_failed`` and ``val_step``. With
        ``train.export: best_val_iou`` a new best is exported at once."""
        scores, _ = score_backbone(unwrap(model).encoder, self.rows, self.cfg, device=self.device)
        if self.cfg.train.export == "best_val_iou" and scores["iou"] > self.best:
            self.best, self.best_step = float(scores["iou"]), step
            self.export_encoder(model, f"best val_iou {self.best:.4f} at step {step}")
        out = {**{f"val_{k}": v for k, v in scores.items()}, "val_step": step}
        self.curve.append(out)
        return out

    def record(self, metrics: dict[str, Any]) -> None:
        """Progress line + the run's tracking."""
        log_progress(metrics)
        self.last_metrics = dict(metrics)
        if self.tracker is not None:
            self.tracker.log(metrics, metrics["step"])

    def stage_checkpoint(self, model, optimizer, state: LoopState, metrics: dict[str, Any]) -> str:
        """A local folder with this step's checkpoint (``dncut.train.checkpoints.stage``)."""
        return stage(state.to_checkpoint(model, optimizer, checkpoint_counters(metrics)), self.cfg)

    def finish(self, model) -> None:
        """The end of the run: export the final encoder (``train.export: last``), close the tracking
        (writes ``curves.png``)."""
        if self.cfg.train.export == "last":
            self.export_encoder(model, "last step")
        if self.tracker is not None:
            self.tracker.close()

    def export_encoder(self, model, why: str) -> None:
        """``backbone.pth`` and, beside it, ``model.safetensors`` + ``config.json`` (timm's layout)."""
        encoder = unwrap(model).encoder
        export_backbone(encoder, self.store.join(self.run, EXPORT_FILE), self.store)
        export_hf(encoder, self.run, self.store)
        log.info("exported the finetuned backbone (%s) to %s (%s, model.safetensors)", why, self.run, EXPORT_FILE)
