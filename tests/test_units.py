"""Small pieces without a server: back-off, state files, identity, configuration."""
import os
import random
from pathlib import Path

import pytest

from himbeerecouch import config, identity
from himbeerecouch.backoff import Backoff
from himbeerecouch.state import StateDir, write_atomic


def test_backoff_grows_exponentially_is_capped_and_resets():
    backoff = Backoff(first=1.0, cap=10.0, jitter=0.2, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.8 <= delays[0] <= 1.2
    assert 1.6 <= delays[1] <= 2.4
    assert all(d <= 10.0 for d in delays)
    assert delays[-1] >= 8.0
    backoff.reset()
    assert backoff.next_delay() <= 1.2


def test_backoff_is_jittered():
    values = {round(Backoff(rng=random.Random(seed)).next_delay(), 6) for seed in range(10)}
    assert len(values) > 5


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_state_belongs_to_one_owner(tmp_path):
    mine = StateDir(tmp_path, {"server": "http://a", "database": "db", "macid": 1})
    mine.prepare()
    assert mine.save_code({"x": {"_id": "x"}}) and mine.save_seq("7-abc")
    assert mine.load_code() == {"x": {"_id": "x"}} and mine.load_seq() == "7-abc"
    # A cloned card in another Pi (another MacID) must not run this Pi's code.
    clone = StateDir(tmp_path, {"server": "http://a", "database": "db", "macid": 2})
    assert clone.load_code() == {} and clone.load_seq() is None


def test_state_survives_garbage_and_an_unwritable_dir(tmp_path):
    state = StateDir(tmp_path, {"macid": 1})
    (tmp_path / StateDir.CODE).write_text("{not json")
    assert state.load_code() == {}
    missing = StateDir(tmp_path / "no" / "such", {"macid": 1})
    assert missing.save_seq(1) is False


def make_net(root: Path, interfaces: dict) -> Path:
    for name, mac in interfaces.items():
        (root / name).mkdir(parents=True)
        (root / name / "address").write_text(mac + "\n")
    return root


def test_macid_of_the_configured_interface(tmp_path):
    net = make_net(tmp_path, {"eth0": "b8:27:eb:12:34:56", "lo": "00:00:00:00:00:00"})
    assert identity.find_mac("eth0", net) == ("eth0", "b8:27:eb:12:34:56")
    assert identity.mac_to_macid("b8:27:eb:12:34:56") == 0xB827EB123456


def test_macid_falls_back_to_the_first_real_interface(tmp_path):
    # A Pi Zero W has only wlan0; a locally administered (random) MAC is no identity.
    net = make_net(tmp_path, {"lo": "00:00:00:00:00:00", "docker0": "02:42:ac:11:00:02",
                              "wlan0": "b8:27:eb:00:00:01"})
    assert identity.find_mac("eth0", net) == ("wlan0", "b8:27:eb:00:00:01")


def test_no_interface_is_a_clear_error(tmp_path):
    net = make_net(tmp_path, {"lo": "00:00:00:00:00:00"})
    with pytest.raises(identity.IdentityError, match="macid"):
        identity.find_mac("eth0", net)


def test_config_defaults_and_values(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[himbeerecouch]\nserver = http://x:5984\nmacid = 0x10\ngrace_seconds = 2.5\n"
                    "state_dir = /tmp/s\nsome_future_key = 1\n")
    loaded = config.load(path)
    assert (loaded.server, loaded.macid, loaded.grace_seconds) == ("http://x:5984", 16, 2.5)
    assert loaded.database == "nedm/raspberries" and str(loaded.state_dir) == "/tmp/s"


def test_only_a_named_config_file_that_is_missing_is_an_error(tmp_path):
    # A bad value is logged and replaced (tests/test_config.py); a typo in --config is not.
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.conf")


def test_server_url_falls_back_to_the_state_dir_file(tmp_path):
    (tmp_path / "server").write_text("http://pi-server:5984\n")
    assert config.Config(state_dir=tmp_path).server_url() == "http://pi-server:5984"
    assert config.Config(state_dir=tmp_path, server="http://a").server_url() == "http://a"
    assert config.Config(state_dir=tmp_path / "none").server_url() == ""


def test_a_checkpoint_ahead_of_the_database_is_detected():
    from himbeerecouch.feed import seq_ahead
    assert seq_ahead(15, 3) and seq_ahead("15-g1AAA", "3-g1BBB")
    assert not seq_ahead(3, 15) and not seq_ahead("3-x", "3-y")
    assert not seq_ahead("opaque", 3) and not seq_ahead(3, "opaque")


def test_the_boot_file_wins_and_never_breaks_the_start(tmp_path):
    boot = tmp_path / "himbeerecouch.txt"
    boot.write_text("\ufeffserver = http://fleet:5984\nmacid = 77\ngrace_seconds = soon\nboot_config = /x\n")
    main = tmp_path / "c.conf"
    main.write_text(f"[himbeerecouch]\nserver = http://conffile:5984\ngrace_seconds = 5\nboot_config = {boot}\n")
    loaded = config.load(main)
    assert (loaded.server, loaded.macid, loaded.grace_seconds) == ("http://fleet:5984", 77, 5.0)
    boot.write_text("this is not = = [ini\n[[[")
    assert config.load(main).server == "http://conffile:5984"
    boot.write_bytes(b"\xff\xfe\x00garbage")
    assert config.load(main).server == "http://conffile:5984"
    main.write_text("[himbeerecouch]\nboot_config =\n")
    assert config.load(main).boot_config == ""


def test_the_original_util_api(tmp_path, monkeypatch):
    from himbeerecouch import util
    assert util.getipaddr("lo") == "127.0.0.1"
    assert util.getipaddr("no-such-interface") is None
    assert isinstance(util.getmacid(), int)
    # getpassword() follows the configured scheme; legacy is the original formula.
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "c.conf")
    (tmp_path / "c.conf").write_text(f"[himbeerecouch]\nmacid = 5\npassword_scheme = legacy\n"
                                     f"state_dir = {tmp_path / 'state'}\nboot_config =\n")
    import hashlib
    assert util.getpassword() == hashlib.sha1(("5" + util.getserial()).encode()).hexdigest()


