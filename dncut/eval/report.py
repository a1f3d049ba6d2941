"""Evaluation reports: streaming aggregation, Markdown tables, the examples figure, output files.

* ``Accumulator``: takes the scored rows of ``dncut.eval.stages`` one at a time (``add``), or one
  method's rows of a batch at once (``add_batch``: what the workers return, ``dncut.eval.streamed``),
  and keeps only running sums, fixed-size Fβ curves per run, the example payloads of
  ``eval.examples`` images and at most ``FAILED_SAMPLE`` failed images: its memory does not grow
  with the number of images.
  ``summary() -> {"runs": [...]}``.
* Per-image rows (``per_image.parquet``) never pass through the driver's memory: the workers write
  them in parts (``write_per_image``, ``write_part``: ``<out>/<file>.parts/<uuid>.parquet``) and the
  driver streams the parts into one Parquet file, part by part (``merge_parts``; both in
  ``dncut.eval.streamed``); row order is not
  guaranteed (rows of one batch stay together). A row written twice (an image run again after an
  actor died, ``dncut.eval.retry``; a Ray task retried after it wrote its part) is kept once:
  ``PER_IMAGE_KEY`` is unique in ``per_image.parquet``.
* ``format_table(summary) -> str``: the paper's layout (Tab. 1: rows = methods, columns =
  datasets x Acc / IoU / maxFβ, "without" then "with bilateral solver"; Tab. 2: CorLoc per
  discovery dataset), values in percent.
* ``example_payload(...) -> bytes`` (built in the workers, thumbnails <= 160 px) and
  ``examples_png(items) -> bytes``: grid image | z2 heat map | mask | refined mask | ground truth.
* ``write_report(out_dir, summary, acc, config_yaml, store)``: ``summary.json``, ``summary.md``,
  ``per_image.parquet`` (merged from the workers' parts), ``examples.png`` and ``config.yaml``
  through the ``dncut.storage.Storage`` handle (so ``s3://`` works).
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dncut import storage
from dncut.eval.streamed import driver_rows, merge_parts, parts_folder, write_part

log = logging.getLogger(__name__)
GENERIC_WEIGHT_FILES = ("backbone.pth", "model.safetensors", "checkpoint.pth", "state.pt")
THUMB = 160  # longest side of example thumbnails, pixels
SALIENCY_METRICS = ("acc", "iou", "max_fbeta")  # paper Tab. 1 columns, in this order
_LABELS = {"acc": "Acc", "iou": "IoU", "max_fbeta": "maxFβ", "mae": "MAE", "acc_binary": "Acc (bin)",
           "iou_binary": "IoU (bin)", "max_fbeta_pysod": "maxFβ (pysod)", "mae_pysod": "MAE (pysod)",
           "corloc": "CorLoc", "miou": "mIoU", "miou_std": "mIoU std"}
_MEANS = ("acc", "iou", "mae", "acc_binary", "iou_binary", "pysod_mae", "corloc_hit")
PER_IMAGE_FILE = "per_image.parquet"
PER_IMAGE_KEY = ("dataset", "backbone", "checkpoint", "image_id", "method")  # one row each in per_image.parquet
FAILED_SAMPLE = 100  # failed images the Accumulator keeps for summary.md (all of them are in per_image.parquet)
_FLOAT_COLUMNS = ("acc", "iou", "max_fbeta", "mae", "acc_binary", "iou_binary")


# --------------------------------------------------------------------------- aggregation
def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


@dataclass
class _RunStats:
    """Running sums of one run (dataset, method, backbone, checkpoint)."""

    task: str
    pysod: bool
    n_images: int = 0
    n_failed: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fbeta: np.ndarray | None = None
    pysod_fbeta: np.ndarray | None = None
    fixed: dict[str, Any] | None = None  # dataset-level metrics (segmentation's mIoU), set once

    def add(self, row: dict) -> None:
        self.n_images += 1
        if row["status"] != "ok":
            self.n_failed += 1
            return
        for key in _MEANS:
            if _finite(row.get(key)):
                self.sums[key] = self.sums.get(key, 0.0) + float(row[key])
                self.counts[key] = self.counts.get(key, 0) + 1
        if self.task == "saliency" and row["fbeta_curve"] is not None:  # None: its batch's sum is on another row
            curve, pcurve = np.asarray(row["fbeta_curve"], np.float64), np.asarray(row["pysod_curve"], np.float64)
            self.fbeta = curve if self.fbeta is None else self.fbeta + curve
            self.pysod_fbeta = pcurve if self.pysod_fbeta is None else self.pysod_fbeta + pcurve

    def add_batch(self, payload: dict) -> None:
        """``add`` of each row of one ``dncut.eval.streamed.batch_payloads`` dict: the ``ok`` rows'
        finite values added one by one in row order (the same float64 sums), the batch's curve sums."""
        ok = payload["ok"]
        n_ok = int(np.count_nonzero(ok))
        self.n_images += len(ok)
        self.n_failed += len(ok) - n_ok
        if not n_ok:
            return
        for key in _MEANS:
            values = payload["metrics"].get(key)
            if values is None:
                continue
            for value in values[np.isfinite(values)].tolist():  # (n_ok,) -> the finite ones, row order
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        if self.task == "saliency" and payload["fbeta_curve"] is not None:
            curve, pcurve = payload["fbeta_curve"], np.asarray(payload["pysod_curve"], np.float64)
            self.fbeta = curve if self.fbeta is None else self.fbeta + curve
            self.pysod_fbeta = pcurve if self.pysod_fbeta is None else self.pysod_fbeta + pcurve

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None

    def metrics(self) -> dict[str, float | None]:
        """Means over the images that succeeded; ``None`` when none did."""
        if self.fixed is not None:
            return dict(self.fixed)
        if self.task == "discovery":
            return {"corloc": self.mean("corloc_hit")}
        n_ok = self.n_images - self.n_failed
        out = {
            "acc": self.mean("acc"), "iou": self.mean("iou"),
            "max_fbeta": float((self.fbeta / n_ok).max()) if n_ok else None, "mae": self.mean("mae"),
        }
        if self.counts.get("iou_binary"):
            out.update(acc_binary=self.mean("acc_binary"), iou_binary=self.mean("iou_binary"))
        if self.pysod:
            out.update(max_fbeta_pysod=float((self.pysod_fbeta / n_ok).max()) if n_ok else None,
                       mae_pysod=self.mean("pysod_mae"))
        return out


