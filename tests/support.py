"""Test-server plumbing shared by the tests and the benchmarks (no pytest here)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote, urlsplit

import requests

from himbeerecouch.processes import descendants

ROOT = Path(__file__).resolve().parent.parent
COUCHDB_LAUNCHER = ROOT.parent / "shared" / "couchdb" / "couchdb-server"

# Which server the integration tests talk to (README.md, "Tests"):
#   HIMBEERECOUCH_TEST_SERVER=pouchdb (default)  scripts/couch-server, pouchdb-server 4.2
#   HIMBEERECOUCH_TEST_SERVER=couchdb            ../shared/couchdb/couchdb-server, Apache CouchDB 3.5
#   HIMBEERECOUCH_TEST_SERVER=/path/to/launcher  any launcher with couch-server's contract
#   HIMBEERECOUCH_TEST_URL=http://admin:pw@host:5984   a CouchDB that is already running
TEST_URL = os.environ.get("HIMBEERECOUCH_TEST_URL", "").rstrip("/")
TEST_SERVER = os.environ.get("HIMBEERECOUCH_TEST_SERVER", "pouchdb")
# How the daemons under test start their programs (the config key `spawn`): fork-server or exec;
# empty: the daemon's default. The fault tier runs in both modes this way.
TEST_SPAWN = os.environ.get("HIMBEERECOUCH_TEST_SPAWN", "")


def _admin_from(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if not parts.username:
        raise SystemExit("HIMBEERECOUCH_TEST_URL must name a server admin: http://USER:PASSWORD@HOST:PORT")
    return unquote(parts.username), unquote(parts.password or "")


ADMIN = _admin_from(TEST_URL) if TEST_URL else ("admin", "secret")


def userinfo() -> str:
    """ADMIN as a URL's `user:password` part."""
    return f"{quote(ADMIN[0], safe='')}:{quote(ADMIN[1], safe='')}"


def server_kind() -> str:
    """'pouchdb' or 'couchdb': what the tests' server is, for the tests that state a difference."""
    if TEST_URL:
        return "couchdb"
    return "pouchdb" if TEST_SERVER in ("pouchdb", "") else "couchdb"


