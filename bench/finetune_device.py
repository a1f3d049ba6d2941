"""Finetuning recipes on an accelerator without Ray: ``dncut.train.loop``'s one-worker loop, in-process.

The device machine of ``bench/gpu_check.sh`` has PyTorch but no Ray (and too little room to
carry it), so ``bench/finetune_quality.py`` (``dncut.train.fit``) cannot run there. This bench
runs what one Ray Train worker runs, with the library's own parts and nothing restated::

    rows     dncut.data.pipeline.epoch_rows(source_uris(cfg), seed, epochs_needed(...))   (file order)
    views    dncut.data.pipeline.ViewMaker(cfg)(row), in a process pool, order kept        (Ray Data's map)
    batches  consecutive ``train.batch_size`` rows, last partial batch dropped             (iter_torch_batches)
    model    torch.manual_seed(seed); dncut.train.loop: build_model / build_loss / build_optimizer / run_schedule
    step     dncut.train.loop.train_one_step
    validate dncut.train.chief.Chief (rank 0's duties, without tracking): at step 0 and every
             ``train.val_every`` steps on sod-val's tune half at 320 px; ``train.export: best_val_iou``
             exports the best encoder at once, ``last`` at the end
    score    bench/finetune_quality.py's ``score`` of the exported encoder (all of sod-val and the
             held-out half, at every evaluation size), and of the pretrained one (``before``)

``tests/test_contract.py::test_same_seed_same_losses_other_seed_other_losses`` checks on the CPU that
its per-step losses equal those of ``dncut.train.fit`` (Ray Train, one worker) for the same config, bit
for bit (validation and export are the library's own calls, not compared there).

Each (recipe, tap, seed) is one subprocess (``--parallel`` at a time on the one device); the JSON
(``--out``) is rewritten after every finished run, so a run stopped at its time limit keeps what
it finished. Jobs not started by ``--deadline-s`` are recorded as skipped.

Run::

    python bench/finetune_device.py --device cuda --recipe demo: \\
        --recipe 'b64=train.batch_size=64;train.base_batch_size=64;loss.min_pass=32;train.max_steps=200'

A recipe is ``NAME=KEY=VALUE;KEY=VALUE`` (overrides of ``--config``; ``NAME:`` or ``NAME=`` alone is the
config as it is).

Output: ``bench/results/finetune_device.json`` (``--out``; ``bench/finetune_device.sh`` writes
``$OUT/finetune_device_<card>.json`` on the device machine) and the exported encoders under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import finetune_quality as fq  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train/demo.yaml", help="base recipe (the demo's)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=K=V;K=V",
                   help="a named set of overrides (repeatable); default: the config as it is")
    p.add_argument("--taps", nargs="+", default=["efficientnet_lite0_s16"], choices=fq.TAPS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-sizes", type=int, nargs="+", default=[320, 480])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time on the device")
    p.add_argument("--view-workers", type=int, default=2, help="view-making processes per run")
    p.add_argument("--deadline-s", type=float, default=math.inf, help="start no run after this many seconds")
    p.add_argument("--train-dir", default=str(fq.SHARED / "bsds-unlabeled"))
    p.add_argument("--val-dir", default=str(fq.SHARED / "sod-val"))
    p.add_argument("--output-dir", default="outputs/finetune_device")
    p.add_argument("--out", default=str(HERE / "results" / "finetune_device.json"))
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, JSON spec
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """``"name=a.b=1;c=2"`` -> ``("name", ["a.b=1", "c=2"])``; ``"name:"`` -> ``("name", [])``."""
    match = re.fullmatch(r"([\w.-]+)[=:](.*)", text)
    if match is None:
        raise SystemExit(f"finetune_device: --recipe {text!r} is not NAME=KEY=VALUE;... or NAME:")
    return match[1], [kv for kv in match[2].split(";") if kv]


def parse_recipes(texts: list[str]) -> dict[str, list[str]]:
    """``--recipe`` values -> ``{name: overrides}``; a name used twice, or ``before`` (the baseline's
    key), is an error."""
    recipes: dict[str, list[str]] = {}
    for name, overrides in map(parse_recipe, texts):
        if name in recipes or name == "before":
            why = "reserved" if name == "before" else "used twice"
            raise SystemExit(f"finetune_device: recipe name {name!r} is {why}")
        recipes[name] = overrides
    return recipes


def job_config(args: argparse.Namespace, overrides: list[str], tap: str, seed: int, output_dir: str):
    """``bench/finetune_quality.py``'s config (tune-half validation, best_val_iou export) + the recipe."""
    base = argparse.Namespace(config=args.config, train_dir=args.train_dir, overrides=overrides)
    return fq.build_config(base, tap, seed, output_dir)


# ----------------------------------------------------------------------------- one run (a subprocess)


def _init_views(cfg_json: dict) -> None:
    import torch

    from dncut.config import Config
    from dncut.data.pipeline import ViewMaker

    global _MAKER
    torch.set_num_threads(1)  # as a Ray Data task (OMP_NUM_THREADS=1): many of these share the cores
    _MAKER = ViewMaker(Config.model_validate(cfg_json))


