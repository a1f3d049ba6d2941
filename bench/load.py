"""Load bench: memory of the evaluation job against the number of images, and of a long training run.

    flock /tmp/dncut-ray.lock nice -n 5 .venv/bin/python bench/load.py        # both parts, ~15 min on 2 cores
    .venv/bin/python bench/load.py --parts train --steps 3000 --key train_3000_steps
    .venv/bin/python bench/load.py --parts train --worker-env MALLOC_ARENA_MAX=2 --key train_arena2

Writes ``bench/results/load.json`` (each part under its key; a rerun of one part keeps the others).
Findings: docs/operations.md ("Memory").

``eval``   ``run_evaluation`` (``configs/eval/smoke.yaml``: vit_tiny_test, simple + tokencut, one
           inference actor) on ``kind: scenes`` datasets of ``--limits`` generated images (default
           250, 500, 1000, 2000), each in a fresh local Ray (4 logical CPUs). A thread samples every
           ``--interval`` s the driver and every process under it (GCS, raylet, workers, actors): RSS
           and PSS (``psutil.memory_full_info``; PSS splits shared pages). Reported per size: wall
           time, images/s, the driver's peak RSS, the largest Ray worker's peak RSS (and which one),
           the peak of the summed PSS, and the slope of each against the number of images.
``train``  ``dncut train`` (``configs/train/smoke.yaml``, ``train.max_steps=--steps``, default 1000,
           ``data.crop_size=--crop``, default 32; checkpoint every 250, log every 10, no intermediate
           validation); the RayTrainWorker's RSS sampled from outside (psutil) with the step
           (``metrics.jsonl``), and its parts (``/proc/<pid>/status``: RssAnon = private heap,
           RssShmem = the object store's shared pages it touched, RssFile). Reported: RSS at step 100,
           before the last step and at the end (after the last validation and export), least-squares
           slopes in MiB per 1000 steps over the training steps 100 <= step < --steps, over their later
           half and per window, the driver's too. Settings to compare: ``--set KEY=VALUE`` (config
           overrides after the bench's own), ``--worker-env KEY=VALUE`` (environment of every Ray
           worker), ``--object-store-mib``, and ``--key`` (the JSON key to store the run under).
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


def bench_train(steps: int, interval: float, workdir: Path, crop: int = 32,
                overrides: tuple[str, ...] = ()) -> dict:
    import ray
    from ray._private import state

    from dncut.config import load_config
    from dncut.tracking import read_history
    from dncut.train import fit

    cfg = load_config(str(ROOT / "configs/train/smoke.yaml"),
                      [f"output_dir={workdir / 'train'}", "run_name=load_train", f"train.max_steps={steps}",
                       "train.checkpoint_every=250", "train.log_every=10", "train.val_every=null",
                       "data.val_scenes=2", "tracking.tensorboard=false", f"data.crop_size={crop}", *overrides])
    run = Path(cfg.run_dir)
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
            "overrides": list(overrides),
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
            "samples": samples[:: max(1, len(samples) // 200)]}


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
    p.add_argument("--parts", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    p.add_argument("--limits", nargs="+", type=int, default=[250, 500, 1000, 2000])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--crop", type=int, default=32, help="train crop size (smoke: 64; 32 = 4x4 tokens, 4x faster)")
    p.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra environment of the Ray workers (e.g. MALLOC_ARENA_MAX=2)")
    p.add_argument("--object-store-mib", type=int, default=None,
                   help="Ray's object store size (default: Ray's, 30%% of memory)")
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
        result[key] = {"meta": meta, **bench_train(args.steps, max(args.interval, 1.0), workdir, args.crop,
                                                      tuple(args.overrides))}
        print(json.dumps({k: v for k, v in result[key].items() if k != "samples"}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
