"""First minutes of a user: common mistakes x command, each run as the user runs it, timed.

    .venv/bin/python bench/first_minutes.py     # -> bench/results/first_minutes.json + a Markdown table

Each case is a subprocess ``python -m dncut.cli ...`` in a scratch folder (images, masks, an empty
folder, a file, a folder that is not a run). ``RAY_ADDRESS`` points at a closed port: a mistake that
got past the checks of ``dncut.checks`` would reach Ray and fail with a connection error instead of
the expected message (so "caught before Ray" is what the table shows). S3 cases clear the AWS
variables; the unreachable-endpoint case sets fake keys and an endpoint on a closed port.

Each row: command, mistake, seconds to the error, exit code, the message (first line of stderr),
and whether it is a one-line message with exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TIMEOUT_S = 120
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def scratch(root: Path) -> None:
    """images/ + masks/ (2 pairs), masks_renamed/ (the masks as <stem>_mask.png), empty/, a_file.txt, notrun/ (a folder with one image), val_no_masks/,
    earlier_pred/ (an earlier ``dncut predict``'s predictions.parquet and masks/)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "masks_renamed", "empty", "notrun", "val_no_masks/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(
            root / "masks_renamed" / f"{name}_mask.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "val_no_masks/images/a.jpg")
    (root / "notrun" / "notes.txt").write_text("not a run\n")
    (root / "a_file.txt").write_text("x\n")
    (root / "earlier_pred" / "masks" / "simple").mkdir(parents=True, exist_ok=True)
    (root / "earlier_pred" / "predictions.parquet").write_bytes(b"PAR1")


SAL = ["eval-saliency", "--images", "images", "--masks", "masks", "--out", "out"]
CASES: list[tuple[str, list[str], dict[str, str] | None]] = [
    ("--images folder misspelt", ["eval-saliency", "--images", "imgaes", "--masks", "masks", "--out", "out"], None),
    ("--masks folder empty", ["eval-saliency", "--images", "images", "--masks", "empty", "--out", "out"], None),
    ("masks named unlike the images", ["eval-saliency", "--images", "images", "--masks", "masks_renamed",
                                       "--out", "out"], None),
    ("--images is a file", ["eval-saliency", "--images", "a_file.txt", "--masks", "masks", "--out", "out"], None),
    ("--checkpoint missing", [*SAL, "--checkpoint", "runs/x/backbone.pth"], None),
    ("backbone without downloadable weights, no checkpoint", [*SAL, "--backbone", "vit_tiny_test"], None),
    ("--out below a file", ["eval-saliency", "--images", "images", "--masks", "masks", "--out", "a_file.txt/out"],
     None),
    ("S3 --images without credentials", ["eval-saliency", "--images", "s3://bucket/images", "--masks", "masks",
                                         "--out", "out"], {"AWS_EC2_METADATA_DISABLED": "true"}),
    ("S3 endpoint unreachable", ["predict", "--images", "s3://bucket/images", "--out", "out"],
     {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}),
    ("--images folder empty", ["predict", "--images", "empty", "--out", "out"], None),
    ("--out holds an earlier prediction", ["predict", "--images", "images", "--out", "earlier_pred"], None),
    ("--masks missing", ["eval-maps", "--masks", "gt", "--maps", "masks", "--out", "out"], None),
    ("--maps folder empty", ["eval-maps", "--masks", "masks", "--maps", "empty", "--out", "out"], None),
    ("not a run folder", ["export", "notrun"], None),
    ("not a run folder", ["report", "notrun"], None),
    ("data.train missing", ["train", "--config", "smoke", "--set", "data.train=imagenet/train"], None),
    ("model.checkpoint missing", ["train", "--config", "smoke", "--set", "model.checkpoint=dino.pth"], None),
    ("data.val without masks/", ["train", "--config", "smoke", "--set", "data.val=val_no_masks"], None),
    ("config key misspelt", ["train", "--config", "smoke", "--set", "train.max_step=5"], None),
    ("data.train missing", ["found-train", "--config", "found/bsds", "--set", "data.train=bsds/train"], None),
    ("eval.checkpoints entry missing", ["eval", "--config", "smoke", "--set", "eval.checkpoints=[runs/a.pth]"], None),
    ("eval dataset root missing", ["eval", "--config", "smoke", "--set",
                                   "eval.datasets=[{name: ECSSD, kind: ecssd, root: data/ECSSD}]"], None),
    ("method found without heads", ["eval", "--config", "smoke", "--set", "eval.methods=[found]"], None),
    ("--annotations missing", ["eval-discovery", "--images", "images", "--annotations", "instances.json",
                               "--out", "out"], None),
    ("--images without --annotations", ["eval-discovery", "--images", "images", "--out", "out"], None),
    ("--voc not a VOC root", ["eval-discovery", "--voc", "images", "--out", "out"], None),
]


def run_case(work: Path, mistake: str, argv: list[str], env_extra: dict[str, str] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env.update({"RAY_ADDRESS": "127.0.0.1:9", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                "AWS_SHARED_CREDENTIALS_FILE": str(work / "none"), "AWS_CONFIG_FILE": str(work / "none")})
    env.update(env_extra or {})
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "dncut.cli", *argv], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        code, out, err = None, "", f"timed out after {TIMEOUT_S} s"
    return _row(mistake, argv, time.perf_counter() - start, code, out, err)


def _row(mistake: str, argv: list[str], seconds: float, code, out: str, err: str) -> dict:
    lines = [line for line in err.splitlines() if line.strip()]
    return {"command": argv[0], "mistake": mistake, "argv": " ".join(argv), "seconds": round(seconds, 2),
            "exit_code": code, "message": lines[0] if lines else "", "stderr_lines": len(lines),
            "ok": code == 2 and len(lines) == 1 and "Traceback" not in err + out}


def run_cases_in_one_process(work: Path, cases: list[tuple[str, list[str], dict[str, str] | None]]) -> list[dict]:
    """The ``cases`` run one after another by ``dncut.cli.main`` inside one subprocess (the
    environment of ``run_case``, a case's own variables set for that case only): one interpreter
    start for all, so a row's seconds leave out the imports. An exception that escapes ``main`` is a
    traceback on the row's stderr (so the row is not ``ok``)."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env.update({"RAY_ADDRESS": "127.0.0.1:9", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                "AWS_SHARED_CREDENTIALS_FILE": str(work / "none"), "AWS_CONFIG_FILE": str(work / "none")})
    proc = subprocess.run([sys.executable, __file__, "--in-process"], input=json.dumps(cases), cwd=work, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if len(rows) != len(cases):
        raise RuntimeError(f"{len(rows)} of {len(cases)} cases ran (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return rows


def _in_process_child() -> int:
    """``--in-process``: read the cases (JSON) from stdin, run each with ``dncut.cli.main``, print rows."""
    import contextlib
    import io
    import logging
    import traceback

    from dncut.cli import main as dncut_main

    for mistake, argv, env_extra in json.loads(sys.stdin.read()):
        saved = {k: os.environ.get(k) for k in env_extra or {}}
        os.environ.update(env_extra or {})
        out, err = io.StringIO(), io.StringIO()
        for handler in list(logging.root.handlers):  # basicConfig binds the stderr of its first call
            logging.root.removeHandler(handler)
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = dncut_main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - reported on the row as a traceback
                code = 1
                traceback.print_exc()
        seconds = time.perf_counter() - start
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        print("ROW " + json.dumps(_row(mistake, argv, seconds, code, out.getvalue(), err.getvalue())), flush=True)
    return 0


def markdown(rows: list[dict]) -> str:
    head = ["| command | mistake | s | exit | one line, no traceback | message |", "|---|---|---:|---:|---|---|"]
    return "\n".join(head + [f"| {r['command']} | {r['mistake']} | {r['seconds']:.1f} | {r['exit_code']} | "
                             f"{'yes' if r['ok'] else 'NO'} | {r['message'].replace('|', '/')} |" for r in rows])


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dncut-first-minutes-") as tmp:
        work = Path(tmp)
        scratch(work)
        rows = [run_case(work, mistake, argv, env) for mistake, argv, env in CASES]
    result = {"bench": "first_minutes", "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "cases": len(rows), "all_ok": all(r["ok"] for r in rows),
              "max_seconds": max(r["seconds"] for r in rows), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_minutes.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} caught before Ray with exit code 2 and one line; "
          f"slowest {result['max_seconds']:.1f} s")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(_in_process_child() if sys.argv[1:] == ["--in-process"] else main())
