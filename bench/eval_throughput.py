"""Throughput of the TokenCut evaluation: dncut's batched NCut layer vs the peers' per-image scipy.

    .venv/bin/python bench/eval_throughput.py                 # sod-val if present, else scenes
    .venv/bin/python bench/eval_throughput.py --images 32 --skip-scaling

Part 1 (same machine, same images, same EfficientNet-Lite0 features, computed once):
  * peers: per image, sequentially, TokenCut's numpy code: A = f f^T > 0.2 (eps 1e-5),
    ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])``, mean bipartition, seed, flip,
    4-connected component (scipy.ndimage.label), box — affinities from float32 features, the
    eigenproblem in float64, as their code runs (``np.where`` promotes the binary graph); once
    with the default BLAS threads (as shipped), once with one thread (threadpoolctl), their
    fastest sequential setting at these sizes, and, as an upper bound that is not their code,
    their loop split over ``--workers`` single-threaded processes;
  * dncut: ``dncut.eval.methods.ncut_maps`` as the job's actors run it (batches of
    ``--batch-size``, images with the same node count in one call; ``lobpcg`` in float32 at
    EVAL_TOL, ``eigh`` in float64), in one process and in ``--workers`` single-threaded processes (as that many
    1-CPU actors; timed after start-up and warm-up).
  Reports images/s of this NCut stage, the speed-up, the feature extraction rate and the
  end-to-end rate (features + NCut), and how often the two give the same mask and box.
Part 2: the Ray job (``run_evaluation``, tokencut, no bilateral solver) on the same images
  (repeated up to ``--scaling-images``) with Ray given 1 and then 2 CPUs, each in a fresh
  process pinned to that many cores: images/s and the scaling factor.

Writes JSON to stdout and to ``bench/results/eval_throughput.json``. ``--save-features`` /
``--load-features`` time part 1 elsewhere (e.g. pinned to 2 cores of a quiet machine) on the
very same features.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.ndimage as ndi
import torch

from dncut.config import Config

SOD_VAL = Path("/work/shared/data/sod-val")
RESULTS = Path(__file__).resolve().parent / "results" / "eval_throughput.json"
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- inputs
def load_images(n: int) -> tuple[list[np.ndarray], str, Path | None]:
    """(RGB uint8 images, source name, saliency root with images/ + masks/ or None)."""
    from PIL import Image

    files = sorted((SOD_VAL / "images").glob("*.jpg"))[:n] if (SOD_VAL / "images").is_dir() else []
    if files:
        return [np.asarray(Image.open(f).convert("RGB")) for f in files], "sod-val", SOD_VAL
    from dncut.data.scenes import make_scene

    return [np.asarray(make_scene(1_000_000 + i, size=320)[0]) for i in range(n)], "scenes", None


def extract_features(images: list[np.ndarray], backbone: str, size: int) -> tuple[list[torch.Tensor], float]:
    """EfficientNet-Lite0 features (C, h, w) per image (long side ``size``) and the seconds spent,
    through the evaluation job's own steps (``network_input``, ``Predictor.features``)."""
    from dncut.backbones import create_backbone
    from dncut.eval.predict import Predictor, network_input

    model = create_backbone(backbone, pretrained=True).eval()
    predictor = Predictor(model, ["tokencut"], "eigh")  # the eval job's feature step (solver unused here)
    feats = []
    start = time.perf_counter()
    with torch.inference_mode():
        for image in images:
            net, _ = network_input(image, stride=model.stride, image_size=size, pad_rgb=model.spec.pad_rgb)
            feats.extend(predictor.features([net]))  # (C, h, w)
    return feats, time.perf_counter() - start


