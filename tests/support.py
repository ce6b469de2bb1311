"""Test-server plumbing shared by the tests and the benchmarks (no pytest here)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parent.parent
ADMIN = ("admin", "secret")


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
    """One scripts/couch-server process; can be killed and started again on the same port."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(ROOT / "scripts" / "couch-server"), "--port", str(self.port), "--admin", ":".join(ADMIN)],
            stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()
        if not line.startswith("ready ") or time.monotonic() > deadline:
            raise RuntimeError(f"couch-server did not start: {line!r}; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        """Stop it abruptly, as a crashed or unplugged server."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
            subprocess.run(["pkill", "-9", "-f", f"pouchdb-server.*-p {self.port}"], check=False)
        self.process = None


class AdminClient:
    """Plain HTTP as an operator would use it (curl-like), to set up and inspect test data."""

    def __init__(self, base: str, db: str) -> None:
        self.base = base
        self.db = db
        self.http = requests.Session()
        self.http.auth = ADMIN

    def url(self, *parts: str) -> str:
        return "/".join([self.base, quote(self.db, safe="")] + [quote(p, safe="") for p in parts])

    def create_db(self) -> None:
        response = self.http.put(self.url(), timeout=10)
        assert response.status_code in (201, 412), response.text

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
                         "log_level": "DEBUG", "boot_config": "", **{k: str(v) for k, v in settings.items()}}
        self.process: subprocess.Popen | None = None
        self.write_config()

    def write_config(self) -> None:
        lines = ["[himbeerecouch]"] + [f"{k} = {v}" for k, v in self.settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, env: dict | None = None) -> None:
        environment = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "himbeerecouch", "run", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"), env=environment, cwd=ROOT)

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
