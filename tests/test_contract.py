"""The backbone input contract and the one inference path, tested where they cross boundaries.

* What reaches a network's first layer: one known image through the training views, the
  validation / demo / bench path (``dncut.eval.validate``) and the evaluation job's actor
  (``NCutPredictor`` on ``load_record`` rows) gives the same tensor, equal to the weights'
  normalisation computed here by hand from the published constants.
* Training-time ``val_iou`` equals ``dncut eval-saliency``'s IoU on the same weights and images.
* The encoder BatchNorm policy (``model.freeze_encoder_bn``) through the real Ray Train loop.
* ``seed``: the same seed gives bit-identical per-step losses, another seed does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dncut.config import load_config
from dncut.data.scenes import make_scene

SMOKE = "configs/train/smoke.yaml"
SIZE = 64  # image side = crop side = evaluation long side: no resampling anywhere
# Published normalisation constants, written out here independently of dncut.backbone_specs.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision / DINO / MAE / MoCo v3
TF_LITE = ((127 / 255,) * 3, (128 / 255,) * 3)  # tensorflow/tpu efficientnet_lite_builder.py
FAMILIES = {  # backbone -> (first layer of the wrapped model, expected mean/std)
    "vit_tiny_test": ("patch_embed.proj", IMAGENET),
    "vit_dinov3_test": ("patch_embed.proj", IMAGENET),  # rotary ViT with storage tokens (DINOv3 rows)
    "efficientnet_lite0": ("conv_stem", TF_LITE),
    "resnet50": ("conv1", IMAGENET),
}


def _by_hand(image: np.ndarray, norm) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float64 normalised with the published constants."""
    x = torch.from_numpy(image.astype(np.float64) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in norm)
    return (x - mean) / std


class FirstLayer:
    """Records the input of ``module`` on every call: (B, 3, H, W) tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        module.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach().double().clone()))


def _folder(root: Path, n: int, seed: int = 700) -> Path:
    """images/ + masks/ of ``n`` generated scenes, SIZE x SIZE, PNG (lossless)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = make_scene(seed + i, size=SIZE)
        image.save(root / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i}.png")
    return root


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_first_layer_sees_the_same_normalised_image_on_every_path(name: str, tmp_path: Path):
    from dncut.backbone_specs import spec
    from dncut.backbones import create_backbone
    from dncut.data.pipeline import ViewMaker
    from dncut.eval.stages import NCutPredictor, dataset_records, load_record
    from dncut.eval.validate import score_backbone, validation_rows
    from dncut.train import build_model, model_inputs

    layer, norm = FAMILIES[name]
    root = _folder(tmp_path / "val", 1)
    image = np.asarray(Image.open(root / "images" / "s0.png").convert("RGB"))  # (64, 64, 3)
    expected = _by_hand(image, norm)
    cfg = load_config(SMOKE, [f"model.backbone={name}", "model.pretrained=false", f"data.crop_size={SIZE}",
                              "data.crop_scale=[1.0, 1.0]", "data.photometric=false", f"data.val={root}",
                              f"eval.image_size={SIZE}", "ncut.solver=eigh"])

    # training: the view maker keeps the pixels (no normalisation); the model's encoder normalises
    row = ViewMaker(cfg)({"uri": str(root / "images" / "s0.png"), "epoch": 0, "key": 0})
    assert row["ok"] and row["view1"].dtype == np.uint8
    view = np.transpose(row["view1"], (1, 2, 0))  # (64, 64, 3)
    assert np.array_equal(view, image[:, ::-1] if row["flip1"] else image)
    model = build_model(cfg)
    train_seen = FirstLayer(model.encoder.model.get_submodule(layer))
    model(*model_inputs({k: torch.from_numpy(np.asarray(v)[None]) for k, v in row.items()}))
    train_in = train_seen.seen[0][0]  # (3, 64, 64), view 1
    train_in = train_in.flip(-1) if row["flip1"] else train_in

    # validation (also the demo's and the benches' path)
    backbone = create_backbone(name)
    val_seen = FirstLayer(backbone.model.get_submodule(layer))
    score_backbone(backbone, validation_rows(cfg), cfg)

    # the evaluation job's actor on its stage-1 rows
    actor = NCutPredictor(name, None, False, ["simple"], solver="eigh")
    eval_seen = FirstLayer(actor.predictor.backbone.model.get_submodule(layer))
    from dncut.config import EvalDataset

    rows = [load_record(r, spec=spec(name), image_size=SIZE)
            for r in dataset_records(EvalDataset(name="v", kind="folder", root=str(root)))]
    actor({k: [r[k] for r in rows] for k in rows[0]})

    for path, seen in (("training", train_in), ("validation", val_seen.seen[0][0]), ("eval job", eval_seen.seen[0][0])):
        assert seen.shape == expected.shape, path
        assert (seen - expected).abs().max() <= 1e-6, f"{name}: the {path} path feeds another normalisation"


