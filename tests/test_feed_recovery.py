"""A server that comes back after an outage is followed again within seconds, and a server that
is away is not hammered meanwhile."""
from __future__ import annotations

import time

import pytest
import requests
from pycouchdb import exceptions as couch_errors

from himbeerecouch.couch import Database
from himbeerecouch.feed import FeedState, Follower, Snapshot, is_refusal
from netproxy import Relay
from support import userinfo, marker_program, starts, wait_for

pytestmark = pytest.mark.integration
MACID = 202481596538417

# Longer than the old back-off could bridge: with 1 s doubling to 60 s, the attempts fall at
# about 1, 3, 7, 15 and 31 s (jitter: at most 37 s) and the next one at 50 s at the earliest,
# so a server back after 40 s went unnoticed for 10 s or more.
OUTAGE_SECONDS = 40.0
FOLLOW_SECONDS = 5.0       # the promise: followed within 5 s of the server being back
APPLY_SECONDS = 5.0        # then the program restarts with the new code (a process start)


@pytest.fixture
def relay(couch):
    proxy = Relay(couch.port, couch.host)
    yield proxy
    proxy.close()


def relay_url(relay: Relay) -> str:
    return f"http://{userinfo()}@127.0.0.1:{relay.port}"


def test_a_server_back_after_a_long_outage_is_followed_within_seconds(admin, make_daemon, relay, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    # The default cap of the restart back-off, as on a Pi.
    daemon = make_daemon(server=relay_url(relay), restart_backoff_max_seconds=60)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    daemon.wait_log("following changes")
    relay.down()
    daemon.wait_log("server unreachable")
    time.sleep(OUTAGE_SECONDS)
    # Written while the Pi cannot see the server (the relay is its only way there).
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("after the outage")')})
    followed = daemon.log().count("following changes")
    relay.up()
    wait_for(lambda: daemon.log().count("following changes") > followed, timeout=FOLLOW_SECONDS,
             message=f"the feed to follow the server again:\n{daemon.log()[-2000:]}")
    daemon.wait_log("p: after the outage", timeout=APPLY_SECONDS)
    assert daemon.process.poll() is None


def test_a_server_that_is_away_is_not_hammered(couch, admin, relay):
    """While the server is away the follower keeps trying, a few seconds apart."""
    attempts: list[float] = []
    events: list = []

    def connect() -> Database:
        attempts.append(time.monotonic())
        return Database(relay_url(relay), admin.db, timeout=5)

    follower = Follower(connect=connect, macid=MACID, since=None, heartbeat_seconds=1,
                        backoff_cap=60, emit=events.append)
    follower.start()
    try:
        wait_for(lambda: FeedState(connected=True) in events, message="the feed")
        relay.down()
        wait_for(lambda: any(isinstance(e, FeedState) and not e.connected for e in events),
                 message="the outage noticed")
        down_at, before = time.monotonic(), len(attempts)
        time.sleep(12)
        during = [t for t in attempts[before:] if t >= down_at]
        # 1 s, 2 s, then every 2.4-3 s: 4 or 5 attempts in 12 s. A retry loop without back-off
        # makes hundreds; one that gives up makes none.
        assert 3 <= len(during) <= 7, [round(t - down_at, 1) for t in during]
        relay.up()
        snapshots = sum(isinstance(e, Snapshot) for e in events)
        wait_for(lambda: sum(isinstance(e, Snapshot) for e in events) > snapshots, timeout=FOLLOW_SECONDS,
                 message="the follower back on the server")
    finally:
        follower.stop()


def test_a_missing_database_backs_off_further_than_an_unreachable_server(couch, admin):
    """A refusal (4xx) waits for someone's fix: it is not retried every few seconds for ever."""
    events: list = []
    attempts: list[float] = []

    def connect() -> Database:
        attempts.append(time.monotonic())
        return Database(couch.admin_url, admin.db + "_missing", timeout=5)

    follower = Follower(connect=connect, macid=MACID, since=None, heartbeat_seconds=1,
                        backoff_cap=60, emit=events.append)
    follower.start()
    try:
        # Attempts at about 0, 1, 3, 7 and 15 s: the delays keep doubling past the short cap.
        wait_for(lambda: len(attempts) >= 4, timeout=12, message="four attempts")
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert gaps[2] > 3.0, gaps
        assert any("does not exist" in (e.error or "") for e in events if isinstance(e, FeedState))
    finally:
        follower.stop()


@pytest.mark.parametrize("error, refusal", [
    (requests.ConnectionError("Connection refused"), False),
    (requests.ReadTimeout("read timed out"), False),
    (requests.exceptions.SSLError("EOF occurred in violation of protocol"), False),
    (requests.exceptions.SSLError("certificate verify failed: unable to get local issuer"), True),
    (ValueError("Expecting value: line 1 column 1"), False),          # an HTML 502 page
    (couch_errors.GenericError({"error": "internal_server_error", "reason": "x"}), False),
    (couch_errors.GenericError("changes feed refused: HTTP 503 "), False),
    (couch_errors.GenericError("changes feed refused: HTTP 400 bad selector"), True),
    (couch_errors.GenericError({"error": "unauthorized", "reason": "Name or password is incorrect."}), True),
    (couch_errors.GenericError({"error": "forbidden", "reason": "no"}), True),
    (couch_errors.NotFound("Database does not exist."), True),
])
def test_which_failures_are_refusals(error, refusal):
    assert is_refusal(error) is refusal
