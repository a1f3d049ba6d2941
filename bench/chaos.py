"""Chaos bench: real faults injected at random points of real runs, each trial with its outcome.

Kinds (``--kinds``, default all; ``--trials N`` per kind, default 10 for ``worker_kill``, 3 for the
others):

``worker_kill``      SIGKILL of the RayTrainWorker process at a random step after the first
                     checkpoint (``scaling.max_failures=1``): the run must finish, the restart
                     must continue from the last checkpoint, steps trained twice <= checkpoint_every.
``driver_kill``      ``python -m dncut.cli train ...`` as a subprocess, SIGKILLed at a random step
                     (its local Ray dies with it), then the same command run again: it must
                     resume from the newest checkpoint and finish; steps trained twice <=
                     checkpoint_every.
``s3_reads``         the S3 endpoint (a moto server subprocess) stopped (SIGSTOP) for a few seconds
``s3_uploads``       at the run's first training image request (its request log, polled every 2 ms;
                     one 64-row decode task reads them all) / just before a checkpoint is uploaded
                     to it, then continued (SIGCONT): the run must finish, or stop with
                     a message naming the URI while the newest intact checkpoint stays loadable.
``ckpt_truncate``    after a run, its newest checkpoint's state.pt truncated / its whole folder
``ckpt_delete``      deleted; then the run is continued (max_steps raised): it must resume from the
                     previous intact checkpoint and say so (a WARNING of dncut.train naming the
                     skipped folder: ``dncut.train.checkpoints.resume_point``).
``eval_actor_kill``  SIGKILL of the inference actor (``MapWorker(MapBatches(NCutPredictor))``) at a
                     random moment of the evaluation job (vit_tiny_test with fixed weights from a
                     file): every image must still have exactly one row per method in
                     per_image.parquet (rows lost and duplicated count as lost), each equal (status,
                     IoU) to a clean run's. The recovery is dncut's: the pipeline runs again on the
                     images without all their rows (``reruns``: the WARNING lines of dncut.eval.retry);
                     Ray restarts no actor (``max_restarts=0``; ``ray_restarts`` counts them: 0).
                     ``eval_actor_kill_random_weights``: the same with the smoke
                     config's random weights (``pretrained: false``, no checkpoint; 1 trial).
``sweep_worker_kill`` a 2-trial smoke sweep; one trial's RayTrainWorker SIGKILLed mid-run: that trial
                     resumes (or is ERROR with its reason), the other finishes.
``node_remove``      a two-node ``ray.cluster_utils.Cluster``: the node running the Train worker
                     removed after the first checkpoint; training must restart from the checkpoint
                     on the remaining node and finish.

Every trial is a real run with the smallest configs (``configs/train/smoke.yaml`` and friends,
generated scenes, the random ``vit_tiny_test`` backbone) and returns
``{kind, trial, outcome, survived, steps_lost, rows_lost, wall_s, message, ...}``; ``outcome`` is
``finished`` or ``failed``; ``survived`` is whether the outcome meets the requirement above.
``extra_wall_s`` is the trial's wall time minus a clean run of the same trial without the fault
(one clean run per kind; ``--no-baseline`` skips them).

Outputs: ``bench/results/chaos.json`` (every trial) and ``bench/results/chaos.md`` (kinds x
survived / trials, steps lost max / mean, rows lost, extra wall time).

Ray: in-process kinds start one local Ray (4 logical CPUs, like the tests); ``driver_kill`` starts
its own in the subprocess, ``node_remove`` its own two-node cluster (after shutting the first one
down). Run it alone (``flock /tmp/dncut-ray.lock``) on a shared box.

    flock /tmp/dncut-ray.lock nice -n 5 .venv/bin/python bench/chaos.py --trials 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

TRAIN_SMOKE = str(ROOT / "configs/train/smoke.yaml")
EVAL_SMOKE = str(ROOT / "configs/eval/smoke.yaml")
SWEEP_SMOKE = str(ROOT / "configs/sweep/smoke.yaml")
QUIET = ("train.val_every=null", "data.val_scenes=2", "tracking.tensorboard=false")
"""Validation and TensorBoard are not under test: fewest samples, only at the start and the end."""
CKPT_EVERY = 3
OUTAGE_S = 5.0
RESULTS = ROOT / "bench" / "results"
DEFAULT_TRIALS = {"worker_kill": 10, "eval_actor_kill_random_weights": 1}

log = logging.getLogger("chaos")


# ============================================================================= helpers


def train_config(workdir: Path, *overrides: str):
    from dncut.config import load_config

    return load_config(TRAIN_SMOKE, [*QUIET, f"output_dir={workdir / 'out'}", *overrides])


def _result(kind: str, trial: int, **fields: Any) -> dict[str, Any]:
    out = {"kind": kind, "trial": trial, "outcome": None, "survived": False, "steps_lost": None, "rows_lost": None,
           "wall_s": None, "message": ""}
    out.update(fields)
    return out


def make_recorder(path: Path, hold_at: int | None = None, hold_s: float = 0.0):
    """A ``ray.train.UserCallback`` appending every report (step, checkpoint) and worker failure to ``path``
    (it runs in the Ray Train controller actor; built in a function so cloudpickle ships it by value).

    ``hold_at``: after recording that step's report the controller waits ``hold_s`` seconds, so the
    workers wait in their next ``ray.train.report``: a fault injected meanwhile lands mid-run, however
    fast the steps are."""
    import ray.train

    class Recorder(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            step = int(metrics[0]["step"])
            self._write({"event": "report", "step": step, "t": time.time(),
                         "checkpoint": None if checkpoint is None else checkpoint.path})
            if step == hold_at:
                time.sleep(hold_s)

        def after_exception(self, run_context, worker_exceptions):
            self._write({"event": "failure", "t": time.time(),
                         "errors": [f"{type(e).__name__}: {str(e)[:300]}" for e in worker_exceptions.values()]})

        def _write(self, record: dict) -> None:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return Recorder()


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(events: list[dict]) -> int:
    return max((e["step"] for e in events if e["event"] == "report"), default=0)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, alive: Callable[[], bool] = lambda: True,
             poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not alive():
            raise RuntimeError(f"the run ended while waiting for {what}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def live_actors(class_part: str) -> dict[str, dict]:
    """``{actor id: record}`` of the connected cluster's ALIVE actors whose class name contains
    ``class_part`` (GCS actor table: only this cluster's processes, never another user's)."""
    from ray._private import state

    return {aid: a for aid, a in state.actors(actor_state_name="ALIVE").items()
            if class_part in a["ActorClassName"] and a.get("Pid")}


def sigkill(pid: int, title_part: str) -> None:
    """SIGKILL ``pid`` after checking that its process title names ``title_part``."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    title = " ".join(psutil.Process(pid).cmdline())
    if title_part not in title:
        raise RuntimeError(f"pid {pid} is not a {title_part} process: {title!r}")
    os.kill(pid, signal.SIGKILL)