def per_image_schema():
    """The ``pyarrow`` schema of ``per_image.parquet`` (nulls where a metric does not apply)."""
    import pyarrow as pa

    return pa.schema([
        ("dataset", pa.string()), ("method", pa.string()), ("backbone", pa.string()),
        ("checkpoint", pa.string()), ("image_id", pa.string()),
        *[(k, pa.float64()) for k in _FLOAT_COLUMNS],
        ("pred_box", pa.list_(pa.float64())), ("corloc_hit", pa.bool_()),
        ("status", pa.string()), ("error", pa.string()),
    ])


def per_image_row(row: dict, *, dataset: str, backbone: str, checkpoint: str | None) -> dict[str, Any]:
    """One scored row (``dncut.eval.stages.score_row`` / ``score_map`` / ``result_row``) as its
    ``per_image.parquet`` record (``per_image_schema``): non-finite metrics and boxes -> null."""
    clean = lambda v: float(v) if _finite(v) else None  # noqa: E731
    box = np.asarray(row["pred_box"], np.float64)
    return {
        "dataset": dataset, "method": str(row["method"]), "backbone": backbone, "checkpoint": checkpoint,
        "image_id": str(row["image_id"]), **{k: clean(row[k]) for k in _FLOAT_COLUMNS},
        "pred_box": box.tolist() if box.shape == (4,) and np.all(np.isfinite(box)) else None,
        "corloc_hit": bool(row["corloc_hit"]) if _finite(row["corloc_hit"]) else None,
        "status": str(row["status"]), "error": str(row["error"]) or None,
    }


def write_per_image(batch, *, out_dir: str, dataset: str, backbone: str, checkpoint: str | None,
                    store: storage.Storage, counted: Mapping[str, np.ndarray] | None = None):
    """Ray Data ``map_batches`` step (``batch_format="pyarrow"``): the batch's scored rows as a part of
    ``<out_dir>/per_image.parquet``; returns what the driver aggregates: ``driver_rows(batch, counted)``
    (the rows without ``counted``, ``{method: record indices}``, one payload row per method,
    ``dncut.eval.streamed``)."""
    import pyarrow as pa

    rows = [per_image_row(r, dataset=dataset, backbone=backbone, checkpoint=checkpoint) for r in batch.to_pylist()]
    if rows:
        write_part(pa.Table.from_pylist(rows, schema=per_image_schema()),
                   parts_folder(out_dir, PER_IMAGE_FILE, store), store)
    return driver_rows(batch, counted, _MEANS)


