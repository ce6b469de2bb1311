"""The daemon's policy for its own bugs: log each with its traceback and go on, unless the same
one repeats fast; then a clean restart by systemd is worth more than a loop that keeps failing
(gunicorn's arbiter ends the same way)."""
from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

REPEATS = 5                      # the same fault this many times ...
WITHIN_SECONDS = 60.0            # ... within this long, and the daemon gives up
EXIT_CODE = 70                   # EX_SOFTWARE: an internal error; systemd's Restart=on-failure acts


class RepeatedFault(Exception):
    """The same fault kept coming back: the daemon should exit with EXIT_CODE."""


class FaultGuard:
    def __init__(self, repeats: int = REPEATS, within: float = WITHIN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repeats = repeats
        self.within = within
        self._clock = clock
        self._seen: dict[tuple, deque[float]] = {}

    def run(self, step: Callable[[], object], name: str) -> None:
        """Run one step of a loop turn; an exception is logged, and raised as RepeatedFault
        only when the same one (type and place) came `repeats` times within `within` seconds."""
        try:
            step()
        except Exception as error:
            self.record(error, name)

    def record(self, error: Exception, name: str) -> None:
        where = traceback.extract_tb(error.__traceback__)[-1:]
        key = (type(error).__name__, name, tuple((frame.filename, frame.lineno) for frame in where))
        now = self._clock()
        times = self._seen.setdefault(key, deque(maxlen=self.repeats))
        times.append(now)
        log.error("unexpected failure in %s (the daemon goes on)", name, exc_info=error)
        if len(times) == self.repeats and now - times[0] <= self.within:
            raise RepeatedFault(f"{type(error).__name__} in {name} {self.repeats} times within "
                                f"{self.within:.0f} s: {error}") from error
