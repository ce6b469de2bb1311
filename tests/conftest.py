"""Shared fixtures: the CouchDB-protocol server (scripts/couch-server) and daemons under test."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from support import AdminClient, CouchServer, DaemonProcess, free_port


@pytest.fixture(scope="session")
def couch(tmp_path_factory) -> CouchServer:
    server = CouchServer(free_port(), tmp_path_factory.mktemp("couch") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def admin(couch) -> AdminClient:
    client = AdminClient(couch.url, f"test_{uuid.uuid4().hex[:12]}")
    client.create_db()
    return client


@pytest.fixture
def make_daemon(tmp_path, couch, admin):
    """A factory of daemons on the test database; every one is stopped after the test."""
    daemons: list[DaemonProcess] = []

    def factory(macid: int = 202481596538417, server: str | None = None, subdir: str = "d", **settings):
        folder = tmp_path / f"{subdir}{len(daemons)}"
        folder.mkdir()
        daemon = DaemonProcess(folder, couch.admin_url if server is None else server, admin.db, macid, **settings)
        daemons.append(daemon)
        return daemon

    yield factory
    for daemon in daemons:
        daemon.stop()


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
