"""Driver memory of the evaluation job against the number of images.

    flock /tmp/dncut-ray.lock nice -n 5 .venv/bin/python bench/eval_driver_memory.py --sizes 1000 10000 50000
    # the code of another commit, e.g. before the change (a git worktree, not a stash):
    git worktree add /tmp/dncut-before <commit>
    flock /tmp/dncut-ray.lock nice -n 5 .venv/bin/python bench/eval_driver_memory.py --code /tmp/dncut-before \
        --sizes 1000 10000 --repeats 1 --key before

Each run of a size is a fresh Python process with its own local Ray (``--cpus`` logical CPUs):
``dncut.eval.jobs.evaluate_saliency`` on ``N`` generated ``--side`` px images with random masks
(backbone ``vit_tiny_test``, random weights, method ``simple``, ``eval.image_size = --side``,
``eval.batch_size = --batch-size``, one inference actor, no examples). A thread samples the driver
process's own ``/proc/self/status`` (``VmRSS``) and Arrow's memory pool
(``pyarrow.total_allocated_bytes``) every ``--interval`` s; the Ray workers are other processes and
are not counted. Reported per run: the driver's RSS before the
job (after ``ray.init`` and listing the inputs), its peak during the job (sampled) and ``VmHWM``
(kernel peak), their difference (growth), wall time. The same for ``RssAnon`` (private heap) and
``RssShmem`` (object-store pages the driver touched), whose sum with ``RssFile`` is ``VmRSS``.

Steps: each run also keeps the peak and last value of every field per step of the job (``phases``:
``saliency_records``, ``run_pipeline``, ``write_report`` of ``dncut.eval.jobs``, and what runs after
each: ``after write_report`` is the gallery), to tell which step sets the peak.

Repeats: the peak of one run moves by 5-20 MiB from run to run (start-up: libraries, Ray's threads;
which step peaks), and 10 MiB at 1k moves a slope over 1k / 10k / 50k by ~0.14 MiB per 1,000. So each size runs
``--repeats`` times (one count for every size, or one per size; default 3, 3 and 2 for the default
sizes: 11 min 20 s on the 2-core box, a 50k run ~3.5 min), the sizes interleaved round by round
(a drift of the machine's load spreads over every size), and each size reports the MEDIAN of its
runs per field; the least-squares slopes in MiB per 1,000 images are those of the medians. Target:
<= 2 MiB per 1,000. Every run is kept in the JSON (``runs``).

Writes ``bench/results/eval_driver_memory.json`` (each bench under ``--key``; other keys are kept).
Findings: docs/operations.md ("Evaluation driver memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "eval_driver_memory.json"


FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
"""``/proc/self/status`` fields sampled: VmRSS = RssAnon (the driver's private heap) + RssFile (mapped
files: libraries) + RssShmem (shared memory the driver touched: pages of Ray's object store, which the
object store owns and reuses, not the driver)."""


def _status_kib(field: str) -> int:
    return _status()[field]


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in FIELDS or name == "VmHWM":
            out[name] = int(value.split()[0])
    return out


def make_images(root: Path, n: int, side: int) -> tuple[Path, Path]:
    """``n`` random ``side`` px RGB JPEGs and binary PNG masks (a random rectangle) under ``root``."""
    from PIL import Image

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(images / f"{i:06d}.jpg")
        mask = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side // 2, 2)
        mask[y:y + side // 2, x:x + side // 2] = 255
        Image.fromarray(mask).save(masks / f"{i:06d}.png")
    return images, masks


def one_size(n: int, side: int, cpus: int, interval: float, batch_size: int = 64) -> dict:
    """Run one size in this process (the driver) and measure it."""
    import ray

    import dncut
    from dncut.config import Config
    from dncut.eval.jobs import evaluate_saliency

    work = Path(tempfile.mkdtemp(prefix=f"dncut_drvmem_{n}_"))
    images, masks = make_images(work, n, side)
    ray.init(num_cpus=cpus, logging_level="WARNING", include_dashboard=False)
    cfg = Config().with_overrides({"model.backbone": "vit_tiny_test", "model.pretrained": False,
                                   "eval.image_size": side, "eval.batch_size": batch_size, "eval.num_actors": 1,
                                   "eval.gpus_per_actor": 0, "eval.examples": 0, "ncut.solver": "eigh"})
    import pyarrow as pa

    from dncut.eval import jobs

    before = _status()
    arrow_before = pa.total_allocated_bytes()
    peak, stop = dict(before, arrow=arrow_before), threading.Event()
    phase = ["start"]
    phases: dict[str, dict] = {}  # per phase: peak and last value of each field, KiB (arrow: bytes)

    def sample() -> None:
        while not stop.is_set():
            now = dict(_status(), arrow=pa.total_allocated_bytes())
            for field, value in now.items():
                peak[field] = max(peak[field], value)
            mine = phases.setdefault(phase[0], {"peak": dict(now), "end": now})
            mine["peak"] = {k: max(v, mine["peak"][k]) for k, v in now.items()}
            mine["end"] = now
            time.sleep(interval)

    def marked(name: str, fn):  # the job's steps, by their public names in dncut.eval.jobs
        def run(*a, **k):
            phase[0] = name
            try:
                return fn(*a, **k)
            finally:
                phase[0] = f"after {name}"
        return run

    for name in ("saliency_records", "run_pipeline", "write_report"):
        setattr(jobs, name, marked(name, getattr(jobs, name)))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    summary = evaluate_saliency(str(images), str(masks), "vit_tiny_test", None, "simple", False, str(work / "out"),
                                cfg=cfg)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    ray.shutdown()
    run = summary["runs"][0]
    assert run["n_images"] == n, run
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1),
            "driver_rss_before_mib": mib(before["VmRSS"]), "driver_rss_peak_mib": mib(peak["VmRSS"]),
            "driver_vmhwm_mib": mib(_status_kib("VmHWM")), "driver_growth_mib": mib(peak["VmRSS"] - before["VmRSS"]),
            "driver_anon_before_mib": mib(before["RssAnon"]), "driver_anon_peak_mib": mib(peak["RssAnon"]),
            "driver_anon_growth_mib": mib(peak["RssAnon"] - before["RssAnon"]),
            "driver_shmem_peak_mib": mib(peak["RssShmem"]), "driver_file_peak_mib": mib(peak["RssFile"]),
            "arrow_before_mib": round(arrow_before / 2**20, 1), "arrow_peak_mib": round(peak["arrow"] / 2**20, 1),
            "phases": {name: {f"{when}_{field}_mib": round(v / (2**20 if field == "arrow" else 1024), 1)
                              for when in ("peak", "end") for field, v in p[when].items() if field != "VmHWM"}
                       for name, p in phases.items()},
            "n_failed": run["n_failed"], "dncut": str(Path(dncut.__file__).parent)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``ys`` against ``xs`` in units per 1,000 ``xs``."""
    if len(xs) < 2:
        return None
    return round(float(np.polyfit(np.asarray(xs) / 1000.0, ys, 1)[0]), 2)


