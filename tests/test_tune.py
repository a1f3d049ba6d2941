"""Ray Tune sweeps on a real local Ray: smoke sweep end to end, ASHA, failures, resume, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray.tune import Callback

from dncut.config import ConfigError, load_config
from dncut.data.datasets import DatasetLayoutError
from dncut.tune import SweepError, check_sweep, max_concurrent_trials, run_sweep, sweep_dir
from dncut.tune.results import (COLUMNS, PLOT_COLUMN, PLOT_YLABEL, alpha_points, failure_reason, format_trials,
                                iou_vs_alpha_figure, plot_iou_vs_alpha, trial_row, trial_run_name, trials_csv)

SMOKE = "configs/sweep/smoke.yaml"


def sweep_config(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", *overrides])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- pure parts


def test_max_concurrent_rule_hand_cases(tmp_path):
    cfg = sweep_config(tmp_path)  # 1 worker x 1 CPU, decode 0.5 -> 1 + max(1, 0.5) = 2 CPUs per trial
    assert max_concurrent_trials(cfg, {"CPU": 4.0}) == 2
    assert max_concurrent_trials(cfg, {"CPU": 5.9}) == 2
    assert max_concurrent_trials(cfg, {"CPU": 1.0}) == 1  # never below one
    assert max_concurrent_trials(cfg, {"CPU": 64.0}, num_trials=4) == 4
    gpu = sweep_config(tmp_path, "scaling.use_gpu=true", "scaling.num_workers=2", "train.batch_size=4",
                       "scaling.cpus_per_worker=4", "data.decode_cpus=2")  # 8 + 2 CPUs, 2 GPUs per trial
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPU-bound
    assert max_concurrent_trials(gpu, {"CPU": 25.0, "GPU": 8.0}) == 2  # CPU-bound: floor(25 / 10)
    fixed = sweep_config(tmp_path, "tune.max_concurrent_trials=3")
    assert max_concurrent_trials(fixed, {"CPU": 1.0}) == 3


def test_changed_keys_of_a_rerun(tmp_path):
    from dncut.tune import changed_keys

    cfg = sweep_config(tmp_path)
    assert changed_keys(cfg, cfg.with_overrides({"tune.evaluate_best": False, "eval.examples": 5})) == {}
    diff = changed_keys(cfg, cfg.with_overrides({"tune.alpha": [0.3], "train.max_steps": 9}))
    assert diff == {"tune.alpha": ([0.02, 0.1], [0.3]), "train.max_steps": (4, 9)}


def test_run_names():
    name = trial_run_name("ab12c_00001", {"alpha": 0.05, "lr": 5e-4, "backbone": "vit_small_patch16_224.dino"})
    assert name == "ab12c_00001-vit_small_patch16_224.dino-a0.05-lr0.0005"


def test_failure_reason_finds_innermost_error():
    wrapped = ("ray.exceptions.RayTaskError(TrainingFailedError): ray::ImplicitFunc.train()\n"
               "  File \"x.py\", line 3, in f\n"
               "ray.train.v2.api.exceptions.TrainingFailedError: Training failed due to worker errors:\n"
               "[Rank 0]\nTraceback (most recent call last):\n"
               "RuntimeError: 1 non-finite losses in a row at step 1 (train.max_nan_steps=0): lower train.lr\n")
    assert failure_reason(wrapped) == ("RuntimeError: 1 non-finite losses in a row at step 1 "
                                       "(train.max_nan_steps=0): lower train.lr")
    assert failure_reason(None) == ""
    assert failure_reason(ValueError("x" * 500)).endswith("...")


def test_sort_and_best_trial_hand_rows():
    from dncut.tune.results import best_trial, sort_rows

    rows = [dict(trial_id=i, status=s, final_metric=v, export="e" if s == "TERMINATED" else None)
            for i, (s, v) in enumerate([("TERMINATED", None), ("TERMINATED", 0.2), ("ERROR", None),
                                        ("TERMINATED", 0.5), ("EARLY_STOPPED", 0.9)])]
    assert [r["trial_id"] for r in sort_rows(rows, "max")] == [3, 1, 0, 4, 2]
    assert [r["trial_id"] for r in sort_rows(rows, "min")] == [1, 3, 0, 4, 2]
    assert best_trial(rows, "max")["trial_id"] == 3  # the early-stopped 0.9 has no export
    assert best_trial(rows, "min")["trial_id"] == 1
    assert best_trial(rows[2:3], "max") is None


def test_table_csv_and_plot_from_hand_rows():
    row = {k: None for k in COLUMNS}
    rows = [dict(row, trial_id="t0", backbone="b", alpha=0.0, lr=1e-3, status="TERMINATED", best_val_iou=0.5,
                 final_metric=0.4, final_step=4, total_steps=4, collapsed=True, export="/s/runs/t0/backbone.pth"),
            dict(row, trial_id="t1", backbone="b", alpha=0.1, lr=1e-3, status="ERROR", reason="RuntimeError: a|b")]
    md = format_trials(rows, metric="val_iou", root="/s")
    assert md.count("\n") == 3 and "runs/t0/backbone.pth" in md and "**yes**" in md and "a\\|b" in md
    back = list(csv.DictReader(io.StringIO(trials_csv(rows))))
    assert [r["trial_id"] for r in back] == ["t0", "t1"] and back[0]["best_val_iou"] == "0.5"
    assert back[1]["best_val_iou"] == "" and list(back[0]) == list(COLUMNS)
    png = Image.open(io.BytesIO(plot_iou_vs_alpha(rows)))  # alpha = 0 -> symlog axis, must not fail
    assert png.format == "PNG" and png.size[0] > 100


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _plotted_lines(rows) -> dict[str, dict[float, float]]:
    """{backbone: {alpha: y}} read back from the figure's own lines, and its y label."""
    ax = iou_vs_alpha_figure(rows).axes[0]
    assert ax.get_ylabel() == PLOT_YLABEL
    return {ln.get_label(): dict(zip(map(float, ln.get_xdata()), map(float, ln.get_ydata()))) for ln in ax.lines}