# --------------------------------------------------------------------------- the two NCut stages
def peer_tokencut(feat: np.ndarray, tau: float = 0.2, eps: float = 1e-5) -> tuple[np.ndarray, list[int]]:
    """TokenCut's per-image code path (numpy / scipy): (mask (h, w), box in patches)."""
    c, h, w = feat.shape
    x = feat.reshape(c, h * w).T  # (n, C)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T  # (n, n), float32 like their torch features
    a = np.where(a > tau, 1.0, eps)  # float64: their np.where(A.astype(float) == 0, eps, A) promotes
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    y = vecs[:, 0]
    part = y > y.mean()
    seed = int(np.argmax(np.abs(y)))
    if not part[seed]:
        part = ~part
    labels, _ = ndi.label(part.reshape(h, w))
    comp = labels == labels.flat[seed]
    rows, cols = np.nonzero(comp)
    return comp, [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def run_peers(feats: list[torch.Tensor]) -> tuple[list, float]:
    arrays = [f.numpy() for f in feats]
    start = time.perf_counter()
    out = [peer_tokencut(a) for a in arrays]
    return out, time.perf_counter() - start


def run_batched(feats: list[torch.Tensor], solver: str, batch_size: int) -> tuple[list, float]:
    """As the job's actors: batches of ``batch_size`` images, one NCut call per node count
    (``dncut.eval.methods.ncut_maps``)."""
    from dncut.eval.methods import ncut_maps

    out: list = []
    start = time.perf_counter()
    for first in range(0, len(feats), batch_size):
        with torch.inference_mode():
            res = ncut_maps(feats[first:first + batch_size], ["tokencut"], solver=solver)
        out += [(r["tokencut_mask"], r["tokencut_box"].tolist()) for r in res]
    return out, time.perf_counter() - start


_WORKER: dict = {}


def _worker_init(feats: list[torch.Tensor], kind: str, solver: str, batch_size: int, retain: bool) -> None:
    """A single-threaded worker process: ``kind`` "dncut" (as one 1-CPU inference actor) or
    "peers" (their per-image loop with one BLAS thread)."""
    from dncut.runtime import retain_freed_memory

    torch.set_num_threads(1)
    if kind == "peers":
        from threadpoolctl import threadpool_limits

        _WORKER["limits"] = threadpool_limits(1)  # kept for the life of the process
    elif retain:
        retain_freed_memory()
    _WORKER.update(feats=feats, kind=kind, solver=solver, batch_size=batch_size)
    _worker_run([0])  # warm-up


def _worker_ready(barrier) -> int:
    barrier.wait(timeout=600)  # every worker holds one of these tasks at once: all have started
    return os.getpid()


def _worker_run(firsts: list[int]) -> list[tuple[int, tuple]]:
    """The images of the batches starting at ``firsts``: ``[(index, (mask, box)), ...]``."""
    feats, bs = _WORKER["feats"], _WORKER["batch_size"]
    out = []
    for f0 in firsts:
        idx = list(range(f0, min(f0 + bs, len(feats))))
        if _WORKER["kind"] == "peers":
            res = [peer_tokencut(feats[i].numpy()) for i in idx]
        else:
            res, _ = run_batched([feats[i] for i in idx], _WORKER["solver"], bs)
        out += list(zip(idx, res))
    return out


def run_in_processes(feats: list[torch.Tensor], kind: str, solver: str, batch_size: int,
                     workers: int, retain: bool = True) -> tuple[list, float]:
    """``workers`` single-threaded processes share the batches (dealt round-robin); the time of
    the work only (processes started, features loaded and warmed up before the clock starts)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    firsts = list(range(0, len(feats), batch_size))
    shares = [firsts[k::workers] for k in range(workers)]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                        initargs=(feats, kind, solver, batch_size, retain)) as pool:
        barrier = manager.Barrier(workers)
        if len(set(pool.map(_worker_ready, [barrier] * workers))) != workers:
            raise RuntimeError(f"expected {workers} distinct worker processes")
        start = time.perf_counter()
        parts = list(pool.map(_worker_run, shares))
        seconds = time.perf_counter() - start
    out: list = [None] * len(feats)
    for part in parts:
        for i, r in part:
            out[i] = r
    return out, seconds


def peers_one_thread(feats: list[torch.Tensor], repeats: int) -> tuple[list, float] | None:
    """The peers' loop with BLAS/LAPACK limited to one thread (their fastest sequential setting
    for n ~ 260: threads cost more than they give); None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    with threadpool_limits(1):
        return best_of(lambda: run_peers(feats), repeats)


def rate(n: int, *seconds: float | None) -> float | None:
    """Images per second over the summed times; ``None`` when a time is unknown."""
    return None if any(s is None for s in seconds) else round(n / sum(seconds), 2)


