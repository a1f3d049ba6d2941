"""A user's first minutes: mistakes caught before Ray starts, a quiet console, discovery without YAML.

* Mistakes (``dncut.checks`` via ``dncut.cli.precheck``): exit code 2, one line naming the input,
  no traceback, seconds not minutes, and Ray never started (``RAY_ADDRESS`` points at a closed port,
  and the in-process case asserts ``ray.is_initialized()`` stays false).
* ``dncut -q eval-saliency`` on 6 images prints at most 10 lines and none of Ray Data's (Ray).
* ``dncut eval-discovery`` on a 2-image COCO JSON prints CorLoc per method (Ray: the session's cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import first_minutes  # noqa: E402  (bench/first_minutes.py: the same mistakes, timed)

FAST_S = 30  # a caught mistake: imports + the check, no Ray (a loaded 2-core box: ~5-13 s)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("first-minutes")
    first_minutes.scratch(root)
    return root


FAST_CASES = [c for c in first_minutes.CASES if c[0] not in ("eval dataset root missing", "--voc not a VOC root")]
SUBPROCESS_CASES = {"S3 --images without credentials", "S3 endpoint unreachable", "--images folder misspelt"}
"""Run each in its own interpreter, as a user does (the S3 cases: boto3's credential chain starts
fresh); the other cases run one after another in one interpreter (``run_cases_in_one_process``)."""


@pytest.fixture(scope="module")
def in_one_process(work) -> dict[str, dict]:
    cases = [c for c in FAST_CASES if c[0] not in SUBPROCESS_CASES]
    return {" ".join(c[1]): row for c, row in zip(cases, first_minutes.run_cases_in_one_process(work, cases))}


@pytest.mark.parametrize("mistake, argv, env", FAST_CASES, ids=[f"{c[1][0]}: {c[0]}" for c in FAST_CASES])
def test_a_mistake_is_one_line_exit_2_before_ray(work, in_one_process, mistake, argv, env):
    if mistake in SUBPROCESS_CASES:
        row = first_minutes.run_case(work, mistake, argv, env)
    else:
        row = in_one_process[" ".join(argv)]
    assert row["exit_code"] == 2, row
    assert row["ok"], row  # one line on stderr, no traceback
    assert row["seconds"] < FAST_S, row
    assert row["message"].startswith(f"dncut {argv[0]}: "), row
    assert "127.0.0.1:9" not in row["message"], "got past the checks and reached Ray"
    names = {a for a in argv if a.startswith("--") and a not in ("--config", "--set")}
    keys = [a.split("=")[0] for a in argv if "=" in a]
    names |= set(keys) | {k.split(".")[0] + "." for k in keys} | {argv[1]}  # --set keys or their section; RUN
    assert any(name in row["message"] for name in names), (names, row)  # the input is named


IN_PROCESS = """
import contextlib, io, json, sys
import ray
from dncut.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append({"rc": rc, "err": err.getvalue(), "ray": ray.is_initialized()})
print(json.dumps(out))
"""


def test_in_process_main_returns_2_and_ray_never_starts(tmp_path):
    """``dncut.cli.main`` called in a Python process (a fresh one: no other test's Ray session in it)
    returns 2 on bad input and never initialises Ray."""
    runs = [["eval-saliency", "--images", str(tmp_path / "nope"), "--masks", str(tmp_path), "--out",
             str(tmp_path / "out")],
            ["eval-discovery", "--images", str(tmp_path), "--annotations", str(tmp_path / "instances.json"),
             "--out", str(tmp_path / "out")]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saliency, discovery = json.loads(proc.stdout.splitlines()[-1])
    assert saliency["rc"] == 2 and not saliency["ray"]
    assert "--images" in saliency["err"] and "no such folder" in saliency["err"] and "Traceback" not in saliency["err"]
    assert discovery["rc"] == 2 and not discovery["ray"] and "--annotations" in discovery["err"]


def test_not_a_run_folder(work):
    row = first_minutes.run_case(work, "export", ["export", "notrun"], None)
    assert row["exit_code"] == 2 and "not a run folder" in row["message"], row


# ============================================================================ Ray: console and discovery
def _dncut(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dncut.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.ray
def test_quiet_eval_saliency_prints_only_the_result(tmp_path):
    from dncut.data.scenes import make_scene

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(6):
        image, mask = make_scene(900 + i, size=64)
        image.save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"s{i}.png")
    proc = _dncut(tmp_path, "-q", "eval-saliency", "--images", "images", "--masks", "masks", "--backbone",
                  "vit_tiny_test", "--method", "simple", "--out", "out", "--set", "eval.image_size=64",
                  "--set", "model.pretrained=false")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 10, lines
    assert not [line for line in lines if "streaming_executor" in line or "Progress bars" in line], lines
    assert not [line for line in lines if "Warning" in line or "core_worker" in line], lines  # e.g. Ray's deprecations
    assert any(line.startswith("| simple") for line in lines), lines
    log = (tmp_path / "out" / "dncut.log").read_text()
    assert "Starting execution of Dataset" in log  # Ray Data's own lines: in the output folder's log


def _coco(root: Path, n: int = 2) -> Path:
    from dncut.data.scenes import make_scene

    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        image, mask = make_scene(700 + i, size=64)
        image.save(root / "images" / f"c{i}.jpg")
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        images.append({"id": i + 1, "file_name": f"c{i}.jpg", "width": 64, "height": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": 1.0,
                            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


@pytest.mark.ray
def test_eval_discovery_from_the_command_line_prints_corloc_per_method(ray_session, tmp_path):
    """The command joins the session's cluster (``--address``, as a driver joins a running cluster;
    the quiet test above starts a local Ray as a first run does), whose workers run in another
    working directory: the relative ``--images`` and ``--out`` must reach them resolved."""
    annotations = _coco(tmp_path / "set")
    address = ray_session.get_runtime_context().gcs_address
    proc = _dncut(tmp_path, "-q", "eval-discovery", "--images", "set/images", "--annotations", str(annotations),
                  "--backbone", "vit_tiny_test", "--set", "model.pretrained=false", "--out", "disc", "--limit", "2",
                  "--address", address)
    assert proc.returncode == 0, proc.stderr
    assert "CorLoc" in proc.stdout
    for method in ("simple", "tokencut", "most"):
        assert any(line.startswith(f"| {method} |") for line in proc.stdout.splitlines()), proc.stdout
    summary = json.loads((tmp_path / "disc" / "summary.json").read_text())
    runs = summary["runs"]
    assert {r["method"] for r in runs} >= {"simple", "tokencut", "most"}
    assert all(r["n_images"] == 2 and r["n_failed"] == 0 for r in runs), runs  # the workers found the images
    rows = pq.read_table(tmp_path / "disc" / "per_image.parquet").to_pylist()
    assert len(rows) == 2 * len(runs) and {r["status"] for r in rows} == {"ok"}, rows  # every part where it belongs


def test_eval_discovery_missing_annotations_fails_before_ray(tmp_path):
    _coco(tmp_path / "set")
    start = time.perf_counter()
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dncut.cli", "eval-discovery", "--images", "set/images",
                           "--annotations", "set/missing.json", "--out", "disc"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - start < FAST_S
    assert proc.stderr.strip().splitlines() == [
        "dncut eval-discovery: --annotations set/missing.json does not exist; give a COCO instances JSON"]
    assert not (tmp_path / "disc").exists()


def test_partly_paired_folders_run_and_say_how_many_images_lack_a_mask(tmp_path, caplog):
    """Some images without a mask (and a mask without an image) are failed rows of the run, announced
    before it with their counts; none paired at all is the mistake above."""
    import logging

    from dncut import checks

    images = [str(tmp_path / "im" / f"{n}.jpg") for n in ("a", "b", "c")]
    masks = [str(tmp_path / "gt" / f"{n}.png") for n in ("a", "b", "z")]
    with caplog.at_level(logging.WARNING, logger="dncut.checks"):
        checks.check_saliency_pairs(str(tmp_path / "im"), images, str(tmp_path / "gt"), masks)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 3 images have no mask of their stem and 1 masks no image: each is a failed row of the run (e.g. c)"]
    with pytest.raises(checks.InputError, match="none of the 3 images"):
        checks.check_saliency_pairs(str(tmp_path / "im"), images, str(tmp_path / "gt"),
                                    [str(tmp_path / "gt" / f"{n}_mask.png") for n in ("a", "b", "c")])
