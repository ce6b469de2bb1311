#!/usr/bin/env python3
"""Time to follow a server back after an outage: the server is stopped for --outage seconds and
started again (on its data dir); a code change written as soon as it is back. For each outage:
seconds from the server being back (it answers) to the daemon following the feed again, and to
the new code's first action. Also the daemon's connection attempts while the server was away.
The last line of output is one JSON object.

Run: .venv/bin/python bench/outage.py [--outage 30] [--repeats 3]
     [--server ../shared/couchdb/couchdb-server]   (Apache CouchDB 3.5.0; default scripts/couch-server)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import MACID, percentile
from support import ROOT, AdminClient, CouchServer, DaemonProcess, free_port, wait_for

PROGRAM = '''
import os, threading, time
def main():
    with open(os.path.join({folder!r}, "v{version}"), "w") as f:
        f.write(repr(time.time()))
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


def attempts(log: str, since: float) -> int:
    """The follower's failed attempts logged after `since` (time.time())."""
    count = 0
    for line in log.splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING himbeerecouch.feed: server unreachable", line)
        if match and time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000 >= since:
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", type=Path, default=ROOT / "scripts" / "couch-server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hc-outage-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "server").mkdir()
        server = CouchServer(free_port(), tmp_path / "server" / "server.log",
                             data_dir=tmp_path / "server" / "data", command=args.server.resolve())
        server.start()
        daemon = None
        follow, apply, tries = [], [], []
        try:
            admin = AdminClient(server.url, f"bench_{uuid.uuid4().hex[:8]}")
            admin.create_db()
            admin.put({"_id": "p", "type": MACID, "code": PROGRAM.format(folder=tmp, version=0)})
            (tmp_path / "daemon").mkdir()
            # The defaults of a Pi for the feed and the back-off caps.
            daemon = DaemonProcess(tmp_path / "daemon", server.admin_url, admin.db, MACID, log_level="INFO",
                                   feed_heartbeat_seconds=10, status_interval_seconds=30,
                                   restart_backoff_max_seconds=60)
            daemon.start()
            wait_for(lambda: (tmp_path / "v0").exists(), timeout=60, message="the program")
            daemon.wait_log("following changes", timeout=30)
            for version in range(1, args.repeats + 1):
                followed = daemon.log().count("following changes")
                server.stop()
                down = time.time()
                time.sleep(args.outage)
                server.start()
                back = time.monotonic()
                tries.append(attempts(daemon.log(), down))
                admin.put({"_id": "p", "type": MACID, "code": PROGRAM.format(folder=tmp, version=version)})
                wait_for(lambda: daemon.log().count("following changes") > followed, timeout=120,
                         interval=0.01, message="the daemon to follow again")
                follow.append(time.monotonic() - back)
                wait_for(lambda: (tmp_path / f"v{version}").exists(), timeout=60, interval=0.01,
                         message="the new code")
                apply.append(time.monotonic() - back)
        finally:
            if daemon is not None:
                daemon.stop()
            server.stop()

    result = {
        "benchmark": "follow_after_outage",
        "server": args.server.name,
        "outage_s": args.outage,
        "repeats": args.repeats,
        "follow_max_s": round(max(follow), 2),
        "follow_p50_s": round(percentile(follow, 0.5), 2),
        "new_code_max_s": round(max(apply), 2),
        "attempts_per_min_during_outage": round(60 * sum(tries) / (args.outage * args.repeats), 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
