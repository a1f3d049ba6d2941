"""Results of a sweep: one row per Tune trial, Markdown / CSV tables and the alpha plot.

    Tune Result + the trial's run folder (``metrics.jsonl``, checkpoints, export) -> trial_row ->
      {trial_id, backbone, alpha, lr, status, final_step, total_steps, tune_step, final_metric,
       final_val_iou, final_val_max_fbeta, val_step, best_val_iou, best_val_max_fbeta, best_step,
       collapsed, checkpoint, export, run_dir, reason}
    rows -> format_trials (Markdown) / trials_csv (CSV) / plot_iou_vs_alpha (PNG bytes)

Rule: a row states what the trial's Ray Train run did, read from the run's own records
(``metrics.jsonl``, written by rank 0 before each report); Tune's results are only the fallback
for a run with no history. Tune sees a report later than the run makes it (a report waits in the
worker's and the trial's one-slot queues), so a run ASHA stops after step k may have reached
step k + 1 or k + 2 before its trial's actors were ended: ``final_step`` and the final values are
that later step's, ``tune_step`` is the step ASHA decided on.

Columns (``COLUMNS``):
    final_step / total_steps   last step the run recorded / the run's length
    tune_step                  last step Tune received (ASHA's decision is on it)
    final_metric               ``tune.metric`` at ``final_step`` (what the sweep ranks by)
    final_val_iou, final_val_max_fbeta, val_step
                               the last validation of the run, measured on the weights of step
                               ``val_step`` (0 = the starting weights, validated before training)
    best_val_iou, best_val_max_fbeta, best_step
                               best over the validations of trained weights (``val_step`` >= 1;
                               step 0 is left out: it says nothing about the trial's alpha or lr);
                               ``best_step`` is the step whose weights gave the best ``tune.metric``
    checkpoint                 the run's newest intact checkpoint (what a resume starts from)

Statuses: TERMINATED (the run reached ``total_steps`` and exported its backbone, even when ASHA's
stop came after that), EARLY_STOPPED (ASHA stopped it before; its last checkpoint is listed),
INTERRUPTED (the sweep stopped before the trial ended; rerun to resume), ERROR (exception or
non-finite losses; the reason is the innermost error line).
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Mapping, Sequence

from dncut import storage

COLUMNS: tuple[str, ...] = (
    "trial_id", "backbone", "alpha", "lr", "status", "final_step", "total_steps", "tune_step", "final_metric",
    "final_val_iou", "final_val_max_fbeta", "val_step", "best_val_iou", "best_val_max_fbeta", "best_step",
    "collapsed", "checkpoint", "export", "run_dir", "reason",
)

PLOT_COLUMN = "final_val_iou"
"""The quantity ``val_iou_vs_alpha.png`` plots (its y label says so): each trial's last validation IoU."""
PLOT_YLABEL = "final validation IoU (last validation of each run)"


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


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value) -> int | None:
    out = _float(value)
    return None if out is None else int(out)


