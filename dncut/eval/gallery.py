"""The offline gallery: one ``index.html`` per evaluation or predict output folder.

A page a user opens from ``file://`` (or a bucket's static website) with no network: inline CSS,
no script, thumbnails as ``data:`` URIs, the predict job's written files by relative path. Per
shown image and method: image | mask overlay | z2 heat map | boxes (an inline SVG over the
image: predicted red, ground truth green) | ground truth, with the image's scores where ground
truth exists (Acc / IoU / maxFβ for saliency, the CorLoc hit for discovery); then the failed
rows with their reasons (the first ``FAILED_SHOWN`` and a count).

Bounded by construction: the evaluation pages are built from the thumbnails the workers already
make for ``eval.examples`` images per (dataset, backbone, checkpoint)
(``dncut.eval.report.example_payload``: a pickled dict of arrays at most 160 px on the long side)
and from ``per_image.parquet``, streamed batch by batch for the example images' scores and a
bounded sample of failures (``read_shown``); the predict page reads back the first
``eval.examples`` images and their written masks and maps on the driver.

* ``read_shown``: streams ``per_image.parquet`` for the example images' scores and the failure sample.
* ``eval_page(summary, examples, shown) -> str`` / ``write_eval_gallery(out_dir, summary, examples,
  store)``: the evaluations' ``index.html``.
* ``predict_page(rows, image_uris, out_dir, store, limit) -> str`` / ``write_predict_gallery(...)``:
  ``dncut predict``'s ``index.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from dncut.eval.report import run_pretrained, weights_label
from dncut.storage import Storage

INDEX_FILE = "index.html"
FAILED_SHOWN = 50  # failed rows listed by reason on a page; the others are counted
THUMB = 160  # longest side of a predict thumbnail, px (the evaluations' come from example_payload)
_SCORES = (("acc", "Acc"), ("iou", "IoU"), ("max_fbeta", "maxFβ"))

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.fig{position:relative;display:inline-block;line-height:0}.fig img{display:block;width:160px;height:auto}
.fig svg{position:absolute;left:0;top:0;width:100%;height:100%}
.hit{color:#080;font-weight:bold}.miss{color:#b00;font-weight:bold}.why{font-family:monospace;font-size:12px}
.none{color:#999}
"""


# --------------------------------------------------------------------------- the rows shown
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and math.isfinite(float(value))


ExampleKey = tuple[str, str, str | None]  # (dataset, backbone, checkpoint)


@dataclass
class Shown:
    """What an evaluation page shows besides the thumbnails, read from ``per_image.parquet``.

    Attributes:
        scores: ``(dataset, backbone, checkpoint, image_id, method) -> {acc, iou, max_fbeta, corloc_hit}``
            (finite values only) of the example images.
        failed: ``[(dataset, method, image_id, reason)]``, the first ``failed_shown`` failed rows.
        n_failed: every failed row.
    """

    scores: dict[tuple[str, str, str | None, str, str], dict[str, float]] = field(default_factory=dict)
    failed: list[tuple[str, str, str, str]] = field(default_factory=list)
    n_failed: int = 0


