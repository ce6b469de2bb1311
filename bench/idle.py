#!/usr/bin/env python3
"""Idle cost: the daemon's CPU time and its loop's wake-ups with 10 idle programs, each mode.

For `--seconds` (default 120) with 10 programs that only wait to be stopped and a watchdog
(a notify socket stands in for systemd, WatchdogSec=30 as the unit has): the CPU time of the
daemon (all its threads) and of the fork server, the context switches of the daemon's main
thread (its loop: every wake-up is one) and the watchdog pings in the same time. The goal:
at most 5 loop wake-ups a minute beyond the watchdog's (the status heartbeat is written by
a thread of its own). The last line of output is one JSON object.

Run: .venv/bin/python bench/idle.py [--seconds 120] [--modes fork-server,exec]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import MACID, daemon_on, modes_argument, test_server
from support import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))
from watch import NotifySocket  # noqa: E402

CODE = '''
import os, threading
def main():
    open(os.path.join({folder!r}, "{label}"), "w").close()
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''
WATCHDOG_SECONDS = 30.0
GOAL_WAKEUPS_PER_MINUTE = 5


def cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_switches(pid: int) -> int:
    lines = open(f"/proc/{pid}/task/{pid}/status").read().splitlines()
    return sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)


def measure(server, tmp_path: Path, mode: str, programs: int, seconds: float) -> dict:
    with daemon_on(server, tmp_path, mode, log_level="INFO", spawn=mode) as (admin, daemon, folder):
        markers = folder / "markers"
        markers.mkdir()
        for index in range(programs):
            admin.put({"_id": f"p{index}", "type": MACID, "code": CODE.format(folder=str(markers), label=f"p{index}")})
        notify = NotifySocket(folder / "notify")
        try:
            daemon.start(env=notify.env(WATCHDOG_SECONDS))
            wait_for(lambda: len(list(markers.iterdir())) == programs, timeout=60, message="the programs")
            time.sleep(max(3.0, float(daemon.settings.get("start_seconds", 5)) + 1))   # all RUNNING
            pid = daemon.process.pid
            server_pid = next((int(line.split("pid ")[1].split(",")[0].rstrip(")"))
                               for line in reversed(daemon.log().splitlines()) if "fork server ready (pid" in line), None)
            began = time.monotonic()
            cpu0, switches0 = cpu_seconds(pid), main_thread_switches(pid)
            server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
            time.sleep(seconds)
            cpu1, switches1 = cpu_seconds(pid), main_thread_switches(pid)
            server_cpu1 = cpu_seconds(server_pid) if server_pid else 0.0
            pings = len(notify.pings(began))
        finally:
            notify.close()
    minutes = seconds / 60
    wakeups = switches1 - switches0
    return {
        "daemon_cpu_ms": round((cpu1 - cpu0) * 1000),
        "fork_server_cpu_ms": round((server_cpu1 - server_cpu0) * 1000) if server_pid else None,
        "loop_wakeups_per_minute": round(wakeups / minutes, 1),
        "watchdog_pings_per_minute": round(pings / minutes, 1),
        "beyond_watchdog_per_minute": round((wakeups - pings) / minutes, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--programs", type=int, default=10)
    modes_argument(parser)
    args = parser.parse_args()
    result: dict = {"benchmark": "idle", "seconds": args.seconds, "programs": args.programs,
                    "goal_beyond_watchdog_per_minute": GOAL_WAKEUPS_PER_MINUTE}
    with test_server() as (server, tmp_path):
        for mode in args.modes.split(","):
            result[mode] = measure(server, tmp_path, mode, args.programs, args.seconds)
            print(f"{mode}: {json.dumps(result[mode])}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
