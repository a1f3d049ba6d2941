"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
import os

import pytest

from bench import s3server

# =============================================================================
# S3: a real moto server (subprocess, HTTP on 127.0.0.1) for the whole session
# =============================================================================
# s3_server        (session)  -> s3server.S3Server: .endpoint_url, .client (boto3);
#                               also sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
#                               AWS_ENDPOINT_URL / AWS_REGION for the rest of the session,
#                               so dncut.storage and later Ray workers reach it.
# s3_image_bucket  (session)  -> "s3://dncut-test-images/train": s3server.N_IMAGES JPEGs
#                               img_<i>.jpg + s3server.CORRUPT_NAME. Read-only: don't modify.
# s3_bucket        (function) -> "s3://<fresh empty bucket>" to write into.

_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = s3server.start_moto_server()
    patch = pytest.MonkeyPatch()
    scratch = str(tmp_path_factory.mktemp("aws-config"))
    for name in s3server.AWS_VARS_TO_CLEAR:
        patch.delenv(name, raising=False)
    for name, value in s3server.aws_test_env(server.endpoint_url, scratch).items():
        patch.setenv(name, value)
    try:
        yield server
    finally:
        patch.undo()
        server.stop()


@pytest.fixture(scope="session")
def s3_image_bucket(s3_server) -> str:
    return s3server.populate_image_bucket(s3_server.client)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    name = f"dncut-test-scratch-{next(_bucket_counter)}"
    s3_server.client.create_bucket(Bucket=name)
    return f"s3://{name}"


# =============================================================================
# Ray: one local cluster for the whole session, started after the S3 server so
# that every Ray worker inherits the AWS test environment (endpoint, fake keys).
# =============================================================================
# ray_session (session) -> the ray module, initialised with 4 logical CPUs (2 real
#                           cores: 1-2 train workers plus Ray Data decode tasks).


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    # Ray Train's preemption watcher (one more actor process per fit) polls node drain state: a
    # one-node local cluster is never drained. The tests' fits start without it (Ray reads the
    # variable in the process that calls fit()).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


# =============================================================================
# Shared runs: one real run whose outcome several test modules check, each its own
# part (a Ray Train fit costs ~11 s before dncut's first line: bench/fit_startup.py).
# =============================================================================
# killed_worker_trial (session) -> bench/chaos.py's worker_kill trial on 2 Train workers,
#                                  8 steps: its result dict (run_dir, events, killed_pid, ...).
#                                  test_chaos checks the outcome, test_distributed the event log.
# validated_run       (session) -> (cfg, metrics, root) of one finished 3-step smoke fit with a
#                                  validation every step: trained on root/train (6 JPEGs, 96 px),
#                                  validated on root/val (images/ + masks/, 4 PNG scenes, 64 px)
#                                  given to fit relative to root, its working folder, as a user
#                                  types it; ``cfg`` is the config with absolute paths, as the run
#                                  folder's config.yaml holds it. Read-only: tests leave the run
#                                  folder's files as they are (they may add export folders).


@pytest.fixture(scope="session")
def killed_worker_trial(ray_session, tmp_path_factory) -> dict:
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import chaos

    return chaos.trial_worker_kill(tmp_path_factory.mktemp("worker-kill"), 0, random.Random(1), total=8, workers=2)


@pytest.fixture(scope="session")
def validated_run(ray_session, tmp_path_factory):
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from dncut.config import load_config
    from dncut.data.scenes import make_scene
    from dncut.train import fit

    root = tmp_path_factory.mktemp("validated-run")
    for sub in ("train", "val/images", "val/masks"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        make_scene(i, size=96)[0].save(root / "train" / f"s{i}.jpg")
    for i in range(4):
        image, mask = make_scene(700 + i, size=64)
        image.save(root / "val" / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "val" / "masks" / f"s{i}.png")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/train/smoke.yaml"), [
        f"output_dir={root / 'runs'}", f"data.train={root / 'train'}", "data.val=val", "train.max_steps=3",
        "train.val_every=1", "train.checkpoint_every=3", "eval.batch_size=4"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        metrics = fit(cfg).metrics
        cfg = cfg.with_absolute_paths()
    return cfg, metrics, root


# =============================================================================
# Threads: the suite runs on 2 shared cores; small forwards are 5-10x slower with
# two torch threads fighting Ray's processes, so tests use one.
# =============================================================================
import torch  # noqa: E402

torch.set_num_threads(1)
