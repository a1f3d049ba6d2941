"""Secrets never leak: a training run, an evaluation and failing S3 runs, all with recognisable fake
credentials in the environment, leave none of them in any output file, log record, console output
or error message.

How credentials travel (``dncut.storage``): only through the standard AWS chain of each process's
environment, never through the config or Ray (``S3Options`` holds endpoint and region only; a pickled
``pyarrow`` S3 filesystem holds no keys). The session's Ray workers inherited the moto fixture's fake
keys (``s3server.FAKE_*``) when ``ray_session`` started; the driver here gets the recognisable
``SECRETS`` below (moto accepts any keys). So the driver-side code (prechecks, config dumps, Ray
Train's storage, reports, error messages) is checked against ``SECRETS`` and the worker-side code
(S3 reads in Ray Data tasks and actors, checkpoints, ``train.log``) against the workers' keys: both
sets are searched everywhere, as raw text and URL-encoded.
"""

from __future__ import annotations

import io
import logging
import traceback
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from bench import s3server
from dncut.config import load_config

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIADNCUTFAKESECRET1",
    "AWS_SECRET_ACCESS_KEY": "dncutFakeSecretKey/DO-NOT-LEAK/0123456789",
    "WANDB_API_KEY": "dncutfakewandbkey0123456789abcdef0123456789",
    "MLFLOW_TRACKING_PASSWORD": "dncutFakeMlflowPassword-DO-NOT-LEAK",
    "MLFLOW_TRACKING_TOKEN": "dncutFakeMlflowToken-DO-NOT-LEAK",
    "HF_TOKEN": "hf_dncutFakeHubTokenDoNotLeak0123456789",
}
WORKER_SECRETS = {"worker AWS_ACCESS_KEY_ID": s3server.FAKE_ACCESS_KEY,
                  "worker AWS_SECRET_ACCESS_KEY": s3server.FAKE_SECRET_KEY}
NEEDLES = {label: value for label, value in {**SECRETS, **WORKER_SECRETS}.items()}


def leaks(blobs: dict[str, bytes | str]) -> list[str]:
    """``"<where>: <which secret>"`` for every secret (raw or URL-encoded) found in a blob."""
    hits = []
    for where, data in blobs.items():
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
        for label, secret in NEEDLES.items():
            if any(form.encode() in raw for form in {secret, quote(secret, safe="")}):
                hits.append(f"{where}: {label}")
    return hits


def decoded(name: str, data: bytes) -> dict[str, bytes | str]:
    """``data`` plus what compression could hide: a Parquet file's rows (its pages may be compressed)
    and the members of a zip archive (``torch.save`` checkpoints)."""
    import zipfile

    import pyarrow.parquet as pq

    out: dict[str, bytes | str] = {name: data}
    if data[:4] == b"PAR1":
        out[f"{name} (rows)"] = repr(pq.read_table(io.BytesIO(data)).to_pylist())
    elif data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            out.update({f"{name}!{m}": archive.read(m) for m in archive.namelist()})
    return out


