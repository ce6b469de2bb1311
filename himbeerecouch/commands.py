"""Command documents: run each `{"type": "<MacID>_cmd", "cmd": [...]}` once, write the result back.

At most once, across reconnects, duplicate notifications and crashes:
1. a command is *claimed* by writing `claimed` into its document with the `_rev` we saw; a
   conflict means someone changed it meanwhile: re-read and decide again;
2. a ledger in the state dir records each claimed command: claimed -> started -> finished
   (with its result, until the result is on the server);
3. a document found claimed, without `ret`, that the ledger does not show as never started
   (the daemon died while it ran) is marked `"error": "interrupted"` and is not run again.
A document that has `ret` is never run.

Claims happen on one thread, runs on `max_parallel` worker threads, so a long command delays
neither program restarts (another thread altogether) nor the claims of other commands.
"""
from __future__ import annotations

import logging
import os
import queue
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .couch import CONNECTION_ERRORS, Conflict, Database, describe_error
from .programs import child_environment, kill_group, now_iso
from .state import StateDir

log = logging.getLogger(__name__)

CLAIMED, STARTED, FINISHED = "claimed", "started", "finished"
INTERRUPTED_REASON = "interrupted: the daemon stopped while the command ran; it is not run again"


@dataclass(frozen=True)
class Limits:
    timeout: float            # seconds, when the document gives none
    output_cap: int           # bytes kept per stream
    workdir: str


def invalid_reason(doc: dict) -> str | None:
    """Why the command cannot run (a clear sentence for the document), or None."""
    cmd = doc.get("cmd")
    if cmd is None:
        return "no 'cmd': a command document needs \"cmd\": [\"program\", \"arg\", ...]"
    if not isinstance(cmd, list):
        return (f"'cmd' must be a list of strings (program and arguments; no shell), not "
                f"{type(cmd).__name__}")
    if not cmd:
        return "'cmd' is empty: it needs at least the program to run"
    if not all(isinstance(arg, str) for arg in cmd):
        bad = next(arg for arg in cmd if not isinstance(arg, str))
        return f"every element of 'cmd' must be a string; {bad!r} is {type(bad).__name__}"
    if any("\0" in arg for arg in cmd):
        return "'cmd' contains a NUL character"
    timeout = doc.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        return f"'timeout' must be a number of seconds greater than 0, not {timeout!r}"
    return None


def _decode(data: bytes, dropped: int, cap: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} more bytes not kept; the limit is {cap} bytes]"
    return text


