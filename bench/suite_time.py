"""Whole test suite, this checkout against an earlier commit, back to back on one machine.

    flock /tmp/dncut-ray.lock .venv/bin/python bench/suite_time.py --ref 04fb7f7
    # -> bench/results/suite_time.json

Runs ``python -m pytest -q -p no:cacheprovider --durations=0`` (what ``make test`` runs, with every
duration listed) twice, one after the other, with this checkout's interpreter:

* ``head``: the suite of this checkout, in place;
* ``ref``: the suite of ``--ref``, checked out with ``git worktree`` beside the repository (so that
  ``../shared`` is the same folder for both), imported from there (``PYTHONPATH``). Every pin of the
  ref's ``constraints.txt`` must be one of this checkout's (this checkout may add packages); the
  script refuses otherwise, since both suites run on this checkout's environment.

A suite's time on a 2-core machine moves by ~20 % from one run to the next, so the two are only
compared within one run of this script. Per suite: pytest's exit code, its summary line, wall
seconds, and per test id (setup + call + teardown, pytest's ``--durations=0``; durations under
5 ms are not listed by pytest) the seconds. Compared: the tests whose id is in both suites (their
seconds in each), and the seconds of each suite's tests that the other lacks.
Findings: docs/benchmarks.md ("The suite's time").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "suite_time.json"
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0"]
DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*) in ([\d.]+)s")


def parse(log: str) -> tuple[dict[str, float], str | None]:
    """``({test id: seconds}, summary line)`` of a ``--durations=0`` log."""
    seconds: dict[str, float] = collections.defaultdict(float)
    summary = None
    for line in log.splitlines():
        if m := DURATION.match(line):
            seconds[m.group(3)] += float(m.group(1))
        elif m := SUMMARY.match(line):
            summary = m.group(1)
    return dict(seconds), summary


def run_suite(where: Path, env: dict[str, str], log: Path) -> dict:
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, *PYTEST], cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = round(time.monotonic() - start, 1)
    seconds, summary = parse(log.read_text())
    print(json.dumps({"suite": str(where), "rc": rc, "wall_s": wall, "summary": summary}), flush=True)
    return {"rc": rc, "wall_s": wall, "summary": summary, "log": str(log), "tests_listed": len(seconds),
            "seconds": {k: round(v, 2) for k, v in sorted(seconds.items())}}


def compare(head: dict[str, float], ref: dict[str, float]) -> dict:
    common = sorted(set(head) & set(ref))
    return {"common_tests": len(common),
            "common_head_s": round(sum(head[k] for k in common), 1),
            "common_ref_s": round(sum(ref[k] for k in common), 1),
            "only_head_tests": len(set(head) - set(ref)),
            "only_head_s": round(sum(v for k, v in head.items() if k not in ref), 1),
            "only_ref_tests": len(set(ref) - set(head)),
            "only_ref_s": round(sum(v for k, v in ref.items() if k not in head), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--logs", default="/tmp", help="folder for the two pytest logs")
    args = parser.parse_args(argv)

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()

    ref = git("rev-parse", "--short", args.ref)
    pins = lambda text: {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}  # noqa: E731
    other = sorted(pins(git("show", f"{ref}:constraints.txt")) - pins((ROOT / "constraints.txt").read_text()))
    if other:
        parser.error(f"{ref} pins what this checkout does not ({', '.join(other[:5])}): its suite would run on "
                     "this checkout's environment")
    tree = ROOT.parent / f"dncut-suite-{ref}"
    if not tree.exists():
        git("worktree", "add", "--detach", str(tree), ref)
    logs = Path(args.logs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        head = run_suite(ROOT, env, logs / "suite_time_head.log")
        old = run_suite(tree, {**env, "PYTHONPATH": str(tree)}, logs / "suite_time_ref.log")
    finally:
        git("worktree", "remove", "--force", str(tree))
    result = {"bench": "suite_time", "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
              "head": git("rev-parse", "--short", "HEAD"), "ref": ref, "command": " ".join(["python", *PYTEST]),
              "suites": {"head": head, "ref": old},
              "compared": compare(head["seconds"], old["seconds"])}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("head", "ref", "compared")}))
    return result


if __name__ == "__main__":
    main()
