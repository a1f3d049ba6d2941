"""The main job on the embedded default (``make demo``): finetune and show the difference.

    held-out generated scenes (or data.val) -> Simple-NCut saliency with the pretrained backbone
    (dncut.eval.validate: the evaluation job's inference path)
    -> dncut.train.fit (local Ray, generated scenes or data.train) -> exported backbone
    -> Simple-NCut saliency again -> table (stdout + results.json) and figure
       (image | z2 before | z2 after | ground truth) under ``output_dir/run_name/``.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from dncut import storage
from dncut.backbones import create_backbone
from dncut.config import Config
from dncut.eval.methods import upsample_map
from dncut.eval.validate import score_backbone, validation_rows
from dncut.train import EXPORT_FILE, fit

log = logging.getLogger("dncut.demo")

def save_figure(path: str, samples: list[dict], before: list[np.ndarray], after: list[np.ndarray],
                rows: int = 4) -> None:
    """Grid image | z2 before | z2 after | ground truth, one row per validation row (``image``, ``gt_mask``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(samples))
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows), squeeze=False)
    for r in range(rows):
        image, mask = samples[r]["image"], samples[r]["gt_mask"]
        size = image.shape[:2]
        geometry = {"canvas": samples[r]["input"].shape[:2], "content": tuple(int(c) for c in samples[r]["content"])}
        panels = [(image, "image", None), (upsample_map(before[r], size, **geometry), "z2 before", "RdBu_r"),
                  (upsample_map(after[r], size, **geometry), "z2 after", "RdBu_r"), (mask, "ground truth", "gray")]
        for c, (img, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_table(before: dict, after: dict) -> str:
    lines = ["| Simple NCut | IoU | Acc | maxFβ | MAE |", "|---|---|---|---|---|"]
    for name, m in (("pretrained", before), ("finetuned (dncut)", after)):
        lines.append(f"| {name} | {m['iou']:.3f} | {m['acc']:.3f} | {m['max_fbeta']:.3f} | {m['mae']:.3f} |")
    return "\n".join(lines)


def run_demo(cfg: Config, *, progress: bool = False) -> dict:
    """Before/after saliency around one finetuning run; returns the results dict (``progress``:
    a progress bar for the finetuning on this console)."""
    if storage.is_s3(cfg.output_dir):
        raise ValueError("the demo writes a local figure: set output_dir to a local folder")
    out = cfg.run_dir
    storage.write_bytes(storage.join(out, "config.yaml"), cfg.to_yaml().encode())
    samples = validation_rows(cfg)
    log.info("demo: %d validation images; scoring the pretrained %s", len(samples), cfg.model.backbone)
    m = cfg.model
    pretrained = create_backbone(m.backbone, pretrained=m.pretrained and m.checkpoint is None, checkpoint=m.checkpoint,
                                 store=cfg.storage_handle(), trusted=m.trusted_checkpoint)
    before, z_before = score_backbone(pretrained, samples, cfg)
    t0 = time.perf_counter()
    result = fit(cfg, progress=progress)
    train_s = time.perf_counter() - t0
    finetuned = create_backbone(cfg.model.backbone, pretrained=False, checkpoint=storage.join(out, EXPORT_FILE),
                                store=cfg.storage_handle())
    after, z_after = score_backbone(finetuned, samples, cfg)
    save_figure(storage.join(out, "figure.png"), samples, z_before, z_after)
    results = {"backbone": cfg.model.backbone, "n_val_images": len(samples), "before": before, "after": after,
               "train_seconds": round(train_s, 1), "final_metrics": result.metrics,
               "figure": storage.join(out, "figure.png"), "exported_backbone": storage.join(out, EXPORT_FILE)}
    storage.write_bytes(storage.join(out, "results.json"), json.dumps(results, indent=2, default=str).encode())
    print("\n" + format_table(before, after))
    print(f"\nfigure: {results['figure']}\nweights: {results['exported_backbone']}\n"
          f"results: {storage.join(out, 'results.json')}")
    return results