def read_shown(per_image_uri: str, examples: dict[ExampleKey, list[tuple[str, str, bytes]]], store: Storage,
               failed_shown: int = FAILED_SHOWN) -> Shown:
    """Stream ``per_image.parquet`` (batch by batch, never the whole file in memory) for the scores
    of the example images and a sample of the failed rows.

    Args:
        per_image_uri: the evaluation's ``per_image.parquet`` (``dncut.eval.report``'s schema).
        examples: ``(dataset, backbone, checkpoint) -> [(image_id, method, payload)]``
            (``dncut.eval.report.Accumulator.examples``).
        store: the storage handle.
        failed_shown: failed rows kept with their reason.

    Returns:
        The ``Shown`` rows; empty when the file does not exist.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = {(*group, image_id, method) for group, items in examples.items() for image_id, method, _ in items}
    wanted_ids = pa.array(sorted({key[3] for key in wanted}), pa.string())
    shown = Shown()
    if not store.exists(per_image_uri):
        return shown
    fs, path = store.filesystem(per_image_uri)
    columns = ["dataset", "backbone", "checkpoint", "image_id", "method", "status", "error",
               "acc", "iou", "max_fbeta", "corloc_hit"]
    with fs.open_input_file(path) as f:  # on this thread: Arrow's pool threads keep heaps on the driver
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=columns, use_threads=False):
            # rows become Python objects only when shown: a failed one among the first failed_shown,
            # an ok one of an example image
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            failed = batch.filter(pc.invert(ok))
            shown.n_failed += failed.num_rows
            need = failed_shown - len(shown.failed)
            for row in failed.slice(0, max(need, 0)).to_pylist():
                shown.failed.append((str(row["dataset"]), str(row["method"]), str(row["image_id"]),
                                     str(row["error"] or "")))
            example = pc.and_(ok, pc.fill_null(pc.is_in(batch.column("image_id"), value_set=wanted_ids), False))
            for row in batch.filter(example).to_pylist():
                key = (row["dataset"], row["backbone"], row["checkpoint"], row["image_id"], row["method"])
                if key in wanted:
                    shown.scores[key] = {k: float(row[k]) for k in ("acc", "iou", "max_fbeta", "corloc_hit")
                                         if row[k] is not None and _finite(float(row[k]))}
    return shown


# --------------------------------------------------------------------------- pictures
def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heat_rgb(heat: np.ndarray) -> np.ndarray:
    """A map ``(H, W)`` min-max scaled and coloured with matplotlib's ``jet`` -> ``(H, W, 3)`` uint8."""
    import matplotlib

    values = np.asarray(heat, np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).round().astype(np.uint8)  # (H, W, 3)


def overlay_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image ``(H, W, 3)`` uint8 dimmed outside ``mask`` ``(H, W)`` and tinted red inside it."""
    img = np.asarray(image, np.float32)
    inside = np.asarray(mask, np.float32)[..., None] > 0.5  # (H, W, 1)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    out = np.where(inside, 0.55 * img + 0.45 * red, 0.45 * img)
    return out.round().astype(np.uint8)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """``[x0, y0, x1, y1]`` (pixels, exclusive ends) of the largest connected part of ``mask`` ``(H, W)``."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask) > 0.5)
    if n == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))))
    ys, xs = np.nonzero(labels == largest)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _figure(src: str, size: tuple[int, int], boxes: Sequence[tuple[np.ndarray, str]] = (), alt: str = "") -> str:
    """An ``<img>`` with an SVG of ``(box [x0, y0, x1, y1], colour)`` over it; ``size`` = the image's (W, H)."""
    rects = "".join(
        f'<rect x="{b[0]:.1f}" y="{b[1]:.1f}" width="{max(b[2] - b[0], 0):.1f}" height="{max(b[3] - b[1], 0):.1f}" '
        f'fill="none" stroke="{colour}" stroke-width="{max(size) / 80:.2f}"/>'
        for box, colour in boxes for b in np.asarray(box, np.float64).reshape(-1, 4))
    svg = (f'<svg viewBox="0 0 {size[0]} {size[1]}" preserveAspectRatio="none" '
           f'xmlns="http://www.w3.org/2000/svg">{rects}</svg>') if rects else ""
    return f'<div class="fig"><img src="{html.escape(src)}" alt="{html.escape(alt)}">{svg}</div>'


def _scores_cell(scores: dict[str, float]) -> str:
    if "corloc_hit" in scores:
        hit = scores["corloc_hit"] > 0.5
        return f'<span class="{"hit" if hit else "miss"}">CorLoc {"hit" if hit else "miss"}</span>'
    parts = [f"{label} {100 * scores[key]:.1f}" for key, label in _SCORES if key in scores]
    return "<br>".join(parts) or '<span class="none">no ground truth</span>'


