"""Ingest bench: the training input's CPU side before and after moving the photometric augmentation
to the device, the device augmentation itself, the bytes per pair, Ray Data against a torch
DataLoader, and the driver's start-up on a large S3 prefix.

Parts (``--parts``, default all):

``cpu``      One process, one torch thread, pinned to one core (``--cpu-core``), the same
             ``--limit`` images (bytes read into memory before timing: file reading is excluded
             from both sides), crop ``--crop-size``:

             * ``old``: the per-pair work of the committed pipeline (``old_cpu_side``): full-size
               ``decode_image``, ``sample_crop_boxes``, ``TF.resized_crop`` (bicubic, antialias) on
               PIL, flips, the PIL photometric chain (colour jitter p 0.8 through ``TF.adjust_*`` in
               a random order, grayscale p 0.2, ``TF.gaussian_blur`` p 1.0 / 0.1, ``TF.solarize``
               p 0 / 0.2) and ``TF.pil_to_tensor``;
             * ``new``: ``ViewMaker.views(row, rng)`` (header size, boxes, JPEG draft decode at the
               smallest DCT scale that serves both crops, two uint8 crops with flips, photometric
               parameters).

             Both sides get an rng seeded the way the pipeline seeds it (``seed, 1, epoch, key``;
             made inside the timed loop, on both sides); the boxes are the rng's first draws, so
             both sides crop the same boxes. ``--rounds`` rounds, each one pass of each side over
             the images, the side that goes first alternating; reported per round and as the
             median: pairs/s (wall), pairs per CPU second (``time.process_time``: robust to other
             work sharing the core) and ``ratio = new / old`` (target >= 6).

``gpu_aug``  ``dncut.photometric.apply`` on one 256-pair batch as ``dncut.train.model_inputs`` runs
             it: two calls of 256 views each (view 1 with its parameters, view 2 with its own), on
             ``--device`` (``cuda`` when asked for and visible, else ``cpu``; on the CPU with
             ``--aug-threads`` torch threads). Views: the ``new`` crops of the images tiled to 256;
             parameters: 256 fresh ``sample_params`` rows per branch. After ``--aug-warmup`` untimed
             batches, ``--aug-repeats`` timed ones (``torch.cuda.synchronize`` before and after each
             on a GPU); reported: ms median (target <= 10 ms on a GPU), and on a GPU the
             host-to-device copy of the uint8 views and parameters from pinned memory.

``bytes``    The numeric columns of one training row (what crosses the object store per pair):
             ``nbytes`` per column and in all, against the old float32 views (2 x 3 x S x S x 4).
             The mean JPEG size is listed too (the decode task reads it from storage itself).

``e2e``      (Ray) ``ray.init(num_cpus=cpus)`` with the process tree pinned to ``cpus`` cores, for
             each of ``--cpus``: the training pipeline, ``train_dataset(cfg, uris, steps)`` for
             ``--e2e-epochs`` epochs (seeded rows -> map ``ViewMaker``, which reads, decodes, crops),
             consumed as ``dncut.train.worker.batches`` does (``iter_torch_batches(batch_size,
             drop_last=True, device="cpu", prefetch_batches=PREFETCH_BATCHES)``, the row order kept
             as ``train_data_config`` keeps it) against ``torch.utils.data.DataLoader(num_workers=cpus,
             persistent_workers=True, pin_memory=False, shuffle=True, drop_last=True)`` over a
             map-style dataset that reads each file's bytes and calls the same ``ViewMaker``
             (default collate). Same images (a scratch folder holding exactly the ``--limit``
             images, or the same files on a local S3 server), same cores, same batch size. The
             device augmentation is left out of the timing on both sides (it runs on the GPU in
             training, not on these cores); ``--e2e-augment`` puts ``model_inputs`` on the consumer
             for both. A cold pass each, then ``--rounds`` alternating timed passes: rows/s median
             and ``ratio = ray_data / dataloader`` (target >= 0.9). Variants of the Ray side, same
             rounds: ``ray_data_reserved`` (Ray Data's default operator resource reservation, which
             ``train_dataset`` turns off) and ``ray_data_<N>_rows_per_block`` for each
             ``--e2e-rows-per-block`` (decode-task sizes other than ``ROWS_PER_BLOCK``).

``startup``  (Ray, local S3 server) ``--startup-objects`` (20,000) copies of a 1-pixel JPEG under
             ``s3://<bucket>/many/``; the driver's time to a training dataset for 2 epochs at batch
             256 (``total_steps = 2 * floor(N / 256)``), lazily (nothing executes):

             * ``rows``: dncut's ``train_dataset``: ``source_uris`` (one listing) + seeded rows
               ``{"uri", "epoch", "key"}`` for every epoch + ``from_items`` + ``map(ViewMaker)``;
             * ``file_reader``: the alternative that was tried and dropped: ``source_uris`` +
               ``read_binary_files(prefix, shuffle=FileShuffleConfig(seed))`` per epoch + ``union``
               (Ray lists the prefix again for each epoch; under ``preserve_order`` the union
               interleaves the epochs' blocks).

             ``--rounds`` alternating rounds, seconds median, with the listing part apart.

Run::

    python bench/ingest.py                                       # all parts (Ray for e2e, startup)
    python bench/ingest.py --parts cpu gpu_aug bytes --limit 32 --rounds 2
    python bench/ingest.py --parts gpu_aug --device cuda
    python bench/ingest.py --parts e2e --cpus 1 2 --sources local s3

JSON goes to stdout and to ``--out`` (default ``bench/results/ingest.json``); machine facts and
the load averages before and after each part say whether other work shared the cores.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = "/work/shared/data/bsds-unlabeled"
BUCKET = "dncut-bench-images"
PARTS = ("cpu", "gpu_aug", "bytes", "e2e", "startup")
SOURCES = ("local", "s3")
AUG_BATCH = 256
STARTUP_BATCH, STARTUP_EPOCHS = 256, 2


# ----------------------------------------------------------------------------- inputs and helpers


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


def read_all(folder: str, names: list[str]) -> list[bytes]:
    return [Path(folder, n).read_bytes() for n in names]


def bench_config(source: str, crop_size: int, batch_size: int = 32, endpoint_url: str | None = None):
    """The run config the training pipeline would get for this source (defaults otherwise).
    ``data.train`` is the folder or S3 prefix itself (``train_dataset`` has Ray list it)."""
    from dncut.config import parse_config

    overrides: dict[str, Any] = {"data.train": source, "data.crop_size": crop_size, "data.decode_cpus": 1.0,
                                 "train.batch_size": batch_size}
    if endpoint_url:
        overrides.update({"storage.endpoint_url": endpoint_url, "storage.region": "us-east-1"})
    return parse_config({}, overrides)


def start_s3(scratch: str):
    """A moto server (bench/s3server.py) with the bench bucket; the AWS test env is set in ``os.environ``."""
    import s3server  # this script's folder is on sys.path

    server = s3server.start_moto_server()
    for name in s3server.AWS_VARS_TO_CLEAR:
        os.environ.pop(name, None)
    os.environ.update(s3server.aws_test_env(server.endpoint_url, scratch))
    server.client.create_bucket(Bucket=BUCKET)
    return server


def upload(server, items: list[tuple[str, bytes]], threads: int = 16) -> None:
    """Put ``(key, body)`` pairs into the bench bucket from a thread pool (a client per thread)."""
    chunks = [items[i::threads] for i in range(threads)]

    def put(chunk: list[tuple[str, bytes]]) -> None:
        client = server.make_client()
        for key, body in chunk:
            client.put_object(Bucket=BUCKET, Key=key, Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, chunks))


def pin(cores: list[int]) -> list[int]:
    """Pin this process (and every child started from now on) to ``cores``."""
    os.sched_setaffinity(0, cores)
    return sorted(cores)


def first_cores(cpus: int, available: set[int]) -> list[int]:
    if cpus > len(available):
        raise SystemExit(f"--cpus {cpus}: only {len(available)} cores available")
    return sorted(available)[:cpus]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": _version("torchvision"), "pillow": _version("pillow"),
            "numpy": np.__version__, "ray": _version("ray"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def median(values: list[float], digits: int = 3) -> float:
    return round(float(statistics.median(values)), digits)


def pair_rng(seed: int, epoch: int, key: int) -> np.random.Generator:
    """The rng the pipeline gives one pair (``ViewMaker.__call__``)."""
    from dncut.data.pipeline import AUGMENT_STREAM

    return np.random.default_rng([seed, AUGMENT_STREAM, epoch, key])


# ----------------------------------------------------------------------------- part cpu: old vs new CPU side


def _old_photometric(view, rng: np.random.Generator, branch: int):
    """The committed PIL chain (``TwoViewTransform._photometric``): same probabilities, factor laws
    and draw order (constants shared with ``dncut.photometric``)."""
    import torchvision.transforms.functional as TF

    from dncut import photometric as ph

    if rng.random() < ph.JITTER_P:
        b, c, s, h = ph.JITTER_STRENGTH
        factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                   rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in rng.permutation(4):
            view = ops[k](view, float(factors[k]))
    if rng.random() < ph.GRAYSCALE_P:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if rng.random() < ph.BLUR_P[branch]:
        sigma = float(rng.uniform(*ph.BLUR_SIGMA))
        kernel = 2 * math.ceil(3 * sigma) + 1
        largest = 2 * ((min(view.size) - 1) // 2) + 1  # odd and < the image side (reflect pad)
        kernel = max(1, min(kernel, largest))
        view = TF.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
    if rng.random() < ph.SOLARIZE_P[branch]:
        view = TF.solarize(view, 128)
    return view


def old_cpu_side(data: bytes, rng: np.random.Generator, *, size: int = 224,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 min_overlap: float = 0.01, min_size: int = 32, flip_p: float = 0.5, max_tries: int = 100) -> dict:
    """One pair the way the committed pipeline made it (``git show HEAD:dncut/views.py``): full-size
    decode, boxes, ``TF.resized_crop`` bicubic antialias on PIL, flips, the PIL photometric chain,
    ``TF.pil_to_tensor``; returned as the committed ``ViewMaker`` row (numpy)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from dncut.data.images import decode_image
    from dncut.views import sample_crop_boxes

    image = decode_image(data, min_size=min_size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    boxes = sample_crop_boxes(image.width, image.height, rng, scale=scale, ratio=ratio,
                              min_overlap=min_overlap, max_tries=max_tries)
    out: dict = {}
    for branch, box in enumerate(boxes):
        flip = bool(rng.random() < flip_p)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        view = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            view = TF.hflip(view)
        view = _old_photometric(view, rng, branch)
        out[f"view{branch + 1}"] = TF.pil_to_tensor(view).numpy()  # (3, S, S) uint8
        out[f"box{branch + 1}"] = torch.tensor(box, dtype=torch.float32).numpy()
        out[f"flip{branch + 1}"] = flip
    return out


def _timed_side(work: Callable[[int], dict], count: int) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of ``work(i)`` for every ``i < count``."""
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(count):
        work(i)
    return time.perf_counter() - w0, time.process_time() - c0


def cpu_part(args: argparse.Namespace, folder: str, names: list[str]) -> dict[str, Any]:
    from dncut.data.pipeline import ViewMaker, file_key

    cfg = bench_config(folder, args.crop_size)
    d = cfg.data
    maker = ViewMaker(cfg)
    images = read_all(folder, names)
    uris = [os.path.join(folder, n) for n in names]
    keys = [file_key(u) for u in uris]
    rows = [{"uri": u, "bytes": b, "epoch": 0, "key": k} for u, b, k in zip(uris, images, keys)]
    options = dict(size=d.crop_size, scale=tuple(d.crop_scale), min_overlap=d.min_overlap, min_size=d.min_image_size)

    def old(i: int) -> dict:
        return old_cpu_side(images[i], pair_rng(cfg.seed, 0, keys[i]), **options)

    def new(i: int) -> dict:
        return maker.views(rows[i], pair_rng(cfg.seed, 0, keys[i]))

    previous_threads, previous_affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    core = args.cpu_core if args.cpu_core is not None else max(previous_affinity)
    torch.set_num_threads(1)
    pin([core])
    before = loadavg()
    try:
        a, b = old(0), new(0)  # warm-up (imports, first-call costs) and a shape check
        for view in (a["view1"], a["view2"], b["view1"], b["view2"]):
            assert view.shape == (3, d.crop_size, d.crop_size) and view.dtype == np.uint8, view.shape
        same_boxes = all(np.array_equal(a[k], b[k]) for k in ("box1", "box2"))
        for i in range(min(3, len(images))):
            old(i), new(i)
        sides = {"old": old, "new": new}
        per_round: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                wall, cpu = _timed_side(sides[name], len(images))
                per_round[name].append({"pairs_s": len(images) / wall, "pairs_per_cpu_s": len(images) / cpu})
    finally:
        pin(sorted(previous_affinity))
        torch.set_num_threads(previous_threads)
    out: dict[str, Any] = {"core": core, "torch_threads": 1, "pairs_per_pass": len(images),
                           "file_reading": "old side: bytes in memory; new side: ViewMaker reads the (page-cached) local file itself, as in training",
                           "same_boxes_both_sides": same_boxes, "loadavg_before": before, "loadavg_after": loadavg()}
    for name, stats in per_round.items():
        out[name] = {"pairs_s_rounds": [round(s["pairs_s"], 2) for s in stats],
                     "pairs_s": median([s["pairs_s"] for s in stats], 2),
                     "pairs_per_cpu_s_rounds": [round(s["pairs_per_cpu_s"], 2) for s in stats],
                     "pairs_per_cpu_s": median([s["pairs_per_cpu_s"] for s in stats], 2)}
    ratios = [n["pairs_s"] / o["pairs_s"] for o, n in zip(per_round["old"], per_round["new"])]
    cpu_ratios = [n["pairs_per_cpu_s"] / o["pairs_per_cpu_s"] for o, n in zip(per_round["old"], per_round["new"])]
    out.update({"ratio_new_over_old_rounds": [round(x, 3) for x in ratios], "ratio_new_over_old": median(ratios),
                "ratio_cpu_time_rounds": [round(x, 3) for x in cpu_ratios], "ratio_cpu_time": median(cpu_ratios),
                "target_ratio": 6.0, "meets_target": median(ratios) >= 6.0})
    out["new_pairs_s_per_core"] = out["new"]["pairs_s"]
    return out


# ----------------------------------------------------------------------------- part gpu_aug


def sample_views(folder: str, names: list[str], crop_size: int, count: int) -> dict[str, torch.Tensor]:
    """``count`` pairs as a batch of the pipeline: the new crops of the images (tiled to ``count``)
    and ``count`` fresh parameter rows per branch."""
    from dncut import photometric as ph
    from dncut.data.pipeline import ViewMaker, file_key

    cfg = bench_config(folder, crop_size)
    maker = ViewMaker(cfg)
    made = []
    for name, data in zip(names[:count], read_all(folder, names[:count])):
        uri = os.path.join(folder, name)
        made.append(maker.views({"uri": uri, "bytes": data, "epoch": 0, "key": file_key(uri)},
                                pair_rng(cfg.seed, 0, file_key(uri))))
    rng = np.random.default_rng(0)
    index = [i % len(made) for i in range(count)]
    return {"view1": torch.from_numpy(np.stack([made[i]["view1"] for i in index])),  # (B, 3, S, S) uint8
            "view2": torch.from_numpy(np.stack([made[i]["view2"] for i in index])),
            "aug1": torch.from_numpy(np.stack([ph.sample_params(rng, 0) for _ in index])),  # (B, 13)
            "aug2": torch.from_numpy(np.stack([ph.sample_params(rng, 1) for _ in index])),
            "box1": torch.zeros(count, 4), "box2": torch.zeros(count, 4),  # model_inputs passes them on
            "flip1": torch.zeros(count, dtype=torch.bool), "flip2": torch.zeros(count, dtype=torch.bool)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_times(batch: dict[str, torch.Tensor], device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of each photometric operation on all 2 x 256 views at once (where the time goes),
    and of moving a quarter of them out and back (index_select + index_copy_)."""
    from dncut import photometric as ph

    x = torch.cat([batch["view1"], batch["view2"]]).float().div_(255)  # (512, 3, S, S)
    f = torch.full((len(x),), 1.2, device=device)
    idx = torch.arange(0, len(x), 4, device=device)
    ops = {**{f"blend_{name}": (lambda k=k: ph.blend(x, torch.full((len(x),), k, device=device), f))
              for k, name in enumerate(("brightness", "contrast", "saturation"))},
           "hue": lambda: ph.hue(x, f - 1.15),
           "gray": lambda: ph.gray(x).expand_as(x).contiguous(), "blur": lambda: ph.gaussian_blur(x, f),
           "solarize": lambda: ph.solarize(x), "quarter_select_copy": lambda: x.clone().index_copy_(0, idx, x.index_select(0, idx))}
    out = {}
    for name, op in ops.items():
        times = []
        for i in range(2 + repeats):
            _sync(device)
            t0 = time.perf_counter()
            op()
            _sync(device)
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - t0))
        out[name] = median(times, 3)
    return out


