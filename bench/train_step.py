"""Milliseconds per training step of the dense NCut model, split by phase; NCut share of the step.

One step of ``dncut.train`` (ViT-S/16 ``vit_small_patch16_224.dino`` built with
``pretrained=False``: weights do not change the timing) is run in stages so that every phase
is timed on its own, with ``torch.cuda.synchronize()`` around each timed region on a GPU::

    data       the CPU side, per pair, in this process: B JPEG files (page-cached) ->
               dncut.data.pipeline.ViewMaker (header, crop boxes, draft decode, two uint8 crops,
               flips, photometric parameters)               B rows
    transfer   collate -> device (as iter_torch_batches)    view1, view2 (B, 3, S, S) uint8, boxes,
                                                            flips, aug1, aug2 (B, 13)
    augment    dncut.train.model_inputs: photometric.apply on the device, both views
                                                            view1, view2 (B, 3, S, S) float in [0, 1]
    backbone   encoder + projector g + predictor q + RoIAlign onto the overlap, forward
               (bf16 autocast on GPU, as train.py)          aligned maps (2B, P, s, s) x 2 branches
    ncut       normalized_cut of the online maps (autograd) + of the target maps (no grad)
                                                            z_online, z_target (2B, s*s)
    loss       NCutLoss.symmetric                           scalar
    loss_bwd   d loss / d z_online
    ncut_bwd   d loss / d aligned online maps through the NCut layer (Eq. 7-8)
    backbone_bwd  the rest of the backward (alignment, q, g, encoder)
    optimizer  gradient clipping + optimizer step

The staged step reproduces ``DenseNCutModel.forward`` from its parts; the first step checks
that its loss equals the model's own forward on the same batch (``staged_loss_matches``).
``ncut_ms`` = ncut + ncut_bwd; ``ncut_share`` = ncut_ms / step_ms. ``step`` is what a training
worker spends per step on its device: augment .. optimizer. ``data`` and ``transfer`` are left
out (Ray Data decodes and crops in parallel CPU tasks, and its prefetch threads collate and copy,
while the workers compute); ``step_with_data_ms`` adds them, as if done serially.

CPU cores per GPU: the data phase runs on one torch thread, as a Ray Data decode task does
(``data_cpu_per_wall``, the process CPU time over the wall time of the data phase, ~1), so the per-core rate is
``cpu_pairs_per_s_per_core = B / data_s`` (median data phase). The GPU consumes ``B / step_s``
pairs a second, so it needs ``cpu_cores_per_gpu = (B / step_s) / cpu_pairs_per_s_per_core`` cores
of decode tasks (``data.decode_cpus = 1``); ``cpu_cores_per_gpu_for_batch_256`` is the same with
``B = 256`` and this run's step time, i.e. meaningful for a ``--batch 256`` run (the GPU
default); ``cpu_cores_note`` says when the run's batch is another.

Run::

    python bench/train_step.py                          # CPU, batch 8, crop 224, 1 thread (< 3 min)
    python bench/train_step.py --device cuda            # GPU, batch 256, bf16 autocast
    python bench/train_step.py --solver lobpcg          # the fast NCut solver, when registered

CPU threads: like a training worker (``torch.set_num_threads(scaling.cpus_per_worker)``, 1 by
default); ``--threads 0`` keeps torch's default. On a busy machine multi-threaded LAPACK
(``eigh``) can slow down by orders of magnitude (threads spin while waiting for cores), so the
1-minute load average is recorded with the result.

JSON goes to stdout and to ``--out`` (default ``bench/results/train_step_<device>.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dncut.config import Config, load_config
from dncut.data.pipeline import ViewMaker, decode_failure, file_key
from dncut.data.scenes import make_scene
from dncut.losses import BranchPair, NCutLoss
from dncut.model import DenseNCutModel
from dncut.ncut import SOLVERS, normalized_cut
from dncut.train import build_loss, build_model, build_optimizer, model_inputs
from dncut.views import align_to_overlap, overlap_boxes

BACKBONE = "vit_small_patch16_224.dino"
DEFAULT_BATCH = {"cpu": 8, "cuda": 256}
PHASES = ("data", "transfer", "augment", "backbone", "ncut", "loss", "loss_bwd", "ncut_bwd", "backbone_bwd",
          "optimizer")
OFF_STEP = ("data", "transfer")
"""Phases that run beside the step in training (CPU tasks, Ray Data's prefetch threads)."""
BATCH_KEYS = ("view1", "view2", "box1", "box2", "flip1", "flip2", "aug1", "aug2", "ok")


# ----------------------------------------------------------------------------- set-up


def resolve_solver(requested: str) -> tuple[str, str | None]:
    """``(solver to use, note)``: falls back to ``eigh`` when ``requested`` is not registered."""
    if requested in SOLVERS:
        return requested, None
    return "eigh", f"solver {requested!r} is not in dncut.ncut.SOLVERS {sorted(SOLVERS)}; used 'eigh'"


def bench_config(batch: int, crop: int, solver: str, optimizer: str) -> Config:
    """The training config of the timed step (paper defaults otherwise)."""
    return load_config(None, [
        f"model.backbone={BACKBONE}", "model.pretrained=false", f"data.crop_size={crop}",
        f"train.batch_size={batch}", f"train.base_batch_size={batch}", f"train.optimizer={optimizer}",
        f"ncut.solver={solver}", f"loss.min_pass={min(20, batch)}", "train.warmup_steps=0",
    ])


def write_jpegs(folder: Path, count: int, size: int) -> list[str]:
    """``count`` generated photos-like JPEGs of ``size`` px (a stand-in for ImageNet files)."""
    uris = []
    for i in range(count):
        buf = io.BytesIO()
        make_scene(i, size=size)[0].save(buf, format="JPEG", quality=90)
        path = folder / f"img_{i:04d}.jpg"
        path.write_bytes(buf.getvalue())
        uris.append(str(path))
    return uris


def folder_jpegs(folder: str, count: int) -> list[str]:
    """The first ``count`` JPEGs of ``folder`` (sorted), repeated when it holds fewer."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    if not names:
        raise SystemExit(f"--images {folder}: no JPEG files")
    return [os.path.join(folder, names[i % len(names)]) for i in range(count)]


@contextmanager
def one_thread():
    """torch on one CPU thread, as in a Ray Data decode task (Ray sets ``OMP_NUM_THREADS`` to the
    task's CPUs, at least 1): ViewMaker's decode and resize are torch ops, and intra-op threads would
    spread one task's work over cores the per-core rate does not count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall milliseconds per phase, synchronising the device around each region."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.ms[phase] = self.ms.get(phase, 0.0) + 1e3 * (time.perf_counter() - t0)


def make_pairs(maker: ViewMaker, rows: list[dict], epoch: int) -> list[dict]:
    """The CPU side of every pair: ``ViewMaker`` on rows whose bytes are in memory (as Ray Data's
    file reader hands them to the decode tasks)."""
    pairs = [maker({**row, "epoch": epoch}) for row in rows]
    bad = [decode_failure(r["failure"]) for r in pairs if not r["ok"]]
    if bad:
        raise RuntimeError(f"bench images failed to decode: {bad[:3]}")
    return pairs


def collate(pairs: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Rows -> a batch of tensors on ``device`` (``BATCH_KEYS``), as ``iter_torch_batches`` gives it."""
    return {k: torch.from_numpy(np.stack([r[k] for r in pairs])).to(device, non_blocking=True) for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- the staged step


def _ncut(model: DenseNCutModel, maps: torch.Tensor) -> torch.Tensor:
    """Aligned maps (N, P, s, s) -> z2 (N, s*s), with the model's graph options."""
    feats = maps.flatten(2).transpose(1, 2)  # (N, s*s, P)
    o = model.ncut
    return normalized_cut(feats.float(), affinity=o.affinity, tau=o.tau, laplacian=o.laplacian,
                          solver=o.solver).eigvec


def staged_step(model: DenseNCutModel, criterion: NCutLoss, optimizer: torch.optim.Optimizer,
                batch: list[torch.Tensor], timer: Timer, *, amp: bool, grad_clip: float | None) -> float:
    """One optimizer step, each phase timed; returns the loss value."""
    view1, view2, box1, box2, flip1, flip2 = batch
    b, s = view1.shape[0], model.align_size
    optimizer.zero_grad(set_to_none=True)
    with timer("backbone"):
        with torch.autocast(view1.device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.encoder(torch.cat([view1, view2]))  # (2B, C, h, w)
            target = model.projector(feats)  # (2B, P, h, w)
            online = model.predictor(target)  # (2B, P, h, w)
        overlap = overlap_boxes(box1, box2)  # (B, 4)
        boxes, both = torch.cat([box1, box2]), torch.cat([overlap, overlap])  # (2B, 4), (2B, 4)
        flips = torch.cat([flip1, flip2]).bool()  # (2B,)
        on = align_to_overlap(online.float(), boxes, both, flips, s)  # (2B, P, s, s)
        with torch.no_grad():
            tg = align_to_overlap(target.detach().float(), boxes, both, flips, s)  # (2B, P, s, s)
    on_leaf = on.detach().requires_grad_(True)  # the NCut layer's input, cut from the backbone graph
    with timer("ncut"):
        z_on = _ncut(model, on_leaf)  # (2B, s*s)
        with torch.no_grad():
            z_tg = _ncut(model, tg)  # (2B, s*s)
    z_leaf = z_on.detach().requires_grad_(True)  # the loss input, cut from the NCut graph
    with timer("loss"):
        ab = BranchPair(z_leaf[:b], z_tg[b:], on_leaf[:b], tg[b:])
        ba = BranchPair(z_leaf[b:], z_tg[:b], on_leaf[b:], tg[:b])
        loss, _ = criterion.symmetric(ab, ba, shape=(s, s))
    with timer("loss_bwd"):
        loss.backward()
    with timer("ncut_bwd"):
        if z_leaf.grad is not None:  # None only for a loss that ignores z (pixel consistency)
            z_on.backward(z_leaf.grad)
    with timer("backbone_bwd"):
        grad_on = on_leaf.grad if on_leaf.grad is not None else torch.zeros_like(on)
        on.backward(grad_on)
    with timer("optimizer"):
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return float(loss.detach())


def model_loss(model: DenseNCutModel, criterion: NCutLoss, batch: list[torch.Tensor], amp: bool) -> float:
    """The loss of ``DenseNCutModel.forward`` (no step), to check the staged step against."""
    with torch.no_grad(), torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(*batch)
    loss, _ = criterion.symmetric(out.ab, out.ba, shape=out.shape)
    return float(loss)


# ----------------------------------------------------------------------------- driver


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and mean ms per phase over the timed steps."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 2), "mean": round(statistics.fmean(values), 2)}
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or DEFAULT_BATCH[device.type]
    solver, note = resolve_solver(args.solver)
    cfg = bench_config(batch, args.crop, solver, args.optimizer)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    criterion = build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.effective_lr()
    amp = cfg.train.amp and device.type == "cuda"
    maker = ViewMaker(cfg)
    runs, losses, cpu_per_wall = [], [], []
    with tempfile.TemporaryDirectory(prefix="dncut-bench-") as tmp:
        uris = folder_jpegs(args.images, batch) if args.images else write_jpegs(Path(tmp), batch, args.image_size)
        rows = [{"uri": u, "bytes": Path(u).read_bytes(), "key": file_key(u)} for u in uris]
        for i in range(args.warmup + args.repeats):
            timer = Timer(device)
            cpu0 = time.process_time()
            with timer("data"), one_thread():
                pairs = make_pairs(maker, rows, epoch=i)  # a new epoch each step: fresh crops and parameters
            cpu_s = time.process_time() - cpu0
            with timer("transfer"):
                batch_tensors = collate(pairs, device)
            with timer("augment"):
                data = model_inputs(batch_tensors)  # view1, view2 (augmented), box1, box2, flip1, flip2
            if i >= args.warmup:
                cpu_per_wall.append(cpu_s / (timer.ms["data"] / 1e3))
            if i == 0:
                reference = model_loss(model, criterion, data, amp)
            loss = staged_step(model, criterion, optimizer, data, timer, amp=amp, grad_clip=cfg.train.grad_clip)
            if i == 0:
                matches = abs(loss - reference) <= 1e-3 * max(1.0, abs(reference)) + (5e-2 if amp else 0.0)
            losses.append(loss)
            if i >= args.warmup:
                runs.append(timer.ms)
    for r in runs:
        r["step"] = sum(r[p] for p in PHASES if p not in OFF_STEP)
        r["step_with_data"] = r["step"] + sum(r[p] for p in OFF_STEP)
        r["ncut_total"] = r["ncut"] + r["ncut_bwd"]
    summary = summarise(runs)
    med = {k: v["median"] for k, v in summary.items()}
    s = model.align_size
    step_s = med["step"] / 1e3
    pairs_per_core = batch / (med["data"] / 1e3)  # one thread: PIL + numpy only
    result = {
        "bench": "train_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "backbone": BACKBONE,
        "pretrained": False,
        "batch": batch,
        "crop": args.crop,
        "graphs_per_step": {"online_with_grad": 2 * batch, "target_no_grad": 2 * batch, "nodes": s * s},
        "solver": solver,
        "solver_requested": args.solver,
        "solver_note": note,
        "optimizer": args.optimizer,
        "bf16_autocast_backbone": amp,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "staged_loss_matches": bool(matches),
        "losses": [round(x, 4) for x in losses],
        "ms_median": {k: med[k] for k in (*PHASES, "ncut_total", "step", "step_with_data")},
        "ms": summary,
        "backbone_fwd_bwd_ms": round(med["backbone"] + med["backbone_bwd"], 2),
        "ncut_ms": med["ncut_total"],
        "ncut_share": round(med["ncut_total"] / med["step"], 4),
        "ncut_share_with_data": round(med["ncut_total"] / med["step_with_data"], 4),
        "data_ms_per_image": round(med["data"] / batch, 2),
        "images": args.images or f"generated scenes, {args.image_size} px",
        "data_cpu_per_wall": round(statistics.median(cpu_per_wall), 3),
        "augment_ms": med["augment"],
        "cpu_pairs_per_s_per_core": round(pairs_per_core, 2),
        "device_pairs_per_s": round(batch / step_s, 2),
        "cpu_cores_per_gpu": round((batch / step_s) / pairs_per_core, 3),
        "cpu_cores_per_gpu_for_batch_256": round((256 / step_s) / pairs_per_core, 3),
        "cpu_cores_formula": "(B / step_s) / cpu_pairs_per_s_per_core; _for_batch_256: B = 256, step_s of this run",
        "cpu_cores_note": None if batch == 256 else
        f"this run's step is for batch {batch}: cpu_cores_per_gpu_for_batch_256 assumes that step time for 256 pairs "
        "(only meaningful with --batch 256); cpu_cores_per_gpu uses the run's own batch",
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default: 8 on CPU, 256 on GPU)")
    p.add_argument("--crop", type=int, default=224, help="view size (multiple of 16)")
    p.add_argument("--image-size", type=int, default=320, help="side of the generated JPEGs that are decoded")
    p.add_argument("--images", default=None,
                   help="folder of JPEGs to decode instead (the first --batch files, repeated when fewer)")
    p.add_argument("--solver", default="eigh", choices=["eigh", "lobpcg"],
                   help="NCut eigensolver (falls back to eigh when lobpcg is not registered)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, as a train worker with scaling.cpus_per_worker=1; "
                        "0 keeps torch's default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 CPU, 3 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 3 CPU, 10 GPU)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/train_step_<device>.json)")
    args = p.parse_args(argv)
    kind = torch.device(args.device).type
    args.warmup = (1 if kind == "cpu" else 3) if args.warmup is None else args.warmup
    args.repeats = (3 if kind == "cpu" else 10) if args.repeats is None else args.repeats
    args.threads = (1 if kind == "cpu" else 0) if args.threads is None else args.threads
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    suffix = "" if result["solver"] == "eigh" else f"_{result['solver']}"
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step_{kind}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
