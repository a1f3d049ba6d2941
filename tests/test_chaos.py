"""Chaos, fast subset: one trial of each fault that fits in tens of seconds, with the bench's own code.

The trial functions are ``bench/chaos.py``'s (real runs, real SIGKILLs, real files broken), so the
test and ``python bench/chaos.py`` (the repeated trials, the table) run the same code:

    worker SIGKILL          the Train worker killed after the first checkpoint (max_failures=1): the
                            run finishes, the restart continues at the last checkpoint + 1, steps
                            trained twice <= checkpoint_every
    newest checkpoint       state.pt truncated before a continued run: resumes from the previous
    truncated               intact checkpoint and says so (a dncut.train WARNING)
    eval actor SIGKILL      the inference actor killed mid-job (fixed weights from a file): every
                            image has exactly one row per method in per_image.parquet, each with the
                            status and IoU of a clean run of the same job
    driver SIGKILL + rerun  ``python -m dncut.cli train`` killed at a random step, run again: resumes
                            from the newest checkpoint (the worker log says so) and finishes

In-process trials use the session Ray (``ray_session``); the driver trial runs ``dncut train`` in a
subprocess that starts its own local Ray (a second cluster on free ports; the session one, if any,
stays up and idle), as ``tests/test_jobs.py`` does with its own ``ray start``.

``test_reconcile_checkpoints...`` checks the snapshot repair on hand-made run folders (no Ray).
The other kinds (deleted checkpoint, S3 endpoint stopped during reads / uploads, a sweep trial's
worker, a node of a two-node cluster) take a minute or more each: ``python bench/chaos.py --kinds ...``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.ray

TOTAL = 8
"""Steps of the runs a worker / the driver is killed in (the bench's trials run 12)."""


def test_worker_sigkill_restarts_from_the_last_checkpoint(ray_session, tmp_path):
    res = chaos.trial_worker_kill(tmp_path, 0, random.Random(1), total=TOTAL)
    assert res["failures"] >= 1, res  # the kill happened and Ray Train saw it
    assert res["outcome"] == "finished" and res["final_step"] == TOTAL, res
    assert res["last_checkpoint"] >= chaos.CKPT_EVERY
    assert res["resumed_at"] == res["last_checkpoint"] + 1, "the restart must continue from the last checkpoint"
    assert 0 <= res["steps_lost"] <= chaos.CKPT_EVERY, res
    assert res["survived"]


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(ray_session, tmp_path):
    res = chaos.trial_ckpt_truncate(tmp_path, 0, random.Random(2))
    assert res["previous_checkpoint"] >= 2 and res["newest_checkpoint"] > res["previous_checkpoint"], res
    assert res["outcome"] == "finished", res["message"]
    assert res["final_step"] == res["first_run_steps"] + 2
    assert res["resumed_at"] == res["previous_checkpoint"], res
    assert any("resuming from" in w and f"step {res['previous_checkpoint']}" in w for w in res["warnings"]), res
    assert res["survived"]


def test_killed_eval_actor_loses_no_row(ray_session, tmp_path):
    res = chaos.trial_eval_actor_kill(tmp_path, 0, random.Random(3))
    assert res["killed_after_s"] is not None, "the job ended before the actor could be killed"
    assert res["outcome"] == "finished", res["message"]
    assert res["rows"] == res["images"] * 2  # 2 methods
    assert res["duplicated_rows"] == 0 and res["rows_lost"] == 0, res
    assert res["rows_changed_vs_clean"] == 0, res["message"]  # same status and IoU as a clean run, row for row
    assert res["survived"]


def test_killed_driver_rerun_resumes(tmp_path):
    res = chaos.trial_driver_kill(tmp_path, 0, random.Random(4), total=TOTAL)
    assert res["killed_after_step"] >= chaos.CKPT_EVERY and res["resume_checkpoint"] >= chaos.CKPT_EVERY, res
    assert res["outcome"] == "finished" and res["final_step"] == TOTAL, res["message"]
    assert 0 <= res["steps_lost"] <= chaos.CKPT_EVERY, res
    assert res["survived"], res["message"]  # the rerun's worker logged "resumed from ... at step <checkpoint>"


@pytest.fixture(autouse=True, scope="module")
def _stop_chaos_s3_server():
    yield
    if "server" in chaos._S3:
        chaos._S3.pop("server").stop()


# ----------------------------------------------------------------------------- the snapshot repair (no Ray run)


def test_reconcile_checkpoints_drops_broken_and_adopts_unregistered(tmp_path, caplog):
    """``dncut.train.reconcile_checkpoints`` on hand-made run folders; the snapshot it writes must load
    in Ray Train's own snapshot model."""
    import json

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from dncut.config import load_config
    from dncut.train import PROGRESS_FILE, SNAPSHOT_FILE, STATE_FILE, reconcile_checkpoints, resume_step, run_dir

    cfg = load_config(chaos.TRAIN_SMOKE, [f"output_dir={tmp_path}"])
    run = Path(run_dir(cfg))

    def checkpoint(name: str, step: int, size: int = 4, written: int | None = None) -> None:
        (run / name).mkdir(parents=True)
        (run / name / STATE_FILE).write_bytes(b"x" * (size if written is None else written))
        (run / name / PROGRESS_FILE).write_text(json.dumps({"step": step, "state_bytes": size}))

    def snapshot() -> dict:
        return json.loads((run / SNAPSHOT_FILE).read_text())

    checkpoint("checkpoint_1", 3)
    checkpoint("checkpoint_2", 6)
    reconcile_checkpoints(cfg)  # no snapshot yet (the driver died before the first registration): adopt the newest
    assert snapshot()["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_2"
    assert resume_step(cfg) == 6
    _CheckpointManagerState.model_validate(snapshot())

    checkpoint("checkpoint_3", 9, written=2)  # truncated upload, listed as the latest
    snap = snapshot()
    snap["checkpoint_results"].append({"checkpoint_dir_name": "checkpoint_3", "metrics": {"step": 9}})
    snap["checkpoint_report_indices"].append(7)
    snap["latest_checkpoint_result"] = snap["checkpoint_results"][-1]
    (run / SNAPSHOT_FILE).write_text(json.dumps(snap))
    with caplog.at_level("WARNING", logger="dncut.train"):
        reconcile_checkpoints(cfg)
    assert "dropped the incomplete checkpoint(s) checkpoint_3" in caplog.text
    assert "resuming from checkpoint_2 (step 6)" in caplog.text
    assert [r["checkpoint_dir_name"] for r in snapshot()["checkpoint_results"]] == ["checkpoint_2"]
    assert resume_step(cfg) == 6 and (run / "checkpoint_3").exists(), "broken folders stay"

    checkpoint("checkpoint_4", 12)  # uploaded, not registered
    caplog.clear()
    with caplog.at_level("WARNING", logger="dncut.train"):
        reconcile_checkpoints(cfg)
    assert "adopted checkpoint_4" in caplog.text and resume_step(cfg) == 12
    state = _CheckpointManagerState.model_validate(snapshot())
    assert len(state.checkpoint_results) == len(state.checkpoint_report_indices) == 2
    caplog.clear()
    reconcile_checkpoints(cfg)  # consistent now: nothing to do, nothing said
    assert "resuming" not in caplog.text
