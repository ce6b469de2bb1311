#!/usr/bin/env python3
"""Restart latency: with 10 programs running, update one document 50 times.

For each update: milliseconds from the return of the write (PUT) to the new code's first
action (its main() records time.time() in a file). Also counts how many of the other 9
programs were restarted (must be 0). The last line of output is one JSON object.

Run: .venv/bin/python bench/latency.py [--updates 50] [--programs 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import MACID, percentile, server_and_daemon
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


def program(folder: Path, label: str, version: int) -> str:
    return PROGRAM.format(folder=str(folder), label=label, version=version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--programs", type=int, default=10)
    args = parser.parse_args()

    with server_and_daemon(log_level="INFO") as (admin, daemon, tmp_path):
        markers = tmp_path / "markers"
        markers.mkdir()
        labels = [f"p{i}" for i in range(args.programs)]
        for label in labels:
            admin.put({"_id": label, "type": MACID, "code": program(markers, label, 0)})
        daemon.start()
        wait_for(lambda: len(list(markers.glob("p*-0-*[0-9]"))) == len(labels), timeout=60,
                 message="all programs to start")
        daemon.wait_log("following changes", timeout=30)
        target, others = labels[0], labels[1:]
        latencies = []
        for version in range(1, args.updates + 1):
            admin.put({"_id": target, "type": MACID, "code": program(markers, target, version)})
            written = time.time()
            found = wait_for(lambda: list(markers.glob(f"{target}-{version}-*[0-9]")), timeout=30, interval=0.001,
                             message=f"version {version} to run")
            latencies.append((float(found[0].read_text()) - written) * 1000.0)
        time.sleep(0.5)
        restarted_others = sum(len(list(markers.glob(f"{label}-*[0-9]"))) > 1 for label in others)

    result = {
        "benchmark": "restart_latency",
        "programs": args.programs,
        "updates": args.updates,
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "other_programs_restarted": restarted_others,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