# --------------------------------------------------------------------------- page parts
def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    return "<table><tr>" + head + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


def _failures(failed: Sequence[tuple[str, str, str, str]], n_failed: int, where: str) -> list[str]:
    if not n_failed:
        return ["<h2>Failed rows (0)</h2><p>None.</p>"]
    rows = [[html.escape(d), html.escape(m), html.escape(i), f'<span class="why">{html.escape(e)}</span>']
            for d, m, i, e in failed]
    more = (f"<p>… and {n_failed - len(failed)} more (every row with its reason: {html.escape(where)}).</p>"
            if n_failed > len(failed) else "")
    return [f'<h2 id="failed">Failed rows ({n_failed})</h2>', _table(["dataset", "method", "image", "reason"], rows),
            more]


def _summary_table(summary: dict) -> str:
    runs = summary.get("runs", [])
    keys = list(dict.fromkeys(k for r in runs for k, v in r["metrics"].items() if k != "seeds"))
    rows = [[html.escape(str(r["dataset"])), html.escape(str(r["method"])), html.escape(str(r["backbone"])),
             html.escape(weights_label(r["checkpoint"], r.get("pretrained"))), str(r["n_images"]), str(r["n_failed"])]
            + ["-" if r["metrics"].get(k) is None else f"{100 * r['metrics'][k]:.1f}" for k in keys] for r in runs]
    return _table(["dataset", "method", "backbone", "checkpoint", "images", "failed"] + [f"{k} (%)" for k in keys],
                  rows)


# --------------------------------------------------------------------------- the evaluations' page
def _example_cells(payload: dict) -> tuple[list[str], str]:
    """The picture cells of one example payload and the boxes' legend."""
    image = np.asarray(payload["image"], np.uint8)  # (h, w, 3)
    size = (image.shape[1], image.shape[0])
    mask = payload["mask"] if payload["mask"] is not None else np.zeros(image.shape[:2])
    boxes: list[tuple[np.ndarray, str]] = []
    legend = "predicted box (red)"
    if payload.get("pred_box") is not None:
        boxes.append((payload["pred_box"], "red"))
    elif (box := mask_box(mask)) is not None:
        boxes.append((box, "red"))
        legend = "box of the mask's largest part (red)"
    if payload.get("gt_boxes") is not None:
        boxes.append((payload["gt_boxes"], "lime"))
        legend += ", ground truth (green)"
    cells = [
        _figure(_png_uri(image), size, alt="image"),
        _figure(_png_uri(overlay_rgb(image, mask)), size, alt="mask overlay"),
        _figure(_png_uri(heat_rgb(payload["heat"])), size, alt="z2") if payload.get("heat") is not None else "",
        _figure(_png_uri(image), size, boxes, alt="boxes"),
        _figure(_png_uri((np.asarray(payload["gt"]) > 0.5).astype(np.uint8) * 255), size, alt="ground truth")
        if payload.get("gt") is not None else '<span class="none">-</span>',
    ]
    return cells, legend


