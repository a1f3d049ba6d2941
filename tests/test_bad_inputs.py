"""Every kind of bad input of ``bench/corpus.py`` through the library: a clear error or a counted,
logged skip, never a crash of the whole job, never a silently wrong result; every input accounted for.

    images + masks   ONE ``evaluate_saliency`` run (Ray) over all of them, and the training data path
                     (``ViewMaker`` on each image, in process)
    annotations      the VOC / COCO readers (``dataset_records``) and the evaluation's three stages
    configs          ``load_config`` / ``Config.with_overrides``; S3 sources via ``check_source`` on moto
    features         ``simple_ncut`` / ``tokencut`` / ``ncut_maps`` and ``Predictor``
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bench import corpus, s3server
from dncut.config import Config, ConfigError, load_config

METHODS = ["simple", "tokencut"]
MASK_ENCODINGS = ("mask_grey_0_255", "mask_grey_0_1", "mask_16bit", "mask_rgb_class_colour", "mask_palette",
                  "mask_1bit")
"""Mask kinds that encode the same scene mask losslessly: their scores must be identical."""
VOID_ENCODINGS = ("mask_grey_voc_void", "mask_palette_voc_void")
"""The scene mask as VOC labels with a 255 void ring just outside the object (grey and palette)."""


def test_the_corpus_is_large_enough_and_well_formed():
    assert len(corpus.KINDS) >= 30
    counts = {c: len(corpus.kinds_of(c)) for c in corpus.CATEGORIES}
    assert all(n >= 5 for n in counts.values()), counts
    for k in corpus.KINDS.values():
        assert k.category in corpus.CATEGORIES and k.expect and k.note
        assert (k.train is not None) == (k.category == "image"), k.name


# =============================================================================== images + masks: one eval job
@pytest.fixture(scope="module")
def saliency_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    kinds = corpus.write_images_and_masks(root)
    cfg = load_config("configs/eval/smoke.yaml", ["eval.batch_size=16", "eval.examples=2"])
    start = time.perf_counter()
    from dncut.eval.jobs import evaluate_saliency

    summary = evaluate_saliency(str(root / "images"), str(root / "masks"), "vit_tiny_test", None, METHODS, False,
                                str(root / "out"), cfg)
    took = time.perf_counter() - start
    rows = pq.read_table(root / "out" / "per_image.parquet").to_pylist()
    return {"root": root, "kinds": kinds, "summary": summary, "rows": rows, "seconds": took}


def test_every_input_has_one_row_per_method(saliency_run):
    root, rows = saliency_run["root"], saliency_run["rows"]
    stems = {p.stem for p in (root / "images").iterdir()} | {p.stem for p in (root / "masks").iterdir()}
    assert stems == {k.name for k in saliency_run["kinds"]}  # one stem per kind, nothing else on disk
    seen = sorted((r["image_id"], r["method"]) for r in rows)
    assert seen == sorted((s, m) for s in stems for m in METHODS), "every input: exactly one row per method"


def test_each_image_and_mask_kind_has_its_expected_outcome(saliency_run):
    outcomes = corpus.outcomes_from_rows(saliency_run["rows"], saliency_run["kinds"])
    wrong = {k.name: (k.expect, outcomes[k.name].outcome, outcomes[k.name].reason)
             for k in saliency_run["kinds"] if not corpus.check(outcomes[k.name], k.expect)}
    assert not wrong, wrong
    for row in saliency_run["rows"]:  # a failed row says why, in one line that names the error class
        if row["status"] == "failed":
            assert row["error"] and ": " in row["error"] and row["iou"] is None, row
        else:
            assert not row["error"] and 0.0 <= row["iou"] <= 1.0, row


def test_the_summary_counts_the_failed_inputs(saliency_run):
    rows, summary = saliency_run["rows"], saliency_run["summary"]
    n_inputs = len(saliency_run["kinds"])
    n_bad = sum(k.expect.startswith("failed") for k in saliency_run["kinds"])
    assert n_bad >= 10
    for run in summary["runs"]:
        mine = [r for r in rows if r["method"] == run["method"]]
        assert run["n_images"] == n_inputs and run["n_failed"] == n_bad, run
        ok = [r["iou"] for r in mine if r["status"] == "ok"]
        assert run["metrics"]["iou"] == pytest.approx(np.mean(ok))  # failed rows are not averaged in
    md = (saliency_run["root"] / "out" / "summary.md").read_text()
    assert f"## Failed images ({n_bad * len(METHODS)})" in md or f"## Failed images ({n_bad})" in md


def test_mask_encodings_of_one_mask_score_identically(saliency_run):
    rows = {(r["image_id"], r["method"]): r for r in saliency_run["rows"]}
    for m in METHODS:
        ious = {k: rows[(k, m)]["iou"] for k in MASK_ENCODINGS}
        assert len(set(ious.values())) == 1, (m, ious)  # grey, labels, 16-bit, class colour, palette, 1-bit
        assert rows[("mask_jpeg_nonbinary", m)]["iou"] == pytest.approx(ious["mask_grey_0_255"], abs=0.03)


def test_void_ring_masks_read_alike_and_leave_the_ring_out(saliency_run):
    """Grey and palette VOC labels score alike; the ring is background in the 0/255 mask, so leaving
    it out removes only true negatives or false positives: IoU can only rise."""
    rows = {(r["image_id"], r["method"]): r for r in saliency_run["rows"]}
    for m in METHODS:
        grey, palette, plain = (rows[(k, m)]["iou"] for k in (*VOID_ENCODINGS, "mask_grey_0_255"))
        assert grey == palette >= plain, (m, grey, palette, plain)


def test_the_eval_run_is_fast(saliency_run):
    assert saliency_run["seconds"] < 45, saliency_run["seconds"]


def test_training_path_turns_bad_images_into_counted_rows(tmp_path):
    """``ViewMaker`` (the Ray Data map of training) on every image kind, in process: a view pair or an
    ``ok=False`` row whose ``failure`` holds the reason and the URI; never an exception."""
    kinds = corpus.kinds_of("image")
    for k in kinds:
        k.make(tmp_path)
    outcomes = corpus.run_view_maker(tmp_path, kinds)
    wrong = {k.name: (k.train, outcomes[k.name].outcome, outcomes[k.name].reason)
             for k in kinds if not corpus.check(outcomes[k.name], k.train)}
    assert not wrong, wrong
    assert sum(o.outcome == "skip" for o in outcomes.values()) >= 7
    assert max(o.seconds for o in outcomes.values()) < 2.0  # a bomb's header is refused, never decoded


# =============================================================================== annotations
@pytest.fixture(scope="module")
def annotation_outcomes(tmp_path_factory):
    return corpus.run_annotations(tmp_path_factory.mktemp("annotations"))


def test_each_annotation_kind_has_its_expected_outcome(annotation_outcomes):
    wrong = {k.name: (k.expect, annotation_outcomes[k.name].outcome, annotation_outcomes[k.name].reason)
             for k in corpus.kinds_of("annotation") if not corpus.check(annotation_outcomes[k.name], k.expect)}
    assert not wrong, wrong


def test_coco_class_maps_as_users_write_them(annotation_outcomes):
    """VOC spellings give the VOC classes; RLE objects (compressed, uncompressed) are drawn on their pixels."""
    from PIL import Image

    from dncut.eval.segmentation import SCORE_SIZE

    names = annotation_outcomes["coco_seg_voc_names"].rows
    assert [sorted(set(np.unique(r["labels"]).tolist()) - {0}) for r in names] == [[1], [20]]  # aeroplane, tv
    for i, row in enumerate(annotation_outcomes["coco_seg_rle"].rows):
        cat = Image.fromarray(corpus.scene(40 + i)[1].astype(np.uint8) * 8)  # 8 = cat
        assert np.array_equal(row["labels"], np.asarray(cat.resize((SCORE_SIZE, SCORE_SIZE), Image.NEAREST))), i
    assert "'toaster' (1)" in annotation_outcomes["coco_seg_unmapped"].reason


def test_malformed_annotation_files_are_named_in_the_error(annotation_outcomes):
    for name, file in (("voc_malformed_xml", "Annotations/000001.xml"), ("voc_non_numeric", "Annotations/000001.xml"),
                       ("coco_malformed_json", "annotations/instances_val.json"),
                       ("coco_missing_key", "annotations/instances_val.json")):
        assert file in annotation_outcomes[name].reason, (name, annotation_outcomes[name].reason)


def test_dropped_boxes_are_counted_and_never_scored_as_a_miss(annotation_outcomes):
    def rows(name):
        return {(r["image_id"], r["method"]): r for r in annotation_outcomes[name].rows}

    # the only box of 000001 lay outside the image: dropped (logged, counted) -> a failed row, not a miss
    outside = rows("voc_box_outside")
    assert "dropped 1 boxes of outside the image" in annotation_outcomes["voc_box_outside"].reason
    assert {r["status"] for k, r in outside.items() if k[0] == "000001"} == {"failed"}
    assert all("no ground-truth box" in r["error"] for k, r in outside.items() if k[0] == "000001")
    assert {r["status"] for k, r in outside.items() if k[0] == "000000"} == {"ok"}
    # a zero-area box beside a good one: the good one is scored, as in the control tree
    zero, control = rows("voc_zero_area"), rows("voc_ok")
    assert all(r["status"] == "ok" for r in zero.values())
    assert {k: r["corloc_hit"] for k, r in zero.items()} == {k: r["corloc_hit"] for k, r in control.items()}
    coco = rows("coco_box_outside")
    assert all(r["status"] == "ok" for r in coco.values())
    assert {r["status"] for k, r in rows("coco_zero_area").items() if k[0] == "000000000001"} == {"failed"}


def test_a_voc_with_many_bad_files_fails_before_any_image_is_read(tmp_path):
    from dncut.data.datasets import DatasetLayoutError, voc_dataset

    spec = corpus.voc_tree(tmp_path / "voc", n=4, xml={"000002": "not xml at all"})
    with pytest.raises(DatasetLayoutError, match=r"Annotations/000002\.xml: ParseError"):
        voc_dataset(spec["root"], "2007")


# =============================================================================== configs and sources
def test_each_config_kind_is_a_clear_error(s3_server, tmp_path, monkeypatch):
    closed = f"http://127.0.0.1:{s3server.free_port()}"
    outcomes = corpus.run_configs(tmp_path, s3_server.endpoint_url, closed,
                                  setenv=lambda n, v: monkeypatch.delenv(n, raising=False) if v is None
                                  else monkeypatch.setenv(n, v))
    wrong = {k.name: (k.expect, outcomes[k.name].outcome, outcomes[k.name].reason)
             for k in corpus.kinds_of("config") if not corpus.check(outcomes[k.name], k.expect)}
    assert not wrong, wrong
    assert "cfgSecretValue" not in outcomes["cfg_credential_key"].reason  # the key is named, its value is not
    for name, o in outcomes.items():
        if name.startswith("src_"):  # sources name their URI and fail fast (no retry hang)
            uri = corpus.KINDS[name].make(tmp_path)["source"]
            assert uri in o.reason, (name, o.reason)
            assert o.seconds < 5.0, (name, o.seconds)
        assert s3server.FAKE_SECRET_KEY not in o.reason


@pytest.mark.parametrize(("override", "key"), [
    ({"ncut.tau": float("nan")}, "ncut.tau"), ({"train.lr": float("inf")}, "train.lr"),
    ({"loss.temperature": float("-inf")}, "loss.temperature"), ({"data.crop_size": -64}, "data.crop_size"),
    ({"eval.batch_size": "16x"}, "eval.batch_size"), ({"model.backbon": "x"}, "model.backbon"),
])
def test_with_overrides_rejects_bad_values_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().with_overrides(override)


def test_training_source_on_a_missing_bucket_fails_in_the_driver(s3_server):
    """The driver's precheck (``source_uris``) on the moto server: a StorageError naming the URI, fast."""
    from dncut.data.pipeline import source_uris
    from dncut.storage import StorageError

    cfg = load_config("configs/train/smoke.yaml", ["data.train=s3://dncut-corpus-missing/train",
                                                   f"storage.endpoint_url={s3_server.endpoint_url}"])
    start = time.perf_counter()
    with pytest.raises(StorageError, match=r"dncut-corpus-missing.*does not exist"):
        source_uris(cfg)
    assert time.perf_counter() - start < 5.0


