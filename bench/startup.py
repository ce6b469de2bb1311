#!/usr/bin/env python3
"""Start-up: from exec of the daemon to READY=1, and to the first action of all 10 programs.

The programs' documents are on the server before the daemon starts (a fresh state dir: no
last-known code, so they run once the first snapshot arrives). A notify socket stands in for
systemd to time READY=1. Each mode is started `--runs` times; medians are shown. The last line
of output is one JSON object.

Run: .venv/bin/python bench/startup.py [--runs 5] [--programs 10] [--modes fork-server,exec]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import MACID, daemon_on, modes_argument, test_server
from support import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))
from watch import NotifySocket  # noqa: E402

CODE = '''
import os, time
def main():
    stamp = time.time()
    path = os.path.join({folder!r}, "{label}")
    with open(path + ".tmp", "w") as f:
        f.write(repr(stamp))
    os.rename(path + ".tmp", path)
    while not should_quit():
        time.sleep(0.05)
'''


def measure(server, tmp_path: Path, mode: str, programs: int, runs: int) -> dict:
    ready, first_actions = [], []
    with daemon_on(server, tmp_path, mode, log_level="INFO", spawn=mode) as (admin, daemon, folder):
        markers = folder / "markers"
        for index in range(programs):
            admin.put({"_id": f"p{index}", "type": MACID,
                       "code": CODE.format(folder=str(markers), label=f"p{index}")})
        for run in range(runs):
            shutil.rmtree(markers, ignore_errors=True)
            markers.mkdir()
            shutil.rmtree(daemon.state_dir, ignore_errors=True)   # no last-known code
            notify = NotifySocket(folder / f"notify{run}")
            try:
                began = time.time()
                started = time.monotonic()
                daemon.start(env=notify.env(60.0))
                wait_for(lambda: any("READY=1" in m for _, m in notify.messages), timeout=60, message="READY=1")
                ready_at = next(t for t, m in notify.messages if "READY=1" in m)
                done = wait_for(lambda: len([p for p in markers.iterdir() if not p.name.endswith(".tmp")]) == programs
                                and list(markers.iterdir()), timeout=60, message="all first actions")
                last = max(float(p.read_text()) for p in done if not p.name.endswith(".tmp"))
                ready.append((ready_at - started) * 1000)
                first_actions.append((last - began) * 1000)
                daemon.stop()
            finally:
                notify.close()
    return {"ready_ms": round(statistics.median(ready)), "all_first_actions_ms": round(statistics.median(first_actions)),
            "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--programs", type=int, default=10)
    modes_argument(parser)
    args = parser.parse_args()
    result: dict = {"benchmark": "startup", "programs": args.programs}
    with test_server() as (server, tmp_path):
        for mode in args.modes.split(","):
            result[mode] = measure(server, tmp_path, mode, args.programs, args.runs)
            print(f"{mode}: {json.dumps(result[mode])}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
