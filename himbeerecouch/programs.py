"""One child process per code document: start, stop, restart, and the state of each.

Only the daemon's main loop calls into this module (one owner, no locks). Each program is in one
named state, as in supervisor:

    STARTING -> RUNNING            a run that lasts start_seconds counts as a good start
    STARTING/RUNNING -> BACKOFF    it exited and the restart policy wants it again, after a delay
    STARTING/RUNNING -> EXITED     it exited and the policy does not restart it
    any -> FATAL                   the document cannot run (bad code, no main()) until it changes
    STARTING/RUNNING -> STOPPING   asked to quit (SIGTERM); killed with its process group at the deadline
    STOPPING -> STOPPED            disabled, or gone from the wanted set
"""
from __future__ import annotations

import enum
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from . import child
from .backoff import Backoff
from .documents import ProgramSpec

log = logging.getLogger(__name__)
program_log = logging.getLogger("himbeerecouch.program")

MAX_LINE = 64 * 1024             # longer output lines are cut, so a runaway program cannot eat memory
CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                  "LISTEN_FDNAMES")


class State(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    STOPPED = "STOPPED"


ALIVE = (State.STARTING, State.RUNNING, State.STOPPING)


def child_environment() -> dict[str, str]:
    """The daemon's environment without what belongs to systemd's dealings with the daemon."""
    return {key: value for key, value in os.environ.items() if key not in CHILD_ENV_DROP}


def now_iso(timespec: str = "seconds") -> str:
    return datetime.now(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == 0:
        return "exited normally"
    if returncode == child.EXIT_INVALID:
        return "could not load the program"
    return f"exited with code {returncode}"


@dataclass
class Program:
    spec: ProgramSpec
    fingerprint: str
    backoff: Backoff
    state: State = State.STOPPED
    process: subprocess.Popen | None = None
    restarts: int = 0
    starts: int = 0
    last_error: str | None = None
    last_exit: str | None = None
    since: str = field(default_factory=now_iso)
    started_at: float = 0.0
    started_with: dict | None = None     # the database settings the running process was given
    deadline: float | None = None        # STOPPING: kill time; BACKOFF: restart time
    stop_reason: str = ""
    next_spec: tuple[ProgramSpec, str] | None = None   # to start once the old process is gone
    remove_when_stopped: bool = False
    killed: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def set_state(self, state: State) -> None:
        if state != self.state:
            log.debug("%s: %s -> %s", self.name, self.state.value, state.value)
            self.state = state
            self.since = now_iso()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "rev": self.spec.rev,
            "state": self.state.value,
            "pid": self.process.pid if self.process and self.state in ALIVE else None,
            "restarts": self.restarts,
            "last_error": self.last_error or self.spec.error,
            "last_exit": self.last_exit,
            "since": self.since,
        }


class _Stream:
    """One pipe from a child, split into lines for the log."""

    def __init__(self, program: Program, fd: int, kind: str, close: Callable[[], None]) -> None:
        self.program = program
        self.fd = fd
        self.kind = kind             # "stdout", "stderr" or "report"
        self.close = close
        self.pending = b""
        os.set_blocking(fd, False)


class Supervisor:
    def __init__(self, *, grace_seconds: float, start_seconds: float, backoff_cap: float,
                 workdir: str, database_settings: dict | None,
                 watch_fd: Callable[[int, Any], None], unwatch_fd: Callable[[int], None],
                 on_change: Callable[[], None]) -> None:
        self.grace_seconds = grace_seconds
        self.start_seconds = start_seconds
        self.backoff_cap = backoff_cap
        self.workdir = workdir
        self.database_settings = database_settings
        self._watch_fd = watch_fd
        self._unwatch_fd = unwatch_fd
        self._on_change = on_change          # called when anything the status shows changed
        self.programs: dict[str, Program] = {}
        self._streams: dict[int, _Stream] = {}

    # ---- the wanted set -------------------------------------------------------------------

    def apply(self, wanted: dict[str, tuple[ProgramSpec, str]]) -> None:
        """Bring the programs to `wanted` (doc id -> (spec, fingerprint)); only what differs is touched."""
        for doc_id, program in list(self.programs.items()):
            if doc_id not in wanted:
                program.next_spec = None
                program.remove_when_stopped = True
                self._stop(program, "its document is gone")
        for doc_id, (spec, fingerprint) in wanted.items():
            program = self.programs.get(doc_id)
            if program is None:
                program = Program(spec=spec, fingerprint=fingerprint,
                                  backoff=Backoff(first=1.0, cap=self.backoff_cap))
                self.programs[doc_id] = program
                self._begin(program)
            elif program.fingerprint != fingerprint or program.remove_when_stopped:
                program.remove_when_stopped = False
                if program.state in ALIVE:
                    program.next_spec = (spec, fingerprint)
                    self._stop(program, "its document changed")
                else:
                    self._replace(program, spec, fingerprint)
                    self._begin(program)
            elif program.state in ALIVE and program.started_with != self.database_settings:
                # Server, database or credentials changed (SIGHUP): get_database() must follow.
                program.next_spec = (spec, fingerprint)
                self._stop(program, "the database settings changed")

    def _replace(self, program: Program, spec: ProgramSpec, fingerprint: str) -> None:
        program.spec, program.fingerprint = spec, fingerprint
        program.backoff.reset()
        program.last_error = None
        program.deadline = None

    def _begin(self, program: Program) -> None:
        """First step for a (new or changed) spec: run it, or show why not."""
        spec = program.spec
        if spec.error:
            log.error("%s: %s: %s", spec.doc_id, spec.name, spec.error)
            program.set_state(State.FATAL)
        elif not spec.enabled:
            log.info("%s: disabled", spec.name)
            program.set_state(State.STOPPED)
        elif not spec.code:
            program.set_state(State.STOPPED)     # a library document: global modules only
        else:
            self._start(program)
        self._on_change()

    # ---- processes ------------------------------------------------------------------------

    def _start(self, program: Program) -> None:
        spec = program.spec
        payload = {"doc_id": spec.doc_id, "name": spec.name, "code": spec.code,
                   "modules": spec.modules, "global_modules": spec.global_modules,
                   "database": self.database_settings, "grace_seconds": self.grace_seconds}
        report_read, report_write = os.pipe()
        env = child_environment()
        env["PYTHONUNBUFFERED"] = "1"
        env[child.REPORT_FD_ENV] = str(report_write)
        try:
            process = subprocess.Popen(
                [sys.executable, "-u", "-m", "himbeerecouch.child"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(report_write,), env=env, cwd=self.workdir,
                start_new_session=True)   # its own process group, killed as a whole
        except OSError as error:
            os.close(report_read)
            program.last_error = f"cannot start a process: {error}"
            log.error("%s: %s", program.name, program.last_error)
            self._after_exit(program, None)
            return
        finally:
            os.close(report_write)
        program.process = process
        program.starts += 1
        program.started_at = time.monotonic()
        program.started_with = self.database_settings
        program.killed = False
        program.set_state(State.STARTING)
        for fd, kind, close in ((process.stdout.fileno(), "stdout", process.stdout.close),
                                (process.stderr.fileno(), "stderr", process.stderr.close),
                                (report_read, "report", lambda fd=report_read: os.close(fd))):
            self._streams[fd] = _Stream(program, fd, kind, close)
            self._watch_fd(fd, self)
        log.info("%s: started (pid %d, rev %s)", program.name, process.pid, spec.rev)
        try:
            process.stdin.write(json.dumps(payload).encode() + b"\n")
            process.stdin.flush()      # stdin stays open: its end tells the child the daemon is gone
        except OSError:
            pass                        # the child died at once; the exit is handled when reaped

    def _stop(self, program: Program, reason: str) -> None:
        if program.state in (State.STARTING, State.RUNNING):
            log.info("%s: stopping: %s", program.name, reason)
            program.stop_reason = reason
            program.set_state(State.STOPPING)
            program.deadline = time.monotonic() + self.grace_seconds
            try:
                program.process.send_signal(signal.SIGTERM)
            except OSError:
                pass
            self._on_change()
        elif program.state != State.STOPPING:
            self._finish_stop(program)

    def _finish_stop(self, program: Program) -> None:
        """The old process is gone (or never was): start what replaces it, or remove it."""
        program.deadline = None
        if program.next_spec is not None:
            spec, fingerprint = program.next_spec
            program.next_spec = None
            self._replace(program, spec, fingerprint)
            self._begin(program)
        elif program.remove_when_stopped:
            del self.programs[program.spec.doc_id]
            self._on_change()
        else:
            program.set_state(State.STOPPED)
            self._on_change()

    def stop_all(self, reason: str) -> None:
        for program in list(self.programs.values()):
            program.next_spec = None
            program.remove_when_stopped = False
            self._stop(program, reason)
            if program.state == State.BACKOFF:
                program.set_state(State.STOPPED)

    def alive(self) -> list[Program]:
        return [p for p in self.programs.values() if p.state in ALIVE]

    # ---- one turn of the loop -------------------------------------------------------------

    def tick(self) -> float | None:
        """Reap, enforce deadlines, restart what is due; returns the next deadline (monotonic)."""
        now = time.monotonic()
        for program in list(self.programs.values()):
            process = program.process
            if program.state in ALIVE and process is not None:
                returncode = process.poll()
                if returncode is not None:
                    self._reaped(program, returncode)
                    continue
                if program.state == State.STOPPING and program.deadline is not None and now >= program.deadline:
                    log.warning("%s: did not quit within %.0f s, killing its process group",
                                program.name, self.grace_seconds)
                    program.killed = True
                    program.deadline = None        # once: the kill is certain, reaping follows
                    kill_group(process.pid)
                elif program.state == State.STARTING and now - program.started_at >= self.start_seconds:
                    program.set_state(State.RUNNING)
                    program.backoff.reset()
                    self._on_change()
            elif program.state == State.BACKOFF and now >= program.deadline:
                program.restarts += 1
                self._start(program)
                self._on_change()
        deadlines = [p.deadline for p in self.programs.values() if p.deadline is not None]
        deadlines += [p.started_at + self.start_seconds for p in self.programs.values()
                      if p.state == State.STARTING]
        return min(deadlines) if deadlines else None

    def _reaped(self, program: Program, returncode: int) -> None:
        process = program.process
        kill_group(process.pid)          # whatever the program left behind goes with it
        for stream in [s for s in self._streams.values() if s.program is program]:
            self.read(stream.fd)
        try:
            process.stdin.close()
        except OSError:
            pass
        reason = describe_exit(returncode)
        if program.killed:
            reason += f" after the grace period of {self.grace_seconds:.0f} s"
        program.last_exit = reason
        log.log(logging.INFO if returncode == 0 or program.state == State.STOPPING else logging.WARNING,
                "%s: %s (pid %d)", program.name, reason, process.pid)
        if program.state == State.STOPPING:
            self._finish_stop(program)
        else:
            self._after_exit(program, returncode)

    def _after_exit(self, program: Program, returncode: int | None) -> None:
        """It stopped by itself: restart, or not, as its policy says."""
        if returncode == child.EXIT_INVALID:
            program.set_state(State.FATAL)
        elif program.spec.restart == "always" or (program.spec.restart == "on-failure" and returncode != 0):
            if time.monotonic() - program.started_at >= self.start_seconds:
                program.backoff.reset()
            delay = program.backoff.next_delay()
            program.deadline = time.monotonic() + delay
            program.set_state(State.BACKOFF)
            log.info("%s: restarting in %.1f s", program.name, delay)
        else:
            program.set_state(State.EXITED)
        self._on_change()

    # ---- output ---------------------------------------------------------------------------

    def read(self, fd: int) -> None:
        """Read what a child wrote on `fd` and log complete lines."""
        stream = self._streams.get(fd)
        if stream is None:
            return
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close(stream)
                return
            stream.pending += data
            *lines, stream.pending = stream.pending.split(b"\n")
            if len(stream.pending) > MAX_LINE:
                lines.append(stream.pending[:MAX_LINE] + b" [cut]")
                stream.pending = b""
            for line in lines:
                self._emit(stream, line)

    def _close(self, stream: _Stream) -> None:
        if stream.pending:
            self._emit(stream, stream.pending)
            stream.pending = b""
        self._unwatch_fd(stream.fd)
        del self._streams[stream.fd]
        stream.close()

    def _emit(self, stream: _Stream, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        name = stream.program.name
        if stream.kind != "report":
            program_log.log(logging.WARNING if stream.kind == "stderr" else logging.INFO,
                            "%s: %s", name, text)
            return
        try:
            message = json.loads(text)
        except ValueError:
            program_log.info("%s: %s", name, text)
            return
        if "log" in message:
            program_log.info("%s: %s", name, message["log"])
        if "error" in message:
            stream.program.last_error = str(message["error"])
            program_log.error("%s: %s", name, message["error"])
            self._on_change()

    def close(self) -> None:
        for stream in list(self._streams.values()):
            self._close(stream)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group; one that is gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
