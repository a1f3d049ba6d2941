"""Tests of the evaluation service (dncut.eval.jobs / stages / report) on Ray: known answers, bad inputs.

Fixtures are made here: saliency folders of generated scenes, a VOC07-format folder whose
objects are plain-coloured rectangles scored with a colour-based test backbone (so every box and
the CorLoc are known), and folders of maps equal to / inverted from the ground truth.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import torch
import torch.nn.functional as F
from PIL import Image

from dncut import storage
from dncut.backbone_specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from dncut.config import Config, load_config
from dncut.data.datasets import DatasetLayoutError
from dncut.data.scenes import make_scene
from dncut.eval.jobs import evaluate_maps, evaluate_saliency, run_evaluation
from dncut.eval.report import format_table

SOD_VAL = Path("/work/shared/data/sod-val")
RUN_KEYS = {"dataset", "method", "backbone", "checkpoint", "n_images", "n_failed", "metrics"}
SALIENCY_KEYS = {"acc", "iou", "max_fbeta", "mae"}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image | np.ndarray) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _check_summary_schema(summary: dict) -> None:
    assert set(summary) == {"runs"}
    for run in summary["runs"]:
        assert set(run) == RUN_KEYS
        for value in run["metrics"].values():
            assert value is None or 0.0 <= value <= 1.0


# --------------------------------------------------------------------------- precomputed maps
@pytest.fixture
def maps_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        gt = np.zeros((40, 50), np.uint8)
        y, x = rng.integers(2, 15, 2)
        gt[y : y + 20, x : x + 25] = 255
        for sub, pred in (("perfect", gt), ("inverted", 255 - gt), ("partial", gt)):
            (tmp_path / "maps" / sub).mkdir(parents=True, exist_ok=True)
            if not (sub == "partial" and i == 2):  # partial: the third map is missing
                (tmp_path / "maps" / sub / f"im{i}.png").write_bytes(_png(pred))
        (tmp_path / "masks").mkdir(exist_ok=True)
        (tmp_path / "masks" / f"im{i}.png").write_bytes(_png(gt))
    return tmp_path


def test_evaluate_maps_known_answers(ray_session, maps_folder: Path):
    out = maps_folder / "out"
    summary = evaluate_maps(str(maps_folder / "masks"), [str(maps_folder / "maps")], str(out))
    _check_summary_schema(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"perfect", "inverted", "partial"}
    perfect, inverted, partial = runs["perfect"]["metrics"], runs["inverted"]["metrics"], runs["partial"]["metrics"]
    assert perfect["iou"] == 1.0 and perfect["acc"] == 1.0 and perfect["mae"] == 0.0
    assert perfect["max_fbeta"] == pytest.approx(1.0) and perfect["max_fbeta_pysod"] == pytest.approx(1.0)
    assert inverted["iou"] == 0.0 and inverted["acc"] == 0.0 and inverted["mae"] == 1.0
    assert inverted["max_fbeta"] == 0.0  # every threshold predicts only background pixels
    assert runs["partial"]["n_images"] == 3 and runs["partial"]["n_failed"] == 1 and partial["iou"] == 1.0
    assert runs["perfect"]["dataset"] == maps_folder.name
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    assert len(table) == 9
    missing = [r for r in table if r["status"] == "failed"]
    assert len(missing) == 1 and missing[0]["image_id"] == "im2" and "no map" in missing[0]["error"]
    assert missing[0]["iou"] is None
    assert "perfect" in (out / "summary.md").read_text() and "| perfect | 100.0 | 100.0 | 100.0" in format_table(summary)


def test_evaluate_maps_single_folder_and_missing_folders(ray_session, maps_folder: Path, tmp_path: Path):
    summary = evaluate_maps(str(maps_folder / "masks"), str(maps_folder / "maps" / "perfect"), str(tmp_path / "o"))
    assert [r["method"] for r in summary["runs"]] == ["perfect"]
    with pytest.raises(DatasetLayoutError, match=r"masks folder .*nowhere.*expected layout"):
        evaluate_maps(str(tmp_path / "nowhere"), [str(maps_folder / "maps")], str(tmp_path / "o"))
    with pytest.raises(DatasetLayoutError, match=r"maps folder .*no_maps.*expected layout"):
        evaluate_maps(str(maps_folder / "masks"), [str(tmp_path / "no_maps")], str(tmp_path / "o"))


@pytest.mark.skipif(not (SOD_VAL / "maps").is_dir(), reason="shared sod-val data absent")
def test_evaluate_maps_matches_pysodmetrics_on_sod_val(ray_session, tmp_path: Path):
    py_sod_metrics = pytest.importorskip("py_sod_metrics")
    summary = evaluate_maps(str(SOD_VAL / "masks"), [str(SOD_VAL / "maps")], str(tmp_path))
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"Amulet", "DSS", "PiCANet"}
    for method, run in runs.items():
        fm, mae = py_sod_metrics.Fmeasure(), py_sod_metrics.MAE()
        for mask in sorted((SOD_VAL / "masks").glob("*.png")):
            gt = np.asarray(Image.open(mask).convert("L"))
            pred = np.asarray(Image.open(SOD_VAL / "maps" / method / mask.name).convert("L"))
            fm.step(pred=pred, gt=gt)
            mae.step(pred=pred, gt=gt)
        ref_fbeta = float(fm.get_results()["fm"]["curve"].max())
        ref_mae = float(mae.get_results()["mae"])
        assert run["n_failed"] == 0 and run["n_images"] == 100
        assert run["metrics"]["max_fbeta_pysod"] == pytest.approx(ref_fbeta, abs=0.002), method
        assert run["metrics"]["mae_pysod"] == pytest.approx(ref_mae, abs=0.002), method
        assert run["metrics"]["mae"] == pytest.approx(ref_mae, abs=0.002), method
        if method != "PiCANet":  # maps spanning 0..255: the TokenCut definition agrees too
            assert run["metrics"]["max_fbeta"] == pytest.approx(ref_fbeta, abs=0.002), method


# --------------------------------------------------------------------------- model-based saliency
@pytest.fixture
def scene_folder(tmp_path: Path) -> Path:
    root = tmp_path / "scenes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        image, mask = make_scene(100 + i, size=96)
        (root / "images" / f"s{i}.jpg").write_bytes(_jpeg(image))
        (root / "masks" / f"s{i}.png").write_bytes(_png(mask.astype(np.uint8) * 255))
    good = (root / "images" / "s0.jpg").read_bytes()
    mask0 = (root / "masks" / "s0.png").read_bytes()
    (root / "images" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "images" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "images" / "small_mask.jpg").write_bytes(good)
    for stem in ("corrupt", "truncated"):
        (root / "masks" / f"{stem}.png").write_bytes(mask0)
    (root / "masks" / "small_mask.png").write_bytes(_png(np.zeros((50, 60), np.uint8)))
    (root / "images" / "no_mask.jpg").write_bytes(good)  # an image without a mask
    return root


RAY_RESTART_LINE = "constructor arguments in the object store"  # Ray core's E line for max_restarts > 0


def _ray_log_sizes() -> dict[Path, int]:
    """Size of every file of this Ray session's logs folder (the driver's core log among them)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}


