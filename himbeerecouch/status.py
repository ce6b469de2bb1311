"""The status (heartbeat) document `<MacID>_heartbeat`, written off the main loop.

The main loop publishes the newest status whenever something changed; this thread writes the
newest one it has at once, and otherwise only every `interval` seconds as a keep-alive
(`status_interval_seconds`, 300 by default): on CouchDB every write to the code database is
evaluated by every device's changes feed, so a fleet that rewrote its status every 30 s would
cost the server O(devices^2). The document says its own interval (`status_interval`), from which
readers judge it stale. The thread, its spacing and its handling of conflicts are docwriter.py's.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from . import __version__
from .couch import Database
from .docwriter import DocumentWriter
from .processes import now_iso
from .programs import Program, State


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
              spawn: dict[str, Any] | None = None, command_privileges: str = "none") -> dict[str, Any]:
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
        # What command documents may do here beyond the daemon's user: none, power or root.
        "command_privileges": command_privileges,
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


class StatusWriter(DocumentWriter):
    # Writes at most this often, whatever changes: a program that fails and restarts over and
    # over must not make its Pi write (and wake every feed of the database) at every turn. The
    # newest status is written once the spacing has passed; nothing published is lost.
    MIN_SPACING_SECONDS = 2.0

    def __init__(self, *, connect: Callable[[], Database], doc_id: str, interval: float,
                 started: float | None = None) -> None:
        super().__init__(name="status-writer", what="status document", connect=connect, doc_id=doc_id,
                         spacing=self.MIN_SPACING_SECONDS, keep_alive=interval)
        self.interval = interval
        self.started = started               # time.time() of the daemon's start, for `uptime`

    def document(self, status: dict[str, Any]) -> dict[str, Any]:
        doc = {**status, "type": "heartbeat", "ip": local_ip(self._db.server_url), "timestamp": now_iso(),
               "status_interval": self.interval}
        if self.started is not None:
            # Rewritten every interval even when nothing else changed: it must be current.
            doc["uptime"] = round(time.time() - self.started)
        return doc
