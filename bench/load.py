"""Load bench: memory of the evaluation job against the number of images, and of a long training run.

``eval``   ``run_evaluation`` (``configs/eval/smoke.yaml``: vit_tiny_test, simple + tokencut, one
           inference actor) on ``kind: scenes`` datasets of ``--limits`` generated images (default
           250, 500, 1000, 2000), each in a fresh local Ray (4 logical CPUs). A thread samples every
           ``--interval`` s the driver and every process under it (the Ray processes the driver
           started: GCS, raylet, workers, actors): RSS and PSS (``psutil.memory_full_info``; PSS
           splits shared pages, so PSS sums do not count the object store's shared memory once
           per process). Reported per size: wall time, images/s, the driver's peak RSS, each Ray
           worker process's peak RSS (max over processes, and which one), the peak of the summed
           PSS of all processes, and the slope of each against the number of images.
``train``  ``dncut train`` (``configs/train/smoke.yaml``, ``train.max_steps=--steps``, default
           1000, ``data.crop_size=--crop``, default 32 (4 x 4 tokens: a 1000-step run fits in minutes
           on 2 shared cores); checkpoint every 250, log every 10, no intermediate validation); the
           RayTrainWorker's RSS sampled from outside (psutil) with the step (``metrics.jsonl``), and
           its parts (``/proc/<pid>/status``: RssAnon = private heap, RssShmem = the object store's
           shared pages it touched, RssFile). Reported: RSS at step 100, before the last step and at
           the end (after the last validation and export), least-squares slopes (MiB per 1000 steps)
           over the training steps 100 <= step < --steps and over their later half, the driver's
           too. ``--set KEY=VALUE`` (train only: config overrides after the bench's own, e.g.
           ``train.checkpoint_every=100000``; not the keys it sets from ``--steps`` / ``--crop``),
           ``--worker-env KEY=VALUE`` (e.g. ``MALLOC_ARENA_MAX=2``), ``--object-store-mib`` and
           ``--key`` (the JSON key) compare settings; ``--traced`` runs the worker's loop under
           tracemalloc and adds its largest Python allocation growths from step 100 to 10 steps before
           the end. ``--malloc-probe`` runs a thread inside the Train worker (``_probed_loop``) that
           samples every 0.25 s glibc malloc's own counters (``mallinfo2``: live bytes, bytes held,
           free bytes held), what Arrow's memory pool has allocated, RssAnon and the thread count,
           and compares ``/proc/self/smaps`` at step 100 with 10-60 steps before the end (the mappings
           whose RSS grew most: which allocator or shared mapping the growth is in) and the threads'
           names; ``--malloc-trim`` also calls ``malloc_trim(0)`` and Arrow's ``release_unused()``
           after each sample (does the growth go back once the allocators return their free memory?);
           ``--no-release`` stops the loop's own ``release_freed_memory`` after each report.

``step``   the same training step (``dncut.train.train_one_step``, same config and crop) in this
           process, without Ray: four fixed batches of ``ViewMaker`` rows cycled for ``--steps``
           steps; RSS every 50 steps, the slope over steps >= 100 and the largest Python
           allocation growths (tracemalloc) between step 100 and the end. Against ``train``, it
           says whether a growth of the Ray Train worker is dncut's step or the Ray machinery
           around it (the data iterator, ``ray.train.report``).

``ray_loop`` (Ray) the Ray machinery of ``train`` without dncut's step, one Ray Train worker each,
           ``--steps`` steps: ``data`` iterates the training dataset (``train_dataset`` + the
           worker's ``_batches``, smoke config, ``--crop``) and does nothing with the batches;
           ``report`` reads no data and calls ``ray.train.report`` every 10 steps (as ``train``
           logs), a short sleep a step. The worker's RSS sampled from outside with the step it
           writes to a file; slope over steps >= 100 as ``train``.

Writes ``bench/results/load.json``.

    flock /tmp/dncut-ray.lock nice -n 5 .venv/bin/python bench/load.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


class Sampler:
    """Samples the RSS / PSS of this process and every process under it, every ``interval`` s."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.me = interval, psutil.Process()
        self.samples: list[dict] = []
        self.peak_rss: dict[int, tuple[str, float]] = {}  # pid -> (title, peak RSS MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            rec = {"t": t, "driver_rss": self.me.memory_info().rss / MIB, "pss_sum": 0.0, "workers_rss_sum": 0.0}
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    full = p.memory_full_info()
                    title = " ".join(p.cmdline())[:80] if p.pid != self.me.pid else "driver"
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss = full.rss / MIB
                rec["pss_sum"] += full.pss / MIB
                if title.startswith("ray::"):
                    rec["workers_rss_sum"] += rss
                if rss > self.peak_rss.get(p.pid, ("", 0.0))[1]:
                    self.peak_rss[p.pid] = (title, rss)
            self.samples.append(rec)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def summary(self) -> dict:
        workers = {pid: v for pid, v in self.peak_rss.items() if v[0].startswith("ray::")}
        top = max(workers.items(), key=lambda kv: kv[1][1]) if workers else (None, ("", 0.0))
        return {"samples": len(self.samples),
                "driver_peak_rss_mib": round(max(s["driver_rss"] for s in self.samples), 1),
                "worker_peak_rss_mib": round(top[1][1], 1), "worker_peak_process": top[1][0],
                "worker_processes": len(workers),
                "workers_rss_sum_peak_mib": round(max(s["workers_rss_sum"] for s in self.samples), 1),
                "pss_sum_peak_mib": round(max(s["pss_sum"] for s in self.samples), 1),
                "per_process_peak_rss_mib": sorted(((v[0], round(v[1], 1)) for v in workers.values()),
                                                   key=lambda x: -x[1])[:8]}


