"""Unsupervised semantic segmentation on real photos: coco-mini rasterised into the 21 PASCAL VOC
classes, frozen features of a pretrained and a finetuned backbone (Table 3 protocol,
``dncut.eval.segmentation``).

    coco-mini images (train2017 + val2017, 159) -> 448 x 448 (bilinear) -> backbone features
    (dncut.eval.predict.Predictor.features: the one inference path) -> tokens of all images
    -> StandardScaler -> PCA 50 -> k-means K (5 restarts, 100 iterations; per seed)
    -> cluster maps and VOC class maps (COCO polygons, other categories and crowd = ignore) at
       100 x 100 (nearest) -> K = 21: Hungarian; K = --overcluster: majority vote -> mIoU

One process, no Ray (feature extraction of 159 images is seconds; the eval job's actors would
add start-up only). JSON to stdout and ``--out``. Exits with status 2 when coco-mini is absent.

    python bench/segmentation_quality.py --checkpoint outputs/finetune_quality/<run>/backbone.pth
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("DNCUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIZE = 448


def load_coco_mini(root: Path):
    """``[(image (H, W, 3) uint8, class map (H, W) uint8)]`` of both splits."""
    from dncut.data.images import decode_image
    from dncut.eval.segmentation import rasterise_coco

    out = []
    for split in ("train2017", "val2017"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        categories = {int(c["id"]): c["name"] for c in coco["categories"]}
        by_image: dict[int, list] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        for img in coco["images"]:
            pil = decode_image((root / split / img["file_name"]).read_bytes(), exif_transpose=False)
            labels = rasterise_coco(by_image.get(int(img["id"]), []), categories, pil.size)
            out.append((np.asarray(pil.convert("RGB")), labels))
    return out


def tokens_of(backbone, images: list[np.ndarray]) -> tuple[np.ndarray, tuple[int, int]]:
    """``(N * h * w, C)`` features of every image at SIZE x SIZE, and the grid ``(h, w)``."""
    import torch
    from PIL import Image

    from dncut.eval.predict import Predictor

    predictor = Predictor(backbone, ["simple"], "eigh")
    backbone.eval()
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            batch = [np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images[start:start + 16]]
            feats += [f.flatten(1).T.numpy() for f in predictor.features(batch)]  # (h*w, C) each
    grid = (SIZE // backbone.stride, SIZE // backbone.stride)
    return np.concatenate(feats), grid


def score(tokens: np.ndarray, grid: tuple[int, int], labels: list[np.ndarray], k: int, how: str, seed: int) -> float:
    from PIL import Image

    from dncut.eval.segmentation import SCORE_SIZE, assign, cluster_tokens, confusion, miou

    ids = cluster_tokens(tokens, k, seed=seed).reshape(len(labels), *grid)
    conf = np.zeros((k, 21), np.int64)
    for cluster_map, gt in zip(ids, labels):
        pred = np.asarray(Image.fromarray(cluster_map.astype(np.int32)).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))
        true = np.asarray(Image.fromarray(gt).resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))
        conf += confusion(pred, true, k, 21)
    return miou(conf, assign(conf, how))[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0_s16", help="registered backbone (`dncut backbones`)")
    p.add_argument("--checkpoint", action="append", default=[], help="finetuned backbone.pth (repeatable)")
    p.add_argument("--overcluster", type=int, default=100, help="K of the majority-vote (overclustering) score")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-means seeds (mean reported)")
    p.add_argument("--root", default=str(SHARED / "coco-mini"), help="coco-mini folder")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "segmentation_quality.json"))
    args = p.parse_args(argv)
    if not Path(args.root, "annotations").is_dir():
        print(f"segmentation_quality: no coco-mini at {args.root}", file=sys.stderr)
        raise SystemExit(2)
    import torch

    from dncut.backbones import create_backbone

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    data = load_coco_mini(Path(args.root))
    images, labels = [d[0] for d in data], [d[1] for d in data]
    weights = {"pretrained": None, **{f"finetuned:{c}": c for c in args.checkpoint}}
    results = {}
    for name, ckpt in weights.items():
        backbone = create_backbone(args.backbone, pretrained=ckpt is None, checkpoint=ckpt)
        tokens, grid = tokens_of(backbone, images)
        runs = {"k21_hungarian": [score(tokens, grid, labels, 21, "hungarian", s) for s in args.seeds],
                f"k{args.overcluster}_majority": [score(tokens, grid, labels, args.overcluster, "majority", s)
                                                  for s in args.seeds]}
        results[name] = {k: {"miou_mean": round(float(np.mean(v)), 4), "per_seed": [round(float(x), 4) for x in v]}
                         for k, v in runs.items()}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    report = {"bench": "segmentation_quality", "data": {"root": args.root, "images": len(images), "classes": 21,
                                                        "ignore": "non-VOC categories, crowd regions"},
              "protocol": {"size": SIZE, "pca": 50, "kmeans_restarts": 5, "kmeans_iters": 100, "score_size": 100,
                           "overcluster_k": args.overcluster, "seeds": args.seeds},
              "backbone": args.backbone, "results": results, "seconds": round(time.perf_counter() - t0, 1),
              "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                          "python": platform.python_version(), "torch": torch.__version__},
              "reference": {"paper_table3_dino_vits16": {"k500_majority": 17.4, "k21_hungarian": 4.6}}}
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
