"""FOUND: the background seed (ViT attention and the CNN rule), the pseudo-mask, the head file,
the loss, the training job on a real local Ray (checkpoints, resume) and the head as a method
of the evaluation job."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dncut.config import ConfigError, load_config
from dncut.eval.found import (SEED_COSINE, FoundHead, HeadInfo, background_seed, found_loss, head_weights, load_head,
                              pseudo_masks, refine_targets, same_weights, save_head)

SMOKE = "configs/train/smoke.yaml"


# --------------------------------------------------------------------------- seed and pseudo-mask
def test_head_weights_hand_computed():
    # head 0: 1 of 4 patches above its mean (Q = 0.25); head 1: 2 of 4 (Q = 0.5)
    attention = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]])
    q = np.array([0.25, 0.5]) + 1e-10
    expected = np.log(q.sum() / q)  # log(3), log(1.5)
    assert np.allclose(head_weights(attention).numpy()[0], expected, atol=1e-6)


def test_vit_seed_is_the_least_attended_patch_by_beta_weighted_attention():
    # two heads of 2 channels; 4 patches. beta = (log 3, log 1.5) as above
    attention = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]])
    tokens = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 3.0]]])
    seeds, unit = background_seed(tokens, attention)
    beta = np.log(np.array([0.75]) / np.array([0.25, 0.5]))
    weighted = beta[0] * attention[0, 0].numpy() + beta[1] * attention[0, 1].numpy()
    assert int(seeds[0]) == int(np.argmin(weighted))  # patches 2 and 3 tie: the first
    scaled = tokens[0].numpy().reshape(4, 2, 2) * beta[None, :, None]
    scaled = scaled.reshape(4, 4) / np.linalg.norm(scaled.reshape(4, 4), axis=1, keepdims=True)
    assert np.allclose(unit[0].numpy(), scaled, atol=1e-6)


def test_cnn_seed_is_the_highest_degree_patch_and_the_pseudo_mask_is_its_complement():
    rng = np.random.default_rng(0)
    bg, fg = rng.normal(size=8), rng.normal(size=8)
    fg -= fg @ bg / (bg @ bg) * bg  # orthogonal: cosine 0 between the two kinds
    grid = np.tile(bg, (4, 5, 1))  # (h, w, C): 20 background patches
    grid[1:3, 1:3] = fg  # 4 object patches
    grid += 0.01 * rng.normal(size=grid.shape)
    features = torch.tensor(grid, dtype=torch.float32).permute(2, 0, 1)[None]  # (1, C, 4, 5)
    seeds, _ = background_seed(features.flatten(2).transpose(1, 2))
    row, col = divmod(int(seeds[0]), 5)
    assert not (1 <= row < 3 and 1 <= col < 3)  # a background patch
    mask = pseudo_masks(features)[0].numpy()
    expected = np.zeros((4, 5), bool)
    expected[1:3, 1:3] = True
    assert (mask == expected).all()
    assert SEED_COSINE == 0.3


def test_vit_cls_attention_matches_timm_attention_matrix():
    """What FOUND reads from a ViT: the last block's CLS row of timm's own (non-fused) attention."""
    from dncut.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_test").eval()
    images = torch.rand(2, 3, 64, 64)
    features, attention = backbone.features_and_attention(images)
    assert torch.equal(features, backbone(images))
    attn = backbone.model.blocks[-1].attn
    attn.fused_attn = False
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    backbone.model.forward_features(backbone.normalize(images))
    handle.remove()
    reference = captured[0][:, :, 0, backbone.num_prefix_tokens:]  # (B, heads, h*w)
    assert attention.shape == (2, 4, 64)
    assert torch.allclose(attention, reference, atol=1e-6)


def test_cnn_backbones_have_no_cls_attention():
    from dncut.backbones import create_backbone

    features, attention = create_backbone("resnet50", pretrained=False).eval().features_and_attention(
        torch.rand(1, 3, 64, 64))
    assert attention is None and features.shape == (1, 1024, 4, 4)


# --------------------------------------------------------------------------- loss, refinement, head file
def _bce(logits: np.ndarray, target: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-logits))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def test_found_loss_hand_computed_and_switches_after_bkg_steps():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 4))
    t = {k: (rng.random((2, 4, 4)) > 0.5).astype(np.float32) for k in ("own", "own_refined", "bkg_refined")}
    tt = {k: torch.tensor(v) for k, v in t.items()}
    early, parts = found_loss(torch.tensor(logits), tt, step=2, bkg_steps=3)
    assert float(early) == pytest.approx(1.5 * _bce(logits, t["own_refined"]) + _bce(logits, t["bkg_refined"]), rel=1e-6)
    assert set(parts) == {"loss_own_refined", "loss_bkg"}
    late, parts = found_loss(torch.tensor(logits), tt, step=3, bkg_steps=3)
    assert float(late) == pytest.approx(1.5 * _bce(logits, t["own_refined"]) + 4 * _bce(logits, t["own"]), rel=1e-6)
    assert set(parts) == {"loss_own_refined", "loss_own"}


def test_refine_targets_keeps_a_refinement_only_above_the_iou_threshold():
    from dncut.eval.bilateral import refine_mask

    image = np.zeros((48, 48, 3), np.uint8)
    image[10:38, 12:40] = 220  # a bright square
    mask = np.zeros((48, 48), bool)
    mask[14:34, 16:36] = True  # inside it
    refined = refine_mask(image, mask)[1]
    assert not (refined == mask).all()
    assert (refine_targets(image[None], mask[None], min_iou=-1.0)[0] == refined).all()
    assert (refine_targets(image[None], mask[None], min_iou=1.0)[0] == mask).all()


def test_head_file_round_trip_and_clear_errors():
    head = FoundHead(6)
    with torch.no_grad():
        head.conv.weight.normal_()
    data = save_head(head, HeadInfo("vit_tiny_test", "/runs/a/backbone.pth", 6, 40))
    loaded, info = load_head(data, "h.safetensors")
    assert info == HeadInfo("vit_tiny_test", "/runs/a/backbone.pth", 6, 40)
    x = torch.randn(2, 6, 3, 5)
    expected = torch.einsum("bchw,c->bhw", x, head.conv.weight[0, :, 0, 0]) + head.conv.bias
    assert torch.allclose(loaded(x), expected, atol=1e-5)
    with torch.no_grad():
        head.conv.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="diverged.safetensors: the FOUND head has non-finite weights"):
        load_head(save_head(head, HeadInfo("vit_tiny_test", "", 6, 40)), "diverged.safetensors")
    with pytest.raises(ValueError, match="junk.bin: not a safetensors FOUND head"):
        load_head(b"not a file", "junk.bin")
    from safetensors.torch import save

    with pytest.raises(ValueError, match="other.safetensors: not a FOUND head"):
        load_head(save({"weight": torch.zeros(1)}), "other.safetensors")


def test_same_weights_compares_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert same_weights("runs/a.pth", str(tmp_path / "runs" / "a.pth"))
    assert same_weights(None, "") and not same_weights(None, "a.pth")
    assert same_weights("s3://b/k.pth", "s3://b/k.pth") and not same_weights("s3://b/k.pth", "s3://b/j.pth")


def test_found_without_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="found_heads"):
        load_config(None, ["eval.methods=[simple, found]"])


def test_image_mask_of_found_thresholds_the_upsampled_logits():
    from dncut.eval.methods import image_mask

    logits = np.array([[-3.0, 1.0], [0.5, -0.2]], np.float32)
    out = image_mask("found", logits, logits > 0, (8, 8))
    reference = F.interpolate(torch.tensor(logits)[None, None], size=(8, 8), mode="bilinear",
                              align_corners=False)[0, 0].numpy() > 0
    assert (out == reference).all()
    # the other methods upsample their grid mask (different at the borders of the regions)
    assert not (image_mask("simple", logits, logits > 0, (8, 8)) == out).all()


def test_found_view_maker_rows(tmp_path):
    from PIL import Image

    from dncut.data.pipeline import FoundViewMaker, file_key

    cfg = load_config(SMOKE, ["found.crop_size=32", "found.blur_p=0.5"])
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"<html>not an image</html>")
    maker = FoundViewMaker(cfg)
    rows = [maker({"uri": str(tmp_path / "a.jpg"), "epoch": e, "key": file_key("a")}) for e in range(12)]
    assert all(r["ok"] and r["view"].shape == (3, 32, 32) and r["view"].dtype == np.uint8 for r in rows)
    sigmas = [float(r["sigma"]) for r in rows]
    assert any(s == 0 for s in sigmas) and all(s == 0 or 0.1 <= s <= 2.0 for s in sigmas)
    again = maker({"uri": str(tmp_path / "a.jpg"), "epoch": 3, "key": file_key("a")})
    assert np.array_equal(again["view"], rows[3]["view"]) and again["sigma"] == rows[3]["sigma"]
    bad = maker({"uri": str(tmp_path / "bad.jpg"), "epoch": 0, "key": 1})
    assert not bad["ok"] and bad["view"].shape == (3, 32, 32)


def _found_batch(ok: list[bool], size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    from dncut.data.pipeline import FAILURE_BYTES

    return {"view": torch.randint(0, 256, (len(ok), 3, size, size), generator=g, dtype=torch.uint8),
            "sigma": torch.zeros(len(ok)), "ok": torch.tensor(ok),
            "failure": torch.zeros(len(ok), FAILURE_BYTES, dtype=torch.uint8)}


def test_found_step_without_a_decodable_row_updates_nothing():
    """A batch whose every row failed: no update (no NaN from an empty loss reaches the head), the
    step and the schedule still advance, the step is counted; a good batch then trains."""
    from dncut.train.found import frozen_backbone, train_found_step

    cfg = load_config(SMOKE, ["found.crop_size=32"])
    backbone = frozen_backbone(cfg, torch.device("cpu"))
    head = FoundHead(backbone.channels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    state = {"step": 0, "skipped": 0, "empty_steps": 0}
    parts = train_found_step(backbone, head, optimizer, scheduler, _found_batch([False, False]), state, cfg)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert state == {"step": 1, "skipped": 2, "empty_steps": 1} and math.isnan(parts["loss"])
    assert scheduler.get_last_lr()[0] == pytest.approx(0.05)
    parts = train_found_step(backbone, head, optimizer, scheduler, _found_batch([True, False]), state, cfg)
    assert math.isfinite(parts["loss"]) and state["step"] == 2
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert all(torch.isfinite(v).all() for v in head.state_dict().values())


# --------------------------------------------------------------------------- on Ray
def _found_config(tmp_path, checkpoint: str, *overrides: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", "run_name=found", f"model.checkpoint={checkpoint}",
                               "found.crop_size=64", "found.batch_size=4", "found.steps=4", "found.bkg_steps=2",
                               "found.lr_step=2", "train.log_every=1", "train.checkpoint_every=2", *overrides])


def test_found_train_resume_and_evaluate(ray_session, tmp_path):
    """found-train writes a head that knows its backbone weights, a rerun resumes from the last
    checkpoint, and the eval job scores method found with the head of the evaluated weights only."""
    from dncut.backbones import create_backbone, export_backbone
    from dncut.eval.jobs import run_evaluation
    from dncut.train.found import HEAD_FILE, fit_found
    from dncut.tracking import read_history

    torch.manual_seed(0)
    weights = str(tmp_path / "backbone.pth")
    export_backbone(create_backbone("vit_tiny_test"), weights)
    cfg = _found_config(tmp_path, weights)
    result = fit_found(cfg)
    assert result.error is None and result.metrics["step"] == 4
    run = tmp_path / "found"
    head, info = load_head((run / HEAD_FILE).read_bytes())
    assert (info.backbone, info.checkpoint, info.steps) == ("vit_tiny_test", weights, 4)
    assert all(math.isfinite(float(v)) for v in head.conv.weight.detach().flatten())
    assert [m["step"] for m in read_history(str(run))] == [1, 2, 3, 4]
    first = read_history(str(run))
    assert "loss_bkg" in first[0] and "loss_own" in first[-1]

    longer = _found_config(tmp_path, weights, "found.steps=6")
    assert fit_found(longer).metrics["step"] == 6
    history = read_history(str(run))
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[:4] == first  # steps 1-4 were not trained (and logged) again
    assert "resumed FOUND head training" in (run / "train.log").read_text()
    assert load_head((run / HEAD_FILE).read_bytes())[1].steps == 6

    ev = longer.with_overrides({"output_dir": str(tmp_path / "eval"), "eval.methods": ["simple", "found"],
                                "eval.found_heads": [str(run / HEAD_FILE)], "eval.checkpoints": [weights],
                                "eval.backbones": ["vit_tiny_test"]})
    summary = run_evaluation(ev)
    found = [r for r in summary["runs"] if r["method"] == "found"]
    assert len(found) == 1 and found[0]["n_failed"] == 0 and found[0]["metrics"]["iou"] is not None
    with pytest.raises(ValueError, match="no head in eval.found_heads was trained on vit_tiny_test @ pretrained"):
        run_evaluation(ev.with_overrides({"eval.checkpoints": [None]}))

    # dncut predict: the head's mask = its logits upsampled, > 0, as the eval job scores it
    from PIL import Image

    from dncut.data.scenes import make_scene
    from dncut.eval.jobs import predict_folder

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    make_scene(7, size=64)[0].save(folder / "s7.png")
    out = tmp_path / "pred"
    assert predict_folder(str(folder), str(out), ev, checkpoint=weights)["failed"] == 0
    backbone = create_backbone("vit_tiny_test", checkpoint=weights).eval()
    head = load_head((run / HEAD_FILE).read_bytes())[0]  # the 6-step head
    with torch.no_grad():
        logits = head(backbone(torch.from_numpy(np.asarray(Image.open(folder / "s7.png").convert("RGB")).copy())
                               .permute(2, 0, 1)[None]))  # (1, 8, 8)
    expected = F.interpolate(logits[:, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0] > 0
    written = np.asarray(Image.open(out / "masks" / "found" / "s7.png.png")) > 127  # the input name, extension kept
    assert (written == expected.numpy()).all()