def folder_blobs(*folders: Path) -> dict[str, bytes | str]:
    """Every file under ``folders`` (logs, YAML / JSON dumps, Parquet, state.pt, safetensors, ...)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(q for folder in folders for q in Path(folder).rglob("*") if q.is_file()):
        out.update(decoded(str(p), p.read_bytes()))
    return out


def bucket_blobs(client, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    out: dict[str, bytes | str] = {}
    for k in keys:
        out.update(decoded(f"s3://{bucket}/{k}", client.get_object(Bucket=bucket, Key=k)["Body"].read()))
    return out


def error_text(exc: BaseException) -> str:
    """The error as a user sees it: message, chained causes and traceback."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def secret_env(s3_server, monkeypatch, caplog, capfd):
    """The recognisable fake secrets in this process's environment; every log record at INFO and
    above is kept (``caplog``) and the console output captured at the file-descriptor level."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO)
    return caplog


def test_the_search_finds_a_planted_secret(tmp_path):
    """The checker itself: a secret inside a torch checkpoint, URL-encoded in a log, or in Parquet is found."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    torch.save({"note": "key " + SECRETS["AWS_SECRET_ACCESS_KEY"]}, tmp_path / "state.pt")
    (tmp_path / "train.log").write_text("GET ?X-Amz-Credential=" + quote(WORKER_SECRETS["worker AWS_SECRET_ACCESS_KEY"],
                                                                          safe=""))
    pq.write_table(pa.table({"error": ["token " + SECRETS["HF_TOKEN"]] * 50}), tmp_path / "per_image.parquet",
                   compression="gzip")
    (tmp_path / "clean.txt").write_text("nothing here")
    found = leaks(folder_blobs(tmp_path))
    assert any(f.endswith("/state.pt: AWS_SECRET_ACCESS_KEY") for f in found)
    assert any("/state.pt!" in f and f.endswith(": AWS_SECRET_ACCESS_KEY") for f in found)  # the archive's member
    assert any(f.endswith("/train.log: worker AWS_SECRET_ACCESS_KEY") for f in found)  # URL-encoded
    assert any(f.endswith("/per_image.parquet (rows): HF_TOKEN") for f in found)
    assert not any("clean.txt" in f for f in found)


