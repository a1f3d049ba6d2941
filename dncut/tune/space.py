"""What a sweep is, checked before any trial: the sweep folder, a trial's config, how many trials run
at once, the search-space checks and the rerun rule (the package docstring, ``dncut.tune``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from dncut import storage
from dncut.config import Config, ConfigError, LogUniform, config_diff, parse_config
from dncut.tune.results import trial_run_name

log = logging.getLogger("dncut.tune")

RUNS_DIR = "runs"
FINAL_METRICS = "final_metrics.json"
PLACEMENT_GROUP_FILE = "placement_group.txt"  # a trial's Train workers' placement group id (hex)
CSV_FILE = "trials.csv"
MD_FILE = "trials.md"
PLOT_FILE = "val_iou_vs_alpha.png"
BEST_FILE = "best.md"
EVAL_RUN = "best_eval"
SPACE_KEYS: dict[str, str] = {"alpha": "loss.alpha", "lr": "train.lr", "backbone": "model.backbone"}
"""Tune parameter name -> dotted config key it overrides."""
REPORTED_METRICS: tuple[str, ...] = (
    "val_iou", "val_max_fbeta", "val_acc", "val_mae", "loss", "l_consistency", "l_reg", "pass_fraction",
    "iou_mean", "sim_horizontal", "sim_vertical", "sim_uniform", "lr", "step", "elapsed_s",
)
"""Metrics reported by ``dncut.train`` that a sweep may optimise."""
DRIVER_CPUS = 0.01
"""CPU reserved by a trial's Tune driver function: it only waits on its Train controller (Tune
refuses 0)."""
TIME_ATTRS: tuple[str, ...] = ("training_iteration", "step", "time_total_s", "elapsed_s")


class SweepError(ValueError):
    """A sweep that cannot start; the message names the config key at fault."""


@dataclass
class SweepResults:
    """What ``run_sweep`` produced (every URI is under ``sweep_dir``)."""

    sweep_dir: str
    rows: list[dict[str, Any]]
    table: str
    best: dict[str, Any] | None = None
    eval_summary: dict | None = None
    eval_table: str | None = None
    files: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- where things live


def sweep_dir(cfg: Config) -> str:
    """``<tune.storage_path or output_dir/tune>/<tune.name>``; local paths made absolute."""
    import os

    root = cfg.tune.storage_path or storage.join(cfg.output_dir, "tune")
    if not storage.is_s3(root):
        root = os.path.abspath(os.path.expanduser(root))
    return storage.join(root, cfg.tune.name)


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any], trial_id: str, runs_dir: str) -> Config:
    """The validated config of one trial: the sampled values plus its own run folder.

    Args:
        base: the sweep's config as a plain dict (``Config.model_dump(mode="json")``).
        params: ``{"alpha": float, "lr": float, "backbone": str}`` sampled by Tune.
        trial_id: Tune's trial id.
        runs_dir: ``<sweep dir>/runs``; the trial's Train run lives in ``runs_dir/<run name>``.

    Returns:
        ``Config`` with ``loss.alpha``, ``train.lr``, ``model.backbone``, ``run_name`` and
        ``output_dir`` set (and ``model.checkpoint`` from ``tune.checkpoints`` for that backbone).
    """
    overrides: dict[str, Any] = {SPACE_KEYS[k]: params[k] for k in SPACE_KEYS}
    own = (base.get("tune") or {}).get("checkpoints") or {}
    if params["backbone"] in own:
        overrides.update({"model.checkpoint": own[params["backbone"]], "model.pretrained": False})
    overrides.update({"run_name": trial_run_name(trial_id, params), "output_dir": runs_dir})
    return parse_config(base, overrides, f"trial {trial_id}")


def max_concurrent_trials(cfg: Config, resources: Mapping[str, float], num_trials: int | None = None) -> int:
    """Trials that fit at once with a Ray Data CPU left to each (module docstring).

    Args:
        cfg: the sweep config (``scaling``, ``data.decode_cpus``, ``tune.max_concurrent_trials``).
        resources: ``ray.cluster_resources()``, e.g. ``{"CPU": 16.0, "GPU": 4.0}``.
        num_trials: grid size, an upper bound (``None`` = no bound).

    Returns:
        ``tune.max_concurrent_trials`` if set, else ``max(1, min(floor(CPU / (workers *
        cpus_per_worker + max(1, decode_cpus))), floor(GPU / (workers * gpus_per_worker))))``.
    """
    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    sc = cfg.scaling
    per_cpu = sc.num_workers * sc.cpus_per_worker + max(1.0, cfg.data.decode_cpus)
    fits = [math.floor(float(resources.get("CPU", 0.0)) / per_cpu + 1e-9)]
    if sc.use_gpu:
        fits.append(math.floor(float(resources.get("GPU", 0.0)) / (sc.num_workers * sc.gpus_per_worker) + 1e-9))
    n = min(fits)
    if n < 1:
        log.warning("one trial needs %.3g CPUs%s but the cluster has %s: running one at a time and waiting for "
                    "the autoscaler", per_cpu, " and GPUs" if sc.use_gpu else "", dict(resources))
    return max(1, min(n, num_trials) if num_trials else n)


# ----------------------------------------------------------------------------- checks before any trial


def grid_values(space: LogUniform | list[float]) -> list[float]:
    """Values to check: the grid itself, or the bounds of a log-uniform range."""
    return [space.low, space.high] if isinstance(space, LogUniform) else list(space)


def grid_size(cfg: Config) -> int:
    """Number of trials: grid points x ``num_samples`` (log-uniform axes count once)."""
    n = len(cfg.tune_backbones()) * cfg.tune.num_samples
    for space in (cfg.tune.alpha, cfg.tune.lr):
        n *= 1 if isinstance(space, LogUniform) else len(space)
    return n


def check_space(cfg: Config) -> None:
    t = cfg.tune
    for key, space in (("alpha", t.alpha), ("lr", t.lr)):
        if isinstance(space, LogUniform):
            continue
        if not space:
            raise SweepError(f"tune.{key}: empty search space, give at least one value or {{low, high}}")
        bad = [v for v in space if not math.isfinite(v) or v < 0 or (key == "lr" and v == 0)]
        if bad:
            raise SweepError(f"tune.{key}: invalid values {bad} (alpha >= 0, lr > 0, finite)")
        if len(set(space)) != len(space):
            raise SweepError(f"tune.{key}: repeated values in {space}; use tune.num_samples for repeats")
    if t.backbones is not None and not t.backbones:
        raise SweepError("tune.backbones: empty list, give at least one backbone (or null = [model.backbone])")
    backbones = cfg.tune_backbones()
    if len(set(backbones)) != len(backbones):
        raise SweepError(f"tune.backbones: repeated names in {backbones}")
    if t.metric not in REPORTED_METRICS:
        raise SweepError(f"tune.metric: {t.metric!r} is not reported by training; valid: {', '.join(REPORTED_METRICS)}")
    if t.asha is not None:
        if t.asha.time_attr not in TIME_ATTRS:
            raise SweepError(f"tune.asha.time_attr: invalid value {t.asha.time_attr!r}; valid: {', '.join(TIME_ATTRS)}")
        if t.asha.max_t is None and t.asha.time_attr not in ("training_iteration", "step"):
            raise SweepError(f"tune.asha.max_t: required with time_attr={t.asha.time_attr!r}")
        if t.metric.startswith("val_") and cfg.train.val_every is None:
            raise SweepError(f"tune.asha stops trials on {t.metric}, but train.val_every is null (validation "
                             "only at the start and the end): set train.val_every to the steps between validations")


def check_checkpoints(cfg: Config) -> None:
    """Per-backbone starting weights name swept backbones and exist."""
    store = cfg.storage_handle()
    backbones = cfg.tune_backbones()
    stray = sorted(set(cfg.tune.checkpoints) - set(backbones))
    if stray:
        raise SweepError(f"tune.checkpoints: {stray} not in tune.backbones={backbones}")
    shared = [b for b in backbones if b not in cfg.tune.checkpoints]
    if cfg.model.checkpoint is not None and len(shared) > 1:
        raise SweepError(f"model.checkpoint={cfg.model.checkpoint!r} would be loaded into every backbone of "
                         f"{shared}: give each its own weights in tune.checkpoints")
    for key, uri in [("model.checkpoint", cfg.model.checkpoint)] + [
            (f"tune.checkpoints.{b}", u) for b, u in cfg.tune.checkpoints.items()]:
        if uri is not None and not store.exists(uri):
            raise SweepError(f"{key}: no file at {uri}")


def check_combinations(cfg: Config) -> None:
    """Every (alpha, lr, backbone) grid point (log-uniform bounds) gives a valid config (e.g. the
    crop size is a multiple of every backbone's stride, from ``dncut.backbone_specs``)."""
    base = cfg.model_dump(mode="json")
    for alpha in grid_values(cfg.tune.alpha):
        for lr in grid_values(cfg.tune.lr):
            for backbone in cfg.tune_backbones():
                params = {"alpha": alpha, "lr": lr, "backbone": backbone}
                try:
                    trial_config(base, params, "check", "/tmp")
                except ConfigError as exc:
                    raise SweepError(f"trial {params} has an invalid config: {exc}") from None


def check_sweep(cfg: Config) -> int:
    """Everything that can be checked before a trial starts; returns the number of trials.

    Raises:
        SweepError: empty or invalid search space, unknown backbone, crop size vs stride,
            invalid grid point, unknown metric.
        dncut.data.datasets.DatasetLayoutError: ``data.val`` has no images/ or masks/, or no pairs.
        dncut.storage.StorageError: the training source is unreachable or empty.
    """
    from dncut.data.datasets import saliency_dataset
    from dncut.data.pipeline import source_uris

    check_space(cfg)
    check_checkpoints(cfg)
    check_combinations(cfg)
    if cfg.data.val is not None:
        saliency_dataset("folder", cfg.data.val, cfg.storage_handle())
    source_uris(cfg)
    return grid_size(cfg)


SWEEP_CONFIG = "sweep_config.yaml"
RERUN_FREE_KEYS = ("eval.", "tracking.", "tune.evaluate_best", "tune.max_concurrent_trials")
"""Config keys a resumed sweep may change: they do not change what any trial trains."""


def changed_keys(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between a sweep's saved config and a rerun's, except
    ``RERUN_FREE_KEYS`` (``dncut.config.config_diff``): ``{"tune.alpha": ([0.05], [0.1])}``."""
    return config_diff(saved, new, RERUN_FREE_KEYS)


def check_rerun(cfg: Config, exp_dir: str, store: storage.Storage, restorable: bool) -> bool:
    """Refuse to resume a sweep with a config other than the one its trials ran with.

    Ray Tune restores a sweep's own grid whatever the new search space says, so a rerun with
    other values would silently run the old ones. The saved ``sweep_config.yaml`` is written only
    when a sweep starts, so it always equals the trials that ran.

    Args:
        cfg: the rerun's config (local paths absolute).
        exp_dir: the sweep folder.
        store: storage handle.
        restorable: Tune holds a sweep in ``exp_dir`` that it would restore.

    Returns:
        True when the sweep resumes (saved config equal up to ``RERUN_FREE_KEYS``), False when it starts.

    Raises:
        SweepError: one line naming the changed keys and the two ways forward.
    """
    saved_uri = storage.join(exp_dir, SWEEP_CONFIG)
    if not restorable or not store.exists(saved_uri):
        return False
    saved = parse_config(yaml.safe_load(store.read_bytes(saved_uri)) or {}, (), saved_uri)
    diff = changed_keys(saved, cfg)
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
        raise SweepError(f"sweep {exp_dir} already ran with another config ({shown}{more}): set a new tune.name "
                         f"to start a new sweep, or rerun with its saved config {saved_uri} to resume it")
    return True
