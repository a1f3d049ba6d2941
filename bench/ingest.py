"""Ingest bench: images/s of the Ray Data decode + two-view pipeline vs a plain torch DataLoader.

Both sides run the same per-image work, ``dncut.data.pipeline.ViewMaker`` (read bytes, decode,
two DINO-augmented crops of ``--crop-size`` px), over the same URIs, with the same number of
worker processes and the same cores (the whole process tree is pinned with ``sched_setaffinity``
to the first ``cpus`` cores):

* ``ray_data``: ``train_dataset(cfg, uris, steps)`` (seeded epoch rows -> map(ViewMaker), ``decode_cpus=1``)
  on ``ray.init(num_cpus=cpus)``, consumed with ``iter_batches(batch_size)``;
* ``dataloader``: ``torch.utils.data.DataLoader(shuffle=True, num_workers=cpus,
  persistent_workers=True)`` over a map-style dataset calling ``ViewMaker``.

Sources: a local folder and a local moto S3 server (started here, like the tests; the images
are uploaded to it). Each loader makes one cold pass (worker start-up, imports), then
``--rounds`` rounds of one timed pass per loader, alternating so that both see the same
background load; reported: the median images/s over the rounds (and every round), the cold pass,
``ratio = ray_data / dataloader`` (target >= 0.8 on 2 cores) and the 2-over-1-CPU scaling.
The ``machine.loadavg_*`` fields show whether other work shared the cores.

Images: ``--images`` (default the BSDS unlabeled folder); when absent, generated scenes are
written as JPEGs to a temporary folder. Run::

    python bench/ingest.py                              # local + s3, 1 and 2 CPUs
    python bench/ingest.py --sources local --cpus 2 --limit 64

JSON goes to stdout and to ``--out`` (default ``bench/results/ingest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = "/work/shared/data/bsds-unlabeled"
BUCKET = "dncut-bench-images"
SOURCES = ("local", "s3")


# ----------------------------------------------------------------------------- inputs


def image_folder(path: str, limit: int, scratch: str) -> tuple[str, list[str], str]:
    """``(folder, file names, kind)``: the given folder, or ``limit`` generated scenes written as JPEGs."""
    from dncut.storage import IMAGE_SUFFIXES

    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))[:limit]
        if names:
            return path, names, "folder"
    from dncut.data.scenes import make_scene

    folder = os.path.join(scratch, "scenes")
    os.makedirs(folder, exist_ok=True)
    names = []
    for seed in range(limit):
        image, _ = make_scene(seed, size=320)
        names.append(f"scene_{seed:04d}.jpg")
        image.save(os.path.join(folder, names[-1]), quality=90)
    return folder, names, "generated scenes"


def start_s3(folder: str, names: list[str], scratch: str):
    """A moto server (tests/s3server.py) holding ``names``; the AWS test env is set in ``os.environ``."""
    sys.path.insert(0, str(REPO / "tests"))
    import s3server

    server = s3server.start_moto_server()
    for name in s3server.AWS_VARS_TO_CLEAR:
        os.environ.pop(name, None)
    os.environ.update(s3server.aws_test_env(server.endpoint_url, scratch))
    server.client.create_bucket(Bucket=BUCKET)
    for name in names:
        with open(os.path.join(folder, name), "rb") as handle:
            server.client.put_object(Bucket=BUCKET, Key=f"images/{name}", Body=handle.read())
    return server


def bench_config(source: str, crop_size: int):
    """The run config the training pipeline would get for this source (defaults otherwise)."""
    from dncut.config import parse_config

    return parse_config({}, {"data.train": source, "data.crop_size": crop_size, "data.decode_cpus": 1.0})


# ----------------------------------------------------------------------------- the two loaders


class UriDataset(torch.utils.data.Dataset):
    """Map-style dataset: index -> ``ViewMaker`` row (the same function Ray Data maps)."""

    def __init__(self, uris: list[str], maker) -> None:
        self.uris = uris
        self.maker = maker

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> dict:
        return self.maker({"uri": self.uris[index], "epoch": 0, "index": index})


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def timed_pass(make_iter) -> tuple[float, int, int]:
    """One full pass: ``(seconds, rows, rows with ok=False)``."""
    t0 = time.perf_counter()
    rows, bad = _drain(make_iter())
    return time.perf_counter() - t0, rows, bad


def _drain(batches) -> tuple[int, int]:
    rows = bad = 0
    for batch in batches:
        ok = batch["ok"]
        rows += len(ok)
        bad += int(len(ok) - (ok.sum() if hasattr(ok, "sum") else sum(ok)))
    return rows, bad


def dataloader_passes(cfg, uris: list[str], cpus: int, batch_size: int):
    """``make_iter`` for a DataLoader with ``cpus`` persistent worker processes (one torch thread each)."""
    from dncut.data.pipeline import ViewMaker

    loader = torch.utils.data.DataLoader(
        UriDataset(uris, ViewMaker(cfg)), batch_size=batch_size, shuffle=True, num_workers=cpus,
        persistent_workers=True, worker_init_fn=_one_thread, prefetch_factor=2)
    return lambda: iter(loader)


def ray_data_passes(cfg, uris: list[str], batch_size: int):
    """``make_iter`` for the training pipeline: one epoch of seeded rows per pass."""
    from dncut.data.pipeline import train_dataset

    ds = train_dataset(cfg, uris, total_steps=len(uris) // cfg.train.batch_size).limit(len(uris))
    return lambda: ds.iter_batches(batch_size=batch_size, batch_format="numpy")


def compare(loaders: dict, rounds: int) -> dict[str, dict[str, Any]]:
    """A cold pass of each loader, then ``rounds`` rounds of one timed pass each, alternating.

    Alternating passes see the same background load (the machine may be shared); the median
    over rounds is reported.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, make_iter in loaders.items():
        cold, rows, bad = timed_pass(make_iter)
        out[name] = {"cold_s": round(cold, 2), "rows": rows, "bad_rows": bad, "img_s_rounds": []}
    for _ in range(rounds):
        for name, make_iter in loaders.items():
            seconds, rows, bad = timed_pass(make_iter)
            out[name]["img_s_rounds"].append(round(rows / seconds, 2))
            out[name]["bad_rows"] += bad
    for stats in out.values():
        stats["img_s"] = float(statistics.median(stats["img_s_rounds"]))
    return out


