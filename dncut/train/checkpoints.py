"""The one checkpoint format of a run folder, its intact check and the resume point.

A run folder (``Config.run_dir``: ``output_dir/run_name``, local or ``s3://``) holds::

    config.yaml                     the resolved config (CONFIG_FILE)
    checkpoints.json                dncut's record (MANIFEST_FILE): {"checkpoints": [{"name", "step"}],
                                    "finished": {"step", "metrics"}}; a checkpoint is appended by rank 0
                                    once its upload has completed, "finished" is set once the run's
                                    last step is checkpointed and exported (a new checkpoint drops it)
    backbone.pth, model.safetensors, config.json    the export (EXPORT_FILE; dncut.export)
    fit_<time>/                     one ``fit()`` of the run: Ray Train's folder for that fit
        checkpoint_<time>/          one checkpoint
            state.pt                torch.save dict (STATE_FILE): weights, optimiser, "step", ...
            progress.json           {"step": k, "state_bytes": n}  (PROGRESS_FILE), written before the upload
            config.yaml             the config it was trained with

``dncut train`` and ``dncut found-train`` write the same files (their ``state.pt`` dicts differ).

A rerun of a run folder that holds trained state (a checkpoint folder, a manifest entry or an
export) must bring the config it was trained with, up to the keys that do not change what the
weights mean (``TRAIN_RERUN_KEYS``, ``FOUND_RERUN_KEYS``): ``check_rerun`` refuses any other change
before a worker starts and before ``config.yaml`` is written, so the folder stays as it was.

dncut keeps its own record: a checkpoint is the folder itself, and it is **intact** when its
``progress.json`` reads and its ``state.pt`` holds the byte count recorded there (a truncated,
half-uploaded or deleted one is not). The manifest names what was uploaded, so a recorded
checkpoint that has since gone (its folder deleted) is named when a rerun skips it. A run resumes from its newest intact checkpoint, whatever
Ray Train would hand the workers: every ``fit()`` gets a fresh Ray Train folder (``new_fit_name``)
so Ray restores no state of an earlier fit, and the workers ask ``resume_point`` instead of
taking the checkpoint Ray Train hands them (``get_checkpoint``). Ray's ``CheckpointConfig``
retention applies within each fit; ``prune_earlier_fits`` applies ``train.keep_checkpoints``
across fits.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyarrow import fs as pafs

import yaml

from dncut.config import Config, ConfigError, config_diff, parse_config
from dncut.storage import Storage

log = logging.getLogger("dncut.train")

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.yaml"
EXPORT_FILE = "backbone.pth"
MANIFEST_FILE = "checkpoints.json"
CHECKPOINT_PREFIX = "checkpoint_"
FIT_PREFIX = "fit_"


RERUN_FREE_KEYS = ("run_name", "output_dir", "storage.", "scaling.", "eval.", "tune.", "tracking.",
                   "data.decode_cpus", "data.val", "data.val_scenes", "model.trusted_checkpoint",
                   "train.log_every", "train.val_every", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.max_nan_steps")
"""Keys any rerun of a run folder may change: where the folder is reached, resources, evaluation,
tracking, validation and reporting cadence (the weights and the row stream mean the same)."""
TRAIN_RERUN_KEYS = (*RERUN_FREE_KEYS, "train.max_steps", "train.epochs", "found.")
"""``dncut train``: also the run's length (extending a run) and FOUND's section, which it does not read."""
FOUND_RERUN_KEYS = (*RERUN_FREE_KEYS, "found.steps", "train.", "loss.", "ncut.", "model.projector",
                    "model.proj_dim", "model.hidden_dim", "model.freeze_encoder_bn")
"""``dncut found-train``: also its length and what it does not read (training's optimiser, loss,
NCut layer and projector/predictor; the frozen backbone is ``model.backbone`` / ``model.checkpoint``)."""


class RerunError(ConfigError):
    """A rerun of a run folder with a config that changes what its trained state means."""


@dataclass(frozen=True)
class CheckpointRef:
    """One intact checkpoint: its folder (``uri``, local path or ``s3://``), its path relative to the
    run folder (``name``) and the step it was saved at."""

    uri: str
    name: str
    step: int


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` inside one fit (``checkpoint_<step>_<UTC time>``)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def read_manifest(run: str, store: Storage) -> dict[str, Any]:
    """The run's manifest (``{"checkpoints": [...], "finished": {...}}``; ``{"checkpoints": []}``
    without a readable one: a WARNING names an unreadable one, checkpoints are then found by listing)."""
    try:
        manifest = json.loads(store.read_bytes(store.join(run, MANIFEST_FILE)))
        manifest["checkpoints"] = list(manifest["checkpoints"])
        return manifest
    except FileNotFoundError:
        return {"checkpoints": []}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("run %s: unreadable %s (%s); checkpoints are found by listing", run, MANIFEST_FILE, exc)
        return {"checkpoints": []}


def write_manifest(run: str, store: Storage, manifest: dict[str, Any]) -> None:
    store.write_bytes(store.join(run, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())


def record(run: str, store: Storage, name: str, step: int) -> None:
    """Append a checkpoint whose upload has completed (``name`` relative to ``run``) to the manifest;
    the run is no longer finished (``record_finished``) until it finishes again."""
    manifest = read_manifest(run, store)
    manifest["checkpoints"].append({"name": name, "step": int(step)})
    manifest.pop("finished", None)
    write_manifest(run, store, manifest)


def recorded(run: str, store: Storage) -> list[dict[str, Any]]:
    """The manifest's entries (``[{"name", "step"}]``, oldest first; empty without a readable manifest)."""
    return read_manifest(run, store)["checkpoints"]