# =============================================================================== features
@pytest.mark.parametrize("solver", ["lobpcg", "eigh"])
def test_each_feature_kind_is_scored_or_a_clear_error(tmp_path, solver):
    outcomes = corpus.run_features(tmp_path, solver)
    wrong = {k.name: (k.expect, outcomes[k.name].outcome, outcomes[k.name].reason)
             for k in corpus.kinds_of("feature") if not corpus.check(outcomes[k.name], k.expect)}
    assert not wrong, wrong
    # duplicated tokens: two feature vectors, left 3 columns / right 5: the cut is exactly that split
    simple, tc, maps = outcomes["feat_duplicated_rows"].results
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :3] = True
    assert torch.equal(simple[0], left) or torch.equal(simple[0], ~left)
    assert torch.equal(tc[0], left) or torch.equal(tc[0], ~left)
    simple, tc, maps = outcomes["feat_tokencut_complete"].results  # Simple still cuts; TokenCut refuses
    assert torch.equal(simple[0], left) or torch.equal(simple[0], ~left)
    assert isinstance(tc, ValueError) and isinstance(maps, ValueError)
    # the same image twice in a batch: the same masks twice, and the same as alone
    simple, tc, maps = outcomes["feat_duplicated_items"].results
    assert torch.equal(simple[0], simple[1]) and torch.equal(tc[0], tc[1])
    for key in ("simple_mask", "tokencut_mask"):
        assert np.array_equal(maps[0][key], maps[1][key])
    single = corpus.run_features(tmp_path / "one", solver, [corpus.KINDS["feat_duplicated_items"]])
    one = torch.from_numpy(np.load(tmp_path / "one" / "feat_duplicated_items.npy")[:1])
    from dncut.eval.methods import simple_ncut

    assert torch.equal(simple_ncut(one, solver=solver)[1][0], simple[0]) and single


