"""Results of a sweep: one row per Tune trial, Markdown / CSV tables and the alpha plot.

    Tune Result (progress rows of one trial) -> trial_row -> {trial_id, backbone, alpha, lr,
      status, best_val_iou, best_val_max_fbeta, best_step, final_metric, final_step,
      total_steps, collapsed, checkpoint, export, run_dir, reason}
    rows -> format_trials (Markdown) / trials_csv (CSV) / plot_iou_vs_alpha (PNG bytes)

Statuses: TERMINATED (ran to the end, backbone exported), EARLY_STOPPED (ASHA stopped it; its
last checkpoint is listed), INTERRUPTED (the sweep stopped before the trial ended; rerun to
resume), ERROR (exception or non-finite losses; the reason is the innermost error line).
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Mapping, Sequence

from dncut import storage

COLUMNS: tuple[str, ...] = (
    "trial_id", "backbone", "alpha", "lr", "status", "best_val_iou", "best_val_max_fbeta", "best_step",
    "final_metric", "final_step", "total_steps", "collapsed", "checkpoint", "export", "run_dir", "reason",
)


def trial_run_name(trial_id: str, params: Mapping[str, Any]) -> str:
    """Run folder name of a trial: stable across restores, readable, ``[A-Za-z0-9._-]`` only.

    Example: ``("ab12c_00001", {"alpha": 0.05, "lr": 5e-4, "backbone": "vit_tiny_test"})
    -> "ab12c_00001-vit_tiny_test-a0.05-lr0.0005"``.
    """
    name = f"{trial_id}-{params['backbone']}-a{params['alpha']:.3g}-lr{params['lr']:.3g}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


_WRAPPERS = ("TrainingFailedError", "RayTaskError", "TuneError", "WorkerGroupError", "RayActorError",
             "ControllerError")
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt))(?:\([^)]*\))?:\s*(.+?)\s*$")


def failure_reason(error: BaseException | str | None, limit: int = 240) -> str:
    """The innermost ``SomeError: message`` line of a (wrapped, remote) error, shortened.

    Example: a Ray Train failure whose worker raised ``RuntimeError: 1 non-finite losses ...``
    gives ``"RuntimeError: 1 non-finite losses ..."``.
    """
    if error is None:
        return ""
    lines = [m for m in map(_ERROR_LINE.match, str(error).splitlines()) if m]
    inner = [m for m in lines if m.group(1).rsplit(".", 1)[-1] not in _WRAPPERS] or lines
    if not inner:
        text = str(error).strip().splitlines()
        reason = text[-1] if text else type(error).__name__
    else:
        reason = f"{inner[-1].group(1).rsplit('.', 1)[-1]}: {inner[-1].group(2)}"
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _last(df, column: str):
    if df is None or column not in df.columns:
        return None
    values = df[column].dropna()
    return None if values.empty else values.iloc[-1]


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def trial_row(result, *, runs_dir: str, metric: str, mode: str, tune_status: str | None = None,
              store: storage.Storage | None = None) -> dict[str, Any]:
    """One table row from a Tune ``Result`` (see ``COLUMNS``); ``best_step`` is the step whose
    weights gave the best ``metric`` (for ``val_*`` metrics the reported ``val_step``: a report
    carries the last validation, measured at that step).

    ``tune_status`` is Tune's own trial status: anything but TERMINATED / ERROR (the sweep was
    interrupted, e.g. Ctrl-C) makes the row INTERRUPTED."""
    from dncut.train.checkpoints import EXPORT_FILE

    params = dict(result.config or {})
    trial_id = str((result.metrics or {}).get("trial_id") or _basename(result.path).removeprefix("trial_"))
    run = storage.join(runs_dir, trial_run_name(trial_id, params)) if params else ""
    df = result.metrics_dataframe
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(trial_id=trial_id, backbone=params.get("backbone"), alpha=params.get("alpha"), lr=params.get("lr"),
               run_dir=run, reason="")
    if df is not None and not df.empty and metric in df.columns:
        values = df[metric].astype(float)
        if values.notna().any():
            best_idx = values.idxmax() if mode == "max" else values.idxmin()
            at = "val_step" if metric.startswith("val_") and "val_step" in df.columns else "step"
            if at in df.columns:
                row["best_step"] = int(df.loc[best_idx, at])
        for key in ("val_iou", "val_max_fbeta"):
            if key in df.columns and df[key].notna().any():
                row[f"best_{key}"] = float(df[key].max())
        row["final_metric"] = _float(_last(df, metric))
    for key, column in (("final_step", "step"), ("total_steps", "total_steps")):
        value = _last(df, column)
        row[key] = None if value is None else int(value)
    collapsed = _last(df, "collapsed")
    row["collapsed"] = None if collapsed is None else bool(collapsed)
    row["checkpoint"] = _last(df, "checkpoint_path")
    export = storage.join(run, EXPORT_FILE) if run else ""
    has_export = bool(run) and (store or storage.Storage()).exists(export)
    row["export"] = export if has_export else None
    if result.error is not None:
        row["status"], row["reason"] = "ERROR", failure_reason(result.error)
    elif tune_status not in (None, "TERMINATED", "ERROR"):
        row["status"], row["reason"] = "INTERRUPTED", f"{tune_status} when the sweep stopped: rerun it to resume"
    elif has_export and row["final_step"] is not None and row["final_step"] >= (row["total_steps"] or math.inf):
        row["status"] = "TERMINATED"
    else:
        row["status"] = "EARLY_STOPPED"
        row["reason"] = f"stopped by ASHA at step {row['final_step']}/{row['total_steps']}"
    return row


def _basename(path: str | None) -> str:
    return (path or "").rstrip("/").rsplit("/", 1)[-1]


def best_trial(rows: Sequence[Mapping[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial (with an export) with the best final metric; ``None`` if there is none."""
    done = [r for r in rows if r["status"] == "TERMINATED" and r["export"] and r["final_metric"] is not None]
    if not done:
        return None
    pick = max if mode == "max" else min
    return dict(pick(done, key=lambda r: r["final_metric"]))


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _rel(uri: str | None, root: str) -> str:
    if not uri:
        return "-"
    return uri[len(root):].lstrip("/") if uri.startswith(root) else uri


