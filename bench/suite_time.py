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

``--no-run`` parses again the logs of the run that ``bench/results/suite_time.json`` records.

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
DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(.+?)\s*$")  # ids may hold spaces
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?).*) in ([\d.]+)s")


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
    suite = logged(log, rc=rc, wall_s=round(time.monotonic() - start, 1))
    print(json.dumps({"suite": str(where), **{k: suite[k] for k in ("rc", "wall_s", "summary")}}), flush=True)
    return suite


def logged(log: Path, rc: int | None = None, wall_s: float | None = None) -> dict:
    """A suite's record from its log: pytest's summary line and the seconds per test id."""
    seconds, summary = parse(log.read_text())
    return {"rc": rc, "wall_s": wall_s, "summary": summary, "log": str(log), "tests_listed": len(seconds),
            "seconds": {k: round(v, 2) for k, v in sorted(seconds.items())}}


def compare(head: dict[str, float], ref: dict[str, float]) -> dict:
    """The tests whose id both suites hold (their seconds in each) and each suite's other tests."""
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
    parser.add_argument("--ref", help="the earlier commit (any git revision)")
    parser.add_argument("--logs", default="/tmp", help="folder for the two pytest logs")
    parser.add_argument("--no-run", action="store_true",
                        help="parse again the two logs of the run recorded in bench/results/suite_time.json "
                             "(its commits, exit codes and wall seconds kept) instead of running the suites")
    args = parser.parse_args(argv)

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()

    if args.no_run:
        return reparse()
    if not args.ref:
        parser.error("--ref is required (or --no-run)")
    try:
        ref = git("rev-parse", "--short", f"{args.ref}^{{commit}}")
    except subprocess.CalledProcessError:
        parser.error(f"--ref {args.ref}: not a commit of this repository")
    pins = lambda text: {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}  # noqa: E731
    try:
        theirs = git("show", f"{ref}:constraints.txt")
    except subprocess.CalledProcessError:
        parser.error(f"{ref} has no constraints.txt: its environment is unknown")
    other = sorted(pins(theirs) - pins((ROOT / "constraints.txt").read_text()))
    if other:
        parser.error(f"{ref} pins what this checkout does not ({', '.join(other[:5])}): its suite would run on "
                     "this checkout's environment")
    logs = Path(args.logs)
    if git("status", "--porcelain", "--untracked-files=no"):
        parser.error("this checkout has uncommitted changes: commit them, so that 'head' names what ran")
    head_commit = git("rev-parse", "--short", "HEAD")
    tree = ROOT.parent / f"dncut-suite-{ref}"
    git("worktree", "prune")
    if tree.exists():
        parser.error(f"{tree} exists: remove it (git worktree remove --force {tree})")
    git("worktree", "add", "--detach", str(tree), ref)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        head = run_suite(ROOT, env, logs / "suite_time_head.log")
        old = run_suite(tree, {**env, "PYTHONPATH": str(tree)}, logs / "suite_time_ref.log")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    result = {"bench": "suite_time", "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
              "head": head_commit, "ref": ref, "command": " ".join(["python", *PYTEST]),
              "suites": {"head": head, "ref": old}}
    return write(result)


def reparse() -> dict:
    """The recorded run's logs parsed again (its commits, exit codes and wall seconds kept)."""
    result = json.loads(RESULTS.read_text())
    for suite in result["suites"].values():
        suite.update({k: v for k, v in logged(Path(suite["log"])).items() if k not in ("rc", "wall_s")})
    return write(result)


def write(result: dict) -> dict:
    head, ref = result["suites"]["head"], result["suites"]["ref"]
    for name, suite in (("head", head), ("ref", ref)):
        if suite["summary"] is None or not suite["seconds"]:
            raise SystemExit(f"the {name} suite left no summary or durations ({suite['log']}): nothing to compare")
    result["compared"] = compare(head["seconds"], ref["seconds"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("head", "ref", "compared")}))
    return result


if __name__ == "__main__":
    main()