def _ray_log_text_since(sizes: dict[Path, int]) -> str:
    """What the session's log files gained since ``sizes`` (``_ray_log_sizes``)."""
    text = []
    for path in _ray_log_sizes():
        with open(path, "rb") as f:
            f.seek(sizes.get(path, 0))
            text.append(f.read().decode(errors="replace"))
    return "".join(text)


def test_evaluate_saliency_lite0_both_methods_with_solver(ray_session, scene_folder: Path, tmp_path: Path, capfd):
    out = tmp_path / "out"
    cfg = Config().with_overrides({"eval.image_size": 128, "eval.batch_size": 4, "eval.examples": 2})
    logs = _ray_log_sizes()
    summary = evaluate_saliency(str(scene_folder / "images"), str(scene_folder / "masks"), "efficientnet_lite0",
                                None, ["simple", "tokencut"], True, str(out), cfg)
    console = capfd.readouterr()
    assert "Starting execution of Dataset" in _ray_log_text_since(logs)  # the run's lines are in these logs ...
    assert RAY_RESTART_LINE not in _ray_log_text_since(logs) + console.out + console.err  # ... but not that one
    _check_summary_schema(summary)
    runs = {r["method"]: r for r in summary["runs"]}
    assert list(runs) == ["simple", "tokencut", "simple+bs", "tokencut+bs"]
    for name, run in runs.items():
        assert run["dataset"] == "scenes" and run["backbone"] == "efficientnet_lite0" and run["checkpoint"] is None
        assert run["n_images"] == 7 and run["n_failed"] == 4, name
        expected = SALIENCY_KEYS | ({"acc_binary", "iou_binary"} if name.endswith("+bs") else set())
        assert set(run["metrics"]) == expected
        assert all(v is not None for v in run["metrics"].values())
    table = pq.read_table(out / "per_image.parquet")
    assert table.num_rows == 28
    rows = table.to_pylist()
    errors = {r["image_id"]: r["error"] for r in rows if r["method"] == "simple" and r["status"] == "failed"}
    assert set(errors) == {"corrupt", "truncated", "small_mask", "no_mask"}
    assert "cannot decode" in errors["corrupt"] and "cannot decode" in errors["truncated"]
    assert "differs from image size" in errors["small_mask"] and "no mask named no_mask" in errors["no_mask"]
    for method, run in runs.items():  # the summary is the mean of the per-image rows
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        assert len(ok) == 3
        assert run["metrics"]["iou"] == pytest.approx(np.mean([r["iou"] for r in ok]))
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_config(out / "config.yaml")
    assert saved.eval.methods == ["simple", "tokencut"] and saved.eval.bilateral is True
    md = (out / "summary.md").read_text()
    assert md.count("bilateral solver") == 2 and "## Failed images (4)" in md and "scenes / corrupt: " in md


