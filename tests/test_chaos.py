"""Chaos, fast subset: one trial of each fault that fits in tens of seconds, with the bench's own code.

The trial functions are ``bench/chaos.py``'s (real runs, real SIGKILLs, real files broken), so the
test and ``python bench/chaos.py`` (the repeated trials, the table) run the same code:

    worker SIGKILL          one of 2 Train workers killed after the first checkpoint (max_failures=1):
                            the run finishes, the restart continues at the last checkpoint + 1, steps
                            trained twice <= checkpoint_every (the run is conftest's
                            ``killed_worker_trial``; tests/test_distributed.py checks its event log;
                            the bench's trials kill the one worker of a 1-worker run)
    newest checkpoint       state.pt truncated before a continued run: resumes from the previous
    truncated               intact checkpoint and says so (a dncut.train WARNING)
    eval actor SIGKILL      the inference actor killed mid-job (fixed weights from a file): every
                            image has exactly one row per method in per_image.parquet, each with the
                            status and IoU of a clean run of the same job; dncut ran the pipeline
                            again (its WARNING), Ray restarted no actor
    driver SIGKILL + rerun  ``python -m dncut.cli train`` killed at a random step, run again: resumes
                            from the newest checkpoint (the worker log says so) and finishes

In-process trials use the session Ray (``ray_session``); the driver trial runs ``dncut train`` in a
subprocess that joins the session's cluster (``--address``), as a ``ray job submit`` driver joins
its cluster; ``python bench/chaos.py --kinds driver_kill`` gives each driver its own local Ray.

``test_manifest...`` checks dncut's own checkpoint record on hand-made run folders (no Ray).
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

DRIVER_TOTAL = 16
"""Steps of the run the driver is killed in (the bench's run 24): long enough that the kill lands
before the run ends (a smoke step takes ~0.2 s)."""


def test_worker_sigkill_restarts_from_the_last_checkpoint(killed_worker_trial):
    res = killed_worker_trial  # 2 workers (conftest); the bench's trials kill the one worker of a run
    assert res["failures"] >= 1, res  # the kill happened and Ray Train saw it
    assert res["outcome"] == "finished" and res["final_step"] == res["total"], res
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
    assert res["ray_restarts"] == 0, res  # max_restarts=0: no Ray restart (nor its E line about #53727) ...
    assert len(res["reruns"]) == 1 and "dncut runs the pipeline again" in res["reruns"][0], res  # ... dncut's re-run
    print(res["reruns"][0])
    assert res["survived"]


def test_killed_driver_rerun_resumes(ray_session, tmp_path):
    """Both drivers join the session's cluster (as ``ray job submit`` drivers do); the bench's rows
    give each driver its own local Ray, which dies with it (docs/operations.md, "Faults")."""
    address = ray_session.get_runtime_context().gcs_address
    res = chaos.trial_driver_kill(tmp_path, 0, random.Random(4), total=DRIVER_TOTAL, address=address)
    assert res["killed_after_step"] >= chaos.CKPT_EVERY and res["resume_checkpoint"] >= chaos.CKPT_EVERY, res
    assert res["outcome"] == "finished" and res["final_step"] == DRIVER_TOTAL, res["message"]
    assert 0 <= res["steps_lost"] <= chaos.CKPT_EVERY, res
    assert res["survived"], res["message"]  # the rerun's worker logged "resumed from ... at step <checkpoint>"


@pytest.fixture(autouse=True, scope="module")
def _stop_chaos_s3_server():
    yield
    if "server" in chaos._S3:
        chaos._S3.pop("server").stop()


# ----------------------------------------------------------------------------- dncut's own record (no Ray run)


def test_manifest_names_a_deleted_checkpoint_and_listing_finds_an_unrecorded_one(tmp_path, caplog):
    """``dncut.train.checkpoints`` on hand-made run folders (real files): a checkpoint recorded in the
    manifest whose folder was deleted is named when the rerun skips it; an intact checkpoint uploaded
    but never recorded (the driver died in between) is resumed from; Ray Train's snapshot plays no part."""
    import json
    import shutil

    from dncut.config import load_config
    from dncut.train.checkpoints import MANIFEST_FILE, PROGRESS_FILE, STATE_FILE, record, resume_point

    cfg = load_config(chaos.TRAIN_SMOKE, [f"output_dir={tmp_path}"])
    store, run = cfg.storage_handle(), Path(cfg.run_dir)

    def checkpoint(name: str, step: int, recorded: bool = True) -> None:
        (run / name).mkdir(parents=True)
        (run / name / STATE_FILE).write_bytes(b"x" * 4)
        (run / name / PROGRESS_FILE).write_text(json.dumps({"step": step, "state_bytes": 4}))
        if recorded:
            record(str(run), store, name, step)

    checkpoint("fit_1/checkpoint_3", 3)
    checkpoint("fit_1/checkpoint_6", 6)
    assert [e["step"] for e in json.loads((run / MANIFEST_FILE).read_text())["checkpoints"]] == [3, 6]
    shutil.rmtree(run / "fit_1" / "checkpoint_6")
    with caplog.at_level("WARNING", logger="dncut.train"):
        assert resume_point(str(run), store, say=True).step == 3
    assert "fit_1/checkpoint_6: recorded in the manifest, no longer there" in caplog.text
    assert "resuming from fit_1/checkpoint_3 (step 3)" in caplog.text
    checkpoint("fit_2/checkpoint_9", 9, recorded=False)  # uploaded, the driver died before recording it
    caplog.clear()
    with caplog.at_level("WARNING", logger="dncut.train"):
        assert resume_point(str(run), store, say=True).name == "fit_2/checkpoint_9"
    assert "resuming" not in caplog.text, "nothing newer than the resume point is missing: nothing to say"
    assert not list(run.rglob("checkpoint_manager_snapshot.json"))
