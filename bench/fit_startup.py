"""Start-up of a training fit: what Ray Train's planning processes unpickle, light against eager.

    flock /tmp/dncut-ray.lock .venv/bin/python bench/fit_startup.py [--rounds 3] [--cpus 4]
    # -> bench/results/fit_startup.json

One local Ray (``--cpus`` logical CPUs, no dashboard, no preemption watcher: as the tests' session),
``configs/train/smoke.yaml`` with 2 steps, no validation. Each round runs one fit of each variant, the
variant that goes first alternating (a warm-up fit first, not counted):

* ``light`` (dncut's code): Ray Train's controller gets ``dncut.train.entry.train_loop_per_worker``
  and the training dataset's row function is a ``dncut.data.deferred.Deferred`` (a name and a dict);
* ``eager``: the same fit with ``dncut.train.worker.train_loop_per_worker`` and a built ``ViewMaker``
  in the plan, as before: the controller, the dataset manager and the split coordinator import
  torch, timm and the model code to unpickle them;
* ``floor``: Ray Train alone, no dncut: a ``TorchTrainer`` on one worker whose loop returns at once,
  no dataset (what every fit costs before the first line of dncut's loop: the controller, placement
  group cleaner, synchronization actor, dataset manager and worker processes starting in turn).

Reported per fit: wall seconds of ``fit()``; per variant the median; ``ratio = eager / light`` and
``floor_share = floor / light``.
Findings: docs/benchmarks.md ("Training start-up").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fit_startup.json"


@contextmanager
def variant(name: str):
    """``light``: dncut as it is; ``eager``: the worker function and a built row function in the plan."""
    import dncut.data.pipeline as pipeline
    import dncut.train.driver as driver
    from dncut.data.deferred import Deferred
    from dncut.train import worker

    saved = driver.train_loop_per_worker, pipeline.Deferred
    if name == "eager":
        driver.train_loop_per_worker = worker.train_loop_per_worker
        pipeline.Deferred = lambda target, config: Deferred(target, config).build()
    try:
        yield
    finally:
        driver.train_loop_per_worker, pipeline.Deferred = saved


def _noop(config) -> None:
    return None


def floor_fit(work: Path, i: int) -> float:
    """One Ray Train fit that trains nothing: 1 worker, no dataset, a plain ``RunConfig``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_noop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(storage_path=str(work), name=f"floor_{i}"))
    start = time.perf_counter()
    trainer.fit()
    return round(time.perf_counter() - start, 2)


def one_fit(name: str, work: Path, i: int) -> float:
    if name == "floor":
        return floor_fit(work, i)
    from dncut.config import load_config
    from dncut.train import fit

    cfg = load_config(str(ROOT / "configs/train/smoke.yaml"),
                      [f"output_dir={work}", f"run_name={name}_{i}", "train.max_steps=2", "train.val_every=null",
                       "tracking.tensorboard=false"])
    with variant(name):
        start = time.perf_counter()
        result = fit(cfg)
        seconds = time.perf_counter() - start
    assert result.metrics["step"] == 2, result.metrics
    return round(seconds, 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    work = Path(tempfile.mkdtemp(prefix="dncut-fit-startup-"))
    one_fit("light", work, -1)  # warm-up: the first fit of a session also starts Ray's worker pool
    fits: dict[str, list[float]] = {"light": [], "eager": [], "floor": []}
    for r in range(args.rounds):
        for name in (("light", "eager", "floor") if r % 2 == 0 else ("floor", "eager", "light")):
            fits[name].append(one_fit(name, work, r))
            print(json.dumps({"round": r, "variant": name, "fit_s": fits[name][-1]}), flush=True)
    ray.shutdown()
    medians = {k: statistics.median(v) for k, v in fits.items()}
    result = {"bench": "fit_startup", "machine": f"{os.cpu_count()} cores", "ray_cpus": args.cpus,
              "config": "configs/train/smoke.yaml, 2 steps, no validation", "fits_s": fits,
              "median_s": medians, "ratio_eager_over_light": round(medians["eager"] / medians["light"], 2),
              "floor_share": round(medians["floor"] / medians["light"], 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_eager_over_light", "floor_share")}))
    return result


if __name__ == "__main__":
    main()
