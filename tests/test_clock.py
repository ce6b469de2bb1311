"""A synchronised clock before TLS (clock.py): the daemon's https connections wait for
systemd-timesyncd's first synchronisation, at most clock_wait_seconds, and say so."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from himbeerecouch.clock import ClockGate
from support import marker_program, starts, userinfo, wait_for
from tlsfront import TlsFront, make_pki

MACID = 202481596538417


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_timesyncd_nothing_waits(tmp_path, caplog):
    gate = ClockGate(tmp_path / "timesync" / "synchronized", 60)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    assert gate.wait() is True
    assert time.monotonic() - started < 0.5
    assert "clock" not in caplog.text


def test_a_synchronised_clock_opens_the_gate_at_once(tmp_path, caplog):
    (tmp_path / "timesync").mkdir()
    (tmp_path / "timesync" / "synchronized").touch()
    caplog.set_level(logging.INFO)
    assert ClockGate(tmp_path / "timesync" / "synchronized", 60).wait() is True
    assert "waiting" not in caplog.text


def test_waits_until_timesyncd_synchronises(tmp_path, caplog):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    caplog.set_level(logging.INFO)
    gate = ClockGate(flag, 60, poll_seconds=0.05)
    results = []
    waiters = [threading.Thread(target=lambda: results.append(gate.wait())) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)
    assert results == [] and all(waiter.is_alive() for waiter in waiters)
    flag.touch()
    for waiter in waiters:
        waiter.join(timeout=5)
    assert results == [True, True, True]
    # One line each way, however many connections waited.
    assert caplog.text.count("waiting for a synchronised clock") == 1
    assert caplog.text.count("clock synchronised after") == 1
    # Once open, it stays open: the flag's removal (timesyncd restarted) does not close it.
    flag.unlink()
    assert gate.wait() is True


def test_after_the_wait_it_connects_anyway_with_a_warning(tmp_path, caplog):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    clock = FakeTime()
    gate = ClockGate(flag, 120, monotonic=clock, poll_seconds=0.01)
    timer = threading.Timer(0.2, lambda: setattr(clock, "now", clock.now + 121))
    timer.start()
    assert gate.wait() is True
    timer.join()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "still not synchronised after 120 s" in warnings[0].getMessage()


def test_a_stop_ends_the_wait(tmp_path):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert ClockGate(flag, 60, poll_seconds=0.05).wait(stop) is False


def test_zero_seconds_never_waits(tmp_path):
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    assert ClockGate(flag, 0).wait() is True


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.integration
def test_the_daemon_waits_for_the_clock_before_tls(admin, make_daemon, couch, pki, tmp_path):
    front = TlsFront(couch.port, pki["good"], pki["good_key"], couch.host)
    try:
        admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
        flag = tmp_path / "timesync" / "synchronized"
        flag.parent.mkdir()
        daemon = make_daemon(server=front.url(userinfo()), ca_file=pki["ca"], timesync_flag=flag,
                             clock_wait_seconds=60)
        daemon.start()
        daemon.wait_log("waiting for a synchronised clock before connecting over TLS")
        time.sleep(2)
        assert not starts(tmp_path, "p")
        assert admin.get(f"{MACID}_heartbeat") is None
        flag.touch()
        daemon.wait_log("clock synchronised after")
        wait_for(lambda: starts(tmp_path, "p"), message="the program once the clock is synchronised")
    finally:
        front.close()


@pytest.mark.integration
def test_plain_http_does_not_wait_for_the_clock(admin, make_daemon, couch, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    daemon = make_daemon(timesync_flag=flag, clock_wait_seconds=60)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "p"), message="the program over http")
    assert "synchronised clock" not in daemon.log()