@pytest.mark.ray
def test_val_iou_equals_eval_saliency_on_the_same_weights(validated_run, tmp_path: Path):
    """The last training-time validation and ``dncut eval-saliency`` on the exported backbone score
    the same images with the same weights: the same numbers. The run (conftest's ``validated_run``,
    3 steps, 64-px scenes: no resampling anywhere) was given ``data.val`` relative to the driver's
    directory, as a user types it (the workers run elsewhere)."""
    from dncut.eval.jobs import evaluate_saliency
    from dncut.train import EXPORT_FILE

    cfg, metrics, root = validated_run
    assert cfg.data.crop_size == cfg.eval.image_size == SIZE and metrics["val_step"] == metrics["step"] == 3
    summary = evaluate_saliency(str(root / "val" / "images"), str(root / "val" / "masks"), cfg.model.backbone,
                                str(Path(cfg.run_dir) / EXPORT_FILE), "simple", False, str(tmp_path / "eval"), cfg)
    (run,) = summary["runs"]
    assert run["n_images"] == 4 and run["n_failed"] == 0
    for key in ("iou", "acc", "max_fbeta", "mae"):
        assert abs(metrics[f"val_{key}"] - run["metrics"][key]) <= 1e-9, key


def _bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.ray
@pytest.mark.parametrize("freeze", [True, False])
def test_encoder_batchnorm_policy_through_the_training_loop(ray_session, tmp_path: Path, freeze: bool):
    """Frozen: after N steps (with validations between them) the encoder's running statistics are
    the pretrained ones, bit for bit; not frozen: they moved."""
    from dncut.backbones import create_backbone, read_checkpoint
    from dncut.train import EXPORT_FILE, fit

    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "model.backbone=efficientnet_lite0_s16",
                              "model.pretrained=true", f"model.freeze_encoder_bn={str(freeze).lower()}",
                              "train.max_steps=3", "train.val_every=1", "data.val_scenes=2"])
    fit(cfg)
    used = create_backbone(cfg.model.backbone, pretrained=True)
    before = _bn_buffers({k: v for k, v in used.model.state_dict().items() if k in used.used_state_keys()})
    after = _bn_buffers(read_checkpoint(str(Path(cfg.run_dir) / EXPORT_FILE))["state_dict"])
    assert before and set(before) <= set(after)
    same = [torch.equal(before[k], after[k]) for k in before]
    if freeze:
        assert all(same), "frozen encoder BatchNorm statistics moved"
    else:
        assert not any(same), "unfrozen encoder BatchNorm statistics did not adapt"


def _seeded(root: Path, name: str, seed: int = 0, steps: int = 4):
    """The smoke run both seeding contracts train: 1 worker, CPU, a checkpoint every 2 steps, no
    validation before the end."""
    return load_config(SMOKE, [f"output_dir={root}", f"run_name={name}", f"seed={seed}", f"train.max_steps={steps}",
                               "train.warmup_steps=2", "train.checkpoint_every=2", "train.val_every=null",
                               "data.val_scenes=1"])