def _views(row: dict) -> dict:
    return _MAKER(row)


def collate(rows: list[dict], device) -> dict:
    """Rows of numpy arrays and scalars -> ``{key: (b, ...) tensor on device}`` (Ray's iter_torch_batches)."""
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.stack([np.asarray(r[k]) for r in rows])).to(device) for k in rows[0]}


def batches(cfg, uris: list[str], total: int, device, pool):
    """The run's batches in ``fit``'s order (one worker): dicts of ``(batch_size, ...)`` tensors on ``device``
    (``view1``/``view2`` ``(b, 3, S, S)`` uint8, boxes ``(b, 4)``, ...), views made by ``pool``."""
    from dncut.data.pipeline import epoch_rows, epochs_needed

    rows = epoch_rows(uris, cfg.seed, epochs_needed(len(uris), total, cfg.train.batch_size))
    bs, chunk = cfg.train.batch_size, []
    for row in pool.imap(_views, rows, chunksize=4):
        chunk.append(row)
        if len(chunk) == bs:
            yield collate(chunk, device)
            chunk = []


def train(cfg, device: str, view_workers: int) -> dict:
    """One run as one Ray Train worker would do it; ``backbone.pth`` per ``train.export`` (best val IoU or last).

    Returns ``{"losses": [per step, NaN for a skipped step], "val_curve": [...], "best_val_iou" (None
    with ``export: last``), "best_step", "export", "train_seconds", "collapsed", "nan_steps"}``.

    Raises:
        SystemExit: ``scaling.num_workers`` is not 1.
        RuntimeError: the rows ran out before ``total_steps`` (as ``train_loop_per_worker``).
    """
    import torch

    from dncut.data.pipeline import source_uris
    from dncut.train.checkpoints import EXPORT_FILE
    from dncut.train.chief import Chief
    from dncut.train.loop import (LoopState, build_loss, build_model, build_optimizer, run_schedule, train_one_step,
                                  val_due)

    if cfg.scaling.num_workers != 1:
        raise SystemExit(f"finetune_device: one worker only (scaling.num_workers={cfg.scaling.num_workers})")
    cfg = cfg.with_absolute_paths()
    store = cfg.storage_handle()
    t0, threads = time.perf_counter(), torch.get_num_threads()
    dev = torch.device(device)
    # the host side only feeds a GPU (--parallel runs share the cores); on the CPU as setup_worker
    torch.set_num_threads(2 if dev.type == "cuda" else max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # dncut.train.worker.setup_worker: seed + rank, rank 0
    model, criterion = build_model(cfg, store), build_loss(cfg)
    optimizer = build_optimizer(model, cfg)
    uris = source_uris(cfg)
    total = cfg.train.total_steps(len(uris))
    sched = run_schedule(cfg, total)
    model.to(dev)  # ray.train.torch.prepare_model on one worker
    state, losses = LoopState(), []
    os.makedirs(cfg.run_dir, exist_ok=True)
    chief = Chief(cfg, dev, model, state, store, track=False)  # validates step 0
    try:
        with mp.get_context("spawn").Pool(view_workers, _init_views, (cfg.model_dump(mode="json"),)) as pool:
            for batch in batches(cfg, uris, total, dev, pool):
                skipped = state.counters["nan_steps"]
                train_one_step(model, criterion, optimizer, batch, float(sched[state.step]), state, cfg, dev)
                ok = state.counters["nan_steps"] == skipped
                losses.append(float(state.last_parts.get("loss", math.nan)) if ok else math.nan)
                if val_due(state.step, total, cfg):
                    state.last_val = chief.validate(model, state.step)
                if state.step >= total:
                    break
    finally:
        torch.set_num_threads(threads)
    if state.step < total:
        raise RuntimeError(f"the training rows ran out at step {state.step} of {total}")
    chief.finish(model)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    curve = [{k: (v if k == "val_step" else round(float(v), fq.ROUND)) for k, v in c.items()} for c in chief.curve]
    return {"losses": losses, "val_curve": curve, "best_step": chief.best_step,
            "best_val_iou": chief.best if chief.best_step is not None else None,
            "export": os.path.join(cfg.run_dir, EXPORT_FILE),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "collapsed": state.last_parts.get("collapsed"), "nan_steps": state.counters["nan_steps"]}


def run_job(spec: dict) -> dict:
    """One (recipe, tap, seed): train, then score the exported encoder (or the pretrained one: ``before``)."""
    import torch

    from dncut.backbones import create_backbone
    from dncut.config import Config

    cfg = Config.model_validate(spec["config"])
    score_cfg = fq.scoring_config(cfg, spec["val_dir"])
    if spec.get("before"):
        backbone = create_backbone(cfg.model.backbone, pretrained=True)
        return {"scores": fq.score(backbone, score_cfg, spec["eval_sizes"], device=spec["device"])}
    out = train(cfg, spec["device"], spec["view_workers"])
    after = fq.score(create_backbone(cfg.model.backbone, checkpoint=out["export"]), score_cfg, spec["eval_sizes"],
                     device=spec["device"])
    return {**out, "scores": after, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- the orchestrator


def summarise(report: dict) -> None:
    """Per recipe and tap: delta per seed and mean delta (after - before) for every scored subset."""
    for recipe in report["recipes"].values():
        for tap, entry in recipe["taps"].items():
            before = report["before"].get(tap)
            runs = {s: r for s, r in entry["runs"].items() if "scores" in r}
            if before is None or not runs:
                continue
            for r in runs.values():
                r["delta"] = {k: {m: round(r["scores"][k][m] - before[k][m], fq.ROUND) for m in before[k]}
                              for k in before}
            entry["mean_delta"] = {k: {m: round(sum(r["delta"][k][m] for r in runs.values()) / len(runs), fq.ROUND)
                                       for m in before[k]} for k in before}
            entry["seeds_done"] = len(runs)


def launch(spec: dict, folder: str, index: int) -> tuple[subprocess.Popen, str]:
    """Start job ``index`` (``spec``) as ``python finetune_device.py --job FOLDER/job<index>.json``."""
    path = os.path.join(folder, f"job{index}.json")
    Path(path).write_text(json.dumps(spec))
    with open(path + ".log", "w") as log:  # the child holds its own copy of the handle
        proc = subprocess.Popen([sys.executable, __file__, "--job", path], stdout=log, stderr=subprocess.STDOUT)
    return proc, path


def build_queue(args: argparse.Namespace, recipes: dict[str, list[str]], output_dir: str) -> list[tuple[dict, tuple]]:
    """``[(job spec, (recipe name or "before", tap, seed))]``: the pretrained scores first, then seed-major."""
    common = {"val_dir": args.val_dir, "eval_sizes": args.eval_sizes, "device": args.device,
              "view_workers": args.view_workers}
    queue = [({**common, "before": True, "config": job_config(args, [], t, 0, output_dir).model_dump(mode="json")},
              ("before", t, None)) for t in args.taps]
    queue += [({**common, "config": job_config(args, o, t, s, os.path.join(output_dir, n)).model_dump(mode="json")},
               (n, t, s)) for s in args.seeds for n, o in recipes.items() for t in args.taps]
    return queue


def record(report: dict, key: tuple, result: dict) -> None:
    """File one finished job's result: a baseline under ``before``, a run under its recipe; errors apart."""
    name, tap, seed = key
    if "error" in result:
        report["errors"].append({"job": list(key), "error": result["error"]})
    elif name == "before":
        report["before"][tap] = result["scores"]
    else:
        report["recipes"][name]["taps"][tap]["runs"][str(seed)] = result
    summarise(report)


def write(report: dict, out: str, t_start: float) -> None:
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")


def job_result(proc: subprocess.Popen, path: str) -> dict:
    done = proc.returncode == 0 and Path(path + ".out").exists()
    return json.loads(Path(path + ".out").read_text()) if done else {
        "error": f"exit {proc.returncode}: " + Path(path + ".log").read_text()[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.job:
        spec = json.loads(Path(args.job).read_text())
        Path(args.job + ".out").write_text(json.dumps(run_job(spec), default=str))
        return {}
    fq.check_data(args.train_dir, args.val_dir)
    t_start = time.perf_counter()
    recipes = parse_recipes(args.recipe or ["config:"])
    output_dir = os.path.abspath(os.path.join(args.output_dir, time.strftime("%Y%m%d-%H%M%S")))
    fq.link_tune_half(Path(args.val_dir), Path(fq.TUNE_DIR))
    report = {"bench": "finetune_device", "config": args.config, "data": {"train": args.train_dir, "val": args.val_dir},
              "eval_sizes": args.eval_sizes, "before": {}, "skipped": [], "errors": [],
              "recipes": {n: {"overrides": o, "taps": {t: {"runs": {}} for t in args.taps}}
                          for n, o in recipes.items()},
              "machine": machine(args.device)}
    queue, folder = list(enumerate(build_queue(args, recipes, output_dir))), tempfile.mkdtemp(prefix="finetune_device_")
    running: list[tuple[subprocess.Popen, str, tuple]] = []
    while queue or running:
        while queue and len(running) < args.parallel:
            index, (spec, key) = queue.pop(0)
            if time.perf_counter() - t_start > args.deadline_s:
                report["skipped"].append(list(key))
            else:
                running.append((*launch(spec, folder, index), key))
        time.sleep(0.5)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, path, key = item
            record(report, key, job_result(proc, path))
            write(report, args.out, t_start)
            run = report["recipes"].get(key[0], {}).get("taps", {}).get(key[1], {}).get("runs", {}).get(str(key[2]), {})
            print(f"[{report['seconds_total']:7.1f}s] {' '.join(map(str, key))}: "
                  f"{'error' if proc.returncode else 'done'} "
                  f"{json.dumps({k: v['iou'] for k, v in run.get('delta', {}).items()})}", flush=True)
    write(report, args.out, t_start)  # the skipped jobs too
    return report


def machine(device: str) -> dict:
    import torch

    return {"cpus": os.cpu_count(), "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


if __name__ == "__main__":
    main()
