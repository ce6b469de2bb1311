"""A document the device owns on the server, written by a thread of its own.

The main loop publishes new content whenever it changed and never waits for the server: a slow
or absent server holds up only this thread. The thread writes the newest content it has, at most
every `spacing` seconds (a burst of changes becomes one write, and nothing published is lost,
only coalesced: the newest content is written once the spacing has passed), and, with a
`keep_alive`, rewrites it that often when nothing changes. A conflict (someone else wrote the
document) is resolved by taking the server's `_rev` and writing again: the device owns it.

Users: the status document (status.py) and the programs' output (outputtail.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .couch import CONNECTION_ERRORS, Conflict, Database, describe_error

log = logging.getLogger(__name__)


class DocumentWriter(threading.Thread):
    COALESCE_SECONDS = 0.1      # a burst of changes becomes one write

    def __init__(self, *, name: str, what: str, connect: Callable[[], Database], doc_id: str,
                 spacing: float, keep_alive: float | None = None,
                 retry_seconds: float | None = None) -> None:
        """`what` names the document in log lines. `retry_seconds`: how soon a failed write is
        tried again when nothing new comes; None: at the next publish or keep-alive."""
        super().__init__(name=name, daemon=True)
        self.what = what
        self._connect = connect
        self.doc_id = doc_id
        self.spacing = spacing
        self.keep_alive = keep_alive
        self.retry_seconds = retry_seconds
        self._latest: Any = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._hurry = threading.Event()      # ends the coalescing and spacing wait: stop, last word
        self._rev: str | None = None
        self._db: Database | None = None
        self._failing = False
        self._unwritten = False              # the last write failed
        self._final: Any = None              # the last word, once last_word() gave it

    # ---- the main loop's side -------------------------------------------------------------

    def publish(self, content: Any) -> None:
        with self._lock:
            if self._final is not None:
                return                       # after the last word, nothing
            self._latest = content
        self._wake.set()

    def stop(self) -> None:
        self._stop_event.set()
        self._hurry.set()
        self._wake.set()

    def last_word(self, content: Any) -> None:
        """Write `content` as soon as possible, whatever the spacing, and end the thread."""
        with self._lock:
            self._latest = self._final = content
        self._hurry.set()
        self._wake.set()

    def finish(self, content: Any, timeout: float) -> None:
        """Write `content` as the last word, waiting at most `timeout` seconds for it."""
        self.last_word(content)
        self.join(timeout)

    # ---- the thread -----------------------------------------------------------------------

    def _idle_wait(self) -> float | None:
        """How long to wait for a publish: the keep-alive, sooner after a failed write."""
        waits = [self.keep_alive]
        if self._unwritten:
            waits.append(self.retry_seconds)
        waits = [wait for wait in waits if wait is not None]
        return min(waits) if waits else None

    def run(self) -> None:
        last_write = -float("inf")
        while not self._stop_event.is_set():
            self._wake.wait(self._idle_wait())
            if self._stop_event.is_set():
                return
            if self._final is None:
                spacing = last_write + self.spacing - time.monotonic()
                self._hurry.wait(max(self.COALESCE_SECONDS, spacing))
                if self._stop_event.is_set():
                    return
            self._wake.clear()
            with self._lock:
                content, final = self._latest, self._final
            if content is not None:
                began = time.monotonic()
                written = self.write(content)
                if written is not None:      # None: nothing new to write, no write made
                    last_write = began
                    self._unwritten = not written
            if final is not None and content is final:
                return                       # else last_word() came during the write: once more

    def document(self, content: Any) -> dict[str, Any] | None:
        """The document's fields for `content` (connected: self._db is set); None: nothing new."""
        return dict(content)

    def write(self, content: Any) -> bool | None:
        """Write the document for `content`: True when written, False when the server failed,
        None when there was nothing new to write."""
        try:
            if self._db is None:
                self._db = self._connect()
            fields = self.document(content)
            if fields is None:
                return None
            doc = {"_id": self.doc_id, **fields}
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
                raise Conflict(f"{self.what} keeps changing under us")
        except (*CONNECTION_ERRORS, OSError) as error:
            if not self._failing:
                log.warning("cannot write the %s: %s", self.what, describe_error(error))
            self._failing = True
            self._db = None
            return False
        if self._failing:
            log.info("%s written again", self.what)
        self._failing = False
        return True
