"""A synchronised clock before TLS.

A Pi has no real-time clock: it boots with the time systemd-timesyncd saved at the last
shutdown (or the card image's build time) until an NTP server answers. A server certificate
can then look "not yet valid" or expired, and the TLS error does not say that the clock is the
cause. So while systemd-timesyncd runs (its folder in /run exists) and has not synchronised
the clock yet (no `synchronized` file in it), connections to an https server wait for it, at
most `clock_wait_seconds`, with one log line each way. Programs from the last-known code run
meanwhile. Without timesyncd (another NTP client, a real-time clock) nothing waits.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"


class ClockGate:
    """Shared by the daemon's connections: the first one to ask starts the wait, every one
    waits for the same deadline, and once the gate is open it stays open."""

    def __init__(self, flag: str | Path = TIMESYNC_FLAG, timeout: float = 120.0, *,
                 monotonic: Callable[[], float] = time.monotonic, poll_seconds: float = 0.5) -> None:
        self._flag = Path(flag)
        self._timeout = timeout
        self._monotonic = monotonic
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._open = timeout <= 0 or not str(flag)
        self._started: float | None = None

    def synchronised(self) -> bool:
        """True when nothing is to be waited for: timesyncd is not running, or it has synchronised."""
        return not self._flag.parent.is_dir() or self._flag.exists()

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Return once the clock is synchronised or the wait is over; False when `stop` was set first."""
        if self._open:
            return True
        with self._lock:
            if self._started is None:
                self._started = self._monotonic()
                if self.synchronised():
                    self._open = True
                    return True
                log.info("waiting for a synchronised clock before connecting over TLS (at most %.0f s): "
                         "systemd-timesyncd has not reached an NTP server yet (%s does not exist); the "
                         "last-known code runs meanwhile", self._timeout, self._flag)
        while not self._open:
            if self.synchronised():
                self._finish(f"clock synchronised after {self._monotonic() - self._started:.0f} s; connecting")
            elif self._monotonic() - self._started >= self._timeout:
                self._finish(f"clock still not synchronised after {self._timeout:.0f} s (no NTP server "
                             "reachable?); connecting anyway: TLS fails if the clock is far off the "
                             "certificate's dates", warning=True)
            elif stop is not None and stop.wait(self._poll):
                return False
            elif stop is None:
                time.sleep(self._poll)
        return True

    def _finish(self, message: str, warning: bool = False) -> None:
        with self._lock:
            if not self._open:
                self._open = True
                (log.warning if warning else log.info)("%s", message)
