"""Tests of the offline gallery (dncut.eval.gallery): ``index.html`` and ``config.yaml`` beside the
outputs of ``evaluate_saliency``, ``evaluate_maps`` and ``predict_folder``, rendered in a real
headless Chromium from ``file://`` with no network.

* the page alone (no Ray): every picture is a ``data:`` URI or a relative file, no script, no
  network URL; per-image scores of the examples; the failed rows listed up to the bound and counted;
* the jobs (Ray): a tiny ``evaluate_saliency`` (3 generated scenes + 1 corrupt image, ``vit_tiny_test``)
  and a tiny ``predict_folder`` on the same images write ``index.html`` and ``config.yaml``;
  Chromium renders both: every ``<img>`` decodes (``naturalWidth > 0``, read by a check copy of the
  page with one script appended; the page itself has none) and the screenshot's image regions
  are not blank. ``DNCUT_GALLERY_SHOT=PATH`` keeps the evaluation page's screenshot (docs/img/gallery.png).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dncut.config import Config, load_config
from dncut.eval import gallery
from dncut.eval.report import example_payload
from dncut.storage import Storage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
IMG_SRC = re.compile(r'<img src="([^"]*)"')


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _check_offline(text: str) -> list[str]:
    """The page's picture sources; fails on a script, a network URL or an absolute path."""
    assert "<script" not in text.lower()
    assert not re.search(r'(src|href)="(https?:|//|/)', text)
    srcs = IMG_SRC.findall(text)
    assert all(s.startswith("data:image/png;base64,") or not (":" in s or s.startswith("/")) for s in srcs)
    return srcs


# --------------------------------------------------------------------------- the page alone
def test_eval_page_shows_examples_scores_and_bounded_failures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:50] = True
    heat = rng.random((48, 64)).astype(np.float32)
    sal = example_payload(image, heat, mask, None, mask, None, None)
    disc = example_payload(image, heat, mask, None, None, np.array([[20, 10, 50, 30]]), np.array([18, 8, 52, 31]))
    examples = {("ECSSD", "vit_tiny_test", None): [("a", "tokencut", sal)],
                ("VOC07", "vit_tiny_test", None): [("b", "tokencut", disc)]}
    rows = [{"dataset": "ECSSD", "backbone": "vit_tiny_test", "checkpoint": None, "image_id": "a",
             "method": "tokencut", "status": "ok", "error": None, "acc": 0.9, "iou": 0.75, "max_fbeta": 0.8,
             "corloc_hit": None},
            {"dataset": "VOC07", "backbone": "vit_tiny_test", "checkpoint": None, "image_id": "b",
             "method": "tokencut", "status": "ok", "error": None, "acc": None, "iou": None, "max_fbeta": None,
             "corloc_hit": True}]
    rows += [{"dataset": "ECSSD", "backbone": "vit_tiny_test", "checkpoint": None, "image_id": f"bad{i}",
              "method": "tokencut", "status": "failed", "error": f"ValueError: broken {i}", "acc": None,
              "iou": None, "max_fbeta": None, "corloc_hit": None} for i in range(gallery.FAILED_SHOWN + 7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "per_image.parquet")
    summary = {"runs": [{"dataset": "ECSSD", "method": "tokencut", "backbone": "vit_tiny_test", "checkpoint": None,
                         "n_images": 58, "n_failed": 57, "metrics": {"acc": 0.9, "iou": 0.75, "max_fbeta": 0.8}}]}
    uri = gallery.write_eval_gallery(str(tmp_path), summary, examples, Storage())
    text = Path(uri).read_text()
    srcs = _check_offline(text)
    assert len(srcs) == 2 * 5 - 1  # image, overlay, z2, boxes (+ ground truth for saliency only)
    assert "IoU 75.0" in text and "Acc 90.0" in text and "maxFβ 80.0" in text and "CorLoc hit" in text
    assert f"Failed rows ({gallery.FAILED_SHOWN + 7})" in text and "and 7 more" in text
    assert text.count("ValueError: broken") == gallery.FAILED_SHOWN
    assert 'stroke="lime"' in text and 'stroke="red"' in text  # GT and predicted boxes (discovery)


# --------------------------------------------------------------------------- the jobs, in Chromium
def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _render(page: Path, shot: Path, profile: Path) -> None:
    """Screenshot ``page``; check through a copy with one script that every ``<img>`` decoded."""
    out = _chromium(["--window-size=1200,900", f"--screenshot={shot}", page.resolve().as_uri()], profile)
    assert shot.is_file(), out.stderr[-2000:]
    check = page.with_name("_imgcheck.html")  # same folder: relative files resolve the same way
    script = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
              "document.body.setAttribute('data-imgs',i.length+':'+i.filter(x=>x.complete&&x.naturalWidth>0)"
              ".length)});</script>")
    check.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", check.resolve().as_uri()], profile).stdout
    finally:
        check.unlink()
    found = re.search(r'data-imgs="(\d+):(\d+)"', dom)
    assert found, dom[-2000:]
    total, loaded = map(int, found.groups())
    assert total > 0 and loaded == total, f"{loaded} of {total} images decoded in {page}"