def gpu_aug_part(args: argparse.Namespace, folder: str, names: list[str]) -> dict[str, Any]:
    from dncut import photometric as ph
    from dncut.train import model_inputs

    note = None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device, note = torch.device("cpu"), f"--device {args.device}: no CUDA device visible; ran on the CPU"
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and args.aug_threads:
        torch.set_num_threads(args.aug_threads)
    before = loadavg()
    try:
        host = sample_views(folder, names, args.crop_size, AUG_BATCH)
        h2d_ms: list[float] = []
        if device.type == "cuda":
            host = {k: v.pin_memory() for k, v in host.items()}
            for i in range(args.aug_warmup + args.aug_repeats):
                _sync(device)
                t0 = time.perf_counter()
                batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
                _sync(device)
                if i >= args.aug_warmup:
                    h2d_ms.append(1e3 * (time.perf_counter() - t0))
        else:
            batch = host
        threads = torch.get_num_threads()
        times = []
        for i in range(args.aug_warmup + args.aug_repeats):
            _sync(device)
            t0 = time.perf_counter()
            views = model_inputs(batch)[:2]  # the training step's own call
            _sync(device)
            if i >= args.aug_warmup:
                times.append(1e3 * (time.perf_counter() - t0))
        assert all(v.shape == (AUG_BATCH, 3, args.crop_size, args.crop_size) and v.dtype == torch.float32
                   for v in views)
    finally:
        torch.set_num_threads(previous_threads)
    ms = median(times, 3)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type, "note": note, "torch_threads": threads if device.type == "cpu" else None,
        "pairs": AUG_BATCH, "calls": "dncut.train.model_inputs: one apply call on both views (2 x 256)",
        "crop_size": args.crop_size, "warmup": args.aug_warmup, "repeats": args.aug_repeats,
        "ms_rounds": [round(t, 3) for t in times], "ms_median": ms, "ms_min": round(min(times), 3),
        "pairs_s": round(AUG_BATCH / (ms / 1e3), 1),
        "fractions_in_batch": {name: round(float(torch.cat([host["aug1"][:, col], host["aug2"][:, col]]).mean()), 3)
                               for name, col in (("jitter", ph.JITTER), ("gray", ph.GRAY), ("blur", ph.BLUR),
                                                 ("solarize", ph.SOLARIZE))},
        "target_ms_gpu": 10.0, "meets_target": (ms <= 10.0) if device.type == "cuda" else None,
        "loadavg_before": before, "loadavg_after": loadavg(),
    }
    if h2d_ms:
        out["h2d_uint8_views_and_params_ms_median"] = median(h2d_ms, 3)
    if device.type == "cuda":
        out["op_ms_all_512_views"] = op_times(batch, device, args.aug_repeats)
    return out