def test_row_states_what_the_run_did_not_tunes_last_result(tmp_path):
    """ASHA stopped the trial on its step-2 report while its run had already reached step 4 (the
    new user's sweep): the row's steps, metrics and checkpoint are the run's, not Tune's step 2;
    step 0 (the starting weights) counts for no best."""
    import pandas as pd
    from types import SimpleNamespace

    params = {"alpha": 0.1, "lr": 5e-4, "backbone": "vit_tiny_test"}
    run = tmp_path / "runs" / trial_run_name("t_00001", params)
    run.mkdir(parents=True)
    val = {0: 0.80, 2: 0.70, 4: 0.75}  # weights of step -> val_iou; the start is the best
    lines = [{"step": s, "total_steps": 4, "lr": 5e-4, "val_iou": val[v], "val_max_fbeta": val[v] + 0.05,
              "val_step": v, "collapsed": False} for s, v in ((1, 0), (2, 2), (3, 2), (4, 4))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for step in (2, 4):
        ckpt = run / "fit_1" / f"checkpoint_{step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "progress.json").write_text(json.dumps({"step": step}))
        (ckpt / "state.pt").write_bytes(b"x")
    seen = pd.DataFrame([dict(x, trial_id="t_00001", checkpoint_path=str(run / "fit_1" / "checkpoint_0000002"))
                         for x in lines[:2]])  # Tune received steps 1 and 2
    result = SimpleNamespace(config=params, metrics={"trial_id": "t_00001"}, path=str(tmp_path / "trial_t_00001"),
                             metrics_dataframe=seen, error=None)
    row = trial_row(result, runs_dir=str(tmp_path / "runs"), metric="val_iou", mode="max", tune_status="TERMINATED")
    assert row["status"] == "EARLY_STOPPED" and row["export"] is None
    assert (row["final_step"], row["total_steps"], row["tune_step"]) == (4, 4, 2)
    assert row["final_metric"] == row["final_val_iou"] == 0.75 and row["val_step"] == 4
    assert row["best_val_iou"] == 0.75 and row["best_step"] == 4  # not step 0's 0.80
    assert row["best_val_max_fbeta"] == pytest.approx(0.80)
    assert row["checkpoint"].endswith("checkpoint_0000004")
    assert "after step 2/4" in row["reason"] and "reached step 4" in row["reason"], row["reason"]
    (run / "backbone.pth").write_bytes(b"x")  # the run raced to its export: it finished
    done = trial_row(result, runs_dir=str(tmp_path / "runs"), metric="val_iou", mode="max", tune_status="TERMINATED")
    assert done["status"] == "TERMINATED" and done["final_step"] == 4 and "after its run had finished" in done["reason"]


def test_plot_values_are_the_quantity_on_its_axis():
    row = {k: None for k in COLUMNS}
    rows = [dict(row, trial_id=i, backbone=b, alpha=a, lr=lr, status=s, final_val_iou=v, val_step=at,
                 best_val_iou=0.99, collapsed=False)
            for i, (b, a, lr, s, v, at) in enumerate([
                ("b", 0.1, 1e-3, "TERMINATED", 0.50, 4), ("b", 0.1, 1e-4, "EARLY_STOPPED", 0.60, 2),
                ("b", 0.3, 1e-3, "TERMINATED", 0.40, 4), ("b", 1.0, 1e-3, "TERMINATED", 0.90, 0),  # step 0 only
                ("c", 0.1, 1e-3, "ERROR", 0.70, 2), ("c", 0.3, 1e-3, "TERMINATED", 0.20, 4)])]
    assert PLOT_COLUMN == "final_val_iou" and "final validation IoU" in PLOT_YLABEL
    expected = {"b": {0.1: 0.60, 0.3: 0.40}, "c": {0.3: 0.20}}  # best over lr; no step-0-only, no error
    assert alpha_points(rows) == expected
    assert _plotted_lines(rows) == expected


def test_trial_config_applies_sample_and_per_backbone_checkpoint(tmp_path):
    from dncut.tune import trial_config

    base = sweep_config(tmp_path, "tune.checkpoints={efficientnet_lite0_s16: /w/lite0.pth}").model_dump(mode="json")
    vit = trial_config(base, {"alpha": 0.3, "lr": 2e-3, "backbone": "vit_tiny_test"}, "x_00001", "/s/runs")
    assert (vit.loss.alpha, vit.train.lr, vit.model.backbone, vit.model.checkpoint) == (0.3, 2e-3, "vit_tiny_test", None)
    assert vit.output_dir == "/s/runs" and vit.run_name == "x_00001-vit_tiny_test-a0.3-lr0.002"
    eff = trial_config(base, {"alpha": 0.3, "lr": 2e-3, "backbone": "efficientnet_lite0_s16"}, "x_2", "/s/runs")
    assert eff.model.checkpoint == "/w/lite0.pth" and eff.model.pretrained is False


def test_paper_sweep_config_is_valid():
    from dncut.tune.space import check_combinations, check_space, grid_size

    cfg = load_config("configs/sweep/paper.yaml")
    check_space(cfg)
    check_combinations(cfg)
    assert grid_size(cfg) == 5 * 7 * 3 and 0.0 in cfg.tune.alpha
    assert set(cfg.tune.checkpoints) <= set(cfg.tune_backbones())
    # set, not derived: on the autoscaling cluster (min_workers 0) the start has no GPU node
    assert max_concurrent_trials(cfg, {"CPU": 8.0}) == cfg.tune.max_concurrent_trials == 4
    derived = cfg.with_overrides({"tune.max_concurrent_trials": None})
    assert max_concurrent_trials(derived, {"CPU": 512.0, "GPU": 64.0}) == 16  # 4 GPUs per trial
    assert max_concurrent_trials(derived, {"CPU": 8.0}) == 1


# ----------------------------------------------------------------------------- bad input, before any trial


def test_config_rejects_empty_space(tmp_path):
    with pytest.raises(ConfigError, match="tune.alpha"):
        sweep_config(tmp_path, "tune.alpha=[]")
    with pytest.raises(ConfigError, match="tune.backbones"):
        sweep_config(tmp_path, "tune.backbones=[resnet51]")


@pytest.mark.parametrize("update, match", [
    ({"alpha": []}, "tune.alpha: empty search space"),
    ({"lr": [0.0]}, "tune.lr: invalid values"),
    ({"backbones": []}, "tune.backbones: empty list"),
    ({"backbones": ["vit_tiny_test", "vit_tiny_test"]}, "repeated"),
    ({"backbones": ["vit_does_not_exist"]}, "unknown backbone 'vit_does_not_exist'"),
    ({"metric": "val_ioU"}, "tune.metric"),
    ({"checkpoints": {"resnet50": "/x.pth"}}, "not in tune.backbones"),
    ({"checkpoints": {"vit_tiny_test": "/does/not/exist.pth"}}, "no file at /does/not/exist.pth"),
])
def test_run_sweep_rejects_bad_space_before_any_trial(tmp_path, update, match):
    cfg = sweep_config(tmp_path)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update=update)})  # bypasses config validation
    with pytest.raises(SweepError, match=match):
        run_sweep(cfg)
    assert not Path(sweep_dir(cfg)).exists()  # nothing written, no Tune experiment


