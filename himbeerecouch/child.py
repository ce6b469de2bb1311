"""The inside of one program's process: load the document's modules from strings, run main().

Started by the supervisor as `python3 -u -P -m himbeerecouch.child` (no working directory on
sys.path), or forked from the fork server (forkserver.py), which calls main() in a process set
up as that command would be. It reads the program (one JSON object: code, modules, how to reach the database) from
the file descriptor named by HIMBEERECOUCH_PROGRAM_FD (a memfd the daemon filled, so writing it
never blocks the daemon), or else from the first line of stdin; then it watches stdin: end of
file means the daemon is gone, and the program is asked to quit, as with SIGTERM; after the grace
period its process group is killed.
Structured messages go to the daemon on the file descriptor named by HIMBEERECOUCH_REPORT_FD,
one JSON object per line: {"log": text}, {"error": text} (a failure that a retry may cure) and
{"fatal": text} (one that no retry can cure: a syntax error, no main()); an error that comes from
an exception carries its traceback too, {"error": text, "traceback": text} (older daemons ignore
the key). stdout and stderr stay the program's own (the traceback is printed on stderr as
always), and so does the exit code: the daemon never reads meaning into it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

EXIT_FAILED = 1
TRACEBACK_CHARS = 8000          # of a longer traceback, its end is sent (where the exception is)
# A report line longer than the daemon's longest line (output.MAX_LINE, 64 KiB) would be cut and
# so lost: the traceback is cut further when JSON's escapes make it that long.
REPORT_LINE_LIMIT = 60_000
REPORT_FD_ENV = "HIMBEERECOUCH_REPORT_FD"
PROGRAM_FD_ENV = "HIMBEERECOUCH_PROGRAM_FD"


class ProgramInvalid(Exception):
    """The document's code cannot run as it is (a syntax error): retrying will not help."""


class Reporter:
    """Writes JSON lines to the daemon; a daemon that went away is not the program's problem."""

    def __init__(self, fd: int | None) -> None:
        self._stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8") if fd is not None else None
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        line = json.dumps(message) + "\n"
        with self._lock:
            try:
                if self._stream is not None:
                    self._stream.write(line)
                else:
                    sys.stderr.write(line)
            except (OSError, ValueError):
                pass


class ProgramContext:
    """The names every module of the program sees (the original's public face)."""

    def __init__(self, reporter: Reporter, database: dict | None) -> None:
        self._reporter = reporter
        self._database_settings = database or {}
        self._database = None
        self._quit = threading.Event()
        self._notifications: list[Callable[[], Any]] = []
        self._served = False                 # the notifications were taken to be called
        self._lock = threading.Lock()

    def log(self, *args: Any) -> None:
        self._reporter.send(log=" ".join(str(arg) for arg in args))

    def should_quit(self) -> bool:
        return self._quit.is_set()

    def register_quit_notification(self, function: Callable[[], Any]) -> None:
        with self._lock:
            if not self._served:
                self._notifications.append(function)
                return
        self._run_notifications([function])            # too late for the others: call it now

    def remove_quit_notification(self, function: Callable[[], Any]) -> None:
        with self._lock:
            if function in self._notifications:
                self._notifications.remove(function)

    def get_database(self):
        """This Pi's own authenticated handle on the database (himbeerecouch.couch.Database)."""
        if self._database is None:
            from .couch import Database
            settings = self._database_settings
            if not settings.get("url"):
                raise RuntimeError("no database: the daemon runs without a server")
            credentials = settings.get("credentials")
            self._database = Database(settings["url"], settings["name"],
                                      credentials=tuple(credentials) if credentials else None,
                                      ca_file=settings.get("ca_file", ""))
        return self._database

    def get_acct(self) -> tuple[str, str] | None:
        """(user, password) this Pi uses on the server, as the original offered it."""
        credentials = self._database_settings.get("credentials")
        return tuple(credentials) if credentials else None

    def request_quit(self) -> None:
        self._quit.set()

    def serve_notifications(self) -> None:
        """The thread that calls the quit notifications, started with the program: when the
        quit comes, a fork bomb or a memory hog may leave no room for a new thread."""
        self._quit.wait()
        with self._lock:
            self._served = True
            functions = list(self._notifications)
        self._run_notifications(functions)

    def _run_notifications(self, functions: list[Callable[[], Any]]) -> None:
        for function in functions:
            try:
                function()
            except Exception:
                self.log("quit notification failed:\n" + traceback.format_exc().rstrip())

    def injected_names(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "should_quit": self.should_quit,
            "register_quit_notification": self.register_quit_notification,
            "remove_quit_notification": self.remove_quit_notification,
            "get_database": self.get_database,
            "get_acct": self.get_acct,
        }


class StringModuleFinder:
    """Imports the document's modules from their source strings, with the injected names.

    A meta path finder and loader by protocol (importlib.abc would cost ~8 ms per start)."""

    def __init__(self, sources: dict[str, str], names: dict[str, Any], origin: str) -> None:
        self.sources = sources
        self.names = names
        self.origin = origin

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"<{self.origin}:{fullname}>")

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__dict__.update(self.names)
        try:
            code = compile(self.sources[module.__name__], module.__spec__.origin, "exec")
        except (SyntaxError, ValueError) as error:        # ValueError: NUL bytes (Python < 3.12)
            raise ProgramInvalid(_describe(error)) from None
        exec(code, module.__dict__)


