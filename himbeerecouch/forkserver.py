"""A preloaded fork server ('zygote') that starts the programs, and the daemon's client of it.

A fresh interpreter costs ~50 ms and ~7 MB (19 MB once a program uses the database client) per
start. The fork server is started once by the daemon as `python3 -u -P -m himbeerecouch.forkserver
FD`: it imports the child side and what programs commonly need (the database client), freezes
what it has (gc.freeze(), so that the collector never writes to the pages the programs share with
it), and then forks one process per program start on the daemon's request. It is single-threaded.

The protocol, on one AF_UNIX SOCK_SEQPACKET socket (one JSON object per message):

    server -> daemon   {"ready": pid}                          once, after the preload
    daemon -> server   {"cwd": dir, "env": {...}}              + 5 descriptors (SCM_RIGHTS): the
                                                                 program's stdin, stdout, stderr,
                                                                 report pipe and program memfd
    server -> daemon   {"pid": pid}  + its pidfd, or {"error": text}     the answer
    server -> daemon   {"exited": pid, "status": wait status}  when the server has reaped one

Each program process becomes what `python3 -u -P -m himbeerecouch.child` would be: its own session
and process group, the signal dispositions the server itself started with (those of a fresh
interpreter started by the daemon, ignored signals included), only its own descriptors
(0-2, the report pipe as 3, the program as 4), the environment and working directory the daemon
sent, the random generator seeded afresh. No program code ever runs in the server, so the modules
of one program are never seen by the next.

The daemon (ForkServer below) learns of exits from the pidfd (readable once the process is gone,
whoever reaps it) and takes the exit status from the server's report. A server that dies leaves
its programs running (they are in sessions of their own); their exit status is then unknown.
"""
from __future__ import annotations

import array
import atexit
import fcntl
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 1024          # a request carries the environment: well below this
PROGRAM_FDS = 5                   # stdin, stdout, stderr, report, program
REPORT_FD = 3                     # where the report pipe and the program land in a program
PROGRAM_FD = 4
START_TIMEOUT = 15.0              # for the preload (a Pi Zero takes seconds to import requests)
REPLY_TIMEOUT = 5.0               # for the answer to one spawn request
RETRY_SECONDS = 60.0              # after a failed start, programs start as fresh interpreters this long
QUICK_DEATHS = 3                  # this many deaths within RETRY_SECONDS count as "cannot start"
EXIT_REPORT_WAIT = 2.0            # a program gone without the server's report: status unknown after this
PRELOAD = ("himbeerecouch.child", "himbeerecouch.couch")


# ---- messages with descriptors ----------------------------------------------------------------

def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def receive(sock: socket.socket, max_fds: int = PROGRAM_FDS) -> tuple[dict | None, list[int]]:
    """One message and the descriptors that came with it (close-on-exec); (None, []) at the end."""
    size = array.array("i").itemsize
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(max_fds * size),
                                             getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % size])
    fds = list(fds)
    if not data and not fds:
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("a message was cut short")
    return json.loads(data), fds


# ---- the server -------------------------------------------------------------------------------

class _ProgramStart:
    """What a freshly forked program process goes on with, outside the server's loop."""

    def __init__(self, request: dict) -> None:
        self.request = request

    def run(self) -> None:
        from . import child
        sys.argv = [child.__file__]
        sys.modules["__main__"] = child      # as with `-m himbeerecouch.child`, not the server's
        try:
            child.main()
            code = None
        except SystemExit as request:
            code = request.code
        # What the interpreter does at exit before it tears itself down, then the exit itself:
        # the teardown (every preloaded module's objects, shared with the server) would cost
        # ~15 ms of every restart and copy pages for nothing. Anything but an exit request
        # (an exception) goes the interpreter's whole way.
        shutdown = getattr(threading, "_shutdown", None)       # CPython's own, not public API:
        run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # without them, the whole way
        if shutdown is None or run_exitfuncs is None:
            sys.exit(code)
        shutdown()                           # waits for the program's non-daemon threads
        run_exitfuncs()
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)     # sys.exit("message"), as Python reports it
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit((code or 0) & 0xFF)


