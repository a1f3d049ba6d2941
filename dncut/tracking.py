"""Experiment tracking of a training run, written by rank 0 (``dncut.train.chief.Chief``).

    Tracker(cfg, run, resume_step)
      .log(metrics, step)   one report: a line of ``metrics.jsonl`` (always; local or s3://),
                            TensorBoard scalars, MLflow metrics, W&B log (as ``cfg.tracking`` says)
      .close()              flush; MLflow / W&B runs end; ``curves.png`` (``plot_curves``)
    read_history(run)       the lines of ``metrics.jsonl``: one dict per report
    plot_curves(history)    losses, pass fraction, template similarities, validation IoU vs step
    ProgressBar(run, total) the driver's console: one tqdm bar (step, rate, ETA, key metrics) fed
                            by polling ``metrics.jsonl`` while ``TorchTrainer.fit`` blocks

MLflow and W&B are used through their own clients from the training function, as Ray Train's
experiment-tracking guide shows (``mlflow.start_run`` / ``wandb.init`` on rank 0 only); both are
optional imports (``pip install mlflow-skinny`` / ``wandb``) and fail at start with a clear
message when enabled but missing. Secrets (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``) come
from the environment, never from the config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import threading
from typing import Any

from dncut import storage
from dncut.config import Config

log = logging.getLogger("dncut.tracking")

HISTORY_FILE = "metrics.jsonl"  # one JSON line per report, under output_dir/run_name
CURVES_FILE = "curves.png"
RUN_IDS_FILE = "tracking_runs.json"  # {"mlflow": run id, "wandb": run id}: a resumed run continues them
TENSORBOARD_DIR = "tensorboard"
CURVE_PANELS = (  # (title, metric keys) of plot_curves
    ("losses", ("loss", "l_consistency", "l_reg")),
    ("pass fraction (views kept by the IoU filter)", ("pass_fraction",)),
    ("template similarity (collapse above 0.9)", ("sim_horizontal", "sim_vertical", "sim_uniform")),
    ("validation (Simple NCut on data.val)", ("val_iou", "val_max_fbeta")),
)


def read_history(run: str, store: storage.Storage | None = None) -> list[dict[str, Any]]:
    """The metric history of a run folder ``run`` (local or s3://): one dict per report
    (``step``, ``loss``, ``val_iou``, ..., ``val_step`` = the step the ``val_*`` values were
    measured at); ``[]`` when there is none yet. Unparseable lines (a crash mid-write) are skipped
    with a warning."""
    store = store or storage.Storage()
    uri = storage.join(run, HISTORY_FILE)
    if not store.exists(uri):
        return []
    out = []
    for line in store.read_bytes(uri).decode().splitlines():
        try:
            if line.strip():
                out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line %r", uri, line[:80])
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics (bools as 0/1); strings and NaN are left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Tracker:
    """Rank 0's metric sinks for one run.

    Args:
        cfg: the run config (``tracking`` section, ``output_dir``, ``run_name``).
        run: the run folder (``Config.run_dir``), local or s3://.
        resume_step: a resumed run keeps the history up to this step and appends after it.

    Raises:
        RuntimeError: MLflow or W&B is enabled but its client is not installed.
    """

    def __init__(self, cfg: Config, run: str, resume_step: int = 0, store: storage.Storage | None = None) -> None:
        self.cfg, self.run, self.store = cfg, run, store or storage.Storage()
        self.history = [m for m in read_history(run, self.store) if m.get("step", 0) <= resume_step]
        t = cfg.tracking
        self._tb_local = None if not t.tensorboard else (
            tempfile.mkdtemp(prefix="dncut-tb-") if storage.is_s3(run) else storage.join(run, TENSORBOARD_DIR))
        self._tb = _tensorboard(self._tb_local) if self._tb_local else None
        self._mlflow = _start_mlflow(cfg, self._run_id("mlflow")) if t.mlflow else None
        if self._mlflow is not None:
            self._save_run_id("mlflow", self._mlflow.active_run().info.run_id)
        self._wandb = _start_wandb(cfg, self._run_id("wandb")) if t.wandb else None
        if self._wandb is not None:
            self._save_run_id("wandb", self._wandb.id)

    def _run_id(self, sink: str) -> str | None:
        """The MLflow / W&B run id of an earlier launch of this run folder (a resume continues it)."""
        uri = storage.join(self.run, RUN_IDS_FILE)
        if not self.store.exists(uri):
            return None
        return json.loads(self.store.read_bytes(uri)).get(sink)

    def _save_run_id(self, sink: str, run_id: str) -> None:
        uri = storage.join(self.run, RUN_IDS_FILE)
        ids = json.loads(self.store.read_bytes(uri)) if self.store.exists(uri) else {}
        self.store.write_bytes(uri, json.dumps({**ids, sink: run_id}).encode())

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One report: appended to ``metrics.jsonl`` (rewritten whole: S3 has no append) and sent to
        every enabled sink."""
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))})
        text = "".join(json.dumps(m) + "\n" for m in self.history)
        self.store.write_bytes(storage.join(self.run, HISTORY_FILE), text.encode())
        scalars = _scalars(metrics)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{'val' if k.startswith('val_') else 'train'}/{k}", v, step)
            self._tb.flush()
            self._upload_tensorboard()
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and end every sink, then write ``curves.png`` beside ``metrics.jsonl``."""
        if self._tb is not None:
            self._tb.close()
            self._upload_tensorboard()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()
        if self.history:
            self.store.write_bytes(storage.join(self.run, CURVES_FILE), plot_curves(self.history))

    def _upload_tensorboard(self) -> None:
        """For an s3:// run the event files are written locally and copied up at each report."""
        if not storage.is_s3(self.run) or self._tb_local is None:
            return
        for name in os.listdir(self._tb_local):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                self.store.write_bytes(storage.join(self.run, TENSORBOARD_DIR, name), f.read())