WORKER_ENV: dict[str, str] = {}  # --worker-env: extra environment of every Ray worker process
OBJECT_STORE: dict[str, int] = {}  # --object-store-mib: {"object_store_memory": bytes}


def start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **WORKER_ENV}}, **OBJECT_STORE)


def rss_parts(pid: int) -> dict[str, float]:
    """``RssAnon`` (heap, stacks), ``RssFile`` (mapped files: libraries) and ``RssShmem`` (shared memory:
    Ray's object store pages this process touched) of ``/proc/<pid>/status``, MiB."""
    parts = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key] = round(int(value.split()[0]) / 1024, 1)
    return parts


def slope(xs, ys) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0]) if len(xs) > 1 else float("nan")


def bench_eval(limits: list[int], interval: float, workdir: Path) -> dict:
    import ray

    from dncut.config import load_config
    from dncut.eval.jobs import run_evaluation

    runs = []
    for n in limits:
        cfg = load_config(str(ROOT / "configs/eval/smoke.yaml"),
                          [f"output_dir={workdir / 'eval'}", f"run_name=load_{n}", f"eval.datasets.0.limit={n}",
                           "eval.examples=0", "data.val_scenes=4"])
        start_ray()
        try:
            with Sampler(interval) as sampler:
                t0 = time.monotonic()
                summary = run_evaluation(cfg)
                wall = time.monotonic() - t0
        finally:
            ray.shutdown()
        import pyarrow.parquet as pq

        table = pq.read_table(next((workdir / "eval").rglob(f"load_{n}/**/per_image.parquet")))
        run = {"images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 2),
               "rows": table.num_rows, "failed_rows": int(sum(s != "ok" for s in table.column("status").to_pylist())),
               **sampler.summary()}
        print(json.dumps({k: v for k, v in run.items() if k != "per_process_peak_rss_mib"}), flush=True)
        runs.append(run)
        del summary
    xs = [r["images"] for r in runs]
    fit = {f"{k}_slope_mib_per_1000_images": round(1000 * slope(xs, [r[k] for r in runs]), 2)
           for k in ("driver_peak_rss_mib", "worker_peak_rss_mib", "pss_sum_peak_mib")}
    return {"runs": runs, **fit}


def last_logged_step(metrics: Path) -> int | None:
    """The step of the last line of a run's ``metrics.jsonl`` (0 before the first), read from the
    file's end; None while that line is being written."""
    if not metrics.exists():
        return 0
    with open(metrics, "rb") as handle:
        handle.seek(max(0, metrics.stat().st_size - 4096))
        lines = handle.read().decode(errors="replace").strip().splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError):
        return None


