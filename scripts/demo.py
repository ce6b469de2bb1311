"""The demo behind scripts/demo (run with the project's virtualenv).

Stopping: SIGINT (Ctrl-C, whether to the process group or to this process alone), SIGTERM and
SIGHUP (the terminal closed) all stop the daemon (which stops its programs), then the server, and
the demo exits 0: a stop that was asked for is a success. The daemon and the server run in
sessions of their own, so a signal reaches this process only and everything stops in that order;
a second signal hurries the daemon on (it kills its programs at once). Were the demo killed
outright (SIGKILL), the kernel sends both SIGTERM. A daemon that exits by itself ends the demo
with the daemon's status. SIGINT or SIGHUP ignored from the start (nohup, a script's background
job) stay ignored.

The server keeps its databases in <workdir>/couch: the sample document, and an edit of it, are
there on the next run, and the daemon's feed checkpoint in <workdir>/state stays valid.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))       # this checkout's himbeerecouch, installed or not
from himbeerecouch.identity import IdentityError, getmacid  # noqa: E402
from himbeerecouch.processes import descendants  # noqa: E402

DATABASE = "nedm/raspberries"
ADMIN = ("admin", "demo")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DAEMON_STOP_TIMEOUT = 30.0      # its grace_seconds (5) and then some, before it is killed
SERVER_STOP_TIMEOUT = 15.0

SAMPLE = '''import socket, time

def main():
    n = 0
    while not should_quit():
        n += 1
        log("hello from %s, tick %d" % (socket.gethostname(), n))
        for _ in range(20):          # 2 s, but quick to notice a quit request
            if should_quit():
                break
            time.sleep(0.1)
    log("asked to quit, bye")
'''


# ---- signals and children ---------------------------------------------------------------------

class Stop(Exception):
    """A stop was asked for; args[0] is the signal."""


class Signals:
    """The first stop signal raises Stop wherever the demo is; later ones are counted, for
    stop_daemon to pass on (it cannot be interrupted by them)."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.more = 0

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            if signum != signal.SIGTERM and signal.getsignal(signum) == signal.SIG_IGN:
                continue    # nohup, or a background job of a script: that stays as it was asked
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.first is None:
            self.first = signum
            raise Stop(signum)
        self.more += 1


@contextlib.contextmanager
def signals_held():
    """No Stop while a child is being started, so none is started without the demo knowing."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def child_setup() -> None:
    """In a child before exec: signals as usual, and SIGTERM when the demo dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    with signals_held():
        return subprocess.Popen(cmd, start_new_session=True, preexec_fn=child_setup, **kwargs)


def stop_daemon(daemon: subprocess.Popen, signals: Signals) -> None:
    """SIGTERM, and one more for every further stop signal (the daemon then kills its programs at
    once); killed with everything below it if it has not stopped by the deadline."""
    sent = 0
    try:
        deadline = DAEMON_STOP_TIMEOUT
        while daemon.poll() is None and deadline > 0:
            if sent <= signals.more:
                daemon.send_signal(signal.SIGTERM)
                sent += 1
            try:
                daemon.wait(0.2)
            except subprocess.TimeoutExpired:
                deadline -= 0.2
    except ProcessLookupError:
        pass
    if daemon.poll() is None:
        say("demo: the daemon did not stop; killing it and its programs")
        for pid in [daemon.pid, *descendants(daemon.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon.wait()


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        server.wait(SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        # The terminal is gone (SIGHUP). Output goes nowhere from now on, so that what is left
        # in the buffers does not fail again at exit (Python's status 120).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


# ---- the demo ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description="Run himbeerecouch against a local test server.")
    parser.add_argument("--port", type=int, default=5984)
    parser.add_argument("--macid", type=int, help="MacID to use (default: this machine's)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "demo",
                        help="the server's data, config and state of the demo's daemon "
                        "(default: .cache/demo)")
    args = parser.parse_args()
    signals = Signals()
    signals.install()       # from the start: a stop while the server starts counts too
    server = daemon = None
    try:
        try:
            macid = args.macid or getmacid()
        except IdentityError as error:
            say(f"demo: {error}; pass --macid N")
            return 2
        port = args.port
        while not port_free(port):
            port += 1
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        data_dir, state_dir = workdir / "couch", workdir / "state"
        if not data_dir.exists() and state_dir.exists():
            # The daemon's state (feed checkpoint, last-known code) belongs to a server that is
            # gone (an older demo's, in memory, or a removed data dir): start it afresh.
            shutil.rmtree(state_dir)

        server = start([str(ROOT / "scripts" / "couch-server"), "--port", str(port),
                        "--admin", ":".join(ADMIN), "--data-dir", str(data_dir)],
                       stdout=subprocess.PIPE, text=True)
        line = server.stdout.readline()
        if not line.startswith("ready"):
            say("demo: the test server did not start")
            return 1
        base = f"http://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{port}"
        db_url = f"{base}/{quote(DATABASE, safe='')}"
        requests.put(db_url, timeout=10)
        doc_url = f"{db_url}/demo-hello"
        current = requests.get(doc_url, timeout=10).json()
        kept = "_rev" in current and current.get("type") == macid
        if not kept:            # new, or the last run's for another MacID; an edit of it is kept
            doc = {"type": macid, "name": "hello", "code": SAMPLE}
            if "_rev" in current:
                doc["_rev"] = current["_rev"]
            requests.put(doc_url, json=doc, timeout=10).raise_for_status()

        config = workdir / "himbeerecouch.conf"
        config.write_text("[himbeerecouch]\n"
                          f"server = {base}\n"
                          f"database = {DATABASE}\n"
                          f"macid = {macid}\n"
                          f"state_dir = {state_dir}\n"
                          "grace_seconds = 5\n")
        edit = json.dumps({"type": macid, "name": "hello",
                           "code": 'def main():\n    log("edited!")\n'})
        sample = ("The sample program is the document demo-hello" if not kept else
                  "The document demo-hello is the one the last run left")
        print(f"""
himbeerecouch demo: server http://127.0.0.1:{port} (admin {ADMIN[0]}:{ADMIN[1]}), database {DATABASE},
MacID {macid}, data kept in {workdir} (remove it to start afresh).
{sample}. Edit it from another terminal:

  REV=$(curl -s {doc_url} | python3 -c 'import json,sys; print(json.load(sys.stdin)["_rev"])')
  curl -X PUT "{doc_url}?rev=$REV" -H 'Content-Type: application/json' \\
       -d '{edit}'

and watch the program restart. Ctrl-C (or kill {os.getpid()}) stops everything.
""", flush=True)
        daemon = start([sys.executable, "-m", "himbeerecouch", "run", "--config", str(config)])
        returncode = daemon.wait()
        say(f"demo: the daemon exited by itself (status {returncode}); stopping the server")
        return 128 - returncode if returncode < 0 else returncode
    except Stop as stop:
        say(f"demo: {signal.Signals(stop.args[0]).name}: stopping "
            + ("the daemon and its programs, then " if daemon else "") + "the server")
        return 0
    finally:
        signals.first = signals.first or signal.SIGTERM   # from here on, signals are counted
        if daemon is not None:
            stop_daemon(daemon, signals)
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
