#!/usr/bin/env python3
"""Writes a chatty program costs the server: revisions of `<MacID>_output` and of
`<MacID>_heartbeat` per minute while one program prints as fast as it can.

One daemon with the default settings of the keys that matter here (output_tail_lines 20,
output_interval_seconds 10, status_interval_seconds 300, start_seconds 5, log_level INFO) and
one program that prints numbered lines in a tight loop for --seconds (default 60). Counted
between the program's first and last line: the revisions each document gained, the lines it
printed, what the output document says it saw and dropped, and the daemon's CPU time. With
`--modes on,off` (the default) the same run follows with output_tail_lines = 0, for the
heartbeat and CPU without the tail. The last line of output is one JSON object.

Run: .venv/bin/python bench/output_tail.py [--seconds 60] [--modes on,off]
     (HIMBEERECOUCH_TEST_SERVER=couchdb for Apache CouchDB 3.5.0)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from common import MACID, daemon_on, test_server
from support import wait_for

from himbeerecouch.config import Config

PROGRAM = '''
import sys, threading, time
def main():
    open({first!r}, "w").close()
    write = sys.stdout.write
    n = 0
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        write("line %d\\n" % n)
        n += 1
    with open({last!r}, "w") as done:
        done.write(str(n))
    quit = threading.Event()
    register_quit_notification(quit.set)
    quit.wait()
'''
DEFAULTS = ("grace_seconds", "feed_heartbeat_seconds", "status_interval_seconds", "restart_backoff_max_seconds",
            "start_seconds", "output_tail_lines", "output_interval_seconds")


def revisions(admin, doc_id: str) -> int:
    doc = admin.get(doc_id)
    return int(doc["_rev"].split("-")[0]) if doc else 0


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server, tmp_path: Path, mode: str, seconds: float) -> dict:
    defaults = Config()
    settings = {key: getattr(defaults, key) for key in DEFAULTS}
    settings["log_level"] = "INFO"
    if mode == "off":
        settings["output_tail_lines"] = 0
    with daemon_on(server, tmp_path, mode, **settings) as (admin, daemon, folder):
        first, last = folder / "first", folder / "last"
        admin.put({"_id": "chatty", "type": MACID, "name": "chatty",
                   "code": PROGRAM.format(first=str(first), last=str(last), seconds=seconds)})
        daemon.start()
        wait_for(first.exists, timeout=60, message="the program's first line")
        began = time.monotonic()
        cpu0 = cpu_seconds(daemon.process.pid)
        output0, heartbeat0 = revisions(admin, f"{MACID}_output"), revisions(admin, f"{MACID}_heartbeat")
        wait_for(last.exists, timeout=seconds + 60, interval=0.01, message="the program's last line")
        elapsed = time.monotonic() - began
        cpu1 = cpu_seconds(daemon.process.pid)
        output1, heartbeat1 = revisions(admin, f"{MACID}_output"), revisions(admin, f"{MACID}_heartbeat")
        printed = int(last.read_text())
        result = {
            "seconds": round(elapsed, 1),
            "lines_printed": printed,
            "lines_per_second": round(printed / elapsed),
            "output_writes": output1 - output0,
            "output_writes_per_minute": round((output1 - output0) / elapsed * 60, 1),
            "output_writes_bound": math.ceil(elapsed / settings["output_interval_seconds"]) + 1
            if settings["output_tail_lines"] else 0,
            "heartbeat_writes": heartbeat1 - heartbeat0,
            "heartbeat_writes_per_minute": round((heartbeat1 - heartbeat0) / elapsed * 60, 1),
            "daemon_cpu_seconds": round(cpu1 - cpu0, 2),
            # The log's "N lines of output dropped" lines: each one also marks the status changed.
            "drop_reports_in_log": len(re.findall(r"chatty: \d+ lines of output dropped", daemon.log())),
        }
        if settings["output_tail_lines"]:
            # Once the flood is over the document says what it saw: every line, seen or dropped.
            doc = wait_for(lambda: ((admin.get(f"{MACID}_output") or {}).get("programs", {}).get("chatty", {})
                                    .get("lines_seen") == printed) and admin.get(f"{MACID}_output"),
                           timeout=30, message="the last count in the output document")
            shown = doc["programs"]["chatty"]
            result.update(lines_seen=shown["lines_seen"], dropped_lines=shown["dropped_lines"],
                          tail_lines=len(shown["lines"]), document_bytes=len(json.dumps(doc)))
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--modes", default="on,off", help="on (output_tail_lines 20), off (0), comma-separated")
    args = parser.parse_args()
    result: dict = {"benchmark": "output_tail", "seconds": args.seconds}
    with test_server() as (server, tmp_path):
        for mode in args.modes.split(","):
            result[mode] = measure(server, tmp_path, mode, args.seconds)
            print(f"{mode}: {json.dumps(result[mode])}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