def test_a_constant_item_fails_alone_in_ncut_maps_and_the_predictor():
    """A batch with a good, a constant (a blank image) and a NaN image: the Predictor fails the two bad
    images with their reasons and predicts the good one exactly as it would alone."""
    from dncut.eval.stages import predict_batch
    from dncut.eval.predict import Predictor

    class Backbone(torch.nn.Module):
        """Mean colour per 8x8 patch plus position-free noise-free channels; NaN for an all-13 image."""

        def forward(self, images):  # (B, 3, H, W) uint8 -> (B, 3, H/8, W/8)
            x = torch.nn.functional.avg_pool2d(images.float() / 255 - 0.5, 8)
            poison = (images == 13).flatten(1).all(1)  # (B,)
            x[poison] = float("nan")
            return x

    backbone = Backbone()
    backbone.spec = type("Spec", (), {"stride": 8})()
    image, _ = corpus.scene()
    good = np.asarray(image)  # (64, 64, 3)
    blank = np.full((64, 64, 3), 200, np.uint8)  # constant features
    poison = np.full((64, 64, 3), 13, np.uint8)  # NaN features
    predictor = Predictor(backbone, METHODS, "lobpcg")
    results, errors = predictor.predict([good, blank, poison, None])
    assert set(errors) == {1, 2}
    assert "same for every patch" in errors[1] and "NonFiniteFeaturesError" in errors[2]
    alone, _ = predictor.predict([good])
    for key in ("simple_mask", "tokencut_mask", "tokencut_box"):
        assert np.array_equal(results[0][key], alone[0][key])
    assert results[1] is None and results[2] is None and results[3] is None
    batch = {"image_id": np.array(["good", "blank", "poison"]), "status": np.array(["ok"] * 3),
             "error": np.array([""] * 3), "input": [good, blank, poison]}
    out = predict_batch(predictor, batch)
    assert list(out["status"]) == ["ok", "failed", "failed"]
    assert "same for every patch" in out["error"][1] and "NaN/Inf" in out["error"][2]
