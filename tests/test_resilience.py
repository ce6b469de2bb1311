"""The daemon when the server goes away, goes silent, restarts, or was never there."""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from support import marker_program, starts
from support import userinfo, AdminClient, CouchServer, DaemonProcess, free_port, wait_for
from himbeerecouch.couch import Database
from himbeerecouch.feed import Changed, Follower, Snapshot
from netproxy import Relay

pytestmark = pytest.mark.integration
MACID = 202481596538417


@pytest.fixture
def relay(couch):
    proxy = Relay(couch.port, couch.host)
    yield proxy
    proxy.close()


def relay_url(relay) -> str:
    return f"http://{userinfo()}@127.0.0.1:{relay.port}"


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that records every message."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, OSError):
                continue

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_a_write_between_the_first_read_and_the_feed_is_not_missed(couch, admin):
    """The seq is taken before the read, so the feed replays what was written after it."""
    db = Database(couch.admin_url, admin.db)
    events: list = []

    def emit(event):
        events.append(event)
        if isinstance(event, Snapshot):
            # Exactly the gap: after the read, before the feed is opened.
            admin.put({"_id": "late", "type": MACID, "code": "def main(): pass"})

    follower = Follower(connect=lambda: db, macid=MACID, since=None, heartbeat_seconds=1,
                        backoff_cap=2, emit=emit)
    follower.start()
    try:
        wait_for(lambda: any(isinstance(e, Changed) and e.change.doc_id == "late" for e in events),
                 message="the change written in the gap")
    finally:
        follower.stop()
    snapshot = next(e for e in events if isinstance(e, Snapshot))
    assert "late" not in [doc["_id"] for doc in snapshot.docs]