def starting_signals() -> dict[int, Any]:
    """What a program exec'd by the daemon starts with: the dispositions of a fresh `python3`
    (default, SIGPIPE and SIGXFSZ ignored, SIGINT raising KeyboardInterrupt), and any signal the
    daemon itself found ignored (a shell's `&` ignores SIGINT and SIGQUIT, `nohup` SIGHUP) and
    does not catch: the daemon may start this server before it sets its handlers, and exec
    resets a caught signal to its default."""
    from .processes import DAEMON_SIGNALS
    found = {}
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if handler is not None:          # None: set outside Python; left alone
            found[signum] = handler
    for signum in DAEMON_SIGNALS:
        found[signum] = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return found


def _restore_signals(dispositions: dict[int, Any]) -> None:
    for signum, handler in dispositions.items():
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError):
            pass                 # the C library's reserved real-time signals
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _retitle(argv: list[str]) -> None:
    """Show `argv` as this process's command line (ps, pgrep -a), written over the server's,
    which is longer: a forked program looks as `python3 -u -P -m himbeerecouch.child` does.
    Best effort: where /proc/self/mem cannot be written, it keeps the server's."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])          # arg_start, arg_end (proc(5))
        data = b"\0".join(os.fsencode(arg) for arg in argv) + b"\0"
        if len(data) > end - start:
            return
        fd = os.open("/proc/self/mem", os.O_WRONLY)
        try:
            os.pwrite(fd, data.ljust(end - start, b"\0"), start)
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        pass


def _become_program(request: dict, fds: list[int], server_fds: list[int],
                    dispositions: dict[int, Any]) -> _ProgramStart:
    """In the forked child: only its own descriptors, session, signals, environment, directory."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    _restore_signals(dispositions)
    for fd in server_fds:
        os.close(fd)
    # Above every number they go to, then down into place: 0-2 the standard streams, 3 the
    # report pipe, 4 the program; everything else is closed.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(PROGRAM_FDS, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    _retitle([sys.orig_argv[0], "-u", "-P", "-m", "himbeerecouch.child"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import random
    random.seed()                # also done at fork by random itself; one more does no harm
    return _ProgramStart(request)


def _preload() -> list[str]:
    loaded = []
    for name in PRELOAD:
        try:
            __import__(name)
            loaded.append(name)
        except Exception as error:           # a program imports it itself, and sees the error then
            sys.stderr.write(f"himbeerecouch fork server: cannot preload {name}: {error}\n")
    return loaded


