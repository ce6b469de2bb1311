"""Shared fixtures: the CouchDB-protocol server (support.make_server: pouchdb-server, Apache CouchDB
or one named by URL) and daemons under test."""
from __future__ import annotations

import uuid

import pytest

from himbeerecouch import credentials
from himbeerecouch.config import Config
import support
from support import DEVICE_MACID, AdminClient, CouchServer, DaemonProcess, make_server


def pytest_report_header(config) -> str:
    spawn = f"; programs start with spawn = {support.TEST_SPAWN or 'the default'}"
    if support.TEST_URL:
        return f"test server: {support.ExternalServer(support.TEST_URL).url} (HIMBEERECOUCH_TEST_URL){spawn}"
    return f"test server: {support.launcher()} ({support.server_kind()}){spawn}"


def pytest_runtest_setup(item) -> None:
    # A test of a difference between the servers says which server it is about.
    for mark in item.iter_markers("only_on"):
        if mark.args[0] != support.server_kind():
            pytest.skip(f"{mark.args[0]} only: {mark.kwargs.get('reason', '')}")
    if item.get_closest_marker("starts_servers") and support.TEST_URL:
        pytest.skip("starts and kills test servers of its own; HIMBEERECOUCH_TEST_URL names one")


@pytest.fixture(scope="session")
def couch(tmp_path_factory) -> CouchServer:
    server = make_server(tmp_path_factory.mktemp("couch"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def admin(couch) -> AdminClient:
    """A database of the test's own, removed after it (an outside server keeps nothing)."""
    client = AdminClient(couch.url, f"test_{uuid.uuid4().hex[:12]}")
    client.create_db()
    yield client
    client.drop_db()


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
