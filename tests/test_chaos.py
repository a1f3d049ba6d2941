"""Chaos, fast subset: one trial of each fault that fits in tens of seconds, with the bench's own code.

The trial functions are ``bench/chaos.py``'s (real runs, real SIGKILLs, real files broken), so the
test and ``python bench/chaos.py`` (the repeated trials, the table) run the same code:

    worker SIGKILL          the Train worker killed after the first checkpoint (max_failures=1): the
                            run finishes, the restart continues at the last checkpoint + 1, steps
                            trained twice <= checkpoint_every
    newest checkpoint       state.pt truncated / the folder deleted before a continued run: resumes
    truncated / deleted     from the previous intact checkpoint and says so (a dncut.train WARNING)
    eval actor SIGKILL      the inference actor killed mid-job: every image has exactly one row per
                            method in per_image.parquet, none failed
    driver SIGKILL + rerun  ``python -m dncut.cli train`` killed at a random step, run again: resumes
                            from the newest checkpoint (the worker log says so) and finishes
    S3 endpoint stopped     the moto server SIGSTOPped for 5 s before a checkpoint upload: the run
                            finishes, or fails naming the URI with the newest checkpoint loadable

In-process trials use the session Ray (``ray_session``); the driver trial runs ``dncut train`` in a
subprocess that starts its own local Ray (a second cluster on free ports; the session one, if any,
stays up and idle), as ``tests/test_jobs.py`` does with its own ``ray start``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402

pytestmark = pytest.mark.ray


def test_worker_sigkill_restarts_from_the_last_checkpoint(ray_session, tmp_path):
    res = chaos.trial_worker_kill(tmp_path, 0, random.Random(1))
    assert res["failures"] >= 1, res  # the kill happened and Ray Train saw it
    assert res["outcome"] == "finished" and res["final_step"] == 12, res
    assert res["last_checkpoint"] >= chaos.CKPT_EVERY
    assert res["resumed_at"] == res["last_checkpoint"] + 1, "the restart must continue from the last checkpoint"
    assert 0 <= res["steps_lost"] <= chaos.CKPT_EVERY, res
    assert res["survived"]


@pytest.mark.parametrize("kind", ["ckpt_truncate", "ckpt_delete"])
def test_broken_newest_checkpoint_resumes_from_the_previous_one(ray_session, tmp_path, kind):
    res = chaos.KINDS[kind](tmp_path, 0, random.Random(2))
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
    assert res["duplicated_rows"] == 0 and res["failed_rows"] == 0 and res["rows_lost"] == 0, res
    assert res["survived"]


def test_killed_driver_rerun_resumes(tmp_path):
    res = chaos.trial_driver_kill(tmp_path, 0, random.Random(4))
    assert res["killed_after_step"] >= chaos.CKPT_EVERY and res["resume_checkpoint"] >= chaos.CKPT_EVERY, res
    assert res["outcome"] == "finished" and res["final_step"] == 12, res["message"]
    assert 0 <= res["steps_lost"] <= chaos.CKPT_EVERY, res
    assert res["survived"], res["message"]  # the rerun's worker logged "resumed from ... at step <checkpoint>"


def test_s3_endpoint_stopped_during_a_checkpoint_upload(ray_session, tmp_path):
    res = chaos.trial_s3_uploads(tmp_path, 0, random.Random(5))
    assert res["outage_after_step"] is not None
    assert res["newest_checkpoint_loadable"], res
    assert res["survived"], res["message"]
