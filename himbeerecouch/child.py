"""The inside of one program's process: load the document's modules from strings, run main().

Started by the supervisor as `python3 -m himbeerecouch.child`. It reads one JSON line on stdin
(the program: code, modules, how to reach the database), then watches stdin: end of file means
the daemon is gone, and the program is asked to quit, as with SIGTERM; after the grace period
its process group is killed.
Structured messages (log lines, the reason of a failure) go to the daemon on the file
descriptor named by HIMBEERECOUCH_REPORT_FD, one JSON object per line; stdout and stderr stay
the program's own.

Exit codes: 0 main() returned, 1 main() raised, 3 the program cannot run (bad code, no main).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

EXIT_FAILED = 1
EXIT_INVALID = 3
REPORT_FD_ENV = "HIMBEERECOUCH_REPORT_FD"


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
        self._lock = threading.Lock()

    def log(self, *args: Any) -> None:
        self._reporter.send(log=" ".join(str(arg) for arg in args))

    def should_quit(self) -> bool:
        return self._quit.is_set()

    def register_quit_notification(self, function: Callable[[], Any]) -> None:
        with self._lock:
            self._notifications.append(function)
        if self._quit.is_set():
            self._run_notifications([function])

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
        if self._quit.is_set():
            return
        self._quit.set()
        with self._lock:
            functions = list(self._notifications)
        # Not inside a signal handler: the notifications are the program's code.
        threading.Thread(target=self._run_notifications, args=(functions,), daemon=True,
                         name="quit-notifications").start()

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
        code = compile(self.sources[module.__name__], module.__spec__.origin, "exec")
        exec(code, module.__dict__)


def _describe(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"SyntaxError in {error.filename} line {error.lineno}: {error.msg}"
    return f"{type(error).__name__}: {error}"


def run(spec: dict, reporter: Reporter) -> int:
    context = ProgramContext(reporter, spec.get("database"))
    signal.signal(signal.SIGTERM, lambda signum, frame: context.request_quit())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at a terminal is the daemon's to handle
    # The pipe from the daemon moves off fd 0 (the program gets /dev/null there) and is read
    # raw: a daemon thread blocked in a buffered read would abort the interpreter at exit.
    daemon_pipe = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    threading.Thread(target=_watch_daemon, args=(daemon_pipe, context, spec.get("grace_seconds", 20)),
                     daemon=True, name="daemon-watch").start()

    # The program's own modules win over the global ones; its code is the module `main`.
    sources = {**spec.get("global_modules", {}), **spec.get("modules", {}), "main": spec["code"]}
    sys.meta_path.insert(0, StringModuleFinder(sources, context.injected_names(), spec.get("doc_id", "?")))
    try:
        module = importlib.import_module("main")
    except BaseException as error:
        traceback.print_exc()
        reporter.send(error=f"cannot load the program: {_describe(error)}")
        return EXIT_INVALID
    entry = getattr(module, "main", None)
    if not callable(entry):
        reporter.send(error="the program defines no main() function")
        return EXIT_INVALID
    try:
        entry()
    except SystemExit as exit_request:
        if exit_request.code not in (None, 0):
            reporter.send(error=f"main() exited with {exit_request.code!r}")
        raise
    except BaseException as error:
        traceback.print_exc()
        reporter.send(error=f"main() raised {_describe(error)}")
        return EXIT_FAILED
    return 0


def _watch_daemon(fd: int, context: ProgramContext, grace_seconds: float) -> None:
    # The daemon never writes more after the program line: end of file means it is gone.
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    context.request_quit()
    # Nobody is left to enforce the grace period: the program does it to itself, so that no
    # process outlives its daemon (outside systemd nothing else would end them).
    time.sleep(grace_seconds)
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    fd = os.environ.pop(REPORT_FD_ENV, None)
    reporter = Reporter(int(fd) if fd else None)
    line = sys.stdin.buffer.readline()
    try:
        spec = json.loads(line)
    except ValueError:
        reporter.send(error="the daemon sent no program")
        sys.exit(EXIT_INVALID)
    sys.exit(run(spec, reporter))


if __name__ == "__main__":
    main()