def best_of(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return runs[0][0], min(r[1] for r in runs)


# --------------------------------------------------------------------------- Ray scaling
def scaling_worker(cpus: int, root: str, n: int, backbone: str, size: int, solver: str, batch_size: int) -> dict:
    """Run inside a fresh process: the Ray job on ``n`` images with Ray limited to ``cpus``."""
    import logging

    import ray

    from dncut.eval.jobs import run_evaluation

    # pin this process (and so Ray's raylet and workers, which inherit it) to ``cpus`` cores:
    # num_cpus alone is a scheduling limit, not a physical one
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)
    cfg = Config().with_overrides({
        "output_dir": tempfile.mkdtemp(prefix="dncut-bench-"), "run_name": f"cpus{cpus}",
        "model.backbone": backbone, "ncut.solver": solver,
        "eval.datasets": [{"name": "bench", "kind": "folder", "root": root, "limit": n}],
        "eval.methods": ["tokencut"], "eval.bilateral": False, "eval.image_size": size,
        "eval.batch_size": batch_size, "eval.examples": 0,  # eval.num_actors: the config's (1)
    })
    start = time.perf_counter()
    summary = run_evaluation(cfg)
    wall = time.perf_counter() - start
    run = summary["runs"][0]
    return {"cpus": cpus, "num_actors": cfg.eval.num_actors, "images": run["n_images"], "failed": run["n_failed"],
            "wall_s": round(wall, 2), "images_per_s": round(run["n_images"] / wall, 2),
            "iou": run["metrics"]["iou"]}


def write_scene_root(n: int) -> str:
    from PIL import Image

    from dncut.data.scenes import make_scene

    root = Path(tempfile.mkdtemp(prefix="dncut-bench-scenes-"))
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = make_scene(1_000_000 + i, size=320)
        image.save(root / "images" / f"s{i:04d}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i:04d}.png")
    return str(root)


def replicate_root(root: str, copies: int) -> str:
    """A folder with ``copies`` symlinked copies of each image / mask pair of ``root`` (more images
    than a small set has, so that the actors' start-up does not dominate the rate)."""
    out = Path(tempfile.mkdtemp(prefix="dncut-bench-rep-"))
    for sub in ("images", "masks"):
        (out / sub).mkdir()
        for f in sorted((Path(root) / sub).iterdir()):
            for c in range(copies):
                (out / sub / f"{f.stem}_c{c}{f.suffix}").symlink_to(f.resolve())
    return str(out)