def _saliency_bucket(client, bucket: str) -> str:
    """Three scenes + one corrupt image (a failed row whose error names an s3:// URI) under s3://bucket/sal."""
    from dncut.data.scenes import make_scene

    def png(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    for i in range(3):
        image, mask = make_scene(500 + i, size=64)
        client.put_object(Bucket=bucket, Key=f"sal/images/s{i}.png", Body=png(np.asarray(image)))
        client.put_object(Bucket=bucket, Key=f"sal/masks/s{i}.png", Body=png(np.asarray(mask, np.uint8) * 255))
    client.put_object(Bucket=bucket, Key="sal/images/corrupt.png", Body=b"\x89PNG not really")
    client.put_object(Bucket=bucket, Key="sal/masks/corrupt.png", Body=png(np.full((64, 64), 255, np.uint8)))
    return f"s3://{bucket}/sal"


@pytest.mark.ray
def test_train_eval_and_failing_s3_runs_leak_no_secret(ray_session, s3_server, s3_image_bucket, s3_bucket,
                                                        secret_env, capfd, tmp_path):
    from dncut.cli import main
    from dncut.data.datasets import DatasetLayoutError
    from dncut.eval.jobs import run_evaluation
    from dncut.tracking import Tracker
    from dncut.train import fit

    caplog = secret_env
    errors: dict[str, str] = {}

    # (a) training: images read from S3 by Ray Data tasks (one corrupt file: a logged skip), checkpoints,
    #     config dumps, metrics, TensorBoard, curves, train.log and the export in a local run folder
    cfg = load_config("configs/train/smoke.yaml", [f"output_dir={tmp_path / 'runs'}", f"data.train={s3_image_bucket}",
                                                   "train.max_steps=2", "train.checkpoint_every=2", "train.val_every=2"])
    result = fit(cfg)
    run = Path(cfg.run_dir)
    assert result.error is None and list(run.glob("*/checkpoint_*/state.pt"))
    assert (run / "model.safetensors").exists() and (run / "config.yaml").exists() and (run / "train.log").exists()
    # ... and rank 0's MLflow client in this process, with the tracking password / token in the environment
    mlflow_cfg = cfg.with_overrides({"tracking.mlflow": True, "tracking.tensorboard": False,
                                     "tracking.mlflow_tracking_uri": (tmp_path / "mlruns").as_uri()})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        tracker = Tracker(mlflow_cfg, str(tmp_path / "tracked"))
        tracker.log({"step": 1, "loss": 0.5}, 1)
        tracker.close()

    # (b) evaluation of the exported backbone on a saliency set in S3, read by Ray Data tasks and actors
    root = _saliency_bucket(s3_server.client, s3_bucket.removeprefix("s3://"))
    eval_cfg = load_config("configs/eval/smoke.yaml", [
        f"output_dir={tmp_path / 'eval'}", f"eval.checkpoints=[{run / 'backbone.pth'}]", "eval.examples=1"])
    eval_cfg = eval_cfg.with_overrides({"eval.datasets": [{"name": "s3sal", "kind": "folder", "root": root}]})
    summary = run_evaluation(eval_cfg)
    assert summary["runs"][0]["n_images"] == 4 and summary["runs"][0]["n_failed"] == 1
    per_image = decoded("per_image", (tmp_path / "eval" / eval_cfg.run_name / "per_image.parquet").read_bytes())
    assert "cannot decode" in per_image["per_image (rows)"]  # the corrupt image: a failed row with its reason

    # (c) S3 runs that fail: a training source and an evaluation set in a missing bucket (driver-side
    #     prechecks, through the CLI), and a training whose run folder is in a missing bucket (Ray Train)
    assert main(["train", "--config", "configs/train/smoke.yaml", "--set", f"output_dir={tmp_path / 'fail'}",
                 "--set", "data.train=s3://dncut-secrets-missing/train"]) == 2  # one line, exit 2, before Ray work
    cli_out, cli_err = capfd.readouterr()
    assert "dncut-secrets-missing" in cli_err
    errors["cli train, missing source bucket"] = cli_out + cli_err
    missing_set = eval_cfg.with_overrides({"eval.datasets": [{"name": "gone", "kind": "folder",
                                                              "root": "s3://dncut-secrets-missing/sal"}]})
    with pytest.raises((DatasetLayoutError, OSError)) as info:
        run_evaluation(missing_set)
    errors["eval, missing dataset bucket"] = error_text(info.value)
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever Ray Train raises, its text is checked
        fit(cfg.with_overrides({"output_dir": "s3://dncut-secrets-missing/runs", "train.max_steps": 1}))
    errors["train, run folder in a missing bucket"] = error_text(info.value)

    out, err = capfd.readouterr()
    blobs: dict[str, bytes | str] = {**folder_blobs(tmp_path), **bucket_blobs(s3_server.client, s3_bucket.removeprefix("s3://")),
                                     "stdout": out, "stderr": err, **errors}
    blobs.update({f"log record {i} ({r.name})": r.getMessage() + (r.exc_text or "") for i, r in enumerate(caplog.records)})
    kinds = {Path(k).name for k in blobs}
    assert {"state.pt", "model.safetensors", "backbone.pth", "config.yaml", "train.log", "metrics.jsonl",
            "per_image.parquet", "summary.json"} <= kinds, sorted(kinds)
    assert any(k.endswith("meta.yaml") for k in blobs)  # MLflow's file store
    assert all(errors.values()) and caplog.records
    assert leaks(blobs) == []


def test_verbose_cli_on_a_failing_s3_source_prints_no_secret(s3_server, tmp_path):
    """``dncut -v`` (DEBUG logging) in its own process, the secrets in its environment, on a dataset in a
    missing bucket: the error names the bucket; neither the console nor the traceback holds a secret
    (boto's DEBUG lines carry the request headers, whose Authorization names the access key id).
    ``eval-maps`` checks its folders before it starts Ray, so no second Ray cluster runs here."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **SECRETS}
    missing = "s3://dncut-secrets-missing-cli"
    proc = subprocess.run([sys.executable, "-m", "dncut.cli", "-v", "eval-maps", "--masks", f"{missing}/masks",
                           "--maps", f"{missing}/maps", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "dncut-secrets-missing-cli" in proc.stderr + proc.stdout
    assert leaks({"stdout": proc.stdout, "stderr": proc.stderr}) == []