def test_asha_on_a_val_metric_needs_val_every(tmp_path):
    cfg = sweep_config(tmp_path, "train.val_every=null")
    assert cfg.tune.asha is not None and cfg.tune.metric.startswith("val_")
    with pytest.raises(SweepError, match="train.val_every is null"):
        check_sweep(cfg)


def test_rejects_crop_not_multiple_of_stride_and_invalid_grid_point(tmp_path):
    with pytest.raises(SweepError, match="crop_size=72 must be a multiple of the efficientnet_lite0_s16 stride 16"):
        check_sweep(sweep_config(tmp_path, "data.crop_size=72"))  # 72 = 9 x 8: fine for the ViT only
    with pytest.raises(SweepError, match="min_lr"):
        check_sweep(sweep_config(tmp_path, "tune.lr=[5.0e-4, 1.0e-7]"))  # min_lr 1e-6 > lr 1e-7


def test_run_sweep_rejects_val_folder_without_masks(tmp_path):
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(val / "images" / "a.jpg")
    cfg = sweep_config(tmp_path, f"data.val={val}")
    with pytest.raises(DatasetLayoutError, match="masks"):
        run_sweep(cfg)
    assert not Path(sweep_dir(cfg)).exists()


# ----------------------------------------------------------------------------- real sweeps


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_end_to_end(ray_session, tmp_path):
    """configs/sweep/smoke.yaml: 2 backbones x 2 alphas, ASHA, table + plot + best-trial evaluation."""
    cfg = sweep_config(tmp_path)
    out = run_sweep(cfg)
    root = Path(out.sweep_dir)
    assert root == tmp_path / "tune" / "sweep_smoke"
    assert len(out.rows) == 4
    assert {(r["backbone"], r["alpha"]) for r in out.rows} == {
        (b, a) for b in ("vit_tiny_test", "efficientnet_lite0_s16") for a in (0.02, 0.1)}
    assert all(r["status"] in ("TERMINATED", "EARLY_STOPPED") for r in out.rows), out.table
    # CSV and Markdown: one line per trial
    rows = list(csv.DictReader((root / "trials.csv").open()))
    assert len(rows) == 4 and set(rows[0]) == set(COLUMNS)
    assert (root / "trials.md").read_text().count("\n") == 2 + 4
    assert Image.open(root / "val_iou_vs_alpha.png").format == "PNG"
    time.sleep(3)  # a stopped trial's Train run, if still alive, would go on recording steps
    for r in out.rows:  # table values against what each Train run itself recorded
        run = Path(r["run_dir"])
        history = _history(run)
        steps_on_disk = [int(p.name.split("_")[1]) for p in run.glob("fit_*/checkpoint_*") if p.is_dir()]
        assert r["final_step"] == history[-1]["step"] and max(steps_on_disk, default=0) <= r["final_step"], (r, steps_on_disk)
        assert r["final_metric"] == r["final_val_iou"] == pytest.approx(history[-1]["val_iou"])
        assert r["val_step"] == history[-1]["val_step"] >= 1
        assert 0.0 <= r["best_val_iou"] <= 1.0 and r["best_val_iou"] >= r["final_metric"] - 1e-12
        assert r["tune_step"] <= r["final_step"]
        if r["status"] == "TERMINATED":
            final = json.loads((Path(r["run_dir"]) / "final_metrics.json").read_text()) if (
                run / "final_metrics.json").is_file() else history[-1]  # no file: ASHA stopped it after the end
            assert r["final_metric"] == pytest.approx(final["val_iou"]) and r["final_step"] == final["step"] == 4
            assert Path(r["export"]).is_file()
        else:  # stopped by ASHA: no export, the steps its run did reach
            assert r["status"] == "EARLY_STOPPED" and r["export"] is None and "stopped by ASHA" in r["reason"]
            assert r["final_step"] <= r["total_steps"] and not (run / "backbone.pth").exists()
    expected: dict = {}
    for r in out.rows:
        at = expected.setdefault(r["backbone"], {})
        at[r["alpha"]] = max(at.get(r["alpha"], 0.0), _history(Path(r["run_dir"]))[-1]["val_iou"])
    plotted = _plotted_lines(out.rows)  # the plotted values are the runs' final val IoUs
    assert set(plotted) == set(expected)
    assert all(plotted[b] == pytest.approx(expected[b]) for b in expected), (plotted, expected)
    # the winner: best final val_iou among finished trials, evaluated by the evaluation job
    finished = [r for r in out.rows if r["status"] == "TERMINATED"]
    assert out.best["trial_id"] == max(finished, key=lambda r: r["final_metric"])["trial_id"]
    runs = out.eval_summary["runs"]
    assert runs and all(r["checkpoint"] == out.best["export"] and r["backbone"] == out.best["backbone"] for r in runs)
    assert all(0.0 <= r["metrics"]["iou"] <= 1.0 for r in runs)
    assert (root / "best_eval" / "summary.json").is_file() and "IoU" in out.eval_table
    assert out.best["trial_id"] in (root / "best.md").read_text()