def record_finished(run: str, store: Storage, step: int, metrics: dict[str, Any]) -> None:
    """Mark the run finished at ``step``: its last checkpoint is uploaded and its export written.
    ``metrics``: the last reported metrics (what ``fit`` returns for a rerun of the finished run)."""
    manifest = read_manifest(run, store)
    manifest["finished"] = {"step": int(step), "metrics": metrics}
    write_manifest(run, store, manifest)


def finished_at(run: str, store: Storage) -> dict[str, Any] | None:
    """``{"step", "metrics"}`` of a finished run (``record_finished``), else None (also for a mark
    this dncut cannot read)."""
    mark = read_manifest(run, store).get("finished")
    ok = isinstance(mark, dict) and isinstance(mark.get("step"), int) and isinstance(mark.get("metrics"), dict)
    return mark if ok else None


def clear_finished(run: str, store: Storage) -> None:
    """Drop the run's "finished" mark, if any: training past it has begun (an export may change
    before the next checkpoint is recorded)."""
    manifest = read_manifest(run, store)
    if manifest.pop("finished", None) is not None:
        write_manifest(run, store, manifest)


def new_fit_name() -> str:
    """A fresh name for one ``fit()`` of a run (Ray Train's ``RunConfig.name`` under the run folder):
    ``fit_<UTC time to the microsecond>``, so names sort by start time."""
    now = time.time()
    return f"{FIT_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now % 1 * 1e6):06d}"


def stage(state: dict[str, Any], cfg: Config, prefix: str = "dncut-ckpt-") -> str:
    """A local temporary folder holding one checkpoint (``state.pt``, ``config.yaml``,
    ``progress.json`` with ``state["step"]`` and the byte count of ``state.pt``); Ray Train
    uploads it and deletes it (``delete_local_checkpoint_after_upload``)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    torch.save(state, os.path.join(folder, STATE_FILE))
    Path(folder, CONFIG_FILE).write_text(cfg.to_yaml())
    progress = {"step": int(state["step"]), "state_bytes": os.path.getsize(os.path.join(folder, STATE_FILE))}
    Path(folder, PROGRESS_FILE).write_text(json.dumps(progress))
    return folder


def _checkpoint_files(run: str, store: Storage) -> dict[str, dict[str, int]]:
    """``{checkpoint folder relative to run: {file name: size}}`` of every ``checkpoint_*`` folder under ``run``."""
    fs, root = store.filesystem(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        return {}
    folders: dict[str, dict[str, int]] = {}
    for info in infos:
        parts = info.path[len(root):].strip("/").split("/")
        if info.type == pafs.FileType.File and len(parts) >= 2 and parts[-2].startswith(CHECKPOINT_PREFIX):
            folders.setdefault("/".join(parts[:-1]), {})[parts[-1]] = info.size
    return folders


def _why_broken(run: str, name: str, files: dict[str, int], store: Storage) -> tuple[int | None, str | None]:
    """``(step, None)`` for an intact checkpoint folder, ``(step or None, reason)`` for a broken one."""
    if PROGRESS_FILE not in files:
        return None, f"no {PROGRESS_FILE}"
    try:
        progress = json.loads(store.read_bytes(store.join(run, name, PROGRESS_FILE)))
        step, expected = int(progress["step"]), progress.get("state_bytes")
    except (ValueError, KeyError, TypeError) as exc:  # a truncated file
        return None, f"unreadable {PROGRESS_FILE} ({exc})"
    except FileNotFoundError:  # deleted since the listing
        return None, f"no {PROGRESS_FILE}"
    if expected is not None and STATE_FILE not in files:  # (checkpoints before the byte count: none recorded)
        return step, f"no {STATE_FILE}"
    if expected is not None and files[STATE_FILE] != expected:
        return step, f"{STATE_FILE} holds {files[STATE_FILE]} of {expected} bytes"
    return step, None


def scan(run: str, store: Storage) -> tuple[list[CheckpointRef], dict[str, str]]:
    """The checkpoints of a run folder: ``(intact ones oldest first, {broken folder: reason})``.

    Raises:
        dncut.storage.StorageError, OSError: the storage cannot be listed (an unreachable endpoint).
    """
    intact, broken = [], {}
    for name, files in sorted(_checkpoint_files(run, store).items()):
        step, why = _why_broken(run, name, files, store)
        if why is None:
            intact.append(CheckpointRef(store.join(run, name), name, step))
        else:
            broken[name] = why
    intact.sort(key=lambda c: (c.step, c.name))
    return intact, broken


def intact_checkpoints(run: str, store: Storage) -> dict[str, int]:
    """``{checkpoint folder relative to run: step}`` of the run's intact checkpoints."""
    return {c.name: c.step for c in scan(run, store)[0]}