def test_a_late_interface_is_waited_for_early_in_a_boot(tmp_path):
    import threading
    net = make_net(tmp_path, {"wlan0": "b8:27:eb:00:00:01"})
    threading.Timer(0.3, lambda: make_net(tmp_path, {"eth0": "b8:27:eb:00:00:02"})).start()
    assert identity.find_mac("eth0", net, wait_seconds=5, uptime=lambda: 10.0) == ("eth0", "b8:27:eb:00:00:02")


def test_no_wait_on_a_system_that_is_up_for_long(tmp_path):
    import time
    net = make_net(tmp_path, {"wlan0": "b8:27:eb:00:00:01"})
    started = time.monotonic()
    assert identity.find_mac("eth0", net, wait_seconds=5, uptime=lambda: 3600.0)[0] == "wlan0"
    assert time.monotonic() - started < 1


def test_refused_credentials_are_retried_sooner(monkeypatch):
    # A device whose CouchDB user is made later must start its code soon after.
    import time
    from pycouchdb import exceptions
    from himbeerecouch import feed
    monkeypatch.setattr(feed, "CREDENTIALS_RETRY_SECONDS", 0.05)
    states = []

    def refuse():
        raise exceptions.GenericError({"error": "unauthorized", "reason": "Name or password is incorrect."})

    follower = feed.Follower(connect=refuse, macid=1, since=None, heartbeat_seconds=1, backoff_cap=60,
                             emit=states.append)
    follower.start()
    time.sleep(1.0)
    follower.stop()
    assert len(states) >= 5                       # uncapped, the second retry alone waits 2 s
    assert "refused our credentials" in states[0].error


def test_tls_failures_say_what_to_do():
    import requests
    from himbeerecouch.couch import describe_error
    untrusted = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                             "unable to get local issuer certificate (_ssl.c:1006)')")
    assert "give the CA that signed it with ca_file" in describe_error(untrusted)
    weak_ca = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                           "CA cert does not include key usage extension (_ssl.c:1020)')")
    assert "reissue it" in describe_error(weak_ca)