def _tensorboard(folder: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=folder)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _start_mlflow(cfg: Config, run_id: str | None = None):
    """``mlflow.start_run`` named after the run, with the whole config as params; ``run_id``: the
    earlier launch's run, continued."""
    try:
        import mlflow
    except ImportError as exc:
        raise RuntimeError("tracking.mlflow is true but mlflow is not installed: pip install mlflow-skinny") from exc
    t = cfg.tracking
    if t.mlflow_tracking_uri:
        mlflow.set_tracking_uri(t.mlflow_tracking_uri)
    mlflow.set_experiment(t.mlflow_experiment)
    if run_id is not None:
        mlflow.start_run(run_id=run_id)
        return mlflow  # params were logged by the first launch (MLflow refuses to change them)
    mlflow.start_run(run_name=cfg.run_name)
    params = {k: str(v)[:500] for k, v in _flat(cfg.model_dump(mode="json")).items()}  # MLflow caps value length
    mlflow.log_params(params)
    return mlflow


def _start_wandb(cfg: Config, run_id: str | None = None):
    """``wandb.init`` named after the run, with the whole config; ``run_id``: the earlier launch's
    run, resumed."""
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError("tracking.wandb is true but wandb is not installed: pip install wandb") from exc
    t = cfg.tracking
    run = wandb.init(project=t.wandb_project, name=cfg.run_name, mode=t.wandb_mode,
                     config=cfg.model_dump(mode="json"), id=run_id, resume="allow" if run_id else None)
    return run


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """PNG bytes: one panel per ``CURVE_PANELS`` entry, each metric against its step (``val_*``
    against ``val_step``, once per validation)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.4))
    for ax, (title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o" if key.startswith("val_") else None, ms=3, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric; validation values once per ``val_step``."""
    points: dict[float, float] = {}
    for m in history:
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            points[m.get("val_step", m["step"]) if key.startswith("val_") else m["step"]] = float(v)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


BAR_KEYS = (("loss", "loss"), ("pass_fraction", "pass"), ("val_iou", "val_iou"), ("skipped_files", "skipped"))
"""(metric, label) shown after the bar."""


class ProgressBar:
    """A tqdm bar on the driver for a run of ``total`` steps, fed by polling the run's
    ``metrics.jsonl`` every ``interval`` seconds (the workers' own output stays in the log files).

    Use as a context manager around ``trainer.fit()``; ``disable=True`` (``--quiet``) draws nothing.
    """

    def __init__(self, run: str, total: int, *, start: int = 0, store: storage.Storage | None = None,
                 disable: bool = False, interval: float = 2.0, desc: str = "train", file: Any = None) -> None:
        from tqdm import tqdm

        self.run, self.store, self.interval = run, store or storage.Storage(), interval
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=disable, file=file or sys.stderr,
                        dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="dncut-progress")

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Move the bar to the newest reported step and show its metrics (a read error is skipped:
        the next poll tries again)."""
        try:
            history = read_history(self.run, self.store)
        except OSError:
            return
        if not history or history[-1].get("step", 0) <= self.bar.n:
            return
        last = history[-1]
        self.bar.update(int(last["step"]) - self.bar.n)
        shown = {label: last[k] for k, label in BAR_KEYS if isinstance(last.get(k), (int, float))}
        self.bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=True)
