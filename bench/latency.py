#!/usr/bin/env python3
"""Restart latency: with 10 programs running, update one document 50 times, in each spawn mode.

For each update: milliseconds from the return of the write (PUT) to the new code's first
action (its main() records time.time() in a file). Also counts how many of the other 9
programs were restarted (must be 0). Both modes (spawn = fork-server and exec) run against one
test server, one after the other. The last line of output is one JSON object.

Run: .venv/bin/python bench/latency.py [--updates 50] [--programs 10] [--modes fork-server,exec]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import MACID, daemon_on, modes_argument, percentile, test_server
from support import wait_for

PROGRAM = '''
import os, threading, time
def main():
    stamp = time.time()            # the first action of this version of the code
    path = os.path.join({folder!r}, "{label}-{version}-" + str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        f.write(repr(stamp))
    os.rename(path + ".tmp", path)         # the reader never sees it half-written
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''
GOAL = {"fork-server": {"p50_ms": 20.0, "p99_ms": 60.0}}


def program(folder: Path, label: str, version: int) -> str:
    return PROGRAM.format(folder=str(folder), label=label, version=version)


def measure(server, tmp_path: Path, mode: str, programs: int, updates: int) -> dict:
    with daemon_on(server, tmp_path, mode, log_level="INFO", spawn=mode) as (admin, daemon, folder):
        markers = folder / "markers"
        markers.mkdir()
        labels = [f"p{i}" for i in range(programs)]
        for label in labels:
            admin.put({"_id": label, "type": MACID, "code": program(markers, label, 0)})
        daemon.start()
        wait_for(lambda: len(list(markers.glob("p*-0-*[0-9]"))) == len(labels), timeout=60,
                 message="all programs to start")
        daemon.wait_log("following changes", timeout=30)
        target, others = labels[0], labels[1:]
        latencies = []
        for version in range(1, updates + 1):
            admin.put({"_id": target, "type": MACID, "code": program(markers, target, version)})
            written = time.time()
            found = wait_for(lambda: list(markers.glob(f"{target}-{version}-*[0-9]")), timeout=30,
                             interval=0.001, message=f"version {version} to run")
            latencies.append((float(found[0].read_text()) - written) * 1000.0)
        time.sleep(0.5)
        restarted_others = sum(len(list(markers.glob(f"{label}-*[0-9]"))) > 1 for label in others)
        used = f", {mode})" in daemon.log()
    return {
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "other_programs_restarted": restarted_others,
        "mode_used": used,               # the log says the programs started this way
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--programs", type=int, default=10)
    modes_argument(parser)
    args = parser.parse_args()
    result: dict = {"benchmark": "restart_latency", "programs": args.programs, "updates": args.updates}
    with test_server() as (server, tmp_path):
        for mode in args.modes.split(","):
            result[mode] = measure(server, tmp_path, mode, args.programs, args.updates)
            print(f"{mode}: {json.dumps(result[mode])}", file=sys.stderr)
    for mode, goal in GOAL.items():
        if mode in result:
            result[mode]["goal_met"] = all(result[mode][key] <= value for key, value in goal.items())
    result["goal"] = GOAL
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