def run_in_thread(fn: Callable[[], Any]):
    """Start ``fn`` in a daemon thread; returns (thread, outcome dict with ``result`` or ``error``)."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the trial reports it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


class CaptureWarnings(logging.Handler):
    """Collects the WARNING lines of the ``dncut`` loggers of this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("dncut").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("dncut").removeHandler(self)


def ensure_ray(num_cpus: int = 4) -> None:
    """A local Ray like the tests' session fixture (joins one that is already running)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def restart_accounting(events: list[dict]) -> tuple[int | None, int | None, int | None, list[str]]:
    """(last step reported before the first failure, last checkpoint step before it, first step after it, errors)."""
    fail = next((i for i, e in enumerate(events) if e["event"] == "failure"), None)
    if fail is None:
        return None, None, None, []
    before, after = events[:fail], [e for e in events[fail:] if e["event"] == "report"]
    reached = last_step(before)
    ckpt = max((e["step"] for e in before if e["event"] == "report" and e["checkpoint"]), default=0)
    return reached, ckpt, (after[0]["step"] if after else None), events[fail]["errors"]


# ============================================================================= training faults


HOLD_S = 5.0
"""Seconds the controller holds the run at the step a worker is killed after (``make_recorder``)."""


def trial_worker_kill(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 12,
                      workers: int = 1) -> dict:
    """SIGKILL a Train worker while the run waits after a random step past the first checkpoint
    (max_failures=1); the kill lands before the run's end however fast the steps are.

    ``workers``: Train workers of the run (``scaling.num_workers``); one of them is killed and Ray
    Train restarts the whole group. Besides the result fields, ``total``, ``checkpoint_every``,
    ``killed_pid``, ``run_dir`` and ``events`` (the recorder's JSON lines) say what the trial did."""
    import ray

    from dncut.train import build_trainer
    from dncut.train.checkpoints import resume_point

    ensure_ray()
    cfg = train_config(workdir, "run_name=wk", f"train.max_steps={total}", f"train.checkpoint_every={CKPT_EVERY}",
                       "train.keep_checkpoints=2", "scaling.max_failures=1", f"scaling.num_workers={workers}")
    events = workdir / "events.jsonl"
    start = time.monotonic()
    at = rng.randint(CKPT_EVERY, total - 2)  # after the first checkpoint, before the end
    recorder = make_recorder(events, hold_at=at if fault else None, hold_s=HOLD_S)
    thread, outcome = run_in_thread(build_trainer(cfg, callbacks=[recorder]).fit)
    job = ray.get_runtime_context().get_job_id()
    res = _result("worker_kill", trial, total=total, checkpoint_every=CKPT_EVERY, run_dir=cfg.run_dir,
                  events=str(events))
    if fault:
        wait_for(lambda: last_step(read_events(events)) >= at, 300, f"step {at}", thread.is_alive)
        actors = wait_for(lambda: {k: a for k, a in live_actors("RayTrainWorker").items() if a["JobID"] == job},
                          30, "the RayTrainWorker actor", thread.is_alive)
        pid = max(a["Pid"] for a in actors.values())
        sigkill(pid, "RayTrainWorker")
        res["killed_after_step"], res["killed_pid"] = at, pid
        # the newest intact checkpoint once Ray Train has seen the failure: rank 0 may be a step past the
        # held report, and a worker that was not killed may still be uploading a checkpoint when the kill
        # lands; the restarted workers write nothing before they have resumed
        with contextlib.suppress(RuntimeError, TimeoutError):  # none recorded: the accounting says so
            wait_for(lambda: any(e["event"] == "failure" for e in read_events(events)), 120, "the worker failure",
                     thread.is_alive)
        point = resume_point(cfg.run_dir, cfg.storage_handle())
        res["resume_checkpoint"] = point.step if point else 0
    thread.join(timeout=600)
    res["wall_s"] = round(time.monotonic() - start, 2)
    result = outcome.get("result")
    err = outcome.get("error") or (result.error if result is not None else None) or (
        None if not thread.is_alive() else TimeoutError("the run did not end in 600 s"))
    final = int(result.metrics["step"]) if result is not None and result.metrics else None
    evs = read_events(events)
    reached, ckpt, resumed, errors = restart_accounting(evs)
    res.update(outcome="finished" if err is None and final == total else "failed", final_step=final,
               failures=sum(e["event"] == "failure" for e in evs), worker_errors=errors,
               last_checkpoint=ckpt, resumed_at=resumed)
    if not fault:
        res.update(survived=res["outcome"] == "finished", steps_lost=0, message="clean run")
        return res
    if reached is None:
        res["message"] = f"no worker failure recorded ({err or 'run finished'})"
        return res
    ckpt = max(ckpt or 0, res["resume_checkpoint"])  # the newest intact checkpoint when the worker died
    res["last_checkpoint"], res["steps_lost"] = ckpt, max(reached, ckpt) - ckpt
    ok = res["outcome"] == "finished" and resumed == ckpt + 1 and res["steps_lost"] <= CKPT_EVERY
    res["survived"] = ok
    res["message"] = (f"killed after step {reached}; restarted from checkpoint {ckpt} at step {resumed}; "
                      f"finished at {final}" if err is None else f"{type(err).__name__}: {str(err)[:400]}")
    return res


def _cli_train(workdir: Path, overrides: list[str]) -> list[str]:
    sets = [a for o in [*QUIET, f"output_dir={workdir / 'out'}", *overrides] for a in ("--set", o)]
    return [sys.executable, "-m", "dncut.cli", "train", "--config", TRAIN_SMOKE, "-q", *sets]


def _max_history_step(run: Path) -> int:
    from dncut.tracking import read_history

    return max((int(m["step"]) for m in read_history(str(run))), default=0) if run.exists() else 0


def trial_driver_kill(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 24,
                      address: str | None = None) -> dict:
    """``dncut train`` as a subprocess, SIGKILLed at a random step, then run again.

    ``address``: None (the bench) = each driver starts its own local Ray, which dies with it; a
    running cluster's address (GCS ``host:port``) = both drivers join it, as ``ray job submit``
    drivers do, and Ray ends the killed driver's actors while the cluster lives on.
    A smoke step takes ~0.2 s once Ray Train reports every ``REPORT_POLL_S``: the run is 24 steps and
    the kill lands within 0.25 s of the target step, so that it comes before the run's end."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    overrides = ["run_name=dk", f"train.max_steps={total}", f"train.checkpoint_every={CKPT_EVERY}",
                 "train.keep_checkpoints=2"]
    cmd = _cli_train(workdir, overrides) + (["--address", address] if address else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    run = Path(train_config(workdir, *overrides).run_dir)
    res = _result("driver_kill", trial)
    start = time.monotonic()
    logs = open(workdir / "driver1.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if fault:
            wait_for(lambda: list(run.glob("*/checkpoint_*/progress.json")), 300, "the first checkpoint",
                     lambda: proc.poll() is None)
            target = rng.randint(CKPT_EVERY, total - 2)
            wait_for(lambda: _max_history_step(run) >= target, 300, f"step {target}", lambda: proc.poll() is None)
            time.sleep(rng.uniform(0.0, 0.25))
            tree = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)  # the driver (and the local Ray it started, which shares its fate)
            proc.wait(timeout=30)
            time.sleep(2.0)
            leftovers = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            for p in leftovers:  # this driver's own Ray processes only (its process tree)
                with contextlib.suppress(psutil.Error):
                    p.kill()
            res["ray_processes_left_after_kill"] = len(leftovers)
            reached = _max_history_step(run)
            manifest = run / "checkpoints.json"  # dncut's record of the uploaded checkpoints
            res["at_kill"] = {"recorded": [e["step"] for e in json.loads(manifest.read_text())["checkpoints"]]
                              if manifest.exists() else [],
                              "folders": {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())["step"]
                                          for p in run.glob("*/checkpoint_*/progress.json")}}
            res["killed_after_step"] = reached
            logs.close()
            logs = open(workdir / "driver2.log", "wb")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        rc = proc.wait(timeout=600)
    finally:
        logs.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    res["wall_s"] = round(time.monotonic() - start, 2)
    out = (workdir / ("driver2.log" if fault else "driver1.log")).read_text(errors="replace")
    final = None
    with contextlib.suppress(ValueError, KeyError, TypeError):  # the CLI's last output: the result as JSON
        final = int(json.loads(out[out.rindex('{\n  "metrics"'):out.rindex("}") + 1])["metrics"]["step"])
    res.update(outcome="finished" if rc == 0 and final == total else "failed", final_step=final, rc=rc)
    if not fault:
        res.update(survived=res["outcome"] == "finished", steps_lost=0, message="clean run")
        return res
    train_log = (run / "train.log").read_text(errors="replace") if (run / "train.log").exists() else ""
    resumed = [int(line.split("at step")[1].split()[0]) for line in train_log.splitlines()
               if "resumed from" in line and "at step" in line]  # only the rerun resumes
    res["resume_checkpoint"] = resumed[-1] if resumed else 0
    res["steps_lost"] = res["killed_after_step"] - res["resume_checkpoint"]
    res["rerun_warnings"] = [line.strip()[:300] for line in out.splitlines() if "resuming from" in line]
    res["survived"] = res["outcome"] == "finished" and bool(resumed) and res["steps_lost"] <= CKPT_EVERY
    res["message"] = (f"driver killed after step {res['killed_after_step']}; rerun resumed from checkpoint "
                      f"{res['resume_checkpoint']} ({'logged' if resumed else 'NOT resumed'}), finished at {final}"
                      + (f"; {res['rerun_warnings'][0]}" if res["rerun_warnings"] else "")
                      if rc == 0 else f"rerun exited {rc}: {out[-600:]}")
    return res


# ----------------------------------------------------------------------------- S3 outage


_S3: dict[str, Any] = {}


def s3_endpoint():
    """A moto server subprocess of this bench (started once), with 8 JPEGs in a bucket."""
    import s3server

    if "server" not in _S3 or _S3["server"].process.poll() is not None:
        server = s3server.start_moto_server()
        scratch = tempfile.mkdtemp(prefix="chaos-aws-")
        for name in s3server.AWS_VARS_TO_CLEAR:
            os.environ.pop(name, None)
        if not os.environ.get("AWS_ACCESS_KEY_ID"):  # Ray workers inherit these if set before ray.init
            os.environ.update({k: v for k, v in s3server.aws_test_env(server.endpoint_url, scratch).items()
                               if k != "AWS_ENDPOINT_URL"})
        client = server.make_client()
        images = s3server.populate_image_bucket(client, bucket="chaos-images", n_images=8)
        _S3.update(server=server, client=client, images=images, buckets=0)
    return _S3["server"], _S3["client"], _S3["images"]


def _log_since(path: str, offset: int) -> str:
    """The text appended to ``path`` after byte ``offset``."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def _s3_trial(kind: str, workdir: Path, trial: int, rng: random.Random, fault: bool, total: int = 12) -> dict:
    from dncut.train import build_trainer
    from dncut.train.checkpoints import load_state, resume_point

    server, client, images = s3_endpoint()  # first: Ray workers inherit the credentials set here
    ensure_ray()
    _S3["buckets"] += 1
    bucket = f"chaos-out-{os.getpid()}-{_S3['buckets']}"
    client.create_bucket(Bucket=bucket)
    overrides = [f"storage.endpoint_url={server.endpoint_url}", f"train.max_steps={total}",
                 f"train.checkpoint_every={CKPT_EVERY}", "train.keep_checkpoints=2", "scaling.max_failures=1",
                 "run_name=s3"]
    if kind == "s3_reads":
        overrides.append(f"data.train={images}")
    else:
        overrides.append(f"output_dir=s3://{bucket}/runs")
    cfg = train_config(workdir, *overrides)
    events = workdir / "events.jsonl"
    res = _result(kind, trial, outage_s=OUTAGE_S if fault else 0)
    start = time.monotonic()
    trainer = build_trainer(cfg, callbacks=[make_recorder(events)])
    fit_log_size = os.path.getsize(server.log_path)  # the driver's listing is above this offset
    thread, outcome = run_in_thread(trainer.fit)
    stopped = False
    try:
        if fault:
            if kind == "s3_reads":  # at the first image request of the run: its decode task is reading them
                prefix = "/" + images.split("//")[1].rstrip("/") + "/"
                wait_for(lambda: prefix in _log_since(server.log_path, fit_log_size), 300,
                         "the first image read", thread.is_alive, poll=0.002)
                target = last_step(read_events(events))
            else:  # the step before a checkpoint: the outage covers its upload
                target = rng.choice([k - 1 for k in range(2 * CKPT_EVERY, total, CKPT_EVERY)])
                wait_for(lambda: last_step(read_events(events)) >= target, 300, f"step {target}", thread.is_alive)
            log_size = os.path.getsize(server.log_path)
            os.kill(server.process.pid, signal.SIGSTOP)
            stopped = True
            res["outage_after_step"] = target
            time.sleep(OUTAGE_S)
            os.kill(server.process.pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.5)  # the requests that waited in the socket backlog are served first
            held = _log_since(server.log_path, log_size).splitlines()
            wanted = images.split("//")[1].split("/")[0] if kind == "s3_reads" else bucket
            res["requests_held_by_outage"] = sum(wanted in line for line in held)
        thread.join(timeout=600)
    finally:
        if stopped:
            os.kill(server.process.pid, signal.SIGCONT)
    res["wall_s"] = round(time.monotonic() - start, 2)
    result = outcome.get("result")
    err = outcome.get("error") or (result.error if result is not None else None) or (
        None if not thread.is_alive() else TimeoutError("the run did not end in 600 s"))
    final = int(result.metrics["step"]) if result is not None and result.metrics else None
    evs = read_events(events)
    reached, ckpt, resumed, errors = restart_accounting(evs)
    res.update(outcome="finished" if err is None and final == total else "failed", final_step=final,
               failures=sum(e["event"] == "failure" for e in evs), worker_errors=errors)
    res["steps_lost"] = (reached - ckpt) if reached is not None else 0
    store = cfg.storage_handle()
    ref = resume_point(cfg.run_dir, store)
    newest = ref.step if ref else 0
    loadable = ref is not None and int(load_state(ref, store)["step"]) == newest
    res.update(newest_intact_checkpoint=newest, newest_checkpoint_loadable=loadable)
    if res["outcome"] == "finished":
        res["survived"] = res["steps_lost"] <= CKPT_EVERY
        res["message"] = ("clean run" if not fault else
                          f"endpoint stopped {OUTAGE_S:.0f} s after step {res['outage_after_step']}; "
                          + f"{res.get('requests_held_by_outage')} requests to it held until it came back; "
                          + (f"{res['failures']} worker failure(s) ({'; '.join(errors)[:300]}), restarted from "
                             f"checkpoint {ckpt}; " if res["failures"] else "retried in place; ")
                          + f"finished at {final}")
    else:
        text = f"{type(err).__name__}: {err}" if err is not None else f"stopped at step {final}"
        names_uri = any(s in text for s in ("s3://", images.split("//")[1].split("/")[0], bucket))
        res["survived"] = names_uri and loadable
        res["message"] = (f"failed ({'names' if names_uri else 'does NOT name'} the URI; newest intact checkpoint "
                          f"{newest} {'loadable' if loadable else 'NOT loadable'}): {text[:600]}")
    return res


def trial_s3_reads(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 12) -> dict:
    return _s3_trial("s3_reads", workdir, trial, rng, fault, total)


def trial_s3_uploads(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 12) -> dict:
    return _s3_trial("s3_uploads", workdir, trial, rng, fault, total)


# ----------------------------------------------------------------------------- broken checkpoints


def _ckpt_trial(kind: str, workdir: Path, trial: int, rng: random.Random, fault: bool) -> dict:
    """Train to a random length (checkpoint every 2, keep 3), break the newest checkpoint, continue 2 more steps."""
    from dncut.train import PROGRESS_FILE, STATE_FILE, fit

    ensure_ray()
    first_total = rng.randint(4, 7)
    base = ["run_name=ck", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    cfg1 = train_config(workdir, *base, f"train.max_steps={first_total}")
    fit(cfg1)
    run = Path(cfg1.run_dir)
    ckpts = sorted((json.loads((p.parent / PROGRESS_FILE).read_text())["step"], p.parent)
                   for p in run.glob(f"*/checkpoint_*/{PROGRESS_FILE}"))  # run/fit_<time>/checkpoint_<step>_<time>
    newest_step, newest = ckpts[-1]
    previous = ckpts[-2][0] if len(ckpts) > 1 else 0
    res = _result(kind, trial, first_run_steps=first_total, newest_checkpoint=newest_step,
                  previous_checkpoint=previous)
    if fault:
        if kind == "ckpt_truncate":
            state = newest / STATE_FILE
            data = state.read_bytes()
            state.write_bytes(data[:rng.randint(1, len(data) - 1)])
        else:
            import shutil

            shutil.rmtree(newest)
    total = first_total + 2
    cfg2 = train_config(workdir, *base, f"train.max_steps={total}")
    start = time.monotonic()
    with CaptureWarnings() as warnings:
        try:
            result, err = fit(cfg2), None
        except Exception as exc:  # noqa: BLE001 - recorded
            result, err = None, exc
    res["wall_s"] = round(time.monotonic() - start, 2)
    err = err or (result.error if result is not None else None)
    final = int(result.metrics["step"]) if result is not None and result.metrics else None
    train_log = (run / "train.log").read_text(errors="replace")
    resumed = None
    for line in train_log.splitlines():
        if "resumed from" in line and "at step" in line:
            resumed = int(line.split("at step")[1].split()[0])
    expected = previous if fault else newest_step
    said = any(newest.name in w and "resuming from" in w for w in warnings.lines)
    res.update(outcome="finished" if err is None and final == total else "failed", final_step=final,
               resumed_at=resumed, warnings=warnings.lines[-3:])
    res["steps_lost"] = (newest_step - resumed) if resumed is not None else None
    res["survived"] = res["outcome"] == "finished" and resumed == expected and (said or not fault)
    res["message"] = ("clean run" if not fault else
                      f"newest checkpoint (step {newest_step}) {'truncated' if kind == 'ckpt_truncate' else 'deleted'}; "
                      + (f"resumed from step {resumed} ({'said so' if said else 'NOT said'}), finished at {final}"
                         if err is None else f"{type(err).__name__}: {str(err)[:500]}"))
    return res


def trial_ckpt_truncate(workdir: Path, trial: int, rng: random.Random, fault: bool = True) -> dict:
    return _ckpt_trial("ckpt_truncate", workdir, trial, rng, fault)


def trial_ckpt_delete(workdir: Path, trial: int, rng: random.Random, fault: bool = True) -> dict:
    return _ckpt_trial("ckpt_delete", workdir, trial, rng, fault)


# ============================================================================= evaluation


def _eval_job(cfg, kill: bool, rng: random.Random) -> dict:
    """Run the evaluation job in a thread, SIGKILLing its inference actor a random moment after it started
    when ``kill``; returns ``{table (pandas, per_image.parquet) or None, error, killed_after_s, wall_s,
    warnings (dncut's WARNING lines), ray_restarts (Ray restarts of the job's inference actors)}``."""
    import pyarrow.parquet as pq
    import ray
    from ray._private import state

    from dncut.eval.jobs import run_evaluation

    job = ray.get_runtime_context().get_job_id()
    before = {aid for aid, a in state.actors().items() if "NCutPredictor" in a["ActorClassName"]}
    start = time.monotonic()
    capture = CaptureWarnings().__enter__()
    thread, outcome = run_in_thread(lambda: run_evaluation(cfg))
    killed = None
    if kill:
        actors = wait_for(lambda: {k: a for k, a in live_actors("MapWorker").items()
                                   if a["JobID"] == job and "NCutPredictor" in a["ActorClassName"]},
                          300, "the inference actor", thread.is_alive)
        # the actor loads its model, then takes batches; a whole clean job of 160 images takes ~8 s on
        # 2 cores, of which ~2 s after the actor appears: a longer delay would let the job end first
        time.sleep(rng.uniform(0.1, 1.2))
        if thread.is_alive():
            sigkill(next(iter(actors.values()))["Pid"], "MapWorker")
            killed = round(time.monotonic() - start, 2)
    thread.join(timeout=240)  # a clean job of 160 images: ~20 s
    wall = round(time.monotonic() - start, 2)
    capture.__exit__()
    err = outcome.get("error") or (None if not thread.is_alive() else TimeoutError("the job did not end in 240 s"))
    files = list(Path(cfg.output_dir).rglob(f"{cfg.run_name}/**/per_image.parquet"))
    table = pq.read_table(files[0]).to_pandas() if err is None and files else None
    restarts = sum(a["NumRestarts"] for aid, a in state.actors().items()
                   if aid not in before and a["JobID"] == job and "NCutPredictor" in a["ActorClassName"])
    return {"table": table, "error": err, "killed_after_s": killed, "wall_s": wall, "warnings": capture.lines,
            "ray_restarts": restarts}


def trial_eval_actor_kill(workdir: Path, trial: int, rng: random.Random, fault: bool = True, n_images: int = 160,
                          random_weights: bool = False) -> dict:
    """SIGKILL the inference actor at a random moment; count rows per (image, method) in per_image.parquet and
    compare every row with a clean run of the same job (status, IoU).

    The backbone is vit_tiny_test with fixed weights from a checkpoint file, as a real evaluation has
    (pretrained or finetuned). ``random_weights``: the smoke config as it is (``pretrained: false``, no
    checkpoint): every actor process draws its own random weights (torch seeds itself from the OS), so a
    restarted actor is another model and the rows after the restart differ from a clean run."""
    import numpy as np
    import torch

    from dncut.backbones import create_backbone, export_backbone
    from dncut.config import load_config

    ensure_ray()
    weights = []
    if not random_weights:
        ckpt = workdir / "vit_tiny_test.pth"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            export_backbone(create_backbone("vit_tiny_test", pretrained=False), str(ckpt), None)
        weights = [f"eval.checkpoints=[{ckpt}]"]

    def config(name: str):
        return load_config(EVAL_SMOKE, [f"output_dir={workdir / 'eval'}", f"run_name={name}",
                                        f"eval.datasets.0.limit={n_images}", "eval.examples=0", *weights])

    kind = "eval_actor_kill_random_weights" if random_weights else "eval_actor_kill"
    res = _result(kind, trial, images=n_images)
    clean = _eval_job(config("clean"), False, rng) if fault else None
    run = _eval_job(config("killed"), fault, rng)
    res.update(wall_s=run["wall_s"], killed_after_s=run["killed_after_s"], ray_restarts=run["ray_restarts"],
               reruns=[w[:300] for w in run["warnings"] if "runs the pipeline again" in w])
    methods = list(config("x").eval.methods)
    table = run["table"]
    if table is None:
        err = run["error"]
        res.update(outcome="failed", rows_lost=n_images * len(methods),
                   message=f"{type(err).__name__}: {str(err)[:600]}" if err else "no per_image.parquet")
        return res
    counts = table.groupby(["image_id", "method"]).size()
    per_method = {m: set(table.loc[table["method"] == m, "image_id"]) for m in methods}
    missing = sum(n_images - len(per_method[m]) for m in methods)
    duplicated = int((counts - 1).clip(lower=0).sum())
    failed = int((table["status"] != "ok").sum())
    changed = 0
    if clean is not None and clean["table"] is not None:
        a = table.drop_duplicates(["image_id", "method"]).set_index(["image_id", "method"])
        b = clean["table"].set_index(["image_id", "method"]).reindex(a.index)
        same_iou = np.isclose(a["iou"].astype(float), b["iou"].astype(float), rtol=0, atol=1e-6, equal_nan=True)
        changed = int(((a["status"] != b["status"]) | ~same_iou).sum())
        res["clean_failed_rows"] = int((clean["table"]["status"] != "ok").sum())
        res["clean_wall_s"] = clean["wall_s"]
    res.update(rows=len(table), duplicated_rows=duplicated, failed_rows=failed, rows_changed_vs_clean=changed,
               failed_errors=sorted({f"{r.method}: {r.error}"[:200] for r in table.itertuples() if r.status != "ok"})[:3],
               rows_lost=missing + duplicated, outcome="finished")
    res["survived"] = res["rows_lost"] == 0 and changed == 0 and (not fault or res["killed_after_s"] is not None)
    res["message"] = ("clean run" if not fault else
                      f"actor killed {res['killed_after_s']} s into the job; {len(table)} rows for {n_images} images "
                      f"x {len(methods)} methods: {missing} missing, {duplicated} duplicated, {changed} differing from "
                      f"a clean run ({failed} failed rows, clean run: {res.get('clean_failed_rows')})")
    return res


def trial_eval_actor_kill_random_weights(workdir: Path, trial: int, rng: random.Random, fault: bool = True) -> dict:
    return trial_eval_actor_kill(workdir, trial, rng, fault, random_weights=True)


# ============================================================================= sweep


def trial_sweep_worker_kill(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 8) -> dict:
    """A 2-trial sweep (one backbone x 2 alphas, FIFO); one trial's Train worker SIGKILLed after its first checkpoint."""
    import ray

    from dncut.config import load_config
    from dncut.tune import run_sweep

    ensure_ray()
    cfg = load_config(SWEEP_SMOKE, [f"output_dir={workdir / 'sweep'}", "tune.backbones=[vit_tiny_test]",
                                    "tune.asha=null", "tune.evaluate_best=false", f"train.max_steps={total}",
                                    "train.val_every=null", "data.val_scenes=2", "tracking.tensorboard=false",
                                    f"train.checkpoint_every={CKPT_EVERY}", "train.keep_checkpoints=2",
                                    "scaling.max_failures=1"])
    res = _result("sweep_worker_kill", trial)
    job = ray.get_runtime_context().get_job_id()
    start = time.monotonic()
    thread, outcome = run_in_thread(lambda: run_sweep(cfg, evaluate=False))
    runs = workdir / "sweep"
    if fault:
        def progress():
            return {p.parent.name: _max_history_step(p.parent) for p in runs.rglob("runs/*/metrics.jsonl")}

        wait_for(lambda: list(runs.rglob("runs/*/checkpoint_*/progress.json")), 600, "a trial's first checkpoint",
                 thread.is_alive)
        target = rng.randint(CKPT_EVERY, total - 2)
        wait_for(lambda: any(s >= target for s in progress().values()), 300, f"a trial at step {target}",
                 thread.is_alive)
        victims = wait_for(lambda: {k: a for k, a in live_actors("RayTrainWorker").items() if a["JobID"] == job},
                           30, "a RayTrainWorker", thread.is_alive)
        pid = rng.choice([a["Pid"] for a in victims.values()])
        sigkill(pid, "RayTrainWorker")
        res["trial_steps_at_kill"] = progress()
    thread.join(timeout=900)
    res["wall_s"] = round(time.monotonic() - start, 2)
    err = outcome.get("error") or (None if not thread.is_alive() else TimeoutError("the sweep did not end in 900 s"))
    if err is not None:
        res.update(outcome="failed", message=f"{type(err).__name__}: {str(err)[:600]}")
        return res
    rows = outcome["result"].rows
    res["trials"] = [{k: r.get(k) for k in ("trial_id", "alpha", "status", "final_step", "reason")} for r in rows]
    for log_file in runs.rglob("runs/*/train.log"):  # the killed trial: "resumed from ... at step N" in its log,
        reached, resumed, last = 0, None, 0  # or, killed before its first checkpoint, its steps counting from 1 again
        for line in log_file.read_text(errors="replace").splitlines():
            if "resumed from" in line and "at step" in line and resumed is None:
                resumed = int(line.split("at step")[1].split()[0])
            elif " INFO: step " in line:
                step = int(line.split(" INFO: step ")[1].split("/")[0])
                if resumed is None and step <= last:  # a restart from scratch
                    resumed = 0
                if resumed is None:
                    reached = max(reached, step)
                last = step
        if resumed is not None:
            res.update(killed_trial=log_file.parent.name, resumed_at=resumed, steps_lost=reached - resumed)
    done = [r for r in rows if r.get("status") == "TERMINATED" and r.get("final_step") == total]
    errored = [r for r in rows if r.get("status") == "ERROR"]
    res["outcome"] = "finished"
    resumed_ok = not fault or (res.get("resumed_at") is not None and res["steps_lost"] <= CKPT_EVERY)
    res["survived"] = len(rows) == 2 and ((len(done) == 2 and resumed_ok)
                                          or (len(done) == 1 and bool(errored) and bool(errored[0].get("reason"))))
    res["message"] = ("clean run" if not fault else
                      (f"trial {res.get('killed_trial', '?')} resumed at step {res.get('resumed_at')}; " if fault else "")
                      + "; ".join(f"{r.get('trial_id')}: {r.get('status')} at step {r.get('final_step')}"
                                  + (f" ({str(r.get('reason'))[:200]})" if r.get("reason") else "") for r in rows))
    return res


# ============================================================================= two-node cluster


def trial_node_remove(workdir: Path, trial: int, rng: random.Random, fault: bool = True, total: int = 12) -> dict:
    """Head (2 CPUs) + worker node (2 CPUs); the head is held full by a placeholder actor so that the Train
    worker lands on the worker node; after the first checkpoint the placeholder goes and the worker
    node is removed: Ray Train must restart the worker group on the head from the checkpoint."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dncut.train import build_trainer

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    res = _result("node_remove", trial)
    try:
        node = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, logging_level="WARNING",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        cluster.wait_for_nodes()

        @ray.remote(num_cpus=2)
        class Placeholder:
            def ping(self):
                return True

        head_id = ray.get_runtime_context().get_node_id()
        hold = Placeholder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
        ray.get(hold.ping.remote())
        cfg = train_config(workdir, "run_name=nr", f"train.max_steps={total}", f"train.checkpoint_every={CKPT_EVERY}",
                           "train.keep_checkpoints=2", "scaling.max_failures=1")
        events = workdir / "events.jsonl"
        start = time.monotonic()
        thread, outcome = run_in_thread(build_trainer(cfg, callbacks=[make_recorder(events)]).fit)
        job = ray.get_runtime_context().get_job_id()
        workers = wait_for(lambda: {k: a for k, a in live_actors("RayTrainWorker").items() if a["JobID"] == job},
                           300, "the RayTrainWorker actor", thread.is_alive)
        node_of = next(iter(workers.values())).get("Address", {}).get("NodeID")
        res["worker_node"] = "head" if node_of == head_id else "worker" if node_of else "unknown"
        wait_for(lambda: any(e.get("checkpoint") for e in read_events(events)), 300, "the first checkpoint",
                 thread.is_alive)
        ray.kill(hold)
        if fault:
            target = rng.randint(CKPT_EVERY, total - 2)
            wait_for(lambda: last_step(read_events(events)) >= target, 300, f"step {target}", thread.is_alive)
            cluster.remove_node(node, allow_graceful=False)
            res["removed_after_step"] = target
        thread.join(timeout=600)
        res["wall_s"] = round(time.monotonic() - start, 2)
        result = outcome.get("result")
        err = outcome.get("error") or (result.error if result is not None else None) or (
            None if not thread.is_alive() else TimeoutError("the run did not end in 600 s"))
        final = int(result.metrics["step"]) if result is not None and result.metrics else None
        evs = read_events(events)
        reached, ckpt, resumed, errors = restart_accounting(evs)
        res.update(outcome="finished" if err is None and final == total else "failed", final_step=final,
                   worker_errors=errors, last_checkpoint=ckpt, resumed_at=resumed)
        if not fault:
            res.update(survived=res["outcome"] == "finished", steps_lost=0, message="clean run")
        elif reached is None:
            res["message"] = f"no worker failure recorded ({err or 'finished'}; worker on the {res['worker_node']})"
            res["survived"] = res["outcome"] == "finished"
            res["steps_lost"] = 0
        else:
            res["steps_lost"] = reached - ckpt
            res["survived"] = res["outcome"] == "finished" and resumed == ckpt + 1 and res["steps_lost"] <= CKPT_EVERY
            res["message"] = (f"node with the Train worker removed after step {reached}; restarted on the head from "
                              f"checkpoint {ckpt} at step {resumed}; finished at {final}" if err is None
                              else f"{type(err).__name__}: {str(err)[:500]}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return res


# ============================================================================= driver

KINDS: dict[str, Callable[..., dict]] = {
    "worker_kill": trial_worker_kill,
    "driver_kill": trial_driver_kill,
    "s3_reads": trial_s3_reads,
    "s3_uploads": trial_s3_uploads,
    "ckpt_truncate": trial_ckpt_truncate,
    "ckpt_delete": trial_ckpt_delete,
    "eval_actor_kill": trial_eval_actor_kill,
    "eval_actor_kill_random_weights": trial_eval_actor_kill_random_weights,
    "sweep_worker_kill": trial_sweep_worker_kill,
    "node_remove": trial_node_remove,
}
OWN_CLUSTER = ("node_remove",)  # runs last, after the in-process Ray is shut down


def run_trial(kind: str, trial: int, seed: int, fault: bool = True, keep: bool = False) -> dict:
    rng = random.Random(f"{seed}-{kind}-{trial}-{fault}")
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{kind}-{trial}-"))
    try:
        res = KINDS[kind](workdir, trial, rng, fault=fault)
    except Exception as exc:  # noqa: BLE001 - the harness itself failed: recorded, not survived
        res = _result(kind, trial, outcome="failed", message=f"harness: {type(exc).__name__}: {str(exc)[:500]}")
    res["fault"] = fault
    if not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        res["workdir"] = str(workdir)
    return res


def summarise(trials: list[dict], baselines: dict[str, float]) -> list[dict]:
    rows = []
    for kind in KINDS:
        ts = [t for t in trials if t["kind"] == kind and t.get("fault", True)]
        if not ts:
            continue
        steps = [t["steps_lost"] for t in ts if t.get("steps_lost") is not None]
        rows_lost = [t["rows_lost"] for t in ts if t.get("rows_lost") is not None]
        walls = [t["wall_s"] for t in ts if t.get("wall_s") is not None]
        base = baselines.get(kind)
        rows.append({"kind": kind, "survived": sum(bool(t["survived"]) for t in ts), "trials": len(ts),
                     "finished": sum(t["outcome"] == "finished" for t in ts),
                     "steps_lost_max": max(steps) if steps else None,
                     "steps_lost_mean": round(statistics.mean(steps), 2) if steps else None,
                     "rows_lost": sum(rows_lost) if rows_lost else None,
                     "wall_s_mean": round(statistics.mean(walls), 1) if walls else None,
                     "clean_wall_s": base,
                     "extra_wall_s_mean": round(statistics.mean(walls) - base, 1) if walls and base else None})
    return rows


def markdown(summary: list[dict], meta: dict) -> str:
    def f(x):
        return "-" if x is None else str(x)

    lines = [f"# Chaos bench ({meta['when']}, {meta['host']})", "",
             f"checkpoint_every = {CKPT_EVERY}; S3 outage {OUTAGE_S:.0f} s; seed {meta['seed']}; "
             f"total {meta['total_s']:.0f} s", "",
             "| fault | survived / trials | finished | steps lost max / mean | rows lost | wall s (mean) | clean s | extra s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['kind']} | {r['survived']} / {r['trials']} | {r['finished']} | "
                     f"{f(r['steps_lost_max'])} / {f(r['steps_lost_mean'])} | {f(r['rows_lost'])} | "
                     f"{f(r['wall_s_mean'])} | {f(r['clean_wall_s'])} | {f(r['extra_wall_s_mean'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--trials", type=int, default=None, help="per kind (default: 10 for worker_kill, 3 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the clean run per kind")
    p.add_argument("--out", default=str(RESULTS), help="folder for chaos.json / chaos.md")
    p.add_argument("--keep", action="store_true", help="keep the trials' run folders")
    p.add_argument("--merge", action="store_true", help="keep the other kinds' trials of an existing chaos.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("dncut", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kinds = [k for k in args.kinds if k not in OWN_CLUSTER] + [k for k in args.kinds if k in OWN_CLUSTER]
    t0 = time.monotonic()
    if any(k.startswith("s3_") for k in kinds):
        s3_endpoint()  # before Ray starts: its workers inherit the (fake) credentials
    trials, baselines = [], {}
    for kind in kinds:
        n = args.trials or DEFAULT_TRIALS.get(kind, 3)
        if not args.no_baseline:
            clean = run_trial(kind, 0, args.seed, fault=False, keep=args.keep)
            trials.append(clean)
            baselines[kind] = clean["wall_s"]
            log.info("%s clean: %s %.1f s %s", kind, clean["outcome"], clean["wall_s"] or -1, clean["message"][:200])
        for i in range(n):
            res = run_trial(kind, i, args.seed, keep=args.keep)
            trials.append(res)
            log.info("%s %d: %s survived=%s steps_lost=%s rows_lost=%s %.1f s | %s", kind, i, res["outcome"],
                     res["survived"], res["steps_lost"], res["rows_lost"], res["wall_s"] or -1, res["message"][:300])
    if "server" in _S3:
        _S3["server"].stop()
    out = Path(args.out)
    runs = [{"kinds": kinds, "seconds": round(time.monotonic() - t0, 1), "command": " ".join(sys.argv)}]
    if args.merge and (out / "chaos.json").exists():
        old = json.loads((out / "chaos.json").read_text())
        trials = [t for t in old["trials"] if t["kind"] not in kinds] + trials
        baselines = {**{r["kind"]: r["clean_wall_s"] for r in old["summary"] if r["kind"] not in kinds}, **baselines}
        runs = old["meta"].get("runs", []) + runs
    trials.sort(key=lambda t: list(KINDS).index(t["kind"]))
    summary = summarise(trials, baselines)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "host": f"{os.uname().nodename}, {os.cpu_count()} cores",
            "seed": args.seed, "total_s": round(time.monotonic() - t0, 1), "checkpoint_every": CKPT_EVERY,
            "outage_s": OUTAGE_S, "runs": runs}
    meta["total_s"] = round(sum(r["seconds"] for r in runs), 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps({"meta": meta, "summary": summary, "trials": trials}, indent=1,
                                               default=str))
    (out / "chaos.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0 if all(r["survived"] == r["trials"] for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
