"""Every downstream task on the shared real photos, pretrained vs finetuned Lite0, in one table.

    1. the finetuned backbone: ``--finetuned PATH`` (a ``backbone.pth``), or trained here with the
       demo's recipe (configs/train/demo.yaml) on the 200 unlabelled BSDS photos (``dncut.train.fit``)
    2. FOUND's heads (``dncut.train.found.fit_found``, configs/found/bsds.yaml): one on the
       pretrained, one on the finetuned backbone, both on the BSDS photos
    3. FOUND's background pseudo-masks (the CNN seed rule of ``dncut.eval.found``) scored on sod-val
    4. ``dncut eval`` (``run_evaluation``) with configs/eval/shared.yaml and both checkpoints:
       saliency on sod-val (Simple, TokenCut, FOUND), CorLoc on coco-mini (Simple, TokenCut, MOST
       any-box / single-box, FOUND), segmentation mIoU on coco-mini (K = 21, K = 100)

Writes ``bench/results/downstream_summary.json`` (every run, the FOUND heads' last training
metrics, the pseudo-mask scores, timings, the machine) and ``downstream_summary.md`` (the eval
job's summary.md: the paper's layout). The eval outputs (per_image.parquet with every box,
examples.png with predicted and ground-truth boxes) stay under ``--work``.

    python bench/downstream_summary.py [--finetuned outputs/.../backbone.pth]

Exits with a message (status 2) when ../shared/data is absent. About 25 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("DNCUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "efficientnet_lite0_s16"


def finetune(work: Path) -> str:
    """The demo's recipe on the BSDS photos -> ``backbone.pth``."""
    from dncut.config import load_config
    from dncut.train import EXPORT_FILE, fit

    cfg = load_config("configs/train/demo.yaml", [f"output_dir={work}", "run_name=finetuned",
                                                  f"data.train={SHARED / 'bsds-unlabeled'}", "tracking.tensorboard=false"])
    fit(cfg)
    return str(work / "finetuned" / EXPORT_FILE)


def found_head(work: Path, name: str, checkpoint: str | None) -> tuple[str, dict]:
    """FOUND's head on the BSDS photos for one backbone checkpoint -> (head file, last metrics)."""
    from dncut.config import load_config
    from dncut.train import HEAD_FILE, fit_found

    overrides = [f"output_dir={work}", f"run_name={name}", f"data.train={SHARED / 'bsds-unlabeled'}",
                 "tracking.tensorboard=false"] + ([f"model.checkpoint={checkpoint}"] if checkpoint else [])
    result = fit_found(load_config("configs/found/bsds.yaml", overrides))
    return str(work / name / HEAD_FILE), {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}


def pseudo_mask_scores(checkpoint: str | None, image_size: int = 320) -> dict:
    """FOUND's background pseudo-masks (no head) on sod-val: IoU / Acc and the foreground fraction,
    through the one inference path (``network_input``, ``Predictor.features``, ``upsample_mask``)."""
    import numpy as np
    import torch

    from dncut.backbones import create_backbone
    from dncut.data.images import decode_image, load_mask
    from dncut.eval.found import pseudo_masks
    from dncut.eval.methods import upsample_mask
    from dncut.eval.predict import Predictor, network_input

    backbone = create_backbone(BACKBONE, pretrained=checkpoint is None, checkpoint=checkpoint).eval()
    predictor = Predictor(backbone, ["simple"], "eigh")
    ious, accs, fg = [], [], []
    for path in sorted((SHARED / "sod-val" / "images").iterdir()):
        image = np.asarray(decode_image(path.read_bytes()))
        gt = load_mask(next((SHARED / "sod-val" / "masks").glob(path.stem + ".*")).read_bytes())
        net, _ = network_input(image, stride=backbone.stride, image_size=image_size, pad_rgb=backbone.spec.pad_rgb)
        with torch.inference_mode():
            grid = pseudo_masks(predictor.features([net])[0][None])[0].numpy()  # (h, w)
        mask = upsample_mask(grid, gt.shape)
        ious.append(np.count_nonzero(mask & gt) / max(1, np.count_nonzero(mask | gt)))
        accs.append(float(np.mean(mask == gt)))
        fg.append(float(grid.mean()))
    return {"iou": round(float(np.mean(ious)), 4), "acc": round(float(np.mean(accs)), 4),
            "foreground_fraction": round(float(np.mean(fg)), 4), "images": len(ious)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetuned", default=None, help="a finetuned Lite0 s16 backbone.pth (default: train one here)")
    p.add_argument("--work", default="outputs/downstream", help="working folder for runs and eval outputs")
    p.add_argument("--out", default=str(RESULTS / "downstream_summary.json"))
    args = p.parse_args(argv)
    if not (SHARED / "sod-val").is_dir() or not (SHARED / "coco-mini").is_dir():
        print(f"downstream_summary: no shared data at {SHARED}", file=sys.stderr)
        raise SystemExit(2)
    import ray

    from dncut.config import load_config
    from dncut.eval.jobs import run_evaluation
    from dncut.eval.report import format_table
    from dncut import storage

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(logging_level="ERROR", log_to_driver=False)
    work, t0, timings = Path(args.work).resolve(), time.perf_counter(), {}
    finetuned = os.path.abspath(args.finetuned) if args.finetuned else finetune(work)
    timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    heads, head_metrics = [], {}
    for name, ckpt in (("found_pretrained", None), ("found_finetuned", finetuned)):
        t = time.perf_counter()
        head, head_metrics[name] = found_head(work, name, ckpt)
        heads.append(head)
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pseudo = {"pretrained": pseudo_mask_scores(None), "finetuned": pseudo_mask_scores(finetuned)}
    timings["pseudo_masks_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    cfg = load_config("configs/eval/shared.yaml", [f"output_dir={work}", "run_name=eval"]).with_overrides({
        "eval.checkpoints": [None, finetuned], "eval.found_heads": heads,
        **{f"eval.datasets.{i}.root": str(SHARED / d.root.split("data/", 1)[1])
           for i, d in enumerate(load_config("configs/eval/shared.yaml").eval.datasets)},
        **{f"eval.datasets.{i}.annotations": str(SHARED / d.annotations.split("data/", 1)[1])
           for i, d in enumerate(load_config("configs/eval/shared.yaml").eval.datasets) if d.annotations}})
    summary = run_evaluation(cfg)
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    ray.shutdown()
    table = format_table(summary)
    report = {"bench": "downstream_summary", "backbone": BACKBONE, "finetuned": finetuned,
              "config": "configs/eval/shared.yaml", "found_heads": dict(zip(head_metrics, heads)),
              "found_head_training": head_metrics, "found_pseudo_masks_sod_val": pseudo, "runs": summary["runs"],
              "eval_outputs": str(work / "eval"), "seconds": timings,
              "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                          "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = storage.read_bytes(str(work / "eval" / "summary.md")).decode()
    Path(args.out).with_suffix(".md").write_text(md)
    print(table)
    return report


if __name__ == "__main__":
    main()
