"""The changes follower: one thread that keeps the daemon's view of its documents current.

Each connection starts with a full read of this Pi's documents (a snapshot: the whole truth),
then follows `_changes` from a seq taken *before* that read, so a write made in between shows
up in the feed. A change is only a hint; the main loop re-derives what must run. On any error
the follower waits (jittered, capped exponential back-off) and starts over, forever.

Two back-offs, because the two kinds of failure ask for different patience:
- the server cannot be reached (refused or reset connection, timeout, 5xx): it may be back any
  moment, so retry 1 s, 2 s, then every 2.4-3 s (`RECONNECT_MAX_SECONDS`), which follows a
  restarted server within seconds. Each attempt costs a TCP connection and at most one
  `GET /{db}` until the server answers, the full reconnect (`_find`, `_changes`) only then;
- the server answered and said no (4xx: credentials, rights, no such database, TLS
  certificate refused): only someone's fix helps, so double up to `restart_backoff_max_seconds`
  (refused credentials: up to `CREDENTIALS_RETRY_SECONDS`, as a new device's user may be made
  any moment).
Both restart from their first delay once the feed is open.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

import requests
from pycouchdb import exceptions as couch_errors

from . import documents
from .backoff import Backoff
from .couch import CONNECTION_ERRORS, Change, Database, NotFound, describe_error, redact

log = logging.getLogger(__name__)

RECONNECT_MAX_SECONDS = 3.0        # cap while the server is unreachable: back within ~3 s
CREDENTIALS_RETRY_SECONDS = 10.0


def is_refusal(error: BaseException) -> bool:
    """Whether the server answered and refused (4xx, an untrusted certificate) rather than being
    unreachable or failing (connection errors, timeouts, 5xx, a broken answer)."""
    if isinstance(error, requests.exceptions.SSLError):
        return "certificate verify failed" in str(error).lower()
    if isinstance(error, (NotFound, couch_errors.BadRequest, couch_errors.AuthenticationFailed)):
        return True
    detail = error.args[0] if error.args else None
    if isinstance(detail, dict):
        return detail.get("error") in ("unauthorized", "forbidden", "not_found", "bad_request")
    # couch.Database.changes reports the feed's HTTP status in its message.
    return isinstance(detail, str) and re.match(r"changes feed refused: HTTP 4\d\d", detail) is not None


@dataclass(frozen=True)
class Snapshot:
    docs: list[dict]    # every code document of this Pi, as the server has them now
    seq: Any            # the feed continues from here


@dataclass(frozen=True)
class Changed:
    change: Change


@dataclass(frozen=True)
class FeedState:
    connected: bool
    error: str | None = None


def seq_ahead(checkpoint: Any, current: Any) -> bool:
    """Whether the checkpoint is past the database's current seq, judged by their leading
    numbers (CouchDB 2+: "123-g1AA..."); False when either has none."""
    numbers = [str(seq).split("-", 1)[0] for seq in (checkpoint, current)]
    return all(n.isdigit() for n in numbers) and int(numbers[0]) > int(numbers[1])


class FeedEnded(Exception):
    """The server closed the feed; reconnect."""


class Follower(threading.Thread):
    def __init__(self, *, connect: Callable[[], Database], macid: int, since: Any,
                 heartbeat_seconds: float, backoff_cap: float, emit: Callable[[object], None]) -> None:
        super().__init__(name="changes-follower", daemon=True)
        self._connect = connect
        self._macid = macid
        self.since = since                   # None: start from the server's current seq
        self._heartbeat = heartbeat_seconds
        # backoff_cap (restart_backoff_max_seconds) also bounds the short one, for tests.
        self._unreachable = Backoff(first=1.0, cap=min(backoff_cap, RECONNECT_MAX_SECONDS))
        self._refused = Backoff(first=1.0, cap=backoff_cap)
        self._emit = emit
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Ask the thread to end; it notices at the next line or heartbeat of the feed."""
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def run(self) -> None:
        while not self.stopped:
            try:
                self._follow()
            except (FeedEnded, *CONNECTION_ERRORS) as error:
                message = describe_error(error)
                refused = is_refusal(error)
            except Exception as error:                 # never let the follower die
                log.exception("changes follower failed")
                message = f"{type(error).__name__}: {error}"
                refused = True                          # a bug of ours: do not spin on it
            else:
                return
            if self.stopped:
                return
            if refused:
                delay = self._refused.next_delay()
                if "refused our credentials" in message:
                    # Typically the device's CouchDB user is not made yet: its code should run
                    # soon after it is, not a minute later.
                    delay = min(delay, CREDENTIALS_RETRY_SECONDS)
            else:
                delay = self._unreachable.next_delay()
            log.warning("server unreachable (%s); retrying in %.1f s", message, delay)
            self._emit(FeedState(connected=False, error=message))
            self._stop_event.wait(delay)

    def _follow(self) -> None:
        db = self._connect()
        try:
            current = db.update_seq()                  # before the read: nothing falls in between
        except NotFound:
            raise NotFound(f"database {db.name!r} does not exist on {redact(db.server_url)}") from None
        if self.since is None:
            self.since = current
        elif seq_ahead(self.since, current):
            # Seqs are opaque, but their leading number only grows: a database that is behind
            # our checkpoint was recreated or restored, and the old checkpoint would skip changes.
            log.warning("checkpoint %s is ahead of the database (%s): following from now", self.since, current)
            self.since = current
        docs = db.find(documents.find_selector(self._macid))
        known = {doc["_id"] for doc in docs}
        self._emit(Snapshot(docs=docs, seq=self.since))
        connected = False
        while not self.stopped:
            new_id = None
            selector = documents.feed_selector(self._macid, sorted(known))
            for change in db.changes(self.since, selector, self._heartbeat):
                if not connected:
                    connected = True
                    self._unreachable.reset()
                    self._refused.reset()
                    log.info("following changes of %s since %s", db, self.since)
                    self._emit(FeedState(connected=True))
                if self.stopped:
                    return
                if change is None:
                    continue
                self.since = change.seq
                self._emit(Changed(change))
                if change.doc_id not in known and change.doc and documents.is_code_doc(change.doc, self._macid):
                    new_id = change.doc_id
                    break
            if new_id is None:
                raise FeedEnded("the server ended the changes feed")
            # A new document of ours: follow it too, so its deletion or move reaches us.
            known.add(new_id)
