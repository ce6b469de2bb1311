"""Command documents: run each `{"type": "<MacID>_cmd", "cmd": [...]}` once, write the result back.

At most once, across reconnects, duplicate notifications and crashes:
1. a command is *claimed* by writing `claimed` into its document with the `_rev` we saw; a
   conflict means someone changed it meanwhile: re-read and decide again;
2. a ledger in the state dir records each claimed command: claimed -> started -> finished
   (with its result, until the result is on the server). The "claimed" record is on disk
   (fsynced) before the claim is written, the "started" record before the command starts; when
   either cannot be written the command is not run and its document says so (final: see
   `not_run_result`);
3. a document found claimed, without `ret`, that the ledger does not show as never started
   (the daemon died while it ran) is marked `"error": "interrupted"` and is not run again.
   The "started" record names the command's process group and a token in its environment, so
   a daemon that restarts after a crash first kills what is left of it, then reports what it
   found (still running and killed, or ended; the output is lost either way).
A document that has `ret` is never run.

What a command may do beyond the daemon's user (reboot, root) is `command_privileges`, see
privileges.py: a refused one gets a final answer that names the setting; a power action is
done once its result is written, so that it is not run again after the reboot.

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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import privileges
from .couch import CONNECTION_ERRORS, Conflict, Database, describe_error
from .privileges import HelperError, Plan, PowerRequest, Refused, RootProcess
from .processes import child_environment, kill_group, now_iso
from .state import StateDir

log = logging.getLogger(__name__)

CLAIMED, STARTED, FINISHED = "claimed", "started", "finished"
WRITTEN, MOOT = "written", "moot"          # what became of a result (CommandRunner._report)
INTERRUPTED_REASON = "interrupted: the daemon stopped while the command ran; it is not run again"
# Each run's token, in the command's environment: finds its processes after a daemon crash,
# even those that left its process group.
COMMAND_ENV = "HIMBEERECOUCH_COMMAND"


@dataclass(frozen=True)
class Limits:
    timeout: float            # seconds, when the document gives none
    output_cap: int           # bytes kept per stream
    workdir: str
    user: str = "rspby"       # the daemon's user, named in refusals


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


def decide(doc: dict, entry: dict | None) -> str:
    """What to do with a command document, given this Pi's ledger entry for it (or None).

    "drop": it has a result; "report": our result is not written yet; "claim": nobody has it;
    "run": we claimed it and never started it; "interrupted": claimed, and we may have started
    it (or lost the record): it is not run again.
    """
    state = entry.get("state") if entry else None
    if "ret" in doc:
        return "drop"
    if state == FINISHED:
        return "report"
    if "claimed" not in doc:
        return "claim"
    if state == CLAIMED:
        return "run"
    return "interrupted"


def not_run_result(error: "LedgerError") -> dict[str, Any]:
    """The result of a command whose claim or start could not be recorded in the state dir.

    Final (it has `ret`), not retried later: a command is a one-off request, running it hours
    later once someone has fixed the card would surprise; the sender gets an answer now instead
    of waiting; and a document with `ret` is never run, which keeps at most once simple.
    """
    return {"ret": [None, f"not run: the daemon cannot record this command in its state dir ({error}); "
                          "a command starts only once that record is on disk, so that no restart can "
                          "run it twice. Free or repair the state dir, then send the command again."],
            "returncode": None, "finished": now_iso("milliseconds"),
            "error": f"not run: cannot write the state dir ({error.reason})"}


def refused_result(reason: str) -> dict[str, Any]:
    """The final answer to a command this Pi's command_privileges do not allow."""
    return {"ret": [None, f"not run: {reason}"], "returncode": None, "finished": now_iso("milliseconds"),
            "error": "not allowed"}


def interrupted_result(entry: dict, what: str) -> dict[str, Any]:
    """The report of a command that a dead daemon started; `what` says what became of it."""
    result = {"ret": [None, f"interrupted: the daemon stopped while the command ran; {what}; "
                            "its output is lost; it is not run again"],
              "returncode": None, "finished": now_iso("milliseconds"), "error": "interrupted"}
    if isinstance(entry.get("started"), str):
        result["started"] = entry["started"]
    return result


# ---- processes of a command started by a daemon that died -------------------------------------

def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): tells a pid from its reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None           # field 22 of stat(5)


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")  # a zombie has ended


def _pids_with_token(token: str) -> list[int]:
    """Live processes whose environment carries this run's token (the command and whatever it
    started, wherever they went). Other users' processes cannot be read and cannot be ours."""
    needle = f"{COMMAND_ENV}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(name))
    return found