def medians(runs: list[dict]) -> dict:
    """The runs of one size -> one row: the median of each numeric field (``n_failed`` must agree),
    with ``repeats`` and the peaks of every run (``driver_rss_peak_runs_mib``)."""
    out = {"images": runs[0]["images"], "repeats": len(runs),
           "driver_rss_peak_runs_mib": [r["driver_rss_peak_mib"] for r in runs]}
    for field, value in runs[0].items():
        if field in out or field == "repeat" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[field] = round(float(np.median([r[field] for r in runs])), 1)
    failed = {r["n_failed"] for r in runs}
    if len(failed) != 1:
        raise RuntimeError(f"{runs[0]['images']} images: the runs disagree on n_failed: {sorted(failed)}")
    out["n_failed"] = failed.pop()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--repeats", type=int, nargs="+", default=None,
                        help="runs per size: one count for all sizes or one per size (default 3 each, 2 at 50k+)")
    parser.add_argument("--side", type=int, default=32, help="image side, px (a multiple of the patch, 8)")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of each local Ray")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, s")
    parser.add_argument("--code", default=None, help="a checkout whose dncut to measure (PYTHONPATH)")
    parser.add_argument("--key", default="after", help="key of this bench in the JSON")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="eval.batch_size (also the records per block, up to dncut.eval.streamed.MAX_RECORD_BLOCKS)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(one_size(args.one, args.side, args.cpus, args.interval, args.batch_size)), flush=True)
        return {}
    repeats = args.repeats or [2 if n >= 50_000 else 3 for n in args.sizes]
    if len(repeats) == 1:
        repeats = repeats * len(args.sizes)
    if len(repeats) != len(args.sizes) or min(repeats) < 1:
        parser.error(f"--repeats: one count >= 1, or one per size ({len(args.sizes)}); got {repeats}")
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = str(Path(args.code).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    for round_ in range(max(repeats)):  # round by round: every size once per round
        for n, count in zip(args.sizes, repeats):
            if round_ >= count:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--side", str(args.side), "--cpus",
                                  str(args.cpus), "--interval", str(args.interval), "--batch-size",
                                  str(args.batch_size)], env=env, check=True,
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
            row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            row["repeat"] = round_
            print(json.dumps(row), flush=True)
            runs[n].append(row)
    rows = [medians(runs[n]) for n in args.sizes]
    xs = [r["images"] for r in rows]
    result = {"machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB",
              "settings": {"side": args.side, "cpus": args.cpus, "backbone": "vit_tiny_test", "method": "simple",
                           "batch_size": args.batch_size, "num_actors": 1, "repeats": dict(zip(map(str, args.sizes), repeats))},
              "sizes": rows,
              "slope_peak_mib_per_1k": slope(xs, [r["driver_rss_peak_mib"] for r in rows]),
              "slope_growth_mib_per_1k": slope(xs, [r["driver_growth_mib"] for r in rows]),
              "slope_anon_peak_mib_per_1k": slope(xs, [r["driver_anon_peak_mib"] for r in rows]),
              "slope_shmem_peak_mib_per_1k": slope(xs, [r["driver_shmem_peak_mib"] for r in rows]),
              "slope_arrow_peak_mib_per_1k": slope(xs, [r["arrow_peak_mib"] for r in rows]),
              "runs": [r for n in args.sizes for r in runs[n]]}
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored[args.key] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("slope_")}))
    return result


if __name__ == "__main__":
    main()
