"""Hyperparameter sweeps with Ray Tune: ``loss.alpha`` x ``train.lr`` x ``model.backbone`` (REFERENCE §5).

    run_sweep(cfg)                                    driver (``dncut tune``, ``jobs/sweep.py``)
      -> check_sweep(cfg)                            every error before any trial starts
      -> Tuner(train_trial, param_space={alpha, lr, backbone}, ASHA on tune.metric)
           or Tuner.restore(<sweep dir>) when an interrupted sweep of that name exists
         train_trial(params)                        one Tune trial = one Ray Train run
           cfg.with_overrides({loss.alpha, train.lr, model.backbone, run_name, output_dir})
           build_trainer(trial_cfg, callbacks=[TuneReportCallback()]).fit()
      -> trials.csv / trials.md   one row per trial, read from its run's own records: config,
                                  status, steps run, final/best validation, paths
      -> val_iou_vs_alpha.png     final validation IoU against alpha (best over lr), one line per backbone
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

ASHA never stops a trial at its last report (its export follows that report). A stopped trial's
Train run ends with its trial's actor (the Train controller is owned by it); it cannot run ahead
of Tune by more than the reports waiting in Ray's one-slot queues (worker -> controller -> trial),
so it may record a step or two past the report ASHA stopped it on: the table shows the run's last
step (``dncut.tune.results``). A trial killed
by ASHA leaves its workers' placement group behind when Ray Train's own cleaner cannot reach
the dashboard; ``ReleaseStoppedTrials`` removes it (by the id its rank 0 recorded). Tables and statuses: ``dncut.tune.results``.

Modules: ``space`` (the sweep folder, a trial's config, concurrency, the checks before any trial,
the rerun rule), ``trial`` (the Tune function of one trial, ASHA, the search space, the placement
group release), ``sweep`` (the driver), ``results`` (rows, tables, the plot).
"""

from dncut.tune.space import (FINAL_METRICS, PLACEMENT_GROUP_FILE, RUNS_DIR, SWEEP_CONFIG, SweepError, SweepResults,
                              changed_keys, check_rerun, check_sweep, grid_size, max_concurrent_trials, sweep_dir,
                              trial_config)
from dncut.tune.sweep import evaluate_best, restorable, run_sweep
from dncut.tune.trial import FinishingASHA, ReleaseStoppedTrials, release_placement_group, train_trial

__all__ = ["FINAL_METRICS", "PLACEMENT_GROUP_FILE", "RUNS_DIR", "SWEEP_CONFIG", "SweepError", "SweepResults",
           "changed_keys", "check_rerun", "check_sweep", "grid_size", "max_concurrent_trials", "sweep_dir",
           "trial_config", "evaluate_best", "restorable", "run_sweep", "FinishingASHA", "ReleaseStoppedTrials",
           "release_placement_group", "train_trial"]
