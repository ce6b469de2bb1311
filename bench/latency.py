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
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import AdminClient, CouchServer, DaemonProcess, free_port, wait_for  # noqa: E402

MACID = 202481596538417

PROGRAM = '''
import os, threading, time
def main():
    stamp = time.time()            # the first action of this version of the code
    with open(os.path.join({folder!r}, "{label}-{version}-" + str(os.getpid())), "w") as f:
        f.write(repr(stamp))
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


def program(folder: Path, label: str, version: int) -> str:
    return PROGRAM.format(folder=str(folder), label=label, version=version)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--programs", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hc-bench-") as tmp:
        tmp_path = Path(tmp)
        markers = tmp_path / "markers"
        markers.mkdir()
        server = CouchServer(free_port(), tmp_path / "server.log")
        server.start()
        daemon = None
        try:
            admin = AdminClient(server.url, f"bench_{uuid.uuid4().hex[:8]}")
            admin.create_db()
            labels = [f"p{i}" for i in range(args.programs)]
            for label in labels:
                admin.put({"_id": label, "type": MACID, "code": program(markers, label, 0)})
            (tmp_path / "daemon").mkdir()
            daemon = DaemonProcess(tmp_path / "daemon", server.admin_url, admin.db, MACID,
                                   log_level="INFO", feed_heartbeat_seconds=10, status_interval_seconds=30)
            daemon.start()
            wait_for(lambda: len(list(markers.iterdir())) == len(labels), timeout=60,
                     message="all programs to start")
            daemon.wait_log("following changes", timeout=30)
            target, others = labels[0], labels[1:]
            latencies = []
            for version in range(1, args.updates + 1):
                admin.put({"_id": target, "type": MACID, "code": program(markers, target, version)})
                written = time.time()
                found = wait_for(lambda: list(markers.glob(f"{target}-{version}-*")), timeout=30, interval=0.001,
                                 message=f"version {version} to run")
                latencies.append((float(found[0].read_text()) - written) * 1000.0)
            time.sleep(0.5)
            restarted_others = sum(len(list(markers.glob(f"{label}-*"))) > 1 for label in others)
        finally:
            if daemon is not None:
                daemon.stop()
            server.stop()

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
