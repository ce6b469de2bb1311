#!/usr/bin/env python3
"""The fleet's cost on the server: N simulated devices each following a `_selector` changes
feed (the daemon's own selector, one per MacID), plus one real daemon, on Apache CouchDB.

For each mode and each N:
- cpu_per_write_s: CPU seconds (utime + stime of the server's processes, /proc/<pid>/stat) that
  one write of a device's status document costs the server, over --writes writes, less the
  idle rate of the open feeds;
- push p50/p99: milliseconds from the return of the PUT of a code document for the real daemon
  to its program's first action (a marker file), --pushes times, on an otherwise quiet
  database ("quiet"), and while the simulated fleet writes its status documents at the rate
  N / --fleet-interval writes a second ("loaded", --loaded-pushes times), with the server's CPU
  seconds per second meanwhile (2.0 is all of this box's two cores) and per write done.

Modes (--mode, repeatable; default both):
  same      status documents in the code database, as the original (before)
  separate  status documents in a database of their own, `status_database` (after)

The simulated feeds are N sockets held by one thread (selectors), not N threads.
--feed-filter compares other filters (the real daemon always uses _selector); --pad-bytes
makes the status documents larger. The last line
of output is one JSON object.

Run: .venv/bin/python bench/fleet.py [--devices 100 500] [--mode same --mode separate]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from common import MACID, percentile
from support import ADMIN, COUCHDB_LAUNCHER, AdminClient, CouchServer, DaemonProcess, free_port, wait_for

from himbeerecouch import documents
from himbeerecouch.processes import descendants

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FIRST_SIMULATED = 10 ** 12          # simulated MacIDs: 10^12, 10^12 + 1, ...

PROGRAM = '''
import os, threading, time
def main():
    stamp = time.time()
    path = os.path.join({folder!r}, "v{version}-" + str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        f.write(repr(stamp))
    os.rename(path + ".tmp", path)
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


DESIGN_FILTER = ("function (doc, req) { var m = req.query.macid; "
                 "return String(doc.type) === m || doc.type === m + '_cmd'; }")


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and every process below it."""
    total = 0
    for each in [pid] + descendants(pid):
        try:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])       # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


def load() -> float:
    return os.getloadavg()[0]


class Feeds(threading.Thread):
    """N continuous `_changes` feeds with filter=_selector, one socket each, read by one thread."""

    def __init__(self, port: int, database: str, macids: list[int], kind: str = "selector") -> None:
        super().__init__(name="feeds", daemon=True)
        self.selector = selectors.DefaultSelector()
        self.delivered = 0               # change lines received (a simulated device's own docs)
        self.closed = 0
        self._halt = threading.Event()
        auth = base64.b64encode(":".join(ADMIN).encode()).decode()
        path = f"/{quote(database, safe='')}/_changes?feed=continuous&include_docs=true&heartbeat=10000&since=now"
        for macid in macids:
            if kind == "selector":          # what the daemon does
                url = path + "&filter=_selector"
                body = json.dumps({"selector": documents.feed_selector(macid, [f"code:{macid}:prog"])}).encode()
            elif kind == "doc_ids":         # for comparison: ids known in advance only
                url = path + "&filter=_doc_ids"
                body = json.dumps({"doc_ids": [f"code:{macid}:prog", f"{macid}_cmd"]}).encode()
            else:                           # for comparison: the original's design-document filter
                url = path + f"&filter=bench/mine&macid={macid}"
                body = b"{}"
            request = (f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Basic {auth}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, bytearray())
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            for key, _ in self.selector.select(0.5):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.closed += 1
                    continue
                self.delivered += data.count(b'"seq"')

    def close(self) -> None:
        self._halt.set()
        self.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


