"""Checks a training run passes before any worker starts (issue 26, items 6 and 7):

    resource arithmetic   dncut.train.resources.check_resources: Train workers + a decode task
                          against each node's CPUs / GPUs (fixed and autoscaling clusters)
    rerun of a folder     dncut.train.checkpoints.check_rerun: a run folder with trained state
                          continues only with its own config (up to the rerun keys); its files
                          are left exactly as they were
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dncut.config import config_diff, load_config
from dncut.train.checkpoints import (CONFIG_FILE, EXPORT_FILE, FOUND_RERUN_KEYS, MANIFEST_FILE, RerunError,
                                     check_rerun)
from dncut.train.resources import NodeKind, ResourceError, check_resources

SMOKE = "configs/train/smoke.yaml"


def smoke(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", *overrides]).with_absolute_paths()


def scaling(*overrides: str):
    return load_config(SMOKE, ["train.batch_size=32", "train.base_batch_size=32", *overrides])


# ----------------------------------------------------------------------------- resource arithmetic


def test_a_worker_that_takes_the_whole_node_is_refused_with_the_keys():
    cfg = scaling("scaling.cpus_per_worker=4", "data.decode_cpus=1")
    with pytest.raises(ResourceError) as err:
        check_resources(cfg, [{"CPU": 4.0}])
    msg = str(err.value)
    assert "\n" not in msg
    for key in ("scaling.num_workers", "scaling.cpus_per_worker", "data.decode_cpus"):
        assert key in msg
    assert "1 x 4 CPUs" in msg and "hang at step 0" in msg


@pytest.mark.parametrize("cpus, decode, nodes, ok", [
    (3, 1, [4], True),              # one CPU left for the decode task
    (3.5, 0.5, [4], True),          # half a CPU: one task of 0.5 at a time
    (3.5, 1, [4], False),
    (2, 1, [4], False),             # 2 workers x 2 CPUs fill the node
    (2, 1, [4, 4], True),           # ... the second node decodes
    (4, 1, [4, 4, 4], True),        # a worker per node: the third node decodes
    (4, 1, [4, 4], False),          # no node left for decoding
    (1, 1, [1, 1, 1], True),
    (3, 2, [4, 4, 1], False),       # 1 CPU left on each node; no node keeps 2
    (3, 2, [4, 4, 2], True),
])
def test_fixed_cluster_hand_cases(cpus, decode, nodes, ok):
    """Two workers (``scaling.num_workers=2``) except the one-worker cases on a single node."""
    workers = 1 if len(nodes) == 1 and cpus > 2 else 2
    cfg = scaling(f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}", f"data.decode_cpus={decode}")
    if ok:
        assert check_resources(cfg, [{"CPU": float(c)} for c in nodes]) is None
    else:
        with pytest.raises(ResourceError, match="scaling.cpus_per_worker"):
            check_resources(cfg, [{"CPU": float(c)} for c in nodes])


def test_workers_that_do_not_fit_a_fixed_cluster_are_refused():
    with pytest.raises(ResourceError, match="the workers do not fit"):
        check_resources(scaling("scaling.num_workers=4", "scaling.cpus_per_worker=2"), [{"CPU": 4.0}])


def test_gpus_count_per_node():
    cfg = scaling("scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "data.decode_cpus=1")
    assert check_resources(cfg, [{"CPU": 8.0, "GPU": 2.0}]) is None
    assert check_resources(cfg, [{"CPU": 8.0, "GPU": 1.0}] * 2) is None
    with pytest.raises(ResourceError, match="scaling.gpus_per_worker"):
        check_resources(cfg, [{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ResourceError):  # GPUs for both, but the second worker takes the last CPU
        check_resources(cfg.with_overrides({"scaling.cpus_per_worker": 4}), [{"CPU": 8.0, "GPU": 2.0}])


def test_a_tune_trials_driver_cpu_counts():
    cfg = scaling("scaling.cpus_per_worker=3", "data.decode_cpus=1")
    assert check_resources(cfg, [{"CPU": 4.0}]) is None
    with pytest.raises(ResourceError, match="trial driver"):
        check_resources(cfg, [{"CPU": 4.0}], extra_cpus=0.01)


def test_autoscaling_cluster_waits_for_more_nodes_of_the_same_kind():
    """More nodes of a listed kind: a warning; a worker that fills every node kind: refused."""
    cfg = scaling("scaling.num_workers=4", "scaling.cpus_per_worker=3", "data.decode_cpus=1")
    kinds = [NodeKind({"CPU": 4.0}, max_count=-1)]
    warning = check_resources(cfg, [{"CPU": 4.0}], kinds)
    assert warning and "autoscaler" in warning
    head_only = check_resources(cfg, [{"CPU": 0.0}], kinds)  # a head node that takes no work
    assert head_only and "autoscaler" in head_only
    assert check_resources(cfg, [{"CPU": 4.0}] * 5, kinds) is None  # holds it as it is
    with pytest.raises(ResourceError, match="no node of this cluster"):
        check_resources(cfg.with_overrides({"scaling.cpus_per_worker": 4}), [{"CPU": 4.0}], kinds)
    with pytest.raises(ResourceError):  # at most 2 nodes of the kind: 4 workers never fit
        check_resources(cfg, [], [NodeKind({"CPU": 4.0}, max_count=2)])
    # a spare CPU-only head node decodes for GPU workers that fill their nodes
    gpu = scaling("scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=8", "data.decode_cpus=1")
    assert check_resources(gpu, [{"CPU": 4.0}], [NodeKind({"CPU": 8.0, "GPU": 1.0})]) is not None


@pytest.mark.ray
def test_train_run_whose_worker_takes_every_cpu_is_refused_at_once(ray_session, tmp_path, capsys):
    """The shared session has 4 CPUs: ``scaling.cpus_per_worker=4`` leaves none for decoding; the
    run used to hang at step 0. Now: exit code 2 within seconds, one line naming the numbers and the
    keys, no run folder written."""
    from dncut.cli import main

    start = time.monotonic()
    code = main(["-q", "train", "--config", SMOKE, "--set", f"output_dir={tmp_path}", "--set",
                 "scaling.cpus_per_worker=4"])
    assert time.monotonic() - start < 30
    assert code == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg.startswith("dncut train: ") and "scaling.cpus_per_worker" in msg and "data.decode_cpus" in msg
    assert "1 x 4 CPUs" in msg and "hang at step 0" in msg
    assert not (tmp_path / "smoke").exists()


@pytest.mark.ray
def test_sweep_whose_trial_can_never_fit_is_refused_before_it_starts(ray_session, tmp_path):
    from dncut.tune import run_sweep, sweep_dir

    cfg = load_config("configs/sweep/smoke.yaml", [f"output_dir={tmp_path}", "scaling.cpus_per_worker=3",
                                                     "data.decode_cpus=1"])
    with pytest.raises(ResourceError, match="trial driver"):
        run_sweep(cfg, evaluate=False)
    assert not Path(sweep_dir(cfg.with_absolute_paths())).exists()


# ----------------------------------------------------------------------------- rerun of a run folder


def trained_folder(tmp_path: Path, *overrides: str):
    """A run folder as a finished run leaves it (config.yaml, manifest, checkpoint, export)."""
    cfg = smoke(tmp_path, *overrides)
    run = Path(cfg.run_dir)
    ckpt = run / "fit_20260101-000000-000000" / "checkpoint_0000002_20260101-000000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"0123")
    (ckpt / "progress.json").write_text(json.dumps({"step": 2, "state_bytes": 4}))
    (run / MANIFEST_FILE).write_text(json.dumps({"checkpoints": [{"name": str(ckpt.relative_to(run)), "step": 2}]}))
    (run / EXPORT_FILE).write_bytes(b"weights")
    (run / CONFIG_FILE).write_text(cfg.to_yaml())
    return cfg


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_config_diff_names_changed_keys():
    a = scaling()
    b = a.with_overrides({"model.proj_dim": 64, "train.max_steps": 9, "eval.examples": 0})
    assert config_diff(a, b) == {"eval.examples": (2, 0), "model.proj_dim": (32, 64), "train.max_steps": (6, 9)}
    assert config_diff(a, b, ignore=("eval.", "train.max_steps")) == {"model.proj_dim": (32, 64)}
    assert config_diff(a, b, ignore=("eval",)) == {"eval.examples": (2, 0), "model.proj_dim": (32, 64),
                                                   "train.max_steps": (6, 9)}  # no dot: one key only


def test_rerun_with_another_model_config_is_refused_and_names_the_keys(tmp_path):
    cfg = trained_folder(tmp_path)
    store = cfg.storage_handle()
    check_rerun(cfg, store)  # the same config continues
    check_rerun(cfg.with_overrides({"train.max_steps": 12, "train.val_every": 2, "scaling.num_workers": 2,
                                    "tracking.tensorboard": False, "eval.examples": 0}), store)
    with pytest.raises(RerunError) as err:
        check_rerun(cfg.with_overrides({"model.proj_dim": 64, "loss.alpha": 0.1}), store)
    msg = str(err.value)
    assert "\n" not in msg
    assert "loss.alpha: 0.05 -> 0.1" in msg and "model.proj_dim: 32 -> 64" in msg
    assert "run_name" in msg and str(Path(cfg.run_dir) / CONFIG_FILE) in msg


def test_rerun_of_a_folder_without_trained_state_may_change_anything(tmp_path):
    cfg = smoke(tmp_path)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text(cfg.to_yaml())
    check_rerun(cfg.with_overrides({"model.proj_dim": 64}), cfg.storage_handle())


def test_found_rerun_keys(tmp_path):
    cfg = smoke(tmp_path, "run_name=found")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text(cfg.to_yaml())
    (run / "found_head.safetensors").write_bytes(b"head")
    store = cfg.storage_handle()
    outputs = ("found_head.safetensors",)
    check_rerun(cfg.with_overrides({"found.steps": 900, "train.lr": 0.1, "model.proj_dim": 8}), store,
                FOUND_RERUN_KEYS, outputs)
    with pytest.raises(RerunError, match="found.batch_size: 50 -> 10"):
        check_rerun(cfg.with_overrides({"found.batch_size": 10}), store, FOUND_RERUN_KEYS, outputs)


def test_train_and_found_trainers_refuse_before_writing_anything(tmp_path):
    """build_trainer / build_found_trainer refuse before config.yaml is written (and before pruning
    earlier fits): every file of the folder keeps its bytes and mtime, and export still works."""
    from dncut.train.driver import build_trainer
    from dncut.train.found import HEAD_FILE, build_found_trainer

    cfg = trained_folder(tmp_path, "train.keep_checkpoints=1")
    run = Path(cfg.run_dir)
    before = snapshot(run)
    with pytest.raises(RerunError, match="model.proj_dim: 32 -> 64"):
        build_trainer(cfg.with_overrides({"model.proj_dim": 64}))
    found = trained_folder(tmp_path, "run_name=found")
    (Path(found.run_dir) / HEAD_FILE).write_bytes(b"head")
    found_before = snapshot(Path(found.run_dir))
    with pytest.raises(RerunError, match="found.crop_size"):
        build_found_trainer(found.with_overrides({"found.crop_size": 32}))
    assert snapshot(run) == before
    assert snapshot(Path(found.run_dir)) == found_before


@pytest.mark.ray
def test_rerun_after_a_model_change_fails_before_any_worker_and_the_run_still_exports(validated_run, tmp_path):
    """conftest's ``validated_run`` (a finished 3-step run) run again with another ``model.proj_dim``."""
    from dncut.train import export_run, fit

    cfg, _, _ = validated_run
    run = Path(cfg.run_dir)
    before = snapshot(run)
    start = time.monotonic()
    with pytest.raises(RerunError, match="model.proj_dim: 32 -> 64"):
        fit(cfg.with_overrides({"model.proj_dim": 64}))
    assert time.monotonic() - start < 30
    assert snapshot(run) == before
    assert export_run(str(run), "safetensors", str(tmp_path / "export"))