class Accumulator:
    """Streams scored rows into run statistics, example payloads and a bounded sample of failures.

    Memory: running sums and one Fβ curve per run, the ``eval.examples`` payloads, at most
    ``FAILED_SAMPLE`` failed images (``failures``: ``{dataset, image_id, method, error}``) and the
    count of failed rows (``n_failed_rows``); nothing per image otherwise (the per-image rows go to
    ``per_image.parquet`` from the workers: ``write_per_image``).

    Args:
        method_order: order of the methods in the summary (others follow, sorted).
    """

    def __init__(self, method_order: Sequence[str] = ()) -> None:
        self.method_order = list(method_order)
        self.runs: dict[tuple[str, str, str, str | None], _RunStats] = {}
        self.failures: list[dict[str, str]] = []
        self.n_failed_rows = 0
        self.examples: dict[tuple[str, str, str | None], list[tuple[str, str, bytes]]] = {}
        self._failed_keys: set[tuple[str, str]] = set()
        self._dataset_order: dict[str, int] = {}
        self._checkpoint_order: dict[str | None, int] = {}

    def add(self, row: dict, *, dataset: str, backbone: str, checkpoint: str | None, task: str,
            pysod: bool = False) -> None:
        """Add one scored row (see ``dncut.eval.stages.score_row``)."""
        method = str(row["method"])
        self._dataset_order.setdefault(dataset, len(self._dataset_order))
        self._checkpoint_order.setdefault(checkpoint, len(self._checkpoint_order))
        key = (dataset, method, backbone, checkpoint)
        self.runs.setdefault(key, _RunStats(task, pysod)).add(row)
        if str(row["status"]) != "ok":
            self._failed(dataset, str(row["image_id"]), method, str(row["error"]))
        example = row.get("example")
        if example is not None and len(example):
            self.examples.setdefault((dataset, backbone, checkpoint), []).append(
                (str(row["image_id"]), method, bytes(example)))

    def add_batch(self, payload: dict, *, dataset: str, backbone: str, checkpoint: str | None, task: str,
                  pysod: bool = False) -> None:
        """Add the rows of one method in one batch, as ``add`` of each row in row order would: a
        ``dncut.eval.streamed.batch_payloads`` dict (what ``write_per_image`` returns to the driver)."""
        method = str(payload["method"])
        self._dataset_order.setdefault(dataset, len(self._dataset_order))
        self._checkpoint_order.setdefault(checkpoint, len(self._checkpoint_order))
        self.runs.setdefault((dataset, method, backbone, checkpoint), _RunStats(task, pysod)).add_batch(payload)
        for image_id, error in payload["failed"]:
            self._failed(dataset, str(image_id), method, str(error))
        for image_id, example in payload["examples"]:
            self.examples.setdefault((dataset, backbone, checkpoint), []).append((str(image_id), method, bytes(example)))

    def _failed(self, dataset: str, image_id: str, method: str, error: str) -> None:
        self.n_failed_rows += 1
        image = (dataset, image_id)
        if image not in self._failed_keys and len(self._failed_keys) <= FAILED_SAMPLE:
            self._failed_keys.add(image)  # one more than the sample: tells "more" from "exactly"
            if len(self.failures) < FAILED_SAMPLE:
                self.failures.append({"dataset": dataset, "image_id": image_id, "method": method, "error": error})

    @property
    def more_failures(self) -> bool:
        """More than ``FAILED_SAMPLE`` images failed (``failures`` is a sample)."""
        return len(self._failed_keys) > FAILED_SAMPLE

    def set_metrics(self, key: tuple[str, str, str, str | None], metrics: dict[str, Any]) -> None:
        """Dataset-level metrics of a run whose rows were added (segmentation: ``miou``, ``miou_std``, ``seeds``)."""
        self.runs[key].fixed = dict(metrics)

    def _sort_key(self, key: tuple[str, str, str, str | None]) -> tuple:
        """Datasets and checkpoints in the order they were evaluated, then methods in ``method_order``
        (``most-single`` after ``most``; other names in natural order: ``kmeans-k21`` before ``kmeans-k100``)."""
        dataset, method, backbone, checkpoint = key
        base = method.removesuffix("+bs").removesuffix("-single")
        rank = self.method_order.index(base) if base in self.method_order else len(self.method_order)
        natural = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", method))
        return (self._dataset_order[dataset], backbone, self._checkpoint_order[checkpoint], method.endswith("+bs"),
                rank, natural)

    def summary(self) -> dict:
        """``{"runs": [{dataset, method, backbone, checkpoint, n_images, n_failed, metrics}]}``."""
        runs = []
        for key in sorted(self.runs, key=self._sort_key):
            stats = self.runs[key]
            dataset, method, backbone, checkpoint = key
            runs.append({"dataset": dataset, "method": method, "backbone": backbone, "checkpoint": checkpoint,
                         "n_images": stats.n_images, "n_failed": stats.n_failed, "metrics": stats.metrics()})
        return {"runs": runs}