class Fleet(threading.Thread):
    """The simulated devices' status writes, `rate` a second, round-robin over the devices."""

    def __init__(self, client: AdminClient, macids: list[int], rate: float, pad: int = 0) -> None:
        super().__init__(name="fleet-writer", daemon=True)
        self.pad = "x" * pad
        self.client, self.macids, self.rate = client, macids, rate
        self.revs: dict[int, str] = {}
        self.written = 0
        self._halt = threading.Event()

    def write_one(self, macid: int) -> None:
        doc = {"_id": f"{macid}_heartbeat", "type": "heartbeat", "macid": macid,
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "running_ids": [],
               "programs": {f"code:{macid}:prog": {"state": "RUNNING", "restarts": 0}}}
        if self.pad:
            doc["pad"] = self.pad
        if macid in self.revs:
            doc["_rev"] = self.revs[macid]
        response = self.client.http.put(self.client.url(doc["_id"]), json=doc, timeout=120)
        assert response.status_code in (201, 202), response.text
        self.revs[macid] = response.json()["rev"]
        self.written += 1

    def run(self) -> None:
        start, index = time.monotonic(), 0
        while not self._halt.is_set():
            self.write_one(self.macids[index % len(self.macids)])
            index += 1
            self._halt.wait(max(0.0, start + index / self.rate - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(150)


def settle(pid: int, idle_rate: float, limit: float = 120.0) -> None:
    """Wait until the server's CPU rate is back near idle (the feeds have caught up)."""
    deadline = time.monotonic() + limit
    before = server_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server_cpu(pid)
        if now - before <= idle_rate + 0.05:
            return
        before = now


def push_latencies(admin: AdminClient, markers: Path, count: int, first_version: int) -> list[float | None]:
    latencies: list[float | None] = []
    for version in range(first_version, first_version + count):
        admin.put({"_id": "bench-program", "type": MACID, "code": PROGRAM.format(folder=str(markers), version=version)})
        written = time.time()
        try:
            found = wait_for(lambda: list(markers.glob(f"v{version}-*[0-9]")), timeout=30, interval=0.002,
                             message=f"version {version} to run")
        except AssertionError:
            latencies.append(None)
            continue
        latencies.append((float(found[0].read_text()) - written) * 1000.0)
        time.sleep(0.3)
    return latencies


def summary(latencies: list[float | None]) -> dict:
    done = [value for value in latencies if value is not None]
    if not done:
        return {"p50_ms": None, "p99_ms": None, "timeouts": len(latencies)}
    return {"p50_ms": round(statistics.median(done), 1), "p99_ms": round(percentile(done, 0.99), 1),
            "timeouts": len(latencies) - len(done)}


def measure(server: CouchServer, tmp: Path, mode: str, devices: int, args: argparse.Namespace) -> dict:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = AdminClient(server.url, name)
    admin.create_db()
    status_admin = admin
    settings = {"log_level": "INFO", "feed_heartbeat_seconds": 10, "status_interval_seconds": 30}
    if mode == "separate":
        status_admin = AdminClient(server.url, name + "_status")
        status_admin.create_db()
        settings["status_database"] = status_admin.db
    folder = tmp / f"{mode}-{devices}"
    markers = folder / "markers"
    markers.mkdir(parents=True)
    macids = [FIRST_SIMULATED + i for i in range(devices - 1)]     # the daemon is the N-th
    if args.feed_filter == "design":
        response = admin.http.put(f"{admin.base}/{quote(admin.db, safe='')}/_design/bench",
                                  json={"filters": {"mine": DESIGN_FILTER}}, timeout=10)
        assert response.status_code == 201, response.text
    feeds = Feeds(server.port, admin.db, macids, args.feed_filter)
    daemon = DaemonProcess(folder, server.admin_url, admin.db, MACID, **settings)
    pid = server.process.pid
    try:
        daemon.start()
        daemon.wait_log("following changes", timeout=60)
        push_latencies(admin, markers, 1, 0)                 # the program runs once
        time.sleep(3)
        begin, t0 = server_cpu(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_rate = (server_cpu(pid) - begin) / (time.monotonic() - t0)
        fleet = Fleet(status_admin, macids, rate=1.0, pad=args.pad_bytes)
        load_before = load()
        begin, t0 = server_cpu(pid), time.monotonic()
        for i in range(args.writes):
            fleet.write_one(macids[i % len(macids)])
        settle(pid, idle_rate)
        elapsed = time.monotonic() - t0
        cpu = server_cpu(pid) - begin - idle_rate * elapsed
        quiet = push_latencies(admin, markers, args.pushes, 1)
        fleet.rate = len(macids) / args.fleet_interval
        fleet.start()
        time.sleep(5)                                        # the fleet's writes are under way
        begin, t0, written = server_cpu(pid), time.monotonic(), fleet.written
        loaded = push_latencies(admin, markers, args.loaded_pushes, 1 + args.pushes)
        loaded_cpu, loaded_elapsed = server_cpu(pid) - begin, max(1e-3, time.monotonic() - t0)
        loaded_written = fleet.written - written
        fleet.stop()
        result = {
            "mode": mode, "devices": devices, "load_1min": round(load_before, 2),
            "feed_filter": args.feed_filter, "pad_bytes": args.pad_bytes,
            "idle_cpu_per_s": round(idle_rate, 4),
            "cpu_per_write_s": round(cpu / args.writes, 4),
            "quiet": summary(quiet),
            "loaded": {"writes_per_s": round(fleet.rate, 1),
                       "writes_done_per_s": round(loaded_written / loaded_elapsed, 1),
                       "server_cpu_per_s": round(loaded_cpu / loaded_elapsed, 3),
                       "cpu_per_write_s": round(loaded_cpu / max(1, loaded_written), 4),
                       **summary(loaded)},
            "feeds_closed": feeds.closed,
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        daemon.stop()
        feeds.close()
        admin.drop_db()
        if status_admin is not admin:
            status_admin.drop_db()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--mode", action="append", choices=("same", "separate"))
    parser.add_argument("--writes", type=int, default=20, help="status writes measured for CPU (20)")
    parser.add_argument("--pushes", type=int, default=10, help="pushes on a quiet database (10)")
    parser.add_argument("--loaded-pushes", type=int, default=5, help="pushes while the fleet writes (5)")
    parser.add_argument("--fleet-interval", type=float, default=30.0,
                        help="seconds between two status writes of one simulated device (30)")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--feed-filter", choices=("selector", "doc_ids", "design"), default="selector",
                        help="the simulated feeds' filter: the daemon's _selector (default); for "
                             "comparison _doc_ids, or a JavaScript filter in a design document")
    parser.add_argument("--pad-bytes", type=int, default=0,
                        help="bytes added to each status document written (does the size matter?)")
    parser.add_argument("--server", type=Path, default=COUCHDB_LAUNCHER)
    args = parser.parse_args()
    modes = args.mode or ["same", "separate"]

    results = []
    with tempfile.TemporaryDirectory(prefix="hc-fleet-") as tmp:
        tmp_path = Path(tmp)
        server = CouchServer(free_port(), tmp_path / "server.log", command=args.server)
        server.start()
        try:
            for devices in args.devices:
                for mode in modes:
                    results.append(measure(server, tmp_path, mode, devices, args))
        finally:
            server.stop()
    print(json.dumps({"benchmark": "fleet", "server": args.server.name, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