# ----------------------------------------------------------------------------- part bytes


def bytes_part(args: argparse.Namespace, folder: str, names: list[str]) -> dict[str, Any]:
    from dncut.data.pipeline import ViewMaker, file_key

    cfg = bench_config(folder, args.crop_size)
    uri = os.path.join(folder, names[0])
    row = ViewMaker(cfg)({"uri": uri, "bytes": Path(uri).read_bytes(), "epoch": 0, "key": file_key(uri)})
    if not row["ok"]:
        raise RuntimeError(f"{uri} did not decode")
    columns = {}
    for name, value in row.items():
        array = np.asarray(value)
        columns[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "bytes": int(array.nbytes)}
    total = sum(c["bytes"] for c in columns.values())
    s = args.crop_size
    old_float32 = 2 * 3 * s * s * 4
    jpeg_sizes = [os.path.getsize(os.path.join(folder, n)) for n in names]
    return {"columns": columns, "row_bytes": total, "views_bytes": columns["view1"]["bytes"] + columns["view2"]["bytes"],
            "old_float32_views_bytes": old_float32, "row_over_old_float32": round(total / old_float32, 4),
            "encoded_jpeg_bytes_mean": round(statistics.fmean(jpeg_sizes)),
            "note": "numpy nbytes of the row's numeric columns (Arrow adds a few offsets per block); the "
                    "read tasks also pass each file's encoded bytes (encoded_jpeg_bytes_mean) to the decode tasks"}