# --------------------------------------------------------------------------- tables
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def weights_label(checkpoint: str | None, pretrained: bool | None = True) -> str:
    """How tables, figures and logs name a run's weights: its checkpoint, else the backbone's own weights,
    ``pretrained`` (``model.pretrained``) or ``random init`` (``model.pretrained: false``)."""
    return str(checkpoint) if checkpoint else ("pretrained" if pretrained is not False else "random init")


def run_pretrained(summary: dict, backbone: str, checkpoint: str | None) -> bool:
    """``model.pretrained`` of the summary's runs of (``backbone``, ``checkpoint``) (True when unrecorded)."""
    return next((r.get("pretrained", True) for r in summary.get("runs", [])
                 if r["backbone"] == backbone and r["checkpoint"] == checkpoint), True)


def _row_label(run: dict, multi_backbone: bool, multi_checkpoint: bool) -> str:
    parts = [run["method"]]
    if multi_backbone:
        parts.append(str(run["backbone"]))
    if multi_checkpoint:
        ckpt = run["checkpoint"]
        parts_of = str(ckpt).rstrip("/").rsplit("/", 2)
        # a generic file name (backbone.pth, model.safetensors) says less than its run folder
        name = weights_label(None, run.get("pretrained", True)) if ckpt is None else (
            parts_of[-2] if len(parts_of) > 1 and parts_of[-1] in GENERIC_WEIGHT_FILES else parts_of[-1])
        if name != run["method"]:  # maps: the folder is named after the method
            parts.append(name)
    return " · ".join(parts)


