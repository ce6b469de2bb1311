#!/usr/bin/env python3
"""Memory: total PSS of the daemon, the fork server and the programs, in each spawn mode.

PSS (proportional set size, from /proc/PID/smaps_rollup) shares each page among the processes
that map it, so the sum is what the whole costs. Measured with 1, 10 and 30 programs, each
trivial (waits to be stopped) or calling get_database() first (the database client: pycouchdb,
requests). `per_extra_program_mb` is (PSS at 30 - PSS at 1) / 29. The last line of output is
one JSON object.

Run: .venv/bin/python bench/memory.py [--counts 1,10,30] [--modes fork-server,exec]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import MACID, daemon_on, modes_argument, test_server
from support import wait_for

from himbeerecouch.processes import descendants

PROGRAMS = {
    "trivial": "",
    "get_database": "    get_database()\n",
}
CODE = '''
import os, threading
def main():
{setup}    open(os.path.join({folder!r}, "{label}-" + str(os.getpid())), "w").close()
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''
GOAL_PER_EXTRA_MB = 6.0


def pss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0                                  # gone meanwhile


def total_mb(pid: int) -> tuple[float, int]:
    pids = [pid] + descendants(pid)
    return round(sum(pss_kb(p) for p in pids) / 1024, 1), len(pids)


def measure(server, tmp_path: Path, mode: str, kind: str, counts: list[int]) -> dict:
    figures = {}
    with daemon_on(server, tmp_path, f"{mode}-{kind}", log_level="INFO", spawn=mode) as (admin, daemon, folder):
        markers = folder / "markers"
        markers.mkdir()
        daemon.start()
        daemon.wait_log("following changes", timeout=30)
        made = 0
        for count in counts:
            for index in range(made, count):
                code = CODE.format(setup=PROGRAMS[kind], folder=str(markers), label=f"p{index}")
                admin.put({"_id": f"p{index}", "type": MACID, "code": code})
            made = count
            wait_for(lambda: len(list(markers.iterdir())) >= count, timeout=120,
                     message=f"{count} programs to run")
            time.sleep(2.0)                   # let them settle (imports done, pages touched)
            mb, processes = total_mb(daemon.process.pid)
            figures[str(count)] = {"total_pss_mb": mb, "processes": processes}
            print(f"{mode} {kind} {count}: {mb} MB in {processes} processes", file=sys.stderr)
    low, high = min(counts), max(counts)
    if high > low:
        figures["per_extra_program_mb"] = round(
            (figures[str(high)]["total_pss_mb"] - figures[str(low)]["total_pss_mb"]) / (high - low), 2)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,30")
    modes_argument(parser)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    result: dict = {"benchmark": "memory", "counts": counts, "goal_per_extra_program_mb": GOAL_PER_EXTRA_MB}
    with test_server() as (server, tmp_path):
        for mode in args.modes.split(","):
            result[mode] = {kind: measure(server, tmp_path, mode, kind, counts) for kind in PROGRAMS}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
