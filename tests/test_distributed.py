"""The distributed training service on real components: a moto S3 server over HTTP, a local Ray.

    2-worker CPU TorchTrainer  s3:// images -> Ray Data -> streaming_split -> DDP (gloo) -> s3:// checkpoints
    source errors              unreachable endpoint / missing bucket / no credentials / empty source
                               -> StorageError before any Ray Train controller or worker exists
    resume from s3://          a run stopped at step N continues at N + 1 with the optimiser state of N
    fault tolerance            SIGKILL of one of 2 RayTrainWorker processes mid-run, max_failures=1:
                               the run finishes and the restart continues from the last checkpoint
                               (conftest's ``killed_worker_trial``, shared with tests/test_chaos.py)

The run history is recorded by a ``ray.train.UserCallback`` (runs in the Ray Train controller,
appends JSON lines to a local file): every report's step and checkpoint, every worker failure.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import s3server
from dncut.config import load_config
from dncut.storage import StorageError
from dncut.train import STATE_FILE, build_trainer, fit

SMOKE = "configs/train/smoke.yaml"
QUIET = ("train.val_every=null", "data.val_scenes=2")
"""Validation is not under test here: the fewest samples, only at the start and the end."""

pytestmark = pytest.mark.ray


def smoke_config(*overrides: str):
    return load_config(SMOKE, [*QUIET, *overrides])


# ----------------------------------------------------------------------------- helpers


def make_recorder(path: Path):
    """A ``UserCallback`` appending ``{"event": "report"|"failure", ...}`` lines to ``path``.

    Built in a function so that cloudpickle ships the class by value to the controller actor.
    """
    import ray.train

    class Recorder(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            self._write({"event": "report", "step": int(metrics[0]["step"]),
                         "skipped_files": [m.get("skipped_files") for m in metrics],
                         "checkpoint": None if checkpoint is None else checkpoint.path})

        def after_exception(self, run_context, worker_exceptions):
            self._write({"event": "failure", "ranks": sorted(worker_exceptions),
                         "errors": [type(e).__name__ for e in worker_exceptions.values()]})

        def _write(self, record: dict) -> None:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return Recorder()


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def s3_checkpoint_states(client, uri: str) -> dict[int, dict]:
    """``{step: state}`` of every ``fit_*/checkpoint_*/state.pt`` object under ``uri`` (read with boto3)."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    states = {}
    for key in s3_keys(client, bucket, prefix):
        rel = key[len(prefix):].lstrip("/")
        parts = rel.split("/")
        if len(parts) == 3 and parts[0].startswith("fit_") and parts[1].startswith("checkpoint_") \
                and parts[2] == STATE_FILE:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
            states[int(state["step"])] = state
    return states


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def adam_steps(state: dict) -> set[int]:
    return {int(v["step"]) for v in state["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def even_image_bucket(s3_server) -> str:
    """7 JPEGs + 1 corrupt file: 8 rows split equally over 2 workers, so no row is ever dropped.

    (``streaming_split(equal=True)`` drops the remainder row of the 9-file session bucket, which
    would make "the corrupt file is seen" depend on the shuffle.)
    """
    return s3server.populate_image_bucket(s3_server.client, bucket="dncut-test-even", n_images=7)


# ----------------------------------------------------------------------------- the input pipeline


def test_blocks_per_source_size():
    from dncut.data.pipeline import MAX_BLOCKS, ROWS_PER_BLOCK, num_blocks

    assert (ROWS_PER_BLOCK, MAX_BLOCKS) == (64, 200)
    assert [num_blocks(n) for n in (0, 1, 64, 65, 160, 12_800, 12_801, 1_281_167)] == [1, 1, 1, 2, 3, 200, 200, 200]


def test_train_dataset_reshuffles_every_epoch_and_is_seeded(ray_session):
    """The run's rows hold every URI once per epoch, each epoch in a new order, in the order the
    seed fixes (Ray Data preserves it), and the same seed gives bit-identical views."""
    from dncut.data.pipeline import SCENE_SCHEME, epoch_rows, train_dataset

    uris = [f"{SCENE_SCHEME}{i}" for i in range(40)]
    rows = epoch_rows(uris, seed=0, epochs=2)
    orders = [[r["uri"] for r in rows if r["epoch"] == e] for e in (0, 1)]
    assert all(sorted(order) == sorted(uris) for order in orders)
    assert orders[0] != orders[1] and uris not in orders
    assert epoch_rows(uris, seed=0, epochs=2) == rows and epoch_rows(uris, seed=1, epochs=2) != rows

    cfg = smoke_config("data.crop_size=32", "train.batch_size=4", "train.max_steps=4")
    ray = ray_session
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        runs = [list(train_dataset(cfg, uris[:8], total_steps=4).iter_batches(batch_size=8, batch_format="numpy"))
                for _ in range(2)]
    finally:
        ray.data.DataContext.get_current().execution_options.preserve_order = False
    a = np.concatenate([b["view1"] for b in runs[0]])
    b = np.concatenate([b["view1"] for b in runs[1]])
    assert a.dtype == np.uint8 and a.shape[1:] == (3, 32, 32) and np.array_equal(a, b)
    assert [int(k) for x in runs[0] for k in x["key"]] == [r["key"] for r in epoch_rows(uris[:8], 0, 2)]


def test_epochs_needed_gives_every_worker_its_steps():
    """Hand-checked cases: 8 files, global batch 4 over 2 workers, 4 steps = exactly 2 epochs; a
    remainder that each worker drops costs one more epoch."""
    from dncut.data.pipeline import epochs_needed

    assert epochs_needed(8, 4, 4, 2) == 2
    assert epochs_needed(200, 60, 16, 1) == 5  # 960 rows
    assert epochs_needed(7, 3, 4, 2) == 2  # 14 rows: 7 per worker, 3 batches of 2 each
    assert epochs_needed(5, 3, 4, 2) == 3  # 10 rows: 5 per worker, only 2 batches; 15 rows: 7 -> 3
    for n, steps, batch, world in ((8, 4, 4, 2), (7, 3, 4, 2), (5, 3, 4, 2), (13, 9, 6, 3)):
        e = epochs_needed(n, steps, batch, world)
        assert (e * n // world) // (batch // world) >= steps > ((e - 1) * n // world) // (batch // world)


def test_resumed_dataset_is_the_tail_of_the_run_over_many_blocks(ray_session, tmp_path, monkeypatch):
    """40 files, 16 rows per block (3 blocks per epoch), batch 4: the dataset of a run resumed at
    step 13 holds exactly the full run's rows from row 13 * 4 on (epochs in order, blocks not
    interleaved)."""
    from dncut.data import pipeline
    from dncut.data.pipeline import SCENE_SCHEME, epoch_rows, num_blocks, train_dataset

    monkeypatch.setattr(pipeline, "ROWS_PER_BLOCK", 16)

    uris = [f"{SCENE_SCHEME}{i}" for i in range(40)]
    cfg = smoke_config("data.crop_size=32", "train.batch_size=4", "train.max_steps=25")
    ctx = ray_session.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    try:
        full, resumed = ([int(k) for b in train_dataset(cfg, uris, 25, start).iter_batches(batch_size=8)
                          for k in b["key"]] for start in (0, 13))
    finally:
        ctx.execution_options.preserve_order = False
    expected = [r["key"] for r in epoch_rows(uris, 0, 3)]  # 25 steps x 4 = 100 rows: 3 epochs
    assert num_blocks(120) > 3 and full == expected
    assert resumed == expected[13 * 4:]


# ----------------------------------------------------------------------------- 2 workers, s3 -> s3


def test_two_workers_stream_from_s3_and_checkpoint_to_s3(ray_session, s3_server, even_image_bucket, s3_bucket,
                                                          tmp_path):
    cfg = smoke_config(f"data.train={even_image_bucket}", f"output_dir={s3_bucket}/runs", "run_name=ddp",
                       "scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.batch_size=4",
                       "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    events = tmp_path / "events.jsonl"
    result = build_trainer(cfg, callbacks=[make_recorder(events)]).fit()

    assert result.error is None
    assert result.metrics["step"] == 4 and result.metrics["total_steps"] == 4
    # 8 rows / 2 workers / 2 per batch = 2 steps per epoch: both epochs meet the corrupt file once
    assert result.metrics["skipped_files"] == 1
    assert result.metrics["skipped_rows"] == 2
    reports = [e for e in read_events(events) if e["event"] == "report"]
    assert [e["step"] for e in reports] == [1, 2, 3, 4]
    assert all(len(e["skipped_files"]) == 2 for e in reports), "one metrics dict per worker"

    # keep_checkpoints=1: only the last checkpoint is left in the bucket, with its config
    bucket = s3_bucket[len("s3://"):]
    keys = s3_keys(s3_server.client, bucket, "runs/ddp/")
    checkpoints = {"/".join(k.split("/")[2:4]) for k in keys  # runs/ddp/fit_<time>/checkpoint_<time>/...
                   if k.count("/") >= 4 and k.split("/")[3].startswith("checkpoint_")}
    assert len(checkpoints) == 1, keys
    (ckpt,) = checkpoints
    assert {f"runs/ddp/{ckpt}/{STATE_FILE}", f"runs/ddp/{ckpt}/config.yaml"} <= set(keys)
    assert {"runs/ddp/backbone.pth", "runs/ddp/config.yaml"} <= set(keys)
    assert str(result.checkpoint.path).endswith(ckpt)
    states = s3_checkpoint_states(s3_server.client, cfg.run_dir)
    # a batch holding the corrupt file has < 2 usable pairs: that step is skipped on both workers
    # (two corrupt rows may share one batch across the epoch boundary: 1 or 2 skipped steps)
    skipped = result.metrics["nan_steps"]
    assert skipped in (1, 2)
    assert sorted(states) == [4] and adam_steps(states[4]) == {4 - skipped}
    assert states[4]["counters"]["skipped_images"] == 2 and states[4]["counters"]["nan_steps"] == skipped
    assert states[4]["skipped_files"] == [f"{even_image_bucket}/{s3server.CORRUPT_NAME}"]

    # the exported backbone is the encoder of the last checkpoint
    body = s3_server.client.get_object(Bucket=bucket, Key="runs/ddp/backbone.pth")["Body"].read()
    export = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    encoder = {k[len("encoder.model."):]: v for k, v in states[4]["model"].items() if k.startswith("encoder.model.")}
    assert encoder and set(encoder) == set(export["state_dict"])
    assert all(torch.equal(encoder[k], export["state_dict"][k]) for k in encoder)
    config = s3_server.client.get_object(Bucket=bucket, Key="runs/ddp/config.yaml")["Body"].read().decode()
    assert f"train: {even_image_bucket}" in config and "num_workers: 2" in config


# ----------------------------------------------------------------------------- errors before any worker


def _controllers() -> int:
    """Ray Train controllers ever created in this Ray session (0 when Ray is not running)."""
    import ray

    if not ray.is_initialized():
        return 0
    from ray._private import state

    return sum(a["ActorClassName"] == "TrainController" for a in state.actors().values())


@pytest.mark.parametrize("case", ["unreachable", "missing_bucket", "no_credentials", "empty_prefix", "empty_folder"])
def test_unusable_source_fails_before_any_worker(case, s3_server, s3_image_bucket, tmp_path, monkeypatch):
    import ray

    source = s3_image_bucket
    overrides = [f"output_dir={tmp_path / 'out'}"]
    if case == "unreachable":
        overrides.append(f"storage.endpoint_url=http://127.0.0.1:{s3server.free_port()}")
        expected = "cannot reach the S3 endpoint"
    elif case == "missing_bucket":
        source = "s3://dncut-no-such-bucket/train"
        expected = "does not exist"
    elif case == "no_credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        expected = "no AWS credentials"
    elif case == "empty_prefix":
        source = f"s3://{s3server.IMAGE_BUCKET}/no-such-prefix"
        expected = "is empty"
    else:
        source = str(tmp_path / "empty")
        os.mkdir(source)
        expected = "is empty"
    cfg = smoke_config(f"data.train={source}", *overrides)
    was_running, controllers = ray.is_initialized(), _controllers()

    start = time.monotonic()
    with pytest.raises(StorageError, match=expected) as info:
        fit(cfg)
    assert time.monotonic() - start < 20
    assert source in str(info.value)
    assert s3server.FAKE_SECRET_KEY not in str(info.value) + repr(info.value.__cause__)
    # nothing started: no Ray (if there was none), no controller, no run folder
    assert ray.is_initialized() == was_running and _controllers() == controllers
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- resume from s3


def test_resume_from_s3_continues_at_step_n(ray_session, s3_server, s3_image_bucket, s3_bucket, tmp_path):
    base = (f"data.train={s3_image_bucket}", f"output_dir={s3_bucket}/runs", "run_name=resume",
            "train.checkpoint_every=2", "train.keep_checkpoints=5")
    first = tmp_path / "first.jsonl"
    build_trainer(smoke_config(*base, "train.max_steps=2"), callbacks=[make_recorder(first)]).fit()
    second = tmp_path / "second.jsonl"
    cfg = smoke_config(*base, "train.max_steps=4")
    result = build_trainer(cfg, callbacks=[make_recorder(second)]).fit()

    assert result.error is None and result.metrics["step"] == 4
    assert [e["step"] for e in read_events(first) if e["event"] == "report"] == [1, 2]
    assert [e["step"] for e in read_events(second) if e["event"] == "report"] == [3, 4], "must resume at 2, not 0"
    states = s3_checkpoint_states(s3_server.client, cfg.run_dir)
    assert sorted(states) == [2, 4]
    assert adam_steps(states[2]) == {2}
    assert adam_steps(states[4]) == {4}, "AdamW's step counter continues from the checkpoint (a restart gives 2)"


# ----------------------------------------------------------------------------- fault tolerance


def _train_workers(job_id: str) -> dict[str, int]:
    """``{actor id: pid}`` of this job's live RayTrainWorker actors (GCS actor table)."""
    from ray._private import state

    return {aid: a["Pid"] for aid, a in state.actors(actor_state_name="ALIVE").items()
            if a["ActorClassName"] == "RayTrainWorker" and a["JobID"] == job_id}


def test_killed_worker_restarts_from_last_checkpoint(ray_session, killed_worker_trial):
    """The run of conftest's ``killed_worker_trial`` (bench/chaos.py: 2 workers, 8 steps, a checkpoint
    every 3, max_failures=1, one worker SIGKILLed while the run waits after a step past the first
    checkpoint), read from its recorded events and its workers' log."""
    res = killed_worker_trial
    total, every = res["total"], res["checkpoint_every"]
    assert res["outcome"] == "finished" and res["final_step"] == total, res
    log = read_events(Path(res["events"]))
    failures = [i for i, e in enumerate(log) if e["event"] == "failure"]
    assert failures, f"no worker failure was recorded: {log}"
    before, after = log[:failures[0]], [e for e in log[failures[0]:] if e["event"] == "report"]
    last_ckpt = max(e["step"] for e in before if e["event"] == "report" and e["checkpoint"])
    assert last_ckpt >= every
    # rank 0 may have uploaded and recorded the next checkpoint while the other worker, killed, never
    # reported that step to Ray: the restart continues from the newest intact one (its workers log
    # which), at most one interval past the last one Ray saw
    train_log = (Path(res["run_dir"]) / "train.log").read_text()
    resumed = [int(line.split("at step")[1].split()[0]) for line in train_log.splitlines() if "resumed from" in line]
    assert resumed and last_ckpt <= resumed[-1] <= last_ckpt + every, (last_ckpt, resumed)
    assert after[0]["step"] == resumed[-1] + 1, "the restart must continue from the last checkpoint"
    assert [e["step"] for e in after] == list(range(resumed[-1] + 1, total + 1))
    assert res["killed_pid"] not in _train_workers(ray_session.get_runtime_context().get_job_id()).values()