# ----------------------------------------------------------------------------- part e2e (Ray)


class FileDataset(torch.utils.data.Dataset):
    """Map-style dataset: index -> read the file's bytes -> ``ViewMaker`` row (the function Ray Data maps)."""

    def __init__(self, uris: list[str], maker) -> None:
        from dncut.data.pipeline import file_key

        self.uris, self.maker = uris, maker
        self.keys = [file_key(u) for u in uris]

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> dict:
        from dncut import storage

        uri = self.uris[index]
        data = storage.read_bytes(uri, self.maker.s3)
        return self.maker({"uri": uri, "bytes": data, "epoch": 0, "key": self.keys[index]})


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _drain(batches, augment: bool) -> tuple[int, int]:
    from dncut.train import model_inputs

    rows = bad = 0
    for batch in batches:
        ok = batch["ok"].bool()
        rows += len(ok)
        bad += int((~ok).sum())
        if augment:
            model_inputs({k: v[ok] for k, v in batch.items()})
    return rows, bad


def compare(loaders: dict[str, Callable], rounds: int, augment: bool) -> dict[str, dict[str, Any]]:
    """A cold pass of each loader, then ``rounds`` rounds of one timed pass each, alternating
    (which loader goes first alternates too); medians over rounds."""
    out: dict[str, dict[str, Any]] = {}
    for name, make_iter in loaders.items():
        t0 = time.perf_counter()
        rows, bad = _drain(make_iter(), augment)
        out[name] = {"cold_s": round(time.perf_counter() - t0, 2), "rows": rows, "bad_rows": bad, "rows_s_rounds": []}
    names = list(loaders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            rows, bad = _drain(loaders[name](), augment)
            out[name]["rows_s_rounds"].append(round(rows / (time.perf_counter() - t0), 2))
            out[name]["bad_rows"] += bad
    for stats in out.values():
        stats["rows_s"] = median(stats["rows_s_rounds"], 2)
    return out


def e2e_part(args: argparse.Namespace, folder: str, names: list[str], scratch: str) -> dict[str, Any]:
    import ray
    import ray.data

    from dncut.data import pipeline
    from dncut.data.pipeline import ROWS_PER_BLOCK, ViewMaker, source_uris, train_dataset
    from dncut.train import PREFETCH_BATCHES

    subset = os.path.join(scratch, "e2e")  # exactly the benched images: Ray lists the whole folder
    os.makedirs(subset, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(folder, n), os.path.join(subset, n))
    server = None
    roots = {"local": subset, "s3": f"s3://{BUCKET}/images"}
    if "s3" in args.sources:
        server = start_s3(scratch)
        upload(server, [(f"images/{n}", Path(subset, n).read_bytes()) for n in names])
    all_cores = os.sched_getaffinity(0)
    results = []
    before = loadavg()
    try:
        for cpus in args.cpus:
            cores = pin(first_cores(cpus, all_cores))
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.execution_options.preserve_order = True  # as train_data_config() for the workers
            try:
                for source in args.sources:
                    cfg = bench_config(roots[source], args.crop_size, args.batch_size,
                                       server.endpoint_url if server and source == "s3" else None)
                    uris = source_uris(cfg)
                    # a pass = a run of --e2e-epochs epochs: training streams the whole run through one
                    # Ray Data execution (its start-up is paid once per run, not per epoch)
                    ds = train_dataset(cfg, uris, total_steps=args.e2e_epochs * (len(uris) // args.batch_size))
                    loader = torch.utils.data.DataLoader(
                        FileDataset(uris, ViewMaker(cfg)), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=cpus, persistent_workers=True, pin_memory=False, worker_init_fn=_one_thread,
                        prefetch_factor=2)

                    def ray_pass(ds=ds):
                        return ds.iter_torch_batches(batch_size=args.batch_size, drop_last=True, device="cpu",
                                                     pin_memory=False, prefetch_batches=PREFETCH_BATCHES)

                    def loader_pass(loader=loader):
                        return (batch for _ in range(args.e2e_epochs) for batch in loader)

                    passes = {"ray_data": ray_pass, "dataloader": loader_pass}
                    for rows in args.e2e_rows_per_block:  # the same pipeline with other decode-task sizes
                        pipeline.ROWS_PER_BLOCK = rows
                        try:
                            other = train_dataset(cfg, uris, total_steps=args.e2e_epochs * (len(uris) // args.batch_size))
                        finally:
                            pipeline.ROWS_PER_BLOCK = ROWS_PER_BLOCK
                        passes[f"ray_data_{rows}_rows_per_block"] = lambda ds=other: ray_pass(ds)
                    reserved = train_dataset(cfg, uris, total_steps=args.e2e_epochs * (len(uris) // args.batch_size))
                    reserved.context.op_resource_reservation_enabled = True  # Ray Data's default
                    passes["ray_data_reserved"] = lambda ds=reserved: ray_pass(ds)
                    measured = compare(passes, args.rounds, args.e2e_augment)
                    del loader  # stops the DataLoader's worker processes
                    rd, dl = measured["ray_data"], measured["dataloader"]
                    row = {"source": source, "cpus": cpus, "cores": cores, "images": len(uris),
                           "rows_per_pass": rd["rows"], "rows_per_block": ROWS_PER_BLOCK, **measured,
                           "ratio_ray_over_dataloader": round(rd["rows_s"] / dl["rows_s"], 3),
                           "meets_target": rd["rows_s"] / dl["rows_s"] >= 0.9}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    results.append(row)
            finally:
                ray.shutdown()
    finally:
        pin(sorted(all_cores))
        if server is not None:
            server.stop()
    scaling = {}
    for source in args.sources:
        by_cpu = {r["cpus"]: r for r in results if r["source"] == source}
        if 1 in by_cpu and 2 in by_cpu:
            scaling[source] = {name: round(by_cpu[2][name]["rows_s"] / by_cpu[1][name]["rows_s"], 3)
                               for name in ("ray_data", "dataloader")}
    return {"batch_size": args.batch_size, "epochs_per_pass": args.e2e_epochs, "prefetch_batches": PREFETCH_BATCHES,
            "preserve_order": True,
            "augmentation": "in the consumer, timed (--e2e-augment)" if args.e2e_augment
            else "not timed (runs on the training device, not on these cores)",
            "target_ratio": 0.9, "results": results, "scaling_2_over_1_cpu": scaling,
            "loadavg_before": before, "loadavg_after": loadavg()}


# ----------------------------------------------------------------------------- part startup (Ray + S3)


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 64, 32)).save(buffer, format="JPEG")
    return buffer.getvalue()


def startup_part(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    import ray
    import ray.data

    from dncut.data.pipeline import ViewMaker, source_uris, train_dataset

    n = args.startup_objects
    total_steps = STARTUP_EPOCHS * (n // STARTUP_BATCH)
    all_cores = os.sched_getaffinity(0)
    cpus = max(args.cpus)
    server = start_s3(scratch)
    try:
        t0 = time.perf_counter()
        body = tiny_jpeg()
        upload(server, [(f"many/img_{i:06d}.jpg", body) for i in range(n)])
        upload_s = time.perf_counter() - t0
        cfg = bench_config(f"s3://{BUCKET}/many", args.crop_size, STARTUP_BATCH, server.endpoint_url)
        pin(first_cores(cpus, all_cores))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        before = loadavg()

        def rows() -> tuple[float, float, int]:  # dncut: list once, seeded rows for every epoch, from_items
            t0 = time.perf_counter()
            uris = source_uris(cfg)
            listed = time.perf_counter() - t0
            ds = train_dataset(cfg, uris, total_steps)
            del ds
            return time.perf_counter() - t0, listed, len(uris)

        def file_reader() -> tuple[float, float, int]:  # the tried alternative: Ray's reader per epoch
            from ray.data import FileShuffleConfig

            t0 = time.perf_counter()
            uris = source_uris(cfg)  # the count sizes the epochs
            listed = time.perf_counter() - t0
            fs, path = cfg.storage_handle().filesystem(cfg.data.train)
            epochs = [ray.data.read_binary_files(path, filesystem=fs, include_paths=True,
                                                 shuffle=FileShuffleConfig(seed=e)) for e in range(STARTUP_EPOCHS)]
            ds = epochs[0].union(*epochs[1:]).map(ViewMaker(cfg), num_cpus=cfg.data.decode_cpus)
            del ds
            return time.perf_counter() - t0, listed, len(uris)

        sides = {"rows": rows, "file_reader": file_reader}
        measured: dict[str, dict[str, list]] = {k: {"s": [], "list_s": [], "uris": []} for k in sides}
        try:
            for r in range(args.rounds):
                for name in (("rows", "file_reader") if r % 2 == 0 else ("file_reader", "rows")):
                    seconds, listed, count = sides[name]()
                    measured[name]["s"].append(round(seconds, 3))
                    measured[name]["list_s"].append(round(listed, 3))
                    measured[name]["uris"].append(count)
        finally:
            ray.shutdown()
            pin(sorted(all_cores))
    finally:
        server.stop()
    out: dict[str, Any] = {"objects": n, "epochs": STARTUP_EPOCHS, "batch_size": STARTUP_BATCH,
                           "total_steps": total_steps, "upload_s": round(upload_s, 1), "ray_cpus": cpus,
                           "rows": "dncut's train_dataset: source_uris (one listing) + seeded epoch rows + from_items + map",
                           "file_reader": "the alternative: source_uris + read_binary_files(prefix, FileShuffleConfig) "
                                          "per epoch + union + map (Ray lists the prefix once per epoch)",
                           "loadavg_before": before, "loadavg_after": loadavg()}
    for name, m in measured.items():
        out[f"{name}_s_rounds"] = m["s"]
        out[f"{name}_s"] = median(m["s"])
        out[f"{name}_source_uris_s"] = median(m["list_s"])
        out[f"{name}_uris_listed"] = m["uris"][0]
    out["ratio_file_reader_over_rows"] = round(out["file_reader_s"] / out["rows_s"], 3)
    return out


# ----------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = tempfile.mkdtemp(prefix="dncut-ingest-")
    report: dict[str, Any] = {"bench": "ingest", "parts": args.parts, "crop_size": args.crop_size,
                              "rounds": args.rounds, "machine": machine_info(), "loadavg_before": loadavg()}
    try:
        folder, names, kind = image_folder(args.images, args.limit, scratch)
        report["images"] = {"source": kind, "folder": folder, "count": len(names)}
        for part in PARTS:
            if part not in args.parts:
                continue
            print(f"[ingest] {part} ...", file=sys.stderr, flush=True)
            if part == "cpu":
                report["cpu"] = cpu_part(args, folder, names)
            elif part == "gpu_aug":
                report["gpu_aug"] = gpu_aug_part(args, folder, names)
            elif part == "bytes":
                report["bytes"] = bytes_part(args, folder, names)
            elif part == "e2e":
                report["e2e"] = e2e_part(args, folder, names, scratch)
            elif part == "startup":
                report["startup"] = startup_part(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["loadavg_after"] = loadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (default: all)")
    p.add_argument("--images", default=DEFAULT_IMAGES, help="folder of images (generated scenes when absent)")
    p.add_argument("--limit", type=int, default=128, help="images per pass")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per part (alternating sides, medians)")
    p.add_argument("--cpu-core", type=int, default=None, help="core of the cpu part (default: the last one allowed)")
    p.add_argument("--device", default="cpu", help="gpu_aug: cpu or cuda[:N]")
    p.add_argument("--aug-threads", type=int, default=1, help="gpu_aug on the CPU: torch threads (0: torch's default)")
    p.add_argument("--aug-warmup", type=int, default=None, help="gpu_aug untimed batches (default: 2 CPU, 5 GPU)")
    p.add_argument("--aug-repeats", type=int, default=None, help="gpu_aug timed batches (default: 3 CPU, 30 GPU)")
    p.add_argument("--batch-size", type=int, default=32, help="e2e batch size (both loaders)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="e2e: cores (and Ray CPUs / loader workers)")
    p.add_argument("--sources", nargs="+", default=["local"], choices=SOURCES, help="e2e image sources")
    p.add_argument("--e2e-augment", action="store_true", help="e2e: time model_inputs in the consumer, both sides")
    p.add_argument("--e2e-rows-per-block", type=int, nargs="*", default=[16],
                   help="e2e: also time Ray Data with these decode-task sizes (rows per block)")
    p.add_argument("--e2e-epochs", type=int, default=8,
                   help="e2e: epochs per timed pass (one Ray Data execution, as one training run; the DataLoader "
                        "loops its persistent workers over them)")
    p.add_argument("--startup-objects", type=int, default=20_000, help="startup: objects under the S3 prefix")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.aug_warmup = (5 if gpu else 2) if args.aug_warmup is None else args.aug_warmup
    args.aug_repeats = (30 if gpu else 3) if args.aug_repeats is None else args.aug_repeats
    if any(c < 1 for c in args.cpus) or args.rounds < 1 or args.limit < 1 or args.aug_repeats < 1:
        raise SystemExit("--cpus, --rounds, --limit and --aug-repeats must be >= 1")
    if "startup" in args.parts and args.startup_objects < STARTUP_BATCH:
        raise SystemExit(f"--startup-objects must be >= {STARTUP_BATCH}")
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
