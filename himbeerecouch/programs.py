"""One child process per code document: start, stop, restart, and the state of each.

Only the daemon's main loop calls into this module (one owner, no locks). Each program is in one
named state, as in supervisor, and moves only along TRANSITIONS (anything else is a bug):

    STARTING -> RUNNING            a run that lasts start_seconds counts as a good start
    STARTING/RUNNING -> BACKOFF    it exited and the restart policy wants it again, after a delay
    STARTING/RUNNING -> EXITED     it exited and the policy does not restart it
    -> FATAL                       what no retry can fix (bad document, syntax error, no main())
    STARTING/RUNNING -> STOPPING   asked to quit (SIGTERM); killed with its process group at the deadline
    STOPPING -> STOPPED            disabled, or gone from the wanted set
    -> BACKOFF                     also when no process could be started at all (EAGAIN, ENOMEM)
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
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote

from . import child
from .backoff import Backoff
from .documents import ProgramSpec
from .output import MAX_LINE, LineBudget, LineReader
from .processes import child_environment, kill_group, make_workdir, now_iso

if TYPE_CHECKING:
    from .forkserver import ForkServer
    from .outputtail import OutputTails

log = logging.getLogger(__name__)
program_log = logging.getLogger("himbeerecouch.program")

DRAIN_BUDGET = 1024 * 1024       # read from a dead program's pipes before they are closed
POLL_SECONDS = 1.0               # how often a process without a pidfd is asked whether it ended


class State(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    STOPPED = "STOPPED"


ALIVE = (State.STARTING, State.RUNNING, State.STOPPING)
_AT_REST = {State.STARTING, State.BACKOFF, State.FATAL, State.STOPPED}    # where a new spec may go
TRANSITIONS: dict[State, set[State]] = {
    State.STOPPED: _AT_REST,
    State.EXITED: _AT_REST,
    State.FATAL: _AT_REST,
    State.BACKOFF: _AT_REST,
    State.STARTING: {State.RUNNING, State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING},
    State.RUNNING: {State.BACKOFF, State.EXITED, State.FATAL, State.STOPPING},
    State.STOPPING: _AT_REST,
}


class TransitionError(RuntimeError):
    """A move between states that TRANSITIONS does not allow: a bug in the supervisor."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "ended with an unknown status (the fork server that started it is gone)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == 0:
        return "exited normally"
    return f"exited with code {returncode}"


def working_directory(base: Path, doc_id: str) -> Path:
    """A directory of the program's own under `base`, named after its document."""
    name = quote(doc_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]                # never ".", ".." or hidden
    if len(name) > 100:
        name = name[:60] + "-" + sha256(doc_id.encode()).hexdigest()[:16]
    return base / name


@dataclass
class Program:
    spec: ProgramSpec
    fingerprint: str
    backoff: Backoff
    state: State = State.STOPPED
    process: "ExecProcess | Any" = None    # ExecProcess or forkserver.ServedProcess
    restarts: int = 0
    starts: int = 0
    last_error: str | None = None
    last_exit: str | None = None
    fatal: str | None = None             # reported by this run's child: no retry can help
    since: str = field(default_factory=now_iso)
    started_at: float = 0.0
    started_with: dict | None = None     # the database settings the running process was given
    deadline: float | None = None        # STOPPING: kill time; BACKOFF: restart time
    stop_reason: str = ""
    next_spec: tuple[ProgramSpec, str] | None = None   # to start once the old process is gone
    remove_when_stopped: bool = False
    killed: bool = False
    lines: LineBudget = field(default_factory=LineBudget)
    output_drops: int = 0                # dropped lines of this read, not yet counted in the output tail

    @property
    def name(self) -> str:
        return self.spec.name

    def set_state(self, state: State) -> None:
        if state == self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.name}: {self.state.value} -> {state.value} is not a valid move")
        log.debug("%s: %s -> %s", self.name, self.state.value, state.value)
        self.state = state
        self.since = now_iso()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "rev": self.spec.rev,
            "state": self.state.value,
            "pid": self.process.pid if self.process and self.state in ALIVE else None,
            "spawn": self.process.how if self.process else None,
            "restarts": self.restarts,
            "last_error": self.last_error or self.spec.error,
            "last_exit": self.last_exit,
            "since": self.since,
            "dropped_lines": self.lines.dropped,
        }


