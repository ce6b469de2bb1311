"""The status document: in a database of its own when `status_database` names one, in the code
database otherwise (as the original); written when something changes, else as a slow keep-alive."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from himbeerecouch.couch import Database
from himbeerecouch.status import StatusWriter
from support import AdminClient, marker_program, starts, wait_for
from test_operator import OTHER, PI, device_session, fleet_db, forget_users, hc  # noqa: F401

pytestmark = pytest.mark.integration
MACID = 202481596538417


@pytest.fixture
def status_db(couch):
    client = AdminClient(couch.url, f"status_{uuid.uuid4().hex[:12]}")
    client.create_db()
    yield client
    client.drop_db()


def test_the_status_goes_to_the_status_database_when_set(admin, status_db, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon(status_database=status_db.db)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program to start")
    doc = wait_for(lambda: (status_db.get(f"{MACID}_heartbeat") or {}).get("running_ids") == ["p"]
                   and status_db.get(f"{MACID}_heartbeat"), message="the status in the status database")
    assert doc["type"] == "heartbeat" and doc["programs"]["p"]["state"] in ("STARTING", "RUNNING")
    assert doc["status_interval"] == 2
    assert admin.get(f"{MACID}_heartbeat") is None          # nothing in the code database
    assert f"status document in database {status_db.db}" in daemon.log()


def test_by_default_the_status_stays_in_the_code_database(admin, make_daemon):
    daemon = make_daemon()
    daemon.start()
    doc = wait_for(lambda: admin.get(f"{MACID}_heartbeat"), message="the status in the code database")
    assert doc["type"] == "heartbeat" and "running_ids" in doc and "ip" in doc and "timestamp" in doc


def test_the_status_is_written_on_change_and_otherwise_only_as_a_keep_alive(admin, make_daemon, tmp_path):
    daemon = make_daemon(status_interval_seconds=300)
    daemon.start()
    wait_for(lambda: admin.get(f"{MACID}_heartbeat"), message="the first status")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    # A change is written at once, not at the next keep-alive.
    running = wait_for(lambda: ((admin.get(f"{MACID}_heartbeat") or {}).get("programs", {}).get("p", {})
                                .get("state") == "RUNNING") and admin.get(f"{MACID}_heartbeat"),
                       timeout=20, message="RUNNING in the status")
    assert running["status_interval"] == 300
    time.sleep(4)                                        # nothing changes: no write
    assert admin.get(f"{MACID}_heartbeat")["_rev"] == running["_rev"]


def test_the_keep_alive_rewrites_an_unchanged_status(admin, make_daemon):
    daemon = make_daemon(status_interval_seconds=1)
    daemon.start()
    first = wait_for(lambda: admin.get(f"{MACID}_heartbeat"), message="the first status")
    later = wait_for(lambda: (admin.get(f"{MACID}_heartbeat") or {}).get("_rev", "0").split("-")[0]
                     > first["_rev"].split("-")[0] and admin.get(f"{MACID}_heartbeat"),
                     timeout=10, message="a keep-alive rewrite")
    assert later["timestamp"] >= first["timestamp"]


def test_a_stream_of_changes_is_written_at_most_every_two_seconds_and_the_newest_last(admin, couch):
    """A program failing over and over changes the status at every turn: those changes are
    spaced out, not each one written (every write wakes every feed of the database)."""
    writer = StatusWriter(connect=lambda: Database(couch.admin_url, admin.db), doc_id="9_heartbeat",
                          interval=300)
    writer.start()
    try:
        start = time.monotonic()
        for n in range(20):
            writer.publish({"n": n})
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        newest = wait_for(lambda: (admin.get("9_heartbeat") or {}).get("n") == 19 and admin.get("9_heartbeat"),
                          timeout=10, message="the newest status written")
        writes = int(newest["_rev"].split("-")[0])
        assert 2 <= writes <= elapsed / StatusWriter.MIN_SPACING_SECONDS + 2, (writes, elapsed)
        # The last word (a stop) is not held back by the spacing.
        writer.publish({"n": "changed"})
        writer.finish({"n": "stopped"}, timeout=1.0)
        assert not writer.is_alive()
        assert admin.get("9_heartbeat")["n"] == "stopped"
    finally:
        writer.stop()
        writer.join(5)


def test_setup_db_and_status_use_the_status_database_and_devices_write_only_their_own(
        couch, fleet_db, make_daemon, tmp_path):  # noqa: F811
    admin, deployer = fleet_db
    status_name = admin.db + "_status"
    status = AdminClient(couch.url, status_name)
    try:
        made = hc("setup-db", "--database", admin.db, "--status-database", status_name, couch=couch)
        assert made.returncode == 0, made.stderr
        assert f"created database {status_name}" in made.stdout and "(status database)" in made.stdout
        again = hc("setup-db", "--database", admin.db, "--status-database", status_name, couch=couch)
        assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout
        # The deployer made before the status database existed: add-user makes it a member there.
        granted = hc("add-user", deployer[0], "--keep-password", "--database", admin.db,
                     "--status-database", status_name, couch=couch)
        assert granted.returncode == 0, granted.stderr
        assert "deployer" in status.http.get(status.url("_security"), timeout=10).json()["members"]["roles"]

        daemon = make_daemon(macid=PI, server=couch.url, status_database=status_name)
        daemon.settings["database"] = admin.db
        daemon.write_config()
        session, _ = device_session(couch, admin, daemon.state_dir, PI)
        admin.put({"_id": "prog", "type": PI, "name": "blinker", "code": marker_program(tmp_path, "blinker")})
        daemon.start()
        wait_for(lambda: starts(tmp_path, "blinker"), message="the program")

        def write(doc):
            return session.put(status.url(doc["_id"]), json=doc, timeout=10).status_code
        assert write({"_id": f"{PI}_data_1", "type": "measurement"}) == 201
        assert write({"_id": f"{OTHER}_heartbeat", "type": "heartbeat", "macid": OTHER}) == 403
        assert write({"_id": "loose", "type": "heartbeat"}) == 403

        def table():
            result = hc("status", "--database", admin.db, "--status-database", status_name,
                        user=deployer, couch=couch)
            return result.stdout if "blinker:RUNNING" in result.stdout else None
        out = wait_for(table, timeout=20, message="the device in the status table")
        assert str(PI) in out and "STALE" not in out
        one = hc("status", str(PI), "--json", "--database", admin.db, "--status-database", status_name,
                 user=deployer, couch=couch)
        assert json.loads(one.stdout)[0]["macid"] == PI
        # A device not moved over yet still writes into the code database: status shows it too.
        admin.put({"_id": "111_heartbeat", "type": "heartbeat", "macid": 111, "timestamp": "2020-01-01T00:00:00Z"})
        both = hc("status", "--database", admin.db, "--status-database", status_name, user=deployer, couch=couch)
        rows = {line.split()[0]: line for line in both.stdout.splitlines()[1:]}
        assert set(rows) == {"111", str(PI)} and "STALE" in rows["111"], both.stdout
        # Without --status-database, status reads the code database only.
        alone = hc("status", "--database", admin.db, user=deployer, couch=couch)
        assert [line.split()[0] for line in alone.stdout.splitlines()[1:]] == ["111"], alone.stdout
    finally:
        status.drop_db()


def test_status_judges_staleness_by_the_devices_own_interval():
    from datetime import datetime, timezone
    from himbeerecouch.admin import status_table
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    docs = [{"_id": "1_heartbeat", "macid": 1, "timestamp": "2026-01-01T11:55:00Z", "status_interval": 300},
            {"_id": "2_heartbeat", "macid": 2, "timestamp": "2026-01-01T11:55:00Z"},          # original: 30 s
            {"_id": "3_heartbeat", "macid": 3, "timestamp": "2026-01-01T11:48:00Z", "status_interval": 300}]
    rows = {line.split()[0]: line for line in status_table(docs, None, now).splitlines()[1:]}
    assert "STALE" not in rows["1"] and "STALE" in rows["2"] and "STALE" in rows["3"]
    rows = {line.split()[0]: line for line in status_table(docs, 3600, now).splitlines()[1:]}
    assert not any("STALE" in row for row in rows.values())


def test_sighup_moves_the_status_to_a_newly_named_status_database(admin, status_db, make_daemon):
    import signal
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: admin.get(f"{MACID}_heartbeat"), message="the status in the code database")
    daemon.settings["status_database"] = status_db.db
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    doc = wait_for(lambda: status_db.get(f"{MACID}_heartbeat"), message="the status in the status database")
    assert doc["macid"] == MACID and doc["daemon"] == "running"