def eval_page(summary: dict, examples: dict[ExampleKey, list[tuple[str, str, bytes]]], shown: Shown,
              title: str = "dncut evaluation") -> str:
    """The evaluations' ``index.html``: the summary table, then per (dataset, backbone, checkpoint)
    one row per example image and method, then the failed rows.

    Args:
        summary: ``{"runs": [...]}`` as written to ``summary.json``.
        examples: ``(dataset, backbone, checkpoint) -> [(image_id, method, example_payload bytes)]``.
        shown: the example images' scores and the failed rows (``read_shown``).
        title: the page's title.

    Returns:
        The HTML text (UTF-8, self-contained).
    """
    body = ["<h2>Summary (means over the images that succeeded)</h2>", _summary_table(summary),
            '<p>Files: <a href="summary.md">summary.md</a> · <a href="summary.json">summary.json</a> · '
            '<a href="config.yaml">config.yaml</a> · per_image.parquet</p>']
    header = ["image", "method", "image", "mask overlay", "z2", "boxes", "ground truth", "scores"]
    for group, items in examples.items():
        dataset, backbone, checkpoint = group
        rows, legends = [], set()
        for image_id, method, payload in sorted(items, key=lambda t: (t[0], t[1])):
            cells, legend = _example_cells(pickle.loads(payload))
            legends.add(legend)
            scores = shown.scores.get((*group, image_id, method), {})
            rows.append([html.escape(image_id), html.escape(method), *cells, _scores_cell(scores)])
        label = f"{dataset} · {backbone} · {weights_label(checkpoint, run_pretrained(summary, backbone, checkpoint))}"
        body += [f"<h2>{html.escape(label)} ({len({i for i, _, _ in items})} images shown)</h2>",
                 f"<p>Boxes: {html.escape('; '.join(sorted(legends)))}.</p>", _table(header, rows)]
    if not examples:
        body.append("<p>No example images (eval.examples = 0, or every image failed).</p>")
    body += _failures(shown.failed, shown.n_failed, "per_image.parquet")
    return _page(title, body)


def write_eval_gallery(out_dir: str, summary: dict, examples: dict[ExampleKey, list[tuple[str, str, bytes]]],
                       store: Storage, per_image: str = "per_image.parquet") -> str:
    """Write an evaluation's ``index.html`` into ``out_dir`` (after ``per_image.parquet``); returns its URI."""
    shown = read_shown(store.join(out_dir, per_image), examples, store)
    uri = store.join(out_dir, INDEX_FILE)
    store.write_bytes(uri, eval_page(summary, examples, shown).encode("utf-8"))
    return uri


# --------------------------------------------------------------------------- the predict page
def _thumb(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(array)).resize(size, resample))


def _relative(uri: str, out_dir: str) -> str:
    prefix = out_dir.rstrip("/") + "/"
    rel = uri[len(prefix):] if uri.startswith(prefix) else uri
    return quote(rel.replace("\\", "/"))


