"""systemd notifications (READY, STATUS, WATCHDOG) through sdnotify; silent outside systemd."""
from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if watched and int(usec) > 0 else None
        self._last_ping = 0.0
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog_due(self) -> float | None:
        """Monotonic time of the next ping, or None without a watchdog."""
        if self.watchdog_interval is None:
            return None
        return self._last_ping + self.watchdog_interval

    def ping_watchdog(self) -> None:
        if self.watchdog_interval is not None and time.monotonic() >= self.watchdog_due():
            self._last_ping = time.monotonic()
            self._send("WATCHDOG=1")
