"""The sweep driver: run (or resume) a sweep, write its tables and plot, evaluate the winner (the
package docstring, ``dncut.tune``)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from dncut import storage
from dncut.config import Config, parse_config
from dncut.train.resources import check_cluster
from dncut.tune.results import best_trial, format_trials, plot_iou_vs_alpha, sort_rows, trial_row, trials_csv
from dncut.tune.space import (BEST_FILE, CSV_FILE, DRIVER_CPUS, EVAL_RUN, MD_FILE, PLOT_FILE, RUNS_DIR, SWEEP_CONFIG,
                              SweepResults, check_rerun, check_sweep, max_concurrent_trials, sweep_dir)
from dncut.tune.trial import ReleaseStoppedTrials, build_scheduler, search_space, train_trial, trial_dirname

log = logging.getLogger("dncut.tune")


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