def run_scaling(root: str, n: int, backbone: str, size: int, solver: str, batch_size: int) -> list[dict]:
    results = []
    for cpus in (1, 2):
        cmd = [sys.executable, __file__, "--scaling-worker", str(cpus), "--root", root, "--images", str(n),
               "--backbone", backbone, "--size", str(size), "--solver", solver, "--batch-size", str(batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not line:
            results.append({"cpus": cpus, "error": proc.stderr[-2000:]})
        else:
            results.append(json.loads(line[-1]))
    return results


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="number of images")
    p.add_argument("--backbone", default="efficientnet_lite0_s16",
                   help="efficientnet_lite0_s16 (stride 16) or efficientnet_lite0 (stride 32)")
    p.add_argument("--size", type=int, default=320, help="long side of the resized images")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best is kept)")
    p.add_argument("--batch-size", type=int, default=Config().eval.batch_size,
                   help="images per inference batch, as the job's eval.batch_size (default: the config's)")
    p.add_argument("--solver", default=Config().ncut.solver, help="NCut solver of the Ray job in part 2 (default: the config's)")
    p.add_argument("--workers", type=int, default=0,
                   help="single-threaded dncut processes for the multi-process variant (default: usable cores)")
    p.add_argument("--default-malloc", action="store_true",
                   help="part 1 without dncut.runtime.retain_freed_memory (glibc's default heap trimming)")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--scaling-images", type=int, default=400,
                   help="images for the Ray job runs of part 2 (the set is repeated up to this many)")
    p.add_argument("--scaling-worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-features", default=None, help="also save the features (torch .pt) for --load-features")
    p.add_argument("--load-features", default=None, help="time part 1 on features saved elsewhere (implies --skip-scaling)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.scaling_worker:
        print(json.dumps(scaling_worker(args.scaling_worker, args.root, args.images, args.backbone, args.size,
                                        args.solver, args.batch_size)))
        return

    load_start = os.getloadavg()
    if args.load_features:
        saved = torch.load(args.load_features)
        feats, source, root = saved["feats"], saved["source"] + " (saved features)", None
        feat_s = None  # measured on another machine: no end-to-end rates here
        args.skip_scaling = True
        args.size, args.backbone = saved.get("long_side", args.size), saved.get("backbone", args.backbone)
    else:
        images, source, root = load_images(args.images)
        feats, feat_s = extract_features(images, args.backbone, args.size)
        if args.save_features:
            torch.save({"feats": feats, "feat_s": feat_s, "source": source, "long_side": args.size,
                        "backbone": args.backbone}, args.save_features)
    from dncut.runtime import retain_freed_memory

    retained = False if args.default_malloc else retain_freed_memory()  # as the job's CPU actors do
    peers, peer_s = best_of(lambda: run_peers(feats), args.repeats)
    peers1 = peers_one_thread(feats, args.repeats)
    peer1_s = None if peers1 is None else peers1[1]
    workers = args.workers or len(os.sched_getaffinity(0))
    peerw_s = None
    if peers1 is not None and workers > 1:  # their loop split over the cores (not their code, an upper bound)
        peerw_s = best_of(lambda: run_in_processes(feats, "peers", "", args.batch_size, workers), args.repeats)[1]
    n = len(feats)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "blas_threads_env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ},
                    "loadavg_start": [round(v, 2) for v in load_start]},
        "images": n, "batch_size": args.batch_size, "source": source, "backbone": args.backbone, "long_side": args.size,
        "grids": sorted({tuple(f.shape[1:]) for f in feats}),
        "nodes_per_graph": sorted({f.shape[1] * f.shape[2] for f in feats}),
        "features_images_per_s": rate(n, feat_s),
        "retain_freed_memory": retained,
        "peers_scipy_per_image": {"blas_threads": "default (all usable cores)", "ncut_images_per_s": rate(n, peer_s),
                                  "end_to_end_images_per_s": rate(n, feat_s, peer_s)},
        "peers_scipy_per_image_1thread": None if peer1_s is None else {
            "blas_threads": 1, "cores": 1, "ncut_images_per_s": rate(n, peer1_s),
            "end_to_end_images_per_s": rate(n, feat_s, peer1_s)},
        f"peers_scipy_per_image_1thread_{workers}proc": None if peerw_s is None else {
            "blas_threads": 1, "cores": workers, "ncut_images_per_s": rate(n, peerw_s),
            "note": "their per-image loop split over single-threaded processes: not their code, an upper bound"},
    }
    for solver in ("eigh", "lobpcg"):
        run_batched(feats[:2], solver, args.batch_size)  # warm-up
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        variants = {f"dncut_batched_{solver}": best_of(lambda: run_batched(feats, solver, args.batch_size), args.repeats)}
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) // args.repeats
        if workers > 1:
            variants[f"dncut_batched_{solver}_{workers}proc"] = best_of(
                lambda: run_in_processes(feats, "dncut", solver, args.batch_size, workers, retained), args.repeats)
        for name, (ours, ours_s) in variants.items():
            same_mask = np.mean([np.array_equal(a[0], b[0]) for a, b in zip(ours, peers)])
            iou = np.mean([(a[0] & b[0]).sum() / max(1, (a[0] | b[0]).sum()) for a, b in zip(ours, peers)])
            same_box = np.mean([a[1] == b[1] for a, b in zip(ours, peers)])
            result[name] = {} if name.endswith("proc") else {"minor_page_faults_per_run": faults}
            result[name] |= {
                "setup": (f"{workers} single-threaded processes (as {workers} 1-CPU actors)" if name.endswith("proc")
                          else f"one process, {torch.get_num_threads()} torch threads"),
                "ncut_images_per_s": rate(n, ours_s), "speedup_ncut": round(peer_s / ours_s, 2),
                "speedup_ncut_vs_peers_1thread": None if peer1_s is None else round(peer1_s / ours_s, 2),
                f"speedup_ncut_vs_peers_1thread_{workers}proc": None if peerw_s is None else round(peerw_s / ours_s, 2),
                "end_to_end_images_per_s": rate(n, feat_s, ours_s),
                "speedup_end_to_end": None if feat_s is None else round((feat_s + peer_s) / (feat_s + ours_s), 2),
                "same_mask_fraction": round(float(same_mask), 3), "mean_mask_iou_vs_peers": round(float(iou), 4),
                "same_box_fraction": round(float(same_box), 3),
            }
    if not args.skip_scaling:
        copies = max(1, -(-args.scaling_images // n))
        ray_root = replicate_root(str(root) if root is not None else write_scene_root(n), copies)
        result["ray_job_scaling"] = {"solver": args.solver, "images": n * copies,
                                     "note": "each run in a fresh process pinned to its cores (sched_setaffinity); "
                                             "wall includes Ray start-up, actor start-up and model loading",
                                     "runs": run_scaling(ray_root, n * copies, args.backbone, args.size, args.solver,
                                                         args.batch_size)}
        ok = [r for r in result["ray_job_scaling"]["runs"] if "images_per_s" in r]
        if len(ok) == 2:
            result["ray_job_scaling"]["speedup_2_vs_1_cpu"] = round(ok[1]["images_per_s"] / ok[0]["images_per_s"], 2)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