def test_resume_from_the_checkpoint_after_a_restart(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("v2")')})
    daemon.wait_log("p: v2")
    checkpoint = json.loads((daemon.state_dir / "checkpoint.json").read_text())
    assert checkpoint["owner"]["macid"] == MACID and checkpoint["seq"] is not None
    assert daemon.stop() == 0
    # While the daemon is down, a change; after the restart it resumes from the checkpoint.
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("v3")')})
    daemon.start()
    daemon.wait_log("p: v3")
    daemon.wait_log(f"since {checkpoint['seq']}")
    # The change seen twice (first read and feed replay) started the new code once, and the
    # cached v2, outdated while the daemon was down, did not run again even for a moment.
    time.sleep(1.0)
    assert daemon.log().count("p: v3") == 1
    assert daemon.log().count("p: started (pid") == 3     # v1, v2, and v3 after the restart
    assert "running the last-known code" not in daemon.log()


@pytest.mark.starts_servers
def test_server_killed_and_restarted_while_programs_run(tmp_path):
    server = CouchServer(free_port(), tmp_path / "server.log")
    server.start()
    try:
        admin = AdminClient(server.url, f"test_{uuid.uuid4().hex[:8]}")
        admin.create_db()
        first = admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
        (tmp_path / "d").mkdir()
        daemon = DaemonProcess(tmp_path / "d", server.admin_url, admin.db, MACID)
        daemon.start()
        try:
            wait_for(lambda: starts(tmp_path, "p"), message="the program")
            daemon.wait_log("following changes")
            pid = starts(tmp_path, "p")[0]
            server.kill()
            daemon.wait_log("server unreachable")
            time.sleep(2)
            assert starts(tmp_path, "p") == [pid] and daemon.process.poll() is None
            # The server comes back (in-memory: its data restored, revisions and all).
            server.start()
            admin.create_db()
            restore = admin.http.post(admin.url("_bulk_docs"), json={"docs": [first], "new_edits": False})
            assert restore.status_code == 201, restore.text
            admin.put({"_id": "q", "type": MACID, "code": marker_program(tmp_path, "q")})
            wait_for(lambda: starts(tmp_path, "q"), timeout=20, message="the program written meanwhile")
            admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("after")')})
            daemon.wait_log("p: after", timeout=20)
            assert len(starts(tmp_path, "p")) == 2   # restarted for its change, not for the outage
        finally:
            assert daemon.stop() == 0
    finally:
        server.stop()


def test_a_silent_connection_is_dropped_after_three_heartbeats(admin, make_daemon, relay, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon(server=relay_url(relay))
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    daemon.wait_log("following changes")
    relay.freeze()                 # half-open: the connection stays, no byte passes
    daemon.wait_log("server unreachable", timeout=10)
    relay.up()
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("through")')})
    daemon.wait_log("p: through", timeout=20)


def test_offline_start_runs_the_last_known_code(admin, make_daemon, relay, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("cached")')})
    daemon = make_daemon(server=relay_url(relay), offline_start_seconds=2)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    wait_for(lambda: (daemon.state_dir / "code.json").exists(), message="the code cache")
    assert daemon.stop() == 0
    relay.down()
    notify = NotifySocket(tmp_path / "notify")
    try:
        daemon.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "500000"})
        wait_for(lambda: len(starts(tmp_path, "p")) == 2, message="the program from the cache")
        # Its marker file comes before its first log line: wait for the line too.
        wait_for(lambda: daemon.log().count("p: started p") == 2, message="its log line")
        # Only once the server has had its chance to answer.
        log = daemon.log()
        waited = log.index("no answer from the server within 2 s: running the last-known code")
        assert log.rindex("p: started p") > waited
        wait_for(lambda: notify.count("READY=1"), message="READY=1 while offline")
        daemon.wait_log("server unreachable")
        pings = notify.count("WATCHDOG=1")
        wait_for(lambda: notify.count("WATCHDOG=1") >= pings + 3, message="watchdog pings while offline")
        assert "connecting to the server" in next(m for m in notify.messages if "READY=1" in m)
        assert any("STATUS=1 program(s) running; server unreachable" in m for m in notify.messages)
        # The server is back: the daemon reconciles (here: a change made while it was away).
        admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("fresh")')})
        relay.up()
        daemon.wait_log("p: fresh", timeout=20)
        wait_for(lambda: any("server connected" in m for m in notify.messages), message="STATUS connected")
    finally:
        daemon.stop()
        notify.close()


def test_programs_do_not_inherit_the_notify_socket(admin, make_daemon, tmp_path):
    code = ('import os\ndef main():\n    log("NOTIFY_SOCKET=%s WATCHDOG_USEC=%s" % '
            '(os.environ.get("NOTIFY_SOCKET"), os.environ.get("WATCHDOG_USEC")))\n')
    admin.put({"_id": "env", "type": MACID, "code": code})
    notify = NotifySocket(tmp_path / "notify")
    daemon = make_daemon()
    try:
        daemon.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
        daemon.wait_log("env: NOTIFY_SOCKET=None WATCHDOG_USEC=None")
        wait_for(lambda: notify.count("READY=1") == 1, message="READY=1")
        daemon.stop()
        assert notify.count("STOPPING=1") == 1
    finally:
        notify.close()


def test_an_unwritable_state_dir_is_survived(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon()
    # A directory where the cache file belongs: every write of it fails, as on a full card.
    (daemon.state_dir / "code.json").mkdir(parents=True)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    daemon.wait_log("cannot write")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("still")')})
    daemon.wait_log("p: still")
    assert daemon.process.poll() is None


def test_a_missing_database_is_named_and_retried(couch, admin, make_daemon, tmp_path):
    daemon = make_daemon()
    daemon.settings["database"] = admin.db + "_later"
    daemon.write_config()
    daemon.start()
    daemon.wait_log(f"database '{admin.db}_later' does not exist")
    later = AdminClient(couch.url, admin.db + "_later")
    later.create_db()
    try:
        later.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
        wait_for(lambda: starts(tmp_path, "p"), timeout=20, message="the program once the database exists")
    finally:
        daemon.stop()
        later.drop_db()
