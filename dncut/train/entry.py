"""The function Ray Train runs on each worker, in a module that imports nothing heavy.

Rule: Ray Train's controller unpickles the training function to start the workers; a function
defined in ``dncut.train.worker`` would make the controller import torch, timm and the model code
first (seconds per run, on the path to the first step). This wrapper imports them in the worker only.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``dncut.train.worker.train_loop_per_worker`` (its arguments), imported on the worker."""
    from dncut.train.worker import train_loop_per_worker as run

    run(loop_config)