def _traced_loop(loop_config: dict) -> None:
    """``dncut.train.train_loop_per_worker`` with tracemalloc on (``--traced``): Python allocations of the
    Train worker at step 100 against 10 steps before the end (a thread watches ``metrics.jsonl``; the
    last step's validation and export stay out), to ``traced.json``."""
    import tracemalloc

    import dncut.train as train
    from dncut.config import Config
    from dncut.tracking import read_history

    cfg, total = Config.model_validate(loop_config["config"]), int(loop_config["total_steps"])
    first: dict = {}
    last: dict = {}
    done = threading.Event()

    def watch() -> None:
        for at, into in ((100, first), (total - 10, last)):
            while not done.wait(0.2):
                history = read_history(train.run_dir(cfg))
                if history and history[-1]["step"] >= at:
                    into.update(step=history[-1]["step"], snapshot=tracemalloc.take_snapshot())
                    break

    tracemalloc.start(8)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        train.train_loop_per_worker(loop_config)
    finally:
        done.set()
        thread.join()
        out = {"from_step": first.get("step"), "to_step": last.get("step")}
        if "snapshot" in first and "snapshot" in last:
            for group in ("lineno", "filename"):
                diff = last["snapshot"].compare_to(first["snapshot"], group)
                out[f"top_by_{group}"] = [{"where": str(d.traceback[0]), "kib": round(d.size_diff / 1024, 1),
                                           "blocks": d.count_diff} for d in diff[:10]]
            out["total_growth_kib"] = round(sum(d.size_diff for d in diff) / 1024, 1)
        tracemalloc.stop()
        Path(os.environ["DNCUT_LOAD_TRACED_OUT"]).write_text(json.dumps(out, indent=1))


