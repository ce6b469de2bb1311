"""What programs write on their pipes: read without starving the loop, logged at a bounded rate.

A program that prints in a tight loop must not keep the daemon's loop busy (the watchdog, signals
and the other programs wait on it) nor fill the journal of a Pi's SD card. So each ready pipe is
read once per turn of the loop, with a byte budget (as supervisor's readfd reads once per event),
and each program's lines go through a token bucket; what it refuses is counted, reported in the
log from time to time and shown in the status document.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from .ratelimit import TokenBucket

READ_BUDGET = 64 * 1024          # bytes read from one pipe per turn of the loop
MAX_LINE = 64 * 1024             # longer lines are cut, so a runaway program cannot eat memory
LINES_PER_SECOND = 50            # logged per program, on average ...
LINE_BURST = 500                 # ... with bursts of this many lines
DROP_REPORT_SECONDS = 10.0       # while lines are dropped, how often the count is logged


class LineBudget:
    """A token bucket of log lines; counts the lines it refuses."""

    def __init__(self, rate: float = LINES_PER_SECOND, burst: int = LINE_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._bucket = TokenBucket(rate, burst, clock)
        self._clock = clock
        self.dropped = 0                 # every refused line, for the status document
        self._unreported = 0
        self._reported_at = clock()

    def allow(self) -> bool:
        if self._bucket.take():
            return True
        self.dropped += 1
        self._unreported += 1
        return False

    def take_report(self, final: bool = False) -> int:
        """Lines dropped since the last report, when it is time to say so (else 0): once the
        flood is over (a second's worth of lines allowed again: one spare token only means the
        next line came a little late), every DROP_REPORT_SECONDS while it lasts, and at the end
        (`final`)."""
        if not self._unreported:
            return 0
        now = self._clock()
        over = self._bucket.ready(min(self.rate, self._bucket.burst))
        if not (final or over or now - self._reported_at >= DROP_REPORT_SECONDS):
            return 0
        count, self._unreported, self._reported_at = self._unreported, 0, now
        return count


class LineReader:
    """One pipe from a child, split into lines; `read` takes one budget of bytes at most."""

    def __init__(self, fd: int, on_line: Callable[[bytes], None]) -> None:
        self.fd = fd
        self._on_line = on_line
        self._pending = b""
        os.set_blocking(fd, False)

    def read(self, budget: int = READ_BUDGET) -> int | None:
        """Read what is there, up to `budget` bytes: how many were read, None at the pipe's end."""
        try:
            data = os.read(self.fd, budget)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.flush()
            return None
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_LINE:
            lines.append(self._pending[:MAX_LINE] + b" [cut]")
            self._pending = b""
        for line in lines:
            self._on_line(line)
        return len(data)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, b""
            self._on_line(pending)
