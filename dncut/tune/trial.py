"""One trial of a sweep: its Tune function (one Ray Train run), the scheduler, the search space, and
the callback that releases a stopped trial's placement group (the package docstring, ``dncut.tune``)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler

from dncut import storage
from dncut.config import Config, LogUniform
from dncut.tune.results import trial_run_name
from dncut.tune.space import FINAL_METRICS, PLACEMENT_GROUP_FILE, trial_config

log = logging.getLogger("dncut.tune")


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