def _live_token_pids(token: Any) -> list[int]:
    return [pid for pid in _pids_with_token(token) if _alive(pid)] if isinstance(token, str) else []


def end_leftovers(entry: dict, before_kill: Callable[[], None] = lambda: None) -> str:
    """Kill what is left of a command that a dead daemon started; say what was found.

    `before_kill` records that something was found (entry["killing"]), so that a daemon killed
    in turn before it records the report does not leave the next one to say "it had ended"."""
    recorded = entry.get("boot")
    if recorded and boot_id() and recorded != boot_id():
        return "the Pi restarted since, which ended it"
    if entry.get("as") == "root":
        # Root's processes are not ours to find or kill: the root helper killed its process
        # group when the daemon's connection closed, and its unit's stop killed the rest.
        return "it ran as root and the root helper ended it when the daemon went away"
    pgid, ticks = entry.get("pgid"), entry.get("start_ticks")
    where = f" (process group {pgid})" if isinstance(pgid, int) else ""
    # The group is ours while its leader is the very process we started (not a reused pid).
    leader = isinstance(pgid, int) and pgid > 1 and ticks is not None and start_ticks(pgid) == ticks \
        and _alive(pgid)
    pids = _live_token_pids(entry.get("token"))
    if not (leader or pids):
        if entry.get("killing"):
            return f"it was still running{where} and was killed"
        return f"it had ended{where}" if where else "it did not start or had ended"
    before_kill()
    if leader:
        kill_group(pgid)
    for _ in range(20):                                  # until no fork slips through
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)
        pids = _live_token_pids(entry.get("token"))
        if not pids:
            break
    return f"it was still running{where} and was killed"


def _decode(data: bytes, dropped: int, cap: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} more bytes not kept; the limit is {cap} bytes]"
    return text


class UserProcess(subprocess.Popen):
    """A command run as the daemon's user, in its own process group (killed as a whole)."""

    def __init__(self, argv: list[str], limits: Limits, env: dict[str, str]) -> None:
        super().__init__(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=limits.workdir, env={**child_environment(), **env}, start_new_session=True)

    def kill_tree(self) -> None:
        kill_group(self.pid)


