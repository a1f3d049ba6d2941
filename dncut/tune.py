"""Hyperparameter sweeps with Ray Tune: ``loss.alpha`` x ``train.lr`` x ``model.backbone`` (REFERENCE §5).

    run_sweep(cfg)                                    driver (``dncut tune``, ``jobs/sweep.py``)
      -> check_sweep(cfg)                            every error before any trial starts
      -> Tuner(train_trial, param_space={alpha, lr, backbone}, ASHA on tune.metric)
           or Tuner.restore(<sweep dir>) when an interrupted sweep of that name exists
         train_trial(params)                        one Tune trial = one Ray Train run
           cfg.with_overrides({loss.alpha, train.lr, model.backbone, run_name, output_dir})
           build_trainer(trial_cfg, callbacks=[TuneReportCallback()]).fit()
      -> trials.csv / trials.md   one row per trial: config, best/final validation, status, paths
      -> val_iou_vs_alpha.png     best validation IoU against alpha, one line per backbone
      -> best_eval/               run_evaluation of the winner's exported backbone (optional)

Layout under the sweep directory ``<tune.storage_path or output_dir/tune>/<tune.name>``
(local or ``s3://``): Tune's own experiment files and trial folders, ``runs/<run_name>/``
for every trial's Ray Train run (checkpoints, ``config.yaml``, ``backbone.pth``,
``final_metrics.json``), the result tables, the plot and ``best_eval/``.

Concurrency rule (``tune.max_concurrent_trials: null``): a trial needs
``num_workers * cpus_per_worker`` CPUs for its Train workers plus at least one CPU
(``max(1, data.decode_cpus)``) for its Ray Data pipeline, and ``num_workers * gpus_per_worker``
GPUs; the trial's Tune driver only waits on the Train controller and reserves 0.01 CPU. At most
``floor(cluster CPUs / per-trial CPUs)`` (and ``floor(GPUs / per-trial GPUs)``) trials run at
once, never fewer than one: a pipeline starved of CPUs hangs at "backpressured". A trial that
could never schedule its data (its workers leave no node with ``data.decode_cpus`` + 0.01 CPUs) is
refused before the sweep starts (``dncut.train.resources``).

Resume: running the same sweep again (same storage path and name) restores it with
``Tuner.restore(..., resume_errored=True)``; finished trials are kept, unfinished and errored
ones continue from their last Ray Train checkpoint (a trial's run name depends only on its
Tune trial id and parameters). A trial whose Train run had already finished when the sweep
was interrupted replays its ``final_metrics.json`` instead of training again.

ASHA never stops a trial at its last report (its export follows that report). A trial killed
by ASHA leaves its workers' placement group behind when Ray Train's own cleaner cannot reach
the dashboard; ``ReleaseStoppedTrials`` removes it (by the id its rank 0 recorded). Tables and statuses: ``dncut.tune_results``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler

from dncut import storage
from dncut.config import Config, ConfigError, LogUniform, config_diff, parse_config
from dncut.train.resources import check_cluster
from dncut.tune_results import (best_trial, format_trials, plot_iou_vs_alpha, sort_rows, trial_row,
                                 trial_run_name, trials_csv)

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


def _grid_values(space: LogUniform | list[float]) -> list[float]:
    """Values to check: the grid itself, or the bounds of a log-uniform range."""
    return [space.low, space.high] if isinstance(space, LogUniform) else list(space)


def grid_size(cfg: Config) -> int:
    """Number of trials: grid points x ``num_samples`` (log-uniform axes count once)."""
    n = len(cfg.tune_backbones()) * cfg.tune.num_samples
    for space in (cfg.tune.alpha, cfg.tune.lr):
        n *= 1 if isinstance(space, LogUniform) else len(space)
    return n


def _check_space(cfg: Config) -> None:
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


def _check_checkpoints(cfg: Config) -> None:
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


def _check_combinations(cfg: Config) -> None:
    """Every (alpha, lr, backbone) grid point (log-uniform bounds) gives a valid config (e.g. the
    crop size is a multiple of every backbone's stride, from ``dncut.backbone_specs``)."""
    base = cfg.model_dump(mode="json")
    for alpha in _grid_values(cfg.tune.alpha):
        for lr in _grid_values(cfg.tune.lr):
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

    _check_space(cfg)
    _check_checkpoints(cfg)
    _check_combinations(cfg)
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


# ----------------------------------------------------------------------------- the trial


def train_trial(params: dict[str, Any], *, base: dict[str, Any], runs_dir: str) -> None:
    """Tune driver function of one trial: build and fit its TorchTrainer.

    Args:
        params: ``{"alpha", "lr", "backbone"}`` sampled by Tune.
        base: the sweep config (``Config.model_dump(mode="json")``), bound with ``tune.with_parameters``.
        runs_dir: ``<sweep dir>/runs``.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dncut.train.driver import build_trainer

    cfg = trial_config(base, params, ray.tune.get_context().get_trial_id(), runs_dir)
    store = cfg.storage_handle()
    final_uri = storage.join(cfg.run_dir, FINAL_METRICS)
    if store.exists(final_uri):  # finished before the sweep was interrupted
        ray.tune.report(json.loads(store.read_bytes(final_uri)))
        return
    result = build_trainer(cfg, callbacks=[TuneReportCallback()],
                           placement_group_file=storage.join(cfg.run_dir, PLACEMENT_GROUP_FILE)).fit()
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    if result.checkpoint is not None:
        metrics["checkpoint_path"] = result.checkpoint.path
    store.write_bytes(final_uri, json.dumps(metrics).encode())


class FinishingASHA(AsyncHyperBandScheduler):
    """ASHA that never stops a trial at its last report, so every trial that reaches the end
    exports its backbone (the export follows the last report)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:  # noqa: D102
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get("step") is not None and result["step"] >= result.get("total_steps", math.inf):
            return self.CONTINUE
        return decision


def release_placement_group(uri: str, store: storage.Storage) -> bool:
    """Remove the placement group whose id (hex) the file ``uri`` holds, unless it is gone already;
    whether one was removed. Public Ray API only (``ray.util.placement_group_table``, ``remove_placement_group``)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not store.exists(uri):
        return False
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(store.read_bytes(uri).decode().strip())))
    if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
        return False
    try:
        remove_placement_group(pg)
    except Exception as exc:  # noqa: BLE001 - removed meanwhile by Ray Train's own cleaner
        log.debug("placement group in %s: %s", uri, exc)
        return False
    return True


class ReleaseStoppedTrials(Callback):
    """Tune callback: the Train workers' placement group of each ended trial is removed.

    Rule: a trial ASHA stops is killed with its Ray Train controller, and the placement group of
    the controller's workers lives as long as the job (Ray Train's own cleaner needs the dashboard's
    state API). Rank 0 of each trial's Train run writes that group's id to
    ``<run dir>/placement_group.txt`` (``PLACEMENT_GROUP_FILE``); every ``interval_s`` for
    ``watch_s`` after a trial ended (a controller killed late may have started another group), and
    at the end of the sweep, the group named there is removed if it still exists.
    """

    def __init__(self, runs_dir: str, store: storage.Storage, interval_s: float = 2.0, watch_s: float = 60.0) -> None:
        self.runs_dir, self.store = runs_dir, store
        self.interval_s, self.watch_s = interval_s, watch_s
        self._ended: dict[str, tuple[float, str]] = {}  # trial id -> (when it ended, its placement group file)
        self._last = 0.0

    def _release(self, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        for trial_id, (ended, uri) in list(self._ended.items()):
            try:
                if release_placement_group(uri, self.store):
                    log.info("released the placement group of stopped trial %s", trial_id)
            except Exception as exc:  # noqa: BLE001 - a sweep never fails for its cleaner
                log.warning("placement group of trial %s (%s): %s", trial_id, uri, exc)
            if now - ended > self.watch_s:
                del self._ended[trial_id]

    def _trial_ended(self, trial) -> None:
        import time

        run_dir = storage.join(self.runs_dir, trial_run_name(trial.trial_id, trial.config))
        self._ended[trial.trial_id] = (time.monotonic(), storage.join(run_dir, PLACEMENT_GROUP_FILE))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:  # noqa: D102
        self._release()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:  # noqa: D102
        self._trial_ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:  # noqa: D102
        self._trial_ended(trial)

    def on_experiment_end(self, trials: list, **info) -> None:  # noqa: D102
        import time

        time.sleep(self.interval_s)  # the last stopped controller may still be exiting
        self._release(force=True)


def build_scheduler(cfg: Config, total_steps: int) -> FinishingASHA | None:
    """ASHA on ``tune.metric`` from ``tune.asha`` (``None`` = FIFO, every trial to the end).

    ``max_t: null`` means ``total_steps + 1``: a run reports at most once per step, so ASHA's
    own stop at ``max_t`` never cuts a trial short.
    """
    a = cfg.tune.asha
    if a is None:
        return None
    return FinishingASHA(time_attr=a.time_attr, grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                         max_t=a.max_t or total_steps + 1)


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: ``alpha`` and ``lr`` (grid or log-uniform), ``backbone`` (grid)."""
    from ray import tune

    def axis(space: LogUniform | list[float]):
        return tune.loguniform(space.low, space.high) if isinstance(space, LogUniform) else tune.grid_search(space)

    return {"alpha": axis(cfg.tune.alpha), "lr": axis(cfg.tune.lr), "backbone": tune.grid_search(cfg.tune_backbones())}


