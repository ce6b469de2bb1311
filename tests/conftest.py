"""Shared fixtures: the CouchDB-protocol server (scripts/couch-server) and daemons under test."""
from __future__ import annotations

import uuid

import pytest

from himbeerecouch import credentials
from himbeerecouch.config import Config
from support import DEVICE_MACID, AdminClient, CouchServer, DaemonProcess, free_port


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


@pytest.fixture
def device(couch, admin, make_daemon):
    """A daemon that knows the server by URL only: it logs in as its CouchDB user (MacID)."""
    def factory(**settings):
        daemon = make_daemon(server=couch.url, **settings)
        creds, _ = credentials.load_or_create(Config(state_dir=daemon.state_dir), create=True, macid=DEVICE_MACID)
        user_url = f"{couch.url}/_users/org.couchdb.user:{creds.user}"
        user = {"name": creds.user, "password": creds.password, "roles": [], "type": "user"}
        existing = admin.http.get(user_url, timeout=10)
        if existing.status_code == 200:
            user["_rev"] = existing.json()["_rev"]
        response = admin.http.put(user_url, json=user, timeout=10)
        assert response.status_code in (201, 202), response.text
        security = admin.http.put(admin.url("_security"), timeout=10,
                                  json={"admins": {"names": [], "roles": []},
                                        "members": {"names": [creds.user], "roles": []}})
        assert security.status_code == 200, security.text
        return daemon
    return factory