def _losses(cfg) -> list[tuple[int, float]]:
    """Fit ``cfg``; its history's ``(step, loss)``; the driver's resume step is the run's end."""
    from dncut.train import fit, resume_step
    from dncut.tracking import read_history

    fit(cfg)
    assert resume_step(cfg) == cfg.train.max_steps  # where the driver starts the rows of a rerun
    return [(m["step"], m["loss"]) for m in read_history(cfg.run_dir)]


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """One uninterrupted 4-step seed-0 run (its output_dir, its ``(step, loss)``), shared by both contracts."""
    root = tmp_path_factory.mktemp("seeded")
    return root, _losses(_seeded(root, "straight"))


@pytest.mark.ray
def test_same_seed_same_losses_other_seed_other_losses(straight):
    """Two 1-worker CPU runs with one seed give bit-identical per-step losses (file order, shuffle
    and every augmentation are seeded); a third run with another seed differs."""
    root, first = straight
    again, other = _losses(_seeded(root, "b")), _losses(_seeded(root, "c", seed=1))
    assert [s for s, _ in first] == [1, 2, 3, 4]
    assert first == again, json.dumps([first, again])
    assert [l for _, l in first] != [l for _, l in other]
    # bench/finetune_device.py (the in-process loop the device machine runs, it has no Ray) trains
    # what fit trains: the same rows, views, batches, initialisation and steps, bit for bit
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from finetune_device import train

    assert train(_seeded(root, "device"), "cpu", view_workers=1)["losses"] == [l for _, l in first]


@pytest.mark.ray
def test_a_resumed_run_trains_on_what_the_uninterrupted_run_would(straight):
    """Stopped after step 2 and rerun to step 4 (same run), the per-step losses equal those of one
    uninterrupted 4-step run bit for bit: the model, the optimizer and the seeded data stream all
    continue where they stopped (the rerun leaves out the rows already trained)."""
    root, uninterrupted = straight
    _losses(_seeded(root, "resumed", steps=2))
    resumed = _losses(_seeded(root, "resumed"))
    assert [s for s, _ in uninterrupted] == [s for s, _ in resumed] == [1, 2, 3, 4]
    assert resumed == uninterrupted
    assert _losses(_seeded(root, "resumed")) == uninterrupted  # a finished run run again trains nothing, keeps its history


@pytest.mark.ray
def test_export_best_val_iou_exports_the_best_validated_step(ray_session, tmp_path: Path):
    """``train.export: best_val_iou``: backbone.pth holds the encoder of the step with the highest
    val_iou (a checkpoint of every step to compare with; step 0 = the starting weights)."""
    from dncut.backbones import read_checkpoint
    from dncut.train import EXPORT_FILE, STATE_FILE, build_model, fit
    from dncut.tracking import read_history

    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "train.export=best_val_iou", "train.max_steps=4",
                              "train.val_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                              "train.lr=5.0e-3", "data.val_scenes=3"])
    fit(cfg)
    history = read_history(cfg.run_dir)
    best = max(history, key=lambda m: m["val_iou"])  # the first of equals, as the export keeps it
    first = {m["val_step"]: m["val_iou"] for m in history}
    best_step = min(s for s, v in first.items() if v == best["val_iou"])
    exported = read_checkpoint(str(Path(cfg.run_dir) / EXPORT_FILE))["state_dict"]
    states = {int(torch.load(f, weights_only=True)["step"]): torch.load(f, weights_only=True)
              for f in Path(cfg.run_dir).glob(f"*/checkpoint_*/{STATE_FILE}")}
    if best_step == 0:  # the starting weights: the worker seeds torch with seed + rank, then builds
        torch.manual_seed(cfg.seed)
        expected = build_model(cfg).encoder.model.state_dict()
    else:
        expected = {k[len("encoder.model."):]: v for k, v in states[best_step]["model"].items()
                    if k.startswith("encoder.model.")}
    assert set(expected) == set(exported)
    assert all(torch.equal(expected[k], exported[k]) for k in expected), f"not the step-{best_step} encoder"
    others = [s for s in states if s != best_step]
    assert any(not torch.equal(states[s]["model"]["encoder.model.patch_embed.proj.weight"],
                               exported["patch_embed.proj.weight"]) for s in others)