def _describe(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"SyntaxError in {error.filename} line {error.lineno}: {error.msg}"
    return f"{type(error).__name__}: {error}"


def run(spec: dict, reporter: Reporter) -> int:
    context = ProgramContext(reporter, spec.get("database"))
    # The handler only writes a byte: the quit notifications run on the watcher thread, so a
    # SIGTERM arriving while the main thread holds one of the context's locks cannot deadlock.
    quit_read, quit_write = os.pipe()
    os.set_blocking(quit_write, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: _poke(quit_write))
    # Python's own SIGINT handling even when the daemon was started with SIGINT ignored (in the
    # background of a shell): the program, and what it starts, get the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The pipe from the daemon moves off fd 0 (the program gets /dev/null there) and is read
    # raw: a daemon thread blocked in a buffered read would abort the interpreter at exit.
    daemon_pipe = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    threading.Thread(target=_watch, args=(daemon_pipe, quit_read, context, spec.get("grace_seconds", 20)),
                     daemon=True, name="quit-watch").start()
    threading.Thread(target=context.serve_notifications, daemon=True, name="quit-notifications").start()

    # The program's own modules win over the global ones; its code is the module `main`.
    sources = {**spec.get("global_modules", {}), **spec.get("modules", {}), "main": spec["code"]}
    sys.meta_path.insert(0, StringModuleFinder(sources, context.injected_names(), spec.get("doc_id", "?")))
    try:
        module = importlib.import_module("main")
    except ProgramInvalid as error:
        reporter.send(fatal=f"cannot load the program: {error}")
        return EXIT_FAILED
    except SystemExit:
        raise                       # the program's own exit, while it was imported
    except BaseException as error:
        # A sensor that is not ready, a module not installed yet: the daemon retries later.
        traceback.print_exc()
        _send_error(reporter, f"cannot load the program: {_describe(error)}")
        return EXIT_FAILED
    entry = getattr(module, "main", None)
    if not callable(entry):
        reporter.send(fatal="the program defines no main() function")
        return EXIT_FAILED
    try:
        entry()
    except SystemExit as exit_request:
        if exit_request.code not in (None, 0):
            reporter.send(error=f"main() exited with {exit_request.code!r}")
        raise
    except ProgramInvalid as error:
        reporter.send(fatal=f"cannot load a module of the program: {error}")
        return EXIT_FAILED
    except BaseException as error:
        traceback.print_exc()
        _send_error(reporter, f"main() raised {_describe(error)}")
        return EXIT_FAILED
    return 0


def cut_traceback(text: str, limit: int = TRACEBACK_CHARS) -> str:
    """`text`, or its last `limit` characters (where the exception is) when it is longer."""
    if len(text) <= limit:
        return text
    mark = "[...]\n"
    return mark + text[len(text) - limit + len(mark):]


def _send_error(reporter: Reporter, text: str) -> None:
    """{"error": text, "traceback": the exception being handled}, in one line the daemon reads whole."""
    trace: str | None = cut_traceback(traceback.format_exc())
    room = REPORT_LINE_LIMIT - len(json.dumps({"error": text, "traceback": ""}))
    while trace is not None and len(json.dumps(trace)) > room:
        trace = cut_traceback(trace, len(trace) // 2) if len(trace) > 100 else None
    reporter.send(error=text, traceback=trace)


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"q")
    except OSError:
        pass                        # full: a quit request is pending anyway


def _watch(daemon_pipe: int, quit_pipe: int, context: ProgramContext, grace_seconds: float) -> None:
    """Turn SIGTERM (a byte on quit_pipe) into a quit request; the end of the daemon's pipe too,
    and then also enforce the grace period, since nobody else is left to do it."""
    while True:
        try:
            ready, _, _ = select.select([daemon_pipe, quit_pipe], [], [])
        except InterruptedError:
            continue
        if quit_pipe in ready:
            os.read(quit_pipe, 4096)
            context.request_quit()
        if daemon_pipe in ready:
            try:
                data = os.read(daemon_pipe, 4096)
            except OSError:
                data = b""
            if not data:                # the daemon never writes: end of file means it is gone
                break
    context.request_quit()
    # No process outlives its daemon (outside systemd nothing else would end them).
    time.sleep(grace_seconds)
    os.killpg(0, signal.SIGKILL)


def _read_program() -> bytes:
    fd = os.environ.pop(PROGRAM_FD_ENV, None)
    if not fd:
        return sys.stdin.buffer.readline()
    with os.fdopen(int(fd), "rb") as stream:
        return stream.read()


def main() -> None:
    fd = os.environ.pop(REPORT_FD_ENV, None)
    reporter = Reporter(int(fd) if fd else None)
    try:
        spec = json.loads(_read_program())
    except (OSError, ValueError) as error:
        reporter.send(error=f"the daemon sent no program: {error}")
        sys.exit(EXIT_FAILED)
    sys.exit(run(spec, reporter))


if __name__ == "__main__":
    main()