def serve(sock: socket.socket) -> _ProgramStart | None:
    """The server's loop; returns in the forked program processes (with what they run) and, with
    None, when the daemon has closed its end."""
    dispositions = starting_signals()                # what each program starts with
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)        # the daemon's business, not the server's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _preload()
    gc.collect()
    gc.freeze()                  # the collector never touches what the programs share with us
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    send(sock, {"ready": os.getpid()})
    while True:
        for fd, _ in poller.poll():
            if fd == wake_read:
                try:
                    while os.read(wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(sock)
                continue
            try:
                request, fds = receive(sock)
            except (OSError, ValueError) as error:
                sys.stderr.write(f"himbeerecouch fork server: bad request: {error}\n")
                continue
            if request is None:
                return None                          # the daemon is gone
            if len(fds) != PROGRAM_FDS:
                for received in fds:
                    os.close(received)
                send(sock, {"error": f"a request needs {PROGRAM_FDS} descriptors, not {len(fds)}"})
                continue
            try:
                pid = os.fork()
            except OSError as error:
                for received in fds:
                    os.close(received)
                send(sock, {"error": f"fork: {error.strerror or error}"})
                continue
            if pid == 0:
                return _become_program(request, fds, [sock.detach(), wake_read, wake_write], dispositions)
            for received in fds:
                os.close(received)
            try:
                pidfd = os.pidfd_open(pid)          # before any reaping: it names this process
            except (OSError, AttributeError):
                send(sock, {"pid": pid})
            else:
                send(sock, {"pid": pid}, [pidfd])
                os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send(sock, {"exited": pid, "status": status})


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    try:
        start = serve(sock)
    except (BrokenPipeError, ConnectionError):
        start = None                                 # the daemon is gone
    if start is None:
        sys.exit(0)
    start.run()


# ---- the daemon's side --------------------------------------------------------------------------

class ServerGone(OSError):
    """The fork server is not there (any more) to start a program."""


class _Server:
    """One fork server process, from its start until it is closed."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.ready = False
        self.alive = True
        self.retiring = False
        self.children = 0                            # its programs the daemon has not reaped yet
        self.statuses: dict[int, int] = {}           # pid -> wait status, as reported
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [python, "-u", "-P", "-m", "himbeerecouch.forkserver", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                env=env, cwd="/", start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)      # the loop reads it when ready; waits for an answer use select
        self.sock = ours
        self.pid = self.process.pid

    def close(self, timeout: float = 2.0) -> None:
        """Close our end: the server exits at once (its programs keep running)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.alive = False
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _ended(server: _Server) -> str:
    from .programs import describe_exit           # (programs imports this module's user)
    code = server.process.returncode
    return describe_exit(code) if code is not None else "ended"


class ServedProcess:
    """A program started by the fork server: not the daemon's child, so the exit status comes
    from the server; the pidfd (from the server too) says when it is gone and signals it safely."""

    how = "fork-server"

    def __init__(self, server: _Server, pid: int, pidfd: int | None, stdin_fd: int) -> None:
        self.server = server
        self.pid = pid
        self.exit_fd = pidfd
        self._stdin_fd = stdin_fd
        self.stdout_fd = self.stderr_fd = -1          # our ends of its output pipes
        self.returncode: int | None = None
        self.ended = False
        self.gone_since: float | None = None         # the pidfd said it ended; no report yet
        server.children += 1

    def send_signal(self, signum: int) -> None:
        if self.ended:
            return
        if self.exit_fd is not None:
            try:
                signal.pidfd_send_signal(self.exit_fd, signum)
                return
            except ProcessLookupError:
                return
            except OSError:
                pass                 # a seccomp filter without pidfd_send_signal: by its pid
        os.kill(self.pid, signum)

    def poll(self) -> bool:
        """Whether it has ended: `returncode` is then its exit code (negative: the signal), or
        None when nobody can tell any more (the server that reaped it is gone)."""
        if self.ended:
            return True
        status = self.server.statuses.pop(self.pid, None)
        if status is not None:
            self.returncode, self.ended = os.waitstatus_to_exitcode(status), True
        elif self.gone_since is not None and (not self.server.alive
                                              or time.monotonic() - self.gone_since >= EXIT_REPORT_WAIT):
            self.ended = True
        elif self.exit_fd is None and not self.server.alive:
            # No pidfd (the server could not make one) and nobody left to report: asked by pid.
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.ended = True
            except PermissionError:
                pass
        return self.ended

    def closers(self) -> dict[int, Callable[[], None]]:
        return {self.stdout_fd: lambda: os.close(self.stdout_fd), self.stderr_fd: lambda: os.close(self.stderr_fd)}

    def report_deadline(self) -> float | None:
        if not self.ended and self.gone_since is not None and self.server.alive:
            return self.gone_since + EXIT_REPORT_WAIT
        return None

    def close(self) -> None:
        """After the exit: our end of its stdin and the pidfd."""
        for fd in (self._stdin_fd, self.exit_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._stdin_fd = self.exit_fd = None
        self.server.children -= 1


class ForkServer:
    """The daemon's client of its fork server: starts it, asks it for programs, notices when it
    dies (a new one is started; its programs go on) and falls back to fresh interpreters when
    none can be started.

    `watch_fd(fd, self)` / `unwatch_fd(fd)` put the server's socket into the daemon's selector;
    the loop calls read(fd) when it is ready. `on_change()` is told when the status changed."""

    def __init__(self, *, python: str = sys.executable, env: Callable[[], dict[str, str]],
                 watch_fd: Callable[[int, Any], None], unwatch_fd: Callable[[int], None],
                 on_change: Callable[[], None] = lambda: None,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.python = python
        self._env = env
        self._watch_fd = watch_fd
        self._unwatch_fd = unwatch_fd
        self._on_change = on_change
        self.start_timeout = start_timeout
        self.server: _Server | None = None
        self.retired: list[_Server] = []             # replaced, kept until their programs are gone
        self.error: str | None = None                # why programs start as fresh interpreters now
        self._retry_at = 0.0
        self._deaths: list[float] = []
        self._by_fd: dict[int, _Server] = {}
        self.enabled = True                          # False: spawn = exec (servers only retire)

    # ---- the server's life ----------------------------------------------------------------

    def start(self) -> bool:
        """Start a server (not waiting for its preload); False, logged, when that fails."""
        try:
            server = _Server(self.python, self._env())
        except (OSError, ValueError) as error:
            self._failed(f"cannot start it: {error}")
            return False
        self.server = server
        self._by_fd[server.sock.fileno()] = server
        self._watch_fd(server.sock.fileno(), self)
        log.info("fork server starting (pid %d)", server.pid)
        return True

    def disable(self) -> None:
        """spawn = exec from now on: the server retires (it stays while its programs run)."""
        self.enabled = False
        if self.server is not None:
            self._retire(self.server)
            self.server = None
        self.error = None
        self._on_change()

    def replace(self) -> None:
        """A new server for the next starts (new code on disk reaches them); the old one stays
        until its programs are gone, so that their exit status is known."""
        self.enabled = True
        old = self.server
        self.server = None
        self.error, self._retry_at, self._deaths = None, 0.0, []
        if old is not None:
            self._retire(old)
        if self.start():
            log.info("fork server replaced: programs start from pid %d from now on", self.server.pid)
        self._on_change()

    def _retire(self, server: _Server) -> None:
        server.retiring = True
        if server.children == 0 or not server.alive:
            self._close(server)
        else:
            self.retired.append(server)

    def _close(self, server: _Server) -> None:
        if server.sock is not None:
            fd = server.sock.fileno()
            self._by_fd.pop(fd, None)
            self._unwatch_fd(fd)
        server.close()
        if server in self.retired:
            self.retired.remove(server)

    def _failed(self, reason: str) -> None:
        self.error = f"fork server {reason}"
        self._retry_at = time.monotonic() + RETRY_SECONDS
        log.error("%s; programs start as fresh interpreters (spawn = exec) for now, another try "
                  "in %.0f s", self.error, RETRY_SECONDS)
        self._on_change()

    def _lost(self, server: _Server) -> None:
        """Its socket ended: the server exited or was killed."""
        if not server.alive:
            return
        was_ready = server.ready
        self._close(server)                          # also waits for its exit status
        if server is not self.server or not self.enabled:
            return                                   # a retired one: its programs are told by poll
        self.server = None
        what = _ended(server)
        if not was_ready:
            self._failed(f"{what} before it was ready (pid {server.pid})")
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RETRY_SECONDS] + [now]
        if len(self._deaths) >= QUICK_DEATHS:
            self._failed(f"{what} {len(self._deaths)} times within {RETRY_SECONDS:.0f} s")
            return
        log.warning("fork server (pid %d) %s; its %d program(s) keep running; starting a new one",
                    server.pid, what, server.children)
        self.start()
        self._on_change()

    # ---- messages -------------------------------------------------------------------------

    def read(self, fd: int) -> None:
        """The selector saw the server's socket ready."""
        server = self._by_fd.get(fd)
        while server is not None and server.alive:
            try:
                message, fds = receive(server.sock)
            except BlockingIOError:
                return
            except (OSError, ValueError) as error:
                log.error("fork server (pid %d): %s", server.pid, error)
                message, fds = None, []
            if message is None:
                self._lost(server)
                return
            for received in fds:
                os.close(received)                   # nothing unasked comes with descriptors
            self._message(server, message)

    def _message(self, server: _Server, message: dict) -> None:
        if "ready" in message:
            server.ready = True
            log.info("fork server ready (pid %d, preloaded in %.0f ms)", server.pid,
                     (time.monotonic() - server.started) * 1000)
            self._on_change()
        elif "exited" in message:
            server.statuses[int(message["exited"])] = int(message["status"])

    def _await(self, server: _Server, until: Callable[[dict, list[int]], bool], timeout: float) -> None:
        """Block on the server's socket until a message satisfies `until` (others are handled
        as read() would); ServerGone when it ends or takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([server.sock], [], [], left)[0]:
                    raise ServerGone(f"no answer within {timeout:.0f} s")
                message, fds = receive(server.sock)
                if message is None:
                    raise ServerGone("it ended")
                if until(message, fds):
                    return
                for received in fds:
                    os.close(received)
                self._message(server, message)
        except ServerGone:
            raise
        except (OSError, ValueError) as error:
            raise ServerGone(str(error)) from error

    def _usable(self) -> _Server | None:
        """The server to ask now, waiting for its preload if need be; None: use exec."""
        if self.server is None:
            if time.monotonic() < self._retry_at or not self.start():
                return None
        server = self.server
        if not server.ready:
            try:
                self._await(server, lambda message, fds: "ready" in message and not fds,
                            self.start_timeout)
            except ServerGone as error:
                self._close(server)                  # also waits for its exit status
                self.server = None
                self._failed(f"(pid {server.pid}) did not become ready: {error}, {_ended(server)}")
                return None
            self._message(server, {"ready": server.pid})
        if self.error:
            self.error = None
            log.info("fork server (pid %d) in use again", server.pid)
            self._on_change()
        return server

    # ---- starting a program -----------------------------------------------------------------

    def spawn(self, *, program_fd: int, report_fd: int, cwd: str, env: dict[str, str]) -> ServedProcess | None:
        """Start a program; None when no fork server can do it now (the caller uses exec).
        Returns with our ends of its stdin/stdout/stderr in the process object; raises OSError
        when the server could not fork (EAGAIN, ENOMEM): that is not the server's fault."""
        server = self._usable() if self.enabled else None
        if server is None:
            return None
        env = {**env, "HIMBEERECOUCH_REPORT_FD": str(REPORT_FD), "HIMBEERECOUCH_PROGRAM_FD": str(PROGRAM_FD)}
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        theirs = [stdin_read, stdout_write, stderr_write]
        ours = [stdin_write, stdout_read, stderr_read]
        answer: dict = {}

        def reply(message: dict, fds: list[int]) -> bool:
            if "pid" in message or "error" in message:
                answer.update(message, fds=fds)
                return True
            return False

        try:
            server.sock.setblocking(True)
            try:
                send(server.sock, {"cwd": cwd, "env": env}, theirs + [report_fd, program_fd])
            finally:
                server.sock.setblocking(False)
            self._await(server, reply, REPLY_TIMEOUT)
        except (ServerGone, OSError) as error:
            for fd in ours:
                os.close(fd)
            log.error("fork server (pid %d) failed a start: %s; killing it", server.pid, error)
            server.process.kill()
            server.process.wait()
            self._lost(server)
            return None
        finally:
            for fd in theirs:
                os.close(fd)
        if "error" in answer:
            for fd in ours + answer["fds"]:
                os.close(fd)
            raise OSError(answer["error"])
        fds = answer["fds"]
        process = ServedProcess(server, int(answer["pid"]), fds[0] if fds else None, stdin_write)
        process.stdout_fd, process.stderr_fd = stdout_read, stderr_read
        return process

    def exited(self, process: ServedProcess) -> None:
        """The daemon is done with one of its programs."""
        server = process.server
        if server.retiring and server.children == 0:
            self._close(server)

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        server = self.server
        return {"mode": "exec" if self.error or not self.enabled else "fork-server",
                "fork_server_pid": server.pid if server is not None else None,
                "error": self.error}

    def close(self) -> None:
        for server in [self.server] + list(self.retired):
            if server is not None:
                self._close(server)
        self.server = None

    def kill(self) -> None:
        for server in [self.server] + list(self.retired):
            if server is not None and server.alive:
                server.process.kill()
        self.close()


if __name__ == "__main__":
    main()