def test_evaluate_saliency_missing_folder_names_path_and_layout(ray_session, scene_folder: Path, tmp_path: Path):
    with pytest.raises(DatasetLayoutError, match=r"images folder .*does_not_exist.*expected layout: --images DIR"):
        evaluate_saliency(str(tmp_path / "does_not_exist"), str(scene_folder / "masks"), "efficientnet_lite0",
                          None, "simple", False, str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"invalid; valid choices: \['simple', 'tokencut', 'most', 'found'\]"):
        evaluate_saliency(str(scene_folder / "images"), str(scene_folder / "masks"), "efficientnet_lite0",
                          None, "lost", False, str(tmp_path / "o"))


def test_missing_checkpoint_fails_fast_with_a_clear_error(ray_session, scene_folder: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pth does not exist"):
        evaluate_saliency(str(scene_folder / "images"), str(scene_folder / "masks"), "efficientnet_lite0",
                          str(tmp_path / "nope.pth"), "simple", False, str(tmp_path / "o"))


def test_run_evaluation_missing_dataset_root_fails_before_work(tmp_path: Path):
    cfg = Config().with_overrides({"eval.datasets": [{"name": "E", "kind": "ecssd", "root": str(tmp_path / "ECSSD")}]})
    with pytest.raises(DatasetLayoutError, match=r"ECSSD.*expected layout"):
        run_evaluation(cfg)


# --------------------------------------------------------------------------- discovery: VOC + CorLoc
COLOUR_SPEC = BackboneSpec("colour", "vit", "colour", "mean colour of each patch", 8, 3, IMAGENET_MEAN,
                           IMAGENET_STD, False, "")


class ColourBackbone(torch.nn.Module):
    """Test backbone: mean ImageNet-normalised colour of each 8 x 8 patch as its feature; takes RGB
    in [0, 1] and normalises itself, as every backbone does (its padding colour is 0 once normalised)."""

    spec = COLOUR_SPEC

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255 if images.dtype == torch.uint8 else images  # the Backbone contract
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (self.spec.mean, self.spec.std))
        return F.avg_pool2d((images - mean) / std, self.spec.stride)  # (B, 3, H/8, W/8)


class ColourFactory:
    """``BackboneFactory``: builds the colour backbone; ``spec`` gives its stride and padding colour."""

    spec = COLOUR_SPEC

    def __call__(self, name: str, *, pretrained: bool, checkpoint: str | None) -> ColourBackbone:
        return ColourBackbone()


colour_factory = ColourFactory()