def launcher() -> Path:
    if TEST_SERVER in ("pouchdb", ""):
        return ROOT / "scripts" / "couch-server"
    path = COUCHDB_LAUNCHER if TEST_SERVER == "couchdb" else Path(TEST_SERVER)
    if not path.exists():
        raise SystemExit(f"HIMBEERECOUCH_TEST_SERVER={TEST_SERVER}: no launcher at {path}")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll until `condition()` is truthy; fail the test with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class CouchServer:
    """One test server started by a launcher (scripts/couch-server or CouchDB's); can be killed
    and started again on the same port. With `data_dir` its databases outlive a restart."""

    def __init__(self, port: int, log_path: Path, data_dir: Path | None = None,
                 command: Path | None = None) -> None:
        self.port = port
        self.host = "127.0.0.1"
        self.log_path = log_path
        self.data_dir = data_dir
        self.command = command or launcher()
        self.process: subprocess.Popen | None = None
        self.kind = "pouchdb" if self.command.name == "couch-server" else "couchdb"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{userinfo()}@{self.host}:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        argv = [str(self.command), "--port", str(self.port), "--admin", ":".join(ADMIN)]
        env = dict(os.environ)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--data-dir" if self.kind == "pouchdb" else "--dir", str(self.data_dir)]
            # the launcher's own work files, left behind when it is killed, stay beside the data
            env["TMPDIR"] = str(self.data_dir.parent)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.log_path, "ab"),
                                        text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.kill()
            raise RuntimeError(f"{self.command.name} did not start: {line!r}; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """Stop it abruptly, as a crashed or unplugged server: SIGKILL to the launcher and every
        process below it (the launcher starts the server in a session of its own)."""
        if self.process is None:
            return
        for pid in [self.process.pid] + descendants(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        self.process = None


class ExternalServer:
    """A CouchDB that runs already (HIMBEERECOUCH_TEST_URL): never started or stopped by a test."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self.admin_url = url

    def start(self) -> None:
        response = requests.get(f"{self.url}/_up", timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} does not answer /_up: {response.status_code}")

    def stop(self) -> None:
        pass


def make_server(tmp: Path) -> CouchServer | ExternalServer:
    """The server this run of the tests uses (see the top of this module)."""
    if TEST_URL:
        return ExternalServer(TEST_URL)
    return CouchServer(free_port(), tmp / "server.log")


def segment(text: str) -> str:
    """`text` as one segment of a URL path: "." and ".." too, which clients drop otherwise."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if set(quoted) == {"."} else quoted


class AdminClient:
    """Plain HTTP as an operator would use it (curl-like), to set up and inspect test data."""

    def __init__(self, base: str, db: str) -> None:
        self.base = base
        self.db = db
        self.http = requests.Session()
        self.http.auth = ADMIN

    def url(self, *parts: str) -> str:
        return "/".join([self.base, quote(self.db, safe="")] + [segment(p) for p in parts])

    def create_db(self) -> None:
        response = self.http.put(self.url(), timeout=10)
        assert response.status_code in (201, 412), response.text

    def drop_db(self) -> None:
        self.http.delete(self.url(), timeout=30)

    def get(self, doc_id: str) -> dict | None:
        response = self.http.get(self.url(doc_id), timeout=10)
        return response.json() if response.status_code == 200 else None

    def put(self, doc: dict) -> dict:
        """Create or update (taking the current _rev) a document; returns it with its new _rev."""
        current = self.get(doc["_id"])
        body = dict(doc)
        if current and "_rev" not in body:
            body["_rev"] = current["_rev"]
        response = self.http.put(self.url(doc["_id"]), json=body, timeout=10)
        assert response.status_code in (201, 202), response.text
        return {**body, "_rev": response.json()["rev"]}

    def delete(self, doc_id: str) -> None:
        current = self.get(doc_id)
        response = self.http.delete(self.url(doc_id), params={"rev": current["_rev"]}, timeout=10)
        assert response.status_code in (200, 202), response.text


class DaemonProcess:
    """`python -m himbeerecouch run` with its own config, state dir and log file."""

    def __init__(self, tmp: Path, server_url: str, database: str, macid: int, **settings) -> None:
        self.tmp = tmp
        self.macid = macid
        self.state_dir = tmp / "state"
        self.config_path = tmp / "himbeerecouch.conf"
        self.log_path = tmp / "daemon.log"
        self.settings = {"server": server_url, "database": database, "macid": str(macid),
                         "state_dir": str(self.state_dir), "grace_seconds": "3",
                         "feed_heartbeat_seconds": "1", "status_interval_seconds": "2",
                         "restart_backoff_max_seconds": "2", "start_seconds": "1",
                         "log_level": "DEBUG", "boot_config": "",
                         # No systemd-timesyncd here (its folder does not exist): no clock wait.
                         "timesync_flag": str(tmp / "timesync" / "synchronized"),
                         **({"spawn": TEST_SPAWN} if TEST_SPAWN else {}),
                         **{k: str(v) for k, v in settings.items()}}
        self.process: subprocess.Popen | None = None
        self.write_config()

    def write_config(self) -> None:
        lines = ["[himbeerecouch]"] + [f"{k} = {v}" for k, v in self.settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, env: dict | None = None, ignored_signals: tuple[int, ...] = ()) -> None:
        """`ignored_signals`: started with these ignored, as a shell's background job (`&`)
        starts with SIGINT and SIGQUIT ignored."""
        environment = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment.update(env or {})

        def ignore() -> None:
            for signum in ignored_signals:
                signal.signal(signum, signal.SIG_IGN)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "himbeerecouch", "run", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"), env=environment, cwd=ROOT,
            preexec_fn=ignore if ignored_signals else None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        wait_for(lambda: text in self.log(), timeout, message=f"{text!r} in the daemon log:\n{self.log()[-3000:]}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.process = None
        return code


DEVICE_MACID = 202481596538417


def marker_program(marker_dir: Path, label: str, body: str = "") -> str:
    """Code for a program that records each start (label, pid) as a file and runs until asked to quit."""
    return f'''
import os, threading, time
def main():
    path = os.path.join({str(marker_dir)!r}, "{label}-" + str(os.getpid()))
    with open(path, "w") as f:
        f.write(str(time.time()))
    log("started {label}")
{body}
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
    log("quitting {label}")
'''


def starts(marker_dir: Path, label: str) -> list[str]:
    return sorted(p.name for p in marker_dir.glob(f"{label}-*"))


class RootHelperSocket:
    """What himbeerecouch-root.socket does (systemd, Accept=yes): listen, and start one root
    helper per connection with the connection as its standard input. Here the helper runs as
    the test's user, is told the daemon's process id (systemd would give the unit's MainPID),
    and records power actions in `power_log` instead of doing them."""

    def __init__(self, path: Path, config_path: Path, daemon_pid: Callable[[], int], power_log: Path) -> None:
        self.path = path
        self.log_path = path.with_suffix(".log")
        self.power_log = power_log
        self._config_path = config_path
        self._daemon_pid = daemon_pid
        self._helpers: list[subprocess.Popen] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return                          # closed
            with connection, open(self.log_path, "ab") as log:
                self._helpers.append(subprocess.Popen(
                    [sys.executable, "-m", "himbeerecouch.roothelper", "--config", str(self._config_path),
                     "--daemon-pid", str(self._daemon_pid()), "--power-log", str(self.power_log)],
                    stdin=connection, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT))

    def power_actions(self) -> list[str]:
        return self.power_log.read_text().split() if self.power_log.exists() else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        for helper in self._helpers:
            try:
                helper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