def predict_page(rows: Sequence[dict], image_uris: dict[str, str], out_dir: str, store: Storage | None = None,
                 limit: int = 8, *, failed: Sequence[dict] = (), n_failed: int = 0, n_images: int = 0,
                 title: str = "dncut predict") -> str:
    """``dncut predict``'s ``index.html``: the first ``limit`` images (by ``image_id``) with an ok row,
    one row per method: image | mask overlay | z2 heat map | boxes | the written mask file; then
    the failed rows.

    Reads ``limit`` images and their written masks and maps back through ``store`` (the driver
    holds at most ``limit`` images at once, one at a time full size).

    Args:
        rows: output rows ``{image_id, method, status, error, mask, map, boxes}`` of the images to show.
        image_uris: ``image_id -> image URI``.
        out_dir: the predict output folder (written files are linked relative to it).
        store: the storage handle (``None``: the environment's defaults).
        limit: images shown.
        failed: failed rows listed with their reason; n_failed: every failed row; n_images: images run.

    Returns:
        The HTML text. An image that cannot be read back is listed with the reason instead.
    """
    from PIL import Image

    from dncut.data.images import decode_image

    store = store or Storage()
    ok = sorted({r["image_id"] for r in rows if r["status"] == "ok"})[:limit]
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        if r["image_id"] in ok and r["status"] == "ok":
            by_image.setdefault(r["image_id"], []).append(r)
    table = []
    for image_id in ok:
        try:
            pil = decode_image(store.read_bytes(image_uris[image_id]))
            width, height = pil.size
            scale = min(1.0, THUMB / max(width, height))
            tsize = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = np.asarray(pil.convert("RGB").resize(tsize, Image.BILINEAR))  # (th, tw, 3)
            image_cell = _figure(_png_uri(image), tsize, alt="image")
            for r in sorted(by_image[image_id], key=lambda x: x["method"]):
                mask = _thumb(np.asarray(decode_image(store.read_bytes(r["mask"])).convert("L")), tsize,
                              Image.NEAREST) > 127
                heat = _thumb(np.asarray(decode_image(store.read_bytes(r["map"])).convert("L")), tsize,
                              Image.BILINEAR)
                boxes = np.asarray(json.loads(r["boxes"] or "[]"), np.float64).reshape(-1, 4) * scale
                table.append([
                    html.escape(image_id), html.escape(r["method"]), image_cell,
                    _figure(_png_uri(overlay_rgb(image, mask)), tsize, alt="mask overlay"),
                    _figure(_png_uri(heat_rgb(heat)), tsize, alt="z2"),
                    _figure(_png_uri(image), tsize, [(boxes, "red")], alt="boxes"),
                    f'<div class="fig"><img src="{_relative(r["mask"], out_dir)}" alt="mask file"></div>'
                    f'<a href="{_relative(r["mask"], out_dir)}">mask</a> · '
                    f'<a href="{_relative(r["map"], out_dir)}">z2</a>',
                ])
        except Exception as exc:  # noqa: BLE001 - the page lists what it could not show
            table.append([html.escape(image_id), "", f'<span class="why">cannot show: {html.escape(repr(exc))}</span>',
                          "", "", "", ""])
    body = [f"<p>{n_images} images, {n_failed} failed rows; "
            f"{len(ok)} shown. Files: <a href=\"predictions.parquet\">predictions.parquet</a> · "
            "<a href=\"config.yaml\">config.yaml</a> · masks/ · z2/</p>",
            "<h2>Predictions (boxes: red)</h2>",
            _table(["image", "method", "image", "mask overlay", "z2", "boxes", "written files"], table)]
    body += _failures([("predict", str(r["method"]), str(r["image_id"]), str(r["error"])) for r in failed],
                      n_failed, "predictions.parquet")
    return _page(title, body)


def read_predictions(uri: str, store: Storage, limit: int, failed_shown: int = FAILED_SHOWN
                     ) -> tuple[list[dict], list[dict], int]:
    """Stream ``predictions.parquet`` twice (batch by batch): the rows of the first ``limit`` images
    (by ``image_id``) with an ok row, the first ``failed_shown`` failed rows, and the counts.

    Returns:
        ``(rows of the shown images, failed rows, failed row count)``.
    """
    import heapq

    import pyarrow.parquet as pq

    fs, path = store.filesystem(uri)

    def batches():
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, use_threads=False):
                yield from batch.to_pylist()

    smallest: list[str] = []  # the `limit` smallest ok image ids so far, sorted
    failed: list[dict] = []
    n_failed = 0
    for row in batches():
        if row["status"] != "ok":
            n_failed += 1
            if len(failed) < failed_shown:
                failed.append(row)
        elif row["image_id"] not in smallest:
            smallest = heapq.nsmallest(limit, [*smallest, row["image_id"]])
    chosen = set(smallest)
    rows = [r for r in batches() if r["image_id"] in chosen and r["status"] == "ok"]
    return rows, failed, n_failed


def write_predict_gallery(out_dir: str, image_uris: dict[str, str], store: Storage, limit: int = 8,
                          predictions: str = "predictions.parquet") -> str:
    """Write ``dncut predict``'s ``index.html`` into ``out_dir`` from its ``predictions.parquet``
    (``read_predictions``, ``predict_page``; ``image_uris``: ``image_id -> URI`` of every image run);
    returns its URI."""
    rows, failed, n_failed = read_predictions(store.join(out_dir, predictions), store, limit)
    n_images = len(image_uris)
    uri = store.join(out_dir, INDEX_FILE)
    page = predict_page(rows, image_uris, out_dir, store, limit, failed=failed, n_failed=n_failed, n_images=n_images)
    store.write_bytes(uri, page.encode("utf-8"))
    return uri
