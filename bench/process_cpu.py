"""CPU seconds of a command and of every process that runs while it runs, grouped by what the
process is (Ray's process titles: ``ray::RayTrainWorker``, ``ray::TrainController``, ...).

    flock /tmp/dncut-ray.lock .venv/bin/python bench/process_cpu.py --key suite -- \
        .venv/bin/python -m pytest -q -p no:cacheprovider --durations=40

Every ``--interval`` s the script reads ``/proc/<pid>/stat`` (user + system time) and
``/proc/<pid>/cmdline`` of every process, keeping each process's last title (Ray renames a worker
when it becomes an actor), and ``/proc/stat`` for the machine's idle share. A process that existed
before the command counts only the CPU it used after; one that lived less than an interval is missed
(its CPU is in no group). Ray's pooled workers show as ``ray::IDLE`` once a task ended; workers
whose title was never read are ``ray worker (untitled)``.

Writes ``bench/results/process_cpu.json`` under ``--key`` (other keys kept): the command, its exit
code and wall time, the machine's idle share, and per group the processes and CPU seconds, largest
first. Findings: docs/benchmarks.md ("Where the suite's CPU goes").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "process_cpu.json"
TICK = os.sysconf("SC_CLK_TCK")


def _group(cmdline: str) -> str:
    """The group of a process: Ray's title (``ray::Name``, its method dropped), else the program and
    its first argument."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]
    if "default_worker.py" in cmdline:
        return "ray worker (untitled)"
    words = cmdline.split()
    if not words:
        return "(no command line: kernel threads, exited)"
    return " ".join(Path(w).name if i == 0 or "/" in w else w for i, w in enumerate(words[:3]))


def _machine_busy() -> tuple[int, int]:
    """``(idle, total)`` jiffies of all CPUs since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait


class Sampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.seen: dict[tuple[int, int], list] = {}  # (pid, start time) -> [title, cpu at first sight, last cpu]
        self.me = os.getpid()
        self.first = True

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.me:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                cpu = (int(fields[11]) + int(fields[12])) / TICK
                title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            key = (int(entry), int(fields[19]))
            if key not in self.seen:
                self.seen[key] = [title, cpu if self.first else 0.0, cpu]
            else:
                self.seen[key][2] = cpu
                if title:
                    self.seen[key][0] = title
        self.first = False

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()

    def groups(self) -> list[dict]:
        out: dict[str, dict] = {}
        for title, base, last in self.seen.values():
            g = out.setdefault(_group(title), {"group": _group(title), "processes": 0, "cpu_s": 0.0})
            g["processes"] += 1
            g["cpu_s"] += last - base
        rows = [g for g in out.values() if g["cpu_s"] >= 0.05]
        for g in rows:
            g["cpu_s"] = round(g["cpu_s"], 1)
        return sorted(rows, key=lambda g: -g["cpu_s"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: process_cpu.py [--key K] [--interval S] -- COMMAND ...")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", default="default")
    p.add_argument("--interval", type=float, default=1.0)
    args, command = p.parse_args(argv[:split]), argv[split + 1:]
    sampler = Sampler(args.interval)
    idle0, total0 = _machine_busy()
    start = time.monotonic()
    sampler.start()
    rc = subprocess.call(command)
    wall = time.monotonic() - start
    sampler.stop.set()
    sampler.join()
    idle1, total1 = _machine_busy()
    groups = sampler.groups()
    result = {"command": command, "rc": rc, "wall_s": round(wall, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "idle_share": round((idle1 - idle0) / max(total1 - total0, 1), 3),
              "cpu_s_total": round(sum(g["cpu_s"] for g in groups), 1), "groups": groups}
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[args.key] = result
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    for g in groups[:25]:
        print(f"{g['cpu_s']:8.1f} s  {g['processes']:4d}  {g['group']}")
    print(f"wall {result['wall_s']} s, idle {result['idle_share']:.1%}, rc {rc}; {RESULTS} [{args.key}]")
    return rc


if __name__ == "__main__":
    sys.exit(main())