def run_command(argv: list[str], timeout: float, limits: Limits,
                on_start: Callable[[subprocess.Popen], None] = lambda process: None) -> dict[str, Any]:
    """Run argv (no shell) with a timeout and capped output; the result fields of the document."""
    started = now_iso("milliseconds")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=limits.workdir, env=child_environment(),
                                   start_new_session=True)   # its own group: killed as a whole
    except (OSError, ValueError) as error:
        # The original's shape for a command that cannot start: [null, repr(error)].
        return {"ret": [None, repr(error)], "returncode": None, "started": started,
                "finished": now_iso("milliseconds"), "error": f"cannot start: {error}"}
    on_start(process)
    kept = {process.stdout: bytearray(), process.stderr: bytearray()}
    dropped = {process.stdout: 0, process.stderr: 0}
    deadline = time.monotonic() + timeout
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out:
                timed_out = True
                kill_group(process.pid)
            for key, _ in selector.select(0.2 if timed_out else min(remaining, 0.2)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                room = max(0, limits.output_cap - len(buffer))
                buffer += data[:room]
                dropped[key.fileobj] += len(data) - min(room, len(data))
            if process.poll() is not None:
                # Whatever it left running must not hold the pipes (or the Pi) forever.
                kill_group(process.pid)
    returncode = process.wait()
    for stream in kept:
        stream.close()
    result = {"ret": [_decode(kept[process.stdout], dropped[process.stdout], limits.output_cap),
                      _decode(kept[process.stderr], dropped[process.stderr], limits.output_cap)],
              "returncode": returncode, "started": started, "finished": now_iso("milliseconds")}
    if timed_out:
        result["error"] = f"timeout: killed after {timeout:g} s"
    if any(dropped.values()):
        result["truncated"] = True
    return result


class Ledger:
    """The commands this Pi has claimed and not yet reported, kept in the state dir."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = state.load_ledger()

    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(doc_id)
            return dict(entry) if entry else None

    def set(self, doc_id: str, **entry: Any) -> None:
        with self._lock:
            self._entries[doc_id] = entry
            self._state.save_ledger(self._entries)

    def drop(self, doc_id: str) -> None:
        with self._lock:
            if self._entries.pop(doc_id, None) is not None:
                self._state.save_ledger(self._entries)

    def finished(self) -> list[str]:
        with self._lock:
            return [doc_id for doc_id, entry in self._entries.items() if entry.get("state") == FINISHED]


class CommandRunner:
    def __init__(self, *, connect: Callable[[], Database], macid: int, state: StateDir, limits: Limits,
                 max_parallel: int) -> None:
        self._connect = connect
        self.macid = macid
        self.limits = limits
        self.ledger = Ledger(state)
        self._claims: queue.Queue = queue.Queue()
        self._runs: queue.Queue = queue.Queue()
        self._active: set[str] = set()                  # claimed or running in this process
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._claim_loop, name="command-claims", daemon=True)]
        self._threads += [threading.Thread(target=self._run_loop, name=f"command-runner-{n}", daemon=True)
                          for n in range(max_parallel)]
        self.db: Database | None = None

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def offer(self, doc: dict) -> None:
        """A command document was seen (feed or first read). Never blocks."""
        self._claims.put(doc)

    def retry_unreported(self) -> None:
        """Results that could not be written (server away, crash) are written on reconnection."""
        for doc_id in self.ledger.finished():
            self._claims.put({"_id": doc_id, "_retry": True})

    def stop(self, timeout: float = 5.0) -> None:
        """Kill running commands (they are reported interrupted) and wait a little for reports."""
        self._stopping.set()
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            kill_group(process.pid)
        self._claims.put(None)
        for _ in self._threads[1:]:
            self._runs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- claims (one thread) --------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            self.db = self._connect()
        return self.db

    def _claim_loop(self) -> None:
        while True:
            doc = self._claims.get()
            if doc is None or self._stopping.is_set():
                return
            try:
                self._decide(doc)
            except (*CONNECTION_ERRORS, OSError) as error:
                log.warning("command %s: server unreachable (%s); it is handled when the server is back",
                            doc.get("_id"), describe_error(error))
                self.db = None
            except Exception:
                log.exception("command %s: unexpected failure", doc.get("_id"))

    def _decide(self, doc: dict, attempts: int = 5) -> None:
        doc_id = doc["_id"]
        with self._lock:
            if doc_id in self._active:
                return                                  # ours, in progress: a duplicate notification
        for _ in range(attempts):
            if doc.get("_retry") or "_rev" not in doc:
                doc = self._database().get(doc_id)
                if doc is None:
                    self.ledger.drop(doc_id)
                    return
            entry = self.ledger.get(doc_id)
            if "ret" in doc:
                self.ledger.drop(doc_id)                # done, by us or anyone: never run again
                return
            if entry and entry.get("state") == FINISHED:
                if self._report(doc, entry["result"]):
                    self.ledger.drop(doc_id)
                return
            try:
                if "claimed" not in doc:
                    self._claim(doc)
                elif entry and entry.get("state") == CLAIMED:
                    self._queue(doc)                    # claimed before a crash, never started
                else:
                    log.warning("command %s was claimed but never finished: marking it interrupted", doc_id)
                    self._write_result(doc, {"ret": [None, INTERRUPTED_REASON], "returncode": None,
                                             "finished": now_iso("milliseconds"), "error": "interrupted"})
                    self.ledger.drop(doc_id)
                return
            except Conflict:
                doc = {"_id": doc_id}                   # changed under us: re-read, decide again
        log.error("command %s keeps changing; giving up for now", doc_id)

    def _claim(self, doc: dict) -> None:
        reason = invalid_reason(doc)
        if reason is not None:
            log.warning("command %s not run: %s", doc["_id"], reason)
            self._write_result(doc, {"ret": [None, reason], "returncode": None,
                                     "finished": now_iso("milliseconds"), "error": "invalid"})
            return
        self.ledger.set(doc["_id"], state=CLAIMED)
        try:
            claimed = self._database().put({**doc, "claimed": now_iso("milliseconds")})
        except BaseException:
            self.ledger.drop(doc["_id"])
            raise
        self._queue(claimed)

    def _queue(self, doc: dict) -> None:
        with self._lock:
            self._active.add(doc["_id"])
        self._runs.put(doc)

    def _write_result(self, doc: dict, result: dict) -> dict:
        return self._database().put({**doc, **result})

    # ---- runs (max_parallel threads) ------------------------------------------------------

    def _run_loop(self) -> None:
        db: Database | None = None
        while True:
            doc = self._runs.get()
            if doc is None:
                return
            doc_id = doc["_id"]
            try:
                if self._stopping.is_set():
                    continue                            # claimed, not started: run at next start
                self.ledger.set(doc_id, state=STARTED)
                timeout = doc.get("timeout") or self.limits.timeout
                log.info("command %s: running %s", doc_id, doc["cmd"])
                result = run_command(doc["cmd"], timeout, self.limits,
                                     on_start=lambda process: self._track(doc_id, process))
                if self._stopping.is_set() and result.get("returncode", 0) == -signal.SIGKILL:
                    result["error"] = "interrupted"
                    result["ret"][1] += f"\n[{INTERRUPTED_REASON}]"
                self.ledger.set(doc_id, state=FINISHED, result=result)
                log.info("command %s: return code %s%s", doc_id, result["returncode"],
                         f" ({result['error']})" if "error" in result else "")
                db = db or self._connect()
                if self._report(doc, result, db):
                    self.ledger.drop(doc_id)
            except (*CONNECTION_ERRORS, OSError) as error:
                log.warning("command %s: cannot write its result yet (%s); kept in the ledger", doc_id,
                            describe_error(error))
                db = None
            except Exception:
                log.exception("command %s: unexpected failure", doc_id)
            finally:
                with self._lock:
                    self._active.discard(doc_id)
                    self._processes.pop(doc_id, None)

    def _track(self, doc_id: str, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes[doc_id] = process
        if self._stopping.is_set():
            kill_group(process.pid)

    def _report(self, doc: dict, result: dict, db: Database | None = None) -> bool:
        """Write the result into the document, merging with whatever else changed meanwhile."""
        db = db or self._database()
        for _ in range(5):
            try:
                db.put({**doc, **result})
                return True
            except Conflict:
                doc = db.get(doc["_id"])
                if doc is None or "ret" in doc:
                    return True                         # deleted, or answered: nothing to add
        return False
