"""The status (heartbeat) document `<MacID>_heartbeat`, written off the main loop.

The main loop publishes the newest status whenever something changed; this thread writes the
newest one it has at once, and otherwise only every `interval` seconds as a keep-alive
(`status_interval_seconds`, 300 by default): on CouchDB every write to the code database is
evaluated by every device's changes feed, so a fleet that rewrote its status every 30 s would
cost the server O(devices^2). The document says its own interval (`status_interval`), from which
readers judge it stale. A slow or absent server never holds up the programs. A conflict (someone else wrote the document) is resolved by taking the
server's `_rev` and writing again: the device owns this document.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from . import __version__
from .couch import CONNECTION_ERRORS, Conflict, Database, describe_error
from .processes import now_iso
from .programs import Program, State

log = logging.getLogger(__name__)


def local_ip(server_url: str) -> str | None:
    """The address this Pi uses to reach the server (a UDP connect sends no packet)."""
    parts = urlsplit(server_url)
    if not parts.hostname:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((parts.hostname, parts.port or 80))
            return probe.getsockname()[0]
    except OSError:
        return None


def heartbeat(*, macid: int, started: float, started_iso: str, stopping: bool, feed_connected: bool,
              feed_error: str | None, programs: dict[str, Program],
              spawn: dict[str, Any] | None = None) -> dict[str, Any]:
    """The daemon's side of the status document (the writer adds ip, timestamp, uptime)."""
    shown = {doc_id: program.status() for doc_id, program in sorted(programs.items())}
    return {
        "macid": macid,
        "hostname": socket.gethostname(),
        "version": __version__,
        "started": started_iso,
        "uptime": round(time.time() - started),
        "daemon": "stopping" if stopping else "running",
        "server_connected": feed_connected,
        "server_error": feed_error,
        "running_ids": [doc_id for doc_id, status in shown.items()
                        if status["state"] in (State.STARTING.value, State.RUNNING.value)],
        "programs": shown,
        # How programs start: {"mode": "fork-server" | "exec", "fork_server_pid", "error"}.
        "spawn": spawn,
    }


def summary(programs: dict[str, Program], server_url: str, feed_connected: bool,
            feed_error: str | None) -> str:
    """One line for systemd's STATUS=."""
    states = [program.state for program in programs.values()]
    running = sum(state in (State.STARTING, State.RUNNING) for state in states)
    failed = sum(state in (State.FATAL, State.BACKOFF) for state in states)
    server = ("no server" if not server_url else
              "server connected" if feed_connected else
              "server unreachable" if feed_error else "connecting to the server")
    text = f"{running} program(s) running"
    if failed:
        text += f", {failed} failing"
    return f"{text}; {server}"


class StatusWriter(threading.Thread):
    COALESCE_SECONDS = 0.1      # a burst of changes becomes one write
    # Writes at most this often, whatever changes: a program that fails and restarts over and
    # over must not make its Pi write (and wake every feed of the database) at every turn. The
    # newest status is written once the spacing has passed; nothing published is lost.
    MIN_SPACING_SECONDS = 2.0

    def __init__(self, *, connect: Callable[[], Database], doc_id: str, interval: float,
                 started: float | None = None) -> None:
        super().__init__(name="status-writer", daemon=True)
        self._connect = connect
        self.doc_id = doc_id
        self.interval = interval
        self.started = started               # time.time() of the daemon's start, for `uptime`
        self._latest: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._hurry = threading.Event()      # ends the coalescing and spacing wait: stop, last word
        self._rev: str | None = None
        self._db: Database | None = None
        self._failing = False
        self._final: dict[str, Any] | None = None     # the last word, once finish() gave it

    def publish(self, status: dict[str, Any]) -> None:
        with self._lock:
            if self._final is not None:
                return                       # after the last word, nothing
            self._latest = status
        self._wake.set()

    def stop(self) -> None:
        self._stop_event.set()
        self._hurry.set()
        self._wake.set()

    def finish(self, status: dict[str, Any], timeout: float) -> None:
        """Write `status` as the last word, waiting at most `timeout` seconds for it."""
        with self._lock:
            self._latest = self._final = status
        self._hurry.set()
        self._wake.set()
        self.join(timeout)

    def run(self) -> None:
        last_write = -float("inf")
        while not self._stop_event.is_set():
            self._wake.wait(self.interval)
            if self._stop_event.is_set():
                return
            if self._final is None:
                spacing = last_write + self.MIN_SPACING_SECONDS - time.monotonic()
                self._hurry.wait(max(self.COALESCE_SECONDS, spacing))
                if self._stop_event.is_set():
                    return
            self._wake.clear()
            with self._lock:
                status, final = self._latest, self._final
            if status is not None:
                last_write = time.monotonic()
                self.write(status)
            if final is not None and status is final:
                return                       # else finish() came during the write: once more

    def write(self, status: dict[str, Any]) -> bool:
        try:
            if self._db is None:
                self._db = self._connect()
            doc = {"_id": self.doc_id, **status, "type": "heartbeat",
                   "ip": local_ip(self._db.server_url), "timestamp": now_iso(),
                   "status_interval": self.interval}
            if self.started is not None:
                # Rewritten every interval even when nothing else changed: it must be current.
                doc["uptime"] = round(time.time() - self.started)
            for _ in range(3):
                if self._rev:
                    doc["_rev"] = self._rev
                try:
                    self._rev = self._db.put(doc)["_rev"]
                    break
                except Conflict:
                    current = self._db.get(self.doc_id)
                    self._rev = current["_rev"] if current else None
            else:
                raise Conflict("status document keeps changing under us")
        except (*CONNECTION_ERRORS, OSError) as error:
            if not self._failing:
                log.warning("cannot write the status document: %s", describe_error(error))
            self._failing = True
            self._db = None
            return False
        if self._failing:
            log.info("status document written again")
        self._failing = False
        return True