def resume_point(run: str, store: Storage, *, say: bool = False) -> CheckpointRef | None:
    """The newest intact checkpoint of ``run`` (None without one: the run starts from scratch).

    A broken checkpoint newer than it (truncated ``state.pt`` or ``progress.json``, a deleted
    ``state.pt``) is skipped; with ``say`` a WARNING names each skipped folder and the one resumed
    from ("resuming from ..."). A deleted folder is simply not there."""
    intact, broken = scan(run, store)
    newest = intact[-1] if intact else None
    if say:
        listed = {c.name for c in intact} | set(broken)
        broken |= {e["name"]: "recorded in the manifest, no longer there" for e in recorded(run, store)
                   if e["name"] not in listed and e["step"] > (newest.step if newest else -1)}
    if say and broken:
        where = f"{newest.name} (step {newest.step})" if newest else "the start (no intact checkpoint left)"
        log.warning("run %s: skipped the incomplete checkpoint(s) %s; resuming from %s", run,
                    "; ".join(f"{n}: {why}" for n, why in broken.items()), where)
    return newest


def prune_earlier_fits(run: str, store: Storage, keep: int) -> list[str]:
    """Delete the intact checkpoints of a run's earlier fits that are not among its ``keep`` newest
    (Ray Train's retention applies within one fit; a driver restarted many times would otherwise
    keep ``keep`` checkpoints per fit). Broken folders stay, for a look at what went wrong.

    Returns:
        The deleted folders, relative to ``run``.
    """
    intact = scan(run, store)[0]
    doomed = [c for c in intact[:-keep] if c.name.count("/") == 1 and c.name.startswith(FIT_PREFIX)] if keep else []
    for c in doomed:
        fs, path = store.filesystem(c.uri)
        fs.delete_dir(path)
    if doomed:
        log.info("run %s: deleted %d checkpoint(s) of earlier fits beyond train.keep_checkpoints=%d", run,
                 len(doomed), keep)
    return [c.name for c in doomed]


def load_state(ref: CheckpointRef, store: Storage) -> dict[str, Any]:
    """The ``state.pt`` dict of a checkpoint, on the CPU."""
    data = store.read_bytes(store.join(ref.uri, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resume_step(cfg: Config, store: Storage | None = None) -> int:
    """The step a rerun of ``cfg.run_dir`` continues at: that of its newest intact checkpoint (0 without one)."""
    ref = resume_point(cfg.with_absolute_paths().run_dir, store or cfg.storage_handle())
    return ref.step if ref else 0


def has_trained_state(run: str, store: Storage, outputs: tuple[str, ...] = (EXPORT_FILE,)) -> bool:
    """Does ``run`` hold a checkpoint folder (intact or not), a manifest entry or one of ``outputs``?"""
    return bool(_checkpoint_files(run, store) or recorded(run, store)
                or any(store.exists(store.join(run, f)) for f in outputs))


def check_rerun(cfg: Config, store: Storage, free: tuple[str, ...] = TRAIN_RERUN_KEYS,
                outputs: tuple[str, ...] = (EXPORT_FILE,)) -> None:
    """Refuse to continue ``cfg.run_dir`` with a config that changes what its trained state means.

    Nothing is checked when the folder has no ``config.yaml`` or no trained state
    (``has_trained_state``); a config that differs only in ``free`` keys passes. Reads only:
    the folder's files are left as they are.

    Args:
        cfg: the rerun's config, local paths absolute (``Config.with_absolute_paths``).
        free: keys that may change (``dncut.config.config_diff`` ignore entries).
        outputs: files of the folder that count as trained state (the run's exports).

    Raises:
        RerunError: one line naming the changed keys (old -> new) and the ways forward.
    """
    run = cfg.run_dir
    saved_uri = store.join(run, CONFIG_FILE)
    try:
        text = store.read_bytes(saved_uri)
    except FileNotFoundError:
        return
    if not has_trained_state(run, store, outputs):
        return
    try:
        saved = parse_config(yaml.safe_load(text) or {}, (), saved_uri)
    except (ConfigError, yaml.YAMLError) as exc:
        raise RerunError(f"run {run} holds trained state but its {CONFIG_FILE} does not load with this dncut "
                         f"({' '.join(str(exc).split())}): set a new run_name to start a new run") from None
    diff = config_diff(saved, cfg, free)
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
        raise RerunError(f"run {run} was trained with another config ({shown}{more}): set a new run_name to start "
                         f"a new run, or rerun with its saved config {saved_uri} to continue it")
