"""Self-supervised dense learning on Ray Train (paper Sec. 3.3-3.4, 4 "Training details").

    loop.py         builders, lr schedule, LoopState, train_one_step, collectives (no Ray)
    checkpoints.py  the one checkpoint format, the intact check, the resume point, the rerun check
    resources.py    resource arithmetic at start: Train workers + decode tasks against the cluster
    chief.py        rank 0's duties: validation, tracking, checkpoint files, export (no Ray)
    worker.py       the Ray Train adapter: train_loop_per_worker, report
    driver.py       run config, trainer assembly, fit, export_run
    found.py        FOUND's head training on the same pieces

The entry points are importable from here (``from dncut.train import fit``); they are loaded on
first use, so ``import dncut.train.loop`` stays free of Ray and of the driver's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS = {
    "fit": "driver", "build_trainer": "driver", "export_run": "driver", "run_config": "driver",
    "fit_found": "found", "HEAD_FILE": "found",
    "EXPORT_FILE": "checkpoints", "STATE_FILE": "checkpoints", "PROGRESS_FILE": "checkpoints",
    "CONFIG_FILE": "checkpoints", "resume_step": "checkpoints",
    "build_model": "loop", "build_loss": "loop", "build_optimizer": "loop", "lr_schedule": "loop",
    "LoopState": "loop", "model_inputs": "loop", "train_one_step": "loop",
    "PREFETCH_BATCHES": "worker", "batches": "worker",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f"dncut.train.{_ENTRY_POINTS[name]}"), name)
    raise AttributeError(f"module 'dncut.train' has no attribute {name!r}")