def run_command(argv: list[str], timeout: float, limits: Limits,
                on_start: Callable[[Any], None] = lambda process: None,
                env: dict[str, str] | None = None,
                start: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run argv (no shell) with a timeout and capped output; the result fields of the document.
    `env` is added to the daemon's environment. `start` starts it some other way (as root):
    it returns what UserProcess offers, or raises OSError or HelperError."""
    started = now_iso("milliseconds")
    try:
        process = start() if start else UserProcess(argv, limits, env or {})
    except (OSError, ValueError, HelperError) as error:
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
                process.kill_tree()
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
                process.kill_tree()
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


class LedgerError(Exception):
    """A ledger record could not be written to the state dir (full, read-only, failing)."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.reason = error.strerror or str(error)
        super().__init__(f"{path}: {self.reason}")


class Ledger:
    """The commands this Pi has claimed and not yet reported, kept in the state dir."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = state.load_ledger()
        self._closed = False

    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(doc_id)
            return dict(entry) if entry else None

    def set(self, doc_id: str, entry: dict, durable: bool = True) -> bool:
        """Record `entry`. durable: on disk or LedgerError, and then memory keeps the old entry
        (what the disk says). Otherwise (results, pids) a failed write is logged, memory keeps
        the new entry and the next write that succeeds stores it; returns whether it is on disk."""
        with self._lock:
            previous = self._entries.get(doc_id)
            self._entries[doc_id] = entry
            try:
                if self._closed:
                    raise OSError("the ledger is closed: its command runner was replaced")
                self._state.save_ledger(self._entries)
                return True
            except OSError as error:
                failure = LedgerError(self._state.path / self._state.LEDGER, error)
                if durable:
                    if previous is None:
                        del self._entries[doc_id]
                    else:
                        self._entries[doc_id] = previous
                    raise failure from error
                log.error("cannot write the command ledger: %s", failure)
                return False

    def drop(self, doc_id: str) -> None:
        """Forget a reported command; if the disk refuses, its record says "reported or started"
        there, which never leads to a run."""
        with self._lock:
            if self._entries.pop(doc_id, None) is not None and not self._closed:
                try:
                    self._state.save_ledger(self._entries)
                except OSError as error:
                    log.error("cannot write the command ledger: %s", error)

    def close(self) -> None:
        """No more writes: a runner that is replaced (SIGHUP, provisioning) may have a thread
        that outlives its stop(), and it must not overwrite the new runner's ledger."""
        with self._lock:
            self._closed = True

    def with_state(self, state: str) -> list[str]:
        with self._lock:
            return [doc_id for doc_id, entry in self._entries.items() if entry.get("state") == state]

    def finished(self) -> list[str]:
        return self.with_state(FINISHED)


class CommandRunner:
    def __init__(self, *, connect: Callable[[], Database], macid: int, state: StateDir, limits: Limits,
                 max_parallel: int, privileges: str = privileges.NONE,
                 root_helper: str = privileges.DEFAULT_SOCKET) -> None:
        self._connect = connect
        self.macid = macid
        self.limits = limits
        self.privileges = privileges
        self.root_helper = root_helper
        self.ledger = Ledger(state)
        self._claims: queue.Queue = queue.Queue()
        self._runs: queue.Queue = queue.Queue()
        self._active: set[str] = set()                  # claimed or running in this process
        self._processes: dict[str, Any] = {}     # UserProcess or RootProcess
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
            process.kill_tree()
        self._claims.put(None)
        for _ in self._threads[1:]:
            self._runs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.ledger.close()

    # ---- claims (one thread) --------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            self.db = self._connect()
        return self.db

    def _claim_loop(self) -> None:
        self._recover()                                 # before any report or run
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

    def _recover(self) -> None:
        """Commands a dead daemon started: kill what is left of them, keep the report to write."""
        for doc_id in self.ledger.with_state(STARTED):
            entry = self.ledger.get(doc_id) or {}
            try:
                what = end_leftovers(entry, before_kill=lambda: self.ledger.set(
                    doc_id, {**entry, "killing": True}, durable=False))
            except Exception:                           # /proc unreadable: still report it
                log.exception("command %s: cannot look for its processes", doc_id)
                what = "its processes could not be checked"
            log.warning("command %s was running when the daemon stopped: %s", doc_id, what)
            self.ledger.set(doc_id, {"state": FINISHED, "result": interrupted_result(entry, what)},
                            durable=False)

    def _decide(self, doc: dict, attempts: int = 5) -> None:
        doc_id = doc["_id"]
        with self._lock:
            if doc_id in self._active:
                return                                  # ours, in progress: a duplicate notification
        for _ in range(attempts):
            fresh = doc.get("_retry") or "_rev" not in doc
            if fresh:
                doc = self._database().get(doc_id)
                if doc is None:
                    self.ledger.drop(doc_id)
                    return
            entry = self.ledger.get(doc_id)
            action = decide(doc, entry)
            if action == "interrupted" and not fresh:
                # The feed may bring the claimed revision after our result was written (the
                # ledger entry is gone by then): only the server's current document can tell.
                doc = {"_id": doc_id}
                continue
            try:
                if action == "drop":
                    self.ledger.drop(doc_id)            # done, by us or anyone: never run again
                elif action == "report":
                    outcome = self._report(doc, entry["result"])
                    if outcome:
                        self.ledger.drop(doc_id)
                    if outcome == WRITTEN and entry.get("then"):
                        self._power_after_report(doc_id, entry["then"])
                elif action == "claim":
                    self._claim(doc)
                elif action == "run":
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
        try:
            self._plan(doc)
        except Refused as refusal:
            log.warning("command %s not run: %s", doc["_id"], refusal)
            self._write_result(doc, refused_result(str(refusal)))
            return
        try:
            self.ledger.set(doc["_id"], {"state": CLAIMED})
        except LedgerError as error:
            log.error("command %s not run: cannot record its claim: %s", doc["_id"], error)
            self._write_result(doc, not_run_result(error))
            return
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
            power: PowerRequest | None = None
            try:
                if self._stopping.is_set():
                    continue                            # claimed, not started: run at next start
                result, power = self._run(doc)
                finished = {"state": FINISHED, "result": result, **({"then": power.action} if power else {})}
                self.ledger.set(doc_id, finished, durable=False)
                log.info("command %s: return code %s%s", doc_id, result["returncode"],
                         f" ({result['error']})" if "error" in result else "")
                db = db or self._connect()
                outcome = self._report(doc, result, db)
                if outcome:
                    self.ledger.drop(doc_id)
                if power and outcome == WRITTEN:
                    self._go(doc_id, power, db)
                    power = None
            except (*CONNECTION_ERRORS, OSError) as error:
                log.warning("command %s: cannot write its result yet (%s); kept in the ledger", doc_id,
                            describe_error(error))
                db = None
            except Exception:
                log.exception("command %s: unexpected failure", doc_id)
            finally:
                if power is not None:
                    power.cancel()                      # not written: asked again once it is
                with self._lock:
                    self._active.discard(doc_id)
                    self._processes.pop(doc_id, None)

    def _plan(self, doc: dict) -> Plan:
        return privileges.plan(doc, self.privileges, self.limits.user)

    def _run(self, doc: dict) -> tuple[dict[str, Any], PowerRequest | None]:
        """Record the start durably, then run; the result fields of the document, and the power
        action to do once they are written."""
        doc_id = doc["_id"]
        try:
            plan = self._plan(doc)
        except Refused as refusal:                      # the setting changed since the claim
            return refused_result(str(refusal)), None
        if plan.how == "power":
            return self._prepare_power(doc_id, plan)
        token = uuid.uuid4().hex
        record = {"state": STARTED, "token": token, "boot": boot_id(), "started": now_iso("milliseconds"),
                  **({"as": "root"} if plan.how == "root" else {})}
        try:
            self.ledger.set(doc_id, record)
        except LedgerError as error:
            log.error("command %s not run: cannot record its start: %s", doc_id, error)
            return not_run_result(error), None

        def on_start(process: Any) -> None:
            self._track(doc_id, process)
            # Best effort: if this is lost, the token still finds the processes after a crash.
            if plan.how == "user":
                self.ledger.set(doc_id, {**record, "pid": process.pid, "pgid": process.pid,
                                         "start_ticks": start_ticks(process.pid)}, durable=False)

        timeout = doc.get("timeout") or self.limits.timeout
        argv = list(plan.argv)
        log.info("command %s: running %s%s", doc_id, argv, " as root" if plan.how == "root" else "")
        start = (lambda: RootProcess(self.root_helper, argv, token)) if plan.how == "root" else None
        result = run_command(argv, timeout, self.limits, on_start=on_start, env={COMMAND_ENV: token},
                             start=start)
        if self._stopping.is_set() and result.get("returncode", 0) == -signal.SIGKILL:
            result["error"] = "interrupted"
            result["ret"][1] += f"\n[{INTERRUPTED_REASON}]"
        return result, None

    def _prepare_power(self, doc_id: str, plan: Plan) -> tuple[dict[str, Any], PowerRequest | None]:
        """Ask the root helper whether it will do the action; the result says what happens next."""
        started = now_iso("milliseconds")
        what = privileges.WHAT[plan.action]
        try:
            request = PowerRequest(self.root_helper, plan.action)
        except HelperError as error:
            log.error("command %s: cannot %s: %s", doc_id, what, error)
            return {"ret": [None, f"not run: cannot {what}: {error}"], "returncode": None, "started": started,
                    "finished": now_iso("milliseconds"), "error": f"not run: {error}"}, None
        log.info("command %s: will %s once its result is written", doc_id, what)
        return {"ret": [f"{plan.action}: the root helper will {what} once this result is written\n", ""],
                "returncode": 0, "started": started, "finished": now_iso("milliseconds")}, request

    def _go(self, doc_id: str, request: PowerRequest, db: Database) -> None:
        """The result is written: the action now (the Pi may go down at once)."""
        what = privileges.WHAT[request.action]
        try:
            request.go()
            log.warning("command %s: asked the root helper to %s", doc_id, what)
        except HelperError as error:
            log.error("command %s: cannot %s: %s", doc_id, what, error)
            try:
                doc = db.get(doc_id)
                if doc is not None:
                    db.put({**doc, "error": f"the result was written, then {what} failed: {error}"})
            except (*CONNECTION_ERRORS, Conflict, OSError):
                pass

    def _power_after_report(self, doc_id: str, action: str) -> None:
        """A power command whose result was written late (the server was away): the action now,
        asked of the helper afresh."""
        try:
            request = PowerRequest(self.root_helper, action)
        except HelperError as error:
            log.error("command %s: cannot %s: %s", doc_id, privileges.WHAT[action], error)
            return
        self._go(doc_id, request, self._database())

    def _track(self, doc_id: str, process: Any) -> None:
        with self._lock:
            self._processes[doc_id] = process
        if self._stopping.is_set():
            process.kill_tree()

    def _report(self, doc: dict, result: dict, db: Database | None = None) -> str:
        """Write the result into the document, merging with whatever else changed meanwhile:
        WRITTEN, MOOT (deleted, or answered by someone else) or "" (not written)."""
        db = db or self._database()
        for _ in range(5):
            try:
                db.put({**doc, **result})
                return WRITTEN
            except Conflict:
                doc = db.get(doc["_id"])
                if doc is None or "ret" in doc:
                    return MOOT                         # deleted, or answered: nothing to add
        return ""
