"""Milliseconds per training step of the dense NCut model, split by phase; NCut share of the step.

One step of ``dncut.train`` (ViT-S/16 ``vit_small_patch16_224.dino`` built with
``pretrained=False``: weights do not change the timing) is run in stages so that every phase
is timed on its own, with ``torch.cuda.synchronize()`` around each timed region on a GPU::

    data       B JPEG files -> dncut.data.pipeline.ViewMaker (decode + two views, one process)
               -> collate -> device                           view1, view2 (B, 3, S, S), boxes, flips
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
``ncut_ms`` = ncut + ncut_bwd; ``ncut_share`` = ncut_ms / step_ms (data excluded: Ray Data
decodes in parallel CPU tasks while the workers compute; ``step_with_data_ms`` includes it).

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
from dncut.data.pipeline import ViewMaker
from dncut.data.scenes import make_scene
from dncut.losses import BranchPair, NCutLoss
from dncut.model import DenseNCutModel
from dncut.ncut import SOLVERS, normalized_cut
from dncut.train import build_loss, build_model, build_optimizer
from dncut.views import align_to_overlap, overlap_boxes

BACKBONE = "vit_small_patch16_224.dino"
DEFAULT_BATCH = {"cpu": 8, "cuda": 256}
PHASES = ("data", "backbone", "ncut", "loss", "loss_bwd", "ncut_bwd", "backbone_bwd", "optimizer")
BATCH_KEYS = ("view1", "view2", "box1", "box2", "flip1", "flip2")


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


def load_batch(maker: ViewMaker, uris: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode + two views for every URI, collated on ``device`` in ``BATCH_KEYS`` order."""
    rows = [maker({"uri": u, "epoch": 0, "index": i}) for i, u in enumerate(uris)]
    bad = [r["error"] for r in rows if not r["ok"]]
    if bad:
        raise RuntimeError(f"bench images failed to decode: {bad[:3]}")
    return [torch.from_numpy(np.stack([r[k] for r in rows])).to(device, non_blocking=True) for k in BATCH_KEYS]


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
    runs, losses = [], []
    with tempfile.TemporaryDirectory(prefix="dncut-bench-") as tmp:
        uris = write_jpegs(Path(tmp), batch, args.image_size)
        for i in range(args.warmup + args.repeats):
            timer = Timer(device)
            with timer("data"):
                data = load_batch(maker, uris, device)
            if i == 0:
                reference = model_loss(model, criterion, data, amp)
            loss = staged_step(model, criterion, optimizer, data, timer, amp=amp, grad_clip=cfg.train.grad_clip)
            if i == 0:
                matches = abs(loss - reference) <= 1e-3 * max(1.0, abs(reference)) + (5e-2 if amp else 0.0)
            losses.append(loss)
            if i >= args.warmup:
                runs.append(timer.ms)
    for r in runs:
        r["step"] = sum(r[p] for p in PHASES if p != "data")
        r["step_with_data"] = r["step"] + r["data"]
        r["ncut_total"] = r["ncut"] + r["ncut_bwd"]
    summary = summarise(runs)
    med = {k: v["median"] for k, v in summary.items()}
    s = model.align_size
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
