"""The DINOv2 (patch 14, registers) and DINOv3 (rotary, storage tokens) test variants through the
real commands: ``dncut eval-saliency`` scores an official-layout file exactly as the same weights in
timm's layout, and ``dncut train`` runs a few steps on each from random weights (the patch-14 grid
end to end: 56 px crops = 4 x 4 patches). Ray tests: run under the shared lock.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dncut import backbones as bb
from dncut.data.scenes import make_scene

# the official layouts are made by inverting timm's filters, as in test_weights
from test_weights import timm_state, to_official  # noqa: E402

pytestmark = pytest.mark.ray
SIDE = 60  # not a multiple of 14 or 16: saliency snaps, both strides


def _folder(root: Path, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = make_scene(900 + i, size=SIDE)
        image.save(root / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i}.png")
    return root


@pytest.mark.parametrize("name,kind", [("vit_dinov2_reg_test", "dinov2_reg"), ("vit_dinov3_test", "dinov3")])
def test_official_file_scores_exactly_as_timms_layout(ray_session, tmp_path: Path, name: str, kind: str):
    from dncut.backbone_specs import spec
    from dncut.cli import main

    root = _folder(tmp_path / "set")
    official = tmp_path / f"{kind}_official.pth"
    torch.save(to_official(kind, timm_state(spec(name), seed=21)), official)
    timm_layout = tmp_path / f"{kind}_timm.pth"
    torch.save(bb.create_backbone(name, checkpoint=str(official)).model.state_dict(), timm_layout)
    summaries = []
    for ckpt in (official, timm_layout):
        out = tmp_path / ckpt.stem
        assert main(["eval-saliency", "--images", str(root / "images"), "--masks", str(root / "masks"),
                     "--backbone", name, "--checkpoint", str(ckpt), "--method", "simple", "tokencut",
                     "--out", str(out), "--config", "eval/smoke", "--set", "eval.image_size=64", "--quiet"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    a, b = ([{k: r[k] for k in ("method", "n_images", "n_failed", "metrics")} for r in s["runs"]] for s in summaries)
    assert a == b and a and all(r["n_images"] == 3 and r["n_failed"] == 0 for r in a)


@pytest.mark.parametrize("name,crop", [("vit_dinov2_reg_test", 56), ("vit_dinov3_test", 64)])
def test_training_smoke_on_random_weights(ray_session, tmp_path: Path, name: str, crop: int):
    from dncut.cli import main

    assert main(["train", "--config", "train/smoke", "--quiet", "--set", f"output_dir={tmp_path}",
                 "--set", f"model.backbone={name}", "--set", f"data.crop_size={crop}", "--set", "train.max_steps=2",
                 "--set", "train.checkpoint_every=2", "--set", "train.val_every=null",
                 "--set", "eval.image_size=56"]) == 0
    run = tmp_path / "smoke"
    exported = bb.load_backbone(str(run / "backbone.pth"))
    assert exported.name == name and exported.stride == (14 if "dinov2" in name else 16)