class ExecProcess:
    """A program started as a fresh interpreter: the daemon's own child."""

    how = "exec"

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.ended = False
        self.gone_since: float | None = None
        try:
            self.exit_fd: int | None = os.pidfd_open(popen.pid)   # readable once it has ended
        except (OSError, AttributeError):
            self.exit_fd = None                                    # Linux < 5.3: polled
        self.stdout_fd, self.stderr_fd = popen.stdout.fileno(), popen.stderr.fileno()

    def closers(self) -> dict[int, Callable[[], None]]:
        return {self.stdout_fd: self.popen.stdout.close, self.stderr_fd: self.popen.stderr.close}

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def poll(self) -> bool:
        if not self.ended and self.popen.poll() is not None:
            self.returncode, self.ended = self.popen.returncode, True
        return self.ended

    def report_deadline(self) -> float | None:
        return None

    def close(self) -> None:
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None


@dataclass
class _Pipe:
    program: Program
    reader: LineReader
    close: Callable[[], None]


class Supervisor:
    def __init__(self, *, grace_seconds: float, start_seconds: float, backoff_cap: float,
                 workdir: str, database_settings: dict | None,
                 watch_fd: Callable[[int, Any], None], unwatch_fd: Callable[[int], None],
                 on_change: Callable[[], None], python: str = sys.executable) -> None:
        self.grace_seconds = grace_seconds
        self.start_seconds = start_seconds
        self.backoff_cap = backoff_cap
        self.workdir = workdir               # each program gets a directory of its own below it
        self.database_settings = database_settings
        self.python = python
        self.fork_server: ForkServer | None = None   # None: every program is a fresh interpreter
        self.output: OutputTails | None = None       # the programs' output tails; None: none kept
        self._watch_fd = watch_fd
        self._unwatch_fd = unwatch_fd
        self._on_change = on_change          # called when anything the status shows changed
        self.programs: dict[str, Program] = {}
        self._pipes: dict[int, _Pipe] = {}
        self._exit_fds: dict[int, Program] = {}     # pidfds: readable when the program has ended

    def set_output(self, output: OutputTails | None) -> None:
        """Keep the programs' output tails there from now on (None: keep none)."""
        self.output = output
        if output is not None:
            for doc_id, program in self.programs.items():
                output.track(doc_id, program.name)

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
                if self.output is not None:
                    self.output.track(doc_id, spec.name)
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
        if self.output is not None:
            self.output.track(spec.doc_id, spec.name)
            self.output.clear_error(spec.doc_id)

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
        program.started_at = time.monotonic()     # also for a failed start: its back-off grows
        program.fatal = None
        payload = json.dumps({"doc_id": spec.doc_id, "name": spec.name, "code": spec.code,
                              "modules": spec.modules, "global_modules": spec.global_modules,
                              "database": self.database_settings,
                              "grace_seconds": self.grace_seconds}).encode()
        descriptors: list[int] = []
        try:
            # The program goes through a memfd: writing it never blocks the loop, whatever its size.
            program_fd = os.memfd_create("himbeerecouch-program", 0)
            descriptors.append(program_fd)
            os.write(program_fd, payload)
            os.lseek(program_fd, 0, os.SEEK_SET)
            report_read, report_write = os.pipe()
            descriptors += [report_read, report_write]
            workdir = self._workdir(spec.doc_id)
            env = child_environment()
            env["PYTHONUNBUFFERED"] = "1"
            process = None
            if self.fork_server is not None:
                process = self.fork_server.spawn(program_fd=program_fd, report_fd=report_write,
                                                 cwd=workdir, env=env)
            if process is None:
                process = self._exec(program_fd, report_write, workdir, env)
        except (OSError, ValueError) as error:
            for fd in descriptors:
                os.close(fd)
            program.last_error = f"cannot start a process: {error}"
            log.error("%s: %s", program.name, program.last_error)
            self._retry_later(program)
            return
        os.close(report_write)
        os.close(program_fd)
        program.process = process
        program.starts += 1
        program.started_with = self.database_settings
        program.killed = False
        program.set_state(State.STARTING)
        # stdin stays open and silent: its end tells the child the daemon is gone.
        closers = process.closers()
        closers[report_read] = lambda fd=report_read: os.close(fd)
        for fd, kind in ((process.stdout_fd, "stdout"), (process.stderr_fd, "stderr"), (report_read, "report")):
            reader = LineReader(fd, lambda line, program=program, kind=kind: self._line(program, kind, line))
            self._pipes[fd] = _Pipe(program, reader, closers[fd])
            self._watch_fd(fd, self)
        if process.exit_fd is not None:
            self._exit_fds[process.exit_fd] = program
            self._watch_fd(process.exit_fd, self)
        log.info("%s: started (pid %d, rev %s, %s)", program.name, process.pid, spec.rev, process.how)

    def _exec(self, program_fd: int, report_write: int, workdir: str, env: dict[str, str]) -> ExecProcess:
        env = {**env, child.REPORT_FD_ENV: str(report_write), child.PROGRAM_FD_ENV: str(program_fd)}
        return ExecProcess(subprocess.Popen(
            # -P: the working directory is not on sys.path, so a file a program writes
            # there (signal.py, json.py) cannot shadow a module of the next start.
            [self.python, "-u", "-P", "-m", "himbeerecouch.child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(report_write, program_fd), env=env, cwd=workdir,
            start_new_session=True))  # its own process group, killed as a whole

    def _workdir(self, doc_id: str) -> str:
        """The program's own working directory; "/" when the state dir cannot hold one."""
        if self.workdir == "/":
            return "/"
        return make_workdir(working_directory(Path(self.workdir), doc_id))

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
            if self.output is not None:
                self.output.forget(program.spec.doc_id)
            self._on_change()
        else:
            program.set_state(State.STOPPED)
            self._on_change()

    def stop_all(self, reason: str) -> None:
        for program in list(self.programs.values()):
            program.next_spec = None
            program.remove_when_stopped = False
            self._stop(program, reason)

    def alive(self) -> list[Program]:
        return [p for p in self.programs.values() if p.state in ALIVE]

    # ---- one turn of the loop -------------------------------------------------------------

    def tick(self) -> float | None:
        """Reap, enforce deadlines, restart what is due; returns the next deadline (monotonic)."""
        now = time.monotonic()
        polled = False
        for program in list(self.programs.values()):
            process = program.process
            if program.state in ALIVE and process is not None:
                # Only a process whose pidfd said it ended is asked (or one without a pidfd).
                if process.exit_fd is None or process.gone_since is not None:
                    if process.poll():
                        self._reaped(program, process.returncode)
                        continue
                    polled = polled or process.exit_fd is None
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
        deadlines += [due for p in self.programs.values() if p.state in ALIVE and p.process is not None
                      for due in [p.process.report_deadline()] if due is not None]
        if polled:
            deadlines.append(now + POLL_SECONDS)     # no pidfd: asked again in a while
        return min(deadlines) if deadlines else None

    def _reaped(self, program: Program, returncode: int | None) -> None:
        process = program.process
        kill_group(process.pid)          # whatever the program left behind goes with it
        for fd in [fd for fd, pipe in self._pipes.items() if pipe.program is program]:
            self._drain(fd)
        if process.exit_fd is not None and self._exit_fds.pop(process.exit_fd, None) is not None:
            self._unwatch_fd(process.exit_fd)
        process.close()
        if process.how == "fork-server" and self.fork_server is not None:
            self.fork_server.exited(process)
        reason = describe_exit(returncode)
        if program.killed:
            reason += f" after the grace period of {self.grace_seconds:.0f} s"
        program.last_exit = reason
        log.log(logging.INFO if returncode == 0 or program.state == State.STOPPING else logging.WARNING,
                "%s: %s (pid %d)", program.name, reason, process.pid)
        self._report_dropped(program, final=True)
        if program.state == State.STOPPING:
            self._finish_stop(program)
        else:
            self._after_exit(program, returncode)

    def _after_exit(self, program: Program, returncode: int) -> None:
        """It stopped by itself: restart, or not, as its policy says."""
        if program.fatal:
            program.last_error = program.fatal
            program.set_state(State.FATAL)
        elif program.spec.restart == "always" or (program.spec.restart == "on-failure" and returncode != 0):
            self._retry_later(program)
        else:
            program.set_state(State.EXITED)
        self._on_change()

    def _retry_later(self, program: Program) -> None:
        if time.monotonic() - program.started_at >= self.start_seconds:
            program.backoff.reset()
        delay = program.backoff.next_delay()
        program.deadline = time.monotonic() + delay
        program.set_state(State.BACKOFF)
        log.info("%s: restarting in %.1f s", program.name, delay)
        self._on_change()

    # ---- output ---------------------------------------------------------------------------

    def read(self, fd: int) -> None:
        """The loop saw `fd` ready: read one budget of it (see output.py), or, for a pidfd, the
        program has ended (tick() takes it from there)."""
        program = self._exit_fds.pop(fd, None)
        if program is not None:
            self._unwatch_fd(fd)
            program.process.gone_since = time.monotonic()
            return
        pipe = self._pipes.get(fd)
        if pipe is not None:
            if pipe.reader.read() is None:
                self._close(fd)
            self._count_drops(pipe.program)
            self._report_dropped(pipe.program)

    def _drain(self, fd: int) -> None:
        """The program is gone: take what it left in the pipe (bounded), then close it."""
        reader = self._pipes[fd].reader
        left = DRAIN_BUDGET
        while left > 0:
            got = reader.read()
            if not got:             # its end, or nothing more now (an escaped grandchild holds it)
                break
            left -= got
        self._close(fd)

    def _close(self, fd: int) -> None:
        pipe = self._pipes.pop(fd, None)
        if pipe is None:
            return
        pipe.reader.flush()
        self._count_drops(pipe.program)
        self._unwatch_fd(fd)
        pipe.close()

    def _line(self, program: Program, kind: str, raw: bytes) -> None:
        # What a program writes is its own business: a line the daemon fails on is dropped and
        # logged, never counted against the daemon (see faultguard.py), which would let a
        # program make it exit.
        try:
            text = raw[:MAX_LINE].decode("utf-8", errors="replace").rstrip("\r")
            if kind == "report":
                self._message(program, text)
                return
            kept = program.lines.allow()
            if kept:
                program_log.log(logging.WARNING if kind == "stderr" else logging.INFO,
                                "%s: %s", program.name, text)
            if self.output is not None:
                # The same lines as the log; a dropped one is only counted (see _count_drops).
                if kept:
                    self.output.line(program.spec.doc_id, program.name, kind, text)
                else:
                    program.output_drops += 1
        except Exception:
            if program.lines.allow():
                log.exception("%s: cannot handle a line of its %s; dropped", program.name, kind)

    def _count_drops(self, program: Program) -> None:
        """Dropped lines go to the output tail once per read, not one by one: a flooding program's
        lines are nearly all dropped, and each costs the loop as little as it can."""
        if program.output_drops:
            if self.output is not None:
                self.output.dropped(program.spec.doc_id, program.name, program.output_drops)
            program.output_drops = 0

    def _message(self, program: Program, text: str) -> None:
        """One line of the child's report pipe: a JSON object, or (from a confused program) text."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):      # RecursionError: nested too deeply
            message = None
        if not isinstance(message, dict):
            if program.lines.allow():
                program_log.info("%s: %s", program.name, text)
            return
        if "fatal" in message:
            program.fatal = str(message["fatal"])
        for key in ("log", "error", "fatal"):
            if key not in message:
                continue
            value = str(message[key])
            if key != "log":
                program.last_error = value
                if self.output is not None:
                    trace = message.get("traceback")
                    self.output.error(program.spec.doc_id, program.name, value,
                                      trace if isinstance(trace, str) else None)
            if program.lines.allow():
                program_log.log(logging.INFO if key == "log" else logging.ERROR, "%s: %s", program.name, value)
                if key != "log":
                    self._on_change()

    def _report_dropped(self, program: Program, final: bool = False) -> None:
        dropped = program.lines.take_report(final)
        if dropped:
            log.warning("%s: %d lines of output dropped (more than %d lines/s)", program.name, dropped,
                        program.lines.rate)
            self._on_change()

    def close(self) -> None:
        for fd in list(self._pipes):
            self._close(fd)
        for fd in list(self._exit_fds):
            del self._exit_fds[fd]
            self._unwatch_fd(fd)