def _grid(runs: list[dict]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """datasets in order, and label -> dataset -> metrics."""
    multi_b = len({r["backbone"] for r in runs}) > 1
    multi_c = len({r["checkpoint"] for r in runs}) > 1
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    cells: dict[str, dict[str, dict]] = {}
    for run in runs:
        cells.setdefault(_row_label(run, multi_b, multi_c), {})[run["dataset"]] = run["metrics"]
    return datasets, cells


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def format_table(summary: dict) -> str:
    """Markdown results in the paper's layout, values in percent.

    Saliency (Tab. 1): one row per method (with backbone / checkpoint when several are
    compared), columns = datasets x (Acc, IoU, maxFβ; for precomputed maps also MAE and
    pysodmetrics' maxFβ / MAE); rows without and with the bilateral
    solver (``+bs``) in separate blocks. Discovery (Tab. 2): CorLoc per dataset.

    Args:
        summary: ``{"runs": [...]}`` as written to ``summary.json``.

    Returns:
        Markdown text (empty-summary message when there is no run).
    """
    runs = summary.get("runs", [])
    if not runs:
        return "_no evaluation runs_"
    out: list[str] = []
    saliency = [r for r in runs if "corloc" not in r["metrics"] and "miou" not in r["metrics"]]
    discovery = [r for r in runs if "corloc" in r["metrics"]]
    segmentation = [r for r in runs if "miou" in r["metrics"]]
    if saliency:
        datasets, cells = _grid(saliency)
        pysod = any("max_fbeta_pysod" in r["metrics"] for r in saliency)  # precomputed maps
        keys = SALIENCY_METRICS + (("mae", "max_fbeta_pysod", "mae_pysod") if pysod else ())
        header = ["Method"] + [f"{d} {_LABELS[m]}" for d in datasets for m in keys]
        rows: list[list[str]] = []
        for with_bs in (False, True):
            block = [label for label in cells if label.split(" · ")[0].endswith("+bs") == with_bs]
            if not block:
                continue
            if any(label.split(" · ")[0].endswith("+bs") for label in cells):
                title = "with" if with_bs else "without"
                rows.append([f"*— {title} bilateral solver —*"] + [""] * (len(header) - 1))
            for label in block:
                rows.append([label] + [_pct(cells[label].get(d, {}).get(m)) for d in datasets for m in keys])
        out += ["**Unsupervised saliency** (%)", ""] + _markdown(header, rows)
    if discovery:
        datasets, cells = _grid(discovery)
        rows = [[label] + [_pct(cells[label].get(d, {}).get("corloc")) for d in datasets] for label in cells]
        out += ([""] if out else []) + ["**Object discovery, CorLoc** (%)", ""]
        out += _markdown(["Method"] + datasets, rows)
    if segmentation:
        datasets, cells = _grid(segmentation)
        rows = [[label] + [_pct(cells[label].get(d, {}).get("miou")) for d in datasets] for label in cells]
        out += ([""] if out else []) + ["**Unsupervised semantic segmentation, mIoU** (%, mean over k-means seeds)", ""]
        out += _markdown(["Clustering"] + datasets, rows)
    return "\n".join(out)


def format_details(summary: dict) -> str:
    """One Markdown row per run with counts and every metric (fractions, 4 decimals)."""
    runs = summary.get("runs", [])
    keys = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    header = ["dataset", "method", "backbone", "checkpoint", "images", "failed"] + [_LABELS.get(k, k) for k in keys]
    rows = [[r["dataset"], r["method"], str(r["backbone"]), str(r["checkpoint"]), str(r["n_images"]),
             str(r["n_failed"])] + ["-" if r["metrics"].get(k) is None else f"{r['metrics'][k]:.4f}" for k in keys]
            for r in runs]
    return "\n".join(_markdown(header, rows))


def format_failures(failures: list[dict], limit: int = FAILED_SAMPLE, more: bool = False) -> str:
    """Markdown list of the images that failed (one line per dataset and image, with the reason).

    Args:
        failures: rows with ``dataset``, ``image_id``, ``status`` (optional) and ``error``
            (``Accumulator.failures``).
        limit: lines at most.
        more: the list is a sample: more images failed than it holds (``Accumulator.more_failures``).
    """
    failed = {(r["dataset"], r["image_id"]): r["error"] for r in failures if r.get("status", "failed") != "ok"}
    if not failed:
        return ""
    more = more or len(failed) > limit
    lines = [f"\n## Failed images ({f'more than {limit}' if more else len(failed)})\n"]
    lines += [f"- {d} / {i}: {e}" for (d, i), e in list(failed.items())[:limit]]
    if more:
        lines.append(f"- ... and more (every failed row, with its reason, is in {PER_IMAGE_FILE})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- examples figure
def _thumb_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, THUMB / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def example_payload(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, refined: np.ndarray | None,
                    gt: np.ndarray | None, gt_boxes: np.ndarray | None, pred_box: np.ndarray | None) -> bytes:
    """Thumbnails of one image's prediction for the examples figure, pickled.

    Args:
        image: ``(H, W, 3)`` uint8. heat: ``(H, W)`` z2 / y2 map. mask: ``(H, W)`` bool.
        refined: ``(H, W)`` bilateral soft output or ``None``. gt: ``(H, W)`` bool or ``None``.
        gt_boxes: ``(K, 4)`` pixel boxes (discovery) or ``None``. pred_box: ``(4,)`` or ``None``.

    Returns:
        Bytes of a dict of arrays at most ``THUMB`` px on the long side (boxes rescaled).
    """
    from PIL import Image

    h, w = image.shape[:2]
    th, tw = _thumb_size(h, w)

    def resize(a: np.ndarray | None, mode: int) -> np.ndarray | None:
        if a is None:
            return None
        pil = Image.fromarray(np.asarray(a, np.float32))  # mode F
        return np.asarray(pil.resize((tw, th), mode), np.float32)  # (th, tw)

    scale = np.array([tw / w, th / h, tw / w, th / h])
    payload = {
        "image": np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR)),  # (th, tw, 3)
        "heat": resize(heat, Image.BILINEAR), "mask": resize(mask, Image.NEAREST),
        "refined": resize(refined, Image.BILINEAR), "gt": resize(gt, Image.NEAREST),
        "gt_boxes": None if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 4) * scale,
        "pred_box": None if pred_box is None else np.asarray(pred_box, np.float64) * scale,
    }
    return pickle.dumps(payload)


def _boxes(ax, boxes: np.ndarray, colour: str) -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))