def _not_blank(shot: Path) -> None:
    """The screenshot has picture content: many distinct colours and a real spread of values."""
    pixels = np.asarray(Image.open(shot).convert("RGB"))  # (H, W, 3)
    assert pixels.shape[:2] == (900, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500 and pixels.std() > 20, (len(colours), pixels.std())


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """images/ (3 generated scenes as JPEG + 1 corrupt file, sorted last) and masks/."""
    from dncut.data.scenes import make_scene

    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(3):
        pil, gt = make_scene(100 + i, size=96)
        pil.save(tmp_path / "data" / "images" / f"scene{i}.jpg", quality=95)
        (tmp_path / "data" / "masks" / f"scene{i}.png").write_bytes(_png(gt.astype(np.uint8) * 255))
    (tmp_path / "data" / "images" / "zbroken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "data" / "masks" / "zbroken.png").write_bytes(_png(np.full((96, 96), 255, np.uint8)))
    return tmp_path / "data"


@needs_chromium
def test_eval_and_predict_write_a_gallery_that_renders_offline(ray_session, scenes: Path, tmp_path: Path) -> None:
    from dncut.eval.jobs import evaluate_maps, evaluate_saliency, predict_folder

    cfg = Config().with_overrides({"eval.image_size": 64, "eval.num_actors": 1, "eval.batch_size": 2,
                                   "eval.examples": 2, "model.pretrained": False})
    evaluate_saliency(str(scenes / "images"), str(scenes / "masks"), "vit_tiny_test", None,
                      ["simple", "tokencut"], False, str(tmp_path / "eval"), cfg=cfg)
    pcfg = cfg.with_overrides({"eval.methods": ["tokencut"]})
    predict_folder(str(scenes / "images"), str(tmp_path / "pred"), pcfg, backbone="vit_tiny_test")
    evaluate_maps(str(scenes / "masks"), str(tmp_path / "pred" / "masks"), str(tmp_path / "maps"))

    for folder in ("eval", "pred", "maps"):
        assert (tmp_path / folder / "index.html").is_file() and (tmp_path / folder / "config.yaml").is_file()
    assert load_config(tmp_path / "pred" / "config.yaml").eval.backbones == ["vit_tiny_test"]
    assert load_config(tmp_path / "eval" / "config.yaml").eval.methods == ["simple", "tokencut"]

    ev = (tmp_path / "eval" / "index.html").read_text()
    srcs = _check_offline(ev)
    assert len(srcs) == 2 * 2 * 5  # eval.examples images x 2 methods x 5 pictures
    assert ev.count("IoU ") >= 4 and "broken" in ev and "Failed rows (2)" in ev  # both methods fail it
    pred = (tmp_path / "pred" / "index.html").read_text()
    rel = [s for s in _check_offline(pred) if not s.startswith("data:")]
    assert len(rel) == 2 and all((tmp_path / "pred" / s).is_file() for s in rel)  # the written mask files
    assert "Failed rows (1)" in pred and "broken" in pred
    assert "Failed rows (" in (tmp_path / "maps" / "index.html").read_text()

    profile = tmp_path / "chromium-profile"
    for folder in ("eval", "pred"):
        shot = tmp_path / f"{folder}.png"
        _render(tmp_path / folder / "index.html", shot, profile)
        _not_blank(shot)
    if os.environ.get("DNCUT_GALLERY_SHOT"):
        shutil.copy(tmp_path / "eval.png", os.environ["DNCUT_GALLERY_SHOT"])


def test_read_shown_keeps_the_example_scores_and_the_first_failed_rows(tmp_path: Path):
    """``read_shown`` over a 10,000-row per_image.parquet (3 batches): the scores of the example
    images (ok rows only: a failed row has no score; non-finite values left out, another backbone's row of the same image not
    taken), every failed row counted, the first ``failed_shown`` kept in file order; against a
    plain loop over every row."""
    rng = np.random.default_rng(0)
    n = 10_000
    status = np.where(rng.random(n) < 0.1, "failed", "ok").astype(object)
    status[2 * 2048], status[2 * 2049] = "failed", "ok"  # an example image whose row failed, one that did not
    iou = rng.random(n)
    iou[::97] = np.nan
    table = pa.table({
        "dataset": ["d"] * n, "backbone": np.where(np.arange(n) % 2 == 0, "a", "b").tolist(), "checkpoint": [None] * n,
        "image_id": [f"img{i // 2:05d}" for i in range(n)], "method": ["simple"] * n, "status": status.tolist(),
        "error": [f"err {i}" if s != "ok" else None for i, s in enumerate(status)],
        "acc": rng.random(n), "iou": iou, "max_fbeta": rng.random(n), "corloc_hit": [None] * n})
    pq.write_table(table, tmp_path / "per_image.parquet")
    picked = [f"img{i:05d}" for i in (0, 97 // 2, 2048, 2049, 4999)]
    examples = {("d", "a", None): [(image_id, "simple", b"") for image_id in picked]}
    shown = gallery.read_shown(str(tmp_path / "per_image.parquet"), examples, Storage(), failed_shown=7)
    rows = table.to_pylist()
    failed = [r for r in rows if r["status"] != "ok"]
    assert shown.n_failed == len(failed) > 7
    assert shown.failed == [("d", "simple", r["image_id"], r["error"]) for r in failed[:7]]
    expected = {(r["dataset"], r["backbone"], r["checkpoint"], r["image_id"], r["method"]):
                {k: r[k] for k in ("acc", "iou", "max_fbeta") if not np.isnan(r[k])}
                for r in rows if r["status"] == "ok" and r["backbone"] == "a" and r["image_id"] in picked}
    assert expected and shown.scores == expected