def trial_dirname(trial) -> str:
    """Tune's trial folder: ``trial_<trial id>`` (short: s3 keys and Windows paths stay readable)."""
    return f"trial_{trial.trial_id}"


def evaluate_best(cfg: Config, best: Mapping[str, Any], out_root: str) -> tuple[dict, str]:
    """Run the evaluation job (``cfg.eval``) on the winner's exported backbone.

    Outputs go to ``out_root/best_eval`` (``summary.json``, tables, examples).

    Returns:
        ``(summary, paper-style Markdown table)``.
    """
    from dncut.eval.jobs import run_evaluation
    from dncut.eval.report import format_table

    eval_cfg = parse_config(cfg.model_dump(mode="json"), {
        "run_name": EVAL_RUN, "output_dir": out_root, "model.backbone": best["backbone"],
        "loss.alpha": best["alpha"], "train.lr": best["lr"], "model.pretrained": False, "model.checkpoint": None,
        "eval.backbones": [best["backbone"]], "eval.checkpoints": [best["export"]],
    }, "best trial")
    summary = run_evaluation(eval_cfg)
    return summary, format_table(summary)


# ----------------------------------------------------------------------------- driver


def _tune_statuses(grid) -> list[str | None]:
    """Tune's status of each result's trial (same order), ``None`` where Ray hides it."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None or len(trials) != len(grid):
        return [None] * len(grid)
    return [str(t.status) for t in trials]


def _tune_path(exp_dir: str, store: storage.Storage):
    """``(path, filesystem or None)`` as Ray Tune takes them: a custom filesystem only for S3."""
    fs, fs_path = store.filesystem(exp_dir)
    return fs_path, (fs if storage.is_s3(exp_dir) else None)


def restorable(exp_dir: str, store: storage.Storage) -> bool:
    """Whether ``exp_dir`` holds a sweep Ray Tune would restore (``Tuner.can_restore``)."""
    from ray import tune

    fs_path, custom_fs = _tune_path(exp_dir, store)
    return tune.Tuner.can_restore(fs_path, storage_filesystem=custom_fs)


def _tuner(cfg: Config, trainable, exp_dir: str, total_steps: int, num_trials: int,
           callbacks: Sequence[Any] | None, store: storage.Storage, resume: bool):
    """A new Tuner, or the restored one when ``resume`` (``exp_dir`` holds an interrupted sweep)."""
    import ray
    from ray import tune

    fs_path, custom_fs = _tune_path(exp_dir, store)
    if resume:
        log.info("resuming the sweep in %s (finished trials are kept, errored ones retried)", exp_dir)
        return tune.Tuner.restore(fs_path, trainable=trainable, resume_errored=True, storage_filesystem=custom_fs)
    concurrent = max_concurrent_trials(cfg, ray.cluster_resources(), num_trials)
    log.info("sweep %s: %d trials, at most %d at once, ASHA %s", exp_dir, num_trials, concurrent,
             "on" if cfg.tune.asha else "off")
    parent = fs_path.rstrip("/").rsplit("/", 1)[0]
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    scheduler=build_scheduler(cfg, total_steps), max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname, reuse_actors=False),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=parent, storage_filesystem=custom_fs,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  callbacks=[ReleaseStoppedTrials(storage.join(exp_dir, RUNS_DIR), store), *(callbacks or [])], verbose=1),
    )


def run_sweep(cfg: Config, *, evaluate: bool | None = None, callbacks: Sequence[Any] | None = None) -> SweepResults:
    """Check, run (or resume) the sweep of ``cfg.tune``, then write and print its results.

    Args:
        cfg: the sweep config (``configs/sweep/*.yaml``).
        evaluate: run the evaluation job on the best trial's export; ``None`` = ``tune.evaluate_best``.
        callbacks: extra Ray Tune callbacks (logging, tests); restored with the sweep on resume.

    Returns:
        ``SweepResults``: rows (best first), Markdown table, winner, evaluation and file URIs.

    Raises:
        SweepError, ConfigError, DatasetLayoutError, StorageError: before any trial starts
            (``dncut.train.resources.ResourceError``, a ``ConfigError``: one trial's workers leave no
            CPU for its decode tasks).
    """
    import ray
    from ray import tune

    from dncut.data.pipeline import source_uris

    num_trials = check_sweep(cfg)
    cfg = cfg.with_absolute_paths()
    total_steps = cfg.train.total_steps(len(source_uris(cfg)) if cfg.train.epochs else None)
    store = cfg.storage_handle()
    exp_dir = sweep_dir(cfg)
    runs_dir = storage.join(exp_dir, RUNS_DIR)
    resume = check_rerun(cfg, exp_dir, store, restorable(exp_dir, store))
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    check_cluster(cfg, extra_cpus=DRIVER_CPUS)  # one trial that can never schedule its data: refused here
    if not resume:  # the saved config is the one the trials run with: written once, at the start
        store.write_bytes(storage.join(exp_dir, SWEEP_CONFIG), cfg.to_yaml().encode())  # fails early
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=cfg.model_dump(mode="json"), runs_dir=runs_dir),
        {"cpu": DRIVER_CPUS})
    try:
        grid = _tuner(cfg, trainable, exp_dir, total_steps, num_trials, callbacks, store, resume).fit()
    except Exception:
        log.error("the sweep stopped; run the same command again to resume it (finished trials are kept): %s",
                  exp_dir)
        raise

    statuses = _tune_statuses(grid)
    rows = sort_rows([trial_row(r, runs_dir=runs_dir, metric=cfg.tune.metric, mode=cfg.tune.mode,
                                tune_status=status, store=store)
                      for r, status in zip(grid, statuses)], cfg.tune.mode)
    table = format_trials(rows, metric=cfg.tune.metric, root=exp_dir)
    files = {"csv": storage.join(exp_dir, CSV_FILE), "markdown": storage.join(exp_dir, MD_FILE),
             "plot": storage.join(exp_dir, PLOT_FILE)}
    store.write_bytes(files["csv"], trials_csv(rows).encode())
    store.write_bytes(files["markdown"], (table + "\n").encode())
    store.write_bytes(files["plot"], plot_iou_vs_alpha(rows))
    out = SweepResults(sweep_dir=exp_dir, rows=rows, table=table, best=best_trial(rows, cfg.tune.mode), files=files)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("TERMINATED", "EARLY_STOPPED", "ERROR", "INTERRUPTED")}
    print(f"\nSweep {exp_dir}: {len(rows)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())})\n")
    print(table)
    if counts["INTERRUPTED"]:
        log.warning("the sweep was interrupted: run the same command again to resume it (%s)", exp_dir)
        return out
    if out.best is None:
        log.warning("no trial finished with an export: nothing to evaluate")
        return out
    print(f"\nBest trial {out.best['trial_id']}: {out.best['backbone']} alpha={out.best['alpha']:.3g} "
          f"lr={out.best['lr']:.3g} final {cfg.tune.metric}={out.best['final_metric']:.4f}\n  {out.best['export']}")
    best_md = [f"# Best trial of sweep {cfg.tune.name}", "", format_trials([out.best], metric=cfg.tune.metric,
                                                                             root=exp_dir), ""]
    if cfg.tune.evaluate_best if evaluate is None else evaluate:
        out.eval_summary, out.eval_table = evaluate_best(cfg, out.best, exp_dir)
        files["eval"] = storage.join(exp_dir, EVAL_RUN)
        best_md += ["## Evaluation of its exported backbone", "", out.eval_table, ""]
        print("\n" + out.eval_table)
    files["best"] = storage.join(exp_dir, BEST_FILE)
    store.write_bytes(files["best"], "\n".join(best_md).encode())
    return out