def _probed_loop(loop_config: dict) -> None:
    """``dncut.train.train_loop_per_worker`` with a probe thread (``--malloc-probe``): every 0.25 s it appends
    to ``DNCUT_LOAD_PROBE_OUT`` (JSON lines) the step (``metrics.jsonl``), the worker's RssAnon and thread
    count (``/proc/self/status``) and glibc malloc's counters (``mallinfo2``, glibc >= 2.33, summed over all
    arenas, MiB): ``malloc_in_use`` (live chunks: uordblks + hblkhd), ``malloc_held`` (what malloc has from
    the kernel: arena + hblkhd) and ``malloc_free_held`` (free chunks it keeps: fordblks), and what Arrow's
    default memory pool has allocated (``arrow_in_use``). With ``DNCUT_LOAD_MALLOC_TRIM=1``
    (``--malloc-trim``) it then calls ``malloc_trim(0)`` and Arrow's ``release_unused()``, which hand the
    free memory glibc and Arrow's pool keep back to the kernel, and records RssAnon after them."""
    import ctypes

    import pyarrow

    import dncut.train as train
    from dncut.config import Config

    class MallInfo2(ctypes.Structure):  # struct mallinfo2, man 3 mallinfo2
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    if os.environ.get("DNCUT_LOAD_NO_RELEASE") == "1":  # --no-release: the loop's report() looks it up per call
        train.release_freed_memory = lambda: False
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        raise RuntimeError("--malloc-probe needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    trim = os.environ.get("DNCUT_LOAD_MALLOC_TRIM") == "1"
    metrics = Path(train.run_dir(Config.model_validate(loop_config["config"]))) / "metrics.jsonl"
    done = threading.Event()

    def status() -> dict:
        with open("/proc/self/status") as handle:
            rows = dict(line.split(":", 1) for line in handle if ":" in line)
        return {"RssAnon": round(int(rows["RssAnon"].split()[0]) / 1024, 2), "threads": int(rows["Threads"])}

    def mappings() -> dict[str, dict]:
        """RSS (KiB) of each mapping of ``/proc/self/smaps``, keyed by its start address (a mapping
        that grows in place, such as ``[heap]``, keeps its key), with its range and path."""
        maps, key = {}, None
        with open("/proc/self/smaps") as handle:
            for line in handle:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    key = head[0].split("-")[0]
                    maps[key] = {"range": head[0], "path": " ".join(head[5:]) or "[anon]", "rss_kib": 0,
                                 "anon_kib": 0}
                elif head[0] in ("Rss:", "Anonymous:"):
                    maps[key]["rss_kib" if head[0] == "Rss:" else "anon_kib"] = int(head[1])
        return maps

    def thread_names() -> dict[str, int]:
        """How many of this process's threads carry each name (``/proc/self/task/*/comm``)."""
        names: dict[str, int] = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
            except OSError:  # exited meanwhile
                continue
            names[name] = names.get(name, 0) + 1
        for thread in threading.enumerate():  # Python's own names (threads started from Python)
            name = f"python: {thread.name.rstrip('0123456789_')}"
            names[name] = names.get(name, 0) + 1
        return names

    def growth(first: dict, last: dict) -> list[dict]:
        """The 12 mappings whose RSS grew most (new mappings count from 0)."""
        grew = [{"range": v["range"], "path": v["path"], "rss_kib": v["rss_kib"], "anon_kib": v["anon_kib"],
                 "grew_kib": v["rss_kib"] - first.get(k, {}).get("rss_kib", 0)} for k, v in last.items()]
        return sorted(grew, key=lambda g: -g["grew_kib"])[:12]

    total = int(loop_config["total_steps"])
    snaps: dict = {}

    def probe() -> None:
        with open(os.environ["DNCUT_LOAD_PROBE_OUT"], "a") as out:
            while not done.wait(0.25):
                if (step := last_logged_step(metrics)) is None:
                    continue
                if step >= 100 and "first" not in snaps:
                    snaps.update(first=mappings(), first_step=step, first_threads=thread_names())
                if step >= 100 and step < total - 10 and step - snaps.get("last_step", 0) >= 50:
                    snaps.update(last=mappings(), last_step=step, last_threads=thread_names())
                m = libc.mallinfo2()
                rec = {"step": step, **status(), "malloc_in_use": round((m.uordblks + m.hblkhd) / MIB, 2),
                       "malloc_held": round((m.arena + m.hblkhd) / MIB, 2),
                       "malloc_free_held": round(m.fordblks / MIB, 2),
                       "arrow_in_use": round(pyarrow.default_memory_pool().bytes_allocated() / MIB, 2)}
                if trim:
                    libc.malloc_trim(0)
                    pyarrow.default_memory_pool().release_unused()
                    rec["RssAnon_after_trim"] = status()["RssAnon"]
                out.write(json.dumps(rec) + "\n")
                out.flush()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        train.train_loop_per_worker(loop_config)
    finally:
        done.set()
        thread.join()
        if "first" in snaps:
            Path(os.environ["DNCUT_LOAD_PROBE_OUT"] + ".smaps.json").write_text(json.dumps(
                {"from_step": snaps["first_step"], "to_step": snaps["last_step"],
                 "top_rss_growth": growth(snaps["first"], snaps["last"]),
                 "thread_names": {"first": snaps["first_threads"], "last": snaps["last_threads"]}}, indent=1))


def bench_train(steps: int, interval: float, workdir: Path, crop: int = 32, traced: bool = False,
                overrides: tuple[str, ...] = (), probe: bool = False, trim: bool = False,
                no_release: bool = False) -> dict:
    import ray
    from ray._private import state

    import dncut.train
    from dncut.config import load_config
    from dncut.tracking import read_history
    from dncut.train import fit, run_dir

    cfg = load_config(str(ROOT / "configs/train/smoke.yaml"),
                      [f"output_dir={workdir / 'train'}", "run_name=load_train", f"train.max_steps={steps}",
                       "train.checkpoint_every=250", "train.log_every=10", "train.val_every=null",
                       "data.val_scenes=2", "tracking.tensorboard=false", f"data.crop_size={crop}", *overrides])
    run = Path(run_dir(cfg))
    traced_out = workdir / "traced.json"
    real_loop = dncut.train.train_loop_per_worker
    if traced:  # build_trainer hands this function to the workers; they call the real loop inside it
        WORKER_ENV["DNCUT_LOAD_TRACED_OUT"] = str(traced_out)
        dncut.train.train_loop_per_worker = _traced_loop
    probe_out = workdir / "probe.jsonl"
    if no_release:
        probe = True
    if probe or trim:  # the probe thread samples malloc's counters (and trims) inside the worker
        WORKER_ENV.update(DNCUT_LOAD_PROBE_OUT=str(probe_out), DNCUT_LOAD_MALLOC_TRIM=str(int(trim)),
                          DNCUT_LOAD_NO_RELEASE=str(int(no_release)))
        dncut.train.train_loop_per_worker = _probed_loop
    start_ray()
    samples: list[dict] = []
    outcome: dict = {}
    try:
        thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
        t0 = time.monotonic()
        thread.start()
        me, worker = psutil.Process(), None
        while thread.is_alive():
            if worker is None:
                pids = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
                        if a["ActorClassName"] == "RayTrainWorker" and a.get("Pid")]
                worker = psutil.Process(pids[0]) if pids else None
            step = last_logged_step(run / "metrics.jsonl")
            if step is None:  # a line being written
                step = samples[-1]["step"] if samples else 0
            try:
                rec = {"t": round(time.monotonic() - t0, 1), "step": step,
                       "driver_rss_mib": round(me.memory_info().rss / MIB, 1),
                       "worker_rss_mib": round(worker.memory_info().rss / MIB, 1) if worker else None,
                       "worker_pss_mib": round(worker.memory_full_info().pss / MIB, 1) if worker else None,
                       **(rss_parts(worker.pid) if worker else {})}
            except psutil.Error:
                worker = None
                continue
            samples.append(rec)
            time.sleep(interval)
        wall = time.monotonic() - t0
    finally:
        ray.shutdown()
        for name in ("DNCUT_LOAD_TRACED_OUT", "DNCUT_LOAD_PROBE_OUT", "DNCUT_LOAD_MALLOC_TRIM", "DNCUT_LOAD_NO_RELEASE"):
            WORKER_ENV.pop(name, None)
        dncut.train.train_loop_per_worker = real_loop
    final = int(outcome["result"].metrics["step"]) if "result" in outcome else None
    history = [m["step"] for m in read_history(str(run))]
    # training steps only: the last step's validation and export (a one-off allocation) is reported apart
    tail = [s for s in samples if 100 <= s["step"] < steps and s["worker_rss_mib"] is not None]
    second = [s for s in tail if s["step"] >= (100 + steps) / 2]
    window = max(1000, steps // 6)  # steps per window of worker_slopes_by_window
    keys = {"rss": "worker_rss_mib", "pss": "worker_pss_mib", "RssAnon": "RssAnon", "RssFile": "RssFile",
            "RssShmem": "RssShmem"}

    def per_1000(rows: list[dict], key: str) -> float:
        return round(1000 * slope([r["step"] for r in rows], [r[key] for r in rows]), 2)

    def at(step: int, key: str):
        near = [s for s in samples if s[key] is not None and s["step"] >= step]
        return near[0][key] if near else None

    return {"steps": steps, "crop_size": crop, "final_step": final, "wall_s": round(wall, 1),
            "steps_per_s": round(steps / wall, 2), "reports": len(history), "worker_env": WORKER_ENV,
            "overrides": list(overrides), "loop_releases_freed_memory": not no_release,
            "object_store_mib": OBJECT_STORE.get("object_store_memory", 0) // MIB or "Ray's default",
            "note": "slopes over the training steps 100 <= step < steps (the last step's validation and "
                    "export are the end_of_run figure); _second_half: over the later half of them. RssShmem: "
                    "pages of Ray's object store (shared memory) the worker touched, bounded by its size",
            "worker_rss_at_step_100_mib": at(100, "worker_rss_mib"),
            "worker_rss_before_last_step_mib": tail[-1]["worker_rss_mib"] if tail else None,
            "worker_rss_end_of_run_mib": max((s["worker_rss_mib"] for s in samples if s["step"] >= steps
                                              and s["worker_rss_mib"] is not None), default=None),
            **{f"worker_{name}_slope_mib_per_1000_steps": per_1000(tail, key) for name, key in keys.items()
               if tail and tail[0].get(key) is not None},
            **{f"worker_{name}_slope_second_half_mib_per_1000_steps": per_1000(second, key)
               for name, key in keys.items() if second and second[0].get(key) is not None},
            "worker_slopes_by_window_mib_per_1000_steps": {  # does the growth slow down (a heap settling)?
                f"{lo}-{lo + window}": {name: per_1000(rows, key) for name, key in keys.items()
                                        if rows[0].get(key) is not None}
                for lo in range(0, steps, window)
                for rows in [[s for s in tail if lo <= s["step"] < lo + window]] if len(rows) > 2},
            "driver_rss_at_step_100_mib": at(100, "driver_rss_mib"),
            "driver_rss_before_last_step_mib": tail[-1]["driver_rss_mib"] if tail else None,
            "driver_rss_slope_mib_per_1000_steps": per_1000(tail, "driver_rss_mib"),
            **({"worker_python_growth": json.loads(traced_out.read_text()) if traced_out.exists() else None}
               if traced else {}),
            **({"worker_malloc": probe_summary(probe_out, steps, per_1000)} if probe or trim else {}),
            "samples": samples[:: max(1, len(samples) // 200)]}


def probe_summary(path: Path, steps: int, per_1000) -> dict:
    """Slopes (MiB per 1000 steps, steps 100 <= step < steps) of ``_probed_loop``'s records, and their first
    and last values there."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed worker
            continue
    tail = [r for r in rows if 100 <= r["step"] < steps]
    if len(tail) < 2:
        return {"error": f"{len(tail)} probe records in steps 100-{steps - 1} ({path})"}
    keys = [k for k in tail[0] if k != "step"]
    smaps = Path(str(path) + ".smaps.json")
    return {"records": len(tail), **{f"{k}_slope_mib_per_1000_steps": per_1000(tail, k) for k in keys if k != "threads"},
            "first": tail[0], "last": tail[-1],
            "smaps_growth": json.loads(smaps.read_text()) if smaps.exists() else None,
            "samples": tail[:: max(1, len(tail) // 100)]}


def bench_step(steps: int, workdir: Path, crop: int = 32) -> dict:
    import gc
    import tracemalloc

    import psutil
    import torch

    from dncut.config import load_config
    from dncut.data.pipeline import ViewMaker, file_key
    from dncut.data.scenes import make_scene
    from dncut.train import LoopState, build_loss, build_model, build_optimizer, train_one_step

    torch.set_num_threads(1)  # as a worker with scaling.cpus_per_worker = 1
    cfg = load_config(str(ROOT / "configs/train/smoke.yaml"), [f"data.crop_size={crop}", "train.val_every=null"])
    maker, b = ViewMaker(cfg), cfg.train.batch_size
    folder = workdir / "step_scenes"
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for k in range(4):
        rows = []
        for i in range(k * b, (k + 1) * b):
            make_scene(i, size=96)[0].save(folder / f"{i}.jpg")
            rows.append(maker({"uri": str(folder / f"{i}.jpg"), "epoch": 0, "key": file_key(str(i))}))
        batches.append({key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]
                        if not isinstance(rows[0][key], str)})  # as iter_torch_batches collates them
    model, criterion = build_model(cfg), build_loss(cfg)
    optimizer, state = build_optimizer(model, cfg), LoopState()
    me, samples, t0 = psutil.Process(), [], time.monotonic()
    warm = min(100, steps // 2)  # RSS and allocations are compared from this step on
    for i in range(steps + 1):
        if i == warm:
            gc.collect()
            tracemalloc.start(10)
            first = tracemalloc.take_snapshot()
        if i % 50 == 0:
            samples.append({"step": i, "rss_mib": round(me.memory_info().rss / MIB, 2)})
        if i < steps:
            train_one_step(model, criterion, optimizer, batches[i % 4], cfg.train.effective_lr(), state, cfg,
                           torch.device("cpu"))
    gc.collect()
    growth = tracemalloc.take_snapshot().compare_to(first, "lineno")[:5]
    tracemalloc.stop()
    tail = [s for s in samples if s["step"] >= warm] or samples[-1:]
    return {"steps": steps, "crop_size": crop, "wall_s": round(time.monotonic() - t0, 1),
            "note": "RSS measured with tracemalloc on from the first compared step: an upper bound",
            "nan_steps": int(state.counters["nan_steps"]),
            "rss_at_first_compared_step_mib": tail[0]["rss_mib"], "first_compared_step": warm,
            "rss_at_last_step_mib": tail[-1]["rss_mib"],
            "rss_slope_mib_per_1000_steps": round(1000 * slope([s["step"] for s in tail], [s["rss_mib"] for s in tail]), 2),
            "python_growth_top": [{"where": str(g.traceback[0]), "kib": round(g.size_diff / 1024, 1)} for g in growth],
            "samples": samples}


def _ray_loop(config: dict) -> None:
    """Ray Train loop of the ``ray_loop`` part: the data iterator alone, or the reports alone."""
    import ray.train
    import torch

    from dncut.train import _batches

    step_file = Path(config["step_file"])
    if config["mode"] == "data":
        batches = _batches(ray.train.get_dataset_shard("train"), config["batch_size"], 0, torch.device("cpu"))
        for step, _ in enumerate(batches, 1):
            if step % 10 == 0:
                step_file.write_text(str(step))
            if step >= config["steps"]:
                break
    else:
        for step in range(1, config["steps"] + 1):
            time.sleep(0.005)
            if step % 10 == 0:
                ray.train.report({"step": step, "loss": 0.5, "lr": 1e-4})
                step_file.write_text(str(step))


def bench_ray_loop(steps: int, interval: float, workdir: Path, crop: int = 32,
                   modes: tuple[str, ...] = ("data", "report")) -> dict:
    import ray
    import ray.train
    import ray.train.torch
    from ray._private import state

    from dncut.config import load_config
    from dncut.data.pipeline import source_uris, train_data_config, train_dataset

    from dncut.train import REPORT_POLL_S

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))  # paced as dncut.train's runs
    out = {}
    for mode in modes:
        cfg = load_config(str(ROOT / "configs/train/smoke.yaml"), [f"data.crop_size={crop}", f"train.max_steps={steps}"])
        step_file = workdir / f"ray_loop_{mode}.step"
        start_ray()
        samples: list[dict] = []
        try:
            datasets = {"train": train_dataset(cfg, source_uris(cfg), steps)} if mode == "data" else {}
            trainer = ray.train.torch.TorchTrainer(
                _ray_loop, train_loop_config={"mode": mode, "steps": steps, "step_file": str(step_file),
                                              "batch_size": cfg.train.batch_size},
                scaling_config=ray.train.ScalingConfig(num_workers=1), datasets=datasets,
                dataset_config=train_data_config(),
                run_config=ray.train.RunConfig(name=f"ray_loop_{mode}", storage_path=str(workdir / "ray_loop")))
            thread = threading.Thread(target=trainer.fit, daemon=True)
            t0 = time.monotonic()
            thread.start()
            worker = None
            while thread.is_alive():
                if worker is None:
                    pids = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
                            if a["ActorClassName"] == "RayTrainWorker" and a.get("Pid")]
                    worker = psutil.Process(pids[0]) if pids else None
                try:
                    step = int(step_file.read_text()) if step_file.exists() else 0
                    if worker is not None:
                        samples.append({"t": round(time.monotonic() - t0, 1), "step": step,
                                        "worker_rss_mib": round(worker.memory_info().rss / MIB, 1),
                                        **rss_parts(worker.pid)})
                except (psutil.Error, OSError, ValueError):
                    worker = None
                time.sleep(interval)
            wall = time.monotonic() - t0
        finally:
            ray.shutdown()
        tail = [x for x in samples if x["step"] >= 100]
        out[mode] = {"steps": steps, "wall_s": round(wall, 1), "final_step": samples[-1]["step"] if samples else 0,
                     "worker_rss_at_step_100_mib": tail[0]["worker_rss_mib"] if tail else None,
                     "worker_rss_at_last_step_mib": tail[-1]["worker_rss_mib"] if tail else None,
                     "worker_rss_slope_mib_per_1000_steps": round(1000 * slope([x["step"] for x in tail],
                                                                               [x["worker_rss_mib"] for x in tail]), 2),
                     **{f"worker_{k}_slope_mib_per_1000_steps": round(1000 * slope([x["step"] for x in rows],
                                                                                   [x[k] for x in rows]), 2)
                        for k in ("RssAnon", "RssShmem", "RssFile")
                        for rows in [[x for x in tail if k in x]] if len(rows) > 1},  # an exiting worker lacks them
                     "samples": samples[:: max(1, len(samples) // 200)]}
        print(json.dumps({k: v for k, v in out[mode].items() if k != "samples"}), flush=True)
    return out


def dumps(result: dict) -> str:
    """``result`` as indented JSON, each sample (a flat dict) on one line: the file stays readable
    and diffable with thousands of samples."""
    flat, nonce = {}, os.urandom(8).hex()

    def mark(value):
        if isinstance(value, dict):
            if value and all(not isinstance(v, (dict, list)) for v in value.values()) and "step" in value:
                flat[key := f"@@{nonce}:{len(flat)}@@"] = json.dumps(value)
                return key
            return {k: mark(v) for k, v in value.items()}
        return [mark(v) for v in value] if isinstance(value, list) else value

    text = json.dumps(mark(result), indent=1)
    for key, line in flat.items():
        text = text.replace(f'"{key}"', line)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=["eval", "train", "step", "ray_loop"],
                   default=["eval", "train", "step", "ray_loop"])
    p.add_argument("--limits", nargs="+", type=int, default=[250, 500, 1000, 2000])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--crop", type=int, default=32, help="train crop size (smoke: 64; 32 = 4x4 tokens, 4x faster)")
    p.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment of the Ray workers (e.g. MALLOC_ARENA_MAX=2)")
    p.add_argument("--object-store-mib", type=int, default=None,
                   help="Ray's object store size (default: Ray's, 30%% of memory)")
    p.add_argument("--traced", action="store_true",
                   help="train: tracemalloc in the Train worker, its Python allocation growth from step 100 to 10 steps before the end")
    p.add_argument("--malloc-probe", action="store_true",
                   help="train: glibc malloc's counters (mallinfo2), RssAnon and threads sampled inside the Train worker")
    p.add_argument("--malloc-trim", action="store_true",
                   help="train: the probe also calls malloc_trim(0) every 0.25 s (implies --malloc-probe)")
    p.add_argument("--no-release", action="store_true",
                   help="train: the loop does not call release_freed_memory after its reports (implies --malloc-probe)")
    p.add_argument("--ray-loop-modes", nargs="+", choices=["data", "report"], default=["data", "report"],
                   help="ray_loop part: the data iterator alone, the reports alone, or both")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="train: config overrides after the bench's own (e.g. train.checkpoint_every=100000)")
    p.add_argument("--key", default=None, help="store the part under this key (default: the part's name)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = p.parse_args(argv)
    own = ("train.max_steps", "output_dir", "run_name", "data.crop_size")  # set from --steps / --crop
    if args.overrides and "train" not in args.parts:
        p.error("--set applies to the train part only")
    if clash := [kv for kv in args.overrides if kv.split("=", 1)[0] in own]:
        p.error(f"--set {clash}: the bench sets {', '.join(own)} itself (use --steps / --crop)")
    WORKER_ENV.update(kv.split("=", 1) for kv in args.worker_env)
    if args.object_store_mib:
        OBJECT_STORE["object_store_memory"] = args.object_store_mib * MIB
    workdir = Path(tempfile.mkdtemp(prefix="dncut-load-"))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.pop("meta", None)  # each part carries its own (parts are rerun separately)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "host": f"{os.uname().nodename}, {os.cpu_count()} cores",
            "command": " ".join(sys.argv)}
    if "eval" in args.parts:
        result["eval"] = {"meta": meta, **bench_eval(args.limits, args.interval, workdir)}
    if "train" in args.parts:
        key = args.key or "train"
        result[key] = {"meta": meta, **bench_train(args.steps, max(args.interval, 1.0), workdir, args.crop, args.traced,
                                                      tuple(args.overrides), args.malloc_probe, args.malloc_trim,
                                                      args.no_release)}
        print(json.dumps({k: v for k, v in result[key].items() if k != "samples"}), flush=True)
    if "ray_loop" in args.parts:
        parts = bench_ray_loop(args.steps, max(args.interval, 1.0), workdir, args.crop, tuple(args.ray_loop_modes))
        result.setdefault("ray_loop", {}).update({mode: {"meta": meta, **part} for mode, part in parts.items()})
    if "step" in args.parts:
        result["step"] = {"meta": meta, **bench_step(args.steps, workdir, args.crop)}
        print(json.dumps({k: v for k, v in result["step"].items() if k != "samples"}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