BG, RED = (60, 80, 200), (230, 30, 30)
# (id, (H, W), object (x0, y0, x1, y1) in pixels, VOC boxes (1-based inclusive), expected hit)
VOC_IMAGES = [
    ("000001", (96, 128), (24, 16, 72, 48), [(25, 17, 72, 48)], True),
    ("000002", (96, 128), (24, 16, 72, 48), [(80, 50, 120, 90)], False),  # GT elsewhere
    ("000003", (96, 128), (48, 40, 96, 80), [(5, 5, 20, 20), (49, 41, 96, 80)], True),  # one of two
    ("000004", (100, 130), (64, 40, 112, 72), [(65, 41, 112, 72)], True),  # padded to 104 x 136
]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for image_id, (h, w), (x0, y0, x1, y1), boxes, _ in VOC_IMAGES:
        image = np.empty((h, w, 3), np.uint8)
        image[...] = BG
        image[y0:y1, x0:x1] = RED
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(image))
        objects = "".join(f"<object><name>thing</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                          f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (voc / "JPEGImages" / "000005.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (voc / "Annotations" / "000005.xml").write_text(
        "<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    ids = [v[0] for v in VOC_IMAGES] + ["000005"]
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return tmp_path


def test_voc_corloc_with_a_colour_backbone_written_to_s3(ray_session, voc_root: Path, s3_bucket: str):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test backbone reaches the actors
    cfg = Config().with_overrides({
        "output_dir": f"{s3_bucket}/eval", "run_name": "voc",
        "eval.datasets": [{"name": "VOC07", "kind": "voc07", "root": str(voc_root)}],
        "eval.methods": ["tokencut", "simple"], "eval.bilateral": True, "eval.batch_size": 2,
        "eval.image_size": 64,  # ignored for discovery: images are only padded
    })
    summary = run_evaluation(cfg, backbone_factory=colour_factory)
    _check_summary_schema(summary)
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"tokencut", "simple"}  # no +bs rows for discovery
    for run in runs.values():
        assert run["dataset"] == "VOC07" and run["n_images"] == 5 and run["n_failed"] == 1
        assert run["metrics"] == {"corloc": pytest.approx(3 / 4)}
    out = f"{s3_bucket}/eval/voc"
    assert json.loads(storage.read_bytes(f"{out}/summary.json")) == summary
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/per_image.parquet"))).to_pylist()
    tokencut_rows = {r["image_id"]: r for r in rows if r["method"] == "tokencut"}
    for image_id, _, obj, _, hit in VOC_IMAGES:
        assert tokencut_rows[image_id]["pred_box"] == list(map(float, obj)), image_id
        assert tokencut_rows[image_id]["corloc_hit"] is hit
        assert tokencut_rows[image_id]["iou"] is None
    assert tokencut_rows["000005"]["status"] == "failed" and tokencut_rows["000005"]["corloc_hit"] is None
    assert storage.read_bytes(f"{out}/examples.png")[:4] == b"\x89PNG"
    assert "CorLoc" in storage.read_bytes(f"{out}/summary.md").decode()
    assert "| tokencut | 75.0 |" in format_table(summary)


def test_predictor_fails_only_the_bad_image_of_a_batch():
    """In-process NCutPredictor on one batch: an 8 x 16 image, its transpose (same node count: one
    NCut call), an image whose 8 x 8 grid has one cell (NCut needs 2) and a row that failed
    before. Only the bad rows fail, with reasons; the others get what they get alone."""
    from dncut.eval.stages import NCutPredictor

    rng = np.random.default_rng(0)
    wide = np.full((64, 128, 3), BG, np.uint8)
    wide[16:48, 24:72] = RED
    wide = np.clip(wide + rng.integers(-20, 20, wide.shape), 0, 255).astype(np.uint8)
    tiny = np.full((8, 8, 3), RED, np.uint8)
    inputs = [wide, wide.transpose(1, 0, 2).copy(), tiny, wide]
    batch = {"image_id": np.array(["w", "t", "tiny", "dead"]), "status": np.array(["ok", "ok", "ok", "failed"]),
             "error": np.array(["", "", "", "decode: broken"]), "input": inputs}
    pred = NCutPredictor("colour", None, False, ["simple", "tokencut"], solver="lobpcg", factory=colour_factory)
    out = pred(batch)
    assert out["status"].tolist() == ["ok", "ok", "failed", "failed"]
    assert "2" in out["error"][2] and out["error"][3] == "decode: broken"
    alone = pred({k: v[:1] if k != "input" else inputs[:1] for k, v in batch.items()})
    for key in ("simple_mask", "tokencut_mask", "tokencut_box"):
        np.testing.assert_array_equal(out[key][0], alone[key][0])
    np.testing.assert_array_equal(out["tokencut_mask"][1], out["tokencut_mask"][0].T)
    assert out["tokencut_mask"][0].any() and out["tokencut_box"][0].dtype == np.int64


@pytest.mark.ray
def test_eval_maps_reads_class_colour_masks_and_flags_empty_ones(ray_session, tmp_path: Path):
    """A (128, 0, 0) class-colour mask (RGB and palette) against a perfect map scores IoU 1, maxFβ 1,
    MAE 0; an all-background mask is a failed row with its reason, counted, not averaged in."""
    from PIL import Image

    fg = np.zeros((40, 60), bool)
    fg[10:30, 15:45] = True
    (tmp_path / "masks").mkdir()
    (tmp_path / "maps" / "perfect").mkdir(parents=True)
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[fg] = (128, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "masks" / "rgb.png")
    palette = Image.fromarray(fg.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * (254 * 3))
    palette.save(tmp_path / "masks" / "pal.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "masks" / "empty.png")
    for stem in ("rgb", "pal", "empty"):
        Image.fromarray((fg * 255).astype(np.uint8)).save(tmp_path / "maps" / "perfect" / f"{stem}.png")
    summary = evaluate_maps(str(tmp_path / "masks"), [str(tmp_path / "maps")], str(tmp_path / "out"))
    (run,) = summary["runs"]
    assert run["n_images"] == 3 and run["n_failed"] == 1
    m = run["metrics"]
    assert m["iou"] == 1.0 and m["mae"] == 0.0 and m["max_fbeta"] == pytest.approx(1.0) and m["acc"] == 1.0
    rows = pq.read_table(tmp_path / "out" / "per_image.parquet").to_pylist()
    (flagged,) = [r for r in rows if r["status"] == "failed"]
    assert flagged["image_id"] == "empty" and "no foreground pixel" in flagged["error"]


@pytest.mark.ray
def test_predict_writes_masks_maps_boxes_and_failed_rows(ray_session, scene_folder: Path, tmp_path: Path):
    """``dncut predict`` on unlabelled images: a mask and a map PNG per image and method, boxes,
    one Parquet row per (image, method), the corrupt file a failed row; eval-maps scores the masks."""
    from dncut.eval.jobs import predict_folder

    images = tmp_path / "unlabelled"
    images.mkdir()
    for stem in ("s0", "s1", "s2"):
        (images / f"{stem}.jpg").write_bytes((scene_folder / "images" / f"{stem}.jpg").read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = load_config("configs/eval/smoke.yaml", ["eval.methods=[simple, tokencut]", "eval.image_size=128",
                                                  "ncut.solver=eigh", "model.backbone=vit_tiny_test"])
    out = tmp_path / "pred"
    summary = predict_folder(str(images), str(out), cfg)
    assert summary == {"images": 4, "rows": 8, "failed": 1, "out": str(out)}
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    broken = [r for r in rows if r["image_id"] == "broken.png"]  # image_id: the path below --images
    assert [r["status"] for r in broken] == ["failed", "failed"] and "cannot decode" in broken[0]["error"]
    for r in (r for r in rows if r["status"] == "ok"):
        mask = np.asarray(Image.open(r["mask"]))
        image = Image.open(images / r["image_id"])
        assert mask.shape == (image.height, image.width) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(r["map"]).size == image.size
        (box,) = json.loads(r["boxes"])
        assert 0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height
    scored = evaluate_maps(str(scene_folder / "masks"), [str(out / "masks")], str(tmp_path / "scored"))
    assert {run["method"] for run in scored["runs"]} == {"simple", "tokencut"}
    per_image = pq.read_table(tmp_path / "scored" / "per_image.parquet").to_pylist()
    assert {r["image_id"] for r in per_image if r["status"] == "ok"} == {"s0", "s1", "s2"}  # s0.jpg.png -> s0


def test_predict_output_names_are_unique_per_input(ray_session, scene_folder: Path, tmp_path: Path):
    """Inputs whose stems collide (``photo.jpg`` / ``photo.png``, ``sub/x.jpg`` / ``sub_x.jpg``) get one
    mask and one map file each, named after the path below ``--images`` with its extension, and
    eval-maps pairs them with ``<stem>.png`` masks (ambiguous stems are failed rows, never a guess)."""
    from dncut.eval.jobs import predict_folder

    images, gt = tmp_path / "in", tmp_path / "gt"
    (images / "sub").mkdir(parents=True)
    (gt / "sub").mkdir(parents=True)
    names = ["photo.jpg", "photo.png", "sub/x.jpg", "sub_x.jpg"]
    for i, name in enumerate(names):
        image, mask = make_scene(200 + i, size=64 + 16 * i)  # a size per input: files are told apart
        (images / name).write_bytes(_jpeg(image) if name.endswith(".jpg") else _png(np.asarray(image)))
        (gt / (name.rsplit(".", 1)[0] + ".png")).write_bytes(_png(mask.astype(np.uint8) * 255))
    cfg = load_config("configs/eval/smoke.yaml", ["eval.methods=[simple]", "eval.image_size=64",
                                                  "ncut.solver=eigh", "model.backbone=vit_tiny_test"])
    out = tmp_path / "pred"
    assert predict_folder(str(images), str(out), cfg)["failed"] == 0
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(names)
    assert sorted(r["mask"] for r in rows) == sorted(str(out / "masks" / "simple" / f"{n}.png") for n in names)
    assert sorted(r["map"] for r in rows) == sorted(str(out / "z2" / "simple" / f"{n}.png") for n in names)
    assert sorted(p.relative_to(out / "masks" / "simple").as_posix()
                  for p in (out / "masks" / "simple").rglob("*.png")) == sorted(f"{n}.png" for n in names)
    for r in rows:  # each row points at its own image's files
        assert Image.open(r["mask"]).size == Image.open(r["map"]).size == Image.open(images / r["image_id"]).size
    evaluate_maps(str(gt), [str(out / "masks")], str(tmp_path / "scored"))
    per_image = {r["image_id"]: r for r in pq.read_table(tmp_path / "scored" / "per_image.parquet").to_pylist()}
    assert {k for k, r in per_image.items() if r["status"] == "ok"} == {"sub/x", "sub_x"}
    assert "ambiguous" in per_image["photo"]["error"] and "photo.jpg.png" in per_image["photo"]["error"]


def test_predict_names_that_differ_only_by_case_are_failed_rows_not_overwrites():
    """On a case-insensitive file system ``A.jpg`` and ``a.jpg`` would write the same files: the
    second (sorted) is a failed record naming the first; distinct names all keep their path."""
    from dncut.eval.outputs import pair_maps, predict_records

    recs = predict_records(["/in/a.jpg", "/in/A.jpg", "/in/sub/x.jpg", "/in/sub_x.jpg", "/in/a.png"], "/in/")
    by_id = {r["image_id"]: r for r in recs}
    assert sorted(by_id) == ["A.jpg", "a.jpg", "a.png", "sub/x.jpg", "sub_x.jpg"]
    assert by_id["A.jpg"]["missing"] == "" and "collides with that of /in/A.jpg" in by_id["a.jpg"]["missing"]
    assert all(by_id[k]["missing"] == "" for k in ("a.png", "sub/x.jpg", "sub_x.jpg"))
    paired = pair_maps({"x": "gt/x.png", "y": "gt/y.png", "z": "gt/z.png"},
                       {"x": "m/x.png", "x.jpg": "m/x.jpg.png", "y.jpg": "m/y.jpg.png", "y.png": "m/y.png.png"})
    assert paired["x"] == ("m/x.png", "") and paired["z"] == ("", "")
    assert paired["y"][0] == "" and "ambiguous" in paired["y"][1]


def _checkpoint_with_objects(tmp_path: Path) -> str:
    from dncut.backbones import create_backbone

    torch.manual_seed(7)
    sd = create_backbone("vit_tiny_test").model.state_dict()
    path = tmp_path / "with_numpy.pth"
    torch.save({"state_dict": sd, "epoch": np.int64(3), "best": np.float32(0.5)}, path)
    return str(path)


def test_eval_checkpoint_holding_numpy_scalars_needs_the_trust_key(ray_session, scene_folder: Path, tmp_path: Path):
    """``eval-saliency --checkpoint`` (and ``eval.checkpoints``) read with ``model.trusted_checkpoint``:
    refused naming the file and the key by default, loaded with ``--set model.trusted_checkpoint=true``."""
    from dncut.eval.stages import NCutPredictor, TokenExtractor

    path = _checkpoint_with_objects(tmp_path)
    with pytest.raises(RuntimeError, match=r"with_numpy\.pth.*model\.trusted_checkpoint: true"):
        TokenExtractor("vit_tiny_test", path, False)
    TokenExtractor("vit_tiny_test", path, False, trusted=True)
    NCutPredictor("vit_tiny_test", path, False, ["simple"], solver="eigh", trusted=True)
    overrides = ["eval.image_size=64", "ncut.solver=eigh", "eval.num_actors=1"]
    with pytest.raises(Exception, match=r"model\.trusted_checkpoint"):
        evaluate_saliency(str(scene_folder / "images"), str(scene_folder / "masks"), "vit_tiny_test", path,
                          "simple", False, str(tmp_path / "refused"), load_config("configs/eval/smoke.yaml", overrides))
    cfg = load_config("configs/eval/smoke.yaml", [*overrides, "model.trusted_checkpoint=true"])
    summary = evaluate_saliency(str(scene_folder / "images"), str(scene_folder / "masks"), "vit_tiny_test", path,
                                "simple", False, str(tmp_path / "trusted"), cfg)
    (run,) = summary["runs"]
    assert run["checkpoint"] == path and run["n_images"] - run["n_failed"] == 3


def test_summary_order_and_labels_follow_the_evaluation():
    """Checkpoints in the order evaluated (pretrained first when listed first), most-single next to
    most, natural order for numbered names, run folders instead of generic weight file names."""
    from dncut.eval.stages import result_row
    from dncut.eval.report import Accumulator

    acc = Accumulator(["simple", "most", "found"])
    for ckpt in (None, "/runs/ft_seed0/backbone.pth"):
        for method in ("found", "most-single", "most", "simple", "kmeans-k100", "kmeans-k21"):
            acc.add(result_row("img", method, hit=1.0), dataset="d", backbone="b", checkpoint=ckpt, task="discovery")
    order = [(r["checkpoint"], r["method"]) for r in acc.summary()["runs"]]
    methods = ["simple", "most", "most-single", "found", "kmeans-k21", "kmeans-k100"]
    assert order == [(None, m) for m in methods] + [("/runs/ft_seed0/backbone.pth", m) for m in methods]
    table = format_table(acc.summary())
    assert "| simple · pretrained |" in table and "| simple · ft_seed0 |" in table
    random = acc.summary()  # model.pretrained: false: the backbone's own weights are a random init
    random["runs"] = [{**r, "pretrained": False} for r in random["runs"]]
    assert "| simple · random init |" in format_table(random) and "pretrained" not in format_table(random)


def test_randomly_initialised_backbones_are_the_same_network_in_every_actor():
    """pretrained: false without a checkpoint: two actors (or one Ray restarts) build identical weights,
    whatever the process's torch RNG state."""
    import torch

    from dncut.eval.stages import NCutPredictor

    torch.manual_seed(1)
    first = NCutPredictor("vit_tiny_test", None, False, ["simple"], solver="eigh").predictor.backbone
    torch.manual_seed(2)
    second = NCutPredictor("vit_tiny_test", None, False, ["simple"], solver="eigh").predictor.backbone
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    NCutPredictor("vit_tiny_test", None, False, ["simple"], solver="eigh")
    assert torch.equal(torch.rand(1), expected)  # the caller's RNG is left alone


# --------------------------------------------------------------------------- a dead inference actor (dncut.eval.retry)
def _actor_pool_calls(source: str) -> list:
    """The ``map_batches`` calls of ``source`` whose ``compute`` is an ``ActorPoolStrategy``."""
    import ast

    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "map_batches":
            compute = next((k.value for k in node.keywords if k.arg == "compute"), None)
            if compute is not None and "ActorPoolStrategy" in ast.unparse(compute):
                calls.append(node)
    return calls


def test_every_actor_pool_is_started_without_ray_restarts():
    """Every actor pool of dncut passes ``max_restarts=0`` (``ACTOR_REMOTE_ARGS``): Ray core prints
    "constructor arguments in the object store and max_restarts > 0" (E) for Ray Data's pool actors
    otherwise; dncut re-runs the pipeline after a death instead (``run_with_retries``)."""
    from dncut.eval.retry import ACTOR_REMOTE_ARGS

    assert ACTOR_REMOTE_ARGS == {"max_restarts": 0}
    root = Path(__file__).resolve().parents[1] / "dncut"
    found = 0
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        for call in _actor_pool_calls(source) if "ActorPoolStrategy" in source else []:
            found += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            explicit = {k.arg: k.value for k in call.keywords if k.arg == "max_restarts"}
            assert any(getattr(v, "id", None) == "ACTOR_REMOTE_ARGS" for v in spread) or (
                "max_restarts" in explicit and getattr(explicit["max_restarts"], "value", None) == 0), \
                f"{path.name}:{call.lineno}: an actor pool without max_restarts=0"
    assert found >= 2  # predicted_rows (run_pipeline and predict_folder), run_segmentation


def test_merge_keeps_one_row_per_key(tmp_path: Path):
    """Parts that repeat rows (an image run again after an actor died, a retried task) merge into one
    row per (dataset, backbone, checkpoint, image_id, method); rows that differ in any key column stay."""
    import pyarrow as pa

    from dncut.eval.report import PER_IMAGE_FILE, PER_IMAGE_KEY, merge_parts, parts_folder, per_image_schema, write_part

    store = storage.Storage()
    folder = parts_folder(str(tmp_path), PER_IMAGE_FILE, store)

    def row(image_id, method, checkpoint=None, iou=0.5):
        return {"dataset": "d", "backbone": "b", "checkpoint": checkpoint, "image_id": image_id, "method": method,
                "iou": iou, "status": "ok"}

    first = [row("a", "simple"), row("a", "tokencut"), row("b", "simple"), row("a", "simple", "/ft.pth")]
    again = [row("a", "simple"), row("b", "tokencut"), row("b", "simple"), row("c", "simple")]
    for rows in (first, again, again[:1]):
        write_part(pa.Table.from_pylist(rows, schema=per_image_schema()), folder, store)
    n = merge_parts(str(tmp_path), PER_IMAGE_FILE, store, per_image_schema(), unique=PER_IMAGE_KEY)
    keys = [tuple(r[k] for k in PER_IMAGE_KEY) for r in pq.read_table(tmp_path / PER_IMAGE_FILE).to_pylist()]
    assert n == len(keys) == len(set(keys)) == 6
    assert set(keys) == {("d", "b", None, "a", "simple"), ("d", "b", None, "a", "tokencut"),
                         ("d", "b", None, "b", "simple"), ("d", "b", "/ft.pth", "a", "simple"),
                         ("d", "b", None, "b", "tokencut"), ("d", "b", None, "c", "simple")}
    assert not (tmp_path / (PER_IMAGE_FILE + ".parts")).exists()


def test_a_dead_actor_reruns_only_the_images_without_all_their_rows(caplog):
    """``run_with_retries`` + ``RowLedger``: an actor death (also wrapped) re-runs the images whose rows
    did not all arrive, each row counted once, with one WARNING; another error is raised at once; a
    death in each of ``ATTEMPTS`` runs is a clear error."""
    import logging

    from ray.exceptions import ActorDiedError, RayTaskError

    from dncut.eval.retry import ATTEMPTS, ActorRetriesExhausted, RowLedger, actor_death, run_with_retries

    records = [{"image_id": i, "record_index": k} for k, i in enumerate(("a", "b", "c", "d"))]
    ledger, counted, calls = RowLedger(["simple", "tokencut"], records), [], []

    def run(todo):  # the first run dies after a's rows and b's first row arrived
        calls.append([r["image_id"] for r in todo])
        rows = [(r["image_id"], r["record_index"], m) for r in todo for m in ("simple", "tokencut")]
        for n, (image_id, index, method) in enumerate(rows):
            if len(calls) == 1 and n == 3:
                raise RuntimeError("pipeline failed") from ActorDiedError()
            if ledger.first(index, method):
                counted.append((image_id, method))

    with caplog.at_level(logging.WARNING, logger="dncut.eval.retry"):
        run_with_retries(run, records, missing=lambda: ledger.missing(records), what="eval d b @ pretrained")
    assert calls == [["a", "b", "c", "d"], ["b", "c", "d"]]
    assert sorted(counted) == sorted((i, m) for i in "abcd" for m in ("simple", "tokencut"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("eval d b @ pretrained: an inference actor died; dncut runs the pipeline again on "
                              "the 3 of 4 images") and "ActorDiedError, raised as RuntimeError" in warning

    assert actor_death(RayTaskError("f", "tb", ActorDiedError())) is not None
    assert actor_death(ValueError("bad input")) is None
    init_failed = ActorDiedError(RayTaskError("__init__", "tb", ValueError("not a checkpoint")))
    assert init_failed.actor_init_failed and actor_death(RuntimeError("x").with_traceback(None)) is None
    assert actor_death(init_failed) is None  # a constructor that raised: the same on every run, not retried
    with pytest.raises(ValueError, match="bad input"):  # not a death: no re-run
        run_with_retries(lambda todo: (_ for _ in ()).throw(ValueError("bad input")), records,
                         missing=lambda: records, what="x")

    calls.clear()

    def always_dies(todo):
        calls.append(len(todo))
        raise ActorDiedError()

    with pytest.raises(ActorRetriesExhausted, match=rf"x: an inference actor died in each of {ATTEMPTS} runs.*4 of 4"):
        run_with_retries(always_dies, records, missing=lambda: records, what="x")
    assert calls == [4] * ATTEMPTS