# ----------------------------------------------------------------------------- driver


def pin(cpus: int, available: set[int]) -> list[int]:
    """Pin this process (and every child started from now on) to the first ``cpus`` of ``available``."""
    if cpus > len(available):
        raise SystemExit(f"--cpus {cpus}: only {len(available)} cores available")
    cores = sorted(available)[:cpus]
    os.sched_setaffinity(0, cores)
    return cores


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import ray.data

    from dncut.data.pipeline import source_uris

    load_before = [round(x, 2) for x in os.getloadavg()]
    scratch = tempfile.mkdtemp(prefix="dncut-ingest-")
    folder, names, kind = image_folder(args.images, args.limit, scratch)
    server = start_s3(folder, names, scratch) if "s3" in args.sources else None
    roots = {"local": folder, "s3": f"s3://{BUCKET}/images"}
    all_cores = os.sched_getaffinity(0)
    results = []
    try:
        for cpus in args.cpus:
            cores = pin(cpus, all_cores)
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            ray.data.DataContext.get_current().enable_progress_bars = False
            try:
                for source in args.sources:
                    cfg = bench_config(roots[source], args.crop_size)
                    uris = source_uris(cfg)[: args.limit]
                    loaders = {"dataloader": dataloader_passes(cfg, uris, cpus, args.batch_size),
                               "ray_data": ray_data_passes(cfg, uris, args.batch_size)}
                    measured = compare(loaders, args.rounds)
                    dl, rd = measured["dataloader"], measured["ray_data"]
                    del loaders  # stops the DataLoader's worker processes
                    row = {"source": source, "cpus": cpus, "cores": cores, "images": len(uris),
                           "ray_data": rd, "dataloader": dl, "ratio": round(rd["img_s"] / dl["img_s"], 3)}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    results.append(row)
            finally:
                ray.shutdown()
    finally:
        os.sched_setaffinity(0, all_cores)
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    scaling = {}
    for source in args.sources:
        by_cpu = {r["cpus"]: r for r in results if r["source"] == source}
        if 1 in by_cpu and 2 in by_cpu:
            scaling[source] = {name: round(by_cpu[2][name]["img_s"] / by_cpu[1][name]["img_s"], 3)
                               for name in ("ray_data", "dataloader")}
    return {
        "bench": "ingest", "images": {"source": kind, "folder": folder, "count": len(names)},
        "crop_size": args.crop_size, "batch_size": args.batch_size, "rounds": args.rounds,
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "results": results, "scaling_2_over_1_cpu": scaling,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=DEFAULT_IMAGES, help="folder of images (generated scenes when absent)")
    p.add_argument("--limit", type=int, default=128, help="images per pass")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed passes per loader after the cold one (alternating)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = p.parse_args(argv)
    if any(c < 1 for c in args.cpus):
        raise SystemExit(f"--cpus must be >= 1, got {args.cpus}")
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