class InterruptOnce(Callback):
    """Raises in Tune's control loop once a trial has finished, once (a marker file remembers):
    the sweep's driver dies like a crashed head node, with one trial finished."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_step_begin(self, iteration, trials, **info):
        finished = [t for t in trials if t.status == "TERMINATED"]
        if finished and not os.path.exists(self.marker):
            Path(self.marker).write_text(finished[0].trial_id)
            raise RuntimeError("simulated driver crash")


@pytest.mark.ray
@pytest.mark.slow
def test_asha_failure_and_resume(ray_session, tmp_path):
    """One backbone, lr grid run in order, ASHA on the reported lr (deterministic, mode max):

    trial 0 (lr 1e-3) runs to the end (2 steps), then the driver crashes; the sweep is restarted;
    trial 1 (lr 1e30) reports step 1 then fails on non-finite losses -> ERROR, the sweep goes on;
    trial 2 (lr 5e-4) is below the rung-1 cutoff (a percentile of values >= 1e-3) -> stopped at step 1
    (its run may record step 2 before the stop reaches it; the row states what the run did).
    """
    cfg = sweep_config(tmp_path, "tune.backbones=[vit_tiny_test]", "tune.alpha=[0.05]",
                       "tune.lr=[1.0e-3, 1.0e30, 5.0e-4]", "tune.metric=lr", "tune.max_concurrent_trials=1",
                       "tune.asha={grace_period: 1, reduction_factor: 2}", "train.max_nan_steps=0",
                       "train.max_steps=2", "tune.evaluate_best=false")
    free_cpus = ray_session.available_resources().get("CPU", 0.0)
    marker = tmp_path / "interrupted"
    with pytest.raises(Exception, match="simulated driver crash"):
        run_sweep(cfg, callbacks=[InterruptOnce(str(marker))])
    first_id = marker.read_text()
    runs = Path(sweep_dir(cfg)) / "runs"
    (first_run,) = [p for p in runs.iterdir() if p.name.startswith(first_id)]
    assert (first_run / "backbone.pth").is_file()
    before = _mtimes(first_run)
    saved = (Path(sweep_dir(cfg)) / "sweep_config.yaml").read_bytes()
    with pytest.raises(SweepError, match=r"tune\.alpha: \[0\.05\] -> \[0\.2\].*new tune\.name"):
        run_sweep(cfg.with_overrides({"tune.alpha": [0.2]}))  # Tune would restore the old grid
    assert (Path(sweep_dir(cfg)) / "sweep_config.yaml").read_bytes() == saved  # still the trials that ran

    out = run_sweep(cfg.with_overrides({"tune.evaluate_best": False, "eval.examples": 1}))  # resumes
    by_lr = {r["lr"]: r for r in out.rows}
    assert len(out.rows) == 3 and set(by_lr) == {1e-3, 1e30, 5e-4}
    done, failed, stopped = by_lr[1e-3], by_lr[1e30], by_lr[5e-4]
    assert done["trial_id"] == first_id and done["status"] == "TERMINATED" and done["final_step"] == 2
    assert _mtimes(first_run) == before  # the finished trial was not trained again
    assert failed["status"] == "ERROR" and "non-finite losses" in failed["reason"], failed
    assert stopped["tune_step"] == 1 and stopped["final_step"] == _history(Path(stopped["run_dir"]))[-1]["step"]
    # ASHA's stop reaches the run a report or two late: on a 2-step run it may have finished and exported
    assert stopped["status"] == ("TERMINATED" if stopped["export"] and stopped["final_step"] == 2
                                 else "EARLY_STOPPED"), stopped
    assert out.best["trial_id"] == first_id and out.eval_summary is None
    assert "ERROR" in (Path(out.sweep_dir) / "trials.md").read_text()
    time.sleep(3)  # the last trial's actors exit
    assert ray_session.available_resources().get("CPU", 0.0) >= free_cpus - 0.05  # stopped trials released