def examples_png(items: list[tuple[str, str, bytes]], title: str = "") -> bytes:
    """Grid figure: one row per image; image | per method: z2 map, mask, refined | ground truth.

    Args:
        items: ``(image_id, method, example_payload bytes)``.
        title: figure title.

    Returns:
        PNG bytes (matplotlib Agg, no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    payloads = {(i, m): pickle.loads(p) for i, m, p in items}
    image_ids = sorted({i for i, _ in payloads})
    methods = list(dict.fromkeys(m for _, m in sorted(payloads, key=lambda k: k[1])))
    refined = {m for (_, m), p in payloads.items() if p["refined"] is not None}
    columns = ["image"] + [c for m in methods for c in (f"{m} z2", f"{m} mask")
                           + ((f"{m} refined",) if m in refined else ())] + ["ground truth"]
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * len(image_ids) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(image_ids), len(columns), squeeze=False)
    for r, image_id in enumerate(image_ids):
        first = next(p for (i, _), p in payloads.items() if i == image_id)
        panels: list[tuple[np.ndarray | None, str, dict]] = [(first["image"], "", {})]  # (array, kind, style)
        for m in methods:
            p = payloads.get((image_id, m))
            get = (lambda k: None) if p is None else p.get  # noqa: E731
            panels += [(get("heat"), "", {"cmap": "jet"}), (get("mask"), "", {"cmap": "gray", "vmin": 0, "vmax": 1})]
            if m in refined:
                panels.append((get("refined"), "", {"cmap": "gray", "vmin": 0, "vmax": 1}))
        panels.append((first["gt"] if first["gt"] is not None else first["image"], "gt",
                       {"cmap": "gray", "vmin": 0, "vmax": 1} if first["gt"] is not None else {}))
        for c, (array, kind, style) in enumerate(panels):
            ax = axes[r, c]
            ax.set_axis_off()
            if r == 0:
                ax.set_title(columns[c], fontsize=7)
            if array is None:
                continue
            ax.imshow(array, **style)
            if kind == "gt" and first["gt_boxes"] is not None:
                _boxes(ax, first["gt_boxes"], "lime")
        for m_index, m in enumerate(methods):  # predicted boxes on the mask panels (discovery)
            p = payloads.get((image_id, m))
            if p is not None and p["pred_box"] is not None:
                col = 1 + sum(2 + (mm in refined) for mm in methods[:m_index]) + 1
                _boxes(axes[r, col], p["pred_box"], "red")
        axes[r, 0].text(-0.05, 0.5, image_id, transform=axes[r, 0].transAxes, rotation=90, fontsize=6,
                        ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --------------------------------------------------------------------------- files
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_report(out_dir: str, summary: dict, acc: Accumulator, *, config_yaml: str | None = None,
                 store: storage.Storage | None = None) -> list[str]:
    """Write every evaluation output under ``out_dir`` (local folder or ``s3://`` prefix).

    Args:
        out_dir: destination folder / prefix.
        summary: from ``acc.summary()``.
        acc: the accumulator (failures, examples); the per-image rows are the parts the workers
            wrote (``write_per_image``), merged here into ``per_image.parquet``.
        config_yaml: the resolved config text (``config.yaml``), if any.
        store: the storage handle (``None``: the environment's defaults).

    Returns:
        The URIs written.
    """
    store = store or storage.Storage()
    written: list[str] = []

    def put(name: str, data: bytes) -> None:
        uri = store.join(out_dir, name)
        store.write_bytes(uri, data)
        written.append(uri)

    merge_parts(out_dir, PER_IMAGE_FILE, store, per_image_schema(), unique=PER_IMAGE_KEY)
    written.append(store.join(out_dir, PER_IMAGE_FILE))
    put("summary.json", json.dumps(summary, indent=2).encode())
    md = (f"# Evaluation results\n\n{format_table(summary)}\n\n## All runs (fractions)\n\n"
          f"{format_details(summary)}\n{format_failures(acc.failures, more=acc.more_failures)}")
    put("summary.md", md.encode())
    for n, (group, items) in enumerate(acc.examples.items()):
        dataset, backbone, checkpoint = group
        weights = weights_label(checkpoint, run_pretrained(summary, backbone, checkpoint))
        png = examples_png(items, title=f"{dataset} · {backbone} · {weights}")
        if n == 0:
            put("examples.png", png)
        if len(acc.examples) > 1:
            put(f"examples/{_slug(dataset)}__{_slug(backbone)}__{_slug(str(checkpoint or 'pretrained'))}.png", png)
    if config_yaml is not None:
        put("config.yaml", config_yaml.encode())
    return written