def format_trials(rows: Sequence[Mapping[str, Any]], *, metric: str, root: str = "") -> str:
    """Markdown table of every trial (paths relative to ``root``), best first."""
    header = ["trial", "backbone", "α", "lr", "status", "best val IoU", "best val maxFβ", "best step",
              f"final {metric}", "steps", "collapsed", "export / last checkpoint", "reason"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for r in rows:
        steps = f"{_fmt(r['final_step'], 'd')}/{_fmt(r['total_steps'], 'd')}" if r["final_step"] is not None else "-"
        collapsed = "-" if r["collapsed"] is None else ("**yes**" if r["collapsed"] else "no")
        cells = [r["trial_id"], _fmt(r["backbone"]), _fmt(r["alpha"], ".3g"), _fmt(r["lr"], ".3g"), r["status"],
                 _fmt(r["best_val_iou"]), _fmt(r["best_val_max_fbeta"]), _fmt(r["best_step"], "d"),
                 _fmt(r["final_metric"], ".4g"), steps, collapsed, _rel(r["export"] or r["checkpoint"], root),
                 (r["reason"] or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def trials_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of every trial, columns ``COLUMNS``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    return buf.getvalue()


def sort_rows(rows: Sequence[Mapping[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Finished first, then early-stopped, interrupted, errors; within each by final metric (best
    first, missing last)."""
    rank = {"TERMINATED": 0, "EARLY_STOPPED": 1, "INTERRUPTED": 2, "ERROR": 3}
    sign = -1.0 if mode == "max" else 1.0

    def key(r):
        value = r["final_metric"]
        return rank.get(r["status"], 4), value is None, 0.0 if value is None else sign * value, str(r["trial_id"])

    return [dict(r) for r in sorted(rows, key=key)]


def plot_iou_vs_alpha(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG: best validation IoU against alpha, one line per backbone (best over lr at each alpha).

    The x axis is logarithmic (symmetric-log with a linear part near 0 when alpha = 0 was
    swept); collapsed trials are circled in red, errors are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = [r for r in rows if r["best_val_iou"] is not None and r["alpha"] is not None]
    collapse_label = "collapsed"
    for backbone in sorted({r["backbone"] for r in points}):
        mine = [r for r in points if r["backbone"] == backbone]
        best: dict[float, float] = {}
        for r in mine:
            best[r["alpha"]] = max(best.get(r["alpha"], -math.inf), r["best_val_iou"])
        xs = sorted(best)
        line, = ax.plot(xs, [best[x] for x in xs], marker="o", label=backbone)
        bad = [r for r in mine if r["collapsed"]]
        if bad:
            ax.scatter([r["alpha"] for r in bad], [r["best_val_iou"] for r in bad], s=120, facecolors="none",
                       edgecolors="red", linewidths=1.5, label=collapse_label, zorder=3)
            collapse_label = "_nolegend_"
        stopped = [r for r in mine if r["status"] == "EARLY_STOPPED"]
        if stopped:
            ax.scatter([r["alpha"] for r in stopped], [r["best_val_iou"] for r in stopped], marker="x",
                       color=line.get_color(), zorder=3)
    alphas = [r["alpha"] for r in points]
    positive = [a for a in alphas if a > 0]
    if positive and min(alphas) == 0:
        ax.set_xscale("symlog", linthresh=min(positive))
    elif positive:
        ax.set_xscale("log")
    ax.set_xlabel("loss.alpha (regularization weight)")
    ax.set_ylabel("best validation IoU")
    ax.set_title("Sweep: validation IoU vs alpha (x = stopped early)")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial reported val_iou", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
