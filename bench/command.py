#!/usr/bin/env python3
"""Command round trip: milliseconds from writing a ["true"] command document (the PUT's
return) to seeing its `ret` in the database, polled as a client would. The last line of output
is one JSON object.

Run: .venv/bin/python bench/command.py [--commands 50]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import MACID, percentile, server_and_daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=50)
    args = parser.parse_args()
    with server_and_daemon(log_level="WARNING") as (admin, daemon, _):
        daemon.start()
        # Warm up: the first command also waits for the feed to open.
        admin.put({"_id": "warmup", "type": f"{MACID}_cmd", "cmd": ["true"]})
        deadline = time.monotonic() + 60
        while not (admin.get("warmup") or {}).get("ret") and time.monotonic() < deadline:
            time.sleep(0.05)
        latencies = []
        for n in range(args.commands):
            doc_id = f"c{n}"
            admin.put({"_id": doc_id, "type": f"{MACID}_cmd", "cmd": ["true"]})
            written = time.monotonic()
            while True:
                doc = admin.get(doc_id)
                if doc and doc.get("ret") is not None:
                    latencies.append((time.monotonic() - written) * 1000.0)
                    break
                if time.monotonic() - written > 30:
                    raise SystemExit(f"command {doc_id} got no result within 30 s")
                time.sleep(0.002)
            assert doc["returncode"] == 0, doc
    print(json.dumps({
        "benchmark": "command_round_trip",
        "commands": args.commands,
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