def _tune_records(df) -> list[dict[str, Any]]:
    """Tune's progress rows of a trial as a list of dicts (``[]`` without any)."""
    if df is None or df.empty:
        return []
    return [{k: v for k, v in rec.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
            for rec in df.to_dict("records")]


def _last(records: Sequence[Mapping[str, Any]], key: str):
    """The last value of ``key`` in ``records`` (``None`` if no record has it)."""
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _validated_at(record: Mapping[str, Any], metric: str) -> int | None:
    """The step whose weights ``record[metric]`` measures: ``val_step`` for ``val_*`` metrics."""
    return _int(record.get("val_step" if metric.startswith("val_") and "val_step" in record else "step"))


def _best(records: Sequence[Mapping[str, Any]], metric: str, mode: str) -> tuple[float | None, int | None]:
    """``(best value, step of the weights that gave it)`` of ``metric`` over trained weights (step >= 1)."""
    scored = [(_float(r.get(metric)), _validated_at(r, metric)) for r in records]
    scored = [(v, at) for v, at in scored if v is not None and at is not None and at >= 1]
    if not scored:
        return None, None
    if mode == "max":
        return max(scored, key=lambda va: (va[0], -va[1]))  # ties: the earliest step
    return min(scored, key=lambda va: (va[0], va[1]))


def _newest_checkpoint(run: str, store: storage.Storage) -> str | None:
    from dncut.train.checkpoints import resume_point

    try:
        ref = resume_point(run, store)
    except Exception:  # noqa: BLE001 - an unlistable run folder: the row falls back to Tune's path
        return None
    return ref.uri if ref is not None else None


def trial_row(result, *, runs_dir: str, metric: str, mode: str, tune_status: str | None = None,
              store: storage.Storage | None = None) -> dict[str, Any]:
    """One table row (see ``COLUMNS`` and the module docstring) from a Tune ``Result`` and the
    trial's run folder: steps, metrics, collapse flag and checkpoint come from the run's own
    ``metrics.jsonl`` and checkpoints (Tune's progress rows only when the run has no history:
    the reason then says so), ``tune_step`` from Tune.

    ``tune_status`` is Tune's own trial status: anything but TERMINATED / ERROR (the sweep was
    interrupted, e.g. Ctrl-C) makes the row INTERRUPTED."""
    from dncut.tracking import read_history
    from dncut.train.checkpoints import EXPORT_FILE

    store = store or storage.Storage()
    params = dict(result.config or {})
    trial_id = str((result.metrics or {}).get("trial_id") or _basename(result.path).removeprefix("trial_"))
    run = storage.join(runs_dir, trial_run_name(trial_id, params)) if params else ""
    tune_records = _tune_records(result.metrics_dataframe)
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(trial_id=trial_id, backbone=params.get("backbone"), alpha=params.get("alpha"), lr=params.get("lr"),
               run_dir=run, reason="")
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    if run:
        try:
            records = read_history(run, store)
        except Exception as exc:  # noqa: BLE001 - the row says where its numbers came from instead
            notes.append(f"its run's history is unreadable ({failure_reason(exc, 120)}): values are Tune's")
    if not records and tune_records:
        records = tune_records
        if not notes:
            notes.append("its run recorded no history: values are Tune's last result")
    row["tune_step"] = _int(_last(tune_records, "step"))
    row["final_step"] = _int(_last(records, "step"))
    row["total_steps"] = _int(_last(records, "total_steps"))
    last = records[-1] if records else {}
    row["final_metric"] = _float(last.get(metric))
    row["final_val_iou"], row["final_val_max_fbeta"] = _float(last.get("val_iou")), _float(last.get("val_max_fbeta"))
    row["val_step"] = _int(last.get("val_step")) if row["final_val_iou"] is not None else None
    for key in ("val_iou", "val_max_fbeta"):
        row[f"best_{key}"] = _best(records, key, "max")[0]
    row["best_step"] = _best(records, metric, mode)[1]
    collapsed = last.get("collapsed")
    row["collapsed"] = None if collapsed is None else bool(collapsed)
    export = storage.join(run, EXPORT_FILE) if run else ""
    has_export = bool(run) and store.exists(export)
    row["export"] = export if has_export else None
    row["checkpoint"] = (_newest_checkpoint(run, store) if run else None) or _last(tune_records, "checkpoint_path")
    ran_on = (row["final_step"] or 0) > (row["tune_step"] if row["tune_step"] is not None else math.inf)
    if result.error is not None:
        row["status"], row["reason"] = "ERROR", failure_reason(result.error)
    elif tune_status not in (None, "TERMINATED", "ERROR"):
        row["status"], row["reason"] = "INTERRUPTED", f"{tune_status} when the sweep stopped: rerun it to resume"
    elif has_export and row["final_step"] is not None and row["final_step"] >= (row["total_steps"] or math.inf):
        row["status"] = "TERMINATED"
        if ran_on:  # ASHA stopped the trial on a report the run had long passed
            row["reason"] = f"ASHA stopped it after step {row['tune_step']}, after its run had finished"
    else:
        row["status"] = "EARLY_STOPPED"
        row["reason"] = f"stopped by ASHA after step {row['tune_step']}/{row['total_steps']}"
        if ran_on:
            row["reason"] += f"; its run had reached step {row['final_step']} when it was stopped"
        if row["final_step"] is not None and row["final_step"] >= (row["total_steps"] or math.inf):
            row["reason"] += " (the last step, but before its export: not a finished trial)"
    row["reason"] = "; ".join([row["reason"], *notes]) if row["reason"] else "; ".join(notes)
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
    """Markdown table of every trial (paths relative to ``root``), best first; the columns are
    ``COLUMNS`` (module docstring): "steps" is the run's last recorded step / its length, "final
    val IoU (step)" the last validation and the step of the weights it measured."""
    header = ["trial", "backbone", "α", "lr", "status", "steps", f"final {metric}", "final val IoU (step)",
              "best val IoU", "best val maxFβ", "best step", "collapsed", "export / last checkpoint", "reason"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    for r in rows:
        steps = f"{_fmt(r['final_step'], 'd')}/{_fmt(r['total_steps'], 'd')}" if r["final_step"] is not None else "-"
        final_val = (f"{_fmt(r['final_val_iou'])} ({_fmt(r['val_step'], 'd')})"
                     if r.get("final_val_iou") is not None else "-")
        collapsed = "-" if r["collapsed"] is None else ("**yes**" if r["collapsed"] else "no")
        cells = [r["trial_id"], _fmt(r["backbone"]), _fmt(r["alpha"], ".3g"), _fmt(r["lr"], ".3g"), r["status"],
                 steps, _fmt(r["final_metric"], ".4g"), final_val, _fmt(r["best_val_iou"]),
                 _fmt(r["best_val_max_fbeta"]), _fmt(r["best_step"], "d"), collapsed,
                 _rel(r["export"] or r["checkpoint"], root), (r["reason"] or "").replace("|", "\\|")]
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


def alpha_points(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[float, float]]:
    """What ``val_iou_vs_alpha.png`` plots: ``{backbone: {alpha: value}}``, the value the best
    ``PLOT_COLUMN`` (each trial's last validation IoU) over the trials of that backbone and alpha
    (the lr axis). Left out: errors, and trials whose last validation is of the starting weights
    (``val_step`` 0: nothing trained yet)."""
    out: dict[str, dict[float, float]] = {}
    for r in _plotted(rows):
        best = out.setdefault(r["backbone"], {})
        best[r["alpha"]] = max(best.get(r["alpha"], -math.inf), r[PLOT_COLUMN])
    return out


def _plotted(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["status"] != "ERROR" and r.get(PLOT_COLUMN) is not None
            and r["alpha"] is not None and (r.get("val_step") or 0) >= 1]


def iou_vs_alpha_figure(rows: Sequence[Mapping[str, Any]]):
    """The matplotlib ``Figure`` of ``plot_iou_vs_alpha``: one line per backbone through
    ``alpha_points`` (y label ``PLOT_YLABEL``); collapsed trials circled in red, trials ASHA
    stopped marked x at their own final value.

    The x axis is logarithmic (symmetric-log with a linear part near 0 when alpha = 0 was swept).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = _plotted(rows)
    collapse_label = "collapsed"
    for backbone, best in sorted(alpha_points(rows).items()):
        mine = [r for r in points if r["backbone"] == backbone]
        xs = sorted(best)
        line, = ax.plot(xs, [best[x] for x in xs], marker="o", label=backbone)
        bad = [r for r in mine if r["collapsed"]]
        if bad:
            ax.scatter([r["alpha"] for r in bad], [r[PLOT_COLUMN] for r in bad], s=120, facecolors="none",
                       edgecolors="red", linewidths=1.5, label=collapse_label, zorder=3)
            collapse_label = "_nolegend_"
        stopped = [r for r in mine if r["status"] == "EARLY_STOPPED"]
        if stopped:
            ax.scatter([r["alpha"] for r in stopped], [r[PLOT_COLUMN] for r in stopped], marker="x",
                       color=line.get_color(), zorder=3)
    alphas = [r["alpha"] for r in points]
    positive = [a for a in alphas if a > 0]
    if positive and min(alphas) == 0:
        ax.set_xscale("symlog", linthresh=min(positive))
    elif positive:
        ax.set_xscale("log")
    if alphas:  # ticks at the swept alphas only (a log axis over < 2 decades labels its minor ticks too)
        from matplotlib.ticker import NullFormatter

        ticks = sorted(set(alphas))
        ax.set_xticks(ticks, [f"{a:g}" for a in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("loss.alpha (regularization weight)")
    ax.set_ylabel(PLOT_YLABEL)
    ax.set_title("Sweep: final validation IoU vs alpha, best over lr (x = stopped early)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial validated trained weights", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_iou_vs_alpha(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG bytes of ``iou_vs_alpha_figure(rows)``."""
    buf = io.BytesIO()
    iou_vs_alpha_figure(rows).savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
