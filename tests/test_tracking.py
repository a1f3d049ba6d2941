"""Experiment tracking (dncut.tracking): what a run writes is read back by independent readers —
a hand-written TFRecord parser for the TensorBoard event files, MLflow's own client, PIL for the
curves figure — and the driver's progress bar follows the history file."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dncut.config import load_config
from dncut.tracking import CURVES_FILE, HISTORY_FILE, ProgressBar, Tracker, plot_curves, read_history

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", "run_name=run", *overrides])


def _reports(n: int, val_every: int = 2) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        m = {"step": step, "total_steps": n, "loss": 1.0 / step, "l_consistency": 0.5, "l_reg": -2.0 + step / 10,
             "pass_fraction": 0.5, "sim_horizontal": 0.3, "sim_vertical": 0.2, "sim_uniform": 0.4,
             "collapsed": False, "val_iou": 0.1 + 0.01 * (step // val_every), "val_step": step // val_every * val_every,
             "note": "text is kept in metrics.jsonl only"}
        out.append(m)
    return out


def _tfrecord_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under ``folder``: TFRecord framing (u64 length, u32 crc,
    payload, u32 crc) parsed by hand, each payload an ``Event`` proto (tensorboardX's schema)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_history_and_tensorboard_hold_every_report(tmp_path):
    cfg = _cfg(tmp_path)
    run = str(tmp_path / "run")
    tracker = Tracker(cfg, run)
    reports = _reports(4)
    for m in reports:
        tracker.log(m, m["step"])
    tracker.close()

    assert read_history(run) == reports
    scalars = _tfrecord_scalars(Path(run) / "tensorboard")
    assert scalars["train/loss"] == [(m["step"], pytest.approx(m["loss"])) for m in reports]
    assert [s for s, _ in scalars["val/val_iou"]] == [1, 2, 3, 4]
    assert "train/note" not in scalars and "train/collapsed" in scalars  # bools as 0/1, text left out
    png = Image.open(Path(run) / CURVES_FILE)
    assert png.format == "PNG" and png.size[0] > 2 * png.size[1]


def test_resumed_tracker_keeps_the_history_up_to_its_step(tmp_path):
    cfg, run = _cfg(tmp_path, "tracking.tensorboard=false"), str(tmp_path / "run")
    first = Tracker(cfg, run)
    for m in _reports(6):
        first.log(m, m["step"])
    resumed = Tracker(cfg, run, resume_step=4)  # the checkpoint was at step 4: steps 5-6 are redone
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]
    resumed.log({"step": 5, "loss": 0.3}, 5)
    assert [m["step"] for m in read_history(run)] == [1, 2, 3, 4, 5]


def test_a_torn_history_line_is_skipped(tmp_path, caplog):
    (tmp_path / HISTORY_FILE).write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert read_history(str(tmp_path)) == [{"step": 1, "loss": 0.5}]
    assert "unreadable line" in caplog.text


def test_mlflow_receives_params_and_every_metric(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: no server on this machine
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(tmp_path, "tracking.mlflow=true", f"tracking.mlflow_tracking_uri={uri}",
               "tracking.mlflow_experiment=dncut-test", "tracking.tensorboard=false", "loss.alpha=0.25")
    tracker = Tracker(cfg, str(tmp_path / "run"))
    for m in _reports(3):
        tracker.log(m, m["step"])
    tracker.close()

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dncut-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["loss.alpha"] == "0.25" and run.data.params["model.backbone"] == cfg.model.backbone
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in _reports(3)]

    resumed = Tracker(cfg, str(tmp_path / "run"), resume_step=3)  # a resume continues the same MLflow run
    resumed.log({"step": 4, "loss": 0.125}, 4)
    resumed.close()
    (again,) = client.search_runs([client.get_experiment_by_name("dncut-test").experiment_id])
    assert again.info.run_id == run.info.run_id
    assert [h.step for h in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]


def test_wandb_enabled_without_its_client_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install wandb"):
        Tracker(_cfg(tmp_path, "tracking.wandb=true", "tracking.tensorboard=false"), str(tmp_path / "run"))


def test_curves_plot_validation_once_per_validation_step():
    from dncut.tracking import _series

    steps, values = _series(_reports(5, val_every=2), "val_iou")
    assert steps == [0, 2, 4] and values == pytest.approx([0.1, 0.11, 0.12])
    assert Image.open(io.BytesIO(plot_curves(_reports(5)))).format == "PNG"


def test_progress_bar_follows_the_history_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = io.StringIO()
    bar = ProgressBar(str(run), 10, interval=0.05, file=out)
    with bar:
        (run / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in _reports(10)[:7]))
        bar.poll()
        assert bar.bar.n == 7
    assert bar.bar.n == 7 and "loss=0.1429" in out.getvalue() and "val_iou=0.1300" in out.getvalue()


def test_dncut_report_writes_the_curves_of_a_run_folder(tmp_path):
    (tmp_path / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in _reports(4)))
    proc = subprocess.run([sys.executable, "-m", "dncut.cli", "report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 reports, step 4/4" in proc.stdout and (tmp_path / CURVES_FILE).is_file()
    empty = subprocess.run([sys.executable, "-m", "dncut.cli", "report", str(tmp_path / "none")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no such folder" in empty.stderr and "Traceback" not in empty.stderr
